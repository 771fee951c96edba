"""The error budget of a grading batch (pure): when a reward function's failures stop the run."""

import pytest

from rltrain.errors import RunError
from rltrain.grading.limits import ErrorBudget, RewardFunctionError, consecutive_timeout_limit


def _budget(max_error_frac=0.5, calls=10, timeouts_in_row=3):
    return ErrorBudget(["f.py:good", "f.py:bad"], [calls, calls], max_error_frac, timeouts_in_row)


def test_trips_when_one_function_fails_on_more_than_its_fraction():
    budget = _budget()
    for _ in range(5):
        assert not budget.record(1, "exception", "ValueError: x")  # 5 of 10 is not more than half
        assert not budget.record(0, "ok", "")
    assert budget.record(1, "nonfinite", "non-finite ['score']: [nan]")
    assert budget.tripped == 1
    message = str(budget.error(skipped=4))
    assert "f.py:bad failed on 6 of 10 calls" in message
    assert "reward.max_error_frac=0.5" in message and "4 calls of the batch left unrun" in message
    assert message.endswith("First error: exception: ValueError: x")  # the first error, not the latest


def test_timeouts_in_a_row_trip_early_and_a_success_resets_the_run():
    budget = _budget(calls=100)
    for _ in range(2):
        assert not budget.record(0, "timeout", "t")
    assert not budget.record(0, "ok", "")
    assert not budget.record(0, "timeout", "t") and not budget.record(0, "timeout", "t")
    assert not budget.record(0, "exception", "e")  # another kind breaks the run of timeouts
    assert not any(budget.record(0, "timeout", "t") for _ in range(2))
    assert budget.record(0, "timeout", "t")
    assert "3 timeouts in a row" in str(budget.error(skipped=0))


@pytest.mark.parametrize("kinds", [["timeout"] * 10, ["exception"] * 10])
def test_a_fraction_of_one_never_trips(kinds):
    budget = _budget(max_error_frac=1.0)
    assert not any(budget.record(1, kind, "m") for kind in kinds)
    assert budget.tripped is None


def test_a_fraction_of_zero_trips_on_the_first_failure():
    budget = _budget(max_error_frac=0.0)
    assert not budget.record(0, "ok", "")
    assert budget.record(0, "crash", "grader process killed by signal SIGSEGV")


def test_the_error_is_a_run_error_and_the_limit_grows_with_workers():
    assert issubclass(RewardFunctionError, RunError)
    assert consecutive_timeout_limit(1) == 2 and consecutive_timeout_limit(4) == 5
