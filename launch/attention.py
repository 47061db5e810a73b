"""Attention for a decoded token that is fast on CPU, registered with transformers as "llmd".

    model = launch.attention.use(model)      # after from_pretrained / load_int8

Why: for ONE query token torch's CPU attention is slow. Its `scaled_dot_product_attention`
runs a flash kernel made for long query blocks, and its batched bf16 matmuls copy keys and
values that are views of a cache with spare room (launch/kv_cache.py), which is what makes
appending a token cheap. Per layer, bf16, 2 threads (`python -m eval.bench attention`), see the
table in docs/int8.md: at 4096 cached tokens torch's SDPA takes 14-15 ms, ~0.47 s of every
decoded token of a 32-layer model, more than its int8 weights.

Here a decoded token's attention is one pass over the cached keys and one over the values
(`_SOURCE`, compiled on first use for AVX-512 or AVX2 like the int8 kernels: launch/native.py): the query heads that
share a key/value head are computed together (grouped-query attention without repeating the
cache), scores and softmax in float32, values accumulated in float32. Prompts (more than one
query), masks, head sizes other than 64/128 and machines without the kernel use transformers'
own SDPA function unchanged.
"""

from __future__ import annotations

import functools
import logging

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    sdpa_mask,
)

from launch import native

log = logging.getLogger(__name__)

NAME = "llmd"
# Set to 0 to use torch's SDPA for decoded tokens too (for comparisons).
KERNEL_ENV = "LLMD_DECODE_ATTENTION"


def use(model: PreTrainedModel) -> PreTrainedModel:
    """Switch `model` (in place) to this attention; returns it."""
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as SDPA (None when causal suffices)
    assert NAME in ALL_MASK_ATTENTION_FUNCTIONS
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:  # transformers only warns when a class cannot switch
        log.warning("%s cannot use attention %r; decoding with %s", type(model).__name__, NAME, model.config._attn_implementation)
    if model.dtype == torch.bfloat16:  # the only dtype the kernel runs
        decode_kernel()  # built (or loaded from the cache) with the model, not in its first request
    return model


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """query [b, heads, q, d], key/value [b, kv_heads, k, d] -> ([b, q, heads, d], None)."""
    if _one_query(module, query, key, value, attention_mask, kwargs) and (kernel := decode_kernel()) is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return kernel.decode_attention(query, key, value, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _one_query(module, query, key, value, attention_mask, kwargs) -> bool:
    """What the kernel computes exactly; anything else (and anything that needs gradients, a
    paged cache or a mask) goes to SDPA."""
    return (query.shape[2] == 1 and attention_mask is None and not module.training and not torch.is_grad_enabled()
            and query.device.type == "cpu" and query.dtype == key.dtype == value.dtype == torch.bfloat16
            and query.dim() == key.dim() == 4 and key.shape == value.shape and query.shape[0] == key.shape[0]
            and query.shape[-1] == key.shape[-1] and query.shape[-1] in (64, 128) and key.shape[2] >= 1
            and query.shape[1] % key.shape[1] == 0 and key.stride(-1) == value.stride(-1) == 1
            and all(kwargs.get(k) is None for k in ("softcap", "position_bias", "cache")))


@functools.cache
def decode_kernel():
    """The compiled extension with `decode_attention`, or None (then SDPA)."""
    return build(native.cpu_isa() or "avx2")


def build(isa: str):
    """`_SOURCE` compiled for `isa` ("avx512" or "avx2": the source is written for both), or None
    when this CPU cannot run it."""
    return native.load("llmd_decode_attention" + ("" if isa == "avx512" else f"_{isa}"), _SOURCE, ["decode_attention"],
                       fallback="torch's SDPA", env=KERNEL_ENV, logger=log, isa=isa)


_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <limits>
#include <vector>

// out[b, 0, h, :] = softmax(q[b, h] . k[b, h / G, l] * scale over l) . v[b, h / G, l] for one query
// per head; k and v [B, KVH, L, D] bf16 with contiguous rows of D (any other strides: views of a
// cache with spare room), q [B, H, 1, D] bf16, G = H / KVH query heads per key/value head.
// One task per (b, kv head): its keys and values are read once for all G queries.

// The same code for AVX-512 (16 floats a vector) and AVX2 (8), through these few helpers.
#ifdef __AVX512F__
using vec = __m512;
constexpr int W = 16;
static inline vec load_bf16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vset(float x) { return _mm512_set1_ps(x); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vfmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float hsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline float hmax(vec v) { return _mm512_reduce_max_ps(v); }
static inline vec vround(vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec scale_pow2(vec p, vec n, vec x) {  // p * 2^n where x >= -87, else 0
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vset(-87.f), _CMP_GE_OQ), _mm512_scalef_ps(p, n));
}
#else
using vec = __m256;
constexpr int W = 8;
static inline vec load_bf16(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vset(float x) { return _mm256_set1_ps(x); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vfmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float hsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float hmax(vec v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline vec vround(vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec scale_pow2(vec p, vec n, vec x) {  // p * 2^n where x >= -87 (so n >= -126: a normal float), else 0
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), _mm256_cmp_ps(x, vset(-87.f), _CMP_GE_OQ));
}
#endif

static inline vec vexp(vec x) {  // e^x for x <= 0, relative error ~1e-7; 0 below -87
  const vec in = x;
  x = vmax(x, vset(-87.f));
  const vec t = vmul(x, vset(1.44269504088896341f));
  const vec n = vround(t);
  const vec f = vsub(t, n);  // 2^t = 2^n * 2^f, |f| <= 0.5: Taylor series of e^(f ln 2)
  vec p = vset(1.5403530393381606e-4f);
  p = vfmadd(p, f, vset(1.3333558146428443e-3f));
  p = vfmadd(p, f, vset(9.6181291076284772e-3f));
  p = vfmadd(p, f, vset(5.5504108664821580e-2f));
  p = vfmadd(p, f, vset(2.4022650695910071e-1f));
  p = vfmadd(p, f, vset(6.9314718055994531e-1f));
  p = vfmadd(p, f, vset(1.f));
  return scale_pow2(p, n, in);
}

template <int D>
static void one_task(const at::BFloat16* q, int64_t G, const at::BFloat16* k, const at::BFloat16* v, int64_t L,
                     int64_t ks, int64_t vs, float scale, at::BFloat16* out, std::vector<float>& s) {
  constexpr int C = D / W;  // vectors per row
  const int64_t Lp = (L + W - 1) / W * W;
  s.assign(G * Lp, -std::numeric_limits<float>::infinity());
  std::vector<float> qf(G * D);
  for (int64_t g = 0; g < G; ++g)
    for (int d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(q[g * D + d]) * scale;
  for (int64_t l = 0; l < L; ++l) {  // scores: each key row is widened once for all G queries
    vec kr[C];
    for (int c = 0; c < C; ++c) kr[c] = load_bf16(k + l * ks + c * W);
    for (int64_t g = 0; g < G; ++g) {
      vec acc = vmul(kr[0], vload(&qf[g * D]));
      for (int c = 1; c < C; ++c) acc = vfmadd(kr[c], vload(&qf[g * D + c * W]), acc);
      s[g * Lp + l] = hsum(acc);
    }
  }
  std::vector<float> acc(G * D, 0.f);
  for (int64_t g = 0; g < G; ++g) {  // softmax; the padding (-inf) becomes 0
    float* sg = &s[g * Lp];
    vec mx = vset(-std::numeric_limits<float>::infinity());
    for (int64_t l = 0; l < Lp; l += W) mx = vmax(mx, vload(sg + l));
    const vec m = vset(hmax(mx));
    vec sum = vset(0.f);
    for (int64_t l = 0; l < Lp; l += W) {
      const vec e = vexp(vsub(vload(sg + l), m));
      vstore(sg + l, e);
      sum = vadd(sum, e);
    }
    const vec inv = vset(1.f / hsum(sum));
    for (int64_t l = 0; l < Lp; l += W) vstore(sg + l, vmul(vload(sg + l), inv));
  }
  for (int64_t l = 0; l < L; ++l) {  // values: each row widened once, accumulated for all G queries
    vec vr[C];
    for (int c = 0; c < C; ++c) vr[c] = load_bf16(v + l * vs + c * W);
    for (int64_t g = 0; g < G; ++g) {
      const vec p = vset(s[g * Lp + l]);
      float* a = &acc[g * D];
      for (int c = 0; c < C; ++c) vstore(a + c * W, vfmadd(p, vr[c], vload(a + c * W)));
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int d = 0; d < D; ++d) out[g * D + d] = static_cast<at::BFloat16>(acc[g * D + d]);
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(2) == 1, "decode_attention: q [B,H,1,D], k/v [B,KVH,L,D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16, "decode_attention: bf16");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: rows of k and v must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && H % KVH == 0 && (D == 64 || D == 128) && L >= 1, "decode_attention: shapes");
  const int64_t G = H / KVH;
  const auto qc = q.contiguous();
  auto out = torch::empty({B, 1, H, D}, q.options());
  const at::BFloat16* qp = qc.data_ptr<at::BFloat16>();
  const at::BFloat16* kp = k.data_ptr<at::BFloat16>();
  const at::BFloat16* vp = v.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, B * KVH, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KVH, h = t % KVH;
      const at::BFloat16* qt = qp + (b * H + h * G) * D;
      const at::BFloat16* kt = kp + b * k.stride(0) + h * k.stride(1);
      const at::BFloat16* vt = vp + b * v.stride(0) + h * v.stride(1);
      at::BFloat16* ot = op + (b * H + h * G) * D;
      if (D == 128) one_task<128>(qt, G, kt, vt, L, k.stride(2), v.stride(2), (float)scale, ot, s);
      else one_task<64>(qt, G, kt, vt, L, k.stride(2), v.stride(2), (float)scale, ot, s);
    }
  });
  return out;
}
"""
