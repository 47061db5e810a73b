"""Benchmarks. One subcommand per kind; `direct` runs models without a server.

    python -m eval.bench direct --model DIR|synth:qwen-7b|synth:glm3-6b [--model ...]
                                [--quality SMOLLM2_DIR] [--processes N] [--threads N] [--json OUT]
    python -m eval.bench attention [--context 4096]                  (one decoded token, per layer)
    python -m eval.bench context --model DIR [--context 4096]        (a decode step at long contexts)
    python -m eval.bench linear [--shape 27392x4096] [--rows 512]    (one linear: bf16 vs the int8 kernels)
    python -m eval.bench stream [--rounds 20]                        (the decode GEMV's GB/s vs amax's)
    python -m eval.bench prefill --model DIR [--tokens 512]          (bf16 and int8 prompts, alternated)
    python -m eval.bench gateway [--concurrency 16] [--duration 60]     (eval/bench_gateway.py)

For each model, bf16 then int8 (launch.quantize, cached), each in a process of its own as a
worker holds it (`--processes N`: N processes each, alternated, summarised by their medians):
decode tokens/s of one stream (64 new tokens after a short prompt, EOS ignored; the median of
3 runs), the time of a 512-token prefill (the best of 3), and the decode bound =
memory read bandwidth / weight bytes read per token, with the bandwidth read before and after
every decode run ("of bound": the median over the runs of each run against the mean of its two
readings; the machine is shared: compare ratios within a run, not runs).
`--quality` adds int8-vs-bf16 agreement on real weights (top-1, mean KL, greedy answers).
`synth:` models are random native-layout checkpoints of the real shapes, written once.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import functools
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel

from eval import bench_gateway
from launch import attention, decode_layer, kv_cache
from launch.generate import Sampling, generate
from launch.quantize import MANIFEST, QuantConfig, ensure_int8, load_int8

DEFAULT_CACHE = Path.home() / ".cache" / "llm-deployment" / "bench"

# Native transformers configs with the real shapes of the two 7B-class chat models.
SYNTH = {
    "qwen-7b": dict(
        model_type="qwen2", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, intermediate_size=11008, vocab_size=151936, max_position_embeddings=8192,
        tie_word_embeddings=False, pad_token_id=151643,
    ),
    "glm3-6b": dict(
        model_type="glm", hidden_size=4096, num_hidden_layers=28, num_attention_heads=32, num_key_value_heads=2,
        head_dim=128, intermediate_size=13696, vocab_size=65024, max_position_embeddings=8192,
        tie_word_embeddings=False, attention_bias=True,
        pad_token_id=0,  # as the converted ChatGLM3-6B; GlmConfig's default (151329) is outside this vocabulary
    ),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("direct", help="bf16 vs int8 decode/prefill speed and quality, in process")
    d.add_argument("--model", action="append", default=[], help="a bf16 model folder, or synth:qwen-7b / synth:glm3-6b")
    d.add_argument("--quality", type=Path, help="a real-weights model folder (SmolLM2) for the int8 quality numbers")
    d.add_argument("--threads", type=int, default=torch.get_num_threads())
    d.add_argument("--new-tokens", type=int, default=64)
    d.add_argument("--prefill-tokens", type=int, default=512)
    d.add_argument("--cache-root", type=Path, default=DEFAULT_CACHE, help="int8 and synth models go here")
    d.add_argument("--processes", type=_positive, default=1,
                   help="measure each dtype in this many fresh processes, alternating bf16 and int8 (default 1): "
                        "processes differ more than runs within one")
    d.add_argument("--json", type=Path, help="also write the results here")
    d.set_defaults(run=run_direct)
    a = sub.add_parser("attention", help="one decoded token's attention: torch SDPA vs launch.attention, per layer")
    a.add_argument("--threads", type=int, default=torch.get_num_threads())
    a.add_argument("--context", type=int, action="append", help="cached tokens (default 32, 512, 4096)")
    a.set_defaults(run=run_attention)
    c = sub.add_parser("context", help="decode step time at long contexts: transformers' cache + SDPA vs the stack's")
    c.add_argument("--model", type=Path, required=True, help="a bf16 model folder or an int8 folder (launch.quantize)")
    c.add_argument("--context", type=int, action="append", help="cached tokens (default 32, 1024, 4096)")
    c.add_argument("--threads", type=int, default=torch.get_num_threads())
    c.set_defaults(run=run_context)
    li = sub.add_parser("linear", help="one linear layer: bf16 vs the int8 kernels and their fallbacks, interleaved")
    li.add_argument("--shape", action="append", type=_shape, help="OUTxIN (default: the 7B models' shapes)")
    li.add_argument("--rows", type=int, action="append", help="tokens per call (default 1, 5, 6, 64, 512)")
    li.add_argument("--rounds", type=_positive, default=3)
    li.add_argument("--threads", type=int, default=torch.get_num_threads())
    li.set_defaults(run=run_linear)
    st = sub.add_parser("stream", help="the int8 decode GEMV's read rate against the bound's amax read just before and after each run")
    st.add_argument("--shape", action="append", type=_shape, help="OUTxIN of int8 weights (repeatable; default 65536x4096)")
    st.add_argument("--mib", type=_positive, default=256,
                    help="MiB of weights a run streams: a smaller shape runs as copies, called one after another like a model's layers")
    st.add_argument("--rounds", type=_positive, default=20)
    st.add_argument("--threads", type=int, default=torch.get_num_threads())
    st.add_argument("--row-major", action="store_true",
                    help="also run each shape with row-major weights (the layout a tied lm_head keeps), alternated with the tiled")
    st.set_defaults(run=run_stream)
    pf = sub.add_parser("prefill", help="prompt time of a model in bf16 and int8, both loaded, alternated "
                                        "(needs memory for both: 21 GiB peak for ChatGLM3-6B)")
    pf.add_argument("--model", type=Path, required=True, help="a bf16 model folder; its int8 comes from --cache-root")
    pf.add_argument("--tokens", type=int, default=512)
    pf.add_argument("--rounds", type=_positive, default=4)
    pf.add_argument("--cache-root", type=Path, default=DEFAULT_CACHE, help="int8 models go here")
    pf.add_argument("--threads", type=int, default=torch.get_num_threads())
    pf.set_defaults(run=run_prefill)
    bench_gateway.add_parser(sub)
    args = p.parse_args(argv)
    return args.run(args)


def run_direct(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "prefill_tokens": args.prefill_tokens, "models": {}}
    for spec in args.model:
        src = synth_model(spec.split(":", 1)[1], args.cache_root) if spec.startswith("synth:") else Path(spec)
        results["models"][spec] = bench_model(src, args)
        print(json.dumps({spec: results["models"][spec]}, indent=1), flush=True)
    if args.quality:
        results["quality"] = quality(args.quality, args.cache_root)
        print(json.dumps({"quality": results["quality"]}, indent=1), flush=True)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


# --- speed ---------------------------------------------------------------------------------


@torch.inference_mode()
def run_attention(args: argparse.Namespace) -> int:
    """Median time of one layer's attention for one decoded token, bf16, 32 query heads of 128:
    torch's SDPA on contiguous keys/values (transformers' DynamicCache) vs launch.attention on
    views of a cache with spare room (launch.kv_cache), as the workers run it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, kernel {'compiled' if attention.decode_kernel() else 'NOT AVAILABLE (SDPA both)'}")
    print("| key/value heads | cached tokens | torch SDPA us | launch.attention us |\n| --- | --- | --- | --- |")
    for kv_heads in (32, 2):  # Qwen-7B, ChatGLM3-6B
        module = torch.nn.Module().eval()
        module.num_key_value_groups = 32 // kv_heads
        for length in args.context or (32, 512, 4096):
            q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
            k, v = torch.randn(2, 1, kv_heads, length, 128, dtype=torch.bfloat16)
            room = torch.randn(2, 1, kv_heads, length + kv_cache.STEP, 128, dtype=torch.bfloat16)
            kr, vr = room[0, :, :, :length], room[1, :, :, :length]
            sdpa = _median_s(lambda: sdpa_attention_forward(module, q, k, v, None, scaling=128**-0.5)) * 1e6
            ours = _median_s(lambda: attention.attention(module, q, kr, vr, None, scaling=128**-0.5)) * 1e6
            print(f"| {kv_heads} | {length} | {sdpa:.0f} | {ours:.0f} |")
    return 0


@torch.inference_mode()
def run_context(args: argparse.Namespace) -> int:
    """Median of 7 decode steps with the cache already holding N tokens (random keys and values:
    a step's cost does not depend on them), alternating the two implementations twice."""
    torch.set_num_threads(args.threads)
    model = _load(args.model)
    int8 = (args.model / MANIFEST).is_file()
    config = model.config
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    print(f"{args.model} ({'int8' if int8 else 'bf16'}), threads {args.threads}")
    print("| cached tokens | DynamicCache + SDPA ms/token | launch.kv_cache + launch.attention + launch.decode_layer ms/token |\n| --- | --- | --- |")
    for length in args.context or (32, 1024, 4096):
        times: dict[str, list[float]] = {"transformers": [], "stack": []}
        for name in [*times] * 2:
            if name == "stack":
                cache = kv_cache.new_cache(config)
                attention.use(model)
            else:
                cache = DynamicCache(config=config)
                model.set_attn_implementation("sdpa")
            g = torch.Generator().manual_seed(0)
            for layer in cache.layers:
                layer.update(*torch.randn(2, 1, kv_heads, length, head_dim, generator=g, dtype=torch.bfloat16))
            token = torch.tensor([[5]])
            times[name].append(_median_s(lambda c=cache: model(input_ids=token, past_key_values=c, use_cache=True), 7) * 1e3)
            del cache
        print(f"| {length} | {' / '.join(f'{t:.0f}' for t in times['transformers'])} | "
              f"{' / '.join(f'{t:.0f}' for t in times['stack'])} |", flush=True)
    return 0


# A run (`direct`, `stream`) whose bandwidth readings before and after differ by more than this
# straddled two host states: neither reading is its bound, so it is marked and left out of medians.
STEADY = 0.15
# Distinct linear shapes (out x in) of ChatGLM3-6B (qkv, o, gate_up, down) and Qwen-7B (q/k/v/o,
# gate/up, down).
LINEAR_SHAPES = ((4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696), (11008, 4096), (4096, 11008))


@torch.inference_mode()
def run_linear(args: argparse.Namespace) -> int:
    """Per shape and row count: bf16 `F.linear`, Int8Linear with the compiled kernels, and
    Int8Linear on its fallbacks; in rounds that alternate the three, each the median of 5
    calls, the best round reported (a neighbour on the machine only ever slows a round down).
    The same weights are read call after call, so a shape smaller than the L3 cache comes from it:
    for decode speed from memory, `direct` is the measure."""
    from launch.int8_kernels import kernels
    from launch.int8_linear import Int8Linear

    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, compiled kernels {'yes' if kernels() else 'NOT AVAILABLE (fallbacks both)'}")
    print("| shape | rows | bf16 ms | int8 ms (x bf16) | int8 kernel | fallback ms (x bf16) |\n| --- | --- | --- | --- | --- | --- |")
    for out_f, in_f in args.shape or LINEAR_SHAPES:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(out_f, in_f, generator=g).bfloat16()
        q = torch.randint(-127, 128, (out_f, in_f), generator=g, dtype=torch.int8)
        scale = torch.rand(out_f, generator=g) / 100
        int8, fallback = Int8Linear(q, scale), Int8Linear(q, scale, tile=False)
        fallback._compiled = fallback._packed = False
        for rows in args.rows or (1, 5, 6, 64, 512):
            x = torch.randn(rows, in_f, generator=g).bfloat16()
            runs = {"bf16": lambda: F.linear(x, w), "int8": lambda: int8(x), "fallback": lambda: fallback(x)}
            for f in runs.values():
                f()  # warm-up: oneDNN creates its primitives on the first call of a shape
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(args.rounds):
                best = {name: min(best[name], _median_s(f, 5)) for name, f in runs.items()}
            print(f"| {out_f}x{in_f} | {rows} | {best['bf16'] * 1e3:.2f} | {best['int8'] * 1e3:.2f} ({best['int8'] / best['bf16']:.2f}) "
                  f"| {int8.kernel(rows)} | {best['fallback'] * 1e3:.2f} ({best['fallback'] / best['bf16']:.2f}) |", flush=True)
    return 0


@torch.inference_mode()
def run_stream(args: argparse.Namespace) -> int:
    """One token through int8 linears far larger than the caches (the decode GEMV), each run
    between two readings of `read_bandwidth()`'s amax. The bound's bandwidth moves with the host's
    state, so a run is held against the mean of the readings just before and after it, and a run
    whose two readings differ by more than STEADY (the state changed during it) is shown
    but left out of the summary. A shape smaller than --mib runs as that many MiB of copies, one
    call after another, so what a call costs beyond its bytes counts as it does in a model."""
    from launch.int8_linear import Int8Linear

    torch.set_num_threads(args.threads)
    buf = shared_read_buffer()  # before the weights (see there)
    g = torch.Generator().manual_seed(0)
    sets = {}
    for out_f, in_f in args.shape or [(65536, 4096)]:
        copies = max(1, (args.mib << 20) // (out_f * in_f))
        weights = [(torch.randint(-127, 128, (out_f, in_f), generator=g, dtype=torch.int8), torch.rand(out_f, generator=g))
                   for _ in range(copies)]
        x = torch.randn(1, in_f, generator=g).bfloat16()
        for tile in (True, False) if args.row_major else (True,):
            name = f"{out_f}x{in_f}" + ("" if tile else " row-major")
            sets[name] = ([Int8Linear(w, s, tile=tile) for w, s in weights], x, copies * out_f * in_f)
    print(f"threads {args.threads}; a run: " + ", ".join(
        f"{name} int8 x {len(layers)} ({nbytes / 2**20:.0f} MiB, kernel {layers[0].kernel(1)}{', tiled' if layers[0].tiled else ''})"
        for name, (layers, _, nbytes) in sets.items()))
    print("| round | shape | amax before GB/s | amax after GB/s | GEMV GB/s | GEMV / amax |\n| --- | --- | --- | --- | --- | --- |")
    for layers, x, _ in sets.values():
        layers[0](x)  # warm-up: the kernels are loaded (or built) on the first call
    steady_runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sets}  # (amax, GEMV / amax)
    before = read_bandwidth(repeats=3, buf=buf)
    for i in range(args.rounds):
        for name, (layers, x, nbytes) in sets.items():
            started = time.perf_counter()
            for layer in layers:
                layer(x)
            gemv = nbytes / (time.perf_counter() - started)
            after = read_bandwidth(repeats=3, buf=buf)
            ratio = gemv / ((before + after) / 2)
            steady = _steady(before, after)
            if steady:
                steady_runs[name].append(((before + after) / 2, ratio))
            print(f"| {i + 1} | {name} | {before / 1e9:.1f} | {after / 1e9:.1f} | {gemv / 1e9:.1f} | "
                  f"{ratio:.0%}{'' if steady else ' (state changed)'} |", flush=True)
            before = after
    # The host's two states (~33 and ~60 GB/s on the Zen 4 host, in runs of tens of seconds) are
    # summarised apart, split midway between the lowest and the highest reading of the whole run.
    readings = [amax for kept in steady_runs.values() for amax, _ in kept]
    split = (min(readings) + max(readings)) / 2 if readings else 0.0
    for name, kept in steady_runs.items():
        print(f"{name}: {args.rounds - len(kept)} of {args.rounds} runs left out (state changed)")
        for state, part in (("below", [k for k in kept if k[0] < split]), ("above", [k for k in kept if k[0] >= split])):
            if part:
                print(f"{name}, amax {state} {split / 1e9:.1f} GB/s ({len(part)} runs, {min(part)[0] / 1e9:.1f}-"
                      f"{max(part)[0] / 1e9:.1f}): GEMV / amax median {statistics.median(r for _, r in part):.0%}")
    return 0


def _shape(text: str) -> tuple[int, int]:
    out_f, _, in_f = text.lower().partition("x")
    if not (out_f.isdigit() and in_f.isdigit() and int(out_f) > 0 and int(in_f) > 0):
        raise argparse.ArgumentTypeError(f"expected OUTxIN, two positive integers such as 4096x11008, got {text!r}")
    return int(out_f), int(in_f)


def _positive(text: str) -> int:
    if (n := int(text)) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def run_prefill(args: argparse.Namespace) -> int:
    """A prompt of `--tokens` random ids through the bf16 and the int8 model, alternated
    `--rounds` times in one process: the bench's `direct` times the two minutes apart, which on
    this shared machine moved the ratio by up to 0.2."""
    torch.set_num_threads(args.threads)
    int8_dir, _ = ensure_int8(args.model, args.cache_root / "int8", QuantConfig())
    models = {"bf16": _load(args.model), "int8": _load(int8_dir)}
    ids = torch.randint(100, models["bf16"].config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in [*models.items()] * (args.rounds + 1):
        times[name].append(_prefill_s(model, ids))
    print(f"{args.model} vs {int8_dir}, threads {args.threads}, {args.tokens} tokens (first round: warm-up)")
    for name, t in times.items():
        print(f"{name}: {' '.join(f'{x:.2f}' for x in t[1:])} s, median {statistics.median(t[1:]):.2f} s")
    print(f"int8/bf16 time: {statistics.median(times['int8'][1:]) / statistics.median(times['bf16'][1:]):.3f}")
    return 0


@torch.inference_mode()
def _prefill_s(model: PreTrainedModel, ids: torch.Tensor) -> float:
    started = time.perf_counter()
    model(input_ids=ids, past_key_values=kv_cache.new_cache(model.config), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - started


def _steady(before: float, after: float) -> bool:
    return abs(after - before) <= STEADY * max(before, after)


def _median_s(f: Callable, repeats: int = 51) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        f()
        times.append(time.perf_counter() - started)
    return sorted(times)[repeats // 2]


def _load(folder: Path) -> PreTrainedModel:
    """An int8 folder (launch.quantize) or a bf16 one, with the attention and layers the workers use."""
    if (folder / MANIFEST).is_file():
        model = load_int8(folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    return decode_layer.use(attention.use(model))


def bench_model(src: Path, args: argparse.Namespace) -> dict:
    out: dict = {}
    int8_dir, made = ensure_int8(src, args.cache_root / "int8", QuantConfig())
    runs: dict[str, list[dict]] = {"bfloat16": [], "int8": []}
    spawn = multiprocessing.get_context("spawn")
    for _ in range(args.processes):
        for kind, each in runs.items():
            # Each in a process of its own, as a worker serves it: loaded into a heap where a 12 GB
            # bf16 model had just been freed, ChatGLM3-6B int8 decoded 3% slower than loaded first
            # (4.26-4.31 vs 4.38-4.47 tok/s, both in one process, alternated; docs/int8.md, session 14).
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                each.append(pool.submit(bench_dtype, int8_dir if kind == "int8" else src, args.threads,
                                        args.new_tokens, args.prefill_tokens).result())
    for kind, each in runs.items():
        out[kind] = each[0] if len(each) == 1 else across_processes(each)
    out["int8_vs_bf16_decode"] = round(out["int8"]["decode_tok_s"] / out["bfloat16"]["decode_tok_s"], 2)
    out["int8_vs_bf16_prefill_time"] = round(out["int8"]["prefill_s"] / out["bfloat16"]["prefill_s"], 2)
    out["int8_dir"], out["quantized_now"] = str(int8_dir), made
    return out


def across_processes(each: list[dict]) -> dict:
    """One summary of bench_dtype() run in several processes, each kept under "processes".

    One process's number is a draw: the same int8 Qwen-7B made 71.6-76.6% of the bound in 12
    processes within an hour (69% in another that morning), its three runs mostly within 2.5
    points of each other in each (docs/int8.md, session 15)."""
    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in each), 3)  # of an even count: a mean, unrounded

    bounds = [r["of_bound"] for r in each if r["of_bound"] is not None]
    return {"weight_bytes_per_token": each[0]["weight_bytes_per_token"], "load_s": median("load_s"),
            "read_huge_pages": min(r["read_huge_pages"] for r in each),
            "decode_tok_s": median("decode_tok_s"), "decode_median_tok_s": median("decode_median_tok_s"),
            "prefill_s": min(r["prefill_s"] for r in each), "read_GBps": median("read_GBps"),
            "bound_tok_s": median("bound_tok_s"), "of_bound": statistics.median(bounds) if bounds else None,
            "processes": each}


def bench_dtype(folder: Path, threads: int, new_tokens: int, prefill_tokens: int) -> dict:
    """Speed and bound of the model in `folder` (bf16, or an int8 folder), in this process."""
    torch.set_num_threads(threads)
    shared_read_buffer()  # before the model (see there)
    started = time.perf_counter()
    model = _load(folder)
    r = {"load_s": round(time.perf_counter() - started, 2), "weight_bytes_per_token": weight_bytes_per_token(model)}
    # The host's read bandwidth jumps between ~33 and ~60 GB/s every few tens of seconds
    # (docs/int8.md), so it is read right before and after every decode run, and each run is
    # held against the mean of its two readings: a median over the whole phase can pair runs
    # from one window with a bandwidth from the other.
    r["read_huge_pages"] = round(huge_page_share(shared_read_buffer()), 2)
    reads = [read_bandwidth()]
    r |= speed(model, new_tokens, prefill_tokens, after_run=lambda: reads.append(read_bandwidth()))
    r["read_GBps_each"] = [round(b / 1e9, 1) for b in reads]
    r["read_GBps"] = round(statistics.median(reads) / 1e9, 1)
    r["bound_tok_s"] = round(r["read_GBps"] * 1e9 / r["weight_bytes_per_token"], 2)
    bounds = [(a + b) / 2 / r["weight_bytes_per_token"] for a, b in zip(reads, reads[1:])]
    r["of_bound_each"] = [round(rate / bound, 4) for rate, bound in zip(r["decode_tok_s_each"], bounds)]
    r["steady_each"] = [_steady(a, b) for a, b in zip(reads, reads[1:])]
    steady = [ratio for ratio, ok in zip(r["of_bound_each"], r["steady_each"]) if ok]
    r["of_bound"] = statistics.median(steady) if steady else None  # None: the state changed in every run
    return r


@torch.inference_mode()
def speed(model: PreTrainedModel, new_tokens: int, prefill_tokens: int, runs: int = 3,
          after_run: Callable[[], object] = lambda: None) -> dict:
    """Decode: `runs` generations of `new_tokens` after a 16-token prompt (`after_run` called
    after each), the median run's tokens/s (and the median single step over all runs).
    Prefill: the best of `runs`."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, vocab, (16,), generator=g).tolist()
    greedy = Sampling(max_new_tokens=new_tokens, temperature=0)  # no stop ids: EOS ignored
    for _ in generate(model, prompt, Sampling(max_new_tokens=2, temperature=0)):
        pass  # warm-up: oneDNN primitive creation, first-touch of weights
    rates, steps = [], []
    for _ in range(runs):
        stamps = [time.perf_counter() for _ in generate(model, prompt, greedy)]
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))  # after the first token: decode only
        # On a shared machine one preempted thread stalls a whole step; the median step shows
        # the model without those stalls, the run's tokens/s with them.
        steps += [b - a for a, b in zip(stamps, stamps[1:])]
        after_run()
    long = torch.randint(100, vocab, (1, prefill_tokens), generator=g)
    prefill = [_prefill_s(model, long) for _ in range(runs)]
    return {"decode_tok_s": round(sorted(rates)[runs // 2], 2), "decode_tok_s_each": [round(x, 2) for x in rates],
            "decode_median_tok_s": round(1 / sorted(steps)[len(steps) // 2], 2),
            "prefill_s": round(min(prefill), 3), "prefill_s_each": [round(x, 3) for x in prefill]}


def weight_bytes_per_token(model: PreTrainedModel) -> int:
    """Bytes of weights one decode step reads: every tensor once, the input embedding only as
    one row (unless a tied lm_head reads the same table anyway)."""
    emb = model.get_input_embeddings()
    emb_ptrs = {t.data_ptr() for t in [*emb.parameters(), *emb.buffers()]}
    head = model.get_output_embeddings()
    head_ptrs = {t.data_ptr() for t in [*head.parameters(), *head.buffers()]} if head is not None else set()
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.data_ptr()
        if ptr in seen or (ptr in emb_ptrs and ptr not in head_ptrs):
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


def read_bandwidth(repeats: int = 8, buf: torch.Tensor | None = None) -> float:
    """Best observed bytes/s of a multi-threaded reduction over a buffer far larger than cache
    (`shared_read_buffer()` unless given)."""
    if buf is None:
        buf = shared_read_buffer()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buf.amax()
        best = min(best, time.perf_counter() - started)
    return buf.numel() * 4 / best


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


def read_buffer(gib: float = 1.0) -> torch.Tensor:
    """Random float32s for read_bandwidth(), on 2 MiB pages where the kernel allows (transparent
    huge pages "always" or "madvise"). On 4 KiB pages amax's TLB misses keep it 10-40% under
    what the memory delivers (Intel Xeon, session 13: 21.8-29 vs 31.5-33 GB/s in the same
    minutes), and a bound read that way would flatter every ratio to it."""
    nbytes = int(gib * (1 << 30)) // HUGE_PAGE * HUGE_PAGE
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    buf = raw[(-raw.data_ptr()) % HUGE_PAGE:][:nbytes]  # a view: keeps `raw` alive
    # Before the first touch: pages already there stay 4 KiB. A kernel without THP refuses
    # (EINVAL), and the buffer stays on 4 KiB pages, as huge_page_share() then shows.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(nbytes), MADV_HUGEPAGE)
    return buf.view(torch.float32).uniform_()  # random: no page can be shared with another


@functools.cache
def shared_read_buffer() -> torch.Tensor:
    """1 GiB of read_buffer(), allocated once per process: first, before any model, since
    later the memory is more fragmented and fewer of its pages can be huge (an int8 model
    loaded after a bf16 one, session 13: 79% of them, and amax 28-30 GB/s instead of 30-34)."""
    return read_buffer()


def huge_page_share(t: torch.Tensor) -> float:
    """The share of the memory mapping holding `t` that sits on transparent huge pages (Linux:
    /proc/self/smaps), 0.0 where that cannot be read."""
    addr, mapping = t.data_ptr(), None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    mapping = (hi - lo) if lo <= addr < hi else None
                elif mapping and line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024 / mapping
    except OSError:
        pass
    return 0.0


def synth_model(kind: str, cache_root: Path) -> Path:
    """A random bf16 checkpoint in the native transformers layout with the real shapes,
    written tensor by tensor (a 7B model is never in memory whole)."""
    from launch.convert import ShardWriter

    from launch.quantize import _empty_model

    if kind not in SYNTH:
        raise SystemExit(f"unknown synthetic model {kind!r}; choose from {sorted(SYNTH)}")
    out = cache_root / "synth" / kind
    if (out / "done").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(**SYNTH[kind])
    config.save_pretrained(out)
    skeleton = _empty_model(config)
    g = torch.Generator().manual_seed(0)
    # Shards and the index transformers looks for (without the index it finds no weights).
    writer = ShardWriter(out)
    for name, p in skeleton.named_parameters():
        if p.dim() == 1:
            t = torch.ones(p.shape, dtype=torch.bfloat16) if "norm" in name else torch.zeros(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
        writer.add(name, t)
    writer.finish()
    (out / "done").write_text("ok\n")
    return out


# --- quality on real weights -----------------------------------------------------------------

QUALITY_PROMPTS_FILE = Path(__file__).resolve().parent.parent / "conf" / "eval" / "seed-en.yaml"


@torch.inference_mode()
def quality(src: Path, cache_root: Path, answer_tokens: int = 64) -> dict:
    """int8 vs bf16 teacher-forced on bf16's own greedy answers to the English seed questions.

    Both execution paths of the int8 model are scored: the whole sequence in one forward
    (the prefill kernel) and token by token on a KV cache (the decode kernel), for both
    choices of `quant_lm_head` (a model's conf picks one). The bf16 decode-vs-prefill agreement
    is the noise floor: bf16 disagrees with itself that often."""
    from transformers import AutoTokenizer

    from eval.questions import load_question_set

    tok = AutoTokenizer.from_pretrained(src)
    ref = _load(src)
    greedy = Sampling(max_new_tokens=answer_tokens, temperature=0)
    prompts, bf16_answers = [], []
    for q in load_question_set(QUALITY_PROMPTS_FILE).questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q.prompt}], add_generation_prompt=True, return_dict=True)["input_ids"]
        prompts.append((q.id, ids))
        bf16_answers.append(list(generate(ref, ids, greedy)))
    seqs = [(torch.tensor([ids + answer]), len(ids)) for (_, ids), answer in zip(prompts, bf16_answers)]

    def whole(m):
        return lambda s: m(input_ids=s).logits[0].float()

    def stepwise(m):
        def run(s):
            cache = kv_cache.new_cache(m.config)
            return torch.cat([m(input_ids=s[:, i : i + 1], past_key_values=cache, use_cache=True).logits[0].float()
                              for i in range(s.shape[1])])
        return run

    reference = [whole(ref)(s) for s, _ in seqs]
    out = {"tokens": sum(s.shape[1] - p for s, p in seqs),
           "bf16_decode_path_noise_floor": agreement(reference, seqs, stepwise(ref)), "variants": {}}
    for name, config in (("quant_lm_head: true (int8 lm_head and embeddings)", QuantConfig()),
                         ("quant_lm_head: false (bf16 lm_head and embeddings)", QuantConfig(lm_head=False, embeddings=False))):
        q8 = _load(ensure_int8(src, cache_root / "int8", config)[0])
        answers = {}
        for (qid, ids), bf in zip(prompts, bf16_answers):
            i8 = list(generate(q8, ids, greedy))
            answers[qid] = {"bf16": tok.decode(bf), "int8": tok.decode(i8), "same": bf == i8}
        out["variants"][name] = {
            "int8_prefill_path": agreement(reference, seqs, whole(q8)),
            "int8_decode_path": agreement(reference, seqs, stepwise(q8)),
            "greedy_answers_identical": f"{sum(a['same'] for a in answers.values())}/{len(answers)}",
            "answers": answers,
        }
        del q8
    return out


def agreement(reference: list[torch.Tensor], seqs: list, logits_of: Callable) -> dict:
    """Top-1 agreement and mean KL(bf16 || candidate) over the answer positions."""
    agree = n = 0
    kl = 0.0
    for ref_logits, (s, prompt_len) in zip(reference, seqs):
        a, b = ref_logits[prompt_len - 1 : -1], logits_of(s)[prompt_len - 1 : -1]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
        kl += float(F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="sum"))
    return {"top1": round(agree / n, 4), "mean_kl": round(kl / n, 5)}


def print_table(results: dict) -> None:
    print(f"\nthreads {results['threads']}")
    print("| model | dtype | weights GB/token | decode tok/s | median step tok/s | bound tok/s (read GB/s) | of bound | "
          f"prefill {results['prefill_tokens']} s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec, r in results["models"].items():
        for kind in ("bfloat16", "int8"):
            x = r[kind]
            if "processes" in x:  # each process's median
                each = "processes: " + ", ".join("n/a" if p["of_bound"] is None else f"{p['of_bound']:.0%}" for p in x["processes"])
            else:
                each = ", ".join(f"{b:.0%}{'' if ok else '*'}" for b, ok in zip(x["of_bound_each"], x["steady_each"]))
            of_bound = "n/a" if x["of_bound"] is None else f"{x['of_bound']:.0%}"
            print(f"| {spec} | {kind} | {x['weight_bytes_per_token'] / 1e9:.2f} | {x['decode_tok_s']} | "
                  f"{x.get('decode_median_tok_s', '')} | "
                  f"{x['bound_tok_s']} ({x['read_GBps']}) | {of_bound} ({each}) | {x['prefill_s']} |")
        print(f"| {spec} | int8/bf16 | | {r['int8_vs_bf16_decode']}x | | | | {r['int8_vs_bf16_prefill_time']}x time |")
    print(f"of bound: the median of the runs whose bandwidth read before and after differs by at most {STEADY:.0%}; "
          "* marks a run during which the host changed state (left out); with --processes, the median of the processes' medians")
    if "quality" in results:
        q = results["quality"]
        print(f"\nquality over {q['tokens']} answer tokens (bf16 decode vs prefill path, the noise floor: "
              f"{q['bf16_decode_path_noise_floor']})")
        print("| int8 variant | prefill path top-1 (mean KL) | decode path top-1 (mean KL) | greedy answers identical |")
        print("| --- | --- | --- | --- |")
        for name, v in q["variants"].items():
            a, b = v["int8_prefill_path"], v["int8_decode_path"]
            print(f"| {name} | {a['top1']:.2%} ({a['mean_kl']}) | {b['top1']:.2%} ({b['mean_kl']}) | {v['greedy_answers_identical']} |")

if __name__ == "__main__":
    sys.exit(main())
