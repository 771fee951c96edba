"""The error budget of one grading batch: when a reward function fails too often, the run stops.

A function whose failed calls (exception, timeout, crash, memory, non-finite or wrongly typed return) exceed
``reward.max_error_frac`` of its calls in a batch stops the run with ``RewardFunctionError`` quoting its first
error. The budget is fed every outcome as it arrives, so the pool can stop spending ``reward.timeout_s`` per
call once the verdict is certain: the failed count already exceeds the limit, or the function timed out
``consecutive_timeouts`` calls in a row (a hanging function; see docs/rewards.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from rltrain.errors import RunError


class RewardFunctionError(RunError):
    """A reward function failed on more than ``reward.max_error_frac`` of its calls in one batch."""


def consecutive_timeout_limit(num_workers: int) -> int:
    """Timeouts in a row, with no successful call of the function between them, that trip the budget.

    One more than the workers: every worker has hung on it, and one more call on a fresh worker did too.
    """
    return num_workers + 1


@dataclass
class _Tally:
    ref: str  # the function's ``fn`` spec, as the user wrote it (files absolute)
    calls: int  # calls of this function in the batch
    failed: int = 0
    timeouts_in_row: int = 0
    first_error: str = ""


class ErrorBudget:
    """Per-function failure counts of one batch. ``record`` returns True once the batch is certain to fail."""

    def __init__(
        self,
        refs: list[str],
        calls: list[int],
        max_error_frac: float,
        timeouts_in_row_limit: int,
        what: str = "reward function",
    ):
        """``refs[i]``/``calls[i]``: function i's spec and its number of calls in this batch; ``what`` names the
        kind of code in the error ("reward function", "environment")."""
        self._what = what
        self._tallies = [_Tally(ref, count) for ref, count in zip(refs, calls)]
        self._max_error_frac = max_error_frac
        self._timeouts_in_row_limit = timeouts_in_row_limit
        self.tripped: int | None = None  # index of the first function over its budget
        self._why = ""

    @property
    def enabled(self) -> bool:
        return self._max_error_frac < 1.0

    def record(self, spec_index: int, kind: str, message: str) -> bool:
        """Count one outcome (``kind`` "ok" or an error kind); True when the batch is over budget."""
        tally = self._tallies[spec_index]
        if kind == "ok":
            tally.timeouts_in_row = 0
        else:
            tally.failed += 1
            tally.first_error = tally.first_error or f"{kind}: {message}"
            tally.timeouts_in_row = tally.timeouts_in_row + 1 if kind == "timeout" else 0
        if self.tripped is None and self.enabled:
            if tally.failed > self._max_error_frac * tally.calls:
                self.tripped, self._why = spec_index, ""
            elif tally.timeouts_in_row >= self._timeouts_in_row_limit:
                self.tripped = spec_index
                self._why = f"stopped early after {tally.timeouts_in_row} timeouts in a row"
        return self.tripped is not None

    def error(self, skipped: int) -> RewardFunctionError:
        """The error naming the tripped function; ``skipped``: calls of the batch not run after the trip."""
        assert self.tripped is not None, "error() is for a tripped budget"
        tally = self._tallies[self.tripped]
        notes = [self._why] if self._why else []
        notes += [f"{skipped} calls of the batch left unrun"] if skipped else []
        notes_text = f" ({'; '.join(notes)})" if notes else ""
        return RewardFunctionError(
            f"{self._what} {tally.ref} failed on {tally.failed} of {tally.calls} calls in one batch"
            f"{notes_text}; more than reward.max_error_frac={self._max_error_frac:g} allows. "
            f"First error: {tally.first_error}"
        )
