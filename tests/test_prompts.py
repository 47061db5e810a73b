"""The same conversation becomes the same prompt through the API and through the web UI,
and that prompt is the one the model's own chat template produces."""

from __future__ import annotations

import asyncio

import pytest
import requests
from transformers import AutoTokenizer

from launch import config, templates
from launch.prepare import prepare

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def api_prompt(stack, model: str, messages: list[dict]) -> str:
    """What FastChat's API server sends the worker: template fetched from the running worker."""
    from fastchat.serve import openai_api_server

    worker = requests.post(stack.controller_url + "/get_worker_address", json={"model": model}, timeout=5).json()["address"]
    params = asyncio.run(openai_api_server.get_gen_params(
        model, worker, messages, temperature=0.7, top_p=1.0, top_k=-1, presence_penalty=0.0,
        frequency_penalty=0.0, max_tokens=64, echo=False, stop=None,
    ))
    return params["prompt"]


def web_prompt(deployment, model: str, messages: list[dict]) -> str:
    """What FastChat's web UI sends: template chosen by model name, turns appended as its
    add_text / bot_response handlers do."""
    from fastchat.serve.gradio_web_server import State

    templates.use_for_models({m.name: m.template for m in deployment.models})
    state = State(model)
    for m in messages:
        role = state.conv.roles[0] if m["role"] == "user" else state.conv.roles[1]
        state.conv.append_message(role, m["content"])
    state.conv.append_message(state.conv.roles[1], None)
    return state.conv.get_prompt()


@pytest.fixture(scope="module")
def deployment(demo_stack):
    return config.load(demo_stack.conf, demo_stack.profile)


def test_api_and_web_build_the_same_prompt(demo_stack, deployment):
    for model in deployment.models:
        api, web = api_prompt(demo_stack, model.name, CONVERSATION), web_prompt(deployment, model.name, CONVERSATION)
        assert api == web
        assert api.count("France") == 2 and api.endswith("And of Italy?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("with_system", [False, True])
def test_prompt_is_the_models_own_chat_template(demo_stack, deployment, with_system):
    messages = ([{"role": "system", "content": "Answer briefly."}] if with_system else []) + CONVERSATION
    for model in deployment.models:
        tokenizer = AutoTokenizer.from_pretrained(prepare(model, deployment.stack.model_cache_dir))
        own = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert api_prompt(demo_stack, model.name, messages) == own
