"""The C++ kernels behind launch.int8_linear.Int8Linear: one small extension per instruction set.

    kernels()          # this CPU's extension (int8_gemv, int8_tile[, int8_packed_mm, int8_gemv_vnni]), or None
    build("avx2")      # one instruction set's extension (the tests run AVX2's on AVX-512 CPUs too)
    packed_mm_runs()   # whether the prompt kernel (int8_packed_mm) runs on this CPU

Built once with g++ through torch.utils.cpp_extension and cached in torch's extension directory
(launch/native.py), from a part both instruction sets share (`_LAYOUT`: the tiled weight layout,
the operand checks, the threads' work sharing and the `int8_gemv` entry) and one of:
- `_AVX512` (AMD Zen 4, Intel Xeon): the decode GEMV 16 lanes wide (one token in integer
  arithmetic on Intel CPUs with AVX512-VNNI, `int8_gemv_vnni()`), and the prompt kernel, a GEMM
  that widens the weights while packing them for oneDNN's bf16 micro-kernel (brgemm), which needs
  AVX512-BF16 or AMX (`packed_mm_runs`);
- `_AVX2` (AMD Zen 2/3, Intel before AVX-512): the decode GEMV 8 lanes wide. These CPUs have no
  bf16 arithmetic, so prompts take Int8Linear's PyTorch path, which computes them in fp32.
Decode is memory-bound: each kernel's point is to read every weight byte once, with few
instructions per byte (docs/int8.md has the measurements of each decision).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from launch import native

log = logging.getLogger(__name__)

# Output channels of a tile in the tiled layout (`TILE_N` in the kernel source).
TILE_N = 64
# The prompt kernel's panel shapes (`Panel` in the kernel source): AUTO picks by CPU and input size.
PANEL_AUTO, PANEL_SHAPES = 0, {1: (64, 2048), 2: (128, 2048), 3: (256, 512)}
# Set to 0 to use the fallbacks instead of the compiled kernels (for comparisons).
KERNEL_ENV = "LLMD_INT8_KERNELS"
# One decoded token in integers with AVX512-VNNI (default: on Intel CPUs that have it, off on
# AMD's, where the fp32 GEMV is faster): 1 turns it on where the CPU has VNNI, 0 off (for comparisons).
VNNI_ENV = "LLMD_INT8_VNNI"


@functools.cache
def kernels():
    """This CPU's compiled kernels, or None when they cannot be built here (launch/native.py
    says why in a warning)."""
    k = build(native.cpu_isa() or "avx2")
    choice = os.environ.get(VNNI_ENV)
    if k is not None and hasattr(k, "int8_gemv_vnni") and choice in ("0", "1"):
        try:
            k.int8_gemv_vnni(choice == "1")
        except RuntimeError as e:  # 1 on a CPU without AVX512-VNNI
            log.warning("%s=1 ignored: %s", VNNI_ENV, e)
    return k


def build(isa: str):
    """The kernels written for `isa`: "avx512" (int8_gemv, int8_tile, int8_packed_mm) or "avx2"
    (int8_gemv, int8_tile), built or loaded from the cache; None when this CPU cannot run them."""
    if isa == "avx2":
        return native.load("llmd_int8_avx2", _LAYOUT + _AVX2, ["int8_gemv", "int8_tile", *_SHARED], isa="avx2",
                           fallback="_weight_int8pack_mm", env=KERNEL_ENV, logger=log)
    return native.load("llmd_int8", _LAYOUT + _AVX512, ["int8_gemv", "int8_packed_mm", "int8_tile", "int8_gemv_vnni", *_SHARED],
                       fallback="_weight_int8pack_mm and a widened bf16 GEMM", env=KERNEL_ENV, logger=log)


@functools.cache
def packed_mm_runs() -> bool:
    """Whether the prompt kernel runs here: it is built for AVX-512 only, and oneDNN's bf16
    micro-kernel needs AVX512-BF16 or AMX, which not every AVX-512 CPU has (then torch raises;
    prompts take the PyTorch path)."""
    if not hasattr(kernels(), "int8_packed_mm"):
        return False
    try:
        kernels().int8_packed_mm(torch.ones(2, 2, dtype=torch.bfloat16), torch.ones(1, 2, dtype=torch.int8),
                                 torch.ones(1), None, False, PANEL_AUTO)
        return True
    except RuntimeError as e:
        log.warning("llmd_int8: the prompt kernel cannot run on this CPU (%s); prompts use a widened bf16 "
                    "GEMM, ~1.1-1.3x slower", str(e).strip().splitlines()[0])
        return False


# --- what both instruction sets share --------------------------------------------------------

_SHARED = ["int8_prefetch_bytes"]  # how far ahead the GEMVs prefetch here (for tests and benchmarks)

_LAYOUT = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <cpuid.h>
#include <immintrin.h>
#include <atomic>

// --- the tiled layout --------------------------------------------------------------------
// A tiled weight holds the same N x K bytes as tiles of TILE_N output channels x TILE_K inputs
// (the last ones smaller), the tiles of channels n0.. n0+TILE_N-1 one after another over K, each
// tile row-major: tile (n0, k0) starts at n0 * K + k0 * rows(n0) and its rows are cols(k0) bytes
// apart. A block of channels is still one sequential stream; what changes is that the GEMV works
// on 256 inputs at a time, which AVX-512 keeps in 16 registers while it streams 64 channels' tiles.
// 65536x4096, 2 threads, 300 rounds alternated with amax (docs/int8.md, session 9): the row-major
// kernel streamed 0.72 / 0.68 of amax when amax read 40-50 / 50+ GB/s, this one 0.89 / 0.84
// (0.90 both below 40 GB/s), with the prefetch 8 KiB ahead.
constexpr int64_t TILE_N = 64, TILE_K = 256;

// How far ahead in the tiled stream the GEMVs prefetch into L2, by the CPU's maker. AMD: 8 KiB
// (Zen 4, session 9: 4 KiB made 0.75 / 0.71 of amax; Zen 3, session 11: the best of 0-16 KiB).
// Intel: 4 KiB (Xeon with AMX, session 12, ChatGLM3-6B int8 decoding, alternated in one process:
// 77 / 73% of the bound where 8 KiB made 75 / 70%; 2 and 6 KiB 71 / 73%, 16 and 32 KiB 74%;
// Qwen-7B level at 4 and 8 KiB).
static bool cpu_is_intel() {
  unsigned a, b, c, d;
  return __get_cpuid(0, &a, &b, &c, &d) && b == 0x756e6547 && d == 0x49656e69 && c == 0x6c65746e;  // "GenuineIntel"
}
static const int64_t TILED_PREFETCH_BYTES = cpu_is_intel() ? 4096 : 8192;
int64_t int8_prefetch_bytes() { return TILED_PREFETCH_BYTES; }

static inline int64_t tile_rows(int64_t N, int64_t n0) { return std::min(TILE_N, N - n0); }
static inline int64_t tile_cols(int64_t K, int64_t k0) { return std::min(TILE_K, K - k0); }
static inline const int8_t* tiled_at(const int8_t* w, int64_t N, int64_t K, int64_t n, int64_t k) {
  const int64_t n0 = n - n % TILE_N, k0 = k - k % TILE_K;
  return w + n0 * K + k0 * tile_rows(N, n0) + (n - n0) * tile_cols(K, k0) + (k - k0);
}

// w [N, K] row-major -> tiled (or back, `untile`), into a new tensor or `in_place`. A block of
// TILE_N channels holds the same bytes in both layouts, so in place needs one block of scratch
// (a copy of a whole 7B model's weights would raise the worker's peak memory by the largest
// layers and leave freed pages behind in the heap: +0.87 GB VmHWM and RSS for ChatGLM3-6B).
torch::Tensor int8_tile(torch::Tensor w, bool untile, bool in_place) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "int8_tile: contiguous int8 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  auto out = in_place ? w : torch::empty_like(w);
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, (N + TILE_N - 1) / TILE_N, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int8_t> scratch(in_place ? TILE_N * K : 0);
    for (int64_t n0 = b0 * TILE_N; n0 < std::min(N, b1 * TILE_N); n0 += TILE_N) {
      const int64_t nr = tile_rows(N, n0);
      const int8_t* from = src + n0 * K;
      if (in_place) from = static_cast<const int8_t*>(memcpy(scratch.data(), from, nr * K));
      int8_t* to = dst + n0 * K;
      for (int64_t k0 = 0; k0 < K; k0 += TILE_K)
        for (int64_t r = 0, kw = tile_cols(K, k0); r < nr; ++r) {
          const int64_t row_major = r * K + k0, tiled = k0 * nr + r * kw;  // within the block
          memcpy(to + (untile ? row_major : tiled), from + (untile ? tiled : row_major), kw);
        }
    }
  });
  return out;
}


// Calls block(n0) for n0 = 0, rows, 2 * rows, ... < N, on every thread. Threads take chunks of
// blocks from a shared counter instead of a fixed half each: on a shared machine one thread is
// often preempted for a few ms, and with a static split every other thread would wait for its
// half; here the others take over its chunks. A chunk is 1/8 of a thread's share of the N x K
// weights, 32 KiB to 2 MiB: when the host's bandwidth allows ~58 GB/s, 32 KiB chunks streamed
// 29 GB/s and 256 KiB-2 MiB ones 32-33 (the same at ~34 GB/s).
template <typename Block>
static void for_channel_blocks(int64_t N, int64_t K, int64_t rows, const Block& block) {
  const int64_t blocks = (N + rows - 1) / rows;
  const int64_t share = N * K / std::max<int64_t>(1, 8 * at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(2 << 20, std::max<int64_t>(32 << 10, share)) / (rows * K));
  const int64_t chunks = (blocks + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;)
      for (int64_t b = c * chunk; b < std::min(blocks, (c + 1) * chunk); ++b) block(b * rows);
  });
}

// What both kernels take: x [M, K] (any dtype and strides), w int8 [N, K] contiguous, scale
// float32 [N] contiguous, bias [N] or none (returned as contiguous bf16, or undefined).
static void check_operands(const char* name, const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), name, ": x [M, K] and w [N, K]");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), name, ": w must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == w.size(0),
              name, ": scale must be contiguous float32 [N]");
}
static torch::Tensor bias_bf16(const char* name, const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return torch::Tensor();
  auto bb = bias->to(at::kBFloat16).contiguous();
  TORCH_CHECK(bb.numel() == N, name, ": bias must have N elements");
  return bb;
}

// y[m, n] = (sum_k x[m, k] * w[n, k]) * scale[n] + bias[n] for M <= 5 rows of x.
// x bf16 [M, K] (any strides), w int8 [N, K] tiled or row-major, scale fp32 [N], bias bf16 [N]
// or none; y bf16 [M, N]. The activations are widened to fp32 once (exact); the weights a
// vector at a time int8 -> int32 -> fp32 in registers (exact); products are accumulated with
// fp32 FMAs and rounded to bf16 once, with scale and bias applied. K need not be a multiple of
// the vector width, nothing needs alignment. `gemv` is each instruction set's.
static void gemv(int64_t M, const float* x, int64_t K, const int8_t* w, int64_t N, const float* scale,
                 const at::BFloat16* bias, at::BFloat16* y, bool tiled);

// x [M, K] as contiguous float32 rows. bf16, what the models pass, is widened here into a buffer
// kept per calling thread: x.to(kFloat) took ~18 us a call through torch's dispatcher (1 x 4096,
// Intel Xeon, session 14), 2.6% of a 4096x4096 GEMV. Another dtype is converted by torch into
// `other`, which keeps it alive.
static const float* float_rows(const torch::Tensor& x, torch::Tensor& other) {
  if (x.scalar_type() != at::kBFloat16) {
    other = x.to(at::kFloat).contiguous();
    return other.data_ptr<float>();
  }
  const int64_t M = x.size(0), K = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  static thread_local std::vector<float> rows;
  if (rows.size() < (size_t)(M * K)) rows.resize(M * K);
  const at::BFloat16* p = x.data_ptr<at::BFloat16>();
  float* out = rows.data();
  for (int64_t m = 0; m < M; ++m) {
    if (s1 == 1)
      for (int64_t k = 0; k < K; ++k) out[m * K + k] = static_cast<float>(p[m * s0 + k]);
    else
      for (int64_t k = 0; k < K; ++k) out[m * K + k] = static_cast<float>(p[m * s0 + k * s1]);
  }
  return out;
}

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias, bool tiled) {
  check_operands("int8_gemv", x, w, scale);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 5, "int8_gemv: 1..5 rows");
  torch::Tensor other;
  const float* xf = float_rows(x, other);
  auto y = torch::empty({M, N}, x.options().dtype(at::kBFloat16));
  const torch::Tensor bb = bias_bf16("int8_gemv", bias, N);
  gemv(M, xf, K, w.data_ptr<int8_t>(), N, scale.data_ptr<float>(),
       bb.defined() ? bb.data_ptr<at::BFloat16>() : nullptr, y.data_ptr<at::BFloat16>(), tiled);
  return y;
}
"""

# --- AVX-512: the decode GEMV, and the prompt kernel -------------------------------------------

_AVX512 = r"""
// The GEMV, 16 weights at a time. A block of R output rows shares every activation load (row-
// major), or 256 activations stay in registers while a tile streams past (tiled); R * M * U
// independent accumulators keep the FMA units busy.
static inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline __m512 widen16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// Software prefetch into L2, this far ahead in each weight row (the caller says why): 4 KiB for
// one stream; 2 KiB for each of 8 interleaved rows (16384x13696 and x11008, 2 threads, 6 rounds
// alternating: +5-10% over none; 0.5-1 KiB less, 4-8 KiB no better).
constexpr int64_t PREFETCH_BYTES = 4096, PREFETCH_BYTES_PER_ROW = 2048;

template <int M, int R, int U>
static void rows_block(const float* x, int64_t K, const int8_t* w, int64_t n0, int64_t nr,
                       const float* scale, const at::BFloat16* bias, at::BFloat16* y, int64_t N) {
  // nr <= R rows from n0; a missing row reads the last real row again and is not stored. Each
  // step reads U * 16 consecutive weights of each row into U accumulators per row and input row.
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n0 + (r < nr ? r : nr - 1)) * K;
  __m512 acc[M][R][U];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[m][r][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    if (R == 1) {
      for (int line = 0; line < 16 * U; line += 64) _mm_prefetch((const char*)(wr[0] + k + line + PREFETCH_BYTES), _MM_HINT_T1);
    } else if ((k & 63) == 0) {  // once per cache line of each row
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(wr[r] + k + PREFETCH_BYTES_PER_ROW), _MM_HINT_T1);
    }
    for (int u = 0; u < U; ++u) {
      __m512 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = widen16(wr[r] + k + 16 * u);
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + k + 16 * u);
        for (int r = 0; r < R; ++r) acc[m][r][u] = _mm512_fmadd_ps(xv, wv[r], acc[m][r][u]);
      }
    }
  }
  for (; k < K; k += 16) {  // what is left: 16 at a time, the last ones masked
    const __mmask16 mask = k + 16 <= K ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = widen16(wr[r] + k, mask);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r][0] = _mm512_fmadd_ps(xv, wv[r], acc[m][r][0]);
    }
  }
  for (int r = 0; r < nr; ++r) {
    const int64_t n = n0 + r;
    const float s = scale[n];
    const float b = bias ? static_cast<float>(bias[n]) : 0.f;
    for (int m = 0; m < M; ++m) {
      __m512 sum = acc[m][r][0];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[m][r][u]);
      y[m * N + n] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(sum) * s + b);
    }
  }
}

template <int M, int R, int U = 1>
static void run(const float* x, int64_t K, const int8_t* w, int64_t N, const float* scale,
                const at::BFloat16* bias, at::BFloat16* y) {
  for_channel_blocks(N, K, R, [&](int64_t n0) { rows_block<M, R, U>(x, K, w, n0, std::min<int64_t>(R, N - n0), scale, bias, y, N); });
}

// One input row, one full tile: the 256 activations stay in xv's 16 registers, and four chains
// of FMAs per channel keep the FMA units busy.
static inline void tile_gemv_1(const __m512* xv, const int8_t* t, int64_t nr, __m512* part) {
  for (int64_t r = 0; r < nr; ++r) {
    const int8_t* p = t + r * TILE_K;
    for (int l = 0; l < TILE_K; l += 64) _mm_prefetch((const char*)(p + l + TILED_PREFETCH_BYTES), _MM_HINT_T1);
    __m512 a0 = _mm512_mul_ps(xv[0], widen16(p)), a1 = _mm512_mul_ps(xv[1], widen16(p + 16));
    __m512 a2 = _mm512_mul_ps(xv[2], widen16(p + 32)), a3 = _mm512_mul_ps(xv[3], widen16(p + 48));
    for (int j = 4; j < 16; j += 4) {
      a0 = _mm512_fmadd_ps(xv[j], widen16(p + 16 * j), a0);
      a1 = _mm512_fmadd_ps(xv[j + 1], widen16(p + 16 * j + 16), a1);
      a2 = _mm512_fmadd_ps(xv[j + 2], widen16(p + 16 * j + 32), a2);
      a3 = _mm512_fmadd_ps(xv[j + 3], widen16(p + 16 * j + 48), a3);
    }
    part[r] = _mm512_add_ps(part[r], _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

// M input rows (read from L1), any tile: a narrower last tile, or prompts of 2..5 tokens.
template <int M>
static inline void tile_gemv(const float* x, int64_t K, int64_t k0, const int8_t* t, int64_t nr, int64_t kw,
                             __m512 (*part)[TILE_N]) {
  for (int64_t r = 0; r < nr; ++r) {
    const int8_t* p = t + r * kw;
    for (int64_t l = 0; l < kw; l += 64) _mm_prefetch((const char*)(p + l + TILED_PREFETCH_BYTES), _MM_HINT_T1);
    __m512 a[M][2];
    for (int m = 0; m < M; ++m) a[m][0] = a[m][1] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= kw; j += 32) {
      const __m512 w0 = widen16(p + j), w1 = widen16(p + j + 16);
      for (int m = 0; m < M; ++m) {
        a[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k0 + j), w0, a[m][0]);
        a[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k0 + j + 16), w1, a[m][1]);
      }
    }
    for (; j < kw; j += 16) {
      const __mmask16 mask = j + 16 <= kw ? (__mmask16)0xFFFF : (__mmask16)((1u << (kw - j)) - 1);
      const __m512 w0 = widen16(p + j, mask);
      for (int m = 0; m < M; ++m) a[m][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + m * K + k0 + j), w0, a[m][0]);
    }
    for (int m = 0; m < M; ++m) part[m][r] = _mm512_add_ps(part[m][r], _mm512_add_ps(a[m][0], a[m][1]));
  }
}

template <int M>
static void tiled_block(const float* x, int64_t N, int64_t K, const int8_t* w, int64_t n0, const float* scale,
                        const at::BFloat16* bias, at::BFloat16* y) {
  const int64_t nr = tile_rows(N, n0);
  __m512 part[M][TILE_N];  // per channel and input row: 16 partial sums, added up at the end
  for (int m = 0; m < M; ++m)
    for (int64_t r = 0; r < nr; ++r) part[m][r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += TILE_K) {
    const int64_t kw = tile_cols(K, k0);
    const int8_t* t = w + n0 * K + k0 * nr;
    if (M == 1 && kw == TILE_K) {
      __m512 xv[TILE_K / 16];
      for (int j = 0; j < TILE_K / 16; ++j) xv[j] = _mm512_loadu_ps(x + k0 + 16 * j);
      tile_gemv_1(xv, t, nr, part[0]);
    } else {
      tile_gemv<M>(x, K, k0, t, nr, kw, part);
    }
  }
  for (int64_t r = 0; r < nr; ++r) {
    const float s = scale[n0 + r], b = bias ? static_cast<float>(bias[n0 + r]) : 0.f;
    for (int m = 0; m < M; ++m) y[m * N + n0 + r] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(part[m][r]) * s + b);
  }
}

template <int M>
static void run_tiled(const float* x, int64_t K, const int8_t* w, int64_t N, const float* scale,
                      const at::BFloat16* bias, at::BFloat16* y) {
  for_channel_blocks(N, K, TILE_N, [&](int64_t n0) { tiled_block<M>(x, N, K, w, n0, scale, bias, y); });
}

// --- One decoded token with AVX512-VNNI (Intel since Cascade Lake, AMD Zen 4) --------------
// The token's activations become integers: x = q * 2^e, q of ACT_BYTES * 8 bits, e chosen per
// token so that the largest |x| just fits. A bf16 activation has 8 significant bits, so every one
// within 2^15 of the largest is exact, and the rest are off by at most 2^-24 of the largest: less
// than the fp32 path's own rounding. q is split into bytes (the top one offset by 128, since
// vpdpbusd multiplies unsigned by signed bytes) and each byte plane is multiplied with the int8
// weights straight from memory, 64 at a time into 16 int32 sums, exactly. Per 64 weight bytes that
// is 1 load and 4 vpdpbusd (3 planes, and the weights' sum, which undoes the offset) where the
// fp32 path takes 4 loads, 4 widenings, 4 conversions and 4 FMAs: fewer instructions per cache
// line let more lines be in flight. With fewer instructions to hide behind, the stream is
// prefetched 8 KiB ahead on every CPU (Intel Xeon, session 13, ChatGLM3-6B int8 decoding: 78.0%
// of the bound where 4 KiB made 77.5%, and the fp32 path 75.6%).
constexpr int ACT_BYTES = 3;
constexpr int64_t VNNI_PREFETCH_BYTES = 8192;

static bool cpu_has_avx512_vnni() {
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((c >> 11) & 1);
}
// On by default on Intel CPUs only. AMD Zen 4 runs each 512-bit vpdpbusd as two 256-bit halves,
// and there the fp32 path decoded Qwen-7B int8 1.4x as fast (session 18, four pairs of fresh
// processes alternated: 5.2-5.6 vs 3.7-4.2 tok/s, 69-70% vs 52-56% of the bound at 50-60 GB/s);
// LLMD_INT8_VNNI=1 turns it on there.
static std::atomic<bool> gemv_vnni{cpu_has_avx512_vnni() && cpu_is_intel()};

// Whether one-row tiled GEMVs use VNNI; `enable` switches (for comparisons and tests).
bool int8_gemv_vnni(c10::optional<bool> enable) {
  if (enable.has_value()) {
    TORCH_CHECK(!*enable || cpu_has_avx512_vnni(), "int8_gemv_vnni: this CPU has no AVX512-VNNI");
    gemv_vnni = *enable;
  }
  return gemv_vnni;
}

// x [K] -> ACT_BYTES planes of `stride` bytes (zero past K) and the power of two x = q * scale;
// false (nothing written) when x holds inf or NaN, or nothing large enough for an exponent.
static bool split_activations(const float* x, int64_t K, int64_t stride, uint8_t* planes, double* scale) {
  __m512 m = _mm512_setzero_ps();
  __mmask16 special = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = k + 16 <= K ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(mask, x + k);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
    special |= _mm512_fpclass_ps_mask(v, 0x99);  // NaN (quiet, signalling) or +-inf
  }
  const float amax = _mm512_reduce_max_ps(m);
  if (special || !(amax >= 0x1p-100f)) return false;
  int e;
  std::frexp(amax, &e);  // amax < 2^e
  constexpr int bits = 8 * ACT_BYTES - 1;
  const __m512 to_q = _mm512_set1_ps(std::ldexp(1.f, bits - e));
  *scale = std::ldexp(1.0, e - bits);
  const __m512i lim = _mm512_set1_epi32((1 << bits) - 1), offset = _mm512_set1_epi32(128);
  for (int64_t k = 0; k < stride; k += 16) {
    const __mmask16 mask = k + 16 <= K ? (__mmask16)0xFFFF : k < K ? (__mmask16)((1u << (K - k)) - 1) : 0;
    __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + k), to_q));  // nearest even
    q = _mm512_max_epi32(_mm512_min_epi32(q, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));  // fp32 input
    for (int b = 0; b < ACT_BYTES; ++b) {
      __m512i byte = _mm512_srai_epi32(q, 8 * b);
      if (b == ACT_BYTES - 1) byte = _mm512_maskz_add_epi32(mask, byte, offset);  // zero past K
      _mm_storeu_si128((__m128i*)(planes + b * stride + k), _mm512_cvtepi32_epi8(byte));  // low bytes
    }
  }
  return true;
}

// One tile's rows, `chunks` runs of 64 inputs (the last one `last` masked): per row, each plane's
// and the weights' 16 int32 sums go on in acc[plane][row] and acc[ACT_BYTES][row].
template <int CHUNKS>
__attribute__((target("avx512vnni"))) static inline void tile_vnni(const __m512i (*xv)[4], const int8_t* t, int64_t nr,
                                                                   int64_t kw, int chunks, __mmask64 last,
                                                                   __m512i (*acc)[TILE_N]) {
  const __m512i ones = _mm512_set1_epi8(1);
  const int n = CHUNKS ? CHUNKS : chunks;
  for (int64_t r = 0; r < nr; ++r) {
    const int8_t* p = t + r * kw;
    for (int64_t l = 0; l < kw; l += 64) _mm_prefetch((const char*)(p + l + VNNI_PREFETCH_BYTES), _MM_HINT_T1);
    __m512i a[ACT_BYTES + 1];
    for (int b = 0; b <= ACT_BYTES; ++b) a[b] = acc[b][r];
    for (int c = 0; c < n; ++c) {
      const __m512i wv = CHUNKS || c + 1 < n ? _mm512_loadu_si512((const void*)(p + 64 * c))
                                             : _mm512_maskz_loadu_epi8(last, p + 64 * c);
      for (int b = 0; b < ACT_BYTES; ++b) a[b] = _mm512_dpbusd_epi32(a[b], xv[b][c], wv);
      a[ACT_BYTES] = _mm512_dpbusd_epi32(a[ACT_BYTES], ones, wv);
    }
    for (int b = 0; b <= ACT_BYTES; ++b) acc[b][r] = a[b];
  }
}

__attribute__((target("avx512vnni"))) static void vnni_block(const uint8_t* planes, int64_t stride, double xscale,
                                                             int64_t N, int64_t K, const int8_t* w, int64_t n0,
                                                             const float* scale, const at::BFloat16* bias, at::BFloat16* y) {
  static_assert(TILE_K == 4 * 64, "a tile is 4 runs of 64 inputs");
  const int64_t nr = tile_rows(N, n0);
  __m512i acc[ACT_BYTES + 1][TILE_N];
  for (int b = 0; b <= ACT_BYTES; ++b)
    for (int64_t r = 0; r < nr; ++r) acc[b][r] = _mm512_setzero_si512();
  for (int64_t k0 = 0; k0 < K; k0 += TILE_K) {
    const int64_t kw = tile_cols(K, k0);
    const int chunks = (int)((kw + 63) / 64);
    __m512i xv[ACT_BYTES][4];
    for (int b = 0; b < ACT_BYTES; ++b)
      for (int c = 0; c < chunks; ++c) xv[b][c] = _mm512_loadu_si512((const void*)(planes + b * stride + k0 + 64 * c));
    const int64_t tail = kw - 64 * (chunks - 1);
    const __mmask64 last = tail == 64 ? ~(__mmask64)0 : (((__mmask64)1 << tail) - 1);
    if (kw == TILE_K) tile_vnni<4>(xv, w + n0 * K + k0 * nr, nr, kw, 4, last, acc);
    else tile_vnni<0>(xv, w + n0 * K + k0 * nr, nr, kw, chunks, last, acc);
  }
  // Exact: each int32 lane sums at most 4 * K / 64 products of 255 * 128 (K < 2^20), the total
  // |q| * 127 * K < 2^51 fits int64 and double.
  for (int64_t r = 0; r < nr; ++r) {
    int64_t sum = -((int64_t)128 << (8 * (ACT_BYTES - 1))) * _mm512_reduce_add_epi32(acc[ACT_BYTES][r]);
    for (int b = 0; b < ACT_BYTES; ++b) sum += (int64_t)_mm512_reduce_add_epi32(acc[b][r]) << (8 * b);
    const double v = (double)sum * xscale * scale[n0 + r] + (bias ? static_cast<double>(bias[n0 + r]) : 0.0);
    y[n0 + r] = static_cast<at::BFloat16>(static_cast<float>(v));
  }
}

// True when it ran (else the caller takes the fp32 path).
static bool run_tiled_vnni(const float* x, int64_t K, const int8_t* w, int64_t N, const float* scale,
                           const at::BFloat16* bias, at::BFloat16* y) {
  if (!gemv_vnni || K >= (1 << 20)) return false;
  const int64_t stride = (K + 63) / 64 * 64;
  static thread_local std::vector<uint8_t> planes;  // every byte is written: no zeroing a call
  if (planes.size() < (size_t)(ACT_BYTES * stride)) planes.resize(ACT_BYTES * stride);
  double xscale;
  if (!split_activations(x, K, stride, planes.data(), &xscale)) return false;
  const uint8_t* p = planes.data();  // this thread's: in the workers `planes` names their own
  for_channel_blocks(N, K, TILE_N, [&](int64_t n0) { vnni_block(p, stride, xscale, N, K, w, n0, scale, bias, y); });
  return true;
}

static void gemv(int64_t M, const float* xp, int64_t K, const int8_t* wp, int64_t N, const float* sp,
                 const at::BFloat16* bp, at::BFloat16* yp, bool tiled) {
  if (tiled && M == 1 && run_tiled_vnni(xp, K, wp, N, sp, bp, yp)) return;
  // M * R * U accumulators + R widened weights stay within the 32 zmm registers. One input row
  // whose fp32 copy fits the 32 KiB L1 next to the streaming weights reads one weight row at a
  // time, 128 bytes a step: 2 threads streamed 31-34 GB/s that way, 27-30 with 8 rows of 16 bytes
  // a step (65536x4096, 12 interleaved rounds). A longer row would re-read x from L2 for every
  // weight row (8192x13696: 17-18 GB/s vs 32-38), so it keeps 8 rows sharing each load of x.
  // The one stream is prefetched into L2 4 KiB ahead: the loop's instructions per cache line
  // otherwise fill the core's reorder window before enough lines are in flight. 2 threads,
  // 65536x4096, 15 rounds alternating: 34-40 GB/s with it, 27-30 without (amax read 31-35 and
  // 47-49 GB/s in the same rounds); 2 or 8-16 KiB ahead, or into L1, gained less or lost.
  if (tiled) {
    switch (M) {
      case 1: run_tiled<1>(xp, K, wp, N, sp, bp, yp); break;
      case 2: run_tiled<2>(xp, K, wp, N, sp, bp, yp); break;
      case 3: run_tiled<3>(xp, K, wp, N, sp, bp, yp); break;
      case 4: run_tiled<4>(xp, K, wp, N, sp, bp, yp); break;
      default: run_tiled<5>(xp, K, wp, N, sp, bp, yp); break;
    }
    return;
  }
  switch (M) {
    case 1:
      if (K * sizeof(float) <= 16 << 10) run<1, 1, 8>(xp, K, wp, N, sp, bp, yp);
      else run<1, 8>(xp, K, wp, N, sp, bp, yp);
      break;
    case 2: run<2, 8>(xp, K, wp, N, sp, bp, yp); break;
    case 3: run<3, 4>(xp, K, wp, N, sp, bp, yp); break;
    case 4: run<4, 4>(xp, K, wp, N, sp, bp, yp); break;
    default: run<5, 4>(xp, K, wp, N, sp, bp, yp); break;
  }
}

// Prefill (more rows): y = (x @ w.T) * scale + bias as one GEMM that widens the int8 weights
// while packing them for oneDNN's bf16 micro-kernel (brgemm, through at::native::cpublas). A
// panel of PN output channels x PK inputs is widened to bf16 (exact: |q| <= 127 fits bf16's
// significand) straight into the pair-interleaved ("VNNI") layout the micro-kernel reads, in a
// buffer that stays in the core's L2, and multiplied with every row of x before the next panel
// is widened. Products are summed in fp32; scale and bias are applied once, when the fp32 sums
// are rounded to bf16. Widening whole blocks of weights to bf16 in memory first and calling a
// bf16 GEMM (the first version) cost 1.05-1.15x bf16's time.
// The panel shape is the micro-kernel's blocking, and what suits it depends on the CPU: with
// AMX (Intel Xeon, session 10) 128 x 2048, or 256 x 512 for inputs longer than 8192 (the down
// projections), made the 7B shapes at 512 rows 0.93-1.02x and 0.82-0.85x bf16's time where 64 x
// 2048 made 1.04-1.15x; without AMX (AMD Zen 4, sessions 4-9) 64 x 2048 is the measured one.
constexpr int64_t ROWS_PER_CALL = 64;
enum Panel : int64_t { PANEL_AUTO = 0, PANEL_64x2048 = 1, PANEL_128x2048 = 2, PANEL_256x512 = 3 };
static_assert(TILE_K % 32 == 0, "pack_panel widens runs of 32 inputs within one tile");

static bool cpu_has_amx() {  // AMX-BF16 and AMX-TILE, and tile state enabled by the OS (XCR0 bits 17, 18)
  static const bool amx = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return false;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & (3u << 17)) == (3u << 17);
  }();
  return amx;
}

static inline __m512 bf16x16_to_fp32(const at::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline __m256i fp32x16_to_bf16(__m512 v) {  // round to nearest even, as c10::BFloat16 (finite values)
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_cvtepi32_epi16(r);
}

// 32 int8 weights (fewer with `mask`, the rest 0) -> 32 bf16 in order. The fp32 of a small
// integer has 16 zero low bits, so its high half is its exact bf16.
static inline __m512i widen32_bf16(const int8_t* p, __mmask32 mask) {
  const __m512 lo = widen16(p, (__mmask16)mask), hi = widen16(p + 16, (__mmask16)(mask >> 16));
  const __m512i high_halves = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                               31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_permutex2var_epi16(_mm512_castps_si512(lo), high_halves, _mm512_castps_si512(hi));
}

static inline __m512i widen32_bf16(const int8_t* p) { return widen32_bf16(p, ~(__mmask32)0); }

// In: r[i] = 16 32-bit units of row i. Out: r[j] = unit j of rows 0..15.
static inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Rows n0 .. n0+nb of w [N, K] (nb <= PN; missing rows are zeros), inputs k0 .. k0+kb (kb
// even) -> out[k / 2][n][k % 2] as bf16: each 32-bit unit is one pair of inputs of one output
// channel, so widening 16 channels x 32 inputs and transposing 16x16 units packs them. n0 and,
// in the tiled layout, k0 are multiples of the tile's sides, so within a tile (or the row-major
// chunk) the 16 rows are one stride apart and a 32-input run never crosses a tile. Computing
// that address once per run instead of per row and widening full runs unmasked made packing
// 25-40% faster (session 10).
static inline const int8_t* weight_at(const int8_t* w, int64_t N, int64_t K, int64_t n, int64_t k, bool tiled) {
  return tiled ? tiled_at(w, N, K, n, k) : w + n * K + k;
}
template <int64_t PN>
static void pack_panel(const int8_t* w, int64_t N, int64_t K, int64_t n0, int64_t nb, int64_t k0, int64_t kb, bool tiled,
                       at::BFloat16* out) {
  static_assert(PN % TILE_N == 0, "a panel is whole blocks of tile rows");
  for (int64_t sub = 0; sub < PN; sub += TILE_N) {
    const int64_t rows = std::min(TILE_N, nb - sub);  // this block's channels; <= 0: zeros
    for (int64_t ks = k0; ks < k0 + kb; ks += tiled ? TILE_K : kb) {
      const int64_t ke = tiled ? std::min(k0 + kb, ks + TILE_K) : k0 + kb;
      // Channel n0 + sub + i, input k is at base + i * stride + (k - ks).
      const int64_t stride = tiled ? tile_cols(K, ks) : K;
      const int8_t* base = rows <= 0 ? w : tiled ? w + (n0 + sub) * K + ks * tile_rows(N, n0 + sub) : w + (n0 + sub) * K + ks;
      for (int64_t nt = 0; nt < TILE_N; nt += 16) {
        for (int64_t k = ks; k < ke; k += 32) {
          __m512i r[16];
          const int64_t valid = std::min<int64_t>(32, ke - k);
          const int8_t* p = base + nt * stride + (k - ks);  // read only for rows that exist
          if (valid == 32 && nt + 16 <= rows) {
            // The next 16 rows (16 * stride bytes, 512 a run) into L1: in a model, where the weights
            // come from memory, not the L3 as in a single-shape loop, ChatGLM3-6B's linears took
            // 2.70 instead of 2.77 s of a 512-token prompt (session 10).
            if (tiled)
              for (int l = 0; l < 8; ++l) _mm_prefetch((const char*)(base + (nt + 16) * stride + (k - ks) * 16 + l * 64), _MM_HINT_T0);
            for (int i = 0; i < 16; ++i) r[i] = widen32_bf16(p + i * stride);
          } else {
            const __mmask32 mask = valid == 32 ? ~(__mmask32)0 : (__mmask32)((1ull << valid) - 1);
            for (int i = 0; i < 16; ++i) r[i] = nt + i < rows ? widen32_bf16(p + i * stride, mask) : _mm512_setzero_si512();
          }
          transpose16x16(r);
          const int64_t pairs = std::min<int64_t>(16, (ke - k) / 2);
          for (int j = 0; j < pairs; ++j) _mm512_storeu_si512(out + (((k - k0) / 2 + j) * PN + sub + nt) * 2, r[j]);
        }
      }
    }
  }
}

template <int64_t PN, int64_t PK>
static torch::Tensor packed_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                               const c10::optional<torch::Tensor>& bias, bool tiled) {
  static_assert(PK % TILE_K == 0, "a tiled panel starts at a tile's first input");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  // The micro-kernel takes inputs in pairs; an odd last input is added in the epilogue.
  const int64_t K2 = K & ~int64_t(1);
  const auto xb = x.to(at::kBFloat16).contiguous();
  auto y = torch::empty({M, N}, x.options().dtype(at::kBFloat16));
  const torch::Tensor bb = bias_bf16("int8_packed_mm", bias, N);
  const at::BFloat16* bp = bb.defined() ? bb.data_ptr<at::BFloat16>() : nullptr;
  const at::BFloat16* xp = xb.data_ptr<at::BFloat16>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  // Threads take panels from a shared counter, as in the GEMV: a preempted thread's panels
  // are taken over instead of waited for.
  const int64_t panels = (N + PN - 1) / PN;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), panels);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto packed = torch::empty({PK * PN}, xb.options());
    auto sums = torch::empty({M, PN}, xb.options().dtype(at::kFloat));
    at::BFloat16* pk = packed.data_ptr<at::BFloat16>();
    float* c = sums.data_ptr<float>();
    for (int64_t p; (p = next.fetch_add(1, std::memory_order_relaxed)) < panels;) {
      const int64_t n0 = p * PN, nb = std::min(PN, N - n0);
      if (K2 == 0) sums.zero_();
      for (int64_t k0 = 0; k0 < K2; k0 += PK) {
        const int64_t kb = std::min(PK, K2 - k0);
        pack_panel<PN>(wp, N, K, n0, nb, k0, kb, tiled, pk);
        for (int64_t m0 = 0; m0 < M; m0 += ROWS_PER_CALL)
          at::native::cpublas::brgemm(std::min(ROWS_PER_CALL, M - m0), PN, kb, K, PN, PN, k0 > 0,
                                      xp + m0 * K + k0, pk, c + m0 * PN);
      }
      alignas(64) float w_last[PN] = {0};  // w[n, K - 1] when K is odd
      if (K2 < K)
        for (int64_t i = 0; i < nb; ++i) w_last[i] = *weight_at(wp, N, K, n0 + i, K2, tiled);
      for (int64_t m = 0; m < M; ++m) {
        const __m512 x_last = _mm512_set1_ps(K2 < K ? static_cast<float>(xp[m * K + K2]) : 0.f);
        for (int64_t j = 0; j < nb; j += 16) {
          const __mmask16 mask = j + 16 <= nb ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - j)) - 1);
          const __m512 sum = _mm512_fmadd_ps(x_last, _mm512_load_ps(w_last + j), _mm512_maskz_loadu_ps(mask, c + m * PN + j));
          const __m512 v = _mm512_fmadd_ps(sum, _mm512_maskz_loadu_ps(mask, sp + n0 + j),
                                           bp ? bf16x16_to_fp32(bp + n0 + j, mask) : _mm512_setzero_ps());
          _mm256_mask_storeu_epi16(yp + m * N + n0 + j, mask, fp32x16_to_bf16(v));
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return y;
}

// `panel`: PANEL_AUTO (what the Python side passes), or one shape (the tests run each).
torch::Tensor int8_packed_mm(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias, bool tiled,
                             int64_t panel) {
  check_operands("int8_packed_mm", x, w, scale);
  if (panel == PANEL_AUTO) panel = !cpu_has_amx() ? PANEL_64x2048 : x.size(1) > 8192 ? PANEL_256x512 : PANEL_128x2048;
  switch (panel) {
    case PANEL_64x2048: return packed_mm<64, 2048>(x, w, scale, bias, tiled);
    case PANEL_128x2048: return packed_mm<128, 2048>(x, w, scale, bias, tiled);
    case PANEL_256x512: return packed_mm<256, 512>(x, w, scale, bias, tiled);
    default: TORCH_CHECK(false, "int8_packed_mm: no panel shape ", panel);
  }
}
"""

# --- AVX2: the decode GEMV -----------------------------------------------------------------------

_AVX2 = r"""
// The GEMV, 8 weights at a time: one load widens them (vpmovsxbd), one converts, one FMA per
// input row takes its activations straight from L1 (16 ymm registers cannot hold a tile's 256
// activations, as the AVX-512 kernel's 32 zmm do). A tiled block is one tile after another; a
// row-major one (a tied lm_head) is a single tile as wide as K.
static inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

static inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Rows 0..nr-1 of one tile (kw bytes each, one after another) times inputs k0..k0+kw of the M
// rows of x: each row's 8 partial sums are added to part[m][r]. U chains per input row (4 for
// one row, 2 for up to 5: M * U + 2 of the 16 registers).
template <int M>
static inline void tile_gemv(const float* x, int64_t K, int64_t k0, const int8_t* t, int64_t nr, int64_t kw,
                             __m256 (*part)[TILE_N]) {
  constexpr int U = M == 1 ? 4 : 2;
  for (int64_t r = 0; r < nr; ++r) {
    const int8_t* p = t + r * kw;
    for (int64_t l = 0; l < kw; l += 64) _mm_prefetch((const char*)(p + l + TILED_PREFETCH_BYTES), _MM_HINT_T1);
    __m256 a[M][U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) a[m][u] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 * U <= kw; j += 8 * U)
      for (int u = 0; u < U; ++u) {
        const __m256 wv = widen8(p + j + 8 * u);
        for (int m = 0; m < M; ++m) a[m][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k0 + j + 8 * u), wv, a[m][u]);
      }
    for (; j < kw; j += 8) {  // the last 1..8 inputs from zero-padded copies (K is rarely such)
      const int64_t n = std::min<int64_t>(8, kw - j);
      int8_t wb[8] = {0};
      memcpy(wb, p + j, n);
      const __m256 wv = widen8(wb);
      for (int m = 0; m < M; ++m) {
        float xb[8] = {0};
        memcpy(xb, x + m * K + k0 + j, n * sizeof(float));
        a[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xb), wv, a[m][0]);
      }
    }
    for (int m = 0; m < M; ++m) {
      __m256 s = a[m][0];
      for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, a[m][u]);
      part[m][r] = _mm256_add_ps(part[m][r], s);
    }
  }
}

template <int M>
static void block_gemv(const float* x, int64_t N, int64_t K, const int8_t* w, int64_t n0, bool tiled,
                       const float* scale, const at::BFloat16* bias, at::BFloat16* y) {
  const int64_t nr = tile_rows(N, n0);
  __m256 part[M][TILE_N];  // per input row and channel: 8 partial sums, added up at the end
  for (int m = 0; m < M; ++m)
    for (int64_t r = 0; r < nr; ++r) part[m][r] = _mm256_setzero_ps();
  if (tiled)
    for (int64_t k0 = 0; k0 < K; k0 += TILE_K) tile_gemv<M>(x, K, k0, w + n0 * K + k0 * nr, nr, tile_cols(K, k0), part);
  else
    tile_gemv<M>(x, K, 0, w + n0 * K, nr, K, part);
  for (int64_t r = 0; r < nr; ++r) {
    const float s = scale[n0 + r], b = bias ? static_cast<float>(bias[n0 + r]) : 0.f;
    for (int m = 0; m < M; ++m) y[m * N + n0 + r] = static_cast<at::BFloat16>(sum8(part[m][r]) * s + b);
  }
}

template <int M>
static void run(const float* x, int64_t K, const int8_t* w, int64_t N, const float* scale,
                const at::BFloat16* bias, at::BFloat16* y, bool tiled) {
  for_channel_blocks(N, K, TILE_N, [&](int64_t n0) { block_gemv<M>(x, N, K, w, n0, tiled, scale, bias, y); });
}

static void gemv(int64_t M, const float* xp, int64_t K, const int8_t* wp, int64_t N, const float* sp,
                 const at::BFloat16* bp, at::BFloat16* yp, bool tiled) {
  switch (M) {
    case 1: run<1>(xp, K, wp, N, sp, bp, yp, tiled); break;
    case 2: run<2>(xp, K, wp, N, sp, bp, yp, tiled); break;
    case 3: run<3>(xp, K, wp, N, sp, bp, yp, tiled); break;
    case 4: run<4>(xp, K, wp, N, sp, bp, yp, tiled); break;
    default: run<5>(xp, K, wp, N, sp, bp, yp, tiled); break;
  }
}
"""
