"""FastChat's gradio web UI (single chat and side-by-side tabs), with the project's templates.

    python -m launch.web_server --model-template smollm2-135m=smollm2 \\
        --controller-url http://127.0.0.1:21001 --host 127.0.0.1 --port 7860

`--model-template NAME=TEMPLATE` (repeatable) tells the UI which conversation template each
model uses, as the worker does for the API; every other argument is FastChat's
(`python -m fastchat.serve.gradio_web_server_multi --help`).
"""

from __future__ import annotations

import argparse
import runpy
import sys

from launch import compat, templates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model-template", action="append", default=[], metavar="NAME=TEMPLATE")
    ours, fastchat_args = parser.parse_known_args(argv)
    compat.apply()
    templates.use_for_models(templates.parse_pairs(ours.model_template))
    sys.argv = [sys.argv[0], *fastchat_args]
    # FastChat starts its UI from the module's __main__ block; run that block as it is.
    runpy.run_module("fastchat.serve.gradio_web_server_multi", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
