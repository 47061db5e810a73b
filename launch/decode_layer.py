"""A decoded token's pass through a decoder layer in about ten calls, for Llama-family layers
(ChatGLM3 as GlmForCausalLM, Qwen as Qwen2ForCausalLM, SmolLM2 as LlamaForCausalLM).

    model = launch.decode_layer.use(launch.attention.use(model))

Why: between its matrix products a decoded token spends ~110 us in each RMSNorm and ~115 us in
each rotary embedding when transformers computes them: 8 and ~25 small aten ops, each one a
parallel region on the host's threads, for a few thousand numbers. On ChatGLM3-6B int8 that was
6.2 + 6.4 ms of a 260 ms step (AMD Zen 3; docs/int8.md, session 12), time the weights' stream
does not hide. Here each is one single-threaded call (`_SOURCE`), the residual add is fused into
the next norm, SiLU into the product with the up projection, and linears that share an input
and are stacked (launch/int8_linear.py) run as one call. The int8 GEMVs and the attention kernel
are called straight on their tensors, not through the modules and the checks around them:
after each GEMV has streamed megabytes of weights past the caches, every line of Python and
every aten op runs cold, and the Python around the ~130 GEMVs of a Qwen-7B step cost 1.5-3%
of its int8 decode speed (docs/int8.md, session 16).

It rounds as transformers does (every bf16 product and sum rounded where torch rounds it): an
op's output equals transformers' or, where a float32 sum is added up in another order, differs
by one bf16 unit (tests/test_decode_layer.py). Over a model those units add up as any other
summation order's would: SmolLM2 (real weights) decodes as close to float32 as with
transformers' layers (mean KL 0.0017 vs 0.0019 over 162 tokens; docs/int8.md, session 12),
while random synthetic models, whose top logits are often tied, pick other greedy tokens after
a few. Anything else - prompts, masks, gradients, other dtypes, layers of other kinds, another
attention than launch.attention's, no compiler - runs transformers' forward unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from launch import attention, kv_cache, native
from launch.int8_kernels import kernels
from launch.int8_linear import Int8Linear, Int8LinearPart

log = logging.getLogger(__name__)

# Set to 0 to run transformers' layer for decoded tokens too (for comparisons).
KERNEL_ENV = "LLMD_DECODE_LAYER"
# model_type -> whether its rotary embedding turns interleaved pairs (x[2i], x[2i+1]), as
# ChatGLM does, or the halves (x[i], x[i + d/2]), as Llama does.
ROTARY_INTERLEAVED = {"glm": True, "qwen2": False, "llama": False}


def use(model: PreTrainedModel) -> PreTrainedModel:
    """Give every decoder layer of `model` (in place) the decode path; returns it."""
    interleaved = ROTARY_INTERLEAVED.get(model.config.model_type)
    if interleaved is None or getattr(model.config, "hidden_act", None) != "silu":
        log.info("%s: decoded tokens run transformers' layers (no fused path for this model type)", model.config.model_type)
        return model
    if model.dtype != torch.bfloat16 or ops() is None:
        return model
    for layer in model.model.layers:
        if getattr(layer.self_attn, "sliding_window", None) is not None or getattr(layer, "_llmd_decode", False):
            continue
        layer.forward = functools.partial(_forward, _Plan.of(layer, interleaved))
        layer._llmd_decode = True
    return model


@dataclass(frozen=True)
class _Plan:
    """What a decoded token needs of one layer, looked up once: a transformers config attribute
    or a submodule costs microseconds to find, hundreds of times a token. Made after loading:
    it holds the layer's tensors, not the attributes that name them."""

    layer: nn.Module
    attn: nn.Module
    hf_forward: Callable
    interleaved: bool
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    norm_in: tuple[torch.Tensor, float]
    norm_post: tuple[torch.Tensor, float]
    qkv: Callable[[torch.Tensor], list[torch.Tensor]]
    o_proj: Callable[[torch.Tensor], list[torch.Tensor]]
    gate_up: Callable[[torch.Tensor], list[torch.Tensor]]  # GLM: one output, gate then up; others: gate, up
    down: Callable[[torch.Tensor], list[torch.Tensor]]
    attend: Callable | None  # the decode attention kernel, for the layouts of launch.kv_cache's layers

    @classmethod
    def of(cls, layer: nn.Module, interleaved: bool) -> _Plan:
        attn, mlp = layer.self_attn, layer.mlp
        norms = [(n.weight, float(n.variance_epsilon)) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        gate_up = (mlp.gate_up_proj,) if hasattr(mlp, "gate_up_proj") else (mlp.gate_proj, mlp.up_proj)
        kernel = attention.decode_kernel() if attn.head_dim in attention.HEAD_DIMS else None
        return cls(layer, attn, layer.forward, interleaved, attn.config.num_attention_heads, attn.config.num_key_value_heads,
                   attn.head_dim, attn.scaling, *norms, _linears(attn.q_proj, attn.k_proj, attn.v_proj),
                   _linears(attn.o_proj), _linears(*gate_up), _linears(mlp.down_proj),
                   kernel.decode_attention if kernel is not None else None)


def _forward(p: _Plan, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.LongTensor | None = None, past_key_values=None, use_cache: bool | None = False,
             position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
    """transformers' decoder layer forward (same arguments and result), for one decoded token."""
    if not _one_token(p, hidden_states, attention_mask, past_key_values, position_embeddings, kwargs):
        return p.hf_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache,
                            position_embeddings=position_embeddings, **kwargs)
    k_, attn, d = ops(), p.attn, p.head_dim
    cos, sin = position_embeddings

    h = hidden_states.view(1, -1)
    x = k_.rms_norm(h, *p.norm_in)
    q, k, v = p.qkv(x)
    k_.rope_(q.view(p.heads, d), k.view(p.kv_heads, d), cos, sin, p.interleaved)
    q, k, v = q.view(1, p.heads, 1, d), k.view(1, p.kv_heads, 1, d), v.view(1, p.kv_heads, 1, d)
    layers = getattr(past_key_values, "layers", ())
    cached = layers[attn.layer_idx] if attn.layer_idx < len(layers) else None
    if type(cached) is kv_cache.GrowingLayer and p.attend is not None:  # its layout is what the kernel reads
        keys, values = cached.update(k, v)
        o = p.attend(q, keys, values, p.scaling)
    else:
        keys, values = past_key_values.update(k, v, attn.layer_idx)
        o, _ = attention.attention(attn, q, keys, values, None, scaling=p.scaling)
    (o,) = p.o_proj(o.reshape(1, p.heads * d))

    h, x = k_.add_rms_norm(h, o, *p.norm_post)
    gate_up = p.gate_up(x)
    gate, up = gate_up[0].chunk(2, dim=-1) if len(gate_up) == 1 else gate_up
    (down,) = p.down(k_.silu_mul(gate, up))
    return k_.add_(down, h).view(hidden_states.shape)


def _one_token(p: _Plan, hidden_states, attention_mask, past_key_values, position_embeddings, kwargs) -> bool:
    return (hidden_states.shape[:2] == (1, 1) and hidden_states.dtype == torch.bfloat16 and hidden_states.is_contiguous()
            and attention_mask is None and past_key_values is not None and position_embeddings is not None
            and all(t.is_contiguous() and t.dtype == torch.bfloat16 for t in position_embeddings)
            and not p.layer.training and not torch.is_grad_enabled() and hidden_states.device.type == "cpu"
            and not kwargs.get("output_attentions") and p.attn.config._attn_implementation == attention.NAME)


def _linears(*linears: nn.Module) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """One token's x [1, in] -> each linear's output, in as few calls as they allow.

    The parts of one stacked Int8Linear (launch/int8_linear.py) are one GEMV, and a compiled
    Int8Linear's GEMV is called on its tensors directly: through the modules, the Python
    around the ~130 GEMVs of a Qwen-7B step (module calls, reshapes, the kernel's choice, the
    stack's shared output) cost 1.5-3% of its int8 decode speed (docs/int8.md, session 16)."""
    if all(isinstance(m, Int8Linear) and m._compiled for m in linears):
        gemv, each = kernels().int8_gemv, [(m.weight, m.scale, m.bias, m.tiled) for m in linears]
        return lambda x: [gemv(x, *args) for args in each]
    # Parts of one stack, in its order (as stack_shared_inputs makes them): one split of its output.
    stack = linears[0].stack if isinstance(linears[0], Int8LinearPart) else None
    if stack is not None and stack._compiled and all(isinstance(m, Int8LinearPart) and m.stack is stack for m in linears):
        bounds = [0] + [m.stop for m in linears]
        if [m.start for m in linears] == bounds[:-1] and bounds[-1] == stack.out_features:
            gemv, args = kernels().int8_gemv, (stack.weight, stack.scale, stack.bias, stack.tiled)
            sizes = [m.stop - m.start for m in linears]
            return lambda x: gemv(x, *args).split_with_sizes(sizes, dim=1)
    return lambda x: [m(x) for m in linears]


@functools.cache
def ops():
    """The compiled extension, or None (then transformers' layers run every token)."""
    return native.load("llmd_decode_layer", _SOURCE, ["rms_norm", "add_rms_norm", "add_", "rope_", "silu_mul"],
                       fallback="transformers' layers", env=KERNEL_ENV, logger=log, isa=native.cpu_isa() or "avx2")


# Plain loops, but for SiLU's exponential: one token's vectors are a few thousand numbers, and
# g++ -O3 vectorizes the rest well enough. No threads: waking a second one costs more than the work.
_SOURCE = native.VECTOR_HELPERS + r"""
#include <cmath>
#include <vector>

using bf16 = at::BFloat16;
static inline float f(bf16 v) { return static_cast<float>(v); }
static inline float r(float v) { return static_cast<float>(bf16(v)); }  // rounded to bf16, as torch stores it

static void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous bfloat16 CPU tensor");
}

// transformers' RMSNorm: w * bf16(x * rsqrt(mean(x^2) + eps)), the statistics in float32.
static void norm_row(const bf16* x, const bf16* w, bf16* y, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += f(x[i]) * f(x[i]);
  const float inv = 1.f / std::sqrt(ss / n + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = bf16(f(w[i]) * r(f(x[i]) * inv));
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check(x, "x"); check(w, "weight");
  const int64_t n = w.numel();
  TORCH_CHECK(x.size(-1) == n, "x's last size ", x.size(-1), " != the weight's ", n);
  auto y = torch::empty_like(x);
  for (int64_t row = 0; row < x.numel() / n; ++row)
    norm_row(x.data_ptr<bf16>() + row * n, w.data_ptr<bf16>(), y.data_ptr<bf16>() + row * n, n, (float)eps);
  return y;
}

// (h + d, rms_norm(h + d)): a layer's residual add and the next norm in one pass.
std::vector<torch::Tensor> add_rms_norm(torch::Tensor h, torch::Tensor d, torch::Tensor w, double eps) {
  check(h, "h"); check(d, "d");
  TORCH_CHECK(h.sizes() == d.sizes(), "h and d differ in shape");
  auto sum = torch::empty_like(h);
  const bf16 *a = h.data_ptr<bf16>(), *b = d.data_ptr<bf16>();
  bf16* s = sum.data_ptr<bf16>();
  for (int64_t i = 0; i < h.numel(); ++i) s[i] = bf16(f(a[i]) + f(b[i]));
  return {sum, rms_norm(sum, w, eps)};
}

// d += h, in place: the layer's last residual add, without the ~60 us an aten add took in each
// decoded layer (its code and tensors evicted from the caches by the weights streamed before it).
torch::Tensor add_(torch::Tensor d, torch::Tensor h) {
  check(h, "h"); check(d, "d");
  TORCH_CHECK(h.sizes() == d.sizes(), "h and d differ in shape");
  bf16* s = d.data_ptr<bf16>();
  const bf16* a = h.data_ptr<bf16>();
  for (int64_t i = 0; i < d.numel(); ++i) s[i] = bf16(f(s[i]) + f(a[i]));
  return d;
}

// In place, every row of x [rows, head_dim]: x * cos + rotate(x) * sin over the first
// cos.numel() numbers, each product and the sum rounded to bf16 as transformers' bf16 ops do.
// interleaved (GLM): pairs (x[2i], x[2i+1]) turned by cos[i], sin[i];
// otherwise (Llama): pairs (x[i], x[i + D/2]) turned by cos[i] and cos[i + D/2].
static void rotate(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin, bool interleaved) {
  check(x, "q and k");
  TORCH_CHECK(x.dim() == 2, "q and k must be [rows, head_dim]");
  const int64_t D = cos.numel(), d = x.size(1), half = D / 2;
  TORCH_CHECK(sin.numel() == D && D % 2 == 0 && D <= d, "cos/sin of ", D, " numbers for heads of ", d);
  const bf16 *c = cos.data_ptr<bf16>(), *s = sin.data_ptr<bf16>();
  for (int64_t row = 0; row < x.size(0); ++row) {
    bf16* p = x.data_ptr<bf16>() + row * d;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
      const float ca = f(c[interleaved ? i : a]), cb = f(c[interleaved ? i : b]);
      const float sa = f(s[interleaved ? i : a]), sb = f(s[interleaved ? i : b]);
      const float xa = f(p[a]), xb = f(p[b]);
      p[a] = bf16(r(xa * ca) + r(-xb * sa));
      p[b] = bf16(r(xb * cb) + r(xa * sb));
    }
  }
}

// The rotary embedding of a token's queries and keys, in place, in one call.
void rope_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin, bool interleaved) {
  check(cos, "cos"); check(sin, "sin");
  rotate(q, cos, sin, interleaved);
  rotate(k, cos, sin, interleaved);
}

// up * bf16(silu(gate)), as transformers' MLP: act_fn(gate_proj(x)) * up_proj(x).
// silu(g) = g * e^min(g, 0) / (1 + e^-|g|): the exponentials' arguments stay <= 0 (vexp's range).
torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.size(-1) == gate.numel() && gate.stride(-1) == 1 && up.stride(-1) == 1,
              "gate and up must be one row each, of one size");
  TORCH_CHECK(gate.scalar_type() == at::kBFloat16 && up.scalar_type() == at::kBFloat16, "gate and up must be bfloat16");
  auto y = torch::empty_like(gate, at::MemoryFormat::Contiguous);
  const bf16 *g = gate.data_ptr<bf16>(), *u = up.data_ptr<bf16>();
  bf16* o = y.data_ptr<bf16>();
  const int64_t n = gate.numel();
  float act[W];
  const vec zero = vset(0.f), one = vset(1.f);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vec x = load_bf16(g + i), neg = vsub(zero, x);
    const vec num = vexp(vsub(zero, vmax(neg, zero))), den = vadd(one, vexp(vsub(zero, vmax(x, neg))));
    vstore(act, vmul(x, vdiv(num, den)));
    for (int j = 0; j < W; ++j) o[i + j] = bf16(f(u[i + j]) * r(act[j]));
  }
  for (; i < n; ++i) o[i] = bf16(f(u[i]) * r(f(g[i]) / (1.f + std::exp(-f(g[i])))));
  return y;
}
"""
