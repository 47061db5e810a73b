"""End to end: `python -m eval.compare` against the running demo stack (fixture `demo_stack`
from tests/conftest.py), through the real FastChat OpenAI API, with real graders.

The run dir holds every file, report.html opens in headless Chromium without errors, a resumed
run asks nothing twice, and failing requests are recorded and set the exit code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from tests.test_eval_report import open_in_chromium

import eval as eval_pkg
from eval.graders.judge import PairwiseJudge
from eval.questions import load_question_set
from eval.runlog import ANSWERS, AnswerRecord, read_jsonl

pytestmark = pytest.mark.e2e

ROOT = Path(eval_pkg.__file__).resolve().parent.parent
SEED_EN = "conf/eval/seed-en.yaml"
MAX_TOKENS = "48"  # enough to see answers, small enough to keep the suite fast on a CPU


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval.compare", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)


def answers(run: Path, torn_lines: int = 0) -> list[AnswerRecord]:
    records, problems = read_jsonl(run / ANSWERS, AnswerRecord)
    assert len(problems) == torn_lines, problems
    return records


@pytest.fixture(scope="module")
def first_run(demo_stack, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    done = compare("--base-url", demo_stack.api_base, "--models", *demo_stack.models,
                   "--questions", SEED_EN, "--max-tokens", MAX_TOKENS, "--out", str(run))
    return demo_stack, run, done


def test_run_dir_holds_every_file(first_run):
    stack, run, done = first_run
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("run.json", "answers.jsonl", "grades.json", "report.md", "report.html",
                 "scores.png", "speed.png", "times.png"):
        assert (run / name).stat().st_size > 0, name
    n_questions = len(load_question_set(ROOT / SEED_EN).questions)
    recs = answers(run)
    assert sorted((r.model, r.question_id) for r in recs) == sorted(
        (m, q.id) for m in stack.models for q in load_question_set(ROOT / SEED_EN).questions)
    assert len(recs) == n_questions * len(stack.models)
    for r in recs:
        assert r.ok and r.content.strip(), r
        assert r.finish_reason in ("stop", "length")
        assert r.truncated == (r.finish_reason == "length")
        assert 0 < r.ttft_s <= r.total_s
        # FastChat sends no usage in the stream: the count comes from the model's tokenizer.
        assert r.tokens_source == "tokenizer" and 0 < r.completion_tokens <= int(MAX_TOKENS)
        assert r.tokens_per_s > 0
    md = (run / "report.md").read_text()
    assert md.index("## Dimensions") < md.index("## Speed")
    assert all(m in md for m in stack.models)
    # Every answer was graded; the progress bar and the summary went to the terminal.
    grades = json.loads((run / "grades.json").read_text())
    assert len(grades) == len(recs) and all(g["status"] in ("pass", "partial", "fail") for g in grades.values())
    assert "## Dimensions" in done.stdout and "100%" in done.stderr


def test_report_opens_in_chromium_without_errors(first_run):
    stack, run, _ = first_run
    page = open_in_chromium(run / "report.html")
    assert page["problems"] == []
    assert page["external"] == []
    assert page["images"] and all(ok for _, ok in page["images"])
    assert page["questions"] == 5 and page["columns"] == 5 * len(stack.models)


def test_resume_asks_nothing_twice(first_run):
    stack, run, _ = first_run
    done = compare("--resume", str(run), "--base-url", stack.api_base)
    assert done.returncode == 0, done.stderr
    assert "asking 0 of" in done.stdout

    # Lose the last two answers, as if the run had been killed, with a torn line at the end.
    lines = (run / ANSWERS).read_text().splitlines(keepends=True)
    kept = lines[:-2]
    (run / ANSWERS).write_text("".join(kept) + lines[-1][:25])
    done = compare("--resume", str(run), "--base-url", stack.api_base)
    assert done.returncode == 0, done.stderr
    assert "asking 2 of" in done.stdout
    recs = answers(run, torn_lines=1)
    keys = [(r.model, r.question_id) for r in recs]
    assert len(keys) == len(set(keys)) == len(lines), "each answer exactly once"
    text = (run / ANSWERS).read_text()
    assert text.startswith("".join(kept)), "earlier answers are kept as they were"


def test_failing_requests_are_recorded_and_set_the_exit_code(demo_stack, tmp_path):
    # The gateway rejects temperature > 2 with HTTP 400, a real failure on every request.
    run = tmp_path / "bad"
    done = compare("--base-url", demo_stack.api_base, "--models", demo_stack.models[0], "--questions", SEED_EN,
                   "--max-tokens", "8", "--temperature", "2.5", "--out", str(run))
    assert done.returncode == 1, done.stdout + done.stderr
    recs = answers(run)
    assert len(recs) == 5 and all(r.error and r.error.startswith("HTTP 400") for r in recs)
    assert "--resume" in done.stderr
    assert (run / "report.html").exists() and "error" in (run / "report.md").read_text()


def test_judge_asks_both_orders(demo_stack):
    client = openai.OpenAI(base_url=demo_stack.api_base, api_key="none", timeout=300, max_retries=0)
    judge = PairwiseJudge(client, demo_stack.models[0], max_tokens=24)
    rec = judge.judge("capital", "What is the capital of France?", "x", "Paris.", "y", "Berlin.")
    assert rec.ok, rec.error
    assert rec.raw_first and rec.raw_second  # two real generations, positions swapped
    assert rec.winner in ("x", "y", "tie")
    if rec.winner == "tie":
        assert rec.reason
