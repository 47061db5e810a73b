"""The controller: FastChat's, with worker registration guarded and dead workers dropped fast.

    python -m launch.controller --host 127.0.0.1 --port 21001 [--secret-file FILE]

FastChat's controller lets anyone who reaches it register a worker under any model name
(CVE-2024-10044) and keeps dispatching to a dead worker until its heartbeat expires (90 s).
Here a registration or heartbeat must come from loopback or, when a secret file is given,
carry that secret; and every worker is probed every few seconds, so a dead one leaves the
dispatch within seconds (supervisor restarts it, and it registers again when ready), and the
queue lengths the dispatch goes by are at most a probe old.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import threading
import time
from pathlib import Path

import requests

SECRET_HEADER = "X-LLMD-Secret"
GUARDED = {"/register_worker", "/receive_heart_beat"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import uvicorn
    from fastchat.serve import controller as fastchat

    fastchat.controller = fastchat.Controller(args.dispatch_method)
    fastchat.app.add_api_route("/list_workers", lambda: list_workers(fastchat.controller), methods=["POST"])
    secret = read_secret(args.secret_file)
    fastchat.app.add_middleware(RegistrationGuard, secret=secret)
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


def read_secret(path: Path | None) -> bytes | None:
    if path is None:
        return None
    secret = path.read_text().strip().encode()
    if len(secret) < 16:
        raise SystemExit(f"{path}: the registration secret must have at least 16 characters")
    return secret


class RegistrationGuard:
    """ASGI middleware: who may register workers and send their heartbeats."""

    def __init__(self, app, secret: bytes | None):
        self.app, self.secret = app, secret

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in GUARDED and not self._allowed(scope):
            from fastapi.responses import JSONResponse

            peer = (scope.get("client") or ("?",))[0]
            why = "a wrong or missing registration secret" if self.secret else "a non-loopback peer"
            response = JSONResponse({"error": f"registration refused: {why} ({peer})"}, status_code=403)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _allowed(self, scope) -> bool:
        if self.secret is None:
            try:
                return ipaddress.ip_address((scope.get("client") or ("",))[0]).is_loopback
            except ValueError:
                return False
        given = dict(scope["headers"]).get(SECRET_HEADER.lower().encode(), b"")
        return hmac.compare_digest(given, self.secret)


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
