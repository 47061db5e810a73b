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
# The head sizes the decode kernel is compiled for.
HEAD_DIMS = (64, 128)
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
            and query.shape[-1] == key.shape[-1] and query.shape[-1] in HEAD_DIMS and key.shape[2] >= 1
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


_SOURCE = native.VECTOR_HELPERS + r"""
#include <ATen/Parallel.h>
#include <limits>
#include <vector>

// out[b, 0, h, :] = softmax(q[b, h] . k[b, h / G, l] * scale over l) . v[b, h / G, l] for one query
// per head; k and v [B, KVH, L, D] bf16 with contiguous rows of D (any other strides: views of a
// cache with spare room), q [B, H, 1, D] bf16, G = H / KVH query heads per key/value head.
// One task per (b, kv head): its keys and values are read once for all G queries.


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
