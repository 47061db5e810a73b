"""The C++ grader against hand-written answers, compiled with the real g++ and run for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.graders import build_grader
from eval.graders.code import extract_candidates, find_call
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
