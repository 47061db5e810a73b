"""The run directory's durable state: run.json (what was asked, how) and append-only JSONL logs.

Every answer is appended and flushed to answers.jsonl the moment it arrives, so an interrupted
run loses nothing; `--resume` reads the log back and asks only for what is missing. When an
answer is asked again (it failed, or the question's wording changed) the new line is appended
and the last line for a (model, question) wins.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Self, TypeVar

from pydantic import BaseModel, ValidationError

ANSWERS = "answers.jsonl"
JUDGMENTS = "judge.jsonl"
RUN_INFO = "run.json"


class AnswerRecord(BaseModel):
    model: str
    question_id: str
    prompt_sha: str
    content: str
    error: str | None = None
    finish_reason: str | None = None
    truncated: bool = False
    ttft_s: float | None = None
    total_s: float | None = None
    completion_tokens: int | None = None
    tokens_source: str = "none"  # usage | tokenizer | chunks | none
    tokens_per_s: float | None = None
    max_tokens: int
    temperature: float
    asked_at: str

    @property
    def ok(self) -> bool:
        return self.error is None


class RunInfo(BaseModel):
    """Settings a resumed run must keep, so old and new answers stay comparable."""

    questions: str
    question_set: str
    models: list[str]
    max_tokens: int
    temperature: float
    base_url: str
    started_at: str


Rec = TypeVar("Rec", bound=BaseModel)


class JsonlLog:
    """Thread-safe append-only JSONL writer; each line is flushed and fsynced before returning."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        # A run killed mid-write can leave a partial last line; start ours on a fresh line.
        needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the whole run
        if needs_newline:
            self._f.write("\n")

    def append(self, record: BaseModel) -> None:
        line = json.dumps(record.model_dump(mode="json"), ensure_ascii=False)
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            self._f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: Path, model: type[Rec]) -> tuple[list[Rec], list[str]]:
    """Records in file order, and a note for every line that could not be read (skipped)."""
    records: list[Rec] = []
    problems: list[str] = []
    if not path.exists():
        return records, problems
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(model.model_validate_json(line))
            except ValidationError as e:
                problems.append(f"{path}:{n}: skipped unreadable line ({e.errors()[0]['msg']})")
    return records, problems


def latest_answers(records: list[AnswerRecord]) -> dict[tuple[str, str], AnswerRecord]:
    out: dict[tuple[str, str], AnswerRecord] = {}
    for r in records:
        out[(r.model, r.question_id)] = r
    return out


def write_run_info(run_dir: Path, info: RunInfo) -> None:
    tmp = run_dir / (RUN_INFO + ".tmp")
    tmp.write_text(info.model_dump_json(indent=2) + "\n", encoding="utf-8")
    tmp.replace(run_dir / RUN_INFO)


def read_run_info(run_dir: Path) -> RunInfo:
    return RunInfo.model_validate_json((run_dir / RUN_INFO).read_text(encoding="utf-8"))
