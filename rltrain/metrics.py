"""Metrics that say how they combine: every value carries its reduction, and one reducer applies them.

A training step can produce the same key more than once: once per generation batch (dynamic sampling) and
once per optimizer step (epochs x mini-batches). The producer of a value knows what it is, so it declares
the reduction (docs/tracking.md):

- ``mean``: a per-step average (losses, gradient norms): the mean over the records holding the key;
- ``sum``: a counter or a time (tokens, errors, restarts, seconds): the total;
- ``max``: a maximum (slowest grading call): the largest value;
- ``last``: a state (learning rate): the value of the last record holding the key.

Producers that return plain floats (the grader, the learner) are tagged where their values enter the
trainer, with ``tagged(values, default, overrides)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MEAN, SUM, MAX, LAST = "mean", "sum", "max", "last"
REDUCTIONS = (MEAN, SUM, MAX, LAST)


@dataclass(frozen=True)
class Metric:
    """One value and how it combines with the same key's other values in a step."""

    value: float
    reduce: str = MEAN

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"metric reduction {self.reduce!r} is not one of {list(REDUCTIONS)}")


def tagged(values: Mapping[str, float], default: str = MEAN, overrides: Mapping[str, str] | None = None) -> dict:
    """Plain ``{key: float}`` -> ``{key: Metric}``: each key's reduction is ``overrides[key]``, else that of the
    longest override that is a prefix of the key ending in "/", else ``default``."""
    overrides = dict(overrides or {})
    prefixes = sorted((k for k in overrides if k.endswith("/")), key=len, reverse=True)

    def reduction(key: str) -> str:
        if key in overrides:
            return overrides[key]
        return next((overrides[p] for p in prefixes if key.startswith(p)), default)

    return {key: Metric(float(value), reduction(key)) for key, value in values.items()}


def reduce_metrics(records: Iterable[Mapping[str, Metric]]) -> dict[str, float]:
    """Combine the records of one step key by key, each by its declared reduction.

    Raises ValueError when one key arrives with two different reductions (two producers disagree).
    """
    collected: dict[str, list[float]] = {}
    reductions: dict[str, str] = {}
    for record in records:
        for key, metric in record.items():
            if reductions.setdefault(key, metric.reduce) != metric.reduce:
                raise ValueError(f"metric {key!r} declared as both {reductions[key]!r} and {metric.reduce!r}")
            collected.setdefault(key, []).append(metric.value)
    combine = {MEAN: lambda v: sum(v) / len(v), SUM: sum, MAX: max, LAST: lambda v: v[-1]}
    return {key: float(combine[reductions[key]](values)) for key, values in collected.items()}
