"""Int8 weight-only linear and embedding layers that run fast on this CPU.

    Int8Linear(weight_int8, scale, bias=None)    # y = (x @ weight_int8.T) * scale + bias
    Int8Embedding(weight_int8, scale)            # rows of weight_int8 * scale

The int8 weights and per-output-channel scales come from Intel Neural Compressor's RTN
(launch/quantize.py); this module only executes them. Activations stay bfloat16: dynamic
activation quantization (fbgemm) decodes a little faster but loses too much accuracy on
real weights (docs/int8.md has the numbers), so only the weights are int8.

Two kernels, picked per call by the number of rows (tokens) in the input:
- decode (1..8 rows): a small AVX-512 GEMV written here (`_GEMV_SOURCE`), compiled once with
  g++ through torch.utils.cpp_extension and cached in torch's extension directory. It streams
  the int8 weights once, widens them to fp32 in registers and accumulates in fp32 with the
  per-channel scale and the bias applied in the same pass. Why a hand-written kernel: on
  ChatGLM3-6B / Qwen-7B shapes it is 1.1-1.45x faster per linear than
  `aten._weight_int8pack_mm` (1.12-1.15x on the whole model), which runs at ~12.5 GB/s per core
  here, and with 2 threads it streams the weights at ~85-90% of the measured read bandwidth;
  torch.compile's weight-only pattern was 20x slower, fbgemm needs activation quantization
  (docs/int8.md, "The kernel decision"). Without g++ or AVX-512 it falls back to
  `_weight_int8pack_mm` with a logged warning;
- prefill (more rows): the int8 weights are widened to bf16 a block of output channels at
  a time into one reused buffer and multiplied with oneDNN's bf16 GEMM, the scale and bias
  applied while the result is stored (in the same extension; ~1.05x the bf16 time, where the
  pure-PyTorch fallback of the same idea is 1.1-1.3x), because a GEMV kernel gets 3-4x slower
  than bf16 at hundreds of rows. Blocks keep the temporary small (a 151936-row lm_head would
  otherwise need a 1.2 GB bf16 copy per call).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from launch import native

log = logging.getLogger(__name__)

# Up to this many rows the GEMV kernel is used (at 8 rows it is about as fast as bf16, the
# widened GEMM ~1.5x slower; from 16 rows the widened GEMM wins).
DECODE_MAX_ROWS = 8
# Output channels widened to bf16 at once on the prefill path: the compiled path widens 24 MiB
# of bf16 at a time into one reused buffer (3072 rows at K=4096). Interleaved A/B, 512 rows, the
# 7B shapes: 24 MiB 1.09-1.15x bf16's time, 16 MiB 1.15-1.17x, 8 MiB 1.15-1.21x; 32 MiB as good on
# some shapes but 1.30x on 4096x4096 (the whole matrix in one block). The pure-PyTorch fallback
# widens 2048 rows (16 MiB at K=4096).
PREFILL_BLOCK_BYTES = 24 << 20
PREFILL_BLOCK = 2048
# `_weight_int8pack_mm` (the fallback decode kernel) crashes the process (SIGSEGV, torch 2.13)
# for some inner sizes that are not multiples of 16, e.g. 24 or 136, and for weights not
# 64-byte aligned (safetensors packs tensors back to back, so a loaded int8 tensor can start
# at any byte).
_INT8PACK_K_MULTIPLE = 16
_ALIGN = 64
# Set to 0 to use `_weight_int8pack_mm` instead of the compiled kernel (for comparisons).
KERNEL_ENV = "LLMD_INT8_GEMV"


class Int8Linear(nn.Module):
    """A linear layer with symmetric per-output-channel int8 weights and bf16 activations."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16):
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
        self._gemv = dtype == torch.bfloat16 and gemv_kernel() is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        rows = x2.shape[0]
        if rows and self._gemv:  # the compiled kernels apply scale and bias themselves
            if rows <= DECODE_MAX_ROWS:
                y = gemv_kernel().int8_gemv(x2, self.weight, self.scale, self.bias)
            else:
                block = max(64, PREFILL_BLOCK_BYTES // (2 * self.in_features))
                y = gemv_kernel().int8_widened_mm(x2, self.weight, self.scale, self.bias, block)
            return y.reshape(*lead, self.out_features)
        if 0 < rows <= DECODE_MAX_ROWS and self._int8pack:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale.to(self.dtype))
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
        return y.mul_(self.scale.to(y.dtype))  # bf16 * bf16 in place: fp32 * bf16 would be 2x slower

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


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


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # A fresh allocation is aligned; the copy is made once per tensor, at load time.
    return t.contiguous() if t.is_contiguous() and t.data_ptr() % _ALIGN == 0 else t.contiguous().clone()


def _check(weight: torch.Tensor, scale: torch.Tensor) -> None:
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"int8 weight must be a 2-D torch.int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
    if scale.numel() != weight.shape[0]:
        raise ValueError(f"need one scale per output channel: {weight.shape[0]} rows but {scale.numel()} scales")


# --- the decode kernel -----------------------------------------------------------------------

_GEMV_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <atomic>

// y[m, n] = (sum_k x[m, k] * w[n, k]) * scale[n] + bias[n] for M <= 8 rows of x.
// x bf16 [M, K] (any strides), w int8 [N, K] row-major, scale fp32 [N], bias bf16 [N] or none;
// y bf16 [M, N]. The activations are widened to fp32 once (exact); the weights 16 at a time
// int8 -> int32 -> fp32 in registers (exact); products are accumulated with fp32 FMAs. A block
// of R output rows shares every activation load and gives R * M independent accumulators.
// Decode is memory-bound, so the point is to read each weight byte once, with few
// instructions per byte; K need not be a multiple of 16 (masked tail), nothing needs alignment.

static inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline __m512 widen16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

template <int M, int R>
static void rows_block(const float* x, int64_t K, const int8_t* w, int64_t n0, int64_t nr,
                       const float* scale, const at::BFloat16* bias, at::BFloat16* y, int64_t N) {
  // nr <= R rows from n0; a missing row reads the last real row again and is not stored.
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n0 + (r < nr ? r : nr - 1)) * K;
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = widen16(wr[r] + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = widen16(wr[r] + k, mask);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int r = 0; r < nr; ++r) {
    const int64_t n = n0 + r;
    const float s = scale[n];
    const float b = bias ? static_cast<float>(bias[n]) : 0.f;
    for (int m = 0; m < M; ++m) y[m * N + n] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(acc[m][r]) * s + b);
  }
}

template <int M, int R>
static void run(const float* x, int64_t K, const int8_t* w, int64_t N, const float* scale,
                const at::BFloat16* bias, at::BFloat16* y) {
  // Threads take chunks of weights from a shared counter instead of a fixed half each: on a
  // shared machine one thread is often preempted for a few ms, and with a static split every
  // other thread would wait for its half; here the others take over its chunks. A chunk is
  // 1/8 of a thread's share, 32 KiB to 2 MiB: when the host's bandwidth allows ~58 GB/s, 32 KiB
  // chunks streamed 29 GB/s and 256 KiB-2 MiB ones 32-33 (the same at ~34 GB/s).
  const int64_t blocks = (N + R - 1) / R;
  const int64_t share = N * K / std::max<int64_t>(1, 8 * at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(2 << 20, std::max<int64_t>(32 << 10, share)) / (R * K));
  const int64_t chunks = (blocks + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      for (int64_t b = c * chunk; b < std::min(blocks, (c + 1) * chunk); ++b) {
        const int64_t n0 = b * R;
        rows_block<M, R>(x, K, w, n0, std::min<int64_t>(R, N - n0), scale, bias, y, N);
      }
    }
  });
}

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_gemv: x [M, K] and w [N, K]");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "int8_gemv: w must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == w.size(0),
              "int8_gemv: scale must be contiguous float32 [N]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "int8_gemv: 1..8 rows");
  const auto xf = x.to(at::kFloat).contiguous();
  auto y = torch::empty({M, N}, x.options().dtype(at::kBFloat16));
  const at::BFloat16* bp = nullptr;
  torch::Tensor bb;
  if (bias.has_value() && bias->defined()) {
    bb = bias->to(at::kBFloat16).contiguous();
    TORCH_CHECK(bb.numel() == N, "int8_gemv: bias must have N elements");
    bp = bb.data_ptr<at::BFloat16>();
  }
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  // R * M accumulators + R widened weights stay within the 32 zmm registers.
  switch (M) {
    case 1: run<1, 8>(xp, K, wp, N, sp, bp, yp); break;
    case 2: run<2, 8>(xp, K, wp, N, sp, bp, yp); break;
    case 3: run<3, 4>(xp, K, wp, N, sp, bp, yp); break;
    case 4: run<4, 4>(xp, K, wp, N, sp, bp, yp); break;
    case 5: run<5, 4>(xp, K, wp, N, sp, bp, yp); break;
    case 6: run<6, 2>(xp, K, wp, N, sp, bp, yp); break;
    case 7: run<7, 2>(xp, K, wp, N, sp, bp, yp); break;
    default: run<8, 2>(xp, K, wp, N, sp, bp, yp); break;
  }
  return y;
}

// Prefill (many rows): y = (x @ bf16(w).T) * scale + bias, with w widened to bf16 `block` output
// channels at a time into one reused buffer, oneDNN's bf16 GEMM (at::mm) per block, and scale
// and bias applied while the block's result is copied into y. int8 -> bf16 is exact (|q| <= 127
// needs 7 significand bits), so the only rounding beyond bf16's own GEMM is the scale multiply.
static inline __m512 bf16x16_to_fp32(const at::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline __m256i fp32x16_to_bf16(__m512 v) {  // round to nearest even, as c10::BFloat16 (finite values)
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_cvtepi32_epi16(r);
}

static void widen_to_bf16(const int8_t* w, int64_t count, at::BFloat16* out) {
  at::parallel_for(0, (count + 15) / 16, 4096, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i = c * 16;
      const __mmask16 mask = i + 16 <= count ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - i)) - 1);
      const __m512 f = widen16(w + i, mask);
      // The fp32 of a small integer has 16 zero low bits, so truncating to bf16 is exact.
      const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16));
      _mm256_mask_storeu_epi16(out + i, mask, h);
    }
  });
}

torch::Tensor int8_widened_mm(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                              int64_t block) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_widened_mm: x [M, K] and w [N, K]");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "int8_widened_mm: w must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == w.size(0),
              "int8_widened_mm: scale must be contiguous float32 [N]");
  TORCH_CHECK(block > 0, "int8_widened_mm: block > 0");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const auto xb = x.to(at::kBFloat16).contiguous();
  auto y = torch::empty({M, N}, x.options().dtype(at::kBFloat16));
  const at::BFloat16* bp = nullptr;
  torch::Tensor bb;
  if (bias.has_value() && bias->defined()) {
    bb = bias->to(at::kBFloat16).contiguous();
    TORCH_CHECK(bb.numel() == N, "int8_widened_mm: bias must have N elements");
    bp = bb.data_ptr<at::BFloat16>();
  }
  const int64_t rows = std::min(block, N);
  auto buf = torch::empty({rows, K}, x.options().dtype(at::kBFloat16));
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nb = std::min(rows, N - n0);
    widen_to_bf16(wp + n0 * K, nb * K, buf.data_ptr<at::BFloat16>());
    const auto t = at::mm(xb, buf.narrow(0, 0, nb).t()).contiguous();  // [M, nb]
    const at::BFloat16* tp = t.data_ptr<at::BFloat16>();
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t j = 0; j < nb; j += 16) {
          const __mmask16 mask = j + 16 <= nb ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - j)) - 1);
          const __m512 v = _mm512_fmadd_ps(bf16x16_to_fp32(tp + m * nb + j, mask), _mm512_maskz_loadu_ps(mask, sp + n0 + j),
                                           bp ? bf16x16_to_fp32(bp + n0 + j, mask) : _mm512_setzero_ps());
          _mm256_mask_storeu_epi16(yp + m * N + n0 + j, mask, fp32x16_to_bf16(v));
        }
    });
  }
  return y;
}
"""


@functools.cache
def gemv_kernel():
    """The compiled kernels (an extension module with `int8_gemv` and `int8_widened_mm`), or None
    when they cannot be built or run here; then Int8Linear uses `_weight_int8pack_mm` and the
    Python widened GEMM (built by launch/native.py)."""
    return native.load("llmd_int8_gemv", _GEMV_SOURCE, ["int8_gemv", "int8_widened_mm"],
                       fallback="_weight_int8pack_mm", env=KERNEL_ENV, logger=log)
