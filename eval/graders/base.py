"""What every grader returns, and the one rule that turns a score into pass/partial/fail."""

from __future__ import annotations

import re
import unicodedata
from typing import Literal, Protocol

from pydantic import BaseModel, Field

Status = Literal["pass", "partial", "fail"]


class Verdict(BaseModel):
    """One grader's judgement of one answer; score is 0..1 so dimensions can be summed."""

    status: Status
    score: float = Field(ge=0.0, le=1.0)
    reason: str
    # Evidence a reader can check by hand: matched rubric items, failing test cases,
    # constraints an asserted seating breaks, compiler errors.
    details: list[str] = Field(default_factory=list)
    # Warnings that do not change the score's sign, e.g. "mix-up: polyhedron formula".
    flags: list[str] = Field(default_factory=list)


class Grader(Protocol):
    def grade(self, answer: str) -> Verdict: ...


def status_for(score: float, pass_at: float, partial_at: float) -> Status:
    # A small epsilon keeps 0.8 == 4/5 from falling just short through float rounding.
    if score + 1e-9 >= pass_at:
        return "pass"
    if score > 0 and score + 1e-9 >= partial_at:
        return "partial"
    return "fail"


def normalize(text: str) -> str:
    """NFKC folds full-width punctuation and letters (，（Ａ）) onto ASCII so one regex covers
    both the zh and en spellings a model may use."""
    return unicodedata.normalize("NFKC", text)


def check_patterns(patterns: list[str]) -> list[str]:
    """Validator body for regex lists in question sets: each must compile once normalized."""
    for p in patterns:
        try:
            re.compile(normalize(p))
        except re.error as e:
            raise ValueError(f"invalid regex {p!r}: {e}") from None
    return patterns
