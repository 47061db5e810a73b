"""launch.attention: a decoded token's attention as SDPA computes it, from a cache with spare room."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from launch import attention, kv_cache
from tests.conftest import can_build_kernels

needs_kernel = pytest.mark.skipif(not can_build_kernels("avx2"), reason="the decode attention kernel needs AVX2 and g++")


@needs_kernel
def test_the_kernel_builds_here():
    """native.load turns a build error into a warning and None (workers then use SDPA); here,
    with AVX2 (or AVX-512) and g++, that would be a bug in the kernel source."""
    assert attention.decode_kernel() is not None


def _module(groups: int) -> nn.Module:
    m = nn.Module().eval()
    m.num_key_value_groups = groups
    return m


def _reference(q, k, v, scale):
    """float64 softmax(q k^T * scale) v, heads grouped as repeat_kv does: [b, 1, heads, d]."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    p = (q.double() @ k.transpose(-1, -2) * scale).softmax(-1)
    return (p @ v).transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 4, 128), (32, 2, 128), (8, 2, 64), (9, 3, 64), (2, 1, 128)])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 300])
def test_kernel_matches_float64(heads, kv_heads, d, length):
    g = torch.Generator().manual_seed(heads * 1000 + length + d)
    # a cache with room: k and v are views with a head stride longer than length * d
    room = torch.randn(2, 2, kv_heads, length + 7, d, generator=g).bfloat16()
    k, v = room[0, :, :, :length], room[1, :, :, :length]
    q = (torch.randn(2, heads, 1, d, generator=g) * 3).bfloat16()
    with torch.inference_mode():  # as the workers run (with gradients on, SDPA would run)
        got, _ = attention.attention(_module(heads // kv_heads), q, k, v, None, scaling=d**-0.5)
    want = _reference(q, k, v, d**-0.5)
    assert got.shape == (2, 1, heads, d) and got.dtype == torch.bfloat16
    err = (got.double() - want).abs()
    # one bf16 rounding of the result (2^-8 relative) plus float32 arithmetic
    assert (err <= want.abs() * 2**-8 + 1e-4).all(), float(err.max())


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,d", [(32, 2, 128), (9, 3, 64)])
def test_the_avx2_build_matches_float64_on_any_avx2_cpu(heads, kv_heads, d):
    # decode_kernel() is the AVX-512 build on AVX-512 CPUs; the AVX2 one is checked there too.
    g = torch.Generator().manual_seed(heads + d)
    for length in (1, 9, 300):
        room = torch.randn(2, 1, kv_heads, length + 5, d, generator=g).bfloat16()
        k, v = room[0, :, :, :length], room[1, :, :, :length]
        q = (torch.randn(1, heads, 1, d, generator=g) * 3).bfloat16()
        got = attention.build("avx2").decode_attention(q, k, v, d**-0.5)
        want = _reference(q, k, v, d**-0.5)
        assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-4).all(), f"length {length}"


@needs_kernel
def test_a_peaked_softmax_and_large_scores():
    q = torch.zeros(1, 2, 1, 64, dtype=torch.bfloat16)
    q[..., 0] = 100
    k = torch.zeros(1, 1, 40, 64, dtype=torch.bfloat16)
    k[0, 0, 13, 0] = 10  # score 1000 * scale: exp overflows without subtracting the max
    v = torch.arange(40, dtype=torch.bfloat16).reshape(1, 1, 40, 1).expand(1, 1, 40, 64).contiguous()
    with torch.inference_mode():
        got, _ = attention.attention(_module(2), q, k, v, None, scaling=1.0)
    assert torch.equal(got, torch.full_like(got, 13.0))


@pytest.mark.parametrize("case", ["prompt", "mask", "float32", "head_dim_32"])
def test_everything_else_goes_to_sdpa_unchanged(case):
    g = torch.Generator().manual_seed(1)
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    d = 32 if case == "head_dim_32" else 64
    q = torch.randn(1, 8, 5 if case == "prompt" else 1, d, generator=g).to(dtype)
    k, v = torch.randn(2, 1, 2, 5, d, generator=g).to(dtype)
    mask = torch.tensor([True, True, False, True, True]).reshape(1, 1, 1, 5) if case == "mask" else None
    module = _module(4)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.2)
    got, _ = attention.attention(module, q, k, v, mask, scaling=0.2)
    assert torch.equal(got, want)


@needs_kernel
@pytest.mark.parametrize("kind", ["qwen2", "glm"])
def test_model_decode_logits_match_sdpa(kind, monkeypatch):
    """A tiny random bf16 model of each served architecture, prompt then 24 decoded tokens, with
    this attention and a growing cache vs SDPA and transformers' own cache: the same logits up to
    bf16 noise."""
    extra = dict(attention_bias=True, pad_token_id=0, eos_token_id=1, partial_rotary_factor=0.5) if kind == "glm" else {}
    config = AutoConfig.for_model(kind, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, head_dim=64,
                                  num_key_value_heads=2, intermediate_size=256, vocab_size=256, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    tokens = torch.randint(3, 256, (1, 60))
    to_sdpa = []  # query lengths that the llmd run sent to SDPA: only the prompt's
    monkeypatch.setattr(attention, "sdpa_attention_forward",
                        lambda m, q, *a, **kw: to_sdpa.append(q.shape[2]) or sdpa_attention_forward(m, q, *a, **kw))
    logits = {}
    for name in ("sdpa", attention.NAME):
        model.set_attn_implementation("sdpa") if name == "sdpa" else attention.use(model)
        cache = kv_cache.new_cache(model.config) if name == attention.NAME else None
        with torch.inference_mode():
            out = model(input_ids=tokens[:, :36], past_key_values=cache, use_cache=True)
            steps = [out.logits[0, -1]]
            for i in range(36, 60):
                out = model(input_ids=tokens[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True)
                steps.append(out.logits[0, -1])
        logits[name] = torch.stack(steps).float()
    assert to_sdpa == [36, 36]  # 2 layers x the prompt; every decoded token ran the kernel
    a, b = logits["sdpa"], logits[attention.NAME]
    assert ((a - b).norm(dim=-1) / a.norm(dim=-1)).max() < 0.02
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_without_the_kernel_a_decoded_token_uses_sdpa(monkeypatch):
    monkeypatch.setattr(attention, "decode_kernel", lambda: None)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 1, 64, generator=g).bfloat16()
    k, v = torch.randn(2, 1, 2, 9, 64, generator=g).bfloat16()
    module = _module(2)
    want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.125)
    got, _ = attention.attention(module, q, k, v, None, scaling=0.125)
    assert torch.equal(got, want)


@needs_kernel
def test_gradients_and_training_are_left_to_sdpa():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 1, 64, generator=g).bfloat16().requires_grad_()
    k, v = torch.randn(2, 1, 2, 9, 64, generator=g).bfloat16()
    got, _ = attention.attention(_module(2), q, k, v, None, scaling=0.125)
    assert got.grad_fn is not None  # SDPA, differentiable; the kernel's output would have none
    with torch.no_grad():
        module = _module(2).train()
        want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.125)
        assert torch.equal(attention.attention(module, q, k, v, None, scaling=0.125)[0], want)
