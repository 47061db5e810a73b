"""Shared fixtures: real stacks on free loopback ports in temporary run dirs."""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

# FastChat modules imported by tests write log files into $LOGDIR (default: the cwd).
if "LOGDIR" not in os.environ:
    os.environ["LOGDIR"] = tempfile.mkdtemp(prefix="fastchat-logs-")
    atexit.register(shutil.rmtree, os.environ["LOGDIR"], ignore_errors=True)


def free_ports(n: int, block: int = 8) -> list[int]:
    """`n` free ports, each the start of `block` consecutive free ports (worker N listens on base + N).

    Picked below the kernel's ephemeral range: ports from bind(0) are ephemeral, so a client's
    outgoing connection could take one (or its neighbours) before the stack binds it."""
    low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        base = rng.randrange(10000, low - block)
        if any(abs(base - p) < block for p in ports):
            continue
        socks = [socket.socket() for _ in range(block)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        ports.append(base)
    return ports


def make_conf(dest: Path, models: dict[str, dict] | None = None, profile: dict | None = None, **stack) -> Path:
    """A copy of conf/ under `dest` whose stack listens on free ports and runs in dest/run.

    `models` adds or replaces conf/models/NAME.yaml, `profile` writes conf/profiles/test.yaml."""
    conf = dest / "conf"
    shutil.copytree(ROOT / "conf", conf)
    controller, api, web, worker = free_ports(4)
    settings = {
        "controller": {"host": "127.0.0.1", "port": controller},
        "api": {"host": "127.0.0.1", "port": api},
        "web": {"host": "127.0.0.1", "port": web},
        "worker_port": worker,
        "run_dir": str(dest / "run"),
        "startup_timeout": 300,
    }
    for section in ("controller", "api", "web"):
        settings[section] |= stack.pop(section, {})
    settings |= stack
    (conf / "stack.yaml").write_text(yaml.safe_dump(settings))
    for name, body in (models or {}).items():
        (conf / "models" / f"{name}.yaml").write_text(yaml.safe_dump(body))
    if profile is not None:
        (conf / "profiles" / "test.yaml").write_text(yaml.safe_dump(profile))
    return conf


@dataclass
class Stack:
    """A stack started by `python -m deploy up`, the code path of `make up` (inside the network
    namespace `netns` when given: another host, see test_multi_host.py)."""

    conf: Path
    profile: str
    env: dict = field(default_factory=lambda: dict(os.environ))
    netns: str | None = None

    def deploy(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "deploy", "--conf", str(self.conf), *args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=self.env, timeout=900)
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def up(self) -> subprocess.CompletedProcess:
        return self.deploy("up", "--profile", self.profile)

    @property
    def settings(self) -> dict:
        return yaml.safe_load((self.conf / "stack.yaml").read_text())

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.settings['api']['port']}/v1"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.settings['web']['port']}"

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.settings['controller']['port']}"

    @property
    def run_dir(self) -> Path:
        return Path(self.settings["run_dir"])

    @property
    def models(self) -> list[str]:
        return yaml.safe_load((self.conf / "profiles" / f"{self.profile}.yaml").read_text())["models"]

    @contextlib.contextmanager
    def running(self):
        """Up for the block, then down, whether `up` or the block failed."""
        try:
            self.up()
            yield self
        finally:
            self.deploy("down", check=False)

    def supervisor(self):
        from deploy.supervisor import Supervisor

        return Supervisor(self.run_dir)

    def processes(self) -> list[psutil.Process]:
        """supervisord and every process below it."""
        try:
            top = psutil.Process(int((self.run_dir / "supervisord.pid").read_text()))
            return [top, *top.children(recursive=True)]
        except (OSError, ValueError, psutil.NoSuchProcess):
            return []


def gone(procs: list[psutil.Process]) -> bool:
    return not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="session")
def demo_stack(tmp_path_factory) -> Stack:
    """The demo profile, up for the whole session; stopped (and checked stopped) at the end."""
    stack = Stack(make_conf(tmp_path_factory.mktemp("demo")), "demo")
    try:
        stack.up()
        yield stack
    finally:
        procs = stack.processes()
        stack.deploy("down", check=False)
        psutil.wait_procs(procs, timeout=30)
        assert gone(procs), f"left running after down: {procs}"


def can_build_kernels(isa: str = "avx512") -> bool:
    """A CPU with `isa` and a C++ compiler: then launch/native.py must build the kernels written
    for it (a test fails if it does not), otherwise their tests are skipped and the slower paths serve."""
    from launch import native

    return native.cannot_build(isa) is None
