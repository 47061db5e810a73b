"""One small class per grader. Each takes its typed spec (from the question-set YAML) and
grades one answer text into a Verdict: pass/partial/fail, a 0..1 score and the reason.

    grader = build_grader(question.grader); verdict = grader.grade(answer_text)

The pairwise LLM judge (judge.py) is different in kind: it compares two answers through a
model, so compare.py drives it separately.
"""

from __future__ import annotations

from .base import Grader, Verdict
from .code import CodeGrader, CodeSpec
from .logic import LogicSpec, SeatingGrader
from .rubric import RubricGrader, RubricSpec

__all__ = ["Grader", "Verdict", "build_grader"]


def build_grader(spec: CodeSpec | LogicSpec | RubricSpec) -> Grader:
    if isinstance(spec, CodeSpec):
        return CodeGrader(spec)
    if isinstance(spec, LogicSpec):
        return SeatingGrader(spec)
    if isinstance(spec, RubricSpec):
        return RubricGrader(spec)
    raise TypeError(f"no grader for {type(spec).__name__}")
