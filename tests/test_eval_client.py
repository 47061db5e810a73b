"""The evaluation client's API-key plumbing, against a real HTTP server on a free loopback port
that behaves like the gateway with keys on: every route (FastChat's /api/v1/token_check
included) answers 401 unless `Authorization: Bearer KEY` names its key. The OpenAI client and
TokenCounter are the real ones, so the test sees the headers they actually send."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from eval import compare
from eval.client import TokenCounter, ask, default_api_key, make_client
from eval.questions import Question

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-eval-test"
MODEL = "fake-model"
CHUNKS = ["Hello", ", wor", "ld! ", "Fine."]  # 4 chunks; the fake tokenizer counts characters
TOKENS = len("".join(CHUNKS))


class Gateway(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, refuse_with: int = 401):
        self.refuse_with = refuse_with  # the gateway answers 401; a proxy in front may say 403
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization) of every request
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def paths(self, path: str) -> list[str | None]:
        with self.lock:
            return [auth for p, auth in self.seen if p == path]


class Handler(BaseHTTPRequestHandler):
    server: Gateway

    def log_message(self, *args) -> None:
        pass

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization")
        with self.server.lock:
            self.server.seen.append((self.path, auth))
        if auth == f"Bearer {KEY}":
            return True
        self._json(self.server.refuse_with, {"error": {"message": "invalid API key", "type": "invalid_request_error",
                                                       "param": None, "code": "invalid_api_key"}})
        return False

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "test"}]})
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if not self._authorized():
            return
        if self.path == "/api/v1/token_check":
            self._json(200, {"prompts": [{"fits": True, "tokenCount": len(p["prompt"]), "contextLength": 2048}
                                         for p in body["prompts"]]})
        elif self.path == "/v1/chat/completions":
            # FastChat's stream: no usage field, a few tokens per chunk.
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i, text in enumerate(CHUNKS + [""]):
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": text} if text else {},
                                      "finish_reason": None if text else "stop"}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True
        else:
            self._json(404, {"detail": "Not Found"})


@pytest.fixture
def gateway(request):
    gw = Gateway(getattr(request, "param", 401))
    t = threading.Thread(target=gw.serve_forever, daemon=True)
    t.start()
    yield gw
    gw.shutdown()
    gw.server_close()


QUESTION = Question(id="q-hello", title="hello", dimension="language", prompt="Say hello.",
                    grader={"type": "rubric", "items": [{"id": "hi", "label": "greets", "any": ["hello"]}]})


def test_token_counter_sends_the_same_key_as_the_openai_client(gateway):
    client = make_client(gateway.base_url, KEY, timeout=30)
    warnings: list[str] = []
    rec = ask(client, TokenCounter(gateway.base_url, KEY, warn=warnings.append), MODEL, QUESTION, 64, 0.0)
    assert rec.error is None and rec.content == "".join(CHUNKS)
    assert (rec.tokens_source, rec.completion_tokens) == ("tokenizer", TOKENS), rec
    sent_by_openai = gateway.paths("/v1/chat/completions")
    assert sent_by_openai and set(sent_by_openai) == {f"Bearer {KEY}"}
    assert gateway.paths("/api/v1/token_check") == sent_by_openai[:1]
    assert warnings == []


@pytest.mark.parametrize("gateway", [401, 403], indirect=True)
def test_refused_key_disables_the_counter_once_with_one_warning(gateway):
    warnings: list[str] = []
    counter = TokenCounter(gateway.base_url, "sk-wrong", warn=warnings.append)
    # Answers are counted from several threads at once.
    with ThreadPoolExecutor(4) as ex:
        counts = list(ex.map(lambda _: counter.count(MODEL, "some text"), range(12)))
    assert counts == [None] * 12 and not counter.available
    assert len(warnings) == 1, warnings
    assert f"HTTP {gateway.refuse_with}" in warnings[0] and "--api-key" in warnings[0] and "LLMD_API_KEYS" in warnings[0]
    assert set(gateway.paths("/api/v1/token_check")) == {"Bearer sk-wrong"}
    asked = len(gateway.paths("/api/v1/token_check"))
    assert 1 <= asked <= 4  # only the requests already in flight when the first refusal came
    # The answer itself still arrives (its client has the right key); tokens fall back to chunks.
    rec = ask(make_client(gateway.base_url, KEY, timeout=30), counter, MODEL, QUESTION, 64, 0.0)
    assert (rec.error, rec.tokens_source, rec.completion_tokens) == (None, "chunks", len(CHUNKS))
    assert len(gateway.paths("/api/v1/token_check")) == asked and len(warnings) == 1


def test_api_key_default_is_the_first_of_llmd_api_keys(monkeypatch):
    monkeypatch.setenv("LLMD_API_KEYS", " , sk-first ,sk-second")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-not-for-the-gateway")
    assert default_api_key() == "sk-first"
    assert compare.parse_args([]).api_key == "sk-first"
    assert compare.parse_args(["--api-key", "sk-flag"]).api_key == "sk-flag"
    monkeypatch.delenv("LLMD_API_KEYS")
    assert compare.parse_args([]).api_key == "none"
    monkeypatch.setenv("LLMD_API_KEYS", "")
    assert compare.parse_args([]).api_key == "none"


def test_compare_uses_the_key_from_llmd_api_keys_for_answers_and_token_counts(gateway, tmp_path):
    """The whole CLI, as a user with keys on runs it: `LLMD_API_KEYS=... python -m eval.compare`."""
    qs = {"name": "keys", "language": "en", "dimensions": {"language": "Language"},
          "questions": [QUESTION.model_dump()]}
    (tmp_path / "qs.yaml").write_text(yaml.safe_dump(qs, allow_unicode=True))
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "EVAL_BASE_URL")}
    env["LLMD_API_KEYS"] = f"{KEY},sk-other"
    done = subprocess.run(
        [sys.executable, "-m", "eval.compare", "--base-url", gateway.base_url, "--questions", str(tmp_path / "qs.yaml"),
         "--out", str(tmp_path / "run"), "--max-tokens", "16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "refused" not in done.stderr
    rec = json.loads((tmp_path / "run" / "answers.jsonl").read_text().splitlines()[0])
    assert (rec["tokens_source"], rec["completion_tokens"]) == ("tokenizer", TOKENS), rec
    with gateway.lock:
        assert gateway.seen and {auth for _, auth in gateway.seen} == {f"Bearer {KEY}"}, gateway.seen
    assert gateway.paths("/api/v1/token_check")
