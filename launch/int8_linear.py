"""Int8 weight-only linear and embedding layers that run fast on this CPU.

    Int8Linear(weight_int8, scale, bias=None)    # y = (x @ weight_int8.T) * scale + bias
    Int8Embedding(weight_int8, scale)            # rows of weight_int8 * scale

The int8 weights and per-output-channel scales come from Intel Neural Compressor's RTN
(launch/quantize.py); this module only executes them. Activations stay bfloat16: dynamic
activation quantization (fbgemm) decodes a little faster but loses too much accuracy on
real weights (docs/int8.md has the numbers), so only the weights are int8.

Two kernels, picked per call by the number of rows (tokens) in the input, compiled once for
this CPU's instruction set (launch/int8_kernels.py):
- decode (1..5 rows): a GEMV that streams the int8 weights once, widens them to fp32 in
  registers and accumulates in fp32, per-channel scale and bias applied in the same pass
  (AVX-512, or AVX2 on CPUs without it). It reads the weights tiled (64 output channels x 256
  inputs a tile, rearranged once at load: `int8_tile`), so 256 activations stay in registers or
  L1 while 64 channels stream past them. Decode is memory-bound; on ChatGLM3-6B / Qwen-7B shapes
  this is 1.1-1.45x faster per linear than `aten._weight_int8pack_mm` on AMD Zen 4, 1.4-2x on Zen 3
  (AVX2); torch.compile's weight-only pattern was 20x slower, fbgemm needs activation
  quantization (docs/int8.md, "The kernel decision");
- prefill (more rows, AVX-512 with AVX512-BF16 or AMX): a GEMM that widens the weights to bf16
  while packing them for oneDNN's bf16 micro-kernel (brgemm), a cache-sized panel at a time,
  from the same tiled weights, in panels shaped for the CPU (AMX or not): about bf16's time on a
  512-token prompt (prompt processing is compute-bound, so int8 can at best match bf16 there;
  docs/int8.md has the numbers per host). From 6 rows it is also faster than the GEMV.
Linears that read one input (q/k/v, gate/up) run as one stacked Int8Linear
(`stack_shared_inputs`, applied by launch.quantize.load_int8).
Elsewhere prompts widen blocks of weights in PyTorch (`_widened_matmul`): to bf16 where oneDNN
has bf16 arithmetic (1.1-1.3x bf16's time), to fp32 where it has none (AVX2: there bf16 GEMMs
run ~7x slower than fp32 ones, and so int8 prompts run several times faster than bf16's).
Without g++, or on a CPU with neither AVX-512 nor AVX2, decode falls back to
`_weight_int8pack_mm`, with a logged warning.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from launch.int8_kernels import PANEL_AUTO, TILE_N, kernels, packed_mm_runs

# Up to this many rows the GEMV kernel is used; from 6 rows the packed GEMM is faster on the 7B
# shapes (at 6 rows 27392x4096: 11.2 vs 8.7 ms, 4096x13696: 4.8 vs 4.4 ms; at 5 rows the GEMV
# 7.1 vs 8.2 and 3.0 vs 4.1 ms).
DECODE_MAX_ROWS = 5
# Output channels widened at once by the PyTorch prefill path (16 MiB of bf16 at K=4096, 32 of fp32).
FALLBACK_BLOCK = 2048
# `_weight_int8pack_mm` (the fallback decode kernel) crashes the process (SIGSEGV, torch 2.13)
# for some inner sizes that are not multiples of 16, e.g. 24 or 136, and for weights not
# 64-byte aligned (safetensors packs tensors back to back, so a loaded int8 tensor can start
# at any byte).
_INT8PACK_K_MULTIPLE = 16
_ALIGN = 64


class Int8Linear(nn.Module):
    """A linear layer with symmetric per-output-channel int8 weights and bf16 activations."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16, tile: bool = True):
        super().__init__()
        _check(weight, scale)
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        # Buffers, not parameters: nothing here is trained, and buffers are not tied or
        # re-initialised by transformers. The scale stays float32 (as INC computed it): the
        # kernels apply it in fp32 to the fp32 accumulator.
        self.register_buffer("weight", _aligned(weight), persistent=False)
        self.register_buffer("scale", _aligned(scale.reshape(-1).to(torch.float32)), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.to(dtype).contiguous(), persistent=False)
        self._int8pack = self.in_features % _INT8PACK_K_MULTIPLE == 0
        # Built (or loaded from the cache) here, at model load, not in the first request.
        self._compiled = dtype == torch.bfloat16 and kernels() is not None
        self._packed = self._compiled and packed_mm_runs()
        # The compiled kernels read the weights in the tiled layout (docs/int8.md, session 9), here
        # a tiled copy; `tile=False` keeps them row-major: for a tied lm_head that shares the
        # embedding's table, or for a caller that hands the tensor over to `tile_()`.
        self.tiled = False
        if tile and self._compiled:
            self.weight, self.tiled = kernels().int8_tile(self.weight, False, False), True

    def tile_(self) -> Int8Linear:
        """Rearrange the weight into the tiled layout in place (no copy: for a loader that owns
        the tensor); a no-op without the compiled kernels or when tiled already."""
        if self._compiled and not self.tiled:
            kernels().int8_tile(self.weight, False, True)
            self.tiled = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        kernel = self.kernel(x2.shape[0])
        if kernel == "gemv":  # the compiled kernels apply scale and bias themselves
            y = kernels().int8_gemv(x2, self.weight, self.scale, self.bias, self.tiled)
        elif kernel == "packed":
            y = kernels().int8_packed_mm(x2, self.weight, self.scale, self.bias, self.tiled, PANEL_AUTO)
        elif kernel == "int8pack":
            y = torch._weight_int8pack_mm(x2.contiguous(), self.dense_weight(), self.scale.to(self.dtype))
            if self.bias is not None:
                y = y + self.bias
        else:
            y = self._widened_matmul(x2)
        return y.reshape(*lead, self.out_features)

    def kernel(self, rows: int) -> str:
        """What multiplies `rows` tokens: "gemv" or "packed" (compiled), or the PyTorch fallbacks
        "int8pack" (`_weight_int8pack_mm`) or "widened" (`_widened_matmul`)."""
        decode = 0 < rows <= DECODE_MAX_ROWS
        if decode and self._compiled:
            return "gemv"
        # oneDNN's micro-kernel refuses to run while torch.backends.mkldnn is switched off.
        if not decode and rows > 0 and self._packed and torch.backends.mkldnn.enabled:
            return "packed"
        return "int8pack" if decode and self._int8pack else "widened"

    def dense_weight(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Output channels start..stop of the int8 weight as a row-major [stop - start, in] tensor
        (a copy when the weight is tiled; `start` a multiple of TILE_N then)."""
        stop = self.out_features if stop is None else stop
        if not self.tiled:
            return self.weight[start:stop]
        if start % TILE_N:
            raise ValueError(f"a tiled weight's rows start at a multiple of {TILE_N}, not {start}")
        # The channels from a tile boundary on are a tiled [stop - start, in] weight themselves.
        rows = self.weight.view(-1)[start * self.in_features : stop * self.in_features]
        return kernels().int8_tile(rows.view(stop - start, self.in_features), True, False)

    def _widened_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        # int8 -> bf16 or fp32 is exact (|q| <= 127 fits bf16's 8-bit significand), so the scale
        # is applied once to the output instead of rounding every weight.
        dtype = x2.dtype if bf16_gemm_is_native() else torch.float32
        xw = x2.to(dtype)
        blocks = [
            F.linear(xw, self.dense_weight(i, min(i + FALLBACK_BLOCK, self.out_features)).to(dtype))
            for i in range(0, self.out_features, FALLBACK_BLOCK)
        ]
        y = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
        y.mul_(self.scale.to(dtype))  # in place, in one dtype: bf16 * fp32 would be 2x slower
        if self.bias is not None:
            y.add_(self.bias.to(dtype))
        return y.to(x2.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
                + (", tiled" if self.tiled else ""))


class Int8LinearPart(nn.Module):
    """One of several linears that read the same input (attention's q/k/v, an MLP's gate/up),
    all run as one Int8Linear over their stacked weights (`stack_shared_inputs`).

    Fewer, larger GEMVs stream the same weights faster: Qwen-7B's int8 decode step took 313
    instead of 327 ms with its q/k/v and gate/up stacked (docs/int8.md, session 7); each output
    row is summed exactly as before. The first part to see an input computes every part's
    output and keeps it until each part has taken its columns; a part called with another
    input (or again) computes the whole stack anew, so the result never depends on the order
    of the calls, only on the input not being changed in place between them (the models do not)."""

    def __init__(self, stack: Int8Linear, start: int, stop: int, shared: _SharedOutput):
        super().__init__()
        self.stack, self.start, self.stop, self._shared = stack, start, stop, shared
        self.in_features, self.out_features = stack.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shared.take(x, self.stack)[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.stop} of {self.stack.out_features}"


class _SharedOutput(threading.local):
    """The stack's last output, for the parts that have not taken it yet (not a module: the
    parts share it without registering it twice). One per thread: a worker with concurrency
    above 1 runs requests through the same layers in several threads at once."""

    def __init__(self, parts: int):
        self.parts, self.input, self.output, self.left = parts, None, None, 0

    def take(self, x: torch.Tensor, stack: Int8Linear) -> torch.Tensor:
        # Identity, not equality: the parts of one layer are called with the same tensor object.
        if x is not self.input or self.left == 0:
            self.input, self.output, self.left = x, stack(x), self.parts
        y = self.output
        self.left -= 1
        if self.left == 0:  # every part has its columns: keep no activations alive
            self.input = self.output = None
        return y


# Sibling linears that the models call with one input, in the order their outputs are stacked.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def stack_shared_inputs(model: nn.Module) -> int:
    """Replace every group of SHARED_INPUT_GROUPS whose members are Int8Linear layers of one
    input size (with biases on all or none) by Int8LinearParts of one stacked Int8Linear.
    Returns the number of groups stacked."""
    stacked = 0
    # Only the parents are listed: a list of every module would keep each replaced layer
    # alive until the end, all the stacked weights twice in memory at once.
    parents = [m for m in model.modules() if any(hasattr(m, names[0]) for names in SHARED_INPUT_GROUPS)]
    for parent in parents:
        for names in SHARED_INPUT_GROUPS:
            layers = [getattr(parent, n, None) for n in names]
            if not all(type(m) is Int8Linear for m in layers):
                continue
            if len({(m.in_features, m.dtype, m.bias is None) for m in layers}) != 1:
                continue
            stack = Int8Linear(torch.cat([m.dense_weight() for m in layers]), torch.cat([m.scale for m in layers]),
                               None if layers[0].bias is None else torch.cat([m.bias for m in layers]), layers[0].dtype,
                               tile=any(m.tiled for m in layers))
            shared, start = _SharedOutput(len(layers)), 0
            for name, m in zip(names, layers):
                setattr(parent, name, Int8LinearPart(stack, start, start + m.out_features, shared))
                start += m.out_features
            stacked += 1
    return stacked


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one scale per row (per token id).

    A tied lm_head is an Int8Linear over the same tensors, so a tied model keeps one copy."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        _check(weight, scale)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype
        self.register_buffer("weight", _aligned(weight), persistent=False)
        self.register_buffer("scale", _aligned(scale.reshape(-1).to(torch.float32)), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight[ids].to(torch.float32) * self.scale[ids].unsqueeze(-1)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


@functools.cache
def bf16_gemm_is_native() -> bool:
    """Whether oneDNN multiplies bf16 here with bf16 instructions (AVX-512 and AMX CPUs). Without
    them (AVX2) torch's bf16 GEMM is several times slower than its fp32 GEMM: 512 x 4096 x 11008
    took 3.6 s in bf16 and 0.5 s in fp32 on AMD Zen 3 (docs/int8.md, session 11)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # A fresh allocation is aligned; the copy is made once per tensor, at load time.
    return t.contiguous() if t.is_contiguous() and t.data_ptr() % _ALIGN == 0 else t.contiguous().clone()


def _check(weight: torch.Tensor, scale: torch.Tensor) -> None:
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"int8 weight must be a 2-D torch.int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
    if scale.numel() != weight.shape[0]:
        raise ValueError(f"need one scale per output channel: {weight.shape[0]} rows but {scale.numel()} scales")
