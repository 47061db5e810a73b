"""How the stack fails: a replica killed under load, a controller restart, a full queue, and
who may register a worker. A real stack: two replicas of the demo model, plus one copy with no
queue, and a controller registration secret."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from starlette.testclient import TestClient

from launch.controller import GUARDED
from launch.peer_guard import SECRET_HEADER, PeerGuard
from tests.conftest import Stack, make_conf

MODEL, NO_QUEUE = "smollm2-135m", "smollm2-noqueue"
SECRET = "s" * 32
STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failover")
    (tmp / "secret").write_text(SECRET + "\n")
    shipped = (Stack(make_conf(tmp / "shipped"), "demo").conf / "models" / f"{MODEL}.yaml").read_text()
    import yaml

    base = yaml.safe_load(shipped)
    models = {MODEL: base | {"replicas": 2, "threads": 1},
              NO_QUEUE: base | {"name": NO_QUEUE, "queue_size": 0, "threads": 1}}
    s = Stack(make_conf(tmp, models=models, profile={"models": [MODEL, NO_QUEUE]},
                        controller={"secret_file": str(tmp / "secret")}), "test")
    with s.running():
        yield s


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.api_base, api_key="none", timeout=120, max_retries=0)


def workers(stack) -> dict:
    return requests.post(stack.controller_url + "/list_workers", timeout=5).json()


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def stream(client, model=MODEL) -> str:
    """'ok' or 'error: ...' for one streamed answer; never hangs past the client's timeout."""
    try:
        chunks = list(client.chat.completions.create(model=model, messages=STORY, max_tokens=48, stream=True))
        return "ok" if chunks and chunks[-1].choices[0].finish_reason in ("stop", "length") else f"error: {chunks[-1:]}"
    except openai.APIError as e:
        return f"error: {e}"


def test_killing_a_replica_under_load_loses_only_what_it_was_streaming(stack, client):
    assert sum(MODEL in w["models"] for w in workers(stack).values()) == 2
    sup = stack.supervisor()
    victim = sup.rpc.getProcessInfo(f"worker-{MODEL}-1")
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(stream, client) for _ in range(16)]
        time.sleep(3)  # every request is now streaming or queued at a replica
        os.kill(victim["pid"], signal.SIGKILL)
        results = [f.result(timeout=300) for f in futures]
    errors = [r for r in results if r != "ok"]
    # Only the answer the killed replica was streaming (concurrency 1) may fail, and cleanly;
    # what waited in its queue was retried on the other replica.
    assert len(errors) <= 1, errors
    assert all("worker failed mid-answer" in e or "could answer" in e for e in errors), errors
    # supervisor restarts it, it registers again, and it serves.
    assert wait_for(lambda: sup.rpc.getProcessInfo(f"worker-{MODEL}-1")["pid"] not in (0, victim["pid"]), 60)
    assert wait_for(lambda: sum(MODEL in w["models"] for w in workers(stack).values()) == 2, 120)
    assert [stream(client) for _ in range(4)] == ["ok"] * 4


def test_a_dead_worker_leaves_dispatch_within_seconds(stack):
    sup = stack.supervisor()
    pid = sup.rpc.getProcessInfo(f"worker-{MODEL}-2")["pid"]
    sup.rpc.stopProcess(f"worker-{MODEL}-2")  # no heartbeat expiry to wait for: the controller probes
    started = time.monotonic()
    assert wait_for(lambda: sum(MODEL in w["models"] for w in workers(stack).values()) == 1, 10)
    assert time.monotonic() - started < 10
    sup.rpc.startProcess(f"worker-{MODEL}-2")
    assert wait_for(lambda: sum(MODEL in w["models"] for w in workers(stack).values()) == 2, 120), pid


def test_a_controller_restart_is_survived(stack, client):
    sup = stack.supervisor()
    sup.rpc.stopProcess("controller")
    sup.rpc.startProcess("controller")
    # Workers re-register on their next heartbeat (every 5 s).
    assert wait_for(lambda: len(workers(stack)) == 3, 30), workers(stack)
    assert stream(client) == "ok"


def test_a_full_queue_is_429_in_openais_shape(stack):
    def ask(_):
        r = requests.post(stack.api_base + "/chat/completions", timeout=120,
                          json={"model": NO_QUEUE, "messages": STORY, "max_tokens": 32})
        return r.status_code, r.json()

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(ask, range(3)))
    statuses = sorted(s for s, _ in results)
    assert 200 in statuses and 429 in statuses, results
    body = next(b for s, b in results if s == 429)
    assert body["error"]["code"] == "queue_full" and "queue is full" in body["error"]["message"]


def test_registration_needs_the_secret(stack):
    forged = {"worker_name": "http://127.0.0.1:9/", "check_heart_beat": True,
              "worker_status": {"model_names": [MODEL], "speed": 1, "queue_length": 0}, "multimodal": False}
    url = stack.controller_url + "/register_worker"
    assert requests.post(url, json=forged, timeout=5).status_code == 403
    assert requests.post(url, json=forged, headers={SECRET_HEADER: "wrong" * 8}, timeout=5).status_code == 403
    assert "http://127.0.0.1:9/" not in workers(stack)
    assert requests.post(stack.controller_url + "/receive_heart_beat", timeout=5,
                         json={"worker_name": "http://127.0.0.1:9/", "queue_length": 0}).status_code == 403


def test_without_a_secret_only_loopback_peers_may_register():
    from fastapi import FastAPI

    app = FastAPI()
    app.add_api_route("/register_worker", lambda: {"ok": True}, methods=["POST"])
    guarded = PeerGuard(app, secret=None, paths=GUARDED)
    # TestClient's peer is the host "testclient", not a loopback address.
    assert TestClient(guarded).post("/register_worker").status_code == 403
    loopback = TestClient(guarded, client=("127.0.0.1", 50000))
    assert loopback.post("/register_worker").status_code == 200
