"""Ray start-up and worker groups with explicit methods (no dispatch decorators).

``cluster.mode=local`` starts a local Ray with the same actors a cluster uses, so the laptop run and
the cluster run are one code path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

from rltrain.dist.actors import LearnerWorker, RewardWorker, RolloutWorker
from rltrain.types import GenRequest, GenResult, SamplingParams

log = logging.getLogger(__name__)


def start_ray(mode: str, address: str | None, num_cpus: int | None, cpus_needed: float) -> bool:
    """Start (local) or join (address) a Ray cluster. Returns False when Ray was already initialised
    (by the caller, e.g. a notebook or a test), so that the caller's Ray is not shut down with the run."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if mode == "address":
        ray.init(address=address or "auto", log_to_driver=True)
        return True
    # Logical CPUs may exceed physical ones: rollout, grading and learning take turns in this loop.
    logical = max(num_cpus or os.cpu_count() or 1, int(cpus_needed + 0.999))
    ray.init(num_cpus=logical, include_dashboard=False, log_to_driver=True)
    return True


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def balance_by_tokens(requests: Sequence[GenRequest], max_tokens: int, num_workers: int) -> list[list[int]]:
    """Split request indices into ``num_workers`` sorted lists of roughly equal token cost.

    Requests with the same ``prompt_ids`` (a tree's segments of one prompt) go to one worker, so that its
    prefix cache, not a second worker's prefill, serves their shared context. Prompt groups are placed
    largest first onto the least loaded worker; a request costs ``(context tokens + its max tokens) * n``.
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for index, request in enumerate(requests):
        by_prompt.setdefault(request.prompt_ids, []).append(index)
    cost = {
        prompt: sum(
            (len(requests[i].context_ids) + requests[i].token_budget(max_tokens)) * requests[i].n
            for i in indices
        )
        for prompt, indices in by_prompt.items()
    }
    shares: list[list[int]] = [[] for _ in range(num_workers)]
    loads = [0] * num_workers
    for prompt in sorted(by_prompt, key=lambda p: -cost[p]):
        target = loads.index(min(loads))
        shares[target].extend(by_prompt[prompt])
        loads[target] += cost[prompt]
    return [sorted(share) for share in shares]


def rollout_gpus(engine: str, options: dict[str, Any], cluster_gpus: float) -> int:
    """GPUs each rollout actor reserves: a vLLM engine's tensor-parallel size when the cluster has GPUs.

    Ray hides every GPU from an actor that reserves none, so a CUDA engine must ask for its devices.
    """
    if cluster_gpus <= 0 or engine not in ("vllm", "auto"):
        return 0
    return int(options.get("tensor_parallel_size", 1))


def share_params(params: SamplingParams, slot: int) -> SamplingParams:
    """Worker ``slot``'s sampling params: a seeded call gives each share its own seed range, so workers
    never draw the same random stream (a re-run share repeats its own exactly)."""
    if params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + slot * 1_000_003)


class RolloutGroup:
    """N rollout workers with token-balanced data-parallel dispatch and worker replacement."""

    def __init__(self, num_workers: int, worker_args: dict[str, Any], placements: Sequence[dict]):
        """``placements[slot]``: Ray actor options of worker ``slot`` (its placement-group bundle, see
        rltrain/dist/placement.py)."""
        import ray

        self._placements = list(placements)
        self._remote = ray.remote(max_restarts=0)(RolloutWorker)
        self._args = worker_args
        self.workers = [self._spawn(slot) for slot in range(num_workers)]
        ray.get([w.ready.remote() for w in self.workers])
        # The last synced weights, for a replacement worker: an object ref, or a function returning one (collective
        # syncs leave no ref behind; the learner exports again on demand).
        self._weights: tuple[Any, int] | None = None
        self.replacements = 0

    def _spawn(self, slot: int):
        """Worker ``slot`` seeds its engine with ``seed + slot``: engines never share an unseeded random stream."""
        # A replacement takes the same slot: the dead worker's share of the bundle is free again.
        return self._remote.options(**self._placements[slot]).remote(**{**self._args, "seed": self._args["seed"] + slot})

    def generate(self, requests: Sequence[GenRequest], params: SamplingParams) -> list[list[GenResult]]:
        """Results in request order. A worker that dies is replaced and its share re-run once."""
        import ray

        shares = balance_by_tokens(requests, params.max_tokens, len(self.workers))
        slot_params = [share_params(params, slot) for slot in range(len(shares))]
        pending = {
            slot: self.workers[slot].generate.remote([requests[i] for i in share], slot_params[slot])
            for slot, share in enumerate(shares)
            if share
        }
        results: list[list[GenResult] | None] = [None] * len(requests)
        for slot, ref in pending.items():
            try:
                outputs = ray.get(ref)
            except ray.exceptions.RayActorError:
                log.warning(
                    "rollout worker %d died; replacing it and re-running its %d requests", slot, len(shares[slot])
                )
                self._replace(slot)
                retry = self.workers[slot].generate.remote([requests[i] for i in shares[slot]], slot_params[slot])
                outputs = ray.get(retry)
            for index, output in zip(shares[slot], outputs):
                results[index] = output
        return results  # type: ignore[return-value]

    def _replace(self, slot: int) -> int:
        """Start a fresh worker in ``slot`` holding the last synced weights; returns its policy version."""
        import ray

        self.workers[slot] = self._spawn(slot)
        ray.get(self.workers[slot].ready.remote())
        self.replacements += 1
        if self._weights is None:
            return ray.get(self.workers[slot].policy_version.remote())
        source, version = self._weights
        weights_ref = source() if callable(source) else source
        return ray.get(self.workers[slot].load_weights.remote(weights_ref, version))

    def load_weights(self, weights_ref: Any, version: int) -> list[int]:
        """Send the learner's weights (an object ref: no driver copy) to every worker; returns their versions.

        A worker that dies meanwhile is replaced, and the replacement loads these weights.
        """
        import ray

        self.remember_weights(weights_ref, version)
        pending = [w.load_weights.remote(weights_ref, version) for w in self.workers]
        versions = []
        for slot, ref in enumerate(pending):
            try:
                versions.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                log.warning("rollout worker %d died during weight sync; replacing it", slot)
                versions.append(self._replace(slot))
        return versions

    def open_weight_sync_refs(self, address: tuple[str, int], backend: str, timeout_s: float) -> list:
        """Start joining the sync group as ranks 1..N (the learner's sender is rank 0, joining concurrently)."""
        world_size = 1 + len(self.workers)
        return [
            worker.open_weight_sync.remote(address, 1 + slot, world_size, backend, timeout_s)
            for slot, worker in enumerate(self.workers)
        ]

    def receive_weights_refs(self, version: int) -> list:
        """Start receiving a collective sync; each ref resolves to that worker's policy version."""
        return [worker.receive_weights.remote(version) for worker in self.workers]

    def kv_block_size(self) -> int | None:
        import ray

        return ray.get(self.workers[0].kv_block_size.remote())

    def sleep(self) -> None:
        """Free the engines' device memory (vLLM sleep level 1: weights to CPU, KV cache dropped)."""
        import ray

        ray.get([worker.sleep.remote() for worker in self.workers])

    def wake_up(self) -> None:
        import ray

        ray.get([worker.wake_up.remote() for worker in self.workers])

    def remember_weights(self, source: Any, version: int) -> None:
        """What a replacement worker loads: ``source`` is an object ref or a function returning one."""
        self._weights = (source, version)

    def close_weight_sync(self) -> None:
        """Leave the sync group on every live worker (best effort: the group is being rebuilt or the run ends)."""
        import ray

        try:
            ray.get([worker.close_weight_sync.remote() for worker in self.workers], timeout=30)
        except ray.exceptions.RayError as exc:
            log.info("closing the weight-sync group: %s", exc)

    def shutdown(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)


def create_reward_worker(threads: int, grader_options: dict[str, Any], placement: dict):
    """The reward actor, in ``placement`` (Ray actor options)."""
    import ray

    worker = ray.remote(RewardWorker).options(**placement).remote(threads, grader_options)
    ray.get(worker.ready.remote())
    return worker


class TorchLearnerGroup:
    """One torch learner actor. The DeepSpeed group (rltrain/dist/deepspeed_group.py) has the same methods."""

    use_gpu = False  # the torch learner actor reserves no GPU

    def __init__(self, threads: int, model_path: str, options: dict[str, Any], placement: dict):
        """The learner actor, in ``placement`` (Ray actor options)."""
        import ray

        self.actor = ray.remote(LearnerWorker).options(**placement).remote(threads, model_path, options)
        ray.get(self.actor.ready.remote())

    def logprobs(self, batch, reference: bool = False):
        import ray

        return ray.get(self.actor.logprobs.remote(batch, reference))

    def train_step(self, batch, loss_fn) -> dict[str, float]:
        import ray

        return ray.get(self.actor.train_step.remote(batch, loss_fn))

    def forward_extras(self, batch, extras_fn) -> dict:
        import ray

        return ray.get(self.actor.forward_extras.remote(batch, extras_fn))

    def actors(self) -> list:
        return [self.actor]

    def export_weights_ref(self):
        """An object ref to {name: tensor}: rollout workers fetch it from the object store directly."""
        return self.actor.export_weights.remote()

    def sync_sender(self):
        """The actor that sends collective weight syncs."""
        return self.actor

    def broadcast_weights_refs(self, bucket_mb: int) -> list:
        return [self.actor.broadcast_weights.remote(bucket_mb)]

    def save(self, directory: str) -> None:
        import ray

        ray.get(self.actor.save.remote(directory))

    def load(self, directory: str) -> None:
        import ray

        ray.get(self.actor.load.remote(directory))
