"""The API gateway: keys on every route, and a table of bad requests with the status and
message a client can act on, in OpenAI's error shape. A real stack with a keys file."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.conftest import Stack, make_conf

KEY = "sk-test-0123456789"
MODEL = "smollm2-135m"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    (tmp / "api-keys").write_text(f"# one key per line\n{KEY}\n")
    s = Stack(make_conf(tmp, api={"keys_file": str(tmp / "api-keys")}, profile={"models": [MODEL]}), "test")
    s.env["LLMD_API_KEYS"] = "sk-from-env"
    with s.running():
        yield s


def post(stack, path, body=None, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(stack.api_base.removesuffix("/v1") + path, json=body, headers=headers | kw.pop("headers", {}),
                         timeout=120, **kw)


def openai_error(r) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"), ("POST", "/api/v1/chat/completions"), ("POST", "/api/v1/token_check"),
    ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/metrics"),
])
@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_every_route_but_health_needs_a_key(stack, method, path, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = requests.request(method, stack.api_base.removesuffix("/v1") + path, headers=headers, json={}, timeout=10)
    assert r.status_code == 401
    assert openai_error(r)["code"] == "invalid_api_key"


def test_health_is_open_and_keys_come_from_file_and_env(stack):
    r = requests.get(stack.api_base.removesuffix("/v1") + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["models"] == [MODEL]
    [worker] = r.json()["workers"].values()
    assert worker["models"] == [MODEL] and worker["queue_length"] in (0, 1)
    for key in (KEY, "sk-from-env"):
        assert [m.id for m in openai.OpenAI(base_url=stack.api_base, api_key=key).models.list()] == [MODEL]


def test_keys_never_reach_the_logs(stack):
    post(stack, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 2})
    post(stack, "/v1/models", key="sk-wrong-key-in-logs?")
    logs = "".join(p.read_text(errors="replace") for p in stack.run_dir.glob("logs/**/*.log"))
    assert KEY not in logs and "sk-from-env" not in logs and "sk-wrong-key-in-logs" not in logs


BAD = [  # (body, status, field named, words in the message)
    ({"model": "gpt-4", "messages": HELLO}, 404, "model", ["'gpt-4' does not exist", MODEL]),
    ({"model": MODEL, "messages": HELLO, "temperature": -1}, 400, "temperature", ["temperature"]),
    ({"model": MODEL, "messages": HELLO, "temperature": "hot"}, 400, "temperature", ["temperature"]),
    ({"model": MODEL, "messages": HELLO, "max_tokens": 0}, 400, "max_tokens", ["max_tokens"]),
    ({"model": MODEL, "messages": HELLO, "top_p": 7}, 400, "top_p", ["top_p"]),
    ({"model": MODEL, "messages": []}, 400, "messages", ["at least one message"]),
    ({"model": MODEL, "messages": HELLO, "n": 40}, 400, "n", ["at most 4 choices"]),
    ({"model": MODEL}, 400, "messages", ["messages", "required"]),
    ({"messages": HELLO}, 400, "model", ["model", "required"]),
    ({"model": MODEL, "messages": "x" * 1_000_000}, 400, None, ["maximum context length is 8192", "tokens"]),
]


@pytest.mark.parametrize("body, status, param, words", BAD, ids=[
    "unknown-model", "negative-temperature", "temperature-type", "zero-max-tokens", "top-p-range",
    "empty-messages", "n-40", "no-messages", "no-model", "1MB-prompt"])
def test_bad_chat_requests(stack, body, status, param, words):
    r = post(stack, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = openai_error(r)
    assert err["param"] == param
    for w in words:
        assert w.lower() in err["message"].lower(), err["message"]


@pytest.mark.parametrize("data, content_type", [
    (b'{"model": "smollm2-135m", "messages": [', "application/json"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "application/json"),
    (b"model=smollm2-135m", "application/x-www-form-urlencoded"),
    (b'{"model": "smollm2-135m", "messages": []}', "text/plain"),
], ids=["malformed-json", "invalid-utf8", "form-body", "text-plain"])
def test_malformed_bodies_are_400_not_500(stack, data, content_type):
    r = post(stack, "/v1/chat/completions", data=data, headers={"Content-Type": content_type})
    assert r.status_code == 400, r.text
    openai_error(r)


def test_huge_max_tokens_is_clamped_not_refused(stack):
    r = post(stack, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 10**9, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_a_model_whose_workers_are_all_down_is_503(stack):
    sup = stack.supervisor()
    sup.rpc.stopProcess(f"worker-{MODEL}")
    try:
        requests.post(stack.controller_url + "/refresh_all_workers", timeout=10)
        r = post(stack, "/v1/chat/completions", {"model": MODEL, "messages": HELLO})
        assert r.status_code == 503, r.text
        assert "no worker of model 'smollm2-135m' is up" in openai_error(r)["message"]
        assert "Traceback" not in r.text
    finally:
        sup.rpc.startProcess(f"worker-{MODEL}")
        stack.up()


def test_metrics(stack):
    client = openai.OpenAI(base_url=stack.api_base, api_key=KEY)
    list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0, stream=True))
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0)
    post(stack, "/v1/chat/completions", {"model": "gpt-4", "messages": HELLO})
    r = requests.get(stack.api_base.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    text = r.text
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    line = lambda prefix: next(float(l.split()[-1]) for l in text.splitlines() if l.startswith(prefix))  # noqa: E731
    assert line(f'llmd_requests_total{{model="{MODEL}",route="/v1/chat/completions",status="200"}}') >= 2
    assert line('llmd_requests_total{model="gpt-4",route="/v1/chat/completions",status="404"}') >= 1
    assert line(f'llmd_generated_tokens_total{{model="{MODEL}"}}') >= 10
    assert line(f'llmd_time_to_first_token_seconds_count{{model="{MODEL}"}}') >= 1
    assert line(f'llmd_time_per_output_token_seconds_count{{model="{MODEL}"}}') >= 1
    assert line(f'llmd_worker_queue_length{{model="{MODEL}"') >= 0  # as fresh as the controller's last probe
