"""Optional LLM judge: pairwise A/B per question, MT-bench style.

The judge model sees the question and two answers and ends with [[A]], [[B]] or [[C]] (tie).
It is asked twice with the positions swapped, to cancel position bias; when the two verdicts
disagree the pair is a tie. The prompt is MT-bench's pairwise prompt (pair-v2).
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import Literal

import openai
from openai import OpenAI
from pydantic import BaseModel

Pick = Literal["A", "B", "tie"]

SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. You should choose the assistant that follows the "
    "user's instructions and answers the user's question better. Your evaluation should consider factors "
    "such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of their "
    "responses. Begin your evaluation by comparing the two responses and provide a short explanation. "
    "Avoid any position biases and ensure that the order in which the responses were presented does not "
    "influence your decision. Do not allow the length of the responses to influence your evaluation. Do "
    "not favor certain names of the assistants. Be as objective as possible. After providing your "
    'explanation, output your final verdict by strictly following this format: "[[A]]" if assistant A '
    'is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
USER = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)


class JudgeRecord(BaseModel):
    judge: str
    question_id: str
    model_a: str
    model_b: str
    answers_sha: str  # both answers hashed: a resumed run re-judges a pair whose answers changed
    first: Pick | None = None  # model_a shown as A
    second: Pick | None = None  # model_b shown as A, mapped back so "A" still means model_a
    winner: str | None = None  # a model name, or "tie"
    reason: str = ""
    raw_first: str = ""
    raw_second: str = ""
    error: str | None = None
    judged_at: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def answers_sha(answer_a: str, answer_b: str) -> str:
    return hashlib.sha256(f"{answer_a}\0{answer_b}".encode()).hexdigest()[:16]


def parse_verdict(text: str) -> Pick | None:
    """The last [[A]]/[[B]]/[[C]] in the judge's output; None if it gave none."""
    found = re.findall(r"\[\[([ABC])\]\]", text)
    if not found:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found[-1]]  # type: ignore[return-value]


def combine(first: Pick | None, second_mapped: Pick | None) -> Pick:
    """Both orders must agree for a win; anything else (disagreement, unparsed) is a tie."""
    if first is not None and first == second_mapped and first in ("A", "B"):
        return first
    return "tie"


class PairwiseJudge:
    def __init__(self, client: OpenAI, model: str, max_tokens: int = 1024):
        self.client = client
        self.model = model
        self.max_tokens = max_tokens

    def judge(self, question_id: str, question: str, model_a: str, answer_a: str, model_b: str, answer_b: str) -> JudgeRecord:
        rec = JudgeRecord(
            judge=self.model, question_id=question_id, model_a=model_a, model_b=model_b,
            answers_sha=answers_sha(answer_a, answer_b),
            judged_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        try:
            rec.raw_first = self._ask(question, answer_a, answer_b)
            rec.raw_second = self._ask(question, answer_b, answer_a)
        except openai.OpenAIError as e:
            rec.error = f"judge request failed: {e}"
            return rec
        rec.first = parse_verdict(rec.raw_first)
        swapped = parse_verdict(rec.raw_second)
        rec.second = {"A": "B", "B": "A"}.get(swapped, swapped)  # type: ignore[assignment]
        pick = combine(rec.first, rec.second)
        rec.winner = {"A": model_a, "B": model_b}.get(pick, "tie")
        if pick != "tie":
            rec.reason = f"{rec.winner} preferred in both orders"
        elif rec.first is None or rec.second is None:
            rec.reason = "judge gave no [[A]]/[[B]]/[[C]] verdict in at least one order"
        elif rec.first == rec.second:
            rec.reason = "judge called it a tie"
        else:
            rec.reason = f"verdicts disagree when positions are swapped ({rec.first} vs {rec.second})"
        return rec

    def _ask(self, question: str, answer_a: str, answer_b: str) -> str:
        resp = self.client.chat.completions.create(
            model=self.model,
            messages=[
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": USER.format(question=question, answer_a=answer_a, answer_b=answer_b)},
            ],
            max_tokens=self.max_tokens,
            temperature=0.0,
        )
        return resp.choices[0].message.content or ""
