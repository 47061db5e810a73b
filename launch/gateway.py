"""What the OpenAI API server does beyond FastChat's: a key on every route, errors in
OpenAI's shape with the HTTP status a client can act on, failover between a model's replicas,
/health and /metrics.

FastChat's server answers every error with HTTP 400 in its own shape, lets /api/v1/* through
without a key (FastChat issue 2518) and turns a missing worker into a 500 with a traceback.
`install` fixes these around FastChat's app, without forking its route handlers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re

import aiohttp
import httpx
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastchat.constants import ErrorCode
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastchat.serve import openai_api_server as server

from launch import metrics

log = logging.getLogger("openai_api_server")
OPEN_PATHS = {"/health"}

# FastChat's error codes → (HTTP status, OpenAI error type, OpenAI error code)
STATUS = {
    ErrorCode.VALIDATION_TYPE_ERROR: (400, "invalid_request_error", "invalid_value"),
    ErrorCode.INVALID_AUTH_KEY: (401, "invalid_request_error", "invalid_api_key"),
    ErrorCode.INCORRECT_AUTH_KEY: (401, "invalid_request_error", "invalid_api_key"),
    ErrorCode.NO_PERMISSION: (403, "invalid_request_error", "permission_denied"),
    ErrorCode.INVALID_MODEL: (404, "invalid_request_error", "model_not_found"),
    ErrorCode.PARAM_OUT_OF_RANGE: (400, "invalid_request_error", "invalid_value"),
    ErrorCode.CONTEXT_OVERFLOW: (400, "invalid_request_error", "context_length_exceeded"),
    ErrorCode.RATE_LIMIT: (429, "rate_limit_error", "rate_limit_exceeded"),
    ErrorCode.QUOTA_EXCEEDED: (429, "rate_limit_error", "quota_exceeded"),
    ErrorCode.ENGINE_OVERLOADED: (429, "rate_limit_error", "queue_full"),
    ErrorCode.INTERNAL_ERROR: (500, "server_error", "internal_error"),
    ErrorCode.CONTROLLER_NO_WORKER: (503, "server_error", "model_unavailable"),
    ErrorCode.CONTROLLER_WORKER_TIMEOUT: (503, "server_error", "model_unavailable"),
}


class NoWorker(Exception):
    pass


class UnknownModel(Exception):
    pass


def error(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def install(keys: set[str], expected_models: set[str] = frozenset()) -> None:
    """Wrap FastChat's API app: call before uvicorn starts it. `expected_models` are the
    configured ones: asked for while none of their workers is up, they get 503, not 404."""
    app = server.app
    _expected.clear()
    _expected.update(expected_models)
    server.create_error_response = fastchat_error
    server.check_model = check_model
    server.check_requests = check_requests
    server.get_worker_address = get_worker_address
    server.fetch_remote = fetch_remote
    server.generate_completion_stream = generate_completion_stream
    server.generate_completion = generate_completion
    app.exception_handlers[RequestValidationError] = invalid_request
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(NoWorker, no_worker)
    app.add_exception_handler(UnknownModel, unknown_model)
    app.add_exception_handler(Exception, internal_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"])
    metrics.REGISTRY.register(metrics.WorkerQueues(server.app_settings.controller_address))
    # Before any route, so that none, FastChat's /api/v1/* included, is reached without a key.
    app.add_middleware(ApiKeys, keys=keys)
    app.add_middleware(metrics.RequestCounter)


class ApiKeys:
    """ASGI middleware (streaming-safe): `Authorization: Bearer KEY` on every route but /health."""

    def __init__(self, app, keys: set[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS or self._allowed(scope):
            return await self.app(scope, receive, send)
        given = "missing" if not dict(scope["headers"]).get(b"authorization") else "invalid"
        response = error(401, f"{given} API key: send 'Authorization: Bearer <key>'", "invalid_request_error",
                         "invalid_api_key")
        await response(scope, receive, send)

    def _allowed(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest against every key: the time taken says nothing about which one is close.
        return scheme.lower() == b"bearer" and any([hmac.compare_digest(token.strip(), k) for k in self.keys])


def fastchat_error(code: int, message: str) -> JSONResponse:
    status, type_, oa_code = STATUS.get(code, (500, "server_error", "internal_error"))
    # FastChat words range errors as "... - 'temperature'": name the field for the client.
    param = m.group(1) if (m := re.search(r"- '(\w+)'$", message)) else None
    return error(status, message, type_, oa_code, param)


_expected: set[str] = set()
_fastchat_check_requests = server.check_requests


async def check_model(request) -> JSONResponse | None:
    metrics.note_model(request.model)
    if request.model in await _served_models():
        return None
    if request.model in _expected:
        raise NoWorker(f"no worker of model '{request.model}' is up; try again shortly")
    return await unknown_model(None, UnknownModel(request.model))


async def _served_models() -> list[str]:
    try:
        return await server.fetch_remote(server.app_settings.controller_address + "/list_models", None, "models")
    except (aiohttp.ClientError, OSError) as e:
        raise NoWorker(f"the controller is not reachable ({e})") from None


MAX_N = 4  # choices per request: each is a full generation on a CPU


def check_requests(request) -> JSONResponse | None:
    if getattr(request, "messages", None) is not None and len(request.messages) == 0:
        return error(400, "messages: must contain at least one message", "invalid_request_error", "invalid_value",
                     "messages")
    if (getattr(request, "n", None) or 1) > MAX_N:
        return error(400, f"n: at most {MAX_N} choices per request (got {request.n})", "invalid_request_error",
                     "invalid_value", "n")
    return _fastchat_check_requests(request)


async def get_worker_address(model_name: str) -> str:
    try:
        address = await server.fetch_remote(
            server.app_settings.controller_address + "/get_worker_address", {"model": model_name}, "address"
        )
    except (aiohttp.ClientError, OSError) as e:
        raise NoWorker(f"the controller is not reachable ({e})") from None
    if not address:
        if model_name not in _expected and model_name not in await _served_models():
            raise UnknownModel(model_name)  # FastChat's /api/v1/token_check asks without checking
        raise NoWorker(f"no worker of model '{model_name}' is up; try again shortly")
    return address


_fastchat_stream = server.generate_completion_stream
_fastchat_generate = server.generate_completion
_fastchat_fetch = server.fetch_remote
# What FastChat asks a worker before generating. The answers are the same on every replica of a
# model, so a worker that does not answer is replaced by another one, as for generation.
WORKER_QUERIES = {"model_details", "count_token", "worker_get_conv_template"}
RETRYABLE = {ErrorCode.ENGINE_OVERLOADED, ErrorCode.CONTROLLER_NO_WORKER}
# Seconds without a chunk from a worker before asking the controller whether it still has it.
WATCH_INTERVAL = 3.0


class WorkerLost(ConnectionError):
    """The controller dropped the worker we wait for: it stopped answering its probes."""


async def fetch_remote(url: str, pload: dict | None = None, name: str | None = None):
    """FastChat's JSON call; a query to a worker (context length, token count, template) that
    fails or hangs is asked of another replica. FastChat's own let the connection error through
    as a 500, or waited for a worker behind a cut link until the client gave up (seen in
    tests/test_multi_host.py)."""
    worker_addr, _, path = url.rpartition("/")
    if path not in WORKER_QUERIES or not isinstance(pload, dict) or "model" not in pload:
        return await _fastchat_fetch(url, pload, name)
    for attempt in (1, 2):
        try:
            return await _until_lost(_fastchat_fetch(f"{worker_addr}/{path}", pload, name), worker_addr)
        except (aiohttp.ClientError, OSError) as e:  # WorkerLost is an OSError
            if attempt == 2:
                raise NoWorker(f"no worker of model '{pload['model']}' answered; try again shortly") from None
            log.warning("worker %s did not answer /%s (%r): asking another replica", worker_addr, path, e)
            worker_addr = await _another_worker(pload["model"], worker_addr)


async def generate_completion_stream(payload: dict, worker_addr: str):
    """FastChat's stream from a worker, retried once on another replica when the worker fails
    or is full before its first token. After that, the client has text: an error ends it."""
    timing = metrics.Timing(payload["model"])
    tokens = 0
    async for chunk in _with_failover(payload, worker_addr):
        if chunk.get("text") and not chunk.get("error_code"):
            timing.chunk()
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        if chunk.get("error_code"):
            # FastChat puts this dict into the stream as it is; with an "error" member, OpenAI
            # clients raise it as an API error instead of choking on a chunk without choices.
            _, type_, code = STATUS.get(chunk["error_code"], (500, "server_error", "internal_error"))
            chunk = chunk | {"error": {"message": chunk.get("text", ""), "type": type_, "param": None, "code": code}}
        yield chunk
    timing.done(tokens)


async def _with_failover(payload: dict, worker_addr: str):
    for attempt in (1, 2):
        started = False
        try:
            async for chunk in _watched(_fastchat_stream(payload, worker_addr), worker_addr):
                if not started and attempt == 1 and chunk.get("error_code") in RETRYABLE:
                    break
                if not started:
                    metrics.WORKER_REQUESTS.labels(worker_addr).inc()
                started = True
                yield chunk
            else:
                return
        except (httpx.TransportError, OSError) as e:
            if started:
                log.warning("worker %s failed mid-answer: %r", worker_addr, e)
                yield {"text": f"the model's worker failed mid-answer ({type(e).__name__})",
                       "error_code": ErrorCode.INTERNAL_ERROR}
                return
        if attempt == 1:
            log.warning("worker %s failed or was full before the first token: retrying on another replica", worker_addr)
            worker_addr = await _another_worker(payload["model"], worker_addr)
    yield {"text": f"no worker of model '{payload['model']}' could answer; try again shortly",
           "error_code": ErrorCode.CONTROLLER_NO_WORKER}


async def generate_completion(payload: dict, worker_addr: str) -> dict:
    """FastChat's one-shot generation, retried once on another replica like the stream."""
    for attempt in (1, 2):
        try:
            content = await _until_lost(_fastchat_generate(payload, worker_addr), worker_addr)
            if isinstance(content, (bytes, str)):  # fetch_remote's way of saying HTTP != 200
                content = json.loads(content)
            if content.get("error_code") not in RETRYABLE or attempt == 2:
                metrics.WORKER_REQUESTS.labels(worker_addr).inc()
                metrics.TOKENS.labels(payload["model"]).inc((content.get("usage") or {}).get("completion_tokens", 0))
                return content
        except (aiohttp.ClientError, OSError) as e:
            log.warning("worker %s failed: %r", worker_addr, e)
            if attempt == 2:
                break
        worker_addr = await _another_worker(payload["model"], worker_addr)
    return {"text": f"no worker of model '{payload['model']}' could answer; try again shortly",
            "error_code": ErrorCode.CONTROLLER_NO_WORKER}


async def _watched(chunks, worker_addr: str):
    """A worker's chunks, or WorkerLost once the controller has dropped that worker while we
    wait. A cut network link or a frozen host sends no reset: without this, a request would
    hang until FastChat's 100 s timeout (and its client longer)."""
    it = aiter(chunks)
    try:
        while True:
            try:
                chunk = await _until_lost(anext(it), worker_addr)
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        await it.aclose()


async def _until_lost(awaitable, worker_addr: str):
    task = asyncio.ensure_future(awaitable)
    while not (await asyncio.wait({task}, timeout=WATCH_INTERVAL))[0]:
        if not await _registered(worker_addr):
            task.cancel()
            await asyncio.wait({task})
            raise WorkerLost(f"worker {worker_addr} stopped answering the controller's probes")
    return task.result()


async def _registered(worker_addr: str) -> bool:
    try:
        workers = await server.fetch_remote(server.app_settings.controller_address + "/list_workers", None, "")
    except (aiohttp.ClientError, OSError, ValueError):
        return True  # the controller is the one in trouble: keep waiting for the worker
    return not isinstance(workers, dict) or worker_addr in workers


async def _another_worker(model: str, failed: str) -> str:
    """Ask the controller again: it drops workers that do not answer, and a full worker's
    queue makes the shortest-queue dispatch pick another replica."""
    controller = server.app_settings.controller_address
    try:
        await server.fetch_remote(controller + "/refresh_all_workers")
        return await server.fetch_remote(controller + "/get_worker_address", {"model": model}, "address") or failed
    except (aiohttp.ClientError, OSError):
        return failed


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return error(400, "the request body is not valid JSON", "invalid_request_error", "invalid_json")
    message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid request"))
    return error(400, message, "invalid_request_error", "invalid_value", param)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes, wrong methods, bodies that do not parse (e.g. invalid UTF-8).
    if isinstance(exc.detail, dict) and "error" in exc.detail:
        return JSONResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
    type_ = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    return error(exc.status_code, str(exc.detail), type_, None)


async def unknown_model(request: Request | None, exc: UnknownModel) -> JSONResponse:
    models = await _served_models()
    return error(404, f"The model '{exc}' does not exist here; available: {', '.join(sorted(models)) or 'none'}",
                 "invalid_request_error", "model_not_found", "model")


async def no_worker(request: Request, exc: NoWorker) -> JSONResponse:
    return error(503, str(exc), "server_error", "model_unavailable")


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return error(500, "internal error; the gateway log has the details", "server_error", "internal_error")


async def health() -> dict:
    """The gateway, the controller, and each worker with its models and queue: open without a
    key, for load balancers and probes. 503 while no model can be served."""
    controller = server.app_settings.controller_address
    try:
        workers = await server.fetch_remote(controller + "/list_workers", None, "")
    except (aiohttp.ClientError, OSError, ValueError):
        return JSONResponse({"status": "down", "controller": "unreachable", "models": [], "workers": {}}, status_code=503)
    models = sorted({m for w in workers.values() for m in w["models"]})
    body = {"status": "ok" if models else "down", "controller": "ok", "models": models, "workers": workers}
    return body if models else JSONResponse(body, status_code=503)


async def prometheus() -> Response:
    content, media_type = metrics.exposition()
    return Response(content, media_type=media_type)
