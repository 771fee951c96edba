"""The asynchronous rollout pipeline (``trainer.max_staleness = k >= 1``; docs/async.md).

A rollout thread draws the generation batches of steps ``s+1, s+2, ...`` from the prompt stream while the
learner (the caller's thread) trains, and hands them over through a queue. The bound is kept at the source:
the batch of step j starts only once the learner has published policy version ``j - 1 - k`` (it is trained at
version ``j - 1``), and before each batch (and between chunks of a partial rollout) the rollout workers load the
newest published version. So every trained token is at most k versions old; ``staleness_filter`` checks it
again on the learner's side and drops what is older, counted, never trained on.

Only the rollout thread talks to the rollout and reward workers, only the caller's thread to the learner;
``paused()`` parks the rollout thread between batches for what needs the rollout workers at a known version
(evaluation). A failure in the rollout thread is raised in the caller's thread by the next ``next_batch``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from rltrain.tracking import TOKENS_PER_VERSION
from rltrain.types import RolloutBatch

log = logging.getLogger(__name__)

STALENESS_MAX = "rollout/staleness_max"
STALENESS_MEAN = "rollout/staleness_mean"
STALE_DROPPED = "rollout/stale_dropped"


@dataclass
class Produced:
    """One step's batch from the rollout thread, with the loop state right after it was drawn."""

    step: int
    batch: RolloutBatch
    metrics: dict[str, float]
    state: dict = field(default_factory=dict)


def staleness_filter(batch: RolloutBatch, learner_version: int, max_staleness: int) -> tuple[RolloutBatch | None, dict]:
    """Keep the groups whose every row is at most ``max_staleness`` versions behind ``learner_version``.

    batch.policy_version [B] (oldest token of each row) -> (the kept rows or None, metrics): staleness max / mean
    over kept rows, dropped row count, and trained tokens per version lag. A group is kept or dropped whole,
    as its advantages compare its members.
    """
    staleness = learner_version - batch.policy_version
    stale_groups = batch.group[staleness > max_staleness].unique()
    keep = ~torch.isin(batch.group, stale_groups)
    metrics = {STALE_DROPPED: float((~keep).sum())}
    if not keep.any():
        return None, metrics
    kept = batch.select(torch.nonzero(keep).flatten()) if not keep.all() else batch
    row_lag = (learner_version - kept.policy_version).float()
    metrics[STALENESS_MAX] = float(row_lag.max())
    metrics[STALENESS_MEAN] = float(row_lag.mean())
    if kept.token_version is not None:
        token_lag = learner_version - kept.token_version[kept.response_mask > 0]
        for lag in range(max_staleness + 1):
            metrics[f"{TOKENS_PER_VERSION}/lag_{lag}"] = float((token_lag == lag).sum())
    return kept, metrics


class RolloutPipeline:
    """Produces the batches of steps ``start_step + 1 .. last_step`` ahead of the learner, at most k versions old.

    ``produce(step)`` makes one step's batch (the trainer's ``collect``) and returns it with the loop state after
    it; ``load_latest()`` loads the newest published weights into the rollout workers (returns sync metrics).
    """

    def __init__(
        self,
        produce: Callable[[int], tuple[RolloutBatch, dict[str, float], dict]],
        load_latest: Callable[[], dict[str, float]],
        *,
        start_step: int,
        last_step: int,
        max_staleness: int,
    ):
        self._produce, self._load_latest = produce, load_latest
        self.max_staleness = max_staleness
        self.last_step = last_step
        self._published = start_step  # the learner's newest published version
        self._queue: queue.Queue[Produced | BaseException] = queue.Queue()
        self._cond = threading.Condition()
        self._pause_requests = 0
        self._parked = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, args=(start_step + 1,), name="rltrain-rollout", daemon=True)
        self._thread.start()

    # ---- the caller's (learner's) side ----------------------------------------------------------
    def next_batch(self, step: int) -> Produced:
        """The batch of ``step``; ``perf/buffer_wait_s`` is how long the learner waited for it."""
        start = time.time()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.step != step:
            raise RuntimeError(f"rollout pipeline: got the batch of step {item.step}, expected step {step}")
        item.metrics["perf/buffer_wait_s"] = time.time() - start
        return item

    def published(self, version: int) -> None:
        """The learner has published ``version``: the batches it unblocks may start."""
        with self._cond:
            self._published = version
            self._cond.notify_all()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Park the rollout thread between batches (it finishes the batch it is on) for the duration."""
        with self._cond:
            self._pause_requests += 1
            self._cond.notify_all()
            while not self._parked and self._thread.is_alive():
                self._cond.wait(timeout=1.0)
        try:
            yield
        finally:
            with self._cond:
                self._pause_requests -= 1
                self._cond.notify_all()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop after the batch in progress, waiting up to ``timeout_s`` for it (the thread is a daemon: a hung
        call cannot hold the process)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)

    # ---- the rollout thread ---------------------------------------------------------------------
    def _wait_turn(self, step: int) -> float | None:
        """Block until ``step``'s batch may start (its version bound is met, not paused); seconds waited, or
        None when stopping."""
        needed = step - 1 - self.max_staleness
        start = time.time()
        with self._cond:
            while not self._stopping and (self._published < needed or self._pause_requests):
                self._parked = True
                self._cond.notify_all()
                self._cond.wait()
            self._parked = False
            return None if self._stopping else time.time() - start

    def _run(self, first_step: int) -> None:
        try:
            for step in range(first_step, self.last_step + 1):
                idle_s = self._wait_turn(step)
                if idle_s is None:
                    return
                sync_metrics = self._load_latest()
                batch, metrics, state = self._produce(step)
                metrics = {**metrics, **sync_metrics, "perf/rollout_idle_s": idle_s}
                self._queue.put(Produced(step, batch, metrics, state))
        except BaseException as err:  # noqa: BLE001 - handed to the learner's thread, which raises it
            if not self._stopping:
                self._queue.put(err)
        finally:
            with self._cond:
                self._parked = True
                self._cond.notify_all()
