"""Progress for logs that are files, not terminals: one plain line per logged step, at most every few seconds.

A rich progress bar redraws one terminal line; written to a Slurm job's log (stdout not a TTY) it shows nothing
until the run ends. ``PlainProgress`` prints instead, without ANSI codes::

    quickstart step 3/5 (60%)  reward 0.25  acc 0.125  step 1.21s  elapsed 0:00:12  ETA 0:00:08

at most one line per ``every_s`` seconds (``tracking.log_every_s``), and always the last step.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

# Logged keys shown on each line and next to the live bar (rltrain.tracking) when present, in this order.
PROGRESS_KEYS = {
    "reward/mean": "reward",
    "reward/accuracy": "acc",
    "eval/accuracy": "eval acc",
    "rollout/response_len_mean": "len",
}
STEP_TIME_KEY = "perf/step_time_s"


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (a live progress bar can redraw it)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def plain_ray_logs(stream: TextIO | None = None) -> None:
    """Ray prefixes its actors' log lines with ANSI colours; a log that is a file (``stream``, default stdout) gets
    them without (``RAY_COLOR_PREFIX=0``), unless the user set it. Call before ``ray.init``."""
    if not is_terminal(stream or sys.stdout):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def progress_line(
    name: str, step: int, total: int, latest: Mapping[str, float], elapsed_s: float, steps_done: int
) -> str:
    """One step's line: position, the PROGRESS_KEYS present in ``latest``, the step's time, elapsed and ETA.

    The ETA is the mean wall time of the ``steps_done`` steps this process ran, times the steps left.
    """
    parts = [f"{name} step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
    parts += [f"{label} {latest[key]:.4g}" for key, label in PROGRESS_KEYS.items() if key in latest]
    if STEP_TIME_KEY in latest:
        parts.append(f"step {latest[STEP_TIME_KEY]:.3g}s")
    parts.append(f"elapsed {_duration(elapsed_s)}")
    if steps_done > 0:
        parts.append(f"ETA {_duration(elapsed_s / steps_done * max(total - step, 0))}")
    return "  ".join(parts)


class PlainProgress:
    """Prints ``progress_line`` for logged steps to ``stream`` (default stdout): at most one per ``every_s``
    seconds, always the last one (``step == total``). Steps at or before ``start_step`` (evaluation before
    training, a resume point) are not progress and print nothing."""

    def __init__(
        self,
        name: str,
        total_steps: int,
        start_step: int,
        every_s: float,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self.total, self.start_step, self.every_s = name, total_steps, start_step, every_s
        self.stream, self.clock = stream, clock
        self.started = clock()
        self._last_line_at: float | None = None

    def update(self, step: int, latest: Mapping[str, float]) -> str | None:
        """Print (and return) the line for ``step`` if it is due, else return None."""
        if step <= self.start_step:
            return None
        now = self.clock()
        due = self._last_line_at is None or now - self._last_line_at >= self.every_s or step >= self.total
        if not due:
            return None
        self._last_line_at = now
        line = progress_line(self.name, step, self.total, latest, now - self.started, step - self.start_step)
        print(line, file=self.stream or sys.stdout, flush=True)  # stdout as it is now (pytest replaces it)
        return line
