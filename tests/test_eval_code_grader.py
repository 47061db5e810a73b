"""The C++ grader against hand-written answers, compiled with the real g++ and run for real,
hostile ones included: they must not hang the grader, outlive it, reach the network or leak
files into the report."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from eval.graders import build_grader
from eval.graders import code as code_mod
from eval.graders import sandbox as sandbox_mod
from eval.graders.code import (
    CodeGrader,
    CodeSpec,
    extract_candidates,
    find_call,
    unsafe_includes,
)
from eval.questions import load_question_set

ROOT = Path(__file__).resolve().parent.parent
BIG = "200 elements (greedy fails, search times out)"


@pytest.fixture(scope="module")
def grader():
    qs = load_question_set(ROOT / "conf/eval/seed-zh.yaml")
    return build_grader(qs.question("q5-partition").grader)


def outcome(verdict, case: str) -> str:
    return next(d for d in verdict.details if d.startswith(f"case {case}:")).split(": ", 1)[1]


DP_FREE_FUNCTION_WITH_MAIN = """这是经典的 0-1 背包问题：总和为奇数直接返回 false，否则判断能否凑出 sum/2。

```cpp
#include <iostream>
#include <vector>
#include <numeric>
using namespace std;

bool canPartition(vector<int>& nums) {
    int sum = accumulate(nums.begin(), nums.end(), 0);
    if (sum % 2 != 0) return false;
    int target = sum / 2;
    vector<bool> dp(target + 1, false);
    dp[0] = true;
    for (int num : nums)
        for (int j = target; j >= num; --j)
            dp[j] = dp[j] || dp[j - num];
    return dp[target];
}

int main() {
    vector<int> nums = {1, 5, 11, 5};
    cout << (canPartition(nums) ? "true" : "false") << endl;
    return 0;
}
```

时间复杂度 O(n * sum)。
"""

GREEDY = """Sort in descending order and always add the next number to the lighter subset.

```c++
#include <bits/stdc++.h>
using namespace std;

bool canPartition(vector<int>& nums) {
    sort(nums.begin(), nums.end(), greater<int>());
    long long a = 0, b = 0;
    for (int x : nums) { if (a <= b) a += x; else b += x; }
    return a == b;
}

int main() {
    int n; cin >> n;
    vector<int> nums(n);
    for (auto &x : nums) cin >> x;
    cout << boolalpha << canPartition(nums) << endl;
}
```
"""

DOES_NOT_COMPILE = """```cpp
#include <vector>
using namespace std;
bool canPartition(vector<int>& nums) {
    int sum = 0
    for (int x : nums) sum += x;
    return sum % 2 == 0
}
```
"""

SOLUTION_CLASS_UNFENCED = """Here is a LeetCode-style solution:

class Solution {
public:
    bool canPartition(vector<int>& nums) {
        int sum = 0;
        for (int n : nums) sum += n;
        if (sum & 1) return false;
        bitset<10001> bits(1);
        for (int n : nums) bits |= bits << n;
        return bits[sum >> 1];
    }
};

It tracks every reachable sum in a bitset.
"""

EXPONENTIAL_SEARCH_IN_CLASS_WITH_MAIN = """```cpp
#include <bits/stdc++.h>
using namespace std;

class Solution {
    bool dfs(vector<int>& nums, int i, int remain) {
        if (remain == 0) return true;
        if (i == (int)nums.size() || remain < 0) return false;
        return dfs(nums, i + 1, remain - nums[i]) || dfs(nums, i + 1, remain);
    }
public:
    bool canPartition(vector<int>& nums) {
        int s = accumulate(nums.begin(), nums.end(), 0);
        if (s % 2) return false;
        return dfs(nums, 0, s / 2);
    }
};

int main() {
    Solution sol;
    vector<int> v{1, 5, 11, 5};
    cout << sol.canPartition(v) << endl;
}
```
"""


def test_correct_dp_passes_every_case(grader):
    v = grader.grade(DP_FREE_FUNCTION_WITH_MAIN)
    assert (v.status, v.score) == ("pass", 1.0), v
    assert "function canPartition" in v.details[0]


def test_greedy_fails_the_big_case_only(grader):
    v = grader.grade(GREEDY)
    assert v.status == "partial" and v.score == pytest.approx(5 / 6, abs=1e-3), v
    assert outcome(v, BIG) == "wrong: returned false, expected true"
    assert outcome(v, "{1,5,11,5}") == "ok"


def test_compile_error_is_a_fail_that_quotes_the_compiler(grader):
    v = grader.grade(DOES_NOT_COMPILE)
    assert (v.status, v.score, v.reason) == ("fail", 0.0, "does not compile")
    assert any("compile error" in d and "error:" in d for d in v.details), v.details


def test_unfenced_class_solution_without_main_passes(grader):
    v = grader.grade(SOLUTION_CLASS_UNFENCED)
    assert (v.status, v.score) == ("pass", 1.0), v
    assert "method Solution::canPartition" in v.details[0]


def test_exponential_search_times_out_on_the_big_case(grader):
    v = grader.grade(EXPONENTIAL_SEARCH_IN_CLASS_WITH_MAIN)
    assert v.status == "partial" and v.score == pytest.approx(5 / 6, abs=1e-3), v
    assert outcome(v, BIG).startswith("timed out")


def test_no_code_at_all(grader):
    v = grader.grade("You can use dynamic programming over the possible sums.")
    assert (v.status, v.reason) == ("fail", "no C++ code found in the answer")


def test_c_style_array_signature_and_crash_are_handled(grader):
    # Reads past the end of the array for n == 1 would be UB; this one divides by zero instead.
    answer = "```cpp\nbool canPartition(int nums[], int n) { int z = n - n; return nums[0] / z; }\n```"
    v = grader.grade(answer)
    assert v.status == "fail"
    assert "crashed" in outcome(v, "{1}")


def test_several_blocks_are_joined_when_they_form_one_program():
    answer = (
        "```cpp\nclass Solution { public: bool canPartition(vector<int>& a) { return false; } };\n```\n"
        "Usage:\n```cpp\nint main() { Solution s; vector<int> v{1}; return s.canPartition(v); }\n```"
    )
    labels = [label for label, _ in extract_candidates(answer)]
    assert labels[0] == "all C++ blocks joined"
    call = find_call(extract_candidates(answer)[0][1], "canPartition")
    assert call.expr == "Solution().canPartition(v)"


def test_differently_named_function_is_found():
    call = find_call("bool isSplittable(const std::vector<int>& v) { return true; }", "canPartition")
    assert call.expr == "isSplittable(v)"


# ---- isolation: the answer's code is hostile ---------------------------------------------------

def quick_spec(**kw) -> CodeSpec:
    """The review's setting: 1 s limits, and few cases so a hang shows as seconds, not minutes."""
    return CodeSpec(type="code", time_limit_s=1.0, compile_timeout_s=30, cases=[
        {"name": "a", "nums": [1, 1], "expect": True},
        {"name": "b", "nums": [1, 2], "expect": False},
    ], **kw)


def answer(body: str, includes: str = "#include <bits/stdc++.h>\n#include <unistd.h>\n") -> str:
    return "```cpp\n" + includes + "using namespace std;\n" + textwrap.dedent(body) + "\n```"


# The review's case: both processes detach into their own session and sleep.
FORK_SETSID_SLEEP = answer("""
    bool canPartition(vector<int>& nums) {
        fork();
        setsid();
        sleep(30);
        return true;
    }
""")

# The parent answers at once; the detached child would hold the output open for 30 s.
DETACHED_CHILD = answer("""
    bool canPartition(vector<int>& nums) {
        if (fork() == 0) { setsid(); sleep(30); _exit(0); }
        return nums.size() == 2 && nums[0] == nums[1];
    }
""")


def stray_processes() -> list[str]:
    """Anything a graded program left alive: our descendants, the sandbox uids' processes,
    or a process running a compiled `prog` (a killed one may linger a moment as a zombie of
    the host's init: that one is dead)."""
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    sandbox = range(sandbox_mod.SANDBOX_UID_BASE, sandbox_mod.SANDBOX_UID_BASE + sandbox_mod.SANDBOX_SLOTS)
    out = []
    for p in psutil.process_iter(["pid", "name", "uids", "cmdline", "status", "ppid"]):
        info = p.info
        if info["status"] == psutil.STATUS_ZOMBIE and info["ppid"] != os.getpid():
            continue
        cmd = " ".join(info["cmdline"] or [])
        if (info["pid"] in mine or (info["uids"] and info["uids"].real in sandbox)
                or info["name"] == "prog" or "eval-code-" in cmd):
            out.append(f"{info['pid']} {info['name']} {cmd}")
    return out


@pytest.fixture
def sandbox_variant(request, monkeypatch):
    """The grader's sandbox as probed on this host ("full"), or as it degrades where a user
    namespace ("no-userns") or unshare altogether ("no-unshare") is not permitted."""
    variant = getattr(request, "param", "full")
    if variant == "full":
        yield sandbox_mod.SANDBOX
        return
    real = sandbox_mod.shutil.which("unshare")
    fake_dir = tempfile.mkdtemp(prefix="fake-unshare-")
    fake = os.path.join(fake_dir, "unshare")
    with open(fake, "w") as f:
        if variant == "no-userns":
            f.write(f'#!/bin/sh\nfor a; do [ "$a" = --user ] && {{ echo "unshare: Operation not permitted" >&2; exit 1; }}; '
                    f'[ "$a" = -- ] && break; done\nexec {real} "$@"\n')
        else:
            f.write('#!/bin/sh\necho "unshare: unshare failed: Operation not permitted" >&2\nexit 1\n')
    os.chmod(fake, 0o755)
    os.chmod(fake_dir, 0o755)
    box = sandbox_mod.Sandbox(unshare=fake)
    monkeypatch.setattr(code_mod, "SANDBOX", box)
    yield box
    sandbox_mod.shutil.rmtree(fake_dir, ignore_errors=True)


def test_sandbox_is_fully_isolated_here():
    mode = sandbox_mod.SANDBOX.mode()
    assert mode.ns == sandbox_mod.FULL_ISOLATION and mode.note == "", mode


VARIANTS = ["full", "no-userns", "no-unshare"]


@pytest.mark.parametrize("sandbox_variant", VARIANTS, indirect=True)
def test_fork_setsid_sleep_times_out_fast_and_leaves_nothing(sandbox_variant):
    mode = sandbox_variant.mode()
    if not mode.pid_ns and os.geteuid() != 0:
        pytest.skip("without a PID namespace only root (a dedicated uid) can find setsid'd processes")
    before = set(stray_processes())
    t0 = time.monotonic()
    v = CodeGrader(quick_spec()).grade(FORK_SETSID_SLEEP)
    took = time.monotonic() - t0
    assert v.status == "fail" and v.score == 0.0, v
    assert outcome(v, "a").startswith("timed out") and outcome(v, "b").startswith("timed out"), v.details
    # compile (~1-2 s) + 2 cases x 1 s; the old grader waited out each sleep (30 s per case),
    # or forever. The bound leaves room for a busy 2-core machine.
    assert took < 15, f"grading took {took:.1f}s"
    assert set(stray_processes()) - before == set()
    if mode.note:
        assert mode.note in v.reason


@pytest.mark.parametrize("sandbox_variant", VARIANTS, indirect=True)
def test_detached_child_does_not_hold_the_grade_or_survive_it(sandbox_variant):
    mode = sandbox_variant.mode()
    if not mode.pid_ns and os.geteuid() != 0:
        pytest.skip("without a PID namespace only root (a dedicated uid) can find setsid'd processes")
    before = set(stray_processes())
    t0 = time.monotonic()
    v = CodeGrader(quick_spec()).grade(DETACHED_CHILD)
    took = time.monotonic() - t0
    assert (v.status, v.score) == ("pass", 1.0), v
    assert took < 15, f"grading took {took:.1f}s"
    assert set(stray_processes()) - before == set()
    if mode.ns == sandbox_mod.FULL_ISOLATION:
        assert v.reason == "2/2 hidden cases pass"
    else:
        assert "sandbox degraded" in v.reason and "is not permitted here" in v.reason, v.reason


def test_network_is_unreachable_from_the_answer():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    src = answer(f"""
        #include <arpa/inet.h>
        #include <sys/socket.h>
        bool canPartition(vector<int>& nums) {{
            int s = socket(AF_INET, SOCK_STREAM, 0);
            if (s < 0) return false;
            sockaddr_in a{{}};
            a.sin_family = AF_INET;
            a.sin_port = htons({port});
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return connect(s, (sockaddr*)&a, sizeof a) == 0;
        }}
    """)
    try:
        v = CodeGrader(quick_spec()).grade(src)
        # Case a expects true: only a connection that got through would pass it.
        assert outcome(v, "a") == "wrong: returned false, expected true", v.details
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_fork_bomb_is_capped():
    before = set(stray_processes())
    v = CodeGrader(quick_spec()).grade(answer("""
        bool canPartition(vector<int>& nums) {
            int n = 0;
            for (int i = 0; i < 500; ++i) {
                pid_t p = fork();
                if (p == 0) { pause(); _exit(0); }
                if (p < 0) break;
                ++n;
            }
            return n > 10 && n < 100;  // RLIMIT_NPROC stops it at 64 processes
        }
    """))
    assert outcome(v, "a") == "ok", v.details
    assert set(stray_processes()) - before == set()


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/etc/shadow"), reason="needs root and /etc/shadow")
def test_answer_runs_without_root_file_access():
    assert not os.stat("/etc/shadow").st_mode & stat.S_IROTH
    v = CodeGrader(quick_spec()).grade(answer("""
        bool canPartition(vector<int>& nums) { return std::ifstream("/etc/shadow").good(); }
    """))
    assert outcome(v, "a") == "wrong: returned false, expected true", v.details


@pytest.mark.parametrize("include", [
    '#include "/etc/passwd"',
    "#include </etc/passwd>",
    '#include "../../../../../../../../etc/passwd"',
    "#include <bits/../../../../../../../../../etc/passwd>",
    '#define F "/etc/passwd"\n#include F',
    '%:include "/etc/passwd"',
    '#inc\\\nlude "/etc/passwd"',
    '# /* hidden */ include_next "/etc/passwd"',
    '#import "/etc/passwd"',
])
def test_include_of_files_outside_is_refused_and_never_quoted(grader, include):
    v = grader.grade(answer("bool canPartition(vector<int>& v) { return true; }", include + "\n"))
    text = v.reason + "\n" + "\n".join(v.details)
    assert v.status == "fail" and "root:" not in text, text
    assert v.reason.startswith("refused: #include"), v.reason


def test_assembler_include_does_not_leak_through_compile_errors(grader):
    # Passes the #include check; gas then reads /etc/passwd and complains about every line.
    v = grader.grade(answer('asm(".include \\"/etc/passwd\\"");\nbool canPartition(vector<int>& v) { return true; }'))
    text = v.reason + "\n" + "\n".join(v.details)
    assert v.reason == "does not compile" and "root:" not in text and "/bin/" not in text, text


def test_unsafe_includes_keeps_ordinary_headers():
    ok = "#include <bits/stdc++.h>\n#include <ext/pb_ds/assoc_container.hpp>\n#include \"solution.h\"\n#include<vector>// x\n"
    assert unsafe_includes(ok) == []
    assert unsafe_includes('#  include  "/etc/hosts"') == ['#include "/etc/hosts"']
