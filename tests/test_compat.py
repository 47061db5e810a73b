"""Each shim in launch/compat.py: the failure without it, and the fix with it.

Run in fresh interpreters, since a shim patches FastChat's classes process-wide."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

STREAM_CHUNK = """
from fastchat.protocol.openai_api_protocol import ChatCompletionStreamResponse, ChatCompletionResponseStreamChoice, DeltaMessage
chunk = ChatCompletionStreamResponse(model="m", choices=[
    ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(content="café 你好"), finish_reason=None)])
print(chunk.json(exclude_unset=True, ensure_ascii=False))  # what openai_api_server streams
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_pydantic2_rejects_fastchats_stream_serialisation_without_the_shim():
    done = run(STREAM_CHUNK)
    assert done.returncode != 0 and "TypeError" in done.stderr


def test_shim_streams_unescaped_json():
    done = run("from launch import compat; compat.apply()\n" + STREAM_CHUNK)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert '"content":"café 你好"' in line and '"created"' not in line  # unset fields stay out
