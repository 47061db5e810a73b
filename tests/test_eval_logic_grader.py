"""The seating-puzzle grader: its brute-force solver, and hand-written answers in zh and en."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.graders.logic import SeatingGrader, broken, solve
from eval.questions import load_question_set

ROOT = Path(__file__).resolve().parent.parent
B_CONSTRAINT = "B 坐在 A 的右边，但不紧挨着"


@pytest.fixture(scope="module")
def spec():
    return load_question_set(ROOT / "conf/eval/seed-zh.yaml").question("q4-seating").grader


@pytest.fixture(scope="module")
def grader(spec):
    return SeatingGrader(spec)


def test_solver_proves_there_is_no_valid_seating(spec):
    assert solve(spec) == []
    # Only reading "right of A" opposite to "rightmost" makes it solvable, and uniquely so.
    assert solve(spec, "mirrored") == [("B", "C", "D", "A", "E")]


def test_broken_constraints_of_an_order(spec):
    assert broken(spec, ("C", "A", "D", "B", "E")) == ["D 坐在 C 的旁边"]
    assert broken(spec, ("B", "C", "D", "A", "E")) == [B_CONSTRAINT]


@pytest.mark.parametrize(
    "answer",
    [
        (
            "E 坐在最右边，所以 E 在 5 号位。A 只能在 2、3、4 号位；B 在 A 右边且不相邻，只能 A=2、B=4。"
            "剩下 1 和 3 号位给 C 和 D，但 C 不能坐中间，D 又必须挨着 C，矛盾。因此不存在满足所有条件的座位顺序。"
        ),
        "分别叫 A、B、C、D、E 的五个人……经过逐一验证，这些条件无法同时满足，本题无解。",
        (
            "E must be in seat 5, which forces A into seat 2 and B into seat 4. C and D would then take seats "
            "1 and 3, which are not adjacent. So there is no valid arrangement that satisfies all of the conditions."
        ),
        (
            "Trying B C D A E: B is left of A, so it breaks the second fact. Every other order fails too: "
            "the constraints are contradictory."
        ),
    ],
)
def test_saying_it_is_impossible_passes(grader, answer):
    v = grader.grade(answer)
    assert (v.status, v.score) == ("pass", 1.0), v


def test_asserting_an_order_fails_and_lists_what_it_breaks(grader):
    v = grader.grade("座位顺序（从左到右）是：C、A、D、B、E。")
    assert (v.status, v.score) == ("fail", 0.0)
    assert "C A D B E" in v.reason and "D 坐在 C 的旁边" in v.reason


def test_order_given_as_seat_assignments_is_read(grader):
    v = grader.grade("Seat 1: B, seat 2: C, seat 3: D, seat 4: A, seat 5: E.")
    assert v.status == "fail"
    assert "B C D A E" in v.reason and B_CONSTRAINT in v.reason


def test_mirrored_order_with_the_reading_stated_gets_partial_credit(grader):
    answer = "如果从面试官的角度看（右边对应我们的左边），顺序是 B、C、D、A、E。"
    v = grader.grade(answer)
    assert (v.status, v.score) == ("partial", 0.5), v


def test_mirrored_order_without_the_reading_is_wrong(grader):
    v = grader.grade("The order is B C D A E.")
    assert v.status == "fail" and B_CONSTRAINT in v.reason


def test_a_final_order_after_talk_of_impossibility_is_graded_as_the_order(grader):
    answer = "Putting B in seat 5 is not possible, since E is there. So the final order is C, A, D, B, E."
    v = grader.grade(answer)
    assert v.status == "fail", v


def test_restating_the_names_is_not_an_order(grader):
    v = grader.grade("The five people are named A, B, C, D, E and they sit in a row.")
    assert v.status == "fail"
    assert v.reason.startswith("neither gives an order")
