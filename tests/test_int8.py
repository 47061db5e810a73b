"""INT8 through Neural Compressor: the cache, the round trip, and how close int8 stays to bf16.

Speed is not tested here (the machine is shared); `python -m eval.bench direct` measures it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from launch.generate import Sampling, generate
from launch.int8_linear import DECODE_MAX_ROWS, Int8Linear
from tests.conftest import ROOT
from launch.quantize import MANIFEST, QuantConfig, QuantizeError, cache_key, ensure_int8, load_int8


def smollm2() -> Path:
    """The demo model's bf16 folder, prepared as `make up` prepares it."""
    from launch import config
    from launch.prepare import prepare

    d = config.load(ROOT / "conf", "demo")
    return prepare(next(m for m in d.models if m.name == "smollm2-135m"), d.stack.model_cache_dir)

# Tolerances, as the relative error of the last-position logits (|int8 - bf16| / |bf16|,
# L2 over the vocabulary). bf16 itself differs from float32 by ~1e-2 on these models.
TINY_REL_TOL = 0.03
SMOLLM2_REL_TOL = 0.15


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random untied Llama small enough to quantize in seconds, with inner sizes that are
    multiples of 16 (the decode kernel) and one that is not (the fallback path)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny") / "bf16"
    model.save_pretrained(path)
    return path


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.inference_mode()
def last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_round_trip_gives_identical_outputs(tiny, tmp_path):
    out, made = ensure_int8(tiny, tmp_path, QuantConfig())
    assert made
    first, second = load_int8(out), load_int8(out)
    ids = list(range(3, 40))
    assert torch.equal(last_logits(first, ids), last_logits(second, ids))
    greedy = Sampling(max_new_tokens=12, temperature=0)
    assert list(generate(first, ids[:5], greedy)) == list(generate(second, ids[:5], greedy))
    # The saved integers are what INC computed: per-channel symmetric, max |q| = 127 per row.
    q = first.model.layers[0].mlp.down_proj.weight
    assert q.dtype == torch.int8 and int(q.abs().amax(1).min()) == 127


def test_cache_hit_does_not_quantize_again(tiny, tmp_path):
    out, made = ensure_int8(tiny, tmp_path, QuantConfig())
    assert made
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again, made_again = ensure_int8(tiny, tmp_path, QuantConfig())
    assert (again, made_again) == (out, False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # Another config or another source is another key, so it is not mistaken for a hit.
    assert cache_key(tiny, QuantConfig(lm_head=False, embeddings=False)) != cache_key(tiny, QuantConfig())


def test_changed_source_weights_change_the_key(tiny, tmp_path):
    copy = tmp_path / "copy"
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    model.save_pretrained(copy)
    assert cache_key(copy) == cache_key(tiny)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    model.save_pretrained(copy)
    assert cache_key(copy) != cache_key(tiny)


def test_interrupted_quantization_is_not_a_cache_hit(tiny, tmp_path):
    out, _ = ensure_int8(tiny, tmp_path, QuantConfig())
    (out / MANIFEST).unlink()
    with pytest.raises(QuantizeError, match="no quantization.json"):
        load_int8(out)
    assert ensure_int8(tiny, tmp_path, QuantConfig()) == (out, True)


def test_tiny_int8_logits_close_to_bf16(tiny, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).eval()
    q8 = load_int8(ensure_int8(tiny, tmp_path, QuantConfig())[0])
    long_ids, short_ids = list(range(5, 5 + 3 * DECODE_MAX_ROWS)), [7, 9, 11]  # prefill and decode kernels
    for ids in (long_ids, short_ids):
        err = rel_error(last_logits(q8, ids), last_logits(ref, ids))
        assert err < TINY_REL_TOL, f"int8 logits {err:.4f} from bf16 on {len(ids)} tokens"


def test_both_kernels_compute_the_same_linear():
    torch.manual_seed(0)
    # Starting at an odd byte, as int8 tensors loaded from safetensors can: the decode kernel
    # crashed the process on such a weight before Int8Linear realigned it.
    storage = torch.randint(-127, 128, (96 * 64 + 3,), dtype=torch.int8)
    w = storage[3:].view(96, 64)
    assert w.data_ptr() % 64 != 0
    scale = torch.rand(96) / 100
    layer = Int8Linear(w, scale, bias=torch.randn(96))
    x = torch.randn(2 * DECODE_MAX_ROWS, 64).bfloat16()
    exact = x.float() @ (w.float() * scale.bfloat16().float()[:, None]).T + layer.bias.float()
    decode = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])  # _weight_int8pack_mm
    prefill = layer(x)  # widened bf16 GEMM
    assert rel_error(decode, exact) < 0.01 and rel_error(prefill, exact) < 0.01


def test_rejects_unsupported_configs():
    with pytest.raises(ValueError, match="only RTN, 8 bits, per-channel"):
        QuantConfig(bits=4)
    with pytest.raises(ValueError, match="one scale per output channel"):
        Int8Linear(torch.zeros(4, 16, dtype=torch.int8), torch.ones(3))


def test_smollm2_int8_close_to_bf16(tmp_path):
    source = smollm2()
    ref = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    out, _ = ensure_int8(source, tmp_path, QuantConfig())
    q8 = load_int8(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is Paris. The capital of Germany is").input_ids
    err = rel_error(last_logits(q8, ids), last_logits(ref, ids))
    assert err < SMOLLM2_REL_TOL, f"int8 logits {err:.4f} from bf16"
    greedy = Sampling(max_new_tokens=4, temperature=0)
    assert tok.decode(list(generate(q8, ids, greedy))).strip().startswith("Berlin")


def test_the_converters_own_record_does_not_change_the_key(tiny):
    before = cache_key(tiny)
    generation = (tiny / "generation_config.json").read_text()
    (tiny / "conversion.json").write_text('{"source": {"mtime": 1}}')
    try:
        assert cache_key(tiny) == before
        (tiny / "generation_config.json").write_text(generation + " ")
        assert cache_key(tiny) != before  # while real content still counts
    finally:
        (tiny / "conversion.json").unlink()
        (tiny / "generation_config.json").write_text(generation)
