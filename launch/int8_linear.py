"""Int8 weight-only linear and embedding layers that run fast on this CPU.

    Int8Linear(weight_int8, scale, bias=None)    # y = (x @ weight_int8.T) * scale + bias
    Int8Embedding(weight_int8, scale)            # rows of weight_int8 * scale

The int8 weights and per-output-channel scales come from Intel Neural Compressor's RTN
(launch/quantize.py); this module only executes them. Activations stay bfloat16: dynamic
activation quantization (fbgemm) decodes a little faster but loses too much accuracy on
real weights (docs/int8.md has the numbers), so only the weights are int8.

Two kernels, picked per call by the number of rows (tokens) in the input:
- decode (few rows): `aten._weight_int8pack_mm`, which streams the int8 weights once and
  is memory-bound, so half the bytes of bf16 means nearly half the time;
- prefill (many rows): the int8 weights are widened to bf16 a block of output channels at
  a time and multiplied with oneDNN's bf16 GEMM, because `_weight_int8pack_mm` is a GEMV
  kernel that gets 3-4x slower than bf16 at hundreds of rows. Blocks keep the temporary
  small (a 151936-row lm_head would otherwise need a 1.2 GB bf16 copy per call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Above this many rows the bf16 GEMM on widened weights beats `_weight_int8pack_mm`
# (measured crossover on a 4096x11008 linear: between 8 and 16 rows).
DECODE_MAX_ROWS = 8
# Output channels widened to bf16 at once on the prefill path (2048 x 4096 bf16 = 16 MiB).
PREFILL_BLOCK = 2048
# `_weight_int8pack_mm` crashes the process (SIGSEGV, torch 2.13) for some inner sizes that
# are not multiples of 16, e.g. 24 or 136, and for weights not 64-byte aligned (safetensors
# packs tensors back to back, so a loaded int8 tensor can start at any byte).
_INT8PACK_K_MULTIPLE = 16
_ALIGN = 64


class Int8Linear(nn.Module):
    """A linear layer with symmetric per-output-channel int8 weights and bf16 activations."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        _check(weight, scale)
        self.out_features, self.in_features = weight.shape
        # Buffers, not parameters: nothing here is trained, and buffers are not tied or
        # re-initialised by transformers.
        self.register_buffer("weight", _aligned(weight), persistent=False)
        self.register_buffer("scale", _aligned(scale.reshape(-1).to(dtype)), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.to(dtype), persistent=False)
        self._int8pack = self.in_features % _INT8PACK_K_MULTIPLE == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.scale.dtype)
        if self._int8pack and x2.shape[0] <= DECODE_MAX_ROWS:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale)
        else:
            y = self._widened_matmul(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _widened_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        # int8 -> bf16 is exact (|q| <= 127 fits bf16's 8-bit significand), so the scale is
        # applied once to the output instead of rounding every weight to bf16.
        blocks = [
            F.linear(x2, self.weight[i : i + PREFILL_BLOCK].to(x2.dtype))
            for i in range(0, self.out_features, PREFILL_BLOCK)
        ]
        y = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
        return y.mul_(self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one scale per row (per token id).

    A tied lm_head is an Int8Linear over the same tensors, so a tied model keeps one copy."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        _check(weight, scale)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", _aligned(weight), persistent=False)
        self.register_buffer("scale", _aligned(scale.reshape(-1).to(dtype)), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # A fresh allocation is aligned; the copy is made once per tensor, at load time.
    return t.contiguous() if t.is_contiguous() and t.data_ptr() % _ALIGN == 0 else t.contiguous().clone()


def _check(weight: torch.Tensor, scale: torch.Tensor) -> None:
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"int8 weight must be a 2-D torch.int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
    if scale.numel() != weight.shape[0]:
        raise ValueError(f"need one scale per output channel: {weight.shape[0]} rows but {scale.numel()} scales")
