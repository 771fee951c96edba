"""The grader pool, fast: adversarial completions and failing reward functions through real processes."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rltrain.grading import ERROR_KINDS, RewardGrader

TIMEOUT_S = 2.0
BAD = """
import ctypes, time

def by_mode(completion, ground_truth):
    if completion == "raise":
        raise RuntimeError("boom")
    if completion == "hang":
        while True:
            pass
    if completion == "segfault":
        ctypes.string_at(0)
    if completion == "nan":
        return float("nan")
    if completion == "exit":
        raise SystemExit(3)
    if completion == "hog":
        return len(bytearray(64 * 2**30))
    return 1.0
"""
ADVERSARIAL = [
    "",
    "\\boxed{" * 10_000,
    "}" * 5000 + "{" * 5000,
    "\x00\x01\x02\x7f" * 500,
    "\\frac{" * 2000 + "1",
    "$" * 3001,
    "\\boxed{9^{9^{9^{9}}}}",  # SymPy would compute this for ever: the deadline ends it
    "9" * 100_000,
    "\ud800 surrogate",
]


@pytest.fixture(scope="module")
def grader():
    functions = [{"fn": "math"}, {"fn": "gsm8k"}, {"fn": "countdown"}, {"fn": "format", "params": {"mode": "tags"}}]
    with RewardGrader(functions, num_workers=2, timeout_s=TIMEOUT_S) as grader:
        yield grader


def _rows(n):
    return [{"answer": {"target": 5, "numbers": [2, 3]}}] * n


def test_adversarial_completions_never_escape(grader):
    result = grader.grade(ADVERSARIAL, _rows(len(ADVERSARIAL)))
    assert result.rewards.shape == (len(ADVERSARIAL),)
    assert result.metrics["perf/grading_call_max_s"] <= TIMEOUT_S + 1.0
    assert result.metrics["reward/errors/exception"] == 0  # a timeout is allowed, an escaped exception is not


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=300), min_size=1, max_size=20))
def test_random_text_is_graded(grader, completions):
    result = grader.grade(completions, _rows(len(completions)))
    assert result.metrics["perf/grading_call_max_s"] <= TIMEOUT_S + 1.0
    assert sum(result.metrics[f"reward/errors/{kind}"] for kind in ERROR_KINDS) == 0


def test_each_failure_costs_on_error_and_is_counted(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(BAD)
    modes = ["ok", "raise", "hang", "segfault", "nan", "exit", "hog", "ok"]
    with RewardGrader([{"fn": f"{path}:by_mode"}], num_workers=2, timeout_s=1.0, memory_mb=256, on_error=-1.0) as g:
        result = g.grade(modes, [{"answer": None}] * len(modes))
        again = g.grade(["ok"] * 4, [{"answer": None}] * 4)  # the pool is whole again
    assert result.rewards.tolist() == [1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0]
    errors = {kind: result.metrics[f"reward/errors/{kind}"] for kind in ERROR_KINDS}
    assert errors == {"exception": 2.0, "timeout": 1.0, "crash": 1.0, "nonfinite": 1.0, "memory": 1.0}
    assert again.rewards.tolist() == [1.0] * 4
