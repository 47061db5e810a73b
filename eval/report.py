"""Reports of a run: report.md, a self-contained report.html (answers side by side per question,
verdicts, inline PNG charts) and the charts as PNG files, all in the run directory.

    write_reports(run_dir, question_set, run_info, answers, verdicts, judgments) -> [paths]

Both reports end with the dimension table of the original comparison, filled by the graders,
and the speed table; summary_tables() gives the same two tables for the terminal.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt

from .graders import Verdict
from .graders.judge import JudgeRecord
from .questions import QuestionSet
from .runlog import AnswerRecord, RunInfo

ICON = {"pass": "✅", "partial": "🟡", "fail": "❌"}
Answers = dict[tuple[str, str], AnswerRecord | None]
Verdicts = dict[tuple[str, str], Verdict]


def write_reports(run_dir: Path, qs: QuestionSet, info: RunInfo, answers: Answers, verdicts: Verdicts,
                  judgments: list[JudgeRecord]) -> list[Path]:
    models = info.models
    charts = {
        "scores.png": chart_scores(qs, models, verdicts),
        "speed.png": chart_speed(models, answers),
        "times.png": chart_times(qs, models, answers),
    }
    paths = []
    for name, png in charts.items():
        (run_dir / name).write_bytes(png)
        paths.append(run_dir / name)
    md = render_markdown(qs, info, answers, verdicts, judgments, list(charts))
    (run_dir / "report.md").write_text(md, encoding="utf-8")
    html = render_html(qs, info, answers, verdicts, judgments, charts)
    (run_dir / "report.html").write_text(html, encoding="utf-8")
    grades = {f"{m}/{q}": v.model_dump() for (m, q), v in verdicts.items()}
    (run_dir / "grades.json").write_text(json.dumps(grades, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return paths + [run_dir / "report.md", run_dir / "report.html", run_dir / "grades.json"]


# ---------------------------------------------------------------- aggregation


@dataclass
class Speed:
    answered: int
    errors: int
    truncated: int
    ttft_mean: float | None
    total_mean: float | None
    tokens: int
    tokens_per_s: float | None  # all completion tokens over all answer time
    sources: str


def speed_of(model: str, qs: QuestionSet, answers: Answers) -> Speed:
    recs = [answers.get((model, q.id)) for q in qs.questions]
    ok = [r for r in recs if r is not None and r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    totals = [r.total_s for r in ok if r.total_s is not None]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    time_sum = sum(totals)
    return Speed(
        answered=len(ok),
        errors=sum(1 for r in recs if r is None or not r.ok),
        truncated=sum(1 for r in ok if r.truncated),
        ttft_mean=statistics.fmean(ttfts) if ttfts else None,
        total_mean=statistics.fmean(totals) if totals else None,
        tokens=tokens,
        tokens_per_s=tokens / time_sum if time_sum > 0 and tokens else None,
        sources=", ".join(sorted({r.tokens_source for r in ok})) or "-",
    )


def dimension_scores(qs: QuestionSet, model: str, verdicts: Verdicts) -> dict[str, list[Verdict]]:
    out: dict[str, list[Verdict]] = {d: [] for d in qs.dimensions}
    for q in qs.questions:
        v = verdicts.get((model, q.id))
        if v is not None:
            out[q.dimension].append(v)
    return {d: vs for d, vs in out.items() if vs}


def _cell(vs: list[Verdict], icons: bool = True) -> str:
    if len(vs) == 1:
        # The HTML shows status as a coloured badge: no emoji, which headless fonts often lack.
        icon = f"{ICON[vs[0].status]} " if icons else ""
        return f"{icon}{vs[0].status} {vs[0].score:.2f}"
    mean = statistics.fmean(v.score for v in vs)
    return f"{mean:.2f} ({sum(v.status == 'pass' for v in vs)}/{len(vs)} pass)"


def _fmt(x: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def summary_tables(qs: QuestionSet, models: list[str], answers: Answers, verdicts: Verdicts) -> str:
    lines = ["## Dimensions", "", "| Dimension | " + " | ".join(_md(m) for m in models) + " |",
             "|---|" + "---|" * len(models)]
    per_model = {m: dimension_scores(qs, m, verdicts) for m in models}
    for dim, label in qs.dimensions.items():
        if not any(dim in per_model[m] for m in models):
            continue
        qids = ", ".join(q.id.split("-")[0] for q in qs.questions if q.dimension == dim)
        row = [_cell(per_model[m][dim]) if dim in per_model[m] else "-" for m in models]
        lines.append(f"| {_md(label)} ({qids}) | " + " | ".join(row) + " |")
    totals = []
    for m in models:
        vs = [verdicts[(m, q.id)] for q in qs.questions if (m, q.id) in verdicts]
        totals.append(f"**{sum(v.score for v in vs):.2f} / {len(qs.questions)}**")
    lines.append("| **Total score** | " + " | ".join(totals) + " |")
    lines += ["", "## Speed", "",
              "| Model | answered | errors | truncated | TTFT mean (s) | time mean (s) | completion tokens | tokens/s | token count from |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        s = speed_of(m, qs, answers)
        lines.append(f"| {_md(m)} | {s.answered}/{len(qs.questions)} | {s.errors} | {s.truncated} | "
                     f"{_fmt(s.ttft_mean)} | {_fmt(s.total_mean)} | {s.tokens} | {_fmt(s.tokens_per_s, '.1f')} | {s.sources} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- charts


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _ascii_label(dim: str, label: str) -> str:
    # Matplotlib's bundled font has no CJK glyphs; "语言理解 / Language" charts as "Language".
    tail = label.split("/")[-1].strip()
    return tail if tail.isascii() and tail else dim


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float]]) -> None:
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    if series:
        ax.legend(fontsize=8)


def chart_scores(qs: QuestionSet, models: list[str], verdicts: Verdicts) -> bytes:
    dims = [d for d in qs.dimensions if any(q.dimension == d for q in qs.questions)]
    series = {}
    for m in models:
        per = dimension_scores(qs, m, verdicts)
        series[m] = [statistics.fmean(v.score for v in per[d]) if d in per else 0.0 for d in dims]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    _grouped_bars(ax, [_ascii_label(d, qs.dimensions[d]) for d in dims], series)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (0-1)")
    ax.set_title("Graded score per dimension")
    return _png(fig)


def chart_speed(models: list[str], answers: Answers) -> bytes:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    tps, ttft = [], []
    for m in models:
        ok = [r for (mm, _), r in answers.items() if mm == m and r is not None and r.ok]
        t = sum(r.total_s or 0 for r in ok)
        tps.append(sum(r.completion_tokens or 0 for r in ok) / t if t else 0.0)
        vals = [r.ttft_s for r in ok if r.ttft_s is not None]
        ttft.append(statistics.fmean(vals) if vals else 0.0)
    colors = [f"C{i}" for i in range(len(models))]
    a1.bar(models, tps, color=colors)
    a1.set_title("tokens/s (higher is better)")
    a2.bar(models, ttft, color=colors)
    a2.set_title("mean time to first token, s")
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelrotation=20)
    return _png(fig)


def chart_times(qs: QuestionSet, models: list[str], answers: Answers) -> bytes:
    series = {}
    for m in models:
        series[m] = [(answers.get((m, q.id)).total_s or 0.0) if answers.get((m, q.id)) is not None else 0.0
                     for q in qs.questions]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    _grouped_bars(ax, [q.id for q in qs.questions], series)
    ax.set_ylabel("seconds")
    ax.set_title("Time per answer")
    return _png(fig)


# ---------------------------------------------------------------- markdown


def _fence(text: str) -> str:
    # A fence longer than any backtick run inside, so answers that contain ``` stay intact.
    longest = max((len(run) for run in text.split("\n") for run in _backtick_runs(run)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _backtick_runs(line: str) -> list[str]:
    runs, cur = [], ""
    for ch in line:
        if ch == "`":
            cur += ch
        elif cur:
            runs.append(cur)
            cur = ""
    return runs + ([cur] if cur else [])


def _speed_line(r: AnswerRecord | None) -> str:
    if r is None:
        return "not asked"
    if not r.ok:
        return f"**error**: {r.error}"
    trunc = " — **truncated** at max_tokens" if r.truncated else ""
    return (f"TTFT {_fmt(r.ttft_s)} s · total {_fmt(r.total_s)} s · {r.completion_tokens} tokens ({r.tokens_source}) · "
            f"{_fmt(r.tokens_per_s, '.1f')} tok/s · finish_reason {r.finish_reason or '-'}{trunc}")


def render_markdown(qs: QuestionSet, info: RunInfo, answers: Answers, verdicts: Verdicts,
                    judgments: list[JudgeRecord], chart_files: list[str]) -> str:
    models = info.models
    out = [f"# Model comparison: {qs.name}", "",
           f"- models: {', '.join(models)}",
           f"- questions: `{info.questions}` ({len(qs.questions)})",
           f"- gateway: {info.base_url}; max_tokens {info.max_tokens}; temperature {info.temperature:g}; started {info.started_at}",
           "- tokens/s = completion tokens / total answer time; TTFT = time to the first streamed text", ""]
    out += [f"![{f}]({f})" for f in chart_files] + [""]
    for i, q in enumerate(qs.questions, 1):
        out += [f"## Q{i}. {q.title} ({q.dimension})", "", "> " + q.prompt.strip().replace("\n", "\n> "), ""]
        out += ["| Model | verdict | score | reason |", "|---|---|---|---|"]
        for m in models:
            v = verdicts.get((m, q.id))
            if v:
                flags = "".join(f" ⚠ {f}" for f in v.flags)
                out.append(f"| {_md(m)} | {ICON[v.status]} {v.status} | {v.score:.2f} | {_md(v.reason + flags)} |")
        out.append("")
        for m in models:
            r, v = answers.get((m, q.id)), verdicts.get((m, q.id))
            out += [f"### {m}", "", _speed_line(r), ""]
            if v and v.details:
                out += ["<details><summary>grader details</summary>", ""]
                out += [f"- {_md(d)}" for d in v.details] + ["", "</details>", ""]
            if r is not None and r.content:
                out += [_fence(r.content), ""]
    if judgments:
        out += ["## LLM judge (pairwise, both orders)", "", "| Question | A | B | winner | reason |", "|---|---|---|---|---|"]
        for j in judgments:
            out.append(f"| {j.question_id} | {_md(j.model_a)} | {_md(j.model_b)} | {_md(j.winner or 'error')} | "
                       f"{_md(j.error or j.reason)} |")
        out += ["", judge_table(judgments), ""]
    out += [summary_tables(qs, models, answers, verdicts), ""]
    return "\n".join(out)


def judge_totals(judgments: list[JudgeRecord]) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = {}
    for j in judgments:
        if not j.ok:
            continue
        for m in (j.model_a, j.model_b):
            totals.setdefault(m, {"win": 0, "tie": 0, "loss": 0})
        if j.winner == "tie":
            totals[j.model_a]["tie"] += 1
            totals[j.model_b]["tie"] += 1
        else:
            loser = j.model_b if j.winner == j.model_a else j.model_a
            totals[j.winner]["win"] += 1  # type: ignore[index]
            totals[loser]["loss"] += 1
    return totals


def judge_table(judgments: list[JudgeRecord]) -> str:
    rows = ["| Model | wins | ties | losses |", "|---|---|---|---|"]
    for m, t in judge_totals(judgments).items():
        rows.append(f"| {_md(m)} | {t['win']} | {t['tie']} | {t['loss']} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- html


def render_html(qs: QuestionSet, info: RunInfo, answers: Answers, verdicts: Verdicts,
                judgments: list[JudgeRecord], charts: dict[str, bytes]) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    tmpl = env.from_string(HTML)
    models = info.models
    per_model = {m: dimension_scores(qs, m, verdicts) for m in models}
    dim_rows = []
    for dim, label in qs.dimensions.items():
        if any(dim in per_model[m] for m in models):
            cells = []
            for m in models:
                vs = per_model[m].get(dim)
                if not vs:
                    cells.append({"status": "none", "text": "-"})
                else:
                    status = vs[0].status if len(vs) == 1 else ("pass" if all(v.status == "pass" for v in vs) else "partial")
                    cells.append({"status": status, "text": _cell(vs, icons=False)})
            qids = ", ".join(q.id.split("-")[0] for q in qs.questions if q.dimension == dim)
            dim_rows.append({"label": f"{label} ({qids})", "cells": cells})
    totals = [sum(verdicts[(m, q.id)].score for q in qs.questions if (m, q.id) in verdicts) for m in models]
    return tmpl.render(
        qs=qs, info=info, models=models, answers=answers, verdicts=verdicts,
        judgments=judgments, judge_totals=judge_totals(judgments),
        charts={k: base64.b64encode(v).decode() for k, v in charts.items()},
        dim_rows=dim_rows, totals=totals, n_questions=len(qs.questions),
        speeds={m: speed_of(m, qs, answers) for m in models}, fmt=_fmt,
    )


HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Model comparison: {{ qs.name }}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC",sans-serif;margin:0 auto;max-width:1400px;padding:1rem 1.5rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#555;font-size:.9rem} .charts{display:flex;flex-wrap:wrap;gap:.8rem;margin-top:1rem} .charts img{max-width:min(100%,440px);height:auto;border:1px solid #eee}
.prompt{background:#f6f8fa;border-left:4px solid #8aa;padding:.6rem .9rem;white-space:pre-wrap}
.grid{display:grid;grid-template-columns:repeat({{ models|length }},minmax(0,1fr));gap:1rem;margin-top:.8rem}
.col{border:1px solid #ddd;border-radius:6px;padding:.6rem .8rem;min-width:0}
.col h3{margin:.1rem 0 .4rem;font-size:1.05rem;word-break:break-all}
.badge{display:inline-block;border-radius:4px;padding:.05rem .45rem;font-weight:600;font-size:.85rem}
.pass{background:#d8f5dd;color:#11632a}.partial{background:#fff1c2;color:#7a5800}.fail{background:#fde0e0;color:#8f1d1d}.none{color:#999}
.trunc{background:#ffe0b3;color:#8a4b00}.err{background:#fde0e0;color:#8f1d1d}
.reason{font-size:.9rem;margin:.3rem 0}.flag{font-size:.85rem;color:#8a4b00}
.speed{font-size:.8rem;color:#555;margin:.3rem 0}
pre.answer{white-space:pre-wrap;word-wrap:break-word;background:#fafafa;border:1px solid #eee;padding:.5rem;font-size:.85rem;max-height:36rem;overflow:auto}
details{font-size:.85rem} table{border-collapse:collapse;margin:.6rem 0} th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f0f2f4}
</style></head>
<body>
<h1>Model comparison: {{ qs.name }}</h1>
<div class="meta">
models: <b>{{ models|join(", ") }}</b> · questions: <code>{{ info.questions }}</code> ({{ n_questions }}) ·
gateway: {{ info.base_url }} · max_tokens {{ info.max_tokens }} · temperature {{ info.temperature }} · started {{ info.started_at }}<br>
tokens/s = completion tokens / total answer time; TTFT = time to the first streamed text.
</div>
<section class="charts" id="charts">
{% for name, b64 in charts.items() %}<img src="data:image/png;base64,{{ b64 }}" alt="{{ name }}" title="{{ name }}">{% endfor %}
</section>

{% for q in qs.questions %}
<section class="question" id="{{ q.id }}">
<h2>Q{{ loop.index }}. {{ q.title }} <span class="meta">({{ qs.dimensions[q.dimension] }})</span></h2>
<div class="prompt">{{ q.prompt }}</div>
<div class="grid">
{% for m in models %}{% set r = answers.get((m, q.id)) %}{% set v = verdicts.get((m, q.id)) %}
<div class="col" data-model="{{ m }}">
<h3>{{ m }}</h3>
{% if v %}<span class="badge {{ v.status }}">{{ v.status }} {{ "%.2f"|format(v.score) }}</span>{% endif %}
{% if r and r.truncated %}<span class="badge trunc">truncated</span>{% endif %}
{% if r and not r.ok %}<span class="badge err">error</span>{% endif %}
{% if v %}<div class="reason">{{ v.reason }}</div>{% for f in v.flags %}<div class="flag">⚠ {{ f }}</div>{% endfor %}
{% if v.details %}<details><summary>grader details</summary><ul>{% for d in v.details %}<li>{{ d }}</li>{% endfor %}</ul></details>{% endif %}{% endif %}
{% if r %}{% if r.ok %}<div class="speed">TTFT {{ fmt(r.ttft_s) }} s · total {{ fmt(r.total_s) }} s · {{ r.completion_tokens }} tokens ({{ r.tokens_source }}) · {{ fmt(r.tokens_per_s, ".1f") }} tok/s · finish_reason {{ r.finish_reason or "-" }}</div>
{% else %}<div class="speed">error: {{ r.error }}</div>{% endif %}
<pre class="answer">{{ r.content }}</pre>{% else %}<div class="speed">not asked</div>{% endif %}
</div>
{% endfor %}
</div>
</section>
{% endfor %}

{% if judgments %}
<h2>LLM judge (pairwise, both orders)</h2>
<table><tr><th>Question</th><th>A</th><th>B</th><th>winner</th><th>reason</th></tr>
{% for j in judgments %}<tr><td>{{ j.question_id }}</td><td>{{ j.model_a }}</td><td>{{ j.model_b }}</td><td>{{ j.winner or "error" }}</td><td>{{ j.error or j.reason }}</td></tr>{% endfor %}
</table>
<table><tr><th>Model</th><th>wins</th><th>ties</th><th>losses</th></tr>
{% for m, t in judge_totals.items() %}<tr><td>{{ m }}</td><td>{{ t.win }}</td><td>{{ t.tie }}</td><td>{{ t.loss }}</td></tr>{% endfor %}
</table>
{% endif %}

<h2 id="dimensions">Dimensions</h2>
<table><tr><th>Dimension</th>{% for m in models %}<th>{{ m }}</th>{% endfor %}</tr>
{% for row in dim_rows %}<tr><td>{{ row.label }}</td>{% for c in row.cells %}<td><span class="badge {{ c.status }}">{{ c.text }}</span></td>{% endfor %}</tr>{% endfor %}
<tr><th>Total score</th>{% for t in totals %}<th>{{ "%.2f"|format(t) }} / {{ n_questions }}</th>{% endfor %}</tr>
</table>

<h2 id="speed">Speed</h2>
<table><tr><th>Model</th><th>answered</th><th>errors</th><th>truncated</th><th>TTFT mean (s)</th><th>time mean (s)</th><th>completion tokens</th><th>tokens/s</th><th>token count from</th></tr>
{% for m in models %}{% set s = speeds[m] %}<tr><td>{{ m }}</td><td>{{ s.answered }}/{{ n_questions }}</td><td>{{ s.errors }}</td><td>{{ s.truncated }}</td><td>{{ fmt(s.ttft_mean) }}</td><td>{{ fmt(s.total_mean) }}</td><td>{{ s.tokens }}</td><td>{{ fmt(s.tokens_per_s, ".1f") }}</td><td>{{ s.sources }}</td></tr>{% endfor %}
</table>
</body></html>
"""
