"""RewardGrader: grade a batch of completions with weighted reward functions in a process pool.

An exception, timeout, crash, memory overrun, non-finite or wrongly typed return costs that sample ``on_error``
for that function and counts in ``reward/errors/<kind>``; the run goes on, unless one function fails on more
than ``max_error_frac`` of its calls in the batch: then ``grade`` raises ``RewardFunctionError`` (a RunError).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rltrain.config import ConfigError
from rltrain.grading.limits import ErrorBudget, consecutive_timeout_limit
from rltrain.grading.pool import SKIPPED, GraderPool, Outcome
from rltrain.grading.resolve import RewardSpec, resolve_reward_functions
from rltrain.grading.worker import ERROR_KINDS

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
GROUND_TRUTH_KEY = "answer"


@dataclass
class GradeResult:
    """Rewards of one batch. ``parts`` holds each function's score [B] (``on_error`` where it failed) and
    ``"<name>/<metric>"`` [B] for extra numeric metrics it returned (0.0 where absent or failed)."""

    rewards: torch.Tensor  # [B] float32, sum over functions of weight * score
    parts: dict[str, torch.Tensor]
    metrics: dict[str, float]  # reward/<name>/mean, reward/<name>/<metric>, reward/errors/<kind>, perf/grading_*


class RewardGrader:
    """Weighted reward functions run in ``num_workers`` processes with a per-call deadline and memory cap.

    ``functions``: ``[{"fn": "math" | "path/file.py:name" | "pkg.mod:name", "weight": w, "params": {...}}]``.
    Resolution errors raise ConfigError here, before anything starts. ``max_error_frac``: the failed fraction
    of one function's calls in a batch above which ``grade`` raises RewardFunctionError (1.0: never).
    ``process_tag``: marks the programs the reward functions start, to kill them (see GraderPool).
    """

    def __init__(
        self,
        functions: list[dict],
        num_workers: int = 2,
        timeout_s: float = 5.0,
        memory_mb: int = 1024,
        on_error: float = 0.0,
        batch_size: int = 64,
        max_error_frac: float = 0.5,
        process_tag: str | None = None,
    ):
        check_options(num_workers, timeout_s, memory_mb, on_error, batch_size, max_error_frac)
        self.specs: list[RewardSpec] = resolve_reward_functions(functions)
        self.on_error = float(on_error)
        self.max_error_frac = float(max_error_frac)
        self._timeouts_in_row = consecutive_timeout_limit(num_workers)
        portable = [{"fn": spec.ref, "weight": spec.weight, "params": spec.params} for spec in self.specs]
        self._pool: GraderPool | None = GraderPool(
            portable, num_workers, timeout_s, memory_mb, batch_size, tag=process_tag
        )

    def grade(self, completions: list[str], rows: list[dict]) -> GradeResult:
        """Score completion i against ``rows[i]`` (ground truth under "answer", other columns as fields).

        Raises RewardFunctionError when a function is over its error budget (the batch stops early once
        that is certain: the calls not run yet are skipped)."""
        if len(completions) != len(rows):
            raise ValueError(f"{len(completions)} completions but {len(rows)} rows")
        if self._pool is None:
            raise RuntimeError("RewardGrader is closed")
        start = time.perf_counter()
        tasks = [
            (spec_index, _as_text(completion), row.get(GROUND_TRUTH_KEY), _fields(row))
            for completion, row in zip(completions, rows)
            for spec_index in range(len(self.specs))
        ]
        budget = ErrorBudget(
            [spec.ref for spec in self.specs],
            [len(completions)] * len(self.specs),
            self.max_error_frac,
            self._timeouts_in_row,
        )
        outcomes = self._pool.run(tasks, lambda task, outcome: budget.record(task[0], outcome.kind, outcome.message))
        if budget.tripped is not None:
            raise budget.error(skipped=sum(outcome.kind == SKIPPED for outcome in outcomes))
        result = assemble(self.specs, outcomes, len(completions), self.on_error)
        result.metrics["perf/grading_s"] = time.perf_counter() - start
        return result

    def close(self) -> None:
        """Stop the grader processes (idempotent)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __enter__(self) -> RewardGrader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_options(
    num_workers: int, timeout_s: float, memory_mb: int, on_error: float, batch_size: int, max_error_frac: float
) -> None:
    """The one check of the ``reward.*`` options (RewardGrader and the driver's validation pass call it; its
    parameter names are the config keys)."""
    for key, value in (("num_workers", num_workers), ("memory_mb", memory_mb), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"reward.{key}={value!r}: a positive integer")
    if not (_is_real(timeout_s) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError(f"reward.timeout_s={timeout_s!r}: a positive number of seconds")
    if not (_is_real(on_error) and math.isfinite(on_error)):
        raise ConfigError(f"reward.on_error={on_error!r}: a finite number")
    if not (_is_real(max_error_frac) and 0.0 <= max_error_frac <= 1.0):
        raise ConfigError(f"reward.max_error_frac={max_error_frac!r}: a fraction in [0, 1] (1 never stops the run)")


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_text(completion: Any) -> str:
    return completion if isinstance(completion, str) else str(completion)


def _fields(row: dict) -> dict[str, Any]:
    """Dataset columns other than the ground truth; tensors stay home (graders get plain data only)."""
    return {k: v for k, v in row.items() if k != GROUND_TRUTH_KEY and type(v).__module__.split(".")[0] != "torch"}


def assemble(specs: list[RewardSpec], outcomes: list[Outcome], batch: int, on_error: float) -> GradeResult:
    """GradeResult from per-call outcomes ordered sample-major (sample 0: every function, sample 1: ...)."""
    import torch  # here, not at the top: grader processes import this package and must stay torch-free

    scores: dict[str, list[float]] = {spec.name: [] for spec in specs}
    extras: dict[str, list[float]] = {}
    errors: Counter[str] = Counter()
    for position, outcome in enumerate(outcomes):
        sample, spec = divmod(position, len(specs))
        name = specs[spec].name
        if outcome.kind not in ("ok", SKIPPED):
            errors[outcome.kind] += 1
            if errors[outcome.kind] == 1:
                logger.warning("reward %s failed (%s) on sample %d: %s", name, outcome.kind, sample, outcome.message)
        values = outcome.values if outcome.kind == "ok" else {}
        scores[name].append(values.get("score", on_error))
        for metric, value in values.items():
            if metric != "score":
                extras.setdefault(f"{name}/{metric}", [0.0] * batch)[sample] = value
    parts = {name: torch.tensor(values, dtype=torch.float32) for name, values in scores.items()}
    parts.update({key: torch.tensor(values, dtype=torch.float32) for key, values in extras.items()})
    rewards = torch.zeros(batch, dtype=torch.float32)
    for spec in specs:
        rewards += spec.weight * parts[spec.name]
    metrics = {f"reward/{key}{'/mean' if key in scores else ''}": _mean(part) for key, part in parts.items()}
    metrics.update({f"reward/errors/{kind}": float(errors[kind]) for kind in ERROR_KINDS})
    metrics["perf/grading_call_max_s"] = max((outcome.elapsed_s for outcome in outcomes), default=0.0)
    return GradeResult(rewards=rewards, parts=parts, metrics=metrics)


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else 0.0
