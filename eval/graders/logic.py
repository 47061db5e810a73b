"""Logic grader for seating puzzles: a brute-force solver decides what the right answer is,
then the model's answer is checked against it.

For the seed puzzle the solver proves there is NO valid seating (E at 5 forces A=2, B=4, so C
and D get 1 and 3, which are not adjacent). An answer is right when it says so; an answer that
asserts an order is wrong and the verdict lists the constraints that order breaks. Reading
"right of A" in the opposite direction to "rightmost" admits B C D A E: an answer that gives
that order AND states that reading gets partial credit.
"""

from __future__ import annotations

import itertools
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .base import Verdict, check_patterns, normalize

Seat = int | Literal["leftmost", "rightmost", "middle"]
Reading = Literal["standard", "mirrored"]


class SeatConstraint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str  # the constraint as the question states it, quoted back in verdicts
    kind: Literal["at", "not_at", "right_of", "left_of", "adjacent", "not_adjacent"]
    who: str
    seats: list[Seat] = Field(default_factory=list)  # for at / not_at
    of: str | None = None  # for the relative kinds
    # right_of / left_of only: None = any distance, False = not next to, True = directly next to.
    adjacent: bool | None = None

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> SeatConstraint:
        if self.kind in ("at", "not_at") and not self.seats:
            raise ValueError(f"kind {self.kind!r} needs 'seats'")
        if self.kind not in ("at", "not_at") and not self.of:
            raise ValueError(f"kind {self.kind!r} needs 'of'")
        if self.kind == "at" and len(self.seats) != 1:
            raise ValueError("kind 'at' takes exactly one seat")
        return self

    def holds(self, seat: dict[str, int], n: int, reading: Reading) -> bool:
        s = seat[self.who]
        if self.kind in ("at", "not_at"):
            wanted = {_seat_number(x, n) for x in self.seats}
            return (s in wanted) == (self.kind == "at")
        o = seat[self.of]  # type: ignore[index]
        if self.kind == "adjacent":
            return abs(s - o) == 1
        if self.kind == "not_adjacent":
            return abs(s - o) != 1
        # Seat 1 is leftmost. The mirrored reading flips only relative directions, which is the
        # one misreading that makes the seed puzzle solvable.
        right = self.kind == "right_of"
        if reading == "mirrored":
            right = not right
        if (s > o) != right or s == o:
            return False
        if self.adjacent is None:
            return True
        return (abs(s - o) == 1) == self.adjacent


def _seat_number(x: Seat, n: int) -> int:
    if x == "leftmost":
        return 1
    if x == "rightmost":
        return n
    if x == "middle":
        return (n + 1) // 2
    return int(x)


class LogicSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["logic"]
    people: list[str] = Field(min_length=2)  # single letters, seated left to right in seats 1..n
    constraints: list[SeatConstraint] = Field(min_length=1)
    impossible_patterns: list[str] = Field(min_length=1)  # "no arrangement satisfies all"
    mirrored_reading_patterns: list[str] = Field(default_factory=list)  # "right as seen facing us"
    # Words that introduce the list of names ("named A, B, C, D, E"), so a restated question is
    # not mistaken for an asserted order.
    name_intro_patterns: list[str] = Field(default_factory=list)
    mirrored_credit: float = Field(default=0.5, ge=0, le=1)

    @field_validator("people")
    @classmethod
    def _letters(cls, people: list[str]) -> list[str]:
        if any(len(p) != 1 or not p.isalpha() for p in people) or len(set(people)) != len(people):
            raise ValueError("people must be distinct single letters")
        return people

    @field_validator("impossible_patterns", "mirrored_reading_patterns", "name_intro_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        return check_patterns(patterns)

    @model_validator(mode="after")
    def _known_people(self) -> LogicSpec:
        for c in self.constraints:
            for name in (c.who, c.of):
                if name is not None and name not in self.people:
                    raise ValueError(f"constraint {c.text!r} names {name!r}, not one of {self.people}")
        return self


def solve(spec: LogicSpec, reading: Reading = "standard") -> list[tuple[str, ...]]:
    """Every left-to-right order that satisfies all constraints (5! = 120 candidates)."""
    n = len(spec.people)
    out = []
    for order in itertools.permutations(spec.people):
        seat = {p: i + 1 for i, p in enumerate(order)}
        if all(c.holds(seat, n, reading) for c in spec.constraints):
            out.append(order)
    return out


def broken(spec: LogicSpec, order: tuple[str, ...], reading: Reading = "standard") -> list[str]:
    seat = {p: i + 1 for i, p in enumerate(order)}
    return [c.text for c in spec.constraints if not c.holds(seat, len(order), reading)]


_SEP = r"\s*(?:,|、|;|->|→|=>|>|-|–|—|\||/|和|及|and)?\s*"
_CN_DIGITS = {"一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}


class SeatingGrader:
    def __init__(self, spec: LogicSpec):
        self.spec = spec
        self.solutions = solve(spec, "standard")
        self.mirrored = solve(spec, "mirrored")
        letters = "".join(spec.people)
        one = rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])"
        self._order_re = re.compile(_SEP.join([one] * len(spec.people)))
        self._seat_re = re.compile(
            rf"(?:seat|position|位置|座位|第)\s*#?\s*([1-9一二三四五六七八九])\s*(?:号|个|位)?\s*(?:位置|座位|位)?"
            rf"\s*(?:[:=\-]|是|为|is|:)?\s*(?<![A-Za-z])([{letters}])(?![A-Za-z])",
            re.IGNORECASE,
        )

    def orders(self, text: str) -> list[tuple[str, ...]]:
        """Complete orders the answer states, in the order they appear (the last is the final one)."""
        return [o for _, o in self._orders_at(text)]

    def _orders_at(self, text: str) -> list[tuple[int, tuple[str, ...]]]:
        found: list[tuple[int, tuple[str, ...]]] = []
        for m in self._order_re.finditer(text):
            order = tuple(m.groups())
            if len(set(order)) != len(order):
                continue
            if order == tuple(self.spec.people) and self._introduces_names(text, m.start()):
                continue
            found.append((m.start(), order))
        # "seat 1: B, seat 2: C, ..." spelled out as assignments.
        assign: dict[int, str] = {}
        start = None
        for m in self._seat_re.finditer(text):
            num = m.group(1)
            k = _CN_DIGITS.get(num) or int(num)
            if start is None:
                start = m.start()
            assign[k] = m.group(2).upper()
            n = len(self.spec.people)
            if set(assign) == set(range(1, n + 1)) and len(set(assign.values())) == n:
                found.append((start, tuple(assign[i] for i in range(1, n + 1))))
                assign, start = {}, None
        return sorted(found)

    def _introduces_names(self, text: str, pos: int) -> bool:
        before = text[max(0, pos - 20) : pos]
        return any(re.search(normalize(p), before, re.IGNORECASE) for p in self.spec.name_intro_patterns)

    def _says(self, patterns: list[str], text: str) -> str | None:
        last = self._last(patterns, text)
        return last[1] if last else None

    @staticmethod
    def _last(patterns: list[str], text: str) -> tuple[int, str] | None:
        """(position, snippet) of the latest match of any pattern."""
        hits = [(m.start(), m.group(0)) for p in patterns for m in re.finditer(normalize(p), text, re.IGNORECASE)]
        return max(hits) if hits else None

    def grade(self, answer: str) -> Verdict:
        text = normalize(answer)
        found = self._orders_at(text)
        orders = [o for _, o in found]
        last_claim = self._last(self.spec.impossible_patterns, text)
        # The conclusion is whatever comes last: "X is not possible ... so the order is C A D B E"
        # asserts an order, "trying B C D A E ... no arrangement works" says there is none.
        claim = last_claim[1] if last_claim and (not found or last_claim[0] > found[-1][0]) else None
        details = []
        for o in dict.fromkeys(orders):  # distinct, first-seen order
            br = broken(self.spec, o)
            details.append(f"order {' '.join(o)}: " + ("satisfies all constraints" if not br else "breaks " + "; ".join(br)))

        if not self.solutions:
            if claim:
                return Verdict(status="pass", score=1.0, details=details,
                               reason=f"says no seating satisfies all constraints ({claim!r})")
            if not orders:
                return Verdict(status="fail", score=0.0, details=details,
                               reason="neither gives an order nor says that none exists (none does)")
            final = orders[-1]
            reading = self._says(self.spec.mirrored_reading_patterns, text)
            if final in self.mirrored and reading:
                return Verdict(
                    status="partial", score=self.spec.mirrored_credit, details=details,
                    reason=f"order {' '.join(final)} fits only when 'right of' is read opposite to 'rightmost', "
                    f"and the answer states that reading ({reading!r})",
                )
            return Verdict(
                status="fail", score=0.0, details=details,
                reason=f"asserts order {' '.join(final)}, but no order satisfies all constraints; it breaks: "
                + "; ".join(broken(self.spec, final)),
            )

        # A puzzle with solutions: the final stated order must be one of them.
        if orders and orders[-1] in self.solutions:
            return Verdict(status="pass", score=1.0, details=details, reason=f"order {' '.join(orders[-1])} is correct")
        if orders:
            return Verdict(status="fail", score=0.0, details=details,
                           reason=f"order {' '.join(orders[-1])} breaks: " + "; ".join(broken(self.spec, orders[-1])))
        return Verdict(status="fail", score=0.0, details=details, reason="states no complete order")
