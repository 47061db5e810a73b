"""The benchmarks run and report what they promise (numbers are for docs, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_gateway_bench_runs_against_the_demo_stack(demo_stack, tmp_path):
    out = tmp_path / "gateway.json"
    done = subprocess.run(
        [sys.executable, "-m", "eval.bench", "gateway", "--base-url", demo_stack.api_base,
         "--controller", demo_stack.controller_url, "--concurrency", "2", "--duration", "3", "--rounds", "1",
         "--max-tokens", "8", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["overhead"]["tokens"] > 1 and result["overhead"]["ratio"] > 0
    assert result["load"]["errors"] == 0 and result["load"]["requests"] >= 2
    assert result["load"]["completion_tokens"] > 0
    assert "gateway/direct tokens/s at concurrency 1" in done.stdout
