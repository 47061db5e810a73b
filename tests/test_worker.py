"""The worker's generation on the real SmolLM2 weights, in process."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from launch import config
from launch.generate import Sampling, generate
from launch.prepare import prepare
from launch.worker import ModelWorker, parse_args
from tests.conftest import ROOT

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def model_dir():
    d = config.load(ROOT / "conf", "demo")
    return prepare(d.models[0], d.stack.model_cache_dir)


@pytest.fixture(scope="module")
def worker(model_dir):
    return ModelWorker(parse_args(["--model-dir", str(model_dir), "--name", "smollm2-135m", "--template", "smollm2",
                                   "--context-length", "64", "--port", "1"]))


def chunks(worker, **params) -> list[dict]:
    return [json.loads(b[:-1]) for b in worker.generate_stream_gate({"prompt": PROMPT, "echo": False} | params)]


def test_greedy_loop_matches_transformers_generate(model_dir, worker):
    ids = worker.encode(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ours = list(generate(model, ids, Sampling(max_new_tokens=30, temperature=0)))  # no stop ids: 30 tokens
    theirs = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                            min_new_tokens=30)[0, len(ids):].tolist()
    assert ours == theirs


def test_sampling_controls(worker):
    ids = worker.encode(PROMPT)
    greedy = list(generate(worker.model, ids, Sampling(max_new_tokens=12, temperature=0)))
    assert list(generate(worker.model, ids, Sampling(max_new_tokens=12, temperature=1.5, top_k=1))) == greedy
    assert list(generate(worker.model, ids, Sampling(max_new_tokens=12, temperature=1.5, top_p=1e-6))) == greedy
    hot = Sampling(max_new_tokens=12, temperature=1.5, seed=7)
    assert list(generate(worker.model, ids, hot)) == list(generate(worker.model, ids, hot))
    other = Sampling(max_new_tokens=12, temperature=1.5, seed=8)
    assert list(generate(worker.model, ids, hot)) != list(generate(worker.model, ids, other))


def test_sample_keeps_the_top_p_and_top_k_support_with_the_right_odds():
    from launch.generate import sample

    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    history = torch.tensor([], dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    draws = [sample(logits, history, Sampling(temperature=1.0, top_p=0.8), g) for _ in range(4000)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 reach top_p: the rest is cut
    assert abs(draws.count(0) / len(draws) - 0.5 / 0.8) < 0.03
    draws = [sample(logits, history, Sampling(temperature=1.0, top_k=3), g) for _ in range(4000)]
    assert set(draws) == {0, 1, 2} and abs(draws.count(2) / len(draws) - 0.15 / 0.95) < 0.03


def test_stream_stops_at_the_stop_token(worker):
    out = chunks(worker, temperature=0, max_new_tokens=40)
    assert out[-1]["finish_reason"] == "stop" and "Paris" in out[-1]["text"]
    assert "<|im_end|>" not in out[-1]["text"]
    texts = [c["text"] for c in out]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "streamed text must only grow"


def test_stop_string_is_never_shown_even_in_part(worker):
    out = chunks(worker, temperature=0, max_new_tokens=40, stop=["Paris"])
    assert out[-1]["finish_reason"] == "stop"
    assert out[-1]["text"].endswith("France is ")
    assert not any(c["text"].endswith(("P", "Pa", "Par", "Pari")) for c in out)


def test_prompt_beyond_the_context_is_refused_with_both_numbers(worker):
    out = chunks(worker, prompt=PROMPT * 8)
    assert out[-1]["error_code"] == 40303
    assert "this model's context is 64 tokens" in out[-1]["text"] and "prompt is 1" in out[-1]["text"]


def test_max_new_tokens_is_clamped_to_the_context(worker):
    # A prompt that leaves 3 tokens of the 64-token context: too few for the answer to end.
    words = "Describe Paris in detail"
    while len(worker.encode(PROMPT.replace("What is the capital of France?", words))) < 61:
        words += " please"
    prompt = PROMPT.replace("What is the capital of France?", words)
    assert len(worker.encode(prompt)) == 61
    out = chunks(worker, prompt=prompt, temperature=0, max_new_tokens=10_000)
    assert out[-1]["finish_reason"] == "length" and out[-1]["usage"]["total_tokens"] == 64


@pytest.mark.parametrize("params, needle", [
    ({"temperature": "hot"}, "invalid sampling parameter"),
    ({"temperature": -1}, "temperature must be at least 0"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"stop": [1, 2]}, "'stop' must be a string or a list of strings"),
    ({"prompt": None}, "'prompt' must be a string"),
])
def test_bad_parameters_are_readable_errors(worker, params, needle):
    out = chunks(worker, **params)
    assert len(out) == 1 and out[0]["error_code"] != 0 and needle in out[0]["text"]
