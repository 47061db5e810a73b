"""Code grader for the partition question: pull the C++ out of the answer, compile it with the
real g++ -std=c++17 in a temp dir, and run hidden cases under time and memory limits.

The answer may define a free function or a method of `class Solution` (LeetCode style), with or
without its own `main`; its `main` is renamed so our harness can call the function. Score is
the fraction of cases passed; compile errors are quoted in the verdict.

The answer is untrusted code: it runs as a child process with rlimits (address space, CPU,
file size, no core) in a throwaway directory. That bounds accidents, it is not a sandbox.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
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


def _limits(cpu_s: int, mem_bytes: int | None):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        if mem_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _run(cmd: list[str], cwd: str, timeout: float, cpu_s: int, mem_bytes: int | None, stdin: str = "") -> tuple[int | None, str, str]:
    """(returncode or None on timeout, stdout, stderr); the whole process group dies on timeout."""
    # preexec_fn only calls setrlimit (no locks, no allocation of note), which is safe even
    # though grading runs in a thread pool.
    p = subprocess.Popen(
        cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=_limits(cpu_s, mem_bytes), start_new_session=True,  # noqa: PLW1509
    )
    try:
        out, err = p.communicate(stdin, timeout=timeout)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return None, out, err


class CodeGrader:
    def __init__(self, spec: CodeSpec, compiler: str = "g++"):
        self.spec = spec
        self.compiler = compiler

    def grade(self, answer: str) -> Verdict:
        if shutil.which(self.compiler) is None:
            raise RuntimeError(f"{self.compiler} not found: the code grader needs a real C++ compiler")
        candidates = extract_candidates(answer)
        if not candidates:
            return Verdict(status="fail", score=0.0, reason="no C++ code found in the answer")
        errors: list[str] = []
        with tempfile.TemporaryDirectory(prefix="eval-code-") as tmp:
            for label, src in candidates:
                call = find_call(src, self.spec.function)
                if call is None:
                    errors.append(f"{label}: no function taking vector<int> (or an int array and its size) and returning bool")
                    continue
                ok, msg = self._compile(tmp, build_source(src, call))
                if not ok:
                    errors.append(f"{label}: compile error: {msg}")
                    continue
                return self._run_cases(tmp, label, call, errors)
        return Verdict(
            status="fail", score=0.0, details=errors,
            reason="does not compile" if any("compile error" in e for e in errors) else "no callable function found",
        )

    def _compile(self, tmp: str, source: str) -> tuple[bool, str]:
        with open(os.path.join(tmp, "prog.cpp"), "w") as f:
            f.write(source)
        cmd = [self.compiler, f"-std={self.spec.std}", "-O2", "-w", "-o", "prog", "prog.cpp"]
        t = self.spec.compile_timeout_s
        rc, _, err = _run(cmd, tmp, t, int(t) + 1, 2 << 30)
        if rc is None:
            return False, f"compiler timed out after {t:g}s"
        if rc != 0:
            lines = [ln for ln in err.splitlines() if "error" in ln] or err.splitlines()
            return False, " | ".join(lines[:3])[:400]
        return True, ""

    def _run_cases(self, tmp: str, label: str, call: _Call, errors: list[str]) -> Verdict:
        details = [f"graded {label}, calling {call.where}"] + errors
        passed = 0
        for case in self.spec.cases:
            stdin = f"{len(case.nums)}\n" + " ".join(map(str, case.nums)) + "\n"
            rc, out, _ = _run(
                [os.path.join(tmp, "prog")], tmp, self.spec.time_limit_s,
                int(self.spec.time_limit_s) + 1, self.spec.memory_mb << 20, stdin,
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
