"""Run tracking: ``config.yaml``, ``metrics.jsonl``, a rich progress bar, W&B, and PNG plots at the end.

The run directory is the durable record (docs/architecture.md). ``metrics.jsonl`` holds one JSON object per ``log``
call, every line with ``step``; each line is written in one ``write`` and fsynced, so a crash can at worst leave
one unterminated last line, which readers skip and the next ``Tracker`` drops. W&B is a mirror of the same
metrics: it is optional, and any failure in it is warned about once and then ignored, never raised.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import sys
import uuid
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlparse

import yaml

from rltrain.fsutil import atomic_write_text, storage_errors
from rltrain.progress_log import PROGRESS_KEYS, PlainProgress, is_terminal

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
WANDB_ID_FILE = ".wandb_run_id"  # keeps a resumed run on the same W&B run

WANDB_MODES = ("auto", "online", "offline", "disabled")
# The run summary's table of the latest eval metrics, one row per eval/<set>/<metric> key.
EVAL_TABLE_KEY = "eval/table"
EVAL_TABLE_COLUMNS = ("set", "metric", "value")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Parse a ``metrics.jsonl``; an unterminated or unparsable line is skipped (a run being written, or killed)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            record = _parse_record(line)
            if record is not None:
                records.append(record)
    return records


def _parse_record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def to_finite_record(step: int, metrics: Mapping[str, Any]) -> tuple[dict[str, float | int | None], list[str]]:
    """Build the JSON line for one step: numbers as floats, non-finite values as ``None``.

    Returns the record (``step`` first) and the keys whose value was NaN or infinite. Raises ``TypeError`` /
    ``ValueError`` naming the key for a non-numeric value, a non-string key, or a key called ``step``.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    record: dict[str, float | int | None] = {"step": step}
    non_finite = []
    for key, value in metrics.items():
        if not isinstance(key, str) or key == "step":
            raise ValueError(f"metric key {key!r} is not allowed (keys are strings other than 'step')")
        try:
            number = float(value)
        except (TypeError, ValueError) as err:
            raise TypeError(f"metric {key!r} has non-numeric value {value!r}") from err
        if math.isfinite(number):
            record[key] = number
        else:
            record[key] = None
            non_finite.append(key)
    return record, non_finite


def truncate_metrics(path: str, last_step: int) -> int:
    """Keep only the complete, parsable lines with ``step <= last_step``; rewrite atomically if anything goes.

    Returns the number of lines dropped (later steps of a resumed run, a half-written last line).
    """
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        record = _parse_record(line) if line.endswith("\n") else None
        if record is not None and record["step"] <= last_step:
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


def resolve_wandb_mode(mode: str) -> str:
    """Turn ``auto`` into ``online`` (API key in the environment or a W&B netrc login) or ``offline``.

    ``WANDB_MODE`` in the environment, when set, wins over ``auto`` (W&B's own convention).
    """
    if mode not in WANDB_MODES:
        raise ValueError(f"tracking.wandb.mode={mode!r} is not one of {WANDB_MODES}")
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") or _wandb_netrc_login() else "offline"


def _wandb_netrc_login() -> bool:
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _plain_config(config: Any) -> Any:
    """A YAML-safe copy of the config: mappings and lists of plain values; OmegaConf nodes resolved."""
    if hasattr(config, "_metadata") and hasattr(config, "_get_node"):  # an OmegaConf container
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return {str(key): _plain_config(value) for key, value in config.items()}
    if isinstance(config, list | tuple):
        return [_plain_config(value) for value in config]
    if config is None or isinstance(config, str | bool | int | float):
        return config
    return str(config)


TOKENS_PER_VERSION = "rollout/tokens_per_version"  # the asynchronous pipeline's "/lag_<d>" token counts


def lag_histogram(metrics: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
    """(counts, bin edges) of ``rollout/tokens_per_version/lag_<d>``: trained tokens per version lag d, one unit-wide
    bin per lag (docs/async.md); None when the step logged none."""
    prefix = f"{TOKENS_PER_VERSION}/lag_"
    lags = {int(key[len(prefix) :]): float(value) for key, value in metrics.items() if key.startswith(prefix)}
    if not lags:
        return None
    top = max(lags)
    return [lags.get(d, 0.0) for d in range(top + 1)], [d - 0.5 for d in range(top + 2)]


def eval_table_rows(metrics: Mapping[str, Any]) -> list[list[Any]]:
    """``[set, metric, value]`` of every ``eval/<set>/<metric>`` key in ``metrics``, in their order; the set-less
    ``eval/accuracy``-style keys and missing (None) values are left out."""
    rows = []
    for key, value in metrics.items():
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == "eval" and value is not None:
            rows.append([parts[1], parts[2], float(value)])
    return rows


def _wandb_init(options: Mapping[str, Any], mode: str, run_id: str, run_name: str, run_dir: str, config: Any):
    import wandb

    return wandb.init(
        project=options.get("project") or "rltrain",
        entity=options.get("entity"),
        tags=list(options.get("tags") or []),
        name=run_name,
        id=run_id,
        resume="allow",
        mode=mode,
        dir=os.environ.get("WANDB_DIR") or run_dir,
        config=config,
    )


def _write_eval_table(run: Any, metrics: Mapping[str, Any]) -> None:
    """Put ``eval_table_rows(metrics)`` into the W&B run's summary as a ``wandb.Table`` (nothing when empty)."""
    rows = eval_table_rows(metrics)
    if rows:
        import wandb

        run.summary[EVAL_TABLE_KEY] = wandb.Table(columns=list(EVAL_TABLE_COLUMNS), data=rows)


def log_eval_to_wandb(
    options: Mapping[str, Any], run_dir: str, run_name: str, config: Any, metrics: Mapping[str, float]
) -> bool:
    """One W&B run for one evaluation (``rltrain-eval`` with ``eval.wandb``): ``metrics`` (``eval/<set>/<metric>``)
    logged at step 0 and their summary table. ``options`` is ``tracking.wandb``. As in training, W&B is a mirror:
    a failure is warned about and never raised. Returns whether the run was written."""
    mode = resolve_wandb_mode(options.get("mode", "auto"))
    if not options.get("enabled", True) or mode == "disabled":
        return False
    try:
        run = _wandb_init(options, mode, uuid.uuid4().hex[:12], run_name, run_dir, _plain_config(config))
        try:
            run.log({key: float(value) for key, value in metrics.items()}, step=0)
            _write_eval_table(run, metrics)
        finally:
            run.finish()
    except Exception as err:  # W&B must never fail an evaluation: eval.json is the record
        logger.warning("W&B logging of the evaluation failed (%s: %s)", type(err).__name__, err)
        return False
    return True


class Tracker:
    """Writes one run's tracking outputs; the trainer's only handle on metrics, progress and W&B.

    ``start_step > 0`` resumes: ``metrics.jsonl`` lines after ``start_step`` are dropped, so the resumed run
    appends without duplicates. ``start_step == 0`` starts a fresh ``metrics.jsonl``.
    ``wandb`` is ``{enabled, mode, project, entity, tags}`` (``tracking.wandb`` of the config); ``None`` or
    ``enabled: false`` turns W&B off.
    """

    def __init__(
        self,
        run_dir: str,
        config: Mapping[str, Any],
        *,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        wandb: Mapping[str, Any] | None = None,
        run_name: str = "run",
        log_every_s: float = 30.0,
    ) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.total_steps = total_steps
        self.start_step = start_step
        self.run_name = run_name
        self.metrics_path = os.path.join(self.run_dir, METRICS_FILE)
        self.config_path = os.path.join(self.run_dir, CONFIG_FILE)
        self.non_finite_counts: dict[str, int] = {}
        self._latest: dict[str, float] = {}
        self._finished = False
        self._wandb_run = None
        self._wandb_failed = False

        self._config = _plain_config(config)
        with storage_errors("write", self.config_path):
            os.makedirs(self.run_dir, exist_ok=True)
            atomic_write_text(self.config_path, yaml.safe_dump(self._config, sort_keys=False))
        with storage_errors("open", self.metrics_path):
            self._open_metrics()
        if wandb is not None and wandb.get("enabled", True):
            self._init_wandb(wandb)  # before the progress bar, so W&B's start-up messages print above it
        # A terminal gets the live bar; a log file (Slurm, CI) a plain line per step every log_every_s seconds.
        live = progress and is_terminal(sys.stdout)
        self._progress, self._task = self._start_progress() if live else (None, None)
        self._plain = PlainProgress(run_name, total_steps, start_step, log_every_s) if progress and not live else None

    @property
    def wandb_active(self) -> bool:
        return self._wandb_run is not None

    def _open_metrics(self) -> None:
        if self.start_step > 0:
            dropped = truncate_metrics(self.metrics_path, self.start_step)
            if dropped:
                logger.info("resume at step %d: dropped %d later or partial metrics lines", self.start_step, dropped)
            mode = "a"
        else:
            if os.path.exists(self.metrics_path) and os.path.getsize(self.metrics_path) > 0:
                logger.warning("fresh run (start_step=0): replacing the existing %s", self.metrics_path)
            mode = "w"
        self._metrics_file = open(self.metrics_path, mode, encoding="utf-8")  # open for the run; closed in finish()

    def _start_progress(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
        )
        progress.start()
        task = progress.add_task(self.run_name, total=self.total_steps, completed=self.start_step, stats="")
        return progress, task

    def _init_wandb(self, options: Mapping[str, Any]) -> None:
        mode = resolve_wandb_mode(options.get("mode", "auto"))
        if mode == "disabled":
            return
        try:
            run_id = self._wandb_run_id()
            self._wandb_run = _wandb_init(options, mode, run_id, self.run_name, self.run_dir, self._config)
        except Exception as err:  # W&B must never take the run down: metrics.jsonl is the record
            self._wandb_failed = True
            logger.warning("W&B init failed (%s: %s); continuing with metrics.jsonl only", type(err).__name__, err)

    def _wandb_run_id(self) -> str:
        """The W&B run id of this run dir, created on first use, reused on resume."""
        path = os.path.join(self.run_dir, WANDB_ID_FILE)
        if self.start_step > 0 and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                run_id = f.read().strip()
            if run_id:
                return run_id
        run_id = uuid.uuid4().hex[:12]
        with storage_errors("write", path):
            atomic_write_text(path, run_id + "\n")
        return run_id

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one line to ``metrics.jsonl`` (durable on return), mirror to W&B, refresh the progress bar."""
        if self._finished:
            raise RuntimeError("Tracker.log called after finish()")
        record, non_finite = to_finite_record(step, metrics)
        with storage_errors("write metrics to", self.metrics_path):
            self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
            self._metrics_file.flush()
            os.fsync(self._metrics_file.fileno())
        self._report_non_finite(step, non_finite)
        self._log_wandb(step, metrics)
        self._latest.update({key: value for key, value in record.items() if key != "step" and value is not None})
        if self._progress is not None:
            self._progress.update(self._task, completed=min(step, self.total_steps), stats=self._progress_stats())
        if self._plain is not None:
            self._plain.update(step, self._latest)

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log evaluation metrics (keys ``eval/...``) at ``step``; same as ``log``."""
        self.log(step, metrics)

    def _report_non_finite(self, step: int, keys: list[str]) -> None:
        for key in keys:
            if key not in self.non_finite_counts:
                logger.warning("step %d: metric %r is not finite (written as null; further ones counted)", step, key)
            self.non_finite_counts[key] = self.non_finite_counts.get(key, 0) + 1

    def _log_wandb(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._wandb_run is None:
            return
        try:
            record: dict[str, Any] = {key: float(value) for key, value in metrics.items()}
            histogram = lag_histogram(metrics)
            if histogram is not None:
                import wandb

                record[TOKENS_PER_VERSION] = wandb.Histogram(np_histogram=histogram)
            self._wandb_run.log(record, step=step)
        except Exception as err:
            logger.warning("W&B log failed (%s: %s); W&B turned off for this run", type(err).__name__, err)
            self._wandb_failed = True
            self._close_wandb(exit_code=1)

    def _progress_stats(self) -> str:
        parts = [f"{label} {self._latest[key]:.3g}" for key, label in PROGRESS_KEYS.items() if key in self._latest]
        return "  ".join(parts)

    def echo(self, message: str) -> None:
        """Print a line above the progress bar (or plainly when there is none)."""
        if self._progress is not None:
            self._progress.console.print(message, highlight=False)
        else:
            print(message, flush=True)

    def print_summary(self, lines: Iterable[str]) -> None:
        """Print an end-of-run summary block (e.g. accuracy before / after) and where the run dir is."""
        for line in [*lines, f"run dir: {self.run_dir}"]:
            self.echo(line)

    def finish(self, plots: bool = True, *, exit_code: int = 0) -> list[str]:
        """Close the metrics file, progress bar and W&B; write PNG plots into the run dir and return their paths.

        Idempotent: a second call does nothing and returns ``[]``.
        """
        if self._finished:
            return []
        self._finished = True
        self._metrics_file.close()
        if self._progress is not None:
            self._progress.stop()
        self._close_wandb(exit_code=exit_code)
        if self.non_finite_counts:
            logger.warning("non-finite metrics (logged as null), count per key: %s", self.non_finite_counts)
        if not plots:
            return []
        from rltrain.plots import write_plots

        return write_plots(read_metrics(self.metrics_path), self.run_dir)

    def _close_wandb(self, exit_code: int) -> None:
        """Finish the W&B run, with the latest eval metrics of each set as its summary table."""
        run, self._wandb_run = self._wandb_run, None
        if run is None:
            return
        try:
            _write_eval_table(run, self._latest)
        except Exception as err:
            logger.warning("W&B eval summary table failed (%s: %s)", type(err).__name__, err)
        try:
            run.finish(exit_code=exit_code)
        except Exception as err:
            logger.warning("W&B finish failed (%s: %s)", type(err).__name__, err)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(plots=exc_type is None, exit_code=0 if exc_type is None else 1)
