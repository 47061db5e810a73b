"""Question-set files: the seed sets load, prompts are verbatim, mistakes name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eval.questions import QuestionSetError, load_question_set

ROOT = Path(__file__).resolve().parent.parent
SEED_ZH = ROOT / "conf/eval/seed-zh.yaml"

ORIGINAL = [
    "请说出以下两句话区别在哪里？1 、冬天：能穿多少穿多少。2、夏天：能穿多少穿多少。",
    "什么是马尔可夫决策过程？",
    "请介绍欧拉定理。",
    (
        "在一个五人小组中，分别叫 A、B、C、D、E，他们都要参加一个面试，并排成一行就坐。你知道以下事实：A 不坐在最左边，也不坐在最右边。"
        "B 坐在 A 的右边，但不紧挨着。C 不坐在中间位置。D 坐在 C 的旁边。E 坐在最右边。请说明五人的座位顺序。"
    ),
    "使用C++代码编写程序：给定一个只包含正整数的数组 nums，判断是否可以将这个数组分割成两个子集，使得两个子集的元素和相等。",
]


def test_seed_zh_has_the_original_five_questions_verbatim():
    qs = load_question_set(SEED_ZH)
    assert [q.prompt for q in qs.questions] == ORIGINAL
    assert [q.grader.type for q in qs.questions] == ["rubric", "rubric", "rubric", "logic", "code"]


def test_seed_en_reuses_the_graders_of_seed_zh():
    zh, en = load_question_set(SEED_ZH), load_question_set(ROOT / "conf/eval/seed-en.yaml")
    assert [q.id for q in en.questions] == [q.id for q in zh.questions]
    assert all(q.prompt.isascii() for q in en.questions)
    for a, b in zip(zh.questions, en.questions, strict=True):
        assert a.grader == b.grader and a.dimension == b.dimension


def test_the_profiles_name_existing_question_sets():
    for prof in (ROOT / "conf/profiles").glob("*.yaml"):
        name = yaml.safe_load(prof.read_text()).get("questions")
        if name:
            load_question_set(ROOT / "conf/eval" / f"{name}.yaml")


def write(tmp_path: Path, data: dict | str, name: str = "set.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True))
    return p


def seed() -> dict:
    return yaml.safe_load(SEED_ZH.read_text())


def error(path: Path) -> str:
    with pytest.raises(QuestionSetError) as e:
        load_question_set(path)
    return str(e.value)


def test_wrong_type_names_file_question_and_key(tmp_path):
    data = seed()
    data["questions"][4]["grader"]["cases"][0]["expect"] = "maybe"
    p = write(tmp_path, data)
    assert f"{p}: questions[4] (q5-partition).grader.cases[0].expect: Input should be a valid boolean" in error(p)


def test_typo_in_a_key_is_an_error(tmp_path):
    data = seed()
    data["questions"][0]["grader"]["item"] = data["questions"][0]["grader"].pop("items")
    msg = error(write(tmp_path, data))
    assert "questions[0] (q1-winter-summer).grader.item: unknown key (a typo?)" in msg
    assert "questions[0] (q1-winter-summer).grader.items: Field required" in msg


def test_bad_regex_is_quoted(tmp_path):
    data = seed()
    data["questions"][1]["grader"]["items"][0]["any"] = ["状态(("]
    msg = error(write(tmp_path, data))
    assert "questions[1] (q2-mdp).grader.items[0] (states).any: invalid regex '状态(('" in msg


def test_unknown_grader_type(tmp_path):
    data = seed()
    data["questions"][2]["grader"]["type"] = "vibes"
    msg = error(write(tmp_path, data))
    assert "questions[2] (q3-euler).grader" in msg and "'code', 'logic', 'rubric'" in msg


def test_dimension_must_be_declared(tmp_path):
    data = seed()
    data["questions"][0]["dimension"] = "poetry"
    assert "dimension 'poetry', not one of" in error(write(tmp_path, data))


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    p = write(tmp_path, "name: x\nquestions: [\n  - id: a\n")
    assert error(p).startswith(f"{p}:3:")


def test_missing_file_and_missing_base(tmp_path):
    assert "no such question-set file" in error(tmp_path / "nope.yaml")
    p = write(tmp_path, {"name": "x", "base": "gone.yaml", "questions": [{"id": "a", "prompt": "?"}]})
    assert "gone.yaml: no such question-set file" in error(p)


def test_base_without_that_question_id(tmp_path):
    (tmp_path / "seed-zh.yaml").write_text(SEED_ZH.read_text())
    p = write(tmp_path, {"name": "x", "base": "seed-zh.yaml", "questions": [{"id": "q9-new", "prompt": "?"}]})
    assert "questions[0] (q9-new): no grader, and base seed-zh.yaml has no question with this id" in error(p)
