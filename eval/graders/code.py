"""Code grader for the partition question: pull the C++ out of the answer, compile it with the
real g++ -std=c++17 in a temp dir, and run hidden cases under time and memory limits.

The answer may define a free function or a method of `class Solution` (LeetCode style), with or
without its own `main`; its `main` is renamed so our harness can call the function. Score is
the fraction of cases passed; compile errors are quoted in the verdict.

The answer is untrusted code, and so is its compilation: both steps run in the sandbox of
eval/graders/sandbox.py (no network, its own uid and PID namespace, rlimits, a wall-clock
timeout that kills everything it started), and the verdict says which isolation the host did
not permit. `#include` of an absolute path, of `..`, or computed from a macro is refused before
compiling, and only diagnostics located in the answer itself are quoted, so the report cannot
show the contents of files outside the temporary directory.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .base import Verdict, status_for
from .sandbox import COMPILE_FSIZE, RUN_FSIZE, SANDBOX, Mode, Slot


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
        with SANDBOX.slot() as (mode, slot), tempfile.TemporaryDirectory(prefix="eval-code-") as tmp:
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

    mode: Mode
    slot: Slot
    tmp: str

    def run(self, cmd: list[str], timeout: float, cpu_s: int, mem_bytes: int | None, fsize: int,
            stdin: str = "") -> tuple[int | None, str, str]:
        return SANDBOX.run(self.mode, self.slot, cmd, self.tmp, timeout, cpu_s, mem_bytes, fsize, stdin)
