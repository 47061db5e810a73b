"""INT8 through Neural Compressor: the cache, the round trip, and how close int8 stays to bf16.

Speed is not tested here (the machine is shared); `python -m eval.bench direct` measures it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from launch import int8_kernels, int8_linear, native, quantize
from launch.generate import Sampling, generate
from launch.int8_kernels import PANEL_SHAPES, kernels, packed_mm_runs
from launch.int8_linear import (
    DECODE_MAX_ROWS,
    Int8Embedding,
    Int8Linear,
    Int8LinearPart,
    stack_shared_inputs,
)
from launch.quantize import (
    MANIFEST,
    QuantConfig,
    QuantizeError,
    cache_key,
    ensure_int8,
    load_int8,
)
from tests.conftest import ROOT, can_build_kernels


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


def tiny_llama(folder: Path, tied: bool) -> Path:
    """A random Llama small enough to quantize in seconds, with inner sizes that are multiples
    of 16 (the decode kernel) and one that is not (the fallback path)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = folder / "bf16"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny"), tied=False)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory) -> Path:
    """Tied like SmolLM2: lm_head is the embedding table, stored once."""
    return tiny_llama(tmp_path_factory.mktemp("tiny-tied"), tied=True)


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
    q = first.model.layers[0].mlp.down_proj.dense_weight()
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


def stored_dtypes(folder: Path) -> dict[str, torch.dtype]:
    dtypes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            dtypes |= {name: f.get_tensor(name).dtype for name in f.keys()}
    return dtypes


@pytest.mark.parametrize("source", ["tiny", "tiny_tied"])
def test_quant_lm_head_false_reaches_the_int8_folder(source, request, tmp_path):
    """conf/models/NAME.yaml `quant_lm_head: false`, through launch.prepare as `make up` runs it:
    lm_head and embeddings stay bf16, in another cache folder, and the worker's loader reads it."""
    from launch.config import ModelConfig
    from launch.prepare import prepare

    src = request.getfixturevalue(source)
    conf = {"name": "tiny-int8", "source": {"kind": "local", "path": str(src)}, "template": "smollm2", "quant": "int8"}
    default = prepare(ModelConfig(**conf), tmp_path)
    bf16_head = prepare(ModelConfig(**conf, quant_lm_head=False), tmp_path)
    assert bf16_head.parent == default.parent == tmp_path / "models" / "tiny-int8"
    assert bf16_head != default  # another cache key: switching the option never reuses the other folder

    on, off = stored_dtypes(default), stored_dtypes(bf16_head)
    assert on["model.embed_tokens.weight"] == torch.int8 and "model.embed_tokens.weight_scale" in on
    assert off["model.embed_tokens.weight"] == torch.bfloat16 and "model.embed_tokens.weight_scale" not in off
    assert off["model.layers.0.mlp.down_proj.weight"] == torch.int8  # the other linears are int8 either way
    if source == "tiny_tied":
        assert "lm_head.weight" not in off  # stored once, as the embedding
    else:
        assert on["lm_head.weight"] == torch.int8 and off["lm_head.weight"] == torch.bfloat16
    manifest = json.loads((bf16_head / MANIFEST).read_text())
    assert (manifest["config"]["lm_head"], manifest["config"]["embeddings"]) == (False, False)

    model = load_int8(bf16_head)
    head, emb = model.lm_head, model.model.embed_tokens
    assert type(head) is nn.Linear and head.weight.dtype == torch.bfloat16 and not head.weight.is_meta
    assert type(emb) is nn.Embedding and emb.weight.dtype == torch.bfloat16
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)
    if source == "tiny_tied":
        assert head.weight.data_ptr() == emb.weight.data_ptr()  # one copy in memory, as in bf16
    int8_model = load_int8(default)
    assert isinstance(int8_model.lm_head, Int8Linear)
    if source == "tiny_tied":  # the int8 head reads the embedding's row-major table: one copy
        assert not int8_model.lm_head.tiled and int8_model.model.layers[0].mlp.down_proj.tiled == (kernels() is not None)
        assert int8_model.lm_head.weight.data_ptr() == int8_model.model.embed_tokens.weight.data_ptr()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    ids = [7, 9, 11]
    assert rel_error(last_logits(model, ids), last_logits(ref, ids)) < TINY_REL_TOL


def test_linears_that_share_an_input_run_as_one_stack(tiny, tmp_path, monkeypatch):
    out, _ = ensure_int8(tiny, tmp_path, QuantConfig())
    stacked = load_int8(out)
    monkeypatch.setattr(quantize, "stack_shared_inputs", lambda model: 0)
    plain = load_int8(out)
    for layer, ref in zip(stacked.model.layers, plain.model.layers):
        groups = [(layer.self_attn, ref.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ref.mlp, ("gate_proj", "up_proj"))]
        for parent, ref_parent, names in groups:
            parts = [getattr(parent, n) for n in names]
            assert all(type(p) is Int8LinearPart and p.stack is parts[0].stack for p in parts), names
            # One copy of the weights: each part's rows of the stack are the layer it replaced.
            assert parts[0].stack.weight.shape[0] == sum(getattr(ref_parent, n).out_features for n in names)
            for p, n in zip(parts, names):
                assert torch.equal(p.stack.dense_weight()[p.start : p.stop], getattr(ref_parent, n).dense_weight())
        assert type(layer.mlp.down_proj) is Int8Linear and type(ref.self_attn.q_proj) is Int8Linear
    long_ids, short_ids = list(range(5, 5 + 3 * DECODE_MAX_ROWS)), [7, 9, 11]  # prefill and decode kernels
    for ids in (long_ids, short_ids):
        assert torch.equal(last_logits(stacked, ids), last_logits(plain, ids)), len(ids)
    greedy = Sampling(max_new_tokens=12, temperature=0)
    assert list(generate(stacked, long_ids, greedy)) == list(generate(plain, long_ids, greedy))


def test_a_stacked_part_computes_its_own_rows_whatever_the_call_order():
    torch.manual_seed(0)

    def layer(out_features: int, bias: bool = True) -> Int8Linear:
        return Int8Linear(torch.randint(-127, 128, (out_features, 80), dtype=torch.int8), torch.rand(out_features) / 50,
                          torch.randn(out_features).bfloat16() if bias else None)

    attn, mlp = nn.Module(), nn.Module()
    attn.q_proj, attn.k_proj, attn.v_proj = layer(48), layer(16), layer(16)
    mlp.gate_proj, mlp.up_proj = layer(32, bias=True), layer(32, bias=False)  # biases on one only: not stacked
    block = nn.ModuleDict({"attn": attn, "mlp": mlp})
    names = ("q_proj", "k_proj", "v_proj")
    ref = {n: getattr(attn, n) for n in names}
    assert stack_shared_inputs(block) == 1
    assert type(mlp.gate_proj) is Int8Linear and type(mlp.up_proj) is Int8Linear
    x1, x2 = torch.randn(1, 80).bfloat16(), torch.randn(3, 80).bfloat16()
    calls = [("q_proj", x1), ("k_proj", x1), ("v_proj", x1),   # as the models call them
             ("v_proj", x2), ("q_proj", x2), ("q_proj", x2),   # out of order, one part twice
             ("k_proj", x1), ("k_proj", x2), ("v_proj", x1)]   # the inputs interleaved
    for name, x in calls:
        assert torch.equal(getattr(attn, name)(x), ref[name](x)), (name, x.shape)
    x3 = torch.randn(1, 80).bfloat16()
    for name in names:  # once each, in order, on a new input
        attn.get_submodule(name)(x3)
    assert attn.q_proj._shared.output is None and attn.q_proj._shared.input is None  # nothing kept alive

    # Two requests in two threads (a worker with concurrency 2), one layer's calls interleaved.
    got: dict[str, torch.Tensor] = {}
    first_q_done, other_done = threading.Event(), threading.Event()

    def request_a():
        got["q"] = attn.q_proj(x1)
        first_q_done.set()
        other_done.wait(10)
        got["k"], got["v"] = attn.k_proj(x1), attn.v_proj(x1)

    def request_b():
        first_q_done.wait(10)
        for name in names:
            got[f"b-{name}"] = getattr(attn, name)(x2)
        other_done.set()

    threads = [threading.Thread(target=request_a), threading.Thread(target=request_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for name, short in zip(names, "qkv"):
        assert torch.equal(got[short], ref[name](x1)) and torch.equal(got[f"b-{name}"], ref[name](x2)), name
    # Each thread keeps its own stacked output: request b in between did not replace a's, so a's
    # k and v are columns of the stack a computed for its q (state shared across threads could
    # hand one request another's output when the threads switch inside a call).
    assert got["k"].untyped_storage().data_ptr() == got["q"].untyped_storage().data_ptr() == got["v"].untyped_storage().data_ptr()


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
    decode = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])  # the decode kernel
    prefill = layer(x)  # the prefill kernel
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


# --- the compiled kernels, against a float64 reference ------------------------------------------

# AVX2 kernels build on AVX-512 CPUs too (kernels() takes the AVX-512 ones there).
needs_kernel = pytest.mark.skipif(not can_build_kernels("avx2"), reason="the compiled int8 kernels need AVX2 and a C++ compiler")
# oneDNN's bf16 micro-kernel (the prompt kernel) needs AVX512-BF16 or AMX; elsewhere prompts take
# the PyTorch fallback, so the prompt kernel is only required where the CPU has them.
BF16_CPU = torch.ops.mkldnn._is_mkldnn_bf16_supported()


@needs_kernel
def test_the_int8_kernels_build_and_run_here():
    # A build error, or a prompt kernel that cannot run, would otherwise only be a warning and a
    # slower path.
    assert kernels() is not None and packed_mm_runs() == BF16_CPU


def reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              magnitude: bool = False) -> torch.Tensor:
    """What Int8Linear must compute, in float64 from the exact bf16 input and fp32 scale; with
    `magnitude`, the same sum over absolute values (the scale of its rounding errors)."""
    x, w, b = x.double(), w.double(), None if bias is None else bias.bfloat16().double()
    if magnitude:
        x, w, b = x.abs(), w.abs(), None if b is None else b.abs()
    y = (x @ w.T) * scale.double()
    return y if b is None else y + b


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                              bias: torch.Tensor | None, what: str, tolerance: float = 2**-8) -> None:
    ref, size = reference(x, w, scale, bias), reference(x, w, scale, bias, magnitude=True)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape, what
    # Each output may be off by bf16 rounding (2^-9) of the terms it sums: the compiled kernels
    # accumulate in fp32 and round once at the end. The PyTorch prefill fallback (oneDNN's bf16
    # GEMM, measured up to 2.7e-3 on small shapes, then rounded again after the scale) gets 2^-7.
    err = (y.double() - ref).abs()
    bound = size * tolerance + 1e-6
    assert bool((err <= bound).all()), f"{what}: max error {float((err - bound).max()):.3g} over the bound"
    # And overall: a dropped tail of 5 of 4101 inputs is ~3% off, a wrong row or scale far more.
    assert rel_error(y, ref) < 0.005, f"{what}: relative error {rel_error(y, ref):.4f}"


def unaligned_int8(rows: int, cols: int, offset: int = 3) -> torch.Tensor:
    storage = torch.randint(-127, 128, (rows * cols + offset,), dtype=torch.int8)
    w = storage[offset:].view(rows, cols)
    assert w.data_ptr() % 64 != 0
    return w


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (5, 2), (3, 3), (7, 15), (9, 16), (37, 17), (259, 100), (130, 2050), (33, 4096), (64, 4101), (300, 1100)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("tile", [True, False])
def test_kernels_match_reference_on_odd_shapes(out_features, in_features, with_bias, tile):
    torch.manual_seed(out_features * 1000 + in_features)
    w = unaligned_int8(out_features, in_features)
    scale = torch.rand(out_features) / 50 + 1e-4
    bias = torch.randn(out_features) if with_bias else None
    layer = Int8Linear(w, scale, bias, tile=tile)  # tiled; row-major as a tied lm_head
    assert layer._compiled and layer._packed == BF16_CPU, "the compiled kernels are not in use"
    assert layer.tiled == tile and torch.equal(layer.dense_weight(), w)
    # 1..5 rows: the GEMV; then the packed GEMM, whose micro-kernel takes at most 64 rows a call.
    for rows in [*range(1, DECODE_MAX_ROWS + 2), 64, 65, 130]:
        x = torch.randn(rows, in_features).bfloat16()
        assert_close_to_reference(layer(x), x, w, scale, bias, f"{out_features}x{in_features} rows={rows}")
        if rows > DECODE_MAX_ROWS and BF16_CPU:  # every panel shape, not only the one this CPU picks
            for panel, shape in PANEL_SHAPES.items():
                y = kernels().int8_packed_mm(x, layer.weight, scale, bias, tile, panel)
                assert_close_to_reference(y, x, w, scale, bias, f"{out_features}x{in_features} rows={rows} panel {shape}")


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (7, 15), (9, 16), (37, 17), (130, 2050), (64, 4101), (300, 1100)])
def test_the_avx2_gemv_matches_reference_on_any_avx2_cpu(out_features, in_features):
    # Int8Linear runs it on CPUs without AVX-512; built here on AVX-512 CPUs too, so that whichever
    # host runs the tests checks it.
    avx2 = int8_kernels.build("avx2")
    torch.manual_seed(out_features + in_features)
    w = unaligned_int8(out_features, in_features)
    scale, bias = torch.rand(out_features) / 50 + 1e-4, torch.randn(out_features)
    for tiled in (True, False):
        weight = avx2.int8_tile(w.contiguous(), False, False) if tiled else w
        for rows in range(1, DECODE_MAX_ROWS + 1):
            x = torch.randn(rows, in_features).bfloat16()
            for b in (bias, None):
                y = avx2.int8_gemv(x, weight, scale, b, tiled)
                assert_close_to_reference(y, x, w, scale, b, f"{out_features}x{in_features} rows={rows} tiled={tiled}")


@needs_kernel
def test_kernels_take_strided_and_batched_inputs_and_outliers():
    torch.manual_seed(1)
    w = unaligned_int8(300, 4096 + 5, offset=1)
    scale = torch.rand(300) / 50
    bias = torch.randn(300)
    layer = Int8Linear(w, scale, bias)
    # Every other column of a wider tensor (not contiguous), a batch dimension, float32 input,
    # and a few activations 100x larger than the rest (as LLM hidden states have).
    wide = torch.randn(2, 3, 2 * (4096 + 5)).bfloat16()
    wide[..., ::97] *= 100
    for x in (wide[:, :1, ::2], wide[:, :, ::2], wide[..., ::2].float()):
        assert not x.is_contiguous() or x.dtype == torch.float32
        y = layer(x)
        assert y.shape == (*x.shape[:-1], 300)
        assert_close_to_reference(y.reshape(-1, 300), x.reshape(-1, x.shape[-1]).bfloat16(), w, scale, bias,
                                  f"input {tuple(x.shape)} {x.dtype}")


CPUINFO = Path("/proc/cpuinfo").read_text().splitlines()
VNNI_CPU = "avx512_vnni" in next(line for line in CPUINFO if line.startswith("flags")).split()
INTEL_CPU = "GenuineIntel" in next(line for line in CPUINFO if line.startswith("vendor_id"))


@needs_kernel
@pytest.mark.skipif(not VNNI_CPU, reason="this CPU has no AVX512-VNNI: one-row GEMVs take the fp32 path")
def test_one_row_decodes_in_integers_with_vnni_and_rounds_once():
    # A one-row tiled GEMV splits the token's activations into 24-bit integers and sums the
    # byte x int8 products in int32 (int8_kernels.py): exact for every activation within 2^15
    # of the largest, so an output differs from the float64 sum rounded to bf16 only on a tie.
    # The fp32 path stays in use for 2..5 rows, on CPUs without VNNI and by default on AMD's (it
    # decodes faster on Zen 4), and is checked here too.
    k = kernels()
    default = k.int8_gemv_vnni(None)
    assert default == INTEL_CPU, f"the integer decode should be {'on' if INTEL_CPU else 'off'} by default on this CPU"
    torch.manual_seed(3)
    try:
        for n, kk in [(1, 1), (7, 15), (37, 17), (130, 2050), (300, 4101), (1000, 13696)]:
            w = unaligned_int8(n, kk)
            tiled = k.int8_tile(w.contiguous(), False, False)
            scale, bias = torch.rand(n) / 50 + 1e-4, torch.randn(n)
            x = torch.randn(1, kk).bfloat16()
            x[0, ::97] *= 1000  # outliers, as LLM hidden states have
            for b in (bias, None):
                exact = reference(x, w, scale, b).bfloat16()
                k.int8_gemv_vnni(True)
                y = k.int8_gemv(x, tiled, scale, b, True)
                k.int8_gemv_vnni(False)
                y_fp32 = k.int8_gemv(x, tiled, scale, b, True)
                assert_close_to_reference(y_fp32, x, w, scale, b, f"{n}x{kk} fp32 path")
                ulp = 2 ** (exact.double().abs().clamp_min(1e-30).log2().floor() - 7)  # bf16's, at each value
                ulps = (y.double() - exact.double()).abs() / ulp
                assert float(ulps.max()) <= 1 and float((y == exact).float().mean()) >= 0.995, f"{n}x{kk}: {ulps.max():.3g}"
        # What has no exponent to scale by takes the fp32 path: zeros (bias only), inf and NaN.
        tiled, scale, bias = k.int8_tile(unaligned_int8(64, 300), False, False), torch.rand(64), torch.randn(64)
        for special in (0.0, float("inf"), float("nan")):
            x = torch.randn(1, 300).bfloat16()
            x[0, 5] = special
            if special == 0.0:
                x.zero_()
            k.int8_gemv_vnni(True)
            y = k.int8_gemv(x, tiled, scale, bias, True)
            k.int8_gemv_vnni(False)
            torch.testing.assert_close(y, k.int8_gemv(x, tiled, scale, bias, True), rtol=0, atol=0, equal_nan=True,
                                       msg=f"x holding {special}")
            assert not y.isfinite().all() if special != 0.0 else torch.equal(y, bias.bfloat16()[None])
    finally:
        k.int8_gemv_vnni(default)


@needs_kernel
def test_llmd_int8_vnni_overrides_the_makers_default():
    code = "from launch.int8_kernels import kernels; k = kernels(); print(getattr(k, 'int8_gemv_vnni', lambda _: None)(None))"
    avx512 = native.cpu_isa() == "avx512"
    cases = ((None, str(VNNI_CPU and INTEL_CPU)), ("0", "False"), ("1", str(VNNI_CPU)))
    for env, want in cases:
        want = want if avx512 else "None"
        environ = {k: v for k, v in os.environ.items() if k != int8_kernels.VNNI_ENV} | ({int8_kernels.VNNI_ENV: env} if env else {})
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ,
                             capture_output=True, text=True, check=True).stdout
        assert out.strip().splitlines()[-1] == want, f"{int8_kernels.VNNI_ENV}={env}"


@pytest.mark.parametrize("native_bf16", [True, False])
def test_prompts_without_the_packed_kernel_widen_to_bf16_or_fp32(native_bf16, monkeypatch):
    # fp32 where oneDNN has no bf16 arithmetic (AVX2 CPUs: its bf16 GEMM is ~7x slower there), so
    # both paths run on every CPU here; fp32 sums and rounds once, as the compiled kernels do.
    monkeypatch.setattr(int8_linear, "bf16_gemm_is_native", lambda: native_bf16)
    torch.manual_seed(5)
    w, scale, bias = unaligned_int8(130, 300), torch.rand(130) / 50, torch.randn(130)
    layer = Int8Linear(w, scale, bias)
    layer._packed = False
    x = torch.randn(9, 300).bfloat16()
    assert layer.kernel(9) == "widened"
    assert_close_to_reference(layer(x), x, w, scale, bias, f"widened to {'bf16' if native_bf16 else 'fp32'}",
                              tolerance=2**-7 if native_bf16 else 2**-8)


@needs_kernel
def test_decode_and_prefill_paths_agree_with_the_fallback():
    torch.manual_seed(2)
    w, scale, bias = unaligned_int8(200, 128), torch.rand(200) / 50, torch.randn(200)
    compiled, fallback, no_bf16 = Int8Linear(w, scale, bias), Int8Linear(w, scale, bias, tile=False), Int8Linear(w, scale, bias)
    fallback._compiled = fallback._packed = False  # _weight_int8pack_mm; the PyTorch widened GEMM
    no_bf16._packed = False  # a CPU without bf16 instructions: the GEMV, then the PyTorch GEMM on untiled blocks
    assert compiled.tiled and no_bf16.tiled
    for rows in (1, 3, 8, 9, 40):
        decode = rows <= DECODE_MAX_ROWS
        expected = ("gemv", "int8pack", "gemv") if decode else ("packed" if BF16_CPU else "widened", "widened", "widened")
        assert (compiled.kernel(rows), fallback.kernel(rows), no_bf16.kernel(rows)) == expected, f"rows={rows}"
        x = torch.randn(rows, 128).bfloat16()
        a, b, c = compiled(x), fallback(x), no_bf16(x)
        assert rel_error(a, b) < 0.01 and rel_error(c, b if rows > DECODE_MAX_ROWS else a) < 1e-6, f"rows={rows}"
        assert_close_to_reference(b, x, w, scale, bias, f"fallback rows={rows}",
                                  tolerance=2**-8 if rows <= DECODE_MAX_ROWS else 2**-7)
    with torch.backends.mkldnn.flags(enabled=False):  # oneDNN's micro-kernel refuses to run then
        x = torch.randn(9, 128).bfloat16()
        assert compiled.kernel(9) == "widened" and compiled.kernel(1) == "gemv"
        assert rel_error(compiled(x), fallback(x)) < 1e-6


@needs_kernel
def test_the_tiled_layout_is_tiles_of_64_channels_by_256_inputs():
    # 130 x 2050: a last block of 2 channels and a last tile of 2 inputs.
    w = torch.randint(-127, 128, (130, 2050), dtype=torch.int8)
    tiled = kernels().int8_tile(w, False, False)
    flat = tiled.view(-1)
    assert torch.equal(flat[: 64 * 256], w[:64, :256].flatten())  # the first tile, row-major
    n, k = 70, 300  # channels 64..127, tile 1 (inputs 256..511): row 6, column 44
    assert flat[64 * 2050 + 256 * 64 + 6 * 256 + 44] == w[n, k]
    last = flat[128 * 2050 + 2048 * 2:]  # channels 128, 129, inputs 2048, 2049
    assert torch.equal(last, w[128:, 2048:].flatten())
    assert torch.equal(kernels().int8_tile(tiled, True, False), w)
    layer = Int8Linear(w, torch.rand(130))  # a tiled copy: the caller's tensor is left as it was
    assert torch.equal(layer.weight, tiled) and torch.equal(layer.dense_weight(64, 130), w[64:])
    owned = Int8Linear(w.clone(), torch.rand(130), tile=False)
    before = owned.weight.data_ptr()
    owned.tile_()  # what load_int8 does: the same memory, rearranged
    assert owned.tiled and owned.weight.data_ptr() == before and torch.equal(owned.weight, tiled)
    with pytest.raises(ValueError, match="multiple of 64"):
        layer.dense_weight(3, 10)


@needs_kernel
def test_the_gemv_prefetches_as_far_ahead_as_measured_for_this_cpus_maker():
    # 4 KiB on Intel, 8 KiB on AMD (int8_kernels.py says where each was measured): read from
    # CPUID in the kernel, here from /proc/cpuinfo.
    vendor = next(line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("vendor_id"))
    want = 4096 if vendor == "GenuineIntel" else 8192
    assert kernels().int8_prefetch_bytes() == want
    assert int8_kernels.build("avx2").int8_prefetch_bytes() == want


def test_without_a_compiler_the_kernel_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with caplog.at_level("WARNING", logger="launch.int8_kernels"):
        assert kernels.__wrapped__() is None
    assert "no C++ compiler" in caplog.text and "_weight_int8pack_mm" in caplog.text and "llmd_int8" in caplog.text
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setattr(native.shutil, "which", lambda name: "/usr/bin/g++")
    caplog.clear()
    with caplog.at_level("WARNING", logger="launch.int8_kernels"):
        assert kernels.__wrapped__() is None
    assert "this CPU has no AVX2" in caplog.text and "llmd_int8_avx2" in caplog.text


def test_int8_embedding_rows():
    w, scale = torch.randint(-127, 128, (50, 24), dtype=torch.int8), torch.rand(50) / 50
    emb = Int8Embedding(w, scale)
    ids = torch.tensor([[0, 49, 7], [7, 7, 3]])
    expected = (w[ids].float() * scale[ids][..., None]).bfloat16()  # exact product, one rounding
    assert torch.equal(emb(ids), expected)


@pytest.mark.parametrize("model", ["tiny", "tiny_tied"])
def test_large_weights_quantized_in_row_slices_give_the_same_folder(model, request, tmp_path, monkeypatch):
    """Weights over CHUNK_BYTES in float32 (here the 512x64 lm_head and embeddings and the 136x64
    MLPs; in the 7B models the vocabularies) are quantized a slice of rows at a time: one scale
    per row makes that exact."""
    from safetensors.torch import load_file

    from launch import quantize

    src = request.getfixturevalue(model)
    whole, _ = ensure_int8(src, tmp_path / "whole", QuantConfig())
    monkeypatch.setattr(quantize, "CHUNK_BYTES", 4 * 64 * 100)  # 100 rows: 6 slices, the last short
    import neural_compressor.torch.quantization as inc

    converted = []  # INC convert() calls: one per block, plus one per slice of a large weight
    real_convert = inc.convert
    monkeypatch.setattr(inc, "convert", lambda *a, **kw: converted.append(1) or real_convert(*a, **kw))
    sliced, _ = ensure_int8(src, tmp_path / "sliced", QuantConfig())
    assert len(converted) >= 6 + 6  # lm_head and embeddings in 6 slices each at least

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = tensors(whole), tensors(sliced)
    assert a.keys() == b.keys() and "model.embed_tokens.weight_scale" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name
