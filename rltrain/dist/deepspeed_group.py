"""DeepSpeedLearnerGroup: K Ray actors, one DeepSpeed ZeRO rank each, behind TorchLearnerGroup's methods.

Rendezvous is rltrain's own: rank 0's actor picks a free port on its node and every actor joins the
torch.distributed group with MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE (gloo on CPU; nccl when the
Ray cluster has a GPU for every rank). A batch is sharded across ranks by whole rows (whole prompt groups when
sharing prefixes, so that a group's prompt and tree are computed once), balanced by the tokens the ranks compute
(deterministically); every rank normalises its loss by the whole batch's counts, so one step equals the
single-process learner's step on the whole batch (see rltrain/learner/deepspeed_learner.py). The driver plans
each rank's micro-batches with the torch learner's rule (``MicroBatching``), and every rank runs as many as the
rank with the most, fillers included.

All rank methods are collective: a failure on one rank leaves the others blocked in a collective, so the
group shuts itself down and re-raises the first error instead of hanging (a dead rank as a RunError naming it,
``get_named`` in rltrain/dist/groups.py).
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rltrain.dist.actors import ZERO_COPY_RUNTIME_ENV, quiet_zero_copy_sender, receiving_read_only_tensors, use_threads
from rltrain.dist.groups import actor_labels, get_named
from rltrain.dist.placement import actor_uses_gpu, gpus_per_actor
from rltrain.dist.weight_sync import WeightSender, free_address
from rltrain.learner.base import LossFn, LossNorm
from rltrain.learner.micro_batches import MicroBatching
from rltrain.learner.packing import token_counts
from rltrain.learner.tree_packing import group_rows, shared_token_count
from rltrain.types import RolloutBatch

_GROUP_KEYS = ("zero_stage", "offload_optimizer", "offload_params", "export_bucket_mb")


def shard_rows_by_tokens(tokens: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of ``tokens`` (rows, or prompt groups) per rank, balanced by tokens: largest first onto the
    least-loaded rank.

    Deterministic (ties go to the lower index and the lower rank). Each shard lists its indices longest
    first, so that consecutive rows (one micro-batch) have similar lengths and little padding.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = sorted(range(len(tokens)), key=lambda i: (-tokens[i], i))
    shards: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for index in order:
        rank = loads.index(min(loads))
        shards[rank].append(index)
        loads[rank] += tokens[index]
    return shards


def shard_rows(batch: RolloutBatch, world_size: int, share_prefixes: bool) -> list[list[int]]:
    """Row indices of ``batch`` per rank, balanced by the tokens each rank computes (``shard_rows_by_tokens``).

    Rows are the units (their packed length, ``token_counts``); when sharing prefixes whole prompt groups are,
    weighed by their prefix-shared size, so no group is split over ranks and computed twice.
    """
    if not share_prefixes:
        return shard_rows_by_tokens(token_counts(batch), world_size)
    members = group_rows(batch)
    sizes = [shared_token_count(batch.select(rows)) for rows in members]
    return [[row for g in shard for row in members[g]] for shard in shard_rows_by_tokens(sizes, world_size)]


def micro_batch_count(micro_rows: Sequence[Sequence[Sequence[int]]]) -> int:
    """Micro-batches every rank runs: the most any rank's plan has (at least one)."""
    return max(1, max(len(rows) for rows in micro_rows))


def filler_row(batch: RolloutBatch) -> RolloutBatch:
    """What a rank with fewer micro-batches forwards to keep collectives in step: the shortest row, cut to its
    first response token, so that every forward (padded, packed, shared) computes one prediction. Its loss is
    multiplied by 0."""
    tokens = token_counts(batch)
    row = batch.select([min(range(len(tokens)), key=lambda i: (tokens[i], i))])
    first_only = torch.zeros_like(row.response_mask)
    first_only[:, 0] = 1
    return row.replace(response_mask=first_only)


@dataclass(frozen=True)
class StepPlan:
    """One batch on the ranks: ``shards[rank]`` (row indices of the batch), ``micro_rows[rank]`` (shard row indices
    of each micro-batch), ``num_micro`` (micro-batches every rank runs, fillers included) and the ``filler``."""

    shards: list[list[int]]
    micro_rows: list[list[list[int]]]
    num_micro: int
    filler: RolloutBatch


def plan_step(batch: RolloutBatch, world_size: int, batching: MicroBatching) -> StepPlan:
    """Shard ``batch`` over ``world_size`` ranks and plan each rank's micro-batches (deterministic)."""
    if batch.batch_size == 0:
        raise ValueError("the DeepSpeed learner got an empty batch")
    shards = shard_rows(batch, world_size, batching.share_prefixes)
    micro_rows = [batching.rows(batch.select(shard)) if shard else [] for shard in shards]
    return StepPlan(shards, micro_rows, micro_batch_count(micro_rows), filler_row(batch))


class DeepSpeedRankWorker(WeightSender):
    """One learner rank (a plain class: ``ray.remote`` is applied by the group); rank 0 sends collective syncs."""

    def __init__(self, threads: int):
        # One actor per core on small machines: oversubscribed BLAS threads make a 2-core box 30x slower.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        # Zero-copy serialisation is safe here: every tensor this actor returns is a fresh, detached, contiguous copy.
        quiet_zero_copy_sender()
        # DeepSpeed still calls torch.distributed collectives that torch has renamed; nothing for users to act on.
        warnings.filterwarnings("ignore", message="`torch.distributed.[a-z_]+` is deprecated", category=FutureWarning)
        self.learner = None

    def rendezvous_address(self) -> tuple[str, int]:
        """(this node's IP, a free port): rank 0's address for the torch.distributed rendezvous."""
        return free_address()

    def setup(
        self, model_path: str, rank: int, world_size: int, master: tuple[str, int], backend: str, options: dict
    ) -> None:
        from rltrain.learner.deepspeed_learner import DeepSpeedLearner, init_distributed

        init_distributed(rank, world_size, master[0], master[1], backend)
        self.learner = DeepSpeedLearner(model_path, rank=rank, world_size=world_size, **options)

    def logprobs(
        self,
        shard: RolloutBatch,
        reference: bool,
        micro_rows: list[list[int]],
        num_micro: int,
        filler: RolloutBatch,
        threads: int | None = None,
    ) -> torch.Tensor:
        use_threads(threads)
        return self.learner.logprobs(shard, reference, micro_rows, num_micro, filler)

    def train_step(
        self,
        shard: RolloutBatch,
        micro_rows: list[list[int]],
        loss_fn: LossFn,
        norm: LossNorm,
        num_micro: int,
        filler: RolloutBatch,
        threads: int | None = None,
    ):
        use_threads(threads)
        return self.learner.train_step(shard, micro_rows, loss_fn, norm, num_micro, filler)

    def export_weights(self, bucketed: bool, bucket_mb: int | None = None) -> list:
        """Object refs put by this rank: one ref to {name: tensor}, or one per bucket; [] on ranks other than 0.

        Tensors are put with Ray's zero-copy torch serialisation (enabled for these actors), so a put costs no
        second in-memory copy. The bucketed form holds at most one gathered bucket and its CPU copy on any rank;
        the single dict holds the whole model once on rank 0 while it is assembled.
        """
        import ray

        if bucketed:
            refs = []
            for bucket in self.learner.export_buckets(bucket_mb):
                if bucket:
                    refs.append(ray.put(bucket))
                del bucket  # free this bucket's copy before the next one is gathered
            return refs
        weights: dict[str, torch.Tensor] = {}
        for bucket in self.learner.export_buckets():
            weights.update(bucket)
        return [ray.put(weights)] if self.learner.rank == 0 else []

    def save(self, directory: str) -> None:
        self.learner.save(directory)

    def load(self, directory: str) -> None:
        self.learner.load(directory)

    def ready(self) -> bool:
        return True


class DeepSpeedLearnerGroup:
    """``learner.world_size`` DeepSpeed ranks; same methods as ``TorchLearnerGroup`` (plus bucketed export)."""

    def __init__(
        self,
        learner_cfg: Any,
        model_path: str,
        options: dict[str, Any],
        threads: int = 1,
        placements: Sequence[dict] | None = None,
    ):
        """``placements[rank]``: Ray actor options of that rank (its placement-group bundle); None: one CPU each,
        and one GPU each when the cluster has a GPU per rank. Ranks with GPUs talk over NCCL, else gloo."""
        import ray

        from rltrain.learner.deepspeed_learner import DeepSpeedLearner, deepspeed_config

        self.world_size = int(learner_cfg.world_size)
        rank_options = {**options, **{key: getattr(learner_cfg, key) for key in _GROUP_KEYS}}
        # Fail on unknown options or a bad combination here, before any actor starts.
        inspect.signature(DeepSpeedLearner).bind(model_path, rank=0, world_size=self.world_size, **rank_options)
        deepspeed_config(
            zero_stage=rank_options["zero_stage"],
            micro_batch_size=rank_options["micro_batch_size"],
            world_size=self.world_size,
            grad_clip=rank_options["grad_clip"],
            dtype=rank_options.get("dtype", "float32"),
            offload_optimizer=rank_options["offload_optimizer"],
            offload_params=rank_options["offload_params"],
        )
        self.zero_stage = int(rank_options["zero_stage"])
        self.batching = MicroBatching(
            int(rank_options["micro_batch_size"]),
            rank_options.get("max_tokens_per_micro_batch"),
            bool(rank_options.get("share_prefixes", False)),
        )
        self.use_reference = bool(rank_options.get("use_reference", False))
        if placements is None:
            gpus = gpus_per_actor(ray.cluster_resources().get("GPU", 0), "torch", 1, "deepspeed", self.world_size)[1]
            placements = [{"num_cpus": 1, "num_gpus": gpus}] * self.world_size
        self.use_gpu = actor_uses_gpu(placements[0])
        remote = ray.remote(
            max_restarts=0,
            # Exported CPU tensors go into the object store without an in-memory pickled copy (see export_weights).
            runtime_env=ZERO_COPY_RUNTIME_ENV,
        )(DeepSpeedRankWorker)
        self.workers = [remote.options(**placements[rank]).remote(threads) for rank in range(self.world_size)]
        self.labels = actor_labels("learner rank", self.workers)
        master = self._gather([self.workers[0].rendezvous_address.remote()], "rendezvous")[0]
        backend = "nccl" if self.use_gpu else "gloo"
        self._gather(
            [
                worker.setup.remote(model_path, rank, self.world_size, master, backend, rank_options)
                for rank, worker in enumerate(self.workers)
            ],
            "setup",
        )

    def _gather(self, refs: list, what: str) -> list:
        """ray.get that fails fast: the first rank error shuts the group down (its peers would block) and is raised,
        a dead rank as a RunError naming it."""
        # Zero-copy tensors arrive read-only; the group copies them (logprobs) and never writes into them.
        with receiving_read_only_tensors():
            return get_named(refs, self.labels, what, on_failure=self.shutdown)

    def logprobs(self, batch: RolloutBatch, reference: bool = False, threads: int | None = None) -> torch.Tensor:
        """[B,T] logprobs of the response tokens (0 where masked), rows computed on their ranks, each with
        ``threads`` torch threads (None: as started)."""
        if reference and not self.use_reference:
            raise RuntimeError("reference logprobs requested but the learner has no reference model (use_reference)")
        plan = plan_step(batch, self.world_size, self.batching)
        parts = self._gather(
            [
                worker.logprobs.remote(batch.select(shard), reference, rows, plan.num_micro, plan.filler, threads)
                for worker, shard, rows in zip(self.workers, plan.shards, plan.micro_rows)
            ],
            "logprobs",
        )
        out = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
        for shard, part in zip(plan.shards, parts):
            if shard:
                out[torch.tensor(shard)] = part
        return out

    def train_step(
        self, batch: RolloutBatch, loss_fn: LossFn, threads: int | None = None, micro_threads: int = 1
    ) -> dict[str, float]:
        """One optimizer step over all rows; loss contributions and metrics normalised by the whole batch's counts.
        ``threads``: torch threads per rank (None: as started). ``micro_threads`` are the torch learner's (the ranks
        already split a step), so only 1 is accepted."""
        if micro_threads != 1:
            raise ValueError(f"a DeepSpeed group's ranks split the step: micro_threads must be 1, got {micro_threads}")
        plan = plan_step(batch, self.world_size, self.batching)
        norm = LossNorm(global_tokens=max(1, batch.num_tokens), global_seqs=batch.batch_size)
        results = self._gather(
            [
                worker.train_step.remote(batch.select(shard), rows, loss_fn, norm, plan.num_micro, plan.filler, threads)
                for worker, shard, rows in zip(self.workers, plan.shards, plan.micro_rows)
            ],
            "train_step",
        )
        metrics: dict[str, float] = {}
        for contributions, _ in results:
            for key, value in contributions.items():
                metrics[key] = metrics.get(key, 0.0) + value
        metrics.update(results[0][1])
        return metrics

    def sync_sender(self):
        """The actor that sends collective weight syncs (rank 0, which assembles the exported tensors)."""
        return self.workers[0]

    def broadcast_weights_refs(self, bucket_mb: int) -> list:
        """Start a collective sync: every rank exports (gathers are collective), rank 0 broadcasts."""
        return [worker.broadcast_weights.remote(bucket_mb) for worker in self.workers]

    def export_weights_ref(self):
        """An object ref to {hf_name: cpu tensor}: rollout workers fetch it from the object store directly.

        Under ZeRO-3 rank 0 assembles it from buckets of at most ``export_bucket_mb``, so the full model exists
        once in rank 0's memory plus once in the object store; ``export_weight_bucket_refs`` avoids the former.
        """
        return self._gather([worker.export_weights.remote(False) for worker in self.workers], "weight export")[0][0]

    def export_weight_bucket_refs(self, bucket_mb: int | None = None) -> list:
        """Object refs to {hf_name: cpu tensor} buckets of at most ``bucket_mb`` (default ``export_bucket_mb``)
        each, in parameter order."""
        return self._gather(
            [worker.export_weights.remote(True, bucket_mb) for worker in self.workers], "weight export"
        )[0]

    def save(self, directory: str) -> None:
        """ZeRO state in ``directory/deepspeed/`` + an HF model dir in ``directory`` (one shared filesystem)."""
        self._gather([worker.save.remote(directory) for worker in self.workers], "save")

    def load(self, directory: str) -> None:
        """Resume the ZeRO state saved by ``save`` with the same world_size and zero_stage; call before training."""
        from rltrain.learner.deepspeed_learner import check_checkpoint

        # On the driver, before any rank loads: a mismatch is a plain ConfigError and the group stays usable.
        check_checkpoint(directory, world_size=self.world_size, zero_stage=self.zero_stage)
        self._gather([worker.load.remote(directory) for worker in self.workers], "load")

    def actors(self) -> list:
        return list(self.workers)

    def shutdown(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
