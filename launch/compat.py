"""Shims that keep the frozen fschat 0.2.36 working on today's libraries.

Each shim is small, applied by the launchers before FastChat runs, and has a test in
tests/test_compat.py that shows the failure it prevents.
"""

from __future__ import annotations

import inspect


def apply() -> None:
    pydantic2_stream_json()


def pydantic2_stream_json() -> None:
    """FastChat's API server streams `chunk.json(exclude_unset=True, ensure_ascii=False)`:
    pydantic 2 refuses `ensure_ascii` with a TypeError, which ends every stream after the
    first line. `model_dump_json` already writes non-ASCII text unescaped."""
    from pydantic import BaseModel

    from fastchat.protocol import api_protocol, openai_api_protocol

    def json(self, *, ensure_ascii: bool = False, **kwargs) -> str:  # noqa: ARG001 (always False here)
        return self.model_dump_json(**kwargs)

    for module in (openai_api_protocol, api_protocol):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseModel) and cls.__module__ == module.__name__:
                cls.json = json
