"""The demo stack through the official openai client, as a user calls it."""

from __future__ import annotations

import openai
import pytest

MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(demo_stack):
    return openai.OpenAI(base_url=demo_stack.api_base, api_key="none", timeout=120)


def test_models_lists_the_demo_model(client):
    assert MODEL in [m.id for m in client.models.list()]


def test_chat_answers(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens > 0


def test_chat_streams(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3, "expected the answer in several chunks"
    assert "Paris" in text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.choices[0].text.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_max_tokens_cuts_the_answer(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 2


def test_unknown_model_is_a_client_error_naming_it(client):
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert 400 <= err.value.status_code < 500
    assert "no-such-model" in str(err.value)


def test_non_ascii_streams_intact(client):
    # Echo returns the prompt itself: any escaping or byte split on the way would show.
    prompt = "Voilà: café, naïve, 你好, 🙂"
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices).startswith(prompt)


def test_the_int8_worker_answers_too(client):
    reply = client.chat.completions.create(model=f"{MODEL}-int8", messages=QUESTION, temperature=0, max_tokens=40)
    assert "Paris" in reply.choices[0].message.content
