"""conf/ → the supervisord config of the stack: one program per process."""

from __future__ import annotations

import hashlib
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2

from launch.config import ConfigError, Deployment

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).with_name("supervisord.conf.tmpl")


@dataclass(frozen=True)
class Program:
    name: str
    argv: list[str]
    env: dict[str, str]
    priority: int
    startsecs: int = 3

    @property
    def command(self) -> str:
        return _escape(shlex.join(self.argv))

    @property
    def environment(self) -> str:
        return ",".join(f'{k}="{_escape(v)}"' for k, v in self.env.items())


def render(deployment: Deployment, model_dirs: dict[str, Path], conf_dir: Path, keys_file: Path | None = None) -> str:
    """The supervisord.conf text for `deployment`, serving each model from `model_dirs`;
    `keys_file` holds the API keys in force (conf's file and $LLMD_API_KEYS together)."""
    run_dir = deployment.stack.run_dir
    return jinja2.Template(TEMPLATE.read_text(), undefined=jinja2.StrictUndefined).render(
        conf_dir=conf_dir,
        profile=deployment.profile,
        run_dir=_escape(str(run_dir)),
        root=_escape(str(ROOT)),
        programs=programs(deployment, model_dirs, conf_dir, keys_file),
    )


def programs(deployment: Deployment, model_dirs: dict[str, Path], conf_dir: Path,
             keys_file: Path | None = None) -> list[Program]:
    stack = deployment.stack
    python = sys.executable
    env = {
        "PYTHONUNBUFFERED": "1",
        # FastChat would copy each process's output into its own log files (a new one per worker
        # start) in the working directory; supervisor's logs hold it already. Empty: none.
        "LOGDIR": "",
        # Offline by design: never reach for a model hub or phone home.
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONPATH": str(ROOT),
        # A worker re-registers within seconds after a controller restart (FastChat: 45 s).
        "FASTCHAT_WORKER_HEART_BEAT_INTERVAL": "5",
        # supervisord hands on the environment it started with: keys exported back then
        # must not linger; the API reads the keys in force from keys_file.
        "LLMD_API_KEYS": "",
    }
    controller = deployment.controller_url
    secret = ["--secret-file", str(stack.controller.secret_file)] if stack.controller.secret_file else []
    advertise = ["--advertise-host", stack.worker_advertise_host] if stack.worker_advertise_host else []
    out = []
    if deployment.role != "worker":
        out.append(Program(
            "controller",
            [python, "-m", "launch.controller", "--host", stack.controller.host,
             "--port", str(stack.controller.port), "--dispatch-method", "shortest_queue", *secret],
            env, priority=10,
        ))
    for worker in deployment.workers():
        model = worker.model
        threads = deployment.threads(model)
        argv = [
            python, "-m", "launch.worker",
            "--model-dir", str(model_dirs[model.name]),
            "--name", model.name,
            "--template", model.template,
            "--dtype", model.dtype,
            "--quant", model.quant,
            "--threads", str(threads),
            "--concurrency", str(model.concurrency),
            "--queue-size", str(model.queue_size),
            "--host", stack.worker_host,
            "--port", str(worker.port),
            *advertise,
            "--controller", controller,
            *secret,
        ]
        if model.context_length:
            argv += ["--context-length", str(model.context_length)]
        out.append(Program(worker.program, argv, env | {"OMP_NUM_THREADS": str(threads)}, priority=20))
    if deployment.role == "worker":  # the head runs the gateway and the UI
        return out
    out.append(
        Program(
            "api",
            [python, "-m", "launch.api_server", "--host", stack.api.host, "--port", str(stack.api.port),
             "--controller-address", controller, "--expect-models", ",".join(m.name for m in deployment.models),
             *(["--keys-file", str(keys_file)] if keys_file else [])],
            # Changed keys change the program, so that `make up` restarts it.
            env | {"LLMD_KEYS_DIGEST": _digest(keys_file.read_bytes() if keys_file else b"")}, priority=30,
        )
    )
    out.append(
        Program(
            "web",
            [python, "-m", "launch.web_server", "--conf", str(conf_dir), "--profile", deployment.profile,
             "--models", ",".join(m.name for m in deployment.models), "--controller-url", controller, "--host", stack.web.host, "--port", str(stack.web.port)],
            # The UI reads title, logins and model descriptions from conf/ at start: a change restarts it.
            # Its LOGDIR keeps FastChat's conversation and vote logs.
            env | {"LLMD_CONF_DIGEST": _digest(_web_inputs(deployment)),
                   "LOGDIR": str(stack.run_dir / "logs" / "fastchat")}, priority=40,
        )
    )
    return out


def _web_inputs(deployment: Deployment) -> bytes:
    web = deployment.stack.web
    users = web.users_file.read_bytes() if web.users_file else b""
    models = [(m.name, m.template, m.description) for m in deployment.models]
    return repr((web.title, models)).encode() + users


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _escape(value: str) -> str:
    # A newline would start a new section of the INI file, a quote end an environment value.
    if any(c in value for c in '"\n\r\x00'):
        raise ConfigError(f"{value!r}: quotes and line breaks cannot go into the supervisor config; rename the path")
    # supervisord expands %(name)s in values; a literal % must be doubled.
    return value.replace("%", "%%")
