"""launch.decode_layer: a decoded token's layer in a few compiled calls, rounding as transformers does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.models.glm import modeling_glm
from transformers.models.llama import modeling_llama

from launch import attention, decode_layer, int8_kernels, kv_cache, quantize
from launch.int8_linear import Int8LinearPart
from launch.quantize import QuantConfig, ensure_int8, load_int8
from tests.conftest import can_build_kernels
from tests.test_int8 import smollm2, tiny_llama

pytestmark = pytest.mark.skipif(not can_build_kernels("avx2"), reason="the decode layer's ops need AVX2 and g++")


def test_the_ops_build_here():
    """native.load turns a build error into a warning and None (the layers then run as
    transformers wrote them); here, with AVX2 and g++, that would be a bug in the source."""
    assert decode_layer.ops() is not None


def tiny(kind: str, layers: int = 2) -> torch.nn.Module:
    """A random bf16 model of `kind` with heads of 64 (the decode attention kernel's size)."""
    extra = dict(attention_bias=True, pad_token_id=0, eos_token_id=1, partial_rotary_factor=0.5) if kind == "glm" else {}
    config = AutoConfig.for_model(kind, hidden_size=256, num_hidden_layers=layers, num_attention_heads=4, head_dim=64,
                                  num_key_value_heads=2, intermediate_size=320, vocab_size=256, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart two bf16 tensors are (same-sign values)."""
    return (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()


@pytest.mark.parametrize("kind,module", [("glm", modeling_glm), ("llama", modeling_llama)])
def test_rope_is_transformers_rotary_bit_for_bit(kind, module):
    """GLM turns interleaved pairs of the first half of a head, Llama (and Qwen2) the two halves
    of the whole head: the same numbers as transformers' apply_rotary_pos_emb in bf16."""
    model = tiny(kind, layers=1)
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 4, 1, 64, generator=g) * 4).bfloat16()
    k = (torch.randn(1, 2, 1, 64, generator=g) * 4).bfloat16()
    for position in (0, 1, 17, 3000):
        cos, sin = model.model.rotary_emb(q, torch.tensor([[position]]))
        want_q, want_k = module.apply_rotary_pos_emb(q, k, cos, sin)
        got_q, got_k = q.clone(), k.clone()
        decode_layer.ops().rope_(got_q.view(-1, 64), got_k.view(-1, 64), cos, sin, kind == "glm")
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k), position
    assert not torch.equal(got_q, q)  # it turned something


def test_norms_and_silu_match_transformers():
    """Within one bf16 step of transformers' RMSNorm and SiLU-times-up (the sum of squares and
    exp are float32 in both, summed or approximated in another order), and mostly identical."""
    layer = tiny("glm", layers=1).model.layers[0]
    norm = layer.post_attention_layernorm
    g = torch.Generator().manual_seed(2)
    norm.weight.data = (torch.rand(256, generator=g) + 0.5).bfloat16()
    h, d = ((torch.randn(1, 1, 256, generator=g) * 3).bfloat16() for _ in range(2))
    gate, up = ((torch.randn(1, 1, 4100, generator=g) * 4).bfloat16() for _ in range(2))
    ops = decode_layer.ops()
    with torch.inference_mode():
        checks = [(ops.rms_norm(h, norm.weight, norm.variance_epsilon), norm(h))]
        total, normed = ops.add_rms_norm(h, d, norm.weight, norm.variance_epsilon)
        assert torch.equal(total, h + d)
        assert torch.equal(ops.add_(d.clone(), h), h + d)  # the layer's last residual add, in place
        checks += [(normed, norm(h + d)), (ops.silu_mul(gate, up), up * F.silu(gate))]
    for got, want in checks:
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        assert int(bf16_ulps(got, want).max()) <= 1
        assert (got == want).float().mean() >= 0.98


def decode_logits(model, tokens: torch.Tensor, prompt: int, cache=kv_cache.new_cache) -> torch.Tensor:
    """The prompt's last logits, then each decoded token's, through a growing cache."""
    with torch.inference_mode():
        out = model(input_ids=tokens[:, :prompt], past_key_values=cache(model.config), use_cache=True)
        steps = [out.logits[0, -1]]
        for i in range(prompt, tokens.shape[1]):
            out = model(input_ids=tokens[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0, -1])
    return torch.stack(steps).float()


class CountingOps:
    """The compiled ops, counting the calls of each."""

    def __init__(self, ops):
        self.ops, self.calls = ops, {}

    def __getattr__(self, name):
        def call(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return getattr(self.ops, name)(*args)
        return call


@pytest.mark.parametrize("kind", ["glm", "qwen2", "llama"])
def test_decoded_tokens_match_transformers_layers(kind, monkeypatch):
    """A prompt, then 24 decoded tokens: the logits of transformers' own layers, the fused path
    taken by every decoded token and by no prompt."""
    model = attention.use(tiny(kind))
    tokens = torch.randint(3, 256, (1, 60), generator=torch.Generator().manual_seed(3))
    want = decode_logits(model, tokens, 36)
    counting = CountingOps(decode_layer.ops())
    monkeypatch.setattr(decode_layer, "ops", lambda: counting)
    got = decode_logits(decode_layer.use(model), tokens, 36)
    assert counting.calls == {"rms_norm": 2 * 24, "rope_": 2 * 24, "add_rms_norm": 2 * 24, "silu_mul": 2 * 24,
                              "add_": 2 * 24}
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # Bit for bit here for the first 8-24 tokens; once one float32 sum rounds the other way, the
    # difference travels through the cache at bf16's noise (0.5% here). RoPE turning the wrong
    # pairs, the likeliest bug, makes 6-7%.
    assert float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max()) < 0.02
    # transformers' own cache (appended by torch.cat): the same layer, attended through
    # launch.attention instead of straight to its kernel.
    counting.calls.clear()
    assert torch.equal(decode_logits(model, tokens, 36, cache=lambda config: DynamicCache(config=config)), got)
    assert counting.calls["rope_"] == 2 * 24


@pytest.mark.parametrize("stacked", [True, False])
def test_int8_linears_run_as_direct_gemvs(tmp_path, monkeypatch, stacked):
    """An int8 Llama (q/k/v and gate/up stacked, or not): the decode path calls the GEMV straight
    on the weights, once per stack, and gives the logits of transformers' layers over the same
    int8 linears."""
    folder, _ = ensure_int8(tiny_llama(tmp_path, tied=False), tmp_path / "int8", QuantConfig())
    if not stacked:
        monkeypatch.setattr(quantize, "stack_shared_inputs", lambda model: 0)
    model = attention.use(load_int8(folder))
    monkeypatch.undo()
    tokens = torch.randint(3, 512, (1, 30), generator=torch.Generator().manual_seed(4))
    want = decode_logits(model, tokens, 20)
    parts_called = []
    forward = Int8LinearPart.forward
    monkeypatch.setattr(Int8LinearPart, "forward", lambda self, x: parts_called.append(x.shape[1]) or forward(self, x))
    gemvs = CountingOps(int8_kernels.kernels())
    monkeypatch.setattr(decode_layer, "kernels", lambda: gemvs)
    got = decode_logits(decode_layer.use(model), tokens, 20)
    assert set(parts_called) == ({20} if stacked else set())  # the prompt's; decoded tokens took the stacks whole
    per_layer = 4 if stacked else 3 + 1 + 2 + 1  # q/k/v, o, gate/up, down
    assert gemvs.calls == {"int8_gemv": per_layer * len(model.model.layers) * 10}
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max()) < 0.02


def test_real_weights_decode_as_close_to_float32_as_transformers_bf16():
    """SmolLM2 (real weights), a sentence decoded token by token: the fused layers' logits are no
    farther from float32's than transformers' own bf16 layers are (mean KL; measured 0.0012 and
    0.0013 on this sentence; with RoPE turning the wrong pairs, 1.17). Random weights cannot show
    this: their logits are too flat for a distance to float32 to mean anything."""
    folder = smollm2()
    tokens = AutoTokenizer.from_pretrained(folder)(
        "Photosynthesis is the process by which green plants use sunlight to make food from carbon dioxide "
        "and water, releasing oxygen.", return_tensors="pt").input_ids
    reference = decode_logits(attention.use(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()),
                              tokens, 1).log_softmax(-1)
    model = attention.use(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval())

    def mean_kl(logits: torch.Tensor) -> float:
        return float(F.kl_div(logits.log_softmax(-1), reference, log_target=True, reduction="batchmean"))

    transformers_kl = mean_kl(decode_logits(model, tokens, 1))
    fused_kl = mean_kl(decode_logits(decode_layer.use(model), tokens, 1))
    assert model.model.layers[0]._llmd_decode
    assert fused_kl <= 1.25 * transformers_kl, (fused_kl, transformers_kl)


def test_what_it_leaves_to_transformers(monkeypatch):
    """Other model types, other dtypes, another attention, or the switch off: layers untouched."""
    assert not hasattr(decode_layer.use(tiny("mistral")).model.layers[0], "_llmd_decode")
    assert not hasattr(decode_layer.use(tiny("glm").float()).model.layers[0], "_llmd_decode")

    model = decode_layer.use(tiny("glm"))  # still on SDPA: the layer must not switch attention itself
    model.set_attn_implementation("sdpa")
    counting = CountingOps(decode_layer.ops())
    monkeypatch.setattr(decode_layer, "ops", lambda: counting)
    decode_logits(model, torch.randint(3, 256, (1, 12)), 10)
    assert counting.calls == {}

    monkeypatch.undo()
    monkeypatch.setenv(decode_layer.KERNEL_ENV, "0")
    decode_layer.ops.cache_clear()
    try:
        assert not hasattr(decode_layer.use(tiny("glm")).model.layers[0], "_llmd_decode")
    finally:
        monkeypatch.undo()
        decode_layer.ops.cache_clear()
