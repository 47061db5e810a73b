"""`python -m eval.bench gateway`: the OpenAI gateway under load, and what it costs per token.

    python -m eval.bench gateway [--concurrency 16] [--duration 60] [--model smollm2-135m]
                                 [--base-url http://127.0.0.1:8000/v1] [--controller http://127.0.0.1:21001]

1. Overhead at concurrency 1: the same greedy request streamed straight from the worker
   (FastChat's worker protocol) and through the gateway, interleaved; the ratio of the two
   tokens/s (both runs produce the same tokens, so it is a ratio of times). Target >= 0.95.
2. Load: `--concurrency` clients stream chat answers for `--duration` seconds; errors, time to
   first token (p50/p95) and aggregate completion tokens/s (counted by the model's tokenizer
   through the gateway's /api/v1/token_check, after the load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import openai
import requests

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def add_parser(sub) -> None:
    g = sub.add_parser("gateway", help="gateway overhead at concurrency 1, then a load test through the OpenAI API")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    g.add_argument("--controller", default="http://127.0.0.1:21001")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--api-key", default=(os.environ.get("LLMD_API_KEYS") or "none").split(",")[0])
    g.add_argument("--concurrency", type=int, default=16)
    g.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the overhead measurement")
    g.add_argument("--json", type=Path, help="also write the results here")
    g.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=300, max_retries=0)
    results = {"model": args.model, "overhead": overhead(client, args), "load": load(client, args)}
    print(json.dumps(results, indent=1))
    o, lo = results["overhead"], results["load"]
    print(f"\ngateway/direct tokens/s at concurrency 1: {o['ratio']:.3f} "
          f"(direct {o['direct_tokens_per_s']:.1f}, gateway {o['gateway_tokens_per_s']:.1f} tok/s)")
    print(f"load, {args.concurrency} streams for {args.duration:.0f}s: {lo['requests']} answers, {lo['errors']} errors, "
          f"TTFT p50 {lo['ttft_p50_s']:.2f}s p95 {lo['ttft_p95_s']:.2f}s, {lo['tokens_per_s']:.1f} tok/s aggregate")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if lo["errors"] else 0


def overhead(client: openai.OpenAI, args: argparse.Namespace) -> dict:
    worker = requests.post(args.controller + "/get_worker_address", json={"model": args.model}, timeout=10).json()["address"]
    prompt = chat_prompt(worker, PROMPT)
    # The worker gets exactly the prompt string the gateway passes on for a completion request.
    params = {"model": args.model, "prompt": prompt, "temperature": 0, "max_new_tokens": args.max_tokens, "echo": False}
    direct, via, tokens = [], [], 0
    for _ in range(args.rounds):
        start = time.perf_counter()
        with requests.post(worker + "/worker_generate_stream", json=params, stream=True, timeout=300) as r:
            last = [c for c in r.iter_lines(delimiter=b"\0") if c][-1]
        direct.append(time.perf_counter() - start)
        tokens = json.loads(last)["usage"]["completion_tokens"]
        start = time.perf_counter()
        for _ in client.completions.create(model=args.model, prompt=prompt, temperature=0, max_tokens=args.max_tokens,
                                           stream=True):
            pass
        via.append(time.perf_counter() - start)
    d, g = statistics.median(direct), statistics.median(via)
    return {"tokens": tokens, "direct_s": d, "gateway_s": g, "direct_tokens_per_s": tokens / d,
            "gateway_tokens_per_s": tokens / g, "ratio": d / g, "rounds": args.rounds}


def chat_prompt(worker: str, user: str) -> str:
    """The model's own chat prompt for one user message, from the worker's template."""
    from fastchat.conversation import Conversation, SeparatorStyle

    conv = requests.post(worker + "/worker_get_conv_template", timeout=10).json()["conv"]
    conv = Conversation(name=conv["name"], system_template=conv["system_template"], system_message=conv["system_message"],
                        roles=conv["roles"], messages=[], offset=0, sep_style=SeparatorStyle(conv["sep_style"]),
                        sep=conv["sep"], sep2=conv["sep2"], stop_str=conv["stop_str"], stop_token_ids=conv["stop_token_ids"])
    conv.append_message(conv.roles[0], user)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def load(client: openai.OpenAI, args: argparse.Namespace) -> dict:
    answers, errors, ttfts = [], [], []
    lock = threading.Lock()
    deadline = time.monotonic() + args.duration

    def stream_until_deadline():
        while time.monotonic() < deadline:
            start, first, text = time.perf_counter(), None, []
            try:
                for chunk in client.chat.completions.create(
                    model=args.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=args.max_tokens,
                    stream=True,
                ):
                    piece = chunk.choices[0].delta.content if chunk.choices else None
                    if piece:
                        first = first or time.perf_counter()
                        text.append(piece)
                with lock:
                    answers.append("".join(text))
                    if first:
                        ttfts.append(first - start)
            except openai.APIError as e:
                with lock:
                    errors.append(str(e)[:200])

    started = time.perf_counter()
    threads = [threading.Thread(target=stream_until_deadline) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    tokens = sum(_count(args, a) for a in answers)
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) >= 2 else [float("nan")] * 19
    return {"concurrency": args.concurrency, "duration_s": elapsed, "requests": len(answers), "errors": len(errors),
            "error_samples": errors[:5], "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_p95_s": q[18], "completion_tokens": tokens, "tokens_per_s": tokens / elapsed}


def _count(args: argparse.Namespace, text: str) -> int:
    body = {"prompts": [{"model": args.model, "prompt": text, "max_tokens": 0}]}
    r = requests.post(args.base_url.removesuffix("/v1") + "/api/v1/token_check", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {args.api_key}"})
    return r.json()["prompts"][0]["tokenCount"]
