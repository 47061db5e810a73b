"""One model worker: a native transformers model behind FastChat's worker protocol.

    python -m launch.worker --model-dir DIR --name NAME --template TEMPLATE \\
        --port 21002 --controller http://127.0.0.1:21001 [--threads N] [--dtype bfloat16]
        [--host 0.0.0.0 --advertise-host 10.0.0.7 --secret-file FILE]    # on another host

FastChat's BaseModelWorker registers with the controller, heartbeats, queues requests
and serves the worker HTTP API; this module loads the model, turns FastChat's prompt
string into ids and streams the generated text back. `POST /drain` (guarded like
registration) makes it leave the controller and refuse new requests while the ones it
accepted finish.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import requests
import torch
import uvicorn
from fastchat.constants import ErrorCode
from fastchat.serve.base_model_worker import BaseModelWorker, app, heart_beat_worker
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from launch import attention, decode_layer, templates
from launch.peer_guard import PeerGuard, read_secret, secret_headers
from launch.generate import Sampling, generate

log = logging.getLogger("model_worker")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.secret_file:
        from fastchat.serve import base_model_worker

        base_model_worker.requests = _WithSecret(secret_headers(args.secret_file))
    worker = ModelWorker(args)
    app.add_middleware(QueueLimit, worker=worker, limit=args.concurrency + args.queue_size)
    app.add_api_route("/drain", worker.drain, methods=["POST"])
    app.add_middleware(PeerGuard, secret=read_secret(args.secret_file), paths={"/drain"}, what="drain")
    # Register only once this process answers HTTP: the controller drops a worker whose
    # status it cannot fetch, and would then not see it again until the next heartbeat.
    threading.Thread(target=_register_when_listening, args=(worker, args.host, args.port), daemon=True).start()
    # A stop must not wait for every queued request: supervisor would have to SIGKILL.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve one model to a FastChat controller.")
    p.add_argument("--model-dir", required=True, type=Path, help="a transformers model folder")
    p.add_argument("--name", required=True, help="model name clients ask for")
    p.add_argument("--template", required=True, help="FastChat conversation template")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--advertise-host", help="address the controller reaches this worker at (default: --host)")
    p.add_argument("--port", type=int, default=21002)
    p.add_argument("--controller", default="http://127.0.0.1:21001", help="controller URL")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quant", default="none", choices=["none", "int8"], help="int8: a folder made by launch.quantize")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--context-length", type=int, default=None, help="default: the model's own")
    p.add_argument("--concurrency", type=int, default=1, help="requests generated at once")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait; more are refused (429)")
    p.add_argument("--secret-file", type=Path, help="the controller's registration secret")
    return p.parse_args(argv)


class RequestError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class ModelWorker(BaseModelWorker):
    def __init__(self, args: argparse.Namespace):
        templates.use_for_models({args.name: args.template})
        super().__init__(
            controller_addr=args.controller,
            worker_addr=f"http://{args.advertise_host or args.host}:{args.port}",
            worker_id=uuid.uuid4().hex[:8],
            model_path=str(args.model_dir),
            model_names=[args.name],
            limit_worker_concurrency=args.concurrency,
            conv_template=args.template,
        )
        self.draining = False
        started = time.perf_counter()
        self._encode, self._reply = prompt_codec(args.template)
        self.tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        if args.quant == "int8":
            from launch.quantize import load_int8

            self.model = load_int8(args.model_dir, threads=args.threads)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).eval()
        # torch's SDPA is slow for one query on CPU (launch/attention.py), and so are a decoded
        # token's norms and rotary embedding as transformers computes them (launch/decode_layer.py).
        decode_layer.use(attention.use(self.model))
        gen = GenerationConfig.from_model_config(self.model.config)
        if (args.model_dir / "generation_config.json").is_file():
            gen = GenerationConfig.from_pretrained(args.model_dir)
        self.defaults = gen
        own = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.context_len = min(args.context_length or own, own)
        self.stop_token_ids = frozenset(_as_list(gen.eos_token_id) + list(self.conv.stop_token_ids or []))
        self._warm_up()
        log.info(
            "loaded %s (%s, %d threads, context %d) in %.1fs",
            args.name, "int8" if args.quant == "int8" else args.dtype, torch.get_num_threads(), self.context_len, time.perf_counter() - started,
        )

    # --- FastChat worker protocol -------------------------------------------------------

    def register_to_controller(self) -> None:
        if not self.draining:  # a heartbeat answered "unknown worker" would register it again
            super().register_to_controller()

    def send_heart_beat(self) -> None:
        if not self.draining:
            super().send_heart_beat()

    def get_status(self) -> dict:
        return super().get_status() | {"draining": self.draining}

    def drain(self) -> dict:
        """Leave the dispatch; refuse new requests (the gateway retries them on another
        replica); the accepted ones finish. Their number is queue_length in /worker_get_status."""
        self.draining = True
        from fastchat.serve import base_model_worker  # its `requests` carries the secret

        try:
            base_model_worker.requests.post(self.controller_addr + "/deregister_worker",
                                            json={"worker_name": self.worker_addr}, timeout=5).raise_for_status()
        except requests.RequestException as e:  # gone from the dispatch anyway once we stop
            log.warning("could not deregister from %s (%s); the controller drops this worker when it stops",
                        self.controller_addr, e)
        log.info("draining: %d requests still running or queued", self.get_queue_length())
        return {"draining": True, "queue_length": self.get_queue_length()}

    def generate_stream_gate(self, params: dict) -> Iterator[bytes]:
        self.call_ct += 1
        try:
            for chunk in self.stream(params):
                yield json.dumps(chunk).encode() + b"\0"
        except RequestError as e:
            yield json.dumps({"text": str(e), "error_code": int(e.code)}).encode() + b"\0"
        except Exception:  # a request must never take the worker down
            log.exception("generation failed")
            chunk = {"text": "internal error in the model worker; its log has the details",
                     "error_code": int(ErrorCode.INTERNAL_ERROR)}
            yield json.dumps(chunk).encode() + b"\0"

    def generate_gate(self, params: dict) -> dict:
        last = b""
        for last in self.generate_stream_gate(params):
            pass
        return json.loads(last[:-1])

    def count_token(self, params: dict) -> dict:
        return {"count": len(self.encode(str(params.get("prompt", "")))), "error_code": 0}

    # --- generation ---------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """FastChat's prompt string → the ids the model was trained on."""
        return self._encode(self.tokenizer, prompt)

    def stream(self, params: dict) -> Iterator[dict]:
        """Chunks of FastChat's protocol: the whole text so far, usage, finish_reason."""
        prompt = params.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR, "'prompt' must be a string")
        prompt_ids = self.encode(prompt)
        sampling = self.sampling(params, len(prompt_ids))
        stops = _stop_strings(params.get("stop"))
        prefix = prompt if params.get("echo", True) else ""
        new_ids: list[int] = []
        text, finish, searched = "", "length", 0
        longest_stop = max(map(len, stops), default=1)
        for token in generate(self.model, prompt_ids, sampling):
            new_ids.append(token)
            if token in sampling.stop_token_ids:
                finish = "stop"
                break
            text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
            if self._reply:
                text = self._reply(text)
            # Only the new text (and what a stop string could span into it) needs searching.
            start = max(0, searched - longest_stop + 1)
            cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
            searched = len(text)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                break
            # Hold back what may still become a stop string or is half a UTF-8 character.
            shown = text[: len(text) - _held_back(text, stops)]
            yield self._chunk(prefix + shown, prompt_ids, new_ids, None)
        yield self._chunk(prefix + text, prompt_ids, new_ids, finish)

    def sampling(self, params: dict, prompt_len: int) -> Sampling:
        room = self.context_len - prompt_len
        if room <= 0:
            raise RequestError(
                ErrorCode.CONTEXT_OVERFLOW,
                f"the prompt is {prompt_len} tokens, but this model's context is {self.context_len} tokens; "
                f"shorten the conversation",
            )
        d = self.defaults
        try:
            s = Sampling(
                max_new_tokens=min(int(_given(params, "max_new_tokens", 256)), room),
                temperature=float(_given(params, "temperature", d.temperature if d.do_sample else 0.0)),
                top_p=float(_given(params, "top_p", d.top_p or 1.0)),
                top_k=int(_given(params, "top_k", -1)),
                repetition_penalty=float(_given(params, "repetition_penalty", d.repetition_penalty or 1.0)),
                stop_token_ids=self.stop_token_ids | frozenset(int(t) for t in params.get("stop_token_ids") or []),
                seed=None if params.get("seed") is None else int(params["seed"]),
            )
        except (TypeError, ValueError) as e:
            raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR, f"invalid sampling parameter: {e}") from None
        for name, ok, rule in (
            ("max_new_tokens", s.max_new_tokens >= 1, "at least 1"),
            ("temperature", s.temperature >= 0, "at least 0"),
            ("top_p", 0 < s.top_p <= 1, "in (0, 1]"),
            ("repetition_penalty", s.repetition_penalty > 0, "above 0"),
        ):
            if not ok:
                raise RequestError(ErrorCode.PARAM_OUT_OF_RANGE, f"{name} must be {rule} (got {getattr(s, name)})")
        return s

    def _chunk(self, text: str, prompt_ids: list[int], new_ids: list[int], finish: str | None) -> dict:
        usage = {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(new_ids),
            "total_tokens": len(prompt_ids) + len(new_ids),
        }
        return {"text": text, "error_code": 0, "usage": usage, "finish_reason": finish}

    def _warm_up(self) -> None:
        for _ in generate(self.model, self.encode("Hello"), Sampling(max_new_tokens=2, temperature=0)):
            pass


class QueueLimit:
    """ASGI middleware: refuse a generation at once when the queue is full (FastChat's worker
    queues every request without bound, so under overload clients would only time out) or
    the worker is draining."""

    PATHS = {"/worker_generate_stream": b"\0", "/worker_generate": b""}

    def __init__(self, app, worker: ModelWorker, limit: int):
        self.app, self.worker, self.limit = app, worker, limit

    async def __call__(self, scope, receive, send):
        end = self.PATHS.get(scope.get("path")) if scope["type"] == "http" else None
        if end is None or (not self.worker.draining and self.worker.get_queue_length() < self.limit):
            return await self.app(scope, receive, send)
        if self.worker.draining:  # the gateway retries this on another replica
            refusal = {"text": "this worker is draining; retry on another replica",
                       "error_code": int(ErrorCode.CONTROLLER_NO_WORKER)}
        else:
            refusal = {"text": f"the model's queue is full ({self.limit} requests); retry shortly",
                       "error_code": int(ErrorCode.ENGINE_OVERLOADED)}
        body = json.dumps(refusal).encode() + end
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def prompt_codec(template: str):
    """(encode, reply) for a conversation template. ChatGLM3 and Qwen were trained on ids that
    tokenizing FastChat's prompt string as a whole does not give (role and content are encoded
    separately), so their modules turn the string back into the original ids; ChatGLM3's reply
    also starts with a metadata line that its chat() drops."""
    if template == "chatglm3":
        from launch import chatglm3

        return chatglm3.encode_prompt, chatglm3.response_text
    if template == "qwen-7b-chat":
        from launch import qwen

        return qwen.encode_prompt, None
    return (lambda tokenizer, prompt: tokenizer(prompt).input_ids), None


def _register_when_listening(worker, host: str, port: int) -> None:
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    delay = 1.0
    while True:
        try:
            worker.register_to_controller()
            break
        except requests.RequestException as e:  # the controller is not up (yet): keep the model loaded
            log.warning("controller at %s not reachable (%s); retrying in %.0fs", worker.controller_addr, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        except AssertionError:  # FastChat's way of saying the controller answered, but not 200
            log.error("the controller at %s refused the registration: a registration secret missing or wrong?",
                      worker.controller_addr)
            os._exit(3)  # supervisor shows the failure; `make up` prints this log's tail
    threading.Thread(target=heart_beat_worker, args=(worker,), daemon=True).start()


class _WithSecret:
    """Stands in for `requests` in FastChat's base_model_worker, which registers and sends
    heartbeats with `requests.post`: adds the controller's registration secret."""

    exceptions = requests.exceptions

    def __init__(self, headers: dict[str, str]):
        self.headers = headers

    def post(self, url: str, **kwargs):
        return requests.post(url, headers=self.headers | kwargs.pop("headers", {}), **kwargs)


def _given(params: dict, key: str, default):
    value = params.get(key)
    return default if value is None else value


def _stop_strings(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops):
        raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR, "'stop' must be a string or a list of strings")
    return [s for s in stops if s]


def _held_back(text: str, stops: list[str]) -> int:
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]



if __name__ == "__main__":
    main()
