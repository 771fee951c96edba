"""Reduction-tagged metrics: each key combines by the reduction its producer declared."""

from __future__ import annotations

import pytest

from rltrain.metrics import LAST, MAX, MEAN, SUM, Metric, reduce_metrics, tagged


def test_each_key_combines_by_its_declared_reduction():
    records = [
        {"loss": Metric(1.0, MEAN), "tokens": Metric(10, SUM), "slowest": Metric(0.5, MAX), "lr": Metric(3e-4, LAST)},
        {"loss": Metric(3.0, MEAN), "tokens": Metric(5, SUM), "slowest": Metric(0.2, MAX), "lr": Metric(1e-4, LAST)},
        {"tokens": Metric(1, SUM)},
    ]
    assert reduce_metrics(records) == {"loss": 2.0, "tokens": 16.0, "slowest": 0.5, "lr": 1e-4}
    assert reduce_metrics([]) == {}


def test_tagged_applies_exact_then_longest_prefix_overrides():
    out = tagged(
        {"perf/a_s": 1, "perf/call_max_s": 2, "reward/errors/timeout": 3, "reward/x/mean": 4},
        MEAN,
        {"perf/": SUM, "perf/call_max_s": MAX, "reward/": LAST, "reward/errors/": SUM},
    )
    assert {k: m.reduce for k, m in out.items()} == {
        "perf/a_s": SUM,
        "perf/call_max_s": MAX,
        "reward/errors/timeout": SUM,
        "reward/x/mean": LAST,
    }
    assert tagged({"loss": 1})["loss"] == Metric(1.0, MEAN)


def test_conflicting_or_unknown_reductions_raise():
    with pytest.raises(ValueError, match="'n' declared as both 'sum' and 'max'"):
        reduce_metrics([{"n": Metric(1, SUM)}, {"n": Metric(2, MAX)}])
    with pytest.raises(ValueError, match="median"):
        Metric(1.0, "median")
