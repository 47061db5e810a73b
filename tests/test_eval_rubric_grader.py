"""Rubric graders of the seed sets (rubrics from conf/eval/seed-zh.yaml) on hand-written answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.graders import build_grader
from eval.questions import load_question_set

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def graders():
    qs = load_question_set(ROOT / "conf/eval/seed-zh.yaml")
    return {q.id: build_grader(q.grader) for q in qs.questions if q.grader.type == "rubric"}


def grade(graders, qid, answer):
    return graders[qid].grade(answer)


# ---- Q1: 冬天/夏天 能穿多少穿多少

def test_q1_zh_both_readings_pass(graders):
    v = grade(graders, "q1-winter-summer",
              "两句话字面相同，但“多少”有歧义。冬天：能穿多少穿多少，意思是天冷要尽量多穿衣服；"
              "夏天：能穿多少穿多少，意思是天热能少穿就少穿，越少越好。")
    assert (v.status, v.score) == ("pass", 1.0), v


def test_q1_restating_the_question_earns_nothing(graders):
    v = grade(graders, "q1-winter-summer", "1、冬天：能穿多少穿多少。2、夏天：能穿多少穿多少。这两句话完全一样，没有区别。")
    assert (v.status, v.score) == ("fail", 0.0), v


def test_q1_only_the_winter_reading_is_partial(graders):
    v = grade(graders, "q1-winter-summer", "冬天很冷，所以要多穿衣服。")
    assert v.status == "partial" and v.score == pytest.approx(0.4), v


def test_q1_en_answer(graders):
    v = grade(graders, "q1-winter-summer",
              "The words are the same but the meaning is ambiguous. In winter it means wear as many clothes as possible; "
              "in summer it means wear as little as possible.")
    assert v.status == "pass", v


# ---- Q2: MDP

def test_q2_zh_complete(graders):
    v = grade(graders, "q2-mdp",
              "马尔可夫决策过程由五元组 (S, A, P, R, γ) 构成：状态集合 S、动作集合 A、状态转移概率 P(s'|s,a)、"
              "奖励函数 R(s,a) 和折扣因子 γ。目标是找到最优策略 π，使期望累计回报最大。")
    assert (v.status, v.score) == ("pass", 1.0), v


def test_q2_en_partial(graders):
    v = grade(graders, "q2-mdp", "An MDP is a model where an agent in some state picks one of several actions.")
    assert v.status == "partial" and v.score == pytest.approx(2 / 6, abs=1e-3), v


def test_q2_miss(graders):
    v = grade(graders, "q2-mdp", "It is a famous Russian mathematician's idea about chains.")
    assert v.status == "fail"


# ---- Q3: Euler's theorem

def test_q3_zh_number_theory_passes(graders):
    v = grade(graders, "q3-euler",
              "欧拉定理：若正整数 a 与 n 互质，则 a^φ(n) ≡ 1 (mod n)，其中 φ(n) 是欧拉函数，表示小于等于 n 且与 n 互质的正整数个数。")
    assert (v.status, v.score) == ("pass", 1.0), v
    assert not v.flags


def test_q3_en_latex_passes(graders):
    v = grade(graders, "q3-euler",
              r"If $\gcd(a, n) = 1$ then $a^{\varphi(n)} \equiv 1 \pmod{n}$, where $\varphi$ is Euler's totient function.")
    assert v.status == "pass", v


def test_q3_polyhedron_formula_gets_flagged_partial_credit(graders):
    v = grade(graders, "q3-euler",
              "欧拉定理（欧拉公式）指出：对于任意凸多面体，顶点数 V、棱数 E 和面数 F 满足 V − E + F = 2。")
    assert v.status == "partial" and v.score == pytest.approx(0.5), v
    assert v.flags and v.flags[0].startswith("mix-up")


def test_q3_miss(graders):
    v = grade(graders, "q3-euler", "Euler's theorem says e^(2mn) = 1 for positive integers m and n-1.")
    assert (v.status, v.score) == ("fail", 0.0), v
