"""The benchmarks run and report what they promise (numbers are for docs, never asserted)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from eval.bench import SYNTH, across_processes, huge_page_share, read_buffer, synth_model
from launch.quantize import _empty_model
from tests.conftest import ROOT


def test_gateway_bench_runs_against_the_demo_stack(demo_stack, tmp_path):
    out = tmp_path / "gateway.json"
    done = subprocess.run(
        [sys.executable, "-m", "eval.bench", "gateway", "--base-url", demo_stack.api_base,
         "--controller", demo_stack.controller_url, "--concurrency", "2", "--duration", "3", "--rounds", "1",
         "--max-tokens", "8", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["overhead"]["tokens"] > 1 and result["overhead"]["ratio"] > 0
    assert result["load"]["errors"] == 0 and result["load"]["requests"] >= 2
    assert result["load"]["completion_tokens"] > 0
    assert "gateway/direct tokens/s at concurrency 1" in done.stdout


def _tiny_qwen2(folder):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", hidden_size=256, num_hidden_layers=2, num_attention_heads=4, head_dim=64,
                                  num_key_value_heads=2, intermediate_size=256, vocab_size=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def _bench(*args: str, returncode: int = 0) -> str:
    """`python -m eval.bench ARGS`: its stdout, or its stderr when it is expected to fail."""
    done = subprocess.run([sys.executable, "-m", "eval.bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == returncode, done.stdout + done.stderr
    return done.stdout if returncode == 0 else done.stderr


def _steady_as_read(before: float, after: float, steady: bool) -> bool:
    """Whether a run marked `steady` is one whose readings (GB/s, rounded to 0.1) differ by at most
    15%; at the edge, the rounding can tip it either way."""
    limit = 0.15 * max(before, after)
    return steady == (abs(after - before) <= limit) or abs(abs(after - before) - limit) <= 0.1


def test_direct_bench_reports_both_dtypes_and_the_bound(tmp_path):
    model = _tiny_qwen2(tmp_path / "bf16")
    out = tmp_path / "direct.json"
    text = _bench("direct", "--model", str(model), "--new-tokens", "4", "--prefill-tokens", "16",
                  "--cache-root", str(tmp_path / "cache"), "--json", str(out))
    assert "| prefill 16 s |" in text  # the prompt length asked for, not the default's
    r = json.loads(out.read_text())["models"][str(model)]
    for kind in ("bfloat16", "int8"):
        x = r[kind]
        assert len(x["decode_tok_s_each"]) == 3 and len(x["read_GBps_each"]) == 4  # before and after each run
        assert x["decode_tok_s"] in x["decode_tok_s_each"]  # the median run
        # each run against the mean of the readings just before and after it
        for i, (rate, ratio) in enumerate(zip(x["decode_tok_s_each"], x["of_bound_each"])):
            bound = (x["read_GBps_each"][i] + x["read_GBps_each"][i + 1]) / 2 * 1e9 / x["weight_bytes_per_token"]
            assert ratio == pytest.approx(rate / bound, rel=0.02, abs=1e-4)  # the JSON rounds to 4 decimals
        assert len(x["of_bound_each"]) == 3 and len(x["steady_each"]) == 3
        for (before, after), steady in zip(zip(x["read_GBps_each"], x["read_GBps_each"][1:]), x["steady_each"]):
            assert _steady_as_read(before, after, steady)
        steady = sorted(ratio for ratio, ok in zip(x["of_bound_each"], x["steady_each"]) if ok)
        # the median of the runs the host did not change state during, and only of those
        assert x["of_bound"] == (statistics.median(steady) if steady else None)
        assert x["prefill_s"] == min(x["prefill_s_each"])
        assert 0 <= x["read_huge_pages"] <= 1
    assert r["int8_vs_bf16_decode"] > 0 and r["quantized_now"] is True


def test_direct_bench_summarises_several_processes_by_their_medians(tmp_path):
    model = _tiny_qwen2(tmp_path / "bf16")
    out = tmp_path / "direct.json"
    text = _bench("direct", "--model", str(model), "--new-tokens", "4", "--prefill-tokens", "8", "--processes", "3",
                  "--cache-root", str(tmp_path / "cache"), "--json", str(out))
    r = json.loads(out.read_text())["models"][str(model)]
    for kind in ("bfloat16", "int8"):
        x, each = r[kind], r[kind]["processes"]
        assert len(each) == 3
        assert x["decode_tok_s"] == statistics.median(p["decode_tok_s"] for p in each)
        bounds = [p["of_bound"] for p in each if p["of_bound"] is not None]
        assert x["of_bound"] == (statistics.median(bounds) if bounds else None)
        assert x["prefill_s"] == min(p["prefill_s"] for p in each)
        assert x["read_huge_pages"] == min(p["read_huge_pages"] for p in each)
        row = next(line for line in text.splitlines() if line.startswith(f"| {model} | {kind} |"))
        assert len(row.split("processes: ")[1].split(")")[0].split(", ")) == 3  # each process's, after the median
    assert r["int8_vs_bf16_decode"] == round(r["int8"]["decode_tok_s"] / r["bfloat16"]["decode_tok_s"], 2)


def test_an_even_count_of_processes_summarises_to_printable_medians():
    # The median of two is their mean: 4.06 and 4.07 made 4.0649999999999995 in the table.
    each = [{"weight_bytes_per_token": 1, "load_s": 1.0, "read_huge_pages": 1.0, "decode_tok_s": t, "decode_median_tok_s": t,
             "prefill_s": 1.0, "read_GBps": g, "bound_tok_s": b, "of_bound": 0.5} for t, g, b in ((6.08, 48.5, 4.06), (6.67, 48.6, 4.07))]
    x = across_processes(each)
    assert (x["bound_tok_s"], x["read_GBps"], x["decode_tok_s"]) == (4.065, 48.55, 6.375)


def test_direct_bench_refuses_zero_processes(tmp_path):
    assert "must be at least 1" in _bench("direct", "--model", "synth:qwen-7b", "--processes", "0", returncode=2)


def test_the_bandwidth_is_read_on_huge_pages_where_the_kernel_allows():
    # On 4 KiB pages amax's TLB misses read 10-40% under the memory's bandwidth, which would
    # flatter every ratio to the bound.
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = thp.read_text() if thp.exists() else "[never]"
    buf = read_buffer(1 / 16)
    assert buf.dtype == torch.float32 and buf.numel() == (64 << 20) // 4 and buf.data_ptr() % (2 << 20) == 0
    assert 0 <= float(buf.min()) and float(buf.max()) < 1  # filled, so every page is there
    if "[never]" in mode:
        assert huge_page_share(buf) == 0.0
    else:
        assert huge_page_share(buf) > 0.9, mode
        if "[madvise]" in mode:  # and a buffer nobody asked huge pages for has none: the check can tell
            assert huge_page_share(torch.rand(16 << 20)) < 0.1


@pytest.mark.parametrize("kind", sorted(SYNTH))
def test_the_synthetic_7b_configs_build_their_model(kind):
    # On the meta device: the real shapes without the memory. GlmConfig's default pad token
    # once sat outside ChatGLM3-6B's vocabulary and `synth:glm3-6b` failed before writing a byte.
    model = _empty_model(AutoConfig.for_model(**SYNTH[kind]))
    assert model.config.vocab_size == SYNTH[kind]["vocab_size"]
    assert sum(p.numel() for p in model.parameters()) > 6e9


def test_a_synthetic_model_loads_with_transformers(tmp_path, monkeypatch):
    # The 7B kinds write 12-15 GB; a small config of the same family goes through the same code.
    # Its shards once had no index, and from_pretrained found no weights in the folder.
    monkeypatch.setitem(SYNTH, "tiny-glm", dict(SYNTH["glm3-6b"], hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, head_dim=16, intermediate_size=96, vocab_size=256))
    folder = synth_model("tiny-glm", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == 2 and float(model.model.layers[1].mlp.down_proj.weight.abs().sum()) > 0
    assert synth_model("tiny-glm", tmp_path) == folder  # written once


def test_attention_and_context_benches_print_their_tables(tmp_path):
    text = _bench("attention", "--context", "8")
    assert "| 32 | 8 |" in text and "| 2 | 8 |" in text
    text = _bench("context", "--model", str(_tiny_qwen2(tmp_path / "bf16")), "--context", "16", "--context", "40")
    rows = [line for line in text.splitlines() if line.startswith(("| 16 |", "| 40 |"))]
    assert len(rows) == 2 and all(line.count("/") == 2 for line in rows)  # two rounds of each implementation


def test_linear_stream_and_prefill_benches_print_their_comparisons(tmp_path):
    text = _bench("linear", "--shape", "96x64", "--rows", "2", "--rows", "9", "--rounds", "1")
    rows = [line for line in text.splitlines() if line.startswith("| 96x64 |")]
    assert [line.split("|")[2].strip() for line in rows] == ["2", "9"] and "x bf16" in text
    text = _bench("stream", "--shape", "256x128", "--shape", "64x128", "--mib", "1", "--rounds", "3")
    assert "256x128 int8 x 32 (1 MiB" in text and "64x128 int8 x 128 (1 MiB" in text  # copies up to --mib
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith(("| 1 |", "| 2 |", "| 3 |"))]
    assert [(r[0], r[1]) for r in rows] == [(str(i), shape) for i in (1, 2, 3) for shape in ("256x128", "64x128")]
    for prev, row in zip(rows, rows[1:]):
        assert row[2] == prev[3]  # one amax reading between two runs: the after of one, the before of the next
    for _, _, before, after, gemv, ratio in rows:
        b, a, g, r = float(before), float(after), float(gemv), float(ratio.split("%")[0]) / 100
        assert (g - 0.05) / ((a + b) / 2 + 0.05) - 0.006 <= r <= (g + 0.05) / ((a + b) / 2 - 0.05) + 0.006  # vs the mean of the two
        assert _steady_as_read(b, a, "state changed" not in ratio)
    for shape in ("256x128", "64x128"):
        left_out = sum("state changed" in r[5] for r in rows if r[1] == shape)
        assert f"{shape}: {left_out} of 3 runs left out (state changed)" in text
        kept = [r for r in rows if r[1] == shape and "state changed" not in r[5]]
        summaries = [line for line in text.splitlines() if line.startswith(f"{shape}, amax ")]
        assert sum(int(line.split("(")[1].split(" runs")[0]) for line in summaries) == len(kept)  # every kept run, once
    text = _bench("stream", "--shape", "256x128", "--mib", "1", "--rounds", "2", "--row-major")
    assert "256x128 int8 x 32 (1 MiB, kernel gemv, tiled)" in text and "256x128 row-major int8 x 32 (1 MiB, kernel gemv)" in text
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert [r[1] for r in rows] == ["256x128", "256x128 row-major"] * 2  # alternated within each round
    text = _bench("prefill", "--model", str(_tiny_qwen2(tmp_path / "bf16")), "--tokens", "12", "--rounds", "2",
                  "--cache-root", str(tmp_path / "cache"))
    assert text.count(" s, median ") == 2 and "int8/bf16 time: " in text


def test_a_malformed_shape_is_refused_with_the_form_it_takes():
    for args in (["stream", "--shape", "4096by11008"], ["linear", "--shape", "0x64"]):
        err = _bench(*args, returncode=2)  # argparse's usage error
        assert "expected OUTxIN" in err and "Traceback" not in err
