"""The browser chat: FastChat's gradio chat and side-by-side tabs, worded for this deployment.

    python -m launch.web_server --conf conf --profile demo \\
        --controller-url http://127.0.0.1:21001 --host 127.0.0.1 --port 7860

FastChat's own UI blocks and handlers serve the two tabs unchanged; this module picks the
tabs, gives the models their templates and descriptions from conf/, replaces the public
arena's texts (terms of service, data-collection notice, sponsors) and adds the login.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gradio as gr
from fastchat.model.model_registry import register_model_info
from fastchat.serve import gradio_block_arena_named as named
from fastchat.serve import gradio_web_server as single

from launch import compat, config, templates, web_users
from launch.config import Deployment

NOT_ANSWERED = (
    "**The model could not answer.** Its worker is not running or failed; "
    "`make status` and `make logs` on the server show why. Try again in a moment or pick another model."
)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    deployment = config.load(args.conf, args.profile, models=args.models)
    compat.apply()
    templates.use_for_models({m.name: m.template for m in deployment.models})
    demo = build(deployment, args.controller_url)
    users_file = deployment.stack.web.users_file
    demo.queue(default_concurrency_limit=args.concurrency_count, status_update_rate=10, api_open=False).launch(
        server_name=args.host,
        server_port=args.port,
        auth=web_users.authenticator(users_file) if users_file else None,
        auth_message=f"Sign in to {deployment.stack.web.title}" if users_file else None,
        show_api=False,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve the web UI of the stack.")
    p.add_argument("--conf", type=Path, default=Path("conf"))
    p.add_argument("--profile", default=config.DEFAULT_PROFILE)
    p.add_argument("--models", type=lambda v: [m for m in v.split(",") if m], default=None,
                   help="model names served (default: the profile's), e.g. on a head whose workers run elsewhere")
    p.add_argument("--controller-url", default="http://127.0.0.1:21001")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--concurrency-count", type=int, default=10, help="gradio events handled at once")
    return p.parse_args(argv)


def build(deployment: Deployment, controller_url: str) -> gr.Blocks:
    single.set_global_vars(controller_url, False)  # no moderation: a private deployment
    named.set_global_vars_named(False)
    single.SERVER_ERROR_MSG = NOT_ANSWERED
    # FastChat asks the public arena's rate-limit monitor (localhost:9090) before every answer.
    single.is_limit_reached = lambda model_name, ip: None
    for m in deployment.models:
        register_model_info([m.name], m.name, "", m.description)
    describe = _model_table(deployment)
    single.get_model_description_md = named.get_model_description_md = describe

    title = deployment.stack.web.title
    models = [m.name for m in deployment.models]

    def load(url_params: dict, request: gr.Request):
        # Every page load asks the controller, so workers that registered later show up.
        registered, _ = single.get_model_list(controller_url, None, False)
        # Switch tabs only when the URL asks (?compare): a page that answered with the first tab
        # took back a click on "Side by side" made before its load event returned.
        return (
            (gr.Tabs(selected=1) if "compare" in url_params else gr.update(),)
            + single.load_demo_single(registered, url_params)
            + named.load_demo_side_by_side_named(registered, url_params)
        )

    with gr.Blocks(title=title, theme=gr.themes.Default(), css=single.block_css) as demo:
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id=0):
                chat = single.build_single_model_ui(models)
            with gr.Tab("Side by side", id=1):
                side_by_side = named.build_side_by_side_ui_named(models)
        url_params = gr.JSON(visible=False)
        demo.load(load, [url_params], [tabs] + chat + side_by_side, js=single.get_window_url_params_js)

    notices = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "notice_markdown"]
    notices[0].value = f"# {title}\nChat with the models of this deployment: {', '.join(models)}."
    notices[1].value = (
        f"# {title}: side by side\nPick two models, ask once, and compare their answers. "
        f"Clear history to start again."
    )
    for block in demo.blocks.values():
        if getattr(block, "elem_id", None) == "ack_markdown":  # the public arena's terms and sponsors
            block.visible = False
        if isinstance(block, gr.Button) and "Share" in str(block.value):  # needs html2canvas from a CDN
            block.visible = False
    return demo


def _model_table(deployment: Deployment):
    known = {m.name: m for m in deployment.models}

    def describe(models: list[str]) -> str:
        rows = [f"| {name} | {known[name].description if name in known else ''} |" for name in models]
        return "| model | |\n| --- | --- |\n" + "\n".join(rows)

    return describe


if __name__ == "__main__":
    main()
