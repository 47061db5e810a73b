"""Who may call the stack's internal control routes: worker registration at the controller,
drain at a worker.

FastChat's controller and workers have no authentication (CVE-2024-10044: a forged
`/register_worker` hijacks a model name). A guarded route must come from a loopback peer or,
when a shared secret is configured (controller.secret_file, the same file on every host),
carry that secret in a header.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

SECRET_HEADER = "X-LLMD-Secret"
MIN_SECRET = 16


def read_secret(path: Path | None) -> bytes | None:
    if path is None:
        return None
    secret = path.read_text().strip().encode()
    if len(secret) < MIN_SECRET:
        raise SystemExit(f"{path}: the registration secret must have at least {MIN_SECRET} characters")
    return secret


def secret_headers(path: Path | None) -> dict[str, str]:
    """The header a caller sends with a guarded request ({} without a secret: loopback only)."""
    secret = read_secret(path)
    return {SECRET_HEADER: secret.decode()} if secret else {}


class PeerGuard:
    """ASGI middleware: 403 on `paths` unless the peer is allowed (see the module doc)."""

    def __init__(self, app, secret: bytes | None, paths: set[str], what: str = "request"):
        self.app, self.secret, self.paths, self.what = app, secret, paths, what

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in self.paths and not self._allowed(scope):
            from fastapi.responses import JSONResponse

            peer = (scope.get("client") or ("?",))[0]
            why = "a wrong or missing registration secret" if self.secret else "a non-loopback peer"
            response = JSONResponse({"error": f"{self.what} refused: {why} ({peer})"}, status_code=403)
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
