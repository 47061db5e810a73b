"""python -m eval.compare: ask every model the same questions through the OpenAI-compatible
gateway, grade the answers automatically, and write a side-by-side report.

    python -m eval.compare                         # all served models, the profile's question set
    python -m eval.compare --models chatglm3-6b qwen-7b-chat --questions conf/eval/seed-zh.yaml \\
           --max-tokens 512 --out runs/2026-01-01/
    python -m eval.compare --resume runs/2026-01-01/   # ask only what is missing, then report again

The run directory gets run.json, answers.jsonl (appended and flushed per answer), grades.json,
judge.jsonl (with --judge), report.md, report.html (self-contained) and PNG charts.
Exit code: 0 every answer (and judgement) arrived; 1 something failed and is recorded in the
report; 2 the run could not start (bad arguments, question set, unreachable gateway);
130 interrupted (everything answered so far is kept: resume it).
"""

from __future__ import annotations

import argparse
import json
import itertools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import openai
import yaml
from tqdm import tqdm

from .client import TokenCounter, ask, default_api_key, list_models, make_client
from .graders import Verdict, build_grader
from .graders.judge import JudgeRecord, PairwiseJudge, answers_sha
from .questions import QuestionSet, QuestionSetError, load_question_set
from .report import judge_table, summary_tables, write_reports
from .runlog import (
    ANSWERS,
    JUDGMENTS,
    RUN_INFO,
    AnswerRecord,
    JsonlLog,
    RunInfo,
    latest_answers,
    read_jsonl,
    read_run_info,
    write_run_info,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class UsageError(Exception):
    """Something the user can fix before the run starts; printed without a traceback."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"eval.compare: {e}", file=sys.stderr)
        return 2
    except QuestionSetError as e:
        print(f"eval.compare: bad question set:\n{e}", file=sys.stderr)
        return 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.compare",
        description="Ask the deployed models the same questions, grade the answers, write a side-by-side report.",
    )
    p.add_argument("--models", nargs="+", metavar="MODEL", help="models to compare (default: every model the gateway serves)")
    p.add_argument("--questions", metavar="YAML", help="question set, conf/eval/*.yaml (default: the one the stack's profile names)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="completion token limit per answer (default 512)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0: reproducible)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", metavar="DIR", help="new run directory (default runs/<UTC timestamp>/)")
    out.add_argument("--resume", metavar="RUNDIR", help="continue a run: ask only what is missing or failed")
    p.add_argument("--concurrency", type=int, metavar="N",
                   help="requests in flight at once across models (default: one per model)")
    p.add_argument("--per-model", type=int, default=1, metavar="N",
                   help="requests in flight per model (default 1: sequential per model)")
    p.add_argument("--judge", metavar="MODEL", help="also judge every pair of answers with this model (MT-bench pairwise)")
    p.add_argument("--judge-base-url", metavar="URL", help="OpenAI-compatible base URL of the judge (default: --base-url)")
    p.add_argument("--base-url", default=os.environ.get("EVAL_BASE_URL", DEFAULT_BASE_URL), metavar="URL",
                   help=f"OpenAI-compatible gateway (default {DEFAULT_BASE_URL})")
    p.add_argument("--api-key", default=default_api_key(), metavar="KEY",
                   help="API key for the gateway (OpenAI API and token counting) and the judge "
                        "(default: the first key of $LLMD_API_KEYS, else none)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for the next streamed data before giving up on an answer (default 600)")
    args = p.parse_args(argv)
    for name in ("max_tokens", "concurrency", "per_model"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def run(args: argparse.Namespace) -> int:
    run_dir, info, qs = prepare(args)
    client = None

    def gateway():
        nonlocal client
        if client is None:
            client = make_client(info.base_url, args.api_key, args.timeout)
        return client

    # Models: the run's own list on resume, else the command line, else what the gateway serves.
    ask_models = args.models or ([] if not args.resume else list(info.models))
    if not ask_models:
        ask_models = served_models(gateway(), info.base_url)
        if not ask_models:
            raise UsageError(f"the gateway at {info.base_url} serves no models yet (is a worker still loading?)")
    ask_models = list(dict.fromkeys(ask_models))
    info.models = list(dict.fromkeys(info.models + ask_models))
    write_run_info(run_dir, info)

    records, problems = read_jsonl(run_dir / ANSWERS, AnswerRecord)
    for msg in problems:
        print(f"warning: {msg}", file=sys.stderr)
    latest = latest_answers(records)
    todo = {m: [q for q in qs.questions if _missing(latest.get((m, q.id)), q.prompt_sha)] for m in ask_models}
    n_todo = sum(len(v) for v in todo.values())
    print(f"run dir: {run_dir}")
    print(f"question set: {qs.name} ({qs.path}), {len(qs.questions)} questions; models: {', '.join(ask_models)}")
    print(f"asking {n_todo} of {len(ask_models) * len(qs.questions)} answers (max_tokens={info.max_tokens}, temperature={info.temperature:g})")

    if n_todo:
        check_models(gateway(), info.base_url, [m for m, qsx in todo.items() if qsx])
        counter = TokenCounter(info.base_url, args.api_key, warn=lambda msg: tqdm.write(msg, file=sys.stderr))
        interrupted = ask_all(gateway(), counter, info, todo, run_dir, args)
        records, _ = read_jsonl(run_dir / ANSWERS, AnswerRecord)
        latest = latest_answers(records)
        if interrupted:
            done = sum(1 for m in ask_models for q in qs.questions if not _missing(latest.get((m, q.id)), q.prompt_sha))
            print(f"\ninterrupted: {done} answers are saved in {run_dir}; continue with\n"
                  f"  python -m eval.compare --resume {run_dir}", file=sys.stderr)
            return 130

    answers = {(m, q.id): latest.get((m, q.id)) for m in info.models for q in qs.questions}
    verdicts = grade_all(qs, answers)
    judgments: list[JudgeRecord] = []
    if args.judge:
        judge_client = make_client(args.judge_base_url or info.base_url, args.api_key, args.timeout)
        judgments = judge_all(PairwiseJudge(judge_client, args.judge), qs, info.models, answers, run_dir)

    paths = write_reports(run_dir, qs, info, answers, verdicts, judgments)
    print()
    print(summary_tables(qs, info.models, answers, verdicts))
    if judgments:
        print(f"\n## Judge {args.judge} (pairwise, both orders)\n\n{judge_table(judgments)}")
    print("\nwrote " + ", ".join(str(p.relative_to(run_dir)) for p in paths) + f" in {run_dir}")

    failed = [a for a in answers.values() if a is None or not a.ok]
    failed_judge = [j for j in judgments if not j.ok]
    if failed or failed_judge:
        print(f"{len(failed)} answer(s) and {len(failed_judge)} judgement(s) failed; see the report. "
              f"Retry them with: python -m eval.compare --resume {run_dir}", file=sys.stderr)
        return 1
    return 0


def prepare(args: argparse.Namespace) -> tuple[Path, RunInfo, QuestionSet]:
    """Resolve the run directory, its settings and the question set, checking that a resumed
    run keeps the settings its earlier answers were asked with."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / RUN_INFO).exists():
            raise UsageError(f"{run_dir} is not a run directory (no {RUN_INFO}); start one with --out")
        info = read_run_info(run_dir)
        for flag, new, old in (
            ("--questions", args.questions and str(Path(args.questions)), info.questions),
            ("--max-tokens", args.max_tokens, info.max_tokens),
            ("--temperature", args.temperature, info.temperature),
        ):
            if new is not None and new != old:
                raise UsageError(f"{run_dir} was run with {flag} {old}; answers asked with {new} would not be "
                                 f"comparable. Start a new run with --out instead.")
        if args.base_url != info.base_url and args.base_url != DEFAULT_BASE_URL:
            info.base_url = args.base_url  # the gateway may have moved; the answers stay valid
        qs = load_question_set(_find(info.questions))
        return run_dir, info, qs

    questions = args.questions or default_question_set()
    qs = load_question_set(_find(questions))
    run_dir = Path(args.out) if args.out else Path("runs") / datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    if (run_dir / ANSWERS).exists() or (run_dir / RUN_INFO).exists():
        raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    info = RunInfo(
        questions=str(Path(questions)), question_set=qs.name, models=[],
        max_tokens=args.max_tokens or 512,
        temperature=args.temperature if args.temperature is not None else 0.0,
        base_url=args.base_url,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return run_dir, info, qs


def default_question_set() -> str:
    """The question set of the stack's profile: `questions:` in conf/profiles/NAME.yaml, where
    NAME is $PROFILE (as in `make up PROFILE=seed`), else the profile the running stack was
    started with, else demo."""
    profile = os.environ.get("PROFILE") or running_profile() or "demo"
    prof_file = CONF_DIR / "profiles" / f"{profile}.yaml"
    try:
        prof = yaml.safe_load(prof_file.read_text(encoding="utf-8")) or {}
    except OSError:
        raise UsageError(f"no profile {profile!r} ({prof_file} is missing); pass --questions") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{prof_file}: not valid YAML ({e}); pass --questions") from None
    name = prof.get("questions") if isinstance(prof, dict) else None
    if not name:
        raise UsageError(f"{prof_file}: names no question set ('questions:'); pass --questions")
    path = CONF_DIR / "eval" / (name if str(name).endswith((".yaml", ".yml")) else f"{name}.yaml")
    # Relative to the repository, so run.json reads the same on every checkout.
    return str(path.relative_to(CONF_DIR.parent))


def running_profile() -> str | None:
    """The profile of the stack `make up` last brought up (run/deployment.json)."""
    from launch.config import ConfigError, load_stack

    try:
        up = json.loads((load_stack(CONF_DIR).run_dir / "deployment.json").read_text(encoding="utf-8"))
        return str(up["profile"])
    except (ConfigError, OSError, ValueError, KeyError, TypeError):
        return None


def _find(questions: str) -> Path:
    """run.json keeps the question set's path as given; a resume from another directory still
    finds a path that was relative to the repository."""
    p = Path(questions)
    if not p.is_absolute() and not p.exists() and (CONF_DIR.parent / p).exists():
        return CONF_DIR.parent / p
    return p


def _missing(rec: AnswerRecord | None, prompt_sha: str) -> bool:
    return rec is None or not rec.ok or rec.prompt_sha != prompt_sha


def served_models(client, base_url: str) -> list[str]:
    try:
        return list_models(client)
    except openai.APIConnectionError as e:
        raise UsageError(f"cannot reach the gateway at {base_url} ({e.__cause__ or e}). Is the stack up (make up)?") from None
    except openai.APIStatusError as e:
        raise UsageError(f"the gateway at {base_url} refused to list models: HTTP {e.status_code} {e.message}") from None


def check_models(client, base_url: str, wanted: list[str]) -> None:
    served = served_models(client, base_url)
    unknown = [m for m in wanted if m not in served]
    if unknown:
        raise UsageError(f"not served by {base_url}: {', '.join(unknown)}; served: {', '.join(served) or 'none'}")


def ask_all(client, counter: TokenCounter, info: RunInfo, todo: dict, run_dir: Path, args) -> bool:
    """Ask everything in todo; models in parallel (bounded by --concurrency), each model's
    questions in order (--per-model at a time). Returns True when interrupted by Ctrl-C."""
    models = [m for m, qs in todo.items() if qs]
    slots = threading.Semaphore(args.concurrency or max(1, len(models) * args.per_model))
    stop = threading.Event()
    width = max(len(m) for m in models)
    bars = {m: tqdm(total=len(todo[m]), desc=m.ljust(width), unit="q", position=i, leave=True, dynamic_ncols=True)
            for i, m in enumerate(models)}
    log = JsonlLog(run_dir / ANSWERS)

    def worker(model: str, queue: list, lock: threading.Lock) -> None:
        while not stop.is_set():
            with lock:
                if not queue:
                    return
                q = queue.pop(0)
            with slots:
                if stop.is_set():
                    return
                rec = ask(client, counter, model, q, info.max_tokens, info.temperature)
            log.append(rec)
            if rec.error:
                bars[model].write(f"{model} / {q.id}: {rec.error}")
            else:
                bars[model].set_postfix_str(f"{q.id} {rec.tokens_per_s or 0:.1f} tok/s", refresh=False)
            bars[model].update(1)

    threads = []
    for m in models:
        queue, lock = list(todo[m]), threading.Lock()
        for _ in range(args.per_model):
            t = threading.Thread(target=worker, args=(m, queue, lock), daemon=True)
            t.start()
            threads.append(t)
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # short joins keep Ctrl-C responsive
    except KeyboardInterrupt:
        stop.set()
        return True
    finally:
        for b in bars.values():
            b.close()
        if not stop.is_set():
            log.close()
    return False


def grade_all(qs: QuestionSet, answers: dict) -> dict[tuple[str, str], Verdict]:
    graders = {q.id: build_grader(q.grader) for q in qs.questions}
    jobs = [(key, rec) for key, rec in answers.items()]

    def grade(item) -> tuple[tuple[str, str], Verdict]:
        (model, qid), rec = item
        if rec is None:
            return (model, qid), Verdict(status="fail", score=0.0, reason="not asked")
        if not rec.ok:
            return (model, qid), Verdict(status="fail", score=0.0, reason=f"no answer: {rec.error}")
        if not rec.content.strip():
            return (model, qid), Verdict(status="fail", score=0.0, reason="empty answer")
        v = graders[qid].grade(rec.content)
        if rec.truncated:
            v.flags.append(f"truncated at max_tokens={rec.max_tokens}")
        return (model, qid), v

    # Compiling C++ dominates; two at a time suits the small machines this runs on.
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as ex:
        results = list(tqdm(ex.map(grade, jobs), total=len(jobs), desc="grading", unit="ans", leave=False))
    return dict(results)


def judge_all(judge: PairwiseJudge, qs: QuestionSet, models: list[str], answers: dict, run_dir: Path) -> list[JudgeRecord]:
    """Every pair of models on every question both answered; resumable through judge.jsonl."""
    old, problems = read_jsonl(run_dir / JUDGMENTS, JudgeRecord)
    for msg in problems:
        print(f"warning: {msg}", file=sys.stderr)
    done = {(j.judge, j.question_id, j.model_a, j.model_b, j.answers_sha): j for j in old if j.ok}
    pairs = []
    for q in qs.questions:
        for a, b in itertools.combinations(models, 2):
            ra, rb = answers.get((a, q.id)), answers.get((b, q.id))
            if ra is None or rb is None or not ra.ok or not rb.ok:
                continue
            pairs.append((q, a, ra.content, b, rb.content))
    if len(models) < 2:
        print("judge: needs at least two models; skipped", file=sys.stderr)
    out: list[JudgeRecord] = []
    with JsonlLog(run_dir / JUDGMENTS) as log:
        for q, a, ca, b, cb in tqdm(pairs, desc=f"judge {judge.model}", unit="pair"):
            key = (judge.model, q.id, a, b, answers_sha(ca, cb))
            if key in done:
                out.append(done[key])
                continue
            rec = judge.judge(q.id, q.prompt, a, ca, b, cb)
            log.append(rec)
            out.append(rec)
            if rec.error:
                tqdm.write(f"judge / {q.id}: {rec.error}")
    return out


if __name__ == "__main__":
    sys.exit(main())
