"""The OpenAI-compatible API: FastChat's server, shimmed, behind the project's gateway.

    python -m launch.api_server --host 127.0.0.1 --port 8000 \\
        --controller-address http://127.0.0.1:21001 [--keys-file conf/api-keys]

Takes FastChat's arguments (`python -m fastchat.serve.openai_api_server --help`) except
--api-keys: keys come from --keys-file and $LLMD_API_KEYS, so that they never appear on a
command line or in a log.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launch import compat, gateway
from launch.api_keys import load_keys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--keys-file", type=Path)
    parser.add_argument("--expect-models", default="", help="configured model names, comma-separated")
    ours, fastchat_args = parser.parse_known_args(argv)
    if any(a.startswith("--api-keys") for a in fastchat_args):
        sys.exit("--api-keys would put keys in the process list and logs: use --keys-file or $LLMD_API_KEYS")
    compat.apply()
    import uvicorn
    from fastchat.serve import openai_api_server as server

    sys.argv = [sys.argv[0], *fastchat_args]
    args = server.create_openai_api_server()
    gateway.install(load_keys(ours.keys_file), {m for m in ours.expect_models.split(",") if m})
    tls = {"ssl_keyfile": os.environ["SSL_KEYFILE"], "ssl_certfile": os.environ["SSL_CERTFILE"]} if args.ssl else {}
    uvicorn.run(server.app, host=args.host, port=args.port, log_level="info", **tls)


if __name__ == "__main__":
    main()
