"""FastChat's OpenAI-compatible API server, with the project's compatibility shims.

    python -m launch.api_server --host 127.0.0.1 --port 8000 \\
        --controller-address http://127.0.0.1:21001

Takes exactly FastChat's arguments (`python -m fastchat.serve.openai_api_server --help`).
"""

from __future__ import annotations

import os

from launch import compat


def main() -> None:
    compat.apply()
    import uvicorn
    from fastchat.serve import openai_api_server as server

    args = server.create_openai_api_server()
    tls = {"ssl_keyfile": os.environ["SSL_KEYFILE"], "ssl_certfile": os.environ["SSL_CERTFILE"]} if args.ssl else {}
    uvicorn.run(server.app, host=args.host, port=args.port, log_level="info", **tls)


if __name__ == "__main__":
    main()
