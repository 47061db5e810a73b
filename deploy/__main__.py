"""Run the stack under supervisor: up, down, status, logs, drain (what the Makefile calls).

    python -m deploy [--conf conf] up [--profile demo] [--role all|head|worker] [--controller URL] [--models a,b]
                                      [--worker-host HOST] [--advertise-host HOST]
    python -m deploy [--conf conf] down | status | drain | logs [PROGRAM] [-n 40] [-f]
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
from launch.peer_guard import secret_headers
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
    c.add_argument("--role", default="all", help="all (default): everything here; head: controller, gateway, UI "
                   "(and --models' workers); worker: --models' workers for the head at --controller")
    c.add_argument("--controller", help="ROLE=worker: the head's controller, http://HEAD:PORT")
    c.add_argument("--models", type=lambda v: [m for m in v.split(",") if m],
                   help="comma-separated models with workers on this host (default: the profile's; '' for none on a head)")
    c.add_argument("--worker-host", help="this host's workers bind here (default: worker_host in stack.yaml)")
    c.add_argument("--advertise-host", help="the controller reaches this host's workers here "
                   "(default: worker_advertise_host, else the worker host)")
    c.set_defaults(run=up)
    sub.add_parser("down", help="stop every process of the stack").set_defaults(run=down)
    sub.add_parser("status", help="processes, registered models and URLs").set_defaults(run=status)
    c = sub.add_parser("drain", help="this host's workers: leave the dispatch, finish their requests, stop")
    c.add_argument("--timeout", type=float, default=600, help="seconds to wait for running requests (default 600)")
    c.set_defaults(run=drain)
    c = sub.add_parser("logs", help="the last lines of each process's log")
    c.add_argument("program", nargs="?", help="one program, e.g. worker-smollm2-135m")
    c.add_argument("-n", "--lines", type=int, default=40)
    c.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    c.set_defaults(run=logs)
    return p.parse_args(argv)


def up(args: argparse.Namespace) -> int:
    deployment = config.load(args.conf, args.profile, args.role, args.controller, args.models,
                             {"worker_host": args.worker_host, "worker_advertise_host": args.advertise_host})
    stack = deployment.stack
    sup = Supervisor(stack.run_dir)
    names = ", ".join(m.name for m in deployment.models)
    local = ", ".join(m.name for m in deployment.local_models) or "none"
    print(f"profile {deployment.profile}: {names}" if deployment.role == "all" else
          f"role {deployment.role} (profile {deployment.profile}), workers here: {local}, controller {deployment.controller_url}")
    model_dirs = {}
    for model in deployment.local_models:
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
        if stopped := sup.start_stopped():
            print(f"started again (stopped by a drain or by hand): {', '.join(stopped)}")
    else:
        _check_ports_free(deployment)
        _write(sup.conf, text)
        since = time.time()
        sup.start()
        print(f"supervisord started (config {sup.conf})")
    wait(deployment, sup, since)
    # What is up, for tools that follow (eval.compare picks the profile's question set from it,
    # drain the workers of this host).
    _write(stack.run_dir / "deployment.json", json.dumps({
        "profile": deployment.profile, "conf": str(args.conf.resolve()), "role": deployment.role,
        "controller": deployment.controller_url, "api": f"{stack.api.url}/v1", "web": stack.web.url,
        "models": [m.name for m in deployment.models],
        "workers": [{"program": w.program, "model": w.model.name, "url": stack.worker_url(w.port)}
                    for w in deployment.workers()],
    }, indent=2))
    if deployment.role == "worker":
        print(f"\nllm-deployment worker host is up: {local} registered with {deployment.controller_url}\n"
              f"  logs        make logs   ({sup.logs})\n"
              f"  drain       make drain  (finish running requests, then stop)\n"
              f"  stop        make down")
        return 0
    print(
        f"\nllm-deployment is up (profile {deployment.profile}{', head' if deployment.role == 'head' else ''})\n"
        f"  OpenAI API  {stack.api.url}/v1\n"
        f"  web UI      {stack.web.url}\n"
        f"  models      {names}\n"
        + (f"  controller  {deployment.controller_url} (worker hosts: make up ROLE=worker "
           f"CONTROLLER={deployment.controller_url} MODELS=...)\n" if deployment.role == "head" else "")
        + f"  logs        make logs   ({sup.logs})\n"
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
    info = _deployment_info(stack)
    controller = info.get("controller", stack.controller.url)
    try:
        workers = requests.post(controller + "/list_workers", timeout=3).json()
        print(f"workers registered at {controller}:" + ("" if workers else " none"))
        for url, w in sorted(workers.items()):
            print(f"  {url:<28} {', '.join(w['models'])}  queue {w['queue_length']}")
    except (requests.RequestException, ValueError, KeyError):
        print(f"workers registered: (controller at {controller} not answering)")
    if info.get("role") != "worker":
        print(f"OpenAI API {stack.api.url}/v1   web UI {stack.web.url}")
    return 0


def drain(args: argparse.Namespace) -> int:
    """Take this host's workers out of service without cutting an answer short."""
    stack = config.load_stack(args.conf)
    sup = Supervisor(stack.run_dir)
    if not sup.running():
        print("the stack is not running: nothing to drain")
        return 0
    running = {p["name"] for p in sup.processes() if p["statename"] == "RUNNING"}
    workers = [w for w in _deployment_info(stack).get("workers", []) if w["program"] in running]
    if not workers:
        print("no worker is running on this host: nothing to drain")
        return 0
    headers = secret_headers(stack.controller.secret_file)
    for w in workers:
        try:
            r = requests.post(w["url"] + "/drain", headers=headers, timeout=10)
            r.raise_for_status()
            print(f"  {w['program']}: left the dispatch; {r.json()['queue_length']} requests to finish")
        except requests.RequestException as e:
            print(f"  {w['program']}: not answering ({e}); stopping it")
    deadline = time.monotonic() + args.timeout
    pending = list(workers)
    while pending and time.monotonic() < deadline:
        pending = [w for w in pending if _queue_length(w["url"]) > 0]
        if pending:
            time.sleep(0.5)
    for w in workers:
        sup.rpc.stopProcess(w["program"])
    if pending:
        print(f"error: still busy after {args.timeout:.0f}s, stopped anyway: {', '.join(w['program'] for w in pending)}",
              file=sys.stderr)
        return 1
    print(f"drained: {', '.join(w['program'] for w in workers)} finished their requests and stopped. "
          f"`make up` (same ROLE) starts them again; `make down` stops the rest.")
    return 0


def _queue_length(url: str) -> int:
    try:
        return int(requests.post(url + "/worker_get_status", timeout=5).json()["queue_length"])
    except (requests.RequestException, ValueError, KeyError):
        return 0  # gone: nothing left to wait for


def _deployment_info(stack) -> dict:
    try:
        return json.loads((stack.run_dir / "deployment.json").read_text())
    except (OSError, ValueError):
        return {}


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
    wanted = [] if deployment.role == "worker" else [
        ("controller.port", stack.controller.host, stack.controller.port),
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
