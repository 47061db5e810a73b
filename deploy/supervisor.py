"""Talking to the stack's own supervisord: start it, apply a new config, query, stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

# A unix socket path longer than this does not fit in sockaddr_un.
MAX_SOCKET_PATH = 100
FAILED_STATES = {"BACKOFF", "FATAL", "EXITED", "UNKNOWN"}


class SupervisorError(Exception):
    pass


class Supervisor:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.conf = run_dir / "supervisord.conf"
        self.socket = run_dir / "supervisor.sock"
        self.pidfile = run_dir / "supervisord.pid"
        self.logs = run_dir / "logs"
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise SupervisorError(
                f"run_dir {run_dir} is too long for supervisord's unix socket "
                f"(at most {MAX_SOCKET_PATH - len('/supervisor.sock')} characters); set a shorter run_dir in conf/stack.yaml"
            )

    @property
    def rpc(self):
        transport = SupervisorTransport(None, None, serverurl=f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://localhost", transport=transport).supervisor

    def running(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return self.rpc.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault):
            return False

    def start(self, timeout: float = 20) -> None:
        """Start supervisord in the background with self.conf; return once it answers."""
        (self.logs / "fastchat").mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SupervisorError(f"supervisord did not start:\n{done.stdout}{done.stderr}")
        deadline = time.monotonic() + timeout
        while not self.running():
            if time.monotonic() > deadline:
                raise SupervisorError(f"supervisord did not answer within {timeout:.0f}s; see {self.logs / 'supervisord.log'}")
            time.sleep(0.2)

    def update(self) -> str:
        """Apply a changed self.conf: start added programs, restart changed ones, stop removed ones."""
        (self.logs / "fastchat").mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.conf), "update"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SupervisorError(f"supervisorctl update failed:\n{done.stdout}{done.stderr}")
        return done.stdout.strip()

    def start_stopped(self) -> list[str]:
        """Start the programs stopped on purpose (a drain, supervisorctl stop): `update` leaves
        unchanged programs as they are. Returns their names."""
        stopped = [p["name"] for p in self.processes() if p["statename"] == "STOPPED"]
        for name in stopped:
            self.rpc.startProcess(name, False)
        return stopped

    def processes(self) -> list[dict]:
        return self.rpc.getAllProcessInfo()

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def shutdown(self, timeout: float = 120) -> None:
        """Stop every program, then supervisord itself; return once it is gone."""
        pid = self.pid()
        self.rpc.shutdown()
        deadline = time.monotonic() + timeout
        while pid and _alive(pid):
            if time.monotonic() > deadline:
                raise SupervisorError(f"supervisord (pid {pid}) still running after {timeout:.0f}s")
            time.sleep(0.2)

    def log_file(self, program: str) -> Path:
        return self.logs / f"{program}.log"

    def tail(self, program: str, lines: int = 30) -> str:
        path = self.log_file(program)
        if not path.is_file():
            return f"(no log at {path})"
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
