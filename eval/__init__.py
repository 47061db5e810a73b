"""Side-by-side evaluation of the deployed chat models through the OpenAI-compatible gateway.

`python -m eval.compare` asks every model the questions of a question set (conf/eval/*.yaml),
grades the answers with machine-checkable graders (eval/graders/) and writes a run directory
with answers.jsonl, report.md, report.html and PNG charts. See eval/compare.py for the CLI.
"""
