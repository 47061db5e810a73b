"""Code grader for the partition question: pull the C++ out of the answer, compile it with the
real g++ -std=c++17 in a temp dir, and run hidden cases under time and memory limits.

The answer may define a free function or a method of `class Solution` (LeetCode style), with or
without its own `main`; its `main` is renamed so our harness can call the function. Score is
the fraction of cases passed; compile errors are quoted in the verdict.

The answer is untrusted code, and so is its compilation. Both steps run isolated (`_Sandbox`):
  - in new user, network, PID and mount namespaces (`unshare --user --map-root-user --net --pid
    --fork --kill-child --mount-proc`): no network at all, and every process the answer starts
    dies with the step, however it detaches (fork, setsid) and whenever the step ends;
  - when the grader runs as root, as an otherwise unused uid (64000 + slot), so the code cannot
    read root's files, and RLIMIT_NPROC counts only its own processes;
  - with no_new_privs and rlimits (CPU, address space, file size, processes, no core), a
    wall-clock timeout after which the whole process group (and namespace) is killed,
    stdin/stdout/stderr in unlinked temporary files (no pipe a stray process could hold open;
    output read back capped), a clean minimal environment and a private temporary directory as
    cwd, HOME and TMPDIR.
What this host does not permit is probed once and dropped, and the verdict's reason then says
which isolation is missing. `#include` of an absolute path, of `..`, or computed from a macro
is refused before compiling, and only diagnostics located in the answer itself are quoted, so
the report cannot show the contents of files outside the temporary directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .base import Verdict, status_for


class CodeCase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    nums: list[int] = Field(min_length=1)
    expect: bool


class CodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["code"]
    # The function under test takes vector<int>& and returns bool; this is its usual name, but
    # any such function is accepted when the answer names it differently.
    function: str = "canPartition"
    std: str = "c++17"
    compile_timeout_s: float = Field(default=60, gt=0)
    time_limit_s: float = Field(default=2.0, gt=0)  # per case, wall clock
    memory_mb: int = Field(default=256, gt=16)  # per case, address space
    pass_at: float = Field(default=1.0, gt=0, le=1)
    partial_at: float = Field(default=0.01, ge=0, le=1)
    cases: list[CodeCase] = Field(min_length=1)


CPP_LANGS = {"", "c", "cpp", "c++", "cc", "cxx", "h", "hpp", "cplusplus", "cpp17", "c++17"}
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([^\s`]*)[^\n]*\n(.*?)(?:^[ \t]*\1[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)
_MAIN = re.compile(r"\b(int|signed|void|auto)(\s+)main\s*\(")
_FUNC = re.compile(
    r"\b(?:bool|int|auto)\s+(\w+)\s*\(\s*(?:const\s+)?(?:std\s*::\s*)?vector\s*<\s*int\s*>\s*&?\s*\w*\s*\)"
)
# C style: bool f(int nums[], int n) or bool f(int* nums, int n).
_ARRAY_FUNC = re.compile(
    r"\b(?:bool|int|auto)\s+(\w+)\s*\(\s*(?:const\s+)?int\s*(?:\*\s*\w*|\w+\s*\[\s*\])\s*,\s*(?:const\s+)?(?:int|long|unsigned|size_t|std::size_t)\s*\w*\s*\)"
)
_CLASS = re.compile(r"\b(?:class|struct)\s+(\w+)[^;{()]*\{")
_CODE_START = re.compile(r"^\s*(#include|using\s+namespace|class\s+\w+|struct\s+\w+|bool\s+\w+\s*\(|template\s*<)", re.MULTILINE)


def extract_candidates(answer: str) -> list[tuple[str, str]]:
    """(label, source) pairs to try in order; the first that compiles is graded.

    Several fenced blocks are often one program split in pieces (class, then main), so their
    concatenation goes first; failing that, each block alone from the last (the usual
    "optimised" final version) to the first."""
    blocks = [(lang.lower(), body) for _, lang, body in _FENCE.findall(answer)]
    cpp = [b for lang, b in blocks if lang in CPP_LANGS and _looks_like_cpp(b)]
    out: list[tuple[str, str]] = []
    if len(cpp) > 1:
        out.append(("all C++ blocks joined", "\n".join(cpp)))
    with_func = [i for i in range(len(cpp)) if _FUNC.search(cpp[i]) or _ARRAY_FUNC.search(cpp[i])]
    # Blocks without a suitable function still go in, so the verdict can say what is missing.
    for i in reversed(with_func or range(len(cpp))):
        out.append((f"C++ block {i + 1} of {len(cpp)}", cpp[i]))
    if not cpp and not blocks:
        # Unfenced code: from the first line that looks like C++ to the last closing brace.
        m = _CODE_START.search(answer)
        end = answer.rfind("}")
        if m and end > m.start():
            # Through the end of that line, so the `;` of `class Solution { ... };` comes along.
            eol = answer.find("\n", end)
            out.append(("unfenced code", answer[m.start() : eol if eol != -1 else len(answer)]))
    return out


def _looks_like_cpp(src: str) -> bool:
    return bool(re.search(r"#include|vector\s*<|\bbool\b|\bint\b", src))


@dataclass
class _Call:
    expr: str  # C++ expression calling the function on `v`
    where: str  # for the report


def _strip_comments_and_strings(src: str) -> str:
    """Same length as src, with comments and literals blanked, so brace depth is trustworthy."""
    pat = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.DOTALL)
    return pat.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), src)


def find_call(src: str, preferred: str) -> _Call | None:
    clean = _strip_comments_and_strings(src)
    funcs = [(m, "(v)") for m in _FUNC.finditer(clean)]
    funcs += [(m, "(v.data(), (int)v.size())") for m in _ARRAY_FUNC.finditer(clean)]
    funcs = [(m, args) for m, args in funcs if m.group(1) != "main"]
    if not funcs:
        return None
    # The configured name first, then anything that says "partition", then vector over array,
    # then the first one.
    funcs.sort(key=lambda f: (f[0].group(1) != preferred, "partition" not in f[0].group(1).lower(),
                              f[1] != "(v)", f[0].start()))
    fn, args = funcs[0]
    name = fn.group(1)
    cls = _enclosing_class(clean, fn.start())
    if cls:
        return _Call(f"{cls}().{name}{args}", f"method {cls}::{name}")
    return _Call(f"{name}{args}", f"function {name}")


def _enclosing_class(clean: str, pos: int) -> str | None:
    """Name of the class/struct whose body contains pos, if the innermost scope is one."""
    opens = {m.end() - 1: m.group(1) for m in _CLASS.finditer(clean[:pos])}
    stack: list[str | None] = []
    for i, ch in enumerate(clean[:pos]):
        if ch == "{":
            stack.append(opens.get(i))
        elif ch == "}" and stack:
            stack.pop()
    return stack[-1] if stack else None


HARNESS = r"""
// ---- evaluation harness: reads cases from stdin, prints one verdict per run ----
signed main() {
    std::size_t n; std::cin >> n;
    std::vector<int> v(n);
    for (auto &x : v) std::cin >> x;
    bool r = (bool)(%s);
    std::cout << "\n@@RESULT@@" << (r ? 1 : 0) << std::endl;
    return 0;
}
"""


def build_source(user_src: str, call: _Call) -> str:
    # The answer's own main would clash with the harness; keep it compiled but never called.
    body = _MAIN.sub(lambda m: f"{m.group(1)}{m.group(2)}__eval_user_main(", user_src)
    return "#include <bits/stdc++.h>\nusing namespace std;\n#line 1 \"answer.cpp\"\n" + body + HARNESS % call.expr


# ---- what the answer may #include, and what of the compiler's output may be quoted ----------

# Backslash-newline (or its trigraph) joins lines before directives are recognised.
_SPLICE = re.compile(r"(?:\\|\?\?/)[ \t\f\v]*\r?\n")
_GAP = r"(?:[ \t\f\v]|/\*.*?\*/)*"  # blanks and block comments, as inside a directive
# Anywhere, not only at the start of a line: a false alarm costs a refusal, a miss a leak.
_INCLUDE = re.compile(r"(?:#|%:|\?\?=)" + _GAP + r"(include_next|include|import|embed)\b" + _GAP + r"([^\n]*)", re.DOTALL)
_HEADER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_+\-./]*")


def unsafe_includes(src: str) -> list[str]:
    """The answer's #include / #include_next / #import directives that could reach a file
    outside the compiler's own header directories (and the temp dir): absolute paths, `..`,
    and includes computed from macros (whose target cannot be checked here)."""
    bad = []
    for m in _INCLUDE.finditer(_SPLICE.sub("", src)):
        operand = m.group(2).strip()
        h = re.match(r'<([^>\n]*)>|"([^"\n]*)"', operand)
        name = h and (h.group(1) if h.group(1) is not None else h.group(2))
        if not name or not _HEADER_NAME.fullmatch(name) or ".." in name:
            bad.append(f"#{m.group(1)} {operand[:80]}".rstrip())
    return bad


# "answer.cpp" is the name `#line` gives the answer; everything else is a file we did not write.
_ANSWER_DIAG = re.compile(r"^answer\.cpp:\d+:(?:\d+:)? (?:fatal )?error: ")
_TOOL_DIAG = re.compile(r"^(?:answer\.cpp:\([^)]*\): undefined reference to |collect2: (?:fatal )?error: "
                        r"|(?:cc1plus|g\+\+|c\+\+|gcc): (?:fatal )?error: )")


def quote_compile_errors(stderr: str, returncode: int) -> str:
    """At most three error lines, each located in the answer (or the toolchain's own one-line
    summaries), trimmed; never source excerpts or messages about other files, whose text could
    be the contents of a file the answer managed to pull in."""
    lines = [ln for ln in stderr.splitlines() if _ANSWER_DIAG.match(ln)]
    lines = lines or [ln for ln in stderr.splitlines() if _TOOL_DIAG.match(ln)]
    if not lines:
        return f"the compiler exited with status {returncode}; its messages are not about the answer and are not quoted"
    return " | ".join(ln if len(ln) <= 200 else ln[:197] + "..." for ln in lines[:3])[:400]


# ---- isolation ------------------------------------------------------------------------------

FULL_ISOLATION = ("--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--mount-proc")
SANDBOX_UID_BASE = 64000  # uids BASE..BASE+SLOTS-1: no login, no files, no processes but ours
SANDBOX_SLOTS = 16
COMPILE_FSIZE = 64 << 20  # bytes per file written
RUN_FSIZE = 16 << 20
NPROC = 64  # processes (threads) of one step; g++ needs about 5
OUTPUT_CAP = 1 << 20  # bytes of stdout / stderr read back
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class _Mode:
    """One way of isolating a step on this host, as found by `_Sandbox.probe`."""

    ns: tuple[str, ...]  # unshare flags; () without unshare
    uid_via: str  # "popen" (setuid before exec), "setpriv" (after unshare), "" (no uid switch)
    nproc_via: str  # "rlimit" (before exec), "prlimit" (inside the user namespace), "" (none)
    note: str  # what is missing, for the verdict; "" when fully isolated

    @property
    def pid_ns(self) -> bool:
        return "--pid" in self.ns


@dataclass
class _Slot:
    uid: int | None  # the unprivileged uid this grade runs as (root only)
    dedicated: bool  # the uid is ours alone, so every process of it may be killed


@dataclass
class _Sandbox:
    unshare: str | None = field(default_factory=lambda: shutil.which("unshare"))
    setpriv: str | None = field(default_factory=lambda: shutil.which("setpriv"))
    prlimit: str | None = field(default_factory=lambda: shutil.which("prlimit"))
    _mode: _Mode | None = None
    _uids: list[int] | None = None
    _dedicated: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _free: threading.Condition = field(default_factory=threading.Condition)

    # -- what this host permits (probed once per process) --

    def mode(self) -> _Mode:
        with self._lock:
            if self._mode is None:
                self._mode = self.probe()
            return self._mode

    def probe(self) -> _Mode:
        """The strongest isolation this host permits, trying each variant on /bin/true."""
        root = os.geteuid() == 0
        notes: list[str] = []
        if root:
            self._uids, self._dedicated = list(range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_SLOTS)), True
            if not self._try(_Mode((), "popen", "", ""), self._uids[0]):
                self._uids, self._dedicated = [65534], False  # nobody: shared, so never killed by uid
                if not self._try(_Mode((), "popen", "", ""), 65534):
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
            mode = _Mode(ns, uid_via, nproc_via, "")
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
            return _Mode(ns, uid_via, nproc_via, _note(notes + lost))
        raise AssertionError("unreachable: the last candidate is always taken")

    def _try(self, mode: _Mode, uid: int | None) -> bool:
        true = shutil.which("true") or "/bin/true"
        with tempfile.TemporaryDirectory(prefix="eval-code-probe-") as tmp:
            if uid is not None:
                os.chown(tmp, uid, uid)
            try:
                rc, _, _ = self.run(mode, _Slot(uid, self._dedicated), [true], tmp, 10, 10, 256 << 20, 1 << 20)
            except (OSError, subprocess.SubprocessError):
                return False
        return rc == 0

    # -- one grade at a time per uid --

    @contextlib.contextmanager
    def slot(self) -> Iterator[tuple[_Mode, _Slot]]:
        mode = self.mode()
        if not self._uids:
            yield mode, _Slot(None, False)
            return
        if not self._dedicated:  # nobody, shared by every grade
            yield mode, _Slot(self._uids[0], False)
            return
        with self._free:
            while not self._uids:
                self._free.wait()
            uid = self._uids.pop(0)
        try:
            yield mode, _Slot(uid, True)
        finally:
            with self._free:
                self._uids.append(uid)
                self._free.notify()

    # -- one step --

    def run(self, mode: _Mode, slot: _Slot, cmd: list[str], cwd: str, timeout: float, cpu_s: int,
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

    def _kill(self, p: subprocess.Popen, mode: _Mode, slot: _Slot) -> None:
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


_SANDBOX = _Sandbox()


class CodeGrader:
    def __init__(self, spec: CodeSpec, compiler: str = "g++"):
        self.spec = spec
        self.compiler = compiler

    def grade(self, answer: str) -> Verdict:
        compiler = shutil.which(self.compiler)
        if compiler is None:
            raise RuntimeError(f"{self.compiler} not found: the code grader needs a real C++ compiler")
        candidates = extract_candidates(answer)
        if not candidates:
            return Verdict(status="fail", score=0.0, reason="no C++ code found in the answer")
        errors: list[str] = []
        with _SANDBOX.slot() as (mode, slot), tempfile.TemporaryDirectory(prefix="eval-code-") as tmp:
            os.chmod(tmp, 0o700)
            if slot.uid is not None:
                os.chown(tmp, slot.uid, slot.uid)
            step = _Step(mode, slot, tmp)
            verdict = None
            for label, src in candidates:
                call = find_call(src, self.spec.function)
                if call is None:
                    errors.append(f"{label}: no function taking vector<int> (or an int array and its size) and returning bool")
                    continue
                bad = unsafe_includes(src)
                if bad:
                    errors.append(f"{label}: refused, not compiled: {'; '.join(bad[:3])} "
                                  "(absolute paths, '..' and computed includes are not allowed)")
                    continue
                ok, msg = self._compile(step, compiler, build_source(src, call))
                if not ok:
                    errors.append(f"{label}: compile error: {msg}")
                    continue
                verdict = self._run_cases(step, label, call, errors)
                break
        if verdict is None:
            if any(": compile error: " in e for e in errors):
                reason = "does not compile"
            elif any(": refused, not compiled: " in e for e in errors):
                reason = "refused: #include of a file outside the standard headers"
            else:
                reason = "no callable function found"
            verdict = Verdict(status="fail", score=0.0, details=errors, reason=reason)
        if mode.note:
            verdict.reason += f" ({mode.note})"
            verdict.details.append(mode.note)
        return verdict

    def _compile(self, step: _Step, compiler: str, source: str) -> tuple[bool, str]:
        with open(os.path.join(step.tmp, "prog.cpp"), "w") as f:
            f.write(source)
        if step.slot.uid is not None:
            os.chown(os.path.join(step.tmp, "prog.cpp"), step.slot.uid, step.slot.uid)
        cmd = [compiler, f"-std={self.spec.std}", "-O2", "-w", "-o", "prog", "prog.cpp"]
        t = self.spec.compile_timeout_s
        rc, _, err = step.run(cmd, t, int(t) + 1, 2 << 30, COMPILE_FSIZE)
        if rc is None:
            return False, f"compiler timed out after {t:g}s"
        if rc != 0:
            return False, quote_compile_errors(err, rc)
        return True, ""

    def _run_cases(self, step: _Step, label: str, call: _Call, errors: list[str]) -> Verdict:
        details = [f"graded {label}, calling {call.where}"] + errors
        passed = 0
        for case in self.spec.cases:
            stdin = f"{len(case.nums)}\n" + " ".join(map(str, case.nums)) + "\n"
            rc, out, _ = step.run(
                [os.path.join(step.tmp, "prog")], self.spec.time_limit_s,
                int(self.spec.time_limit_s) + 1, self.spec.memory_mb << 20, RUN_FSIZE, stdin,
            )
            got = re.findall(r"@@RESULT@@([01])", out)
            if rc is None:
                outcome = f"timed out (> {self.spec.time_limit_s:g}s)"
            elif rc != 0:
                outcome = f"crashed (exit {rc}{', signal ' + str(-rc) if rc < 0 else ''})"
            elif not got:
                outcome = "printed no result"
            elif (got[-1] == "1") == case.expect:
                outcome = "ok"
                passed += 1
            else:
                outcome = f"wrong: returned {'true' if got[-1] == '1' else 'false'}, expected {str(case.expect).lower()}"
            details.append(f"case {case.name}: {outcome}")
        n = len(self.spec.cases)
        score = passed / n
        status = status_for(score, self.spec.pass_at, self.spec.partial_at)
        return Verdict(status=status, score=round(score, 4), reason=f"{passed}/{n} hidden cases pass", details=details)


@dataclass
class _Step:
    """The isolation, uid and directory of one grade."""

    mode: _Mode
    slot: _Slot
    tmp: str

    def run(self, cmd: list[str], timeout: float, cpu_s: int, mem_bytes: int | None, fsize: int,
            stdin: str = "") -> tuple[int | None, str, str]:
        return _SANDBOX.run(self.mode, self.slot, cmd, self.tmp, timeout, cpu_s, mem_bytes, fsize, stdin)
