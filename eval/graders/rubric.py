"""Rubric grader for knowledge and language questions: weighted items, each a list of regex
alternatives (zh and en side by side), with partial credit. The rubric text lives in
conf/eval/*.yaml; this file only knows how to apply it."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .base import Verdict, check_patterns, normalize, status_for


class RubricItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    label: str
    weight: float = Field(default=1.0, gt=0)
    # Any one of these regexes (case-insensitive, matched on NFKC-normalised text) hits the item.
    any: list[str] = Field(min_length=1)

    @field_validator("any")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        return check_patterns(patterns)

    def hits(self, text: str) -> str | None:
        """The first matching snippet, so the report can show why an item was credited."""
        for p in self.any:
            m = re.search(normalize(p), text, re.IGNORECASE | re.MULTILINE)
            if m:
                return m.group(0)
        return None


class RubricAlternative(BaseModel):
    """A different but related answer that earns reduced credit and a flag, e.g. Euler's
    polyhedron formula given for Euler's theorem."""

    model_config = ConfigDict(extra="forbid")

    id: str
    label: str
    credit: float = Field(default=0.5, gt=0, le=1)
    flag: str
    items: list[RubricItem] = Field(min_length=1)


class RubricSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["rubric"]
    pass_at: float = Field(default=0.8, gt=0, le=1)
    partial_at: float = Field(default=0.3, ge=0, le=1)
    items: list[RubricItem] = Field(min_length=1)
    alternatives: list[RubricAlternative] = Field(default_factory=list)

    @model_validator(mode="after")
    def _thresholds(self) -> RubricSpec:
        if self.partial_at > self.pass_at:
            raise ValueError(f"partial_at ({self.partial_at}) must not exceed pass_at ({self.pass_at})")
        return self


def _score(items: list[RubricItem], text: str) -> tuple[float, list[str]]:
    total = sum(i.weight for i in items)
    got, details = 0.0, []
    for item in items:
        snippet = item.hits(text)
        if snippet is not None:
            got += item.weight
            details.append(f"+ {item.label} ({_clip(snippet)!r})")
        else:
            details.append(f"- {item.label}")
    return got / total, details


def _clip(s: str, n: int = 60) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


class RubricGrader:
    def __init__(self, spec: RubricSpec):
        self.spec = spec

    def grade(self, answer: str) -> Verdict:
        text = normalize(answer)
        score, details = _score(self.spec.items, text)
        hit = sum(1 for d in details if d.startswith("+"))
        reason = f"{hit}/{len(self.spec.items)} rubric items"
        flags: list[str] = []
        for alt in self.spec.alternatives:
            alt_raw, alt_details = _score(alt.items, text)
            if alt_raw == 0:
                continue
            alt_score = alt_raw * alt.credit
            if alt_score > score:
                # The alternative explains the answer better than the intended topic does:
                # that is the mix-up the flag warns about.
                score = alt_score
                reason = f"{alt.label}: {sum(d.startswith('+') for d in alt_details)}/{len(alt.items)} items at {alt.credit:g} credit"
                flags.append(alt.flag)
                details = details + [f"[{alt.label}]"] + alt_details
            else:
                details = details + [f"also mentions: {alt.label}"]
        status = status_for(score, self.spec.pass_at, self.spec.partial_at)
        return Verdict(status=status, score=round(score, 4), reason=reason, details=details, flags=flags)
