"""The pairwise judge's verdict parsing and position-swap rule (MT-bench). The judge asking a
real model is covered in test_eval_e2e.py."""

from __future__ import annotations

import pytest

from eval.graders.judge import SYSTEM, USER, combine, parse_verdict


@pytest.mark.parametrize(
    ("text", "pick"),
    [
        ("Assistant A is more accurate. [[A]]", "A"),
        ("B explains the discount factor. Final verdict: [[B]]", "B"),
        ("Both are equally good. [[C]]", "tie"),
        ("First I thought [[A]], but on reflection [[B]]", "B"),  # the final verdict counts
        ("I cannot decide.", None),
        ("[A] is better", None),
    ],
)
def test_parse_verdict(text, pick):
    assert parse_verdict(text) == pick


@pytest.mark.parametrize(
    ("first", "second", "result"),
    [
        ("A", "A", "A"),  # A wins in both orders
        ("B", "B", "B"),
        ("A", "B", "tie"),  # position bias: each order prefers whoever came first
        ("tie", "A", "tie"),
        ("A", None, "tie"),  # an unparsed verdict cannot confirm a win
        (None, None, "tie"),
    ],
)
def test_combine_needs_agreement_in_both_orders(first, second, result):
    assert combine(first, second) == result


def test_prompt_asks_for_the_mt_bench_verdict_format():
    assert '"[[A]]"' in SYSTEM and '"[[C]]" for a tie' in SYSTEM
    text = USER.format(question="Q?", answer_a="one", answer_b="two")
    assert text.index("one") < text.index("two")
