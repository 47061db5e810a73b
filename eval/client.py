"""Ask one model one question through the OpenAI-compatible gateway, streaming, and measure it.

    ask(client, counter, model, question, max_tokens=512, temperature=0.0) -> AnswerRecord

Speed comes from the stream itself: time to first token (first non-empty content delta), total
time, completion tokens, tokens/s (completion tokens over total time, what a user waits for) and
finish_reason. Token counts come from the stream's usage field when the server sends one
(OpenAI, vLLM); FastChat does not, so its own tokenizer is asked through the gateway's
/api/v1/token_check (with the same API key as the OpenAI client: with keys on, the gateway
guards /api/v1/* too), and only if that fails too is the count estimated from the stream.
A failed request never raises: it comes back as a record with `error` set.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime

import openai
from openai import OpenAI

from .questions import Question
from .runlog import AnswerRecord

KEYS_ENV = "LLMD_API_KEYS"  # the gateway's keys, comma-separated (as launch/api_keys.py reads them)


def default_api_key() -> str:
    """The first key of $LLMD_API_KEYS, the variable `make up` takes the gateway's keys from,
    else "none" (with keys off the gateway accepts anything)."""
    keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    return keys[0] if keys else "none"


def make_client(base_url: str, api_key: str, timeout: float) -> OpenAI:
    # No automatic retries: a retried 512-token generation doubles the wait and hides the
    # failure; errors are recorded instead and `--resume` asks again.
    return OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class TokenCounter:
    """Counts completion tokens with the serving model's own tokenizer via FastChat's
    /api/v1/token_check (not part of the OpenAI API, so it may be absent).

    It sends `Authorization: Bearer API_KEY` like the OpenAI client does. Where the route is
    missing (404/405) or the key is refused (401/403) it stops asking; a refusal is reported
    once through `warn`, since the fallback (chunk counts) understates tokens/s."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0,
                 warn: Callable[[str], None] = _warn):
        root = base_url.rstrip("/")
        root = root.removesuffix("/v1")
        self.url = root + "/api/v1/token_check"
        self.api_key = api_key
        self.timeout = timeout
        self.available = True
        self._warn = warn
        self._lock = threading.Lock()

    def count(self, model: str, text: str) -> int | None:
        if not self.available or not text:
            return 0 if not text else None
        body = json.dumps({"prompts": [{"model": model, "prompt": text, "max_tokens": 0}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, body, headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.load(resp)
            return int(data["prompts"][0]["tokenCount"])
        except urllib.error.HTTPError as e:
            if e.code in (404, 405):
                self.available = False  # not FastChat: stop asking
            elif e.code in (401, 403):
                self._disable(f"warning: {self.url} refused the API key (HTTP {e.code}); completion tokens "
                              f"are counted from stream chunks instead, which understates tokens/s. "
                              f"Pass the gateway's key with --api-key or $LLMD_API_KEYS.")
            return None
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return None

    def _disable(self, msg: str) -> None:
        with self._lock:  # answers are counted from several threads: one warning only
            if not self.available:
                return
            self.available = False
        self._warn(msg)


def ask(
    client: OpenAI,
    counter: TokenCounter | None,
    model: str,
    question: Question,
    max_tokens: int,
    temperature: float,
) -> AnswerRecord:
    asked_at = datetime.now(UTC).isoformat(timespec="seconds")
    parts: list[str] = []
    chunks_with_text = 0
    usage_tokens: int | None = None
    finish_reason: str | None = None
    ttft: float | None = None
    error: str | None = None
    t0 = time.perf_counter()
    try:
        stream = _create(client, model, question.prompt, max_tokens, temperature)
        for chunk in stream:
            extra = getattr(chunk, "model_extra", None) or {}
            # FastChat reports a worker failure as an ordinary data line with error_code.
            if extra.get("error_code"):
                raise _StreamError(f"server error {extra.get('error_code')}: {extra.get('text') or extra}")
            usage = getattr(chunk, "usage", None)
            if usage is not None and getattr(usage, "completion_tokens", None):
                usage_tokens = int(usage.completion_tokens)
            for choice in getattr(chunk, "choices", None) or []:
                delta = getattr(choice, "delta", None)
                text = getattr(delta, "content", None) if delta is not None else None
                if text:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(text)
                    chunks_with_text += 1
                if getattr(choice, "finish_reason", None):
                    finish_reason = choice.finish_reason
    except openai.APIStatusError as e:
        error = f"HTTP {e.status_code}: {_message(e)}"
    except openai.APITimeoutError:
        error = f"timed out (no data for {client.timeout}s)"
    except openai.APIConnectionError as e:
        error = f"connection failed: {e.__cause__ or e}"
    except (openai.OpenAIError, _StreamError) as e:
        error = str(e)
    total = time.perf_counter() - t0
    content = "".join(parts)

    tokens, source = usage_tokens, "usage"
    if tokens is None and content and counter is not None:
        tokens, source = counter.count(model, content), "tokenizer"
    if tokens is None:
        # FastChat streams a few tokens per chunk, so this undercounts; the report says so.
        tokens, source = (chunks_with_text, "chunks") if content else (0, "none")
    return AnswerRecord(
        model=model,
        question_id=question.id,
        prompt_sha=question.prompt_sha,
        content=content,
        error=error,
        finish_reason=finish_reason,
        truncated=finish_reason == "length",
        ttft_s=round(ttft, 4) if ttft is not None else None,
        total_s=round(total, 4),
        completion_tokens=tokens,
        tokens_source=source,
        tokens_per_s=round(tokens / total, 3) if tokens and total > 0 and error is None else None,
        max_tokens=max_tokens,
        temperature=temperature,
        asked_at=asked_at,
    )


class _StreamError(Exception):
    pass


def _create(client: OpenAI, model: str, prompt: str, max_tokens: int, temperature: float):
    kwargs = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
    }
    try:
        # Ask for usage in the stream; servers that do not know the option ignore it (FastChat)
        # or reject it, in which case we ask again without it.
        return client.chat.completions.create(**kwargs, stream_options={"include_usage": True})
    except openai.BadRequestError as e:
        if "stream_options" not in str(e):
            raise
        return client.chat.completions.create(**kwargs)


def _message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else body.get("message") or body.get("detail")
        if msg:
            return str(msg)[:500]
    return str(e.message)[:500]


def list_models(client: OpenAI) -> list[str]:
    return sorted(m.id for m in client.models.list())
