"""Question sets: conf/eval/*.yaml, one file per set, each question with its grader.

    load_question_set("conf/eval/seed-zh.yaml") -> QuestionSet

A set may name a `base` set; its questions then inherit grader, dimension and title by id, so
the English seed set reuses the bilingual rubrics of the Chinese one instead of copying them.
Every mistake in a file is reported with the file name and the key path, e.g.
`conf/eval/seed-zh.yaml: questions[4] (q5-partition).grader.cases[0].expect: Input should be a valid boolean`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .graders.code import CodeSpec
from .graders.logic import LogicSpec
from .graders.rubric import RubricSpec

GraderSpec = Annotated[CodeSpec | LogicSpec | RubricSpec, Field(discriminator="type")]


class QuestionSetError(Exception):
    """A question-set file that cannot be used; the message names the file and the key."""


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    title: str
    dimension: str
    prompt: str = Field(min_length=1)
    grader: GraderSpec

    @property
    def prompt_sha(self) -> str:
        # Stored with each answer so a resumed run re-asks a question whose wording changed.
        return hashlib.sha256(self.prompt.encode()).hexdigest()[:16]


class QuestionSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    language: str
    description: str = ""
    # Dimension id -> label, in the order of the report's dimension table.
    dimensions: dict[str, str] = Field(min_length=1)
    questions: list[Question] = Field(min_length=1)
    path: str = ""  # filled by the loader

    @model_validator(mode="after")
    def _consistent(self) -> QuestionSet:
        seen: set[str] = set()
        for q in self.questions:
            if q.id in seen:
                raise ValueError(f"question id {q.id!r} appears twice")
            seen.add(q.id)
            if q.dimension not in self.dimensions:
                raise ValueError(f"question {q.id!r} has dimension {q.dimension!r}, not one of {list(self.dimensions)}")
        return self

    def question(self, qid: str) -> Question:
        for q in self.questions:
            if q.id == qid:
                return q
        raise KeyError(qid)


def load_question_set(path: str | Path) -> QuestionSet:
    path = Path(path)
    raw = _merged(path, depth=0)
    try:
        qs = QuestionSet.model_validate(raw)
    except ValidationError as e:
        raise QuestionSetError(_format(path, e, raw)) from None
    qs.path = str(path)
    return qs


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuestionSetError(f"{path}: no such question-set file (they live in conf/eval/*.yaml)") from None
    except OSError as e:
        raise QuestionSetError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise QuestionSetError(f"{path}{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise QuestionSetError(f"{path}: expected a mapping with 'name', 'dimensions' and 'questions' at the top")
    return data


def _merged(path: Path, depth: int) -> dict[str, Any]:
    data = _read(path)
    base_name = data.pop("base", None)
    if base_name is None:
        return data
    if depth > 3:
        raise QuestionSetError(f"{path}: base: chain of bases is too deep (a loop?)")
    base_path = (path.parent / str(base_name)).resolve()
    base = _merged(base_path, depth + 1)
    base_qs = {q.get("id"): q for q in base.get("questions") or [] if isinstance(q, dict)}
    for key in ("dimensions", "language", "description"):
        data.setdefault(key, base.get(key))
    questions = data.get("questions")
    if not isinstance(questions, list):
        return data
    for i, q in enumerate(questions):
        if not isinstance(q, dict):
            continue
        inherited = base_qs.get(q.get("id"))
        if inherited is None:
            if "grader" not in q:
                raise QuestionSetError(
                    f"{path}: questions[{i}] ({q.get('id')}): no grader, and base {base_name} has no question with this id"
                )
            continue
        for key in ("title", "dimension", "grader"):
            q.setdefault(key, inherited.get(key))
    return data


def _format(path: Path, e: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for err in e.errors():
        loc = list(err["loc"])
        parts: list[str] = []
        node: Any = raw
        for i, key in enumerate(loc):
            # A discriminated union inserts the tag ("rubric") into the path; the user never wrote it.
            if i > 0 and loc[i - 1] == "grader" and isinstance(key, str) and key in ("code", "logic", "rubric"):
                continue
            if isinstance(key, int):
                label = f"[{key}]"
                if isinstance(node, list) and key < len(node) and isinstance(node[key], dict) and "id" in node[key]:
                    label += f" ({node[key]['id']})"
                parts.append(label)
                node = node[key] if isinstance(node, list) and key < len(node) else None
            else:
                parts.append(("." if parts else "") + str(key))
                node = node.get(key) if isinstance(node, dict) else None
        where = "".join(parts) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (a typo?)"
        lines.append(f"{path}: {where}: {msg}")
    return "\n".join(lines)
