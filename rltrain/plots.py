"""PNG plots of a run's ``metrics.jsonl``: reward, accuracy and response length against step.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend switch), so it
works headless and inside any process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rltrain.fsutil import atomic_write, storage_errors

logger = logging.getLogger(__name__)

SMOOTH_MIN_POINTS = 10  # noisy per-step curves get a moving-average overlay once they are this long


@dataclass(frozen=True)
class Curve:
    key: str  # metrics.jsonl key
    label: str
    style: str = "line"  # line | points (sparse values such as periodic eval)


@dataclass(frozen=True)
class PlotSpec:
    filename: str
    title: str
    ylabel: str
    curves: tuple[Curve, ...]
    unit_interval: bool = False  # fix the y axis to [0, 1]


PLOTS = (
    PlotSpec("reward.png", "Reward", "mean reward", (Curve("reward/mean", "train reward"),)),
    PlotSpec(
        "accuracy.png",
        "Accuracy",
        "accuracy",
        (Curve("reward/accuracy", "train accuracy"), Curve("eval/accuracy", "eval accuracy (held out)", "points")),
        unit_interval=True,
    ),
    PlotSpec(
        "response_length.png",
        "Response length",
        "tokens",
        (
            Curve("rollout/response_len_mean", "mean"),
            Curve("rollout/response_len_max", "max"),
        ),
    ),
)


def series_by_key(records: Iterable[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Per metric key, the (steps, values) it was logged at, sorted by step; nulls (non-finite) are left out.

    Several lines for one step (e.g. train and eval logged separately) merge; a later line wins on a clash.
    """
    by_step: dict[int, dict[str, float]] = {}
    for record in records:
        merged = by_step.setdefault(int(record["step"]), {})
        merged.update({key: value for key, value in record.items() if key != "step" and value is not None})
    series: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    return series


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values: output[i] = mean(values[max(0, i-window+1) : i+1])."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_plots(records: Iterable[Mapping[str, Any]], out_dir: str) -> list[str]:
    """Write one PNG per plot in ``PLOTS`` that has data into ``out_dir``; return the written paths."""
    series = series_by_key(records)
    paths = []
    for spec in PLOTS:
        curves = [curve for curve in spec.curves if curve.key in series]
        if not curves:
            logger.info("no %s plot: none of %s was logged", spec.title.lower(), [c.key for c in spec.curves])
            continue
        path = os.path.join(out_dir, spec.filename)
        _draw(spec, curves, series, path)
        paths.append(path)
    return paths


def _draw(spec: PlotSpec, curves: list[Curve], series: dict[str, tuple[list[int], list[float]]], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for curve in curves:
        steps, values = series[curve.key]
        if curve.style == "points":
            axes.plot(steps, values, "o--", label=curve.label)
        elif len(values) >= SMOOTH_MIN_POINTS:
            window = max(2, len(values) // 10)
            (raw,) = axes.plot(steps, values, alpha=0.35, label=f"{curve.label} (per step)")
            axes.plot(
                steps, moving_average(values, window), color=raw.get_color(), label=f"{curve.label} (avg {window})"
            )
        else:
            axes.plot(steps, values, ".-", label=curve.label)
    if spec.unit_interval:
        axes.set_ylim(-0.02, 1.02)
    axes.set_title(spec.title)
    axes.set_xlabel("step")
    axes.set_ylabel(spec.ylabel)
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    with storage_errors("write plot", path):  # atomic: a killed run never leaves a truncated PNG
        atomic_write(path, lambda file: figure.savefig(file, format="png"))
