"""The grader pool, fast: adversarial completions and failing reward functions through real processes."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rltrain.grading import ERROR_KINDS, RewardFunctionError, RewardGrader
from rltrain.grading.limits import ErrorBudget, consecutive_timeout_limit
from rltrain.grading.pool import SKIPPED, GraderPool

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
    if completion == "none":
        return None
    if completion == "string":
        return "1.0"
    return 1.0
"""
HANGS = """
import time

def hangs(completion, ground_truth, started):
    with open(started, "a") as log:
        log.write("call\\n")
    time.sleep(3600)
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
    # containment is tested here, not the error budget: a loaded machine may time out a few calls in a row
    with RewardGrader(functions, num_workers=2, timeout_s=TIMEOUT_S, max_error_frac=1.0) as grader:
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
    modes = ["ok", "raise", "hang", "segfault", "nan", "exit", "hog", "none", "string", "ok"]
    options = {"num_workers": 2, "timeout_s": 1.0, "memory_mb": 256, "on_error": -1.0, "max_error_frac": 1.0}
    with RewardGrader([{"fn": f"{path}:by_mode"}], **options) as g:
        result = g.grade(modes, [{"answer": None}] * len(modes))
        again = g.grade(["ok"] * 4, [{"answer": None}] * 4)  # the pool is whole again
    assert result.rewards.tolist() == [1.0] + [-1.0] * 8 + [1.0]
    errors = {kind: result.metrics[f"reward/errors/{kind}"] for kind in ERROR_KINDS}
    # None and a string are no reward: TypeError, counted with the exceptions
    assert errors == {"exception": 4.0, "timeout": 1.0, "crash": 1.0, "nonfinite": 1.0, "memory": 1.0}
    assert again.rewards.tolist() == [1.0] * 4


def test_failing_on_more_than_max_error_frac_raises_with_the_first_error(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(BAD)
    functions = [{"fn": "format"}, {"fn": f"{path}:by_mode"}]
    # one worker: calls finish in order, so the first error is the first failing sample's
    with RewardGrader(functions, num_workers=1, timeout_s=5.0, max_error_frac=0.5) as grader:
        assert grader.grade(["raise", "nan", "ok", "ok"], [{"answer": None}] * 4).rewards.shape == (4,)  # 2 of 4
        with pytest.raises(RewardFunctionError) as caught:
            grader.grade(["ok", "raise", "none", "raise"], [{"answer": None}] * 4)
        assert grader.grade(["ok"] * 2, [{"answer": None}] * 2).rewards.tolist() == [1.0, 1.0]  # usable after
    message = str(caught.value)
    assert f"reward function {path}:by_mode failed on 3 of 4 calls" in message
    assert "reward.max_error_frac=0.5" in message
    # the first failure, with the line of the user's file that raised
    assert "First error: exception: RuntimeError: boom (at " in message and 'raise RuntimeError("boom")' in message


def test_a_hanging_function_stops_the_batch_after_a_few_timeouts(tmp_path):
    """All-hanging batch of 24 calls: only the first few start; the rest are skipped, not waited for."""
    path, started = tmp_path / "hangs.py", tmp_path / "started.log"
    path.write_text(HANGS)
    functions = [{"fn": f"{path}:hangs", "params": {"started": str(started)}}]
    with RewardGrader(functions, num_workers=2, timeout_s=0.5, batch_size=1) as grader:
        with pytest.raises(RewardFunctionError, match="3 timeouts in a row"):
            grader.grade(["x"] * 24, [{"answer": None}] * 24)
    limit = consecutive_timeout_limit(2)
    assert len(started.read_text().splitlines()) <= limit + 1  # the last replacement may have begun one more


def test_the_pool_marks_calls_after_the_trip_skipped(tmp_path):
    path, started = tmp_path / "hangs.py", tmp_path / "started.log"
    path.write_text(HANGS)
    portable = [{"fn": f"{path}:hangs", "weight": 1.0, "params": {"started": str(started)}}]
    budget = ErrorBudget([portable[0]["fn"]], [12], 0.5, consecutive_timeout_limit(2))
    pool = GraderPool(portable, num_workers=2, timeout_s=0.5, memory_mb=256, batch_size=4)
    try:
        outcomes = pool.run([(0, "x", None, {})] * 12, lambda task, outcome: budget.record(0, outcome.kind, ""))
    finally:
        pool.close()
    kinds = [outcome.kind for outcome in outcomes]
    assert kinds.count("timeout") == 3 and kinds.count(SKIPPED) == 9
