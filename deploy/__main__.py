"""Run the stack under supervisor: up, down, status, logs (what the Makefile calls).

    python -m deploy [--conf conf] up [--profile demo]
    python -m deploy [--conf conf] down | status | logs [PROGRAM] [-n 40] [-f]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import psutil
import requests

from deploy import memory
from deploy.ready import StartupError, wait
from deploy.render import render
from deploy.supervisor import Supervisor, SupervisorError
from launch import config
from launch.api_keys import load_keys
from launch.config import ConfigError, Deployment
from launch.prepare import PrepareError, prepare


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, PrepareError, memory.MemoryCheckError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (SupervisorError, StartupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deploy", description=__doc__.splitlines()[0])
    p.add_argument("--conf", type=Path, default=Path("conf"), help="configuration folder (default: conf)")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    c = sub.add_parser("up", help="prepare models, start or update the stack, wait until it serves")
    c.add_argument("--profile", default=config.DEFAULT_PROFILE, help="conf/profiles/NAME.yaml (default: demo)")
    c.set_defaults(run=up)
    sub.add_parser("down", help="stop every process of the stack").set_defaults(run=down)
    sub.add_parser("status", help="processes, registered models and URLs").set_defaults(run=status)
    c = sub.add_parser("logs", help="the last lines of each process's log")
    c.add_argument("program", nargs="?", help="one program, e.g. worker-smollm2-135m")
    c.add_argument("-n", "--lines", type=int, default=40)
    c.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    c.set_defaults(run=logs)
    return p.parse_args(argv)


def up(args: argparse.Namespace) -> int:
    deployment = config.load(args.conf, args.profile)
    stack = deployment.stack
    sup = Supervisor(stack.run_dir)
    names = ", ".join(m.name for m in deployment.models)
    print(f"profile {deployment.profile}: {names}")
    model_dirs = {}
    for model in deployment.models:
        model_dirs[model.name] = prepare(model, stack.model_cache_dir)
        print(f"  ok  {model.name} prepared in {model_dirs[model.name]}")
    running = _own_processes(sup) if sup.running() else []
    needs = memory.check(deployment, model_dirs, running)
    print(f"  ok  memory: about {(sum(e.total for e in needs) + memory.STACK_OVERHEAD) / memory.GiB:.1f} GiB needed")
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    text = render(deployment, model_dirs, args.conf.resolve(), _keys_in_force(stack))
    if sup.running():
        _write(sup.conf, text)
        changes = sup.update()
        since = time.time()  # update itself stops the programs it restarts
        print(f"supervisord already running: {changes or 'no changes'}")
    else:
        _check_ports_free(deployment)
        _write(sup.conf, text)
        since = time.time()
        sup.start()
        print(f"supervisord started (config {sup.conf})")
    wait(deployment, sup, since)
    # What is up, for tools that follow (eval.compare picks the profile's question set from it).
    _write(stack.run_dir / "deployment.json", json.dumps({
        "profile": deployment.profile, "conf": str(args.conf.resolve()),
        "api": f"{stack.api.url}/v1", "web": stack.web.url, "models": [m.name for m in deployment.models],
    }, indent=2))
    print(
        f"\nllm-deployment is up (profile {deployment.profile})\n"
        f"  OpenAI API  {stack.api.url}/v1\n"
        f"  web UI      {stack.web.url}\n"
        f"  models      {names}\n"
        f"  logs        make logs   ({sup.logs})\n"
        f"  stop        make down"
    )
    return 0


def down(args: argparse.Namespace) -> int:
    sup = Supervisor(config.load_stack(args.conf).run_dir)
    if not sup.running():
        print("the stack is not running")
        return 0
    sup.shutdown()
    print("the stack is stopped")
    return 0


def status(args: argparse.Namespace) -> int:
    stack = config.load_stack(args.conf)
    sup = Supervisor(stack.run_dir)
    if not sup.running():
        print("the stack is not running (make up starts it)")
        return 0
    for p in sup.processes():
        print(f"  {p['name']:<28} {p['statename']:<9} {p['description']}")
    try:
        models = requests.post(stack.controller.url + "/list_models", timeout=3).json()["models"]
        print(f"models registered: {', '.join(models) or 'none'}")
    except (requests.RequestException, ValueError, KeyError):
        print("models registered: (controller not answering)")
    print(f"OpenAI API {stack.api.url}/v1   web UI {stack.web.url}")
    return 0


def logs(args: argparse.Namespace) -> int:
    sup = Supervisor(config.load_stack(args.conf).run_dir)
    files = [sup.log_file(args.program)] if args.program else sorted(sup.logs.glob("*.log"))
    files = [f for f in files if f.name != "supervisord.log" or args.program]
    if not files or not all(f.is_file() for f in files):
        known = ", ".join(f.stem for f in sorted(sup.logs.glob("*.log"))) or "none yet"
        print(f"no such log; logs in {sup.logs}: {known}", file=sys.stderr)
        return 1
    if args.follow:
        os.execvp("tail", ["tail", "-n", str(args.lines), "-F", *map(str, files)])
    for f in files:
        print(f"==> {f} <==\n{sup.tail(f.stem, args.lines)}\n")
    return 0


def _keys_in_force(stack) -> Path | None:
    """The API keys of conf's keys file and of $LLMD_API_KEYS now, in a private file for the API
    server (so that a key exported or revoked since the last `make up` takes effect)."""
    keys = load_keys(stack.api.keys_file)
    path = stack.run_dir / "api-keys"
    if not keys:
        path.unlink(missing_ok=True)
        return None
    _write(path, "".join(f"{k}\n" for k in sorted(keys)), mode=0o600)
    return path


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def _own_processes(sup: Supervisor) -> list[psutil.Process]:
    try:
        return psutil.Process(sup.pid()).children(recursive=True)
    except (psutil.Error, TypeError, ValueError):
        return []


def _check_ports_free(deployment: Deployment) -> None:
    stack = deployment.stack
    wanted = [("controller.port", stack.controller.host, stack.controller.port),
              ("api.port", stack.api.host, stack.api.port),
              ("web.port", stack.web.host, stack.web.port)]
    wanted += [(f"worker_port (+{w.port - stack.worker_port}, {w.program})", stack.worker_host, w.port)
               for w in deployment.workers()]
    for key, host, port in wanted:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise ConfigError(
                    f"{host}:{port} ({key} in conf/stack.yaml) is not available: {e.strerror}. "
                    f"Stop what uses it, or choose another port."
                ) from None


if __name__ == "__main__":
    sys.exit(main())
