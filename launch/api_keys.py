"""API keys of the gateway: a file with one key per line, plus $LLMD_API_KEYS (comma-separated)."""

from __future__ import annotations

import os
from pathlib import Path

KEYS_ENV = "LLMD_API_KEYS"


def load_keys(keys_file: Path | None) -> set[str]:
    keys = {k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()}
    if keys_file is not None:
        lines = keys_file.read_text().splitlines()
        keys |= {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
    return keys
