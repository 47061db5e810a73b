"""ChatGLM3 and Qwen through the whole stack: tiny checkpoints in the ORIGINAL layout
(launch.synth), converted by `make up`'s code path, served and asked through the API.

Each comes twice: with random weights, and with weights made to answer a stop token first
(not the EOS: ChatGLM3's <|user|>, Qwen's <|im_end|>), which proves generation stops there."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from launch import synth
from tests.conftest import Stack, make_conf

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, what is 2+2?"}]


def always_stop(prefix: str, vocab: int, hidden: int, stop: int, names: tuple[str, str, str]) -> dict:
    """Weights whose every next token is `stop`: a large constant in hidden dim 0 of every
    embedding survives two tiny layers, the final norm keeps only dim 0, and only the stop
    token's output row reads it."""
    embed, norm, head = names
    e = torch.randn(vocab, hidden) * 0.02
    e[:, 0] = 100.0
    g = torch.zeros(hidden)
    g[0] = 1.0
    w = torch.zeros(vocab, hidden)
    w[stop, 0] = 10.0
    return {f"{prefix}{embed}": e, f"{prefix}{norm}": g, f"{prefix}{head}": w}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("originals")
    glm_dims, qwen_dims = synth.TINY["chatglm3-6b"], synth.TINY["qwen-7b-chat"]
    synth.write_chatglm3(tmp / "glm", shards=2, **glm_dims)
    synth.write_chatglm3(tmp / "glm-stop", shards=2, **glm_dims, tensors=always_stop(
        "transformer.", 65024, glm_dims["hidden_size"], 64795,
        ("embedding.word_embeddings.weight", "encoder.final_layernorm.weight", "output_layer.weight")))
    synth.write_qwen(tmp / "qwen", shards=2, **qwen_dims)
    synth.write_qwen(tmp / "qwen-stop", shards=2, **qwen_dims, tensors=always_stop(
        "", 151936, qwen_dims["hidden_size"], 151645, ("transformer.wte.weight", "transformer.ln_f.weight",
                                                       "lm_head.weight")))
    models = {}
    for name, kind, template, folder in [
        ("glm-tiny", "chatglm3-6b", "chatglm3", "glm"), ("glm-tiny-stop", "chatglm3-6b", "chatglm3", "glm-stop"),
        ("qwen-tiny", "qwen-7b-chat", "qwen-7b-chat", "qwen"), ("qwen-tiny-stop", "qwen-7b-chat", "qwen-7b-chat", "qwen-stop"),
    ]:
        models[name] = {"name": name, "source": {"kind": kind, "path": str(tmp / folder)}, "template": template,
                        "threads": 1}
    s = Stack(make_conf(tmp, models=models, profile={"models": list(models)}, model_cache_dir=str(tmp / "cache")), "test")
    with s.running():
        yield s


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.api_base, api_key="none", timeout=120)


@pytest.mark.parametrize("model", ["glm-tiny", "qwen-tiny"])
def test_converted_models_answer_and_stream(client, model):
    reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # greedy: the same text both ways
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("model", ["glm-tiny-stop", "qwen-tiny-stop"])
def test_generation_ends_at_the_models_stop_token(client, model):
    reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=50, temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 1 and reply.choices[0].message.content == ""
    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, max_tokens=50, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""


def test_qwen_prompts_beyond_8192_tokens_are_refused_with_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="qwen-tiny", messages=[{"role": "user", "content": "你好 " * 5000}])
    assert "maximum context length is 8192" in str(err.value) and "tokens" in str(err.value)


def test_converted_folders_live_in_the_model_cache(stack):
    cache = Path(stack.settings["model_cache_dir"])
    for kind in ("chatglm3-6b", "qwen-7b-chat"):  # one folder per source: plain and -stop each
        assert len(list((cache / "models" / kind).glob("native-*/*.safetensors"))) == 2
