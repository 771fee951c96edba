"""Weight sync as its own object: learner → rollout workers, versioned.

Two ways to move the weights (``rollout.weight_sync``): one object ref of the learner's export that every
rollout worker fetches from the Ray object store (the driver never copies them), or a bucketed broadcast from
the learner's exporting rank in a torch.distributed group (rltrain/dist/weight_sync.py).

Two ways to use it: ``sync(version)`` loads the learner's current weights into every worker and waits (the
synchronous loop, resume, evaluation); with the asynchronous pipeline (rltrain/pipeline.py) the learner thread
``publish``es each new version (an export ref, taken right after the optimizer step: actor calls from one
caller run in order) and the rollout thread ``load_latest`` loads the newest published one between generation
batches, so neither waits for the other.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from omegaconf import DictConfig

from rltrain.dist.groups import RolloutGroup, get_named, naming_dead_actors
from rltrain.learner.base import LearnerGroup

log = logging.getLogger(__name__)


def resolve_weight_sync(mode: str, cluster_gpus: float, placement: str, tensor_parallel_size: int) -> str:
    """``rollout.weight_sync`` -> object_store | collective. ``auto`` broadcasts between GPUs of a disaggregated
    placement with one GPU per engine; elsewhere it keeps the object store, which needs no extra group."""
    if mode != "auto":
        return mode
    use_collective = cluster_gpus > 0 and placement == "disaggregated" and tensor_parallel_size == 1
    return "collective" if use_collective else "object_store"


class WeightSync:
    """Moves the learner group's weights to the rollout group, tagged with a policy version."""

    def __init__(self, learner: LearnerGroup, rollout: RolloutGroup, rollout_cfg: DictConfig, mode: str):
        self.learner, self.rollout, self.cfg, self.mode = learner, rollout, rollout_cfg, mode
        self.fallbacks = 0
        self._group_replacements: int | None = None  # rollout.replacements when the group was opened
        self._published: tuple[Any, int] | None = None  # (export ref, version): the newest published weights
        self._loaded_version: int | None = None
        self._lock = threading.Lock()

    # ---- synchronous --------------------------------------------------------------------------
    def sync(self, version: int) -> dict[str, float]:
        """The learner's current weights → every rollout worker as ``version``; every worker must report it back.

        A collective sync that fails (a worker died mid-broadcast, a timeout) is counted in
        ``rollout/weight_sync_fallbacks``, logged, and redone through the object store, which also replaces
        dead workers; the sync group is rebuilt before the next sync. A dead learner is a RunError naming it.
        """
        start = time.time()
        metrics: dict[str, float] = {}
        versions = None
        if self.mode == "collective":
            try:
                versions, sent = self._broadcast(version)
                metrics["perf/weight_sync_mb"] = sent.get("bytes", 0) / 2**20
            except Exception as exc:  # noqa: BLE001 - any failure of the group falls back; the cause is logged
                self.fallbacks += 1
                log.warning("collective weight sync of version %d failed (%s); using the object store", version, exc)
                self.close_group()
            metrics["rollout/weight_sync_fallbacks"] = self.fallbacks
        if versions is None:
            versions = self._load(self.learner.export_weights_ref(), version)
        self._check(versions, version)
        with self._lock:
            self._loaded_version = version
        metrics["perf/weight_sync_s"] = time.time() - start
        return metrics

    # ---- asynchronous -------------------------------------------------------------------------
    def publish(self, version: int) -> None:
        """Make the learner's current weights available as ``version`` (learner thread; returns at once)."""
        ref = self.learner.export_weights_ref()
        with self._lock:
            self._published = (ref, version)

    def load_latest(self) -> dict[str, float]:
        """Load the newest published version into every worker if it is newer than theirs (rollout thread)."""
        with self._lock:
            published, loaded = self._published, self._loaded_version
        if published is None or (loaded is not None and published[1] <= loaded):
            return {}
        start = time.time()
        ref, version = published
        self._check(self._load(ref, version), version)
        with self._lock:
            self._loaded_version = version
        return {"perf/weight_sync_s": time.time() - start}

    @property
    def loaded_version(self) -> int | None:
        """The version every rollout worker holds (None before the first sync)."""
        with self._lock:
            return self._loaded_version

    # ---- internals ----------------------------------------------------------------------------
    def _load(self, weights_ref: Any, version: int) -> list[int]:
        # The rollout workers resolve the learner's export themselves: its death reaches us through them.
        with naming_dead_actors(self.learner.labels, "weight sync"):
            return self.rollout.load_weights(weights_ref, version)

    @staticmethod
    def _check(versions: list[int], version: int) -> None:
        if any(v != version for v in versions):
            raise RuntimeError(f"weight sync: rollout workers report versions {versions}, expected {version}")

    def _broadcast(self, version: int) -> tuple[list[int], dict[str, int]]:
        """One collective sync (opening the group first if needed); returns worker versions and the sender's stats."""
        if self._group_replacements != self.rollout.replacements:
            self._open_group()
        sender = self.learner.broadcast_weights_refs(self.cfg.weight_sync_bucket_mb)
        receivers = self.rollout.receive_weights_refs(version)
        results = get_named(sender + receivers, self.learner.labels, "weight sync")
        # A worker replaced later (mid-generate) fetches these weights from the learner on demand.
        self.rollout.remember_weights(self.learner.export_weights_ref, version)
        return results[len(sender) :], results[0]

    def _open_group(self) -> None:
        """(Re)build the group: the learner's sender is rank 0, rollout worker i is rank 1 + i."""
        self.close_group()
        sender = self.learner.sync_sender()
        timeout = self.cfg.weight_sync_timeout_s
        what = "weight-sync group set-up"
        address = get_named([sender.weight_sync_address.remote()], self.learner.labels, what, timeout_s=timeout)[0]
        backend = "nccl" if self.learner.use_gpu else "gloo"
        world_size = 1 + len(self.rollout.workers)
        refs = [sender.open_weight_sync.remote(address, world_size, backend, timeout)]
        refs += self.rollout.open_weight_sync_refs(address, backend, timeout)
        # Each member's store and group creation fail after ``timeout``; the margin covers queueing behind them.
        get_named(refs, self.learner.labels, what, timeout_s=2 * timeout + 30)
        self._group_replacements = self.rollout.replacements
        log.info("weight-sync group open: %d ranks over %s at %s:%d", world_size, backend, *address)

    def close_group(self) -> None:
        import ray

        if self._group_replacements is None:
            return
        self._group_replacements = None
        self.rollout.close_weight_sync()
        try:
            ray.get(self.learner.sync_sender().close_weight_sync.remote(), timeout=30)
        except ray.exceptions.RayError as exc:
            log.info("closing the learner's end of the weight-sync group: %s", exc)
