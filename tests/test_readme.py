"""The README's API examples work as printed (only the port is the test stack's)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def on_stack(code: str, stack) -> str:
    return code.replace("http://127.0.0.1:8000/v1", stack.api_base)


def test_curl_examples(demo_stack):
    [curl] = [b for b in blocks("bash") if "curl" in b]
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", on_stack(curl, demo_stack)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"id":"smollm2-135m"' in done.stdout and "Paris" in done.stdout


def test_openai_example(demo_stack):
    [code] = [b for b in blocks("python") if "OpenAI(" in b]
    done = subprocess.run([sys.executable, "-c", on_stack(code, demo_stack)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_readme_states_the_commands_urls_and_ports():
    for needle in ("make up", "make test", "make down", "make status", "make logs",
                   "http://127.0.0.1:8000/v1", "http://127.0.0.1:7860", "~/.cache/llm-deployment", "run/logs"):
        assert needle in README
