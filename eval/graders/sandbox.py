"""Isolation for running untrusted code (the code grader's compile and run steps).

Each step runs in new user, network, PID and mount namespaces (`unshare`), as a spare uid when
the grader is root, with rlimits and no_new_privs, a wall-clock timeout after which everything
it started is killed, no pipes a stray process could hold open, and a clean environment. What
the host does not permit is probed once and dropped; `note()` says what is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

FULL_ISOLATION = ("--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--mount-proc")
SANDBOX_UID_BASE = 64000  # uids BASE..BASE+SLOTS-1: no login, no files, no processes but ours
SANDBOX_SLOTS = 16
COMPILE_FSIZE = 64 << 20  # bytes per file written
RUN_FSIZE = 16 << 20
NPROC = 64  # processes (threads) of one step; g++ needs about 5
OUTPUT_CAP = 1 << 20  # bytes of stdout / stderr read back
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Mode:
    """One way of isolating a step on this host, as found by `Sandbox.probe`."""

    ns: tuple[str, ...]  # unshare flags; () without unshare
    uid_via: str  # "popen" (setuid before exec), "setpriv" (after unshare), "" (no uid switch)
    nproc_via: str  # "rlimit" (before exec), "prlimit" (inside the user namespace), "" (none)
    note: str  # what is missing, for the verdict; "" when fully isolated

    @property
    def pid_ns(self) -> bool:
        return "--pid" in self.ns


@dataclass
class Slot:
    uid: int | None  # the unprivileged uid this grade runs as (root only)
    dedicated: bool  # the uid is ours alone, so every process of it may be killed


@dataclass
class Sandbox:
    unshare: str | None = field(default_factory=lambda: shutil.which("unshare"))
    setpriv: str | None = field(default_factory=lambda: shutil.which("setpriv"))
    prlimit: str | None = field(default_factory=lambda: shutil.which("prlimit"))
    _mode: Mode | None = None
    _uids: list[int] | None = None
    _dedicated: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _free: threading.Condition = field(default_factory=threading.Condition)

    # -- what this host permits (probed once per process) --

    def mode(self) -> Mode:
        with self._lock:
            if self._mode is None:
                self._mode = self.probe()
            return self._mode

    def probe(self) -> Mode:
        """The strongest isolation this host permits, trying each variant on /bin/true."""
        root = os.geteuid() == 0
        notes: list[str] = []
        if root:
            self._uids, self._dedicated = list(range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_SLOTS)), True
            if not self._try(Mode((), "popen", "", ""), self._uids[0]):
                self._uids, self._dedicated = [65534], False  # nobody: shared, so never killed by uid
                if not self._try(Mode((), "popen", "", ""), 65534):
                    self._uids = []
                    notes.append("runs as root (switching to an unprivileged uid failed)")
        uid = self._uids[0] if self._uids else None
        candidates: list[tuple[str, ...]] = []
        if self.unshare:
            candidates.append(FULL_ISOLATION)
            if root:
                candidates.append(FULL_ISOLATION[2:])  # network, PID, mount, created by root itself
            candidates += [("--user", "--map-root-user", "--net"), ("--net",)]
        else:
            notes.append("util-linux unshare not found")
        candidates.append(())
        for ns in candidates:
            user = "--user" in ns
            if uid is None:
                uid_via = ""
            elif user or not ns:
                uid_via = "popen"  # unshare --user run as that uid maps it to root inside
            elif self.setpriv:
                uid_via = "setpriv"  # root creates the namespaces, then becomes that uid
            else:
                continue
            if self._dedicated:
                nproc_via = "rlimit"  # the uid is ours alone, so its count is this step's
            elif user and self.prlimit:
                nproc_via = "prlimit"  # counted inside the new user namespace only
            else:
                nproc_via = ""  # it would count every process of this user: no limit
            mode = Mode(ns, uid_via, nproc_via, "")
            if ns and not self._try(mode, uid):
                continue
            lost = []
            if ns != FULL_ISOLATION and self.unshare:
                lost.append(f"unshare {' '.join(FULL_ISOLATION)} is not permitted here")
            if "--net" not in ns:
                lost.append("the answer's code can use the network")
            if "--pid" not in ns:
                lost.append("no PID namespace: stray processes are killed "
                            + ("by uid" if self._dedicated else "by process group only"))
            if not user and not root:
                lost.append("no user namespace")
            if not nproc_via:
                lost.append("no process-count limit")
            return Mode(ns, uid_via, nproc_via, _note(notes + lost))
        raise AssertionError("unreachable: the last candidate is always taken")

    def _try(self, mode: Mode, uid: int | None) -> bool:
        true = shutil.which("true") or "/bin/true"
        with tempfile.TemporaryDirectory(prefix="eval-code-probe-") as tmp:
            if uid is not None:
                os.chown(tmp, uid, uid)
            try:
                rc, _, _ = self.run(mode, Slot(uid, self._dedicated), [true], tmp, 10, 10, 256 << 20, 1 << 20)
            except (OSError, subprocess.SubprocessError):
                return False
        return rc == 0

    # -- one grade at a time per uid --

    @contextlib.contextmanager
    def slot(self) -> Iterator[tuple[Mode, Slot]]:
        mode = self.mode()
        if not self._uids:
            yield mode, Slot(None, False)
            return
        if not self._dedicated:  # nobody, shared by every grade
            yield mode, Slot(self._uids[0], False)
            return
        with self._free:
            while not self._uids:
                self._free.wait()
            uid = self._uids.pop(0)
        try:
            yield mode, Slot(uid, True)
        finally:
            with self._free:
                self._uids.append(uid)
                self._free.notify()

    # -- one step --

    def run(self, mode: Mode, slot: Slot, cmd: list[str], cwd: str, timeout: float, cpu_s: int,
            mem_bytes: int | None, fsize: int, stdin: str = "") -> tuple[int | None, str, str]:
        """(returncode, or None on timeout; stdout; stderr). Whatever the step started is dead
        when this returns."""
        prefix: list[str] = []
        if mode.ns:
            prefix = [self.unshare, *mode.ns, "--"] if self.unshare else []
            if mode.uid_via == "setpriv" and slot.uid is not None:
                prefix += [self.setpriv, f"--reuid={slot.uid}", f"--regid={slot.uid}", "--clear-groups", "--"]
            if mode.nproc_via == "prlimit":
                prefix += [self.prlimit, f"--nproc={NPROC}", "--"]
        switch = mode.uid_via == "popen" and slot.uid is not None
        env = {"PATH": CLEAN_PATH, "HOME": cwd, "TMPDIR": cwd, "LANG": "C", "LC_ALL": "C"}
        nproc = NPROC if mode.nproc_via == "rlimit" else None
        with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
            fin.write(stdin.encode())
            fin.seek(0)
            # preexec_fn only calls setrlimit and prctl (no locks, no allocation of note), which
            # is safe even though grading runs in a thread pool.
            p = subprocess.Popen(
                prefix + cmd, cwd=cwd, env=env, stdin=fin, stdout=fout, stderr=ferr, close_fds=True,
                start_new_session=True, preexec_fn=_limits(cpu_s, mem_bytes, fsize, nproc),  # noqa: PLW1509
                user=slot.uid if switch else None, group=slot.uid if switch else None,
                extra_groups=[] if switch else None,
            )
            try:
                rc: int | None = p.wait(timeout)
            except subprocess.TimeoutExpired:
                rc = None
            self._kill(p, mode, slot)
            out, err = (_read(f) for f in (fout, ferr))
        return rc, out, err

    def _kill(self, p: subprocess.Popen, mode: Mode, slot: Slot) -> None:
        if p.returncode is None:
            if mode.pid_ns:
                # The namespace's init first: its exit kills and waits out every other process
                # of the namespace, then unshare reaps it and exits, so nothing outlives this.
                for child in _children(p.pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(child, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
            # The session's process group (with --kill-child, unshare's death also kills init).
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(5)
        elif not mode.pid_ns and not slot.dedicated:
            # Exited, but without a PID namespace its children may live on in its group (with a
            # dedicated uid, the sweep below finds them all).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        if slot.dedicated and slot.uid is not None:
            _kill_uid(slot.uid)  # whatever is left, setsid or not; normally nothing


def _note(parts: list[str]) -> str:
    parts = [p for p in parts if p]
    return "sandbox degraded: " + "; ".join(parts) if parts else ""


try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up now, not in the forked child
except (OSError, AttributeError):
    _prctl = None
PR_SET_NO_NEW_PRIVS = 38


def _limits(cpu_s: int, mem_bytes: int | None, fsize: int, nproc: int | None):
    def apply() -> None:
        if _prctl is not None:
            _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary gives back what we dropped
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        if mem_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    return apply


def _read(f) -> str:
    f.seek(0)
    return f.read(OUTPUT_CAP).decode("utf-8", "replace")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        pass
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
    return out


def _state(pid: str) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of a uid that is ours alone, until none is left (NPROC bounds a
    fork bomb's refills)."""
    for _ in range(100):
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    if os.stat(f"/proc/{d}").st_uid == uid and _state(d) not in ("Z", "X"):
                        pids.append(int(d))  # a zombie is dead already, its reaper's business
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


SANDBOX = Sandbox()
