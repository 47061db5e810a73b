"""The controller: FastChat's, with worker registration guarded and dead workers dropped fast.

    python -m launch.controller --host 127.0.0.1 --port 21001 [--secret-file FILE]

FastChat's controller lets anyone who reaches it register a worker under any model name
(CVE-2024-10044) and keeps dispatching to a dead worker until its heartbeat expires (90 s).
Here a registration, heartbeat or deregistration must come from loopback or, when a secret
file is given, carry that secret (launch/peer_guard.py); every worker, local or on another
host, is probed every second, so a dead or unreachable one leaves the dispatch within seconds
(it registers again when it answers), and the queue lengths the dispatch goes by are at most a
probe old.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from pathlib import Path

import requests
from fastapi import Request
from fastchat.serve.controller import Controller as FastChatController
from fastchat.serve.controller import DispatchMethod

from launch.peer_guard import PeerGuard, read_secret

GUARDED = {"/register_worker", "/receive_heart_beat", "/deregister_worker"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import uvicorn
    from fastchat.serve import controller as fastchat

    fastchat.controller = Controller(args.dispatch_method)
    fastchat.app.add_api_route("/list_workers", lambda: list_workers(fastchat.controller), methods=["POST"])
    fastchat.app.add_api_route("/deregister_worker", deregister_worker, methods=["POST"])
    fastchat.app.add_middleware(PeerGuard, secret=read_secret(args.secret_file), paths=GUARDED, what="registration")
    threading.Thread(target=probe_forever, args=(fastchat.controller, args.probe_interval), daemon=True).start()
    uvicorn.run(fastchat.app, host=args.host, port=args.port, log_level="info")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Dispatch requests to the registered model workers.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=21001)
    p.add_argument("--dispatch-method", choices=["lottery", "shortest_queue"], default="shortest_queue")
    p.add_argument("--secret-file", type=Path, help="registration secret workers must send")
    p.add_argument("--probe-interval", type=float, default=1.0, help="seconds between worker liveness probes")
    return p.parse_args(argv)


class Controller(FastChatController):
    """FastChat's, except that shortest-queue dispatch breaks ties at random. FastChat takes the
    first worker registered, so requests that each end before the next one starts would all go
    to one replica (queue lengths are all 0 then), however many hosts serve the model."""

    def get_worker_address(self, model_name: str) -> str:
        if self.dispatch_method != DispatchMethod.SHORTEST_QUEUE:
            return super().get_worker_address(model_name)
        loads = {name: info.queue_length / info.speed for name, info in list(self.worker_info.items())
                 if model_name in info.model_names}
        if not loads:
            return ""
        least = min(loads.values())
        name = random.choice([n for n, load in loads.items() if load == least])
        self.worker_info[name].queue_length += 1
        return name


async def deregister_worker(request: Request) -> dict:
    """A draining worker leaves the dispatch at once (FastChat has no route for it)."""
    from fastchat.serve import controller as fastchat

    name = (await request.json()).get("worker_name")
    removed = fastchat.controller.worker_info.pop(name, None) is not None
    if removed:
        print(f"worker {name} deregistered (draining)", flush=True)
    return {"removed": removed}


def probe_forever(controller, interval: float) -> None:
    slow: dict[str, int] = {}
    while True:
        time.sleep(interval)
        for name in list(controller.worker_info):
            try:
                r = requests.post(name + "/worker_get_status", timeout=max(1.0, interval))
                r.raise_for_status()
                slow.pop(name, None)
                if (info := controller.worker_info.get(name)) is not None:
                    # Fresher than the heartbeat's (every few seconds): better shortest-queue dispatch.
                    info.queue_length = r.json().get("queue_length", info.queue_length)
                continue
            except requests.Timeout:
                # A busy worker may answer late once; a refused connection means it is gone.
                slow[name] = slow.get(name, 0) + 1
                if slow[name] < 2:
                    continue
            except requests.RequestException:
                pass
            slow.pop(name, None)
            controller.worker_info.pop(name, None)
            print(f"worker {name} does not answer: removed from dispatch", flush=True)


def list_workers(controller) -> dict:
    return {
        name: {"models": info.model_names, "queue_length": info.queue_length,
               "seconds_since_heartbeat": round(time.time() - info.last_heart_beat, 1)}
        for name, info in list(controller.worker_info.items())
    }


if __name__ == "__main__":
    main()
