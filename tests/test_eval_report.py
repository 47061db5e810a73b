"""The report and the CLI's offline paths, on a run directory of hand-written answers: resuming a
complete run asks nothing (no gateway needed) and rewrites every report file; report.html opens
in headless Chromium without errors. Usage mistakes exit 2 with a readable message."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from eval.questions import load_question_set
from eval.report import _fence
from eval.runlog import (
    ANSWERS,
    AnswerRecord,
    JsonlLog,
    RunInfo,
    latest_answers,
    read_jsonl,
    write_run_info,
)

ROOT = Path(__file__).resolve().parent.parent
SEED_EN = "conf/eval/seed-en.yaml"
CHROMIUM = "/usr/bin/chromium"

ANSWERS_A = {
    "q1-winter-summer": "It is ambiguous: in winter it means wear as many clothes as possible; in summer, as little as possible.",
    "q2-mdp": "An MDP has states, actions, transition probabilities, rewards, a policy and a discount factor γ.",
    "q3-euler": "If gcd(a, n) = 1 then a^φ(n) ≡ 1 (mod n), where φ is Euler's totient function.",
    "q4-seating": "E is in seat 5, so A = 2 and B = 4; C and D get 1 and 3, not adjacent: no valid arrangement exists.",
    "q5-partition": "```cpp\nclass Solution { public: bool canPartition(vector<int>& v) { int s = 0; for (int x : v) s += x;"
    " if (s % 2) return false; vector<char> d(s / 2 + 1); d[0] = 1; for (int x : v) for (int j = s / 2; j >= x; --j)"
    " d[j] |= d[j - x]; return d[s / 2]; } };\n```",
}
ANSWERS_B = {
    "q1-winter-summer": "Both sentences say the same thing.",
    "q2-mdp": "A Markov decision process is a process with states and actions.",
    "q3-euler": "Euler's theorem: for a convex polyhedron V − E + F = 2.",
    "q4-seating": "The order is B, C, D, A, E.",
    "q5-partition": "```cpp\n#include <vector>\nbool canPartition(std::vector<int>& v) { return v.size() % 2 == 0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_gateway() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval.compare", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def record(model: str, qid: str, content: str, **kw) -> AnswerRecord:
    qs = load_question_set(ROOT / SEED_EN)
    base = {"model": model, "question_id": qid, "prompt_sha": qs.question(qid).prompt_sha, "content": content,
            "finish_reason": "stop", "ttft_s": 0.2, "total_s": 2.0, "completion_tokens": 40,
            "tokens_source": "tokenizer", "tokens_per_s": 20.0, "max_tokens": 64, "temperature": 0.0,
            "asked_at": "2026-01-01T00:00:00+00:00"}
    return AnswerRecord(**(base | kw))


def make_finished_run(run: Path) -> Path:
    """A complete run of two models, written the way eval.compare writes one."""
    run.mkdir()
    write_run_info(run, RunInfo(questions=SEED_EN, question_set="seed-en", models=["model-a", "model-b"],
                                max_tokens=64, temperature=0.0, base_url=closed_gateway(),
                                started_at="2026-01-01T00:00:00+00:00"))
    with JsonlLog(run / ANSWERS) as log:
        for qid, text in ANSWERS_A.items():
            log.append(record("model-a", qid, text))
        for qid, text in ANSWERS_B.items():
            trunc = qid == "q5-partition"
            log.append(record("model-b", qid, text, finish_reason="length" if trunc else "stop", truncated=trunc))
    return run


@pytest.fixture
def finished_run(tmp_path) -> Path:
    return make_finished_run(tmp_path / "run")


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A finished run, resumed once: (run dir, answers.jsonl before, the finished process)."""
    run = make_finished_run(tmp_path_factory.mktemp("resumed") / "run")
    before = (run / ANSWERS).read_bytes()
    # run.json names a closed gateway: the resume must not need one.
    return run, before, compare("--resume", str(run))


def open_in_chromium(html: Path) -> dict:
    """Load a page from disk in headless Debian Chromium; console errors, page errors and
    requests that failed, plus what a reader would look for."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (the report check needs a real browser)")
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(html.resolve().as_uri(), wait_until="load")
            info = page.evaluate("""() => ({
                images: Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0]),
                external: Array.from(document.querySelectorAll('[src],link[href]'))
                               .map(e => e.getAttribute('src') || e.getAttribute('href'))
                               .filter(u => !u.startsWith('data:')),
                questions: document.querySelectorAll('section.question').length,
                columns: document.querySelectorAll('section.question .col').length,
                badges: Array.from(document.querySelectorAll('section.question .badge')).map(b => b.textContent.trim()),
                headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent.trim()),
            })""")
        finally:
            browser.close()
    return info | {"problems": problems}


def test_resume_of_a_complete_run_asks_nothing_and_writes_every_report(resumed_run):
    finished_run, before, done = resumed_run
    assert done.returncode == 0, done.stderr
    assert "asking 0 of 10 answers" in done.stdout
    assert (finished_run / ANSWERS).read_bytes() == before
    for name in ("report.md", "report.html", "grades.json", "scores.png", "speed.png", "times.png", "run.json"):
        assert (finished_run / name).stat().st_size > 0, name
    for png in ("scores.png", "speed.png", "times.png"):
        assert (finished_run / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    grades = json.loads((finished_run / "grades.json").read_text())
    assert {k: v["status"] for k, v in grades.items() if k.startswith("model-a/")} == dict.fromkeys(
        [f"model-a/{q}" for q in ANSWERS_A], "pass")
    assert grades["model-b/q4-seating"]["status"] == "fail"
    assert grades["model-b/q3-euler"]["flags"][0].startswith("mix-up")
    assert "truncated at max_tokens=64" in grades["model-b/q5-partition"]["flags"]

    md = (finished_run / "report.md").read_text()
    # The report ends with the dimension table, then the speed table.
    assert md.index("## Dimensions") < md.index("## Speed") and md.rindex("## Q5.") < md.index("## Dimensions")
    assert "| **Total score** | **5.00 / 5** | **" in md
    assert "**truncated** at max_tokens" in md
    # The terminal summary is the same pair of tables.
    assert "## Dimensions" in done.stdout and "| model-a | 5/5 | 0 | 0 |" in done.stdout


def test_report_html_opens_in_chromium_without_errors(resumed_run):
    run, _, done = resumed_run
    assert done.returncode == 0, done.stderr
    page = open_in_chromium(run / "report.html")
    assert page["problems"] == []
    assert page["external"] == [], "the report must be self-contained"
    assert [ok for _, ok in page["images"]] == [True, True, True]
    assert page["questions"] == 5 and page["columns"] == 10  # two models side by side per question
    assert "truncated" in page["badges"]
    assert page["headings"][-2:] == ["Dimensions", "Speed"]


def test_unreachable_gateway_is_a_clear_startup_error(tmp_path):
    done = compare("--questions", SEED_EN, "--base-url", closed_gateway(), "--out", str(tmp_path / "r"))
    assert done.returncode == 2
    assert "cannot reach the gateway" in done.stderr and "make up" in done.stderr
    assert "Traceback" not in done.stderr


def test_resume_needs_a_run_dir_and_keeps_its_settings(tmp_path, finished_run):
    done = compare("--resume", str(tmp_path))
    assert done.returncode == 2 and "is not a run directory" in done.stderr
    done = compare("--resume", str(finished_run), "--max-tokens", "512")
    assert done.returncode == 2 and "was run with --max-tokens 64" in done.stderr
    done = compare("--out", str(finished_run), "--questions", SEED_EN)
    assert done.returncode == 2 and "already holds a run" in done.stderr


def test_bad_question_set_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nlanguage: en\ndimensions: {x: X}\nquestions: [{id: a, title: A, dimension: x, prompt: '?'}]\n")
    done = compare("--questions", str(bad), "--out", str(tmp_path / "r"), "--base-url", closed_gateway())
    assert done.returncode == 2
    assert f"{bad}: questions[0] (a).grader: Field required" in done.stderr


def test_a_torn_last_line_is_skipped_and_the_next_answer_starts_a_new_line(tmp_path):
    path = tmp_path / ANSWERS
    with JsonlLog(path) as log:
        log.append(record("m", "q2-mdp", "states"))
    with open(path, "a") as f:
        f.write('{"model": "m", "question_id": "q3-eu')  # killed mid-write
    with JsonlLog(path) as log:
        log.append(record("m", "q3-euler", "totient"))
    records, problems = read_jsonl(path, AnswerRecord)
    assert [r.question_id for r in records] == ["q2-mdp", "q3-euler"]
    assert len(problems) == 1 and ":2: skipped" in problems[0]


def test_a_later_answer_replaces_a_failed_one():
    recs = [record("m", "q2-mdp", "", error="HTTP 500: boom"), record("m", "q2-mdp", "states")]
    assert latest_answers(recs)[("m", "q2-mdp")].ok


def test_answers_with_fences_stay_fenced():
    text = "code:\n```cpp\nint x;\n```\nand ````four````"
    fenced = _fence(text)
    assert fenced.startswith("`````text\n") and fenced.endswith("\n`````")
