"""Prometheus metrics of the gateway (served at /metrics).

Requests by model and status, tokens generated, time to first token and time per output
token, generations per worker (how the load spreads over hosts), and each worker's queue
length as the controller reports it at scrape time.
"""

from __future__ import annotations

import contextvars
import time

import requests
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry()
REQUESTS = Counter("llmd_requests", "API requests by model, route and HTTP status", ["model", "route", "status"],
                   registry=REGISTRY)
TOKENS = Counter("llmd_generated_tokens", "completion tokens generated", ["model"], registry=REGISTRY)
TTFT = Histogram("llmd_time_to_first_token_seconds", "time from the worker request to the first text", ["model"],
                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=REGISTRY)
WORKER_REQUESTS = Counter("llmd_worker_requests", "generations answered by each worker (after any failover)",
                          ["worker"], registry=REGISTRY)
TPOT = Histogram("llmd_time_per_output_token_seconds", "decode time per token after the first", ["model"],
                 buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28), registry=REGISTRY)

# The model a request asked for, filled in by the gateway's model check and read by the
# request counter once the response is sent.
request_info: contextvars.ContextVar[dict] = contextvars.ContextVar("request_info")


class RequestCounter:
    """ASGI middleware counting every request by model, route and status."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        info = {"model": "", "status": 500}
        request_info.set(info)

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            REQUESTS.labels(info["model"], scope["path"], str(info["status"])).inc()


def note_model(model: str) -> None:
    try:
        request_info.get()["model"] = model
    except LookupError:
        pass


class Timing:
    """Time to first token and per output token of one generation."""

    def __init__(self, model: str):
        self.model, self.start, self.first = model, time.perf_counter(), None

    def chunk(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            TTFT.labels(self.model).observe(self.first - self.start)

    def done(self, completion_tokens: int) -> None:
        TOKENS.labels(self.model).inc(completion_tokens)
        if self.first is not None and completion_tokens > 1:
            TPOT.labels(self.model).observe((time.perf_counter() - self.first) / (completion_tokens - 1))


class WorkerQueues:
    """Collector: each worker's queue length, asked of the controller when Prometheus scrapes."""

    def __init__(self, controller_url: str):
        self.controller_url = controller_url

    def collect(self):
        gauge = GaugeMetricFamily("llmd_worker_queue_length", "requests running or waiting at a worker",
                                  labels=["worker", "model"])
        try:
            workers = requests.post(self.controller_url + "/list_workers", timeout=2).json()
        except (requests.RequestException, ValueError):
            workers = {}
        for name, w in workers.items():
            for model in w["models"]:
                gauge.add_metric([name, model], w["queue_length"])
        yield gauge


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
