"""Ray start-up and worker groups with explicit methods (no dispatch decorators).

``cluster.mode=local`` starts a local Ray with the same actors a cluster uses, so the laptop run and
the cluster run are one code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from rltrain.dist.actors import (
    ZERO_COPY_RUNTIME_ENV,
    LearnerWorker,
    RewardWorker,
    RolloutWorker,
    receiving_read_only_tensors,
)
from rltrain.dist.placement import actor_uses_gpu
from rltrain.errors import RunError
from rltrain.types import GenRequest, GenResult, SamplingParams

log = logging.getLogger(__name__)

# A lost local Ray head makes Ray end the driver after this many seconds without the GCS (Ray's default: 60).
LOCAL_GCS_RECONNECT_TIMEOUT_S = 20


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
    # Read by the driver and the head at start-up: a killed head ends the run in bounded time, never a hang.
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(LOCAL_GCS_RECONNECT_TIMEOUT_S))
    # Logical CPUs may exceed physical ones: rollout, grading and learning take turns in this loop.
    logical = max(num_cpus or os.cpu_count() or 1, int(cpus_needed + 0.999))
    ray.init(num_cpus=logical, include_dashboard=False, log_to_driver=True)
    return True


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _pid(actor_instance) -> int:
    return os.getpid()


def actor_labels(role: str, actors: Sequence[Any], timeout_s: float | None = None) -> dict[str, str]:
    """{actor id: "<role> <i> (actor <id>, pid <pid>)"}: how a RunError names a dead actor. Waits until every
    actor has started (its pid is asked once, now: a dead process cannot be asked)."""
    pids = get_named([actor.__ray_call__.remote(_pid) for actor in actors], {}, f"{role} start-up", timeout_s)
    return {
        actor._actor_id.hex(): f"{role} {index} (actor {actor._actor_id.hex()[:12]}, pid {pid})"
        for index, (actor, pid) in enumerate(zip(actors, pids))
    }


def reason_of(err: Exception) -> str:
    """The one-line reason inside a Ray actor error (its first line that is neither Ray's preamble nor a field)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("\t")]
    reason = lines[min(1, len(lines) - 1)] if lines else type(err).__name__
    return reason if len(reason) <= 240 else reason[:237] + "..."


@contextlib.contextmanager
def naming_dead_actors(labels: dict[str, str], what: str) -> Iterator[None]:
    """Turn the death of an actor in ``labels`` (actor id -> label) into a RunError naming it; a lost Ray cluster
    into a RunError saying so. Other errors pass through."""
    import ray

    try:
        yield
    except ray.exceptions.RayActorError as err:
        if err.actor_id not in labels:
            raise
        raise RunError(
            f"{labels[err.actor_id]} died during {what}: {reason_of(err)}; resume with run.resume=auto"
        ) from None
    except (ray.exceptions.RaySystemError, ray.exceptions.RpcError, ray.exceptions.LocalRayletDiedError) as err:
        raise RunError(f"lost the Ray cluster during {what} ({reason_of(err)}); resume with run.resume=auto") from None


def get_named(
    refs: Sequence[Any],
    labels: dict[str, str],
    what: str,
    timeout_s: float | None = None,
    on_failure: Callable[[], None] | None = None,
) -> list:
    """``ray.get(refs)`` that fails at the first failed ref (peers of a collective would block) and names a dead
    actor of ``labels`` (see ``naming_dead_actors``). ``on_failure`` runs before the error is raised; ``timeout_s``
    bounds the whole wait (GetTimeoutError)."""
    import ray

    pending = list(refs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        with naming_dead_actors(labels, what):
            while pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, pending = ray.wait(pending, num_returns=1, timeout=left)
                if not done:
                    raise ray.exceptions.GetTimeoutError(f"{what} did not finish within {timeout_s:g} s")
                ray.get(done)
            return ray.get(list(refs))
    except Exception:
        if on_failure is not None:
            on_failure()
        raise


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
            (len(requests[i].context_ids) + requests[i].token_budget(max_tokens)) * requests[i].n for i in indices
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


def _is_death_of(actor: Any, err: Exception) -> bool:
    """Whether a RayActorError is ``actor``'s own death (not that of an actor whose result it was given)."""
    return err.actor_id in (None, actor._actor_id.hex())


def share_params(params: SamplingParams, slot: int) -> SamplingParams:
    """Worker ``slot``'s sampling params: a seeded call gives each share its own seed range, so workers
    never draw the same random stream (a re-run share repeats its own exactly)."""
    if params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + slot * 1_000_003)


class RolloutGroup:
    """N rollout workers with token-balanced data-parallel dispatch and worker replacement."""

    def __init__(self, num_workers: int, worker_args: dict[str, Any], placements: Sequence[dict], wait: bool = True):
        """``placements[slot]``: Ray actor options of worker ``slot`` (its placement-group bundle, see
        rltrain/dist/placement.py). ``wait=False``: return while the workers start; ``ready_refs()`` says when
        they are up (a run starts all its actors at once)."""
        import ray

        self._placements = list(placements)
        self._remote = ray.remote(max_restarts=0)(RolloutWorker)
        self._args = worker_args
        self.workers = [self._spawn(slot) for slot in range(num_workers)]
        if wait:
            ray.get(self.ready_refs())
        # The last synced weights, for a replacement worker: an object ref, or a function returning one (collective
        # syncs leave no ref behind; the learner exports again on demand).
        self._weights: tuple[Any, int] | None = None
        self.replacements = 0

    def _spawn(self, slot: int):
        """Worker ``slot`` seeds its engine with ``seed + slot``: engines never share an unseeded random stream."""
        # A replacement takes the same slot: the dead worker's share of the bundle is free again.
        return self._remote.options(**self._placements[slot]).remote(
            **{**self._args, "seed": self._args["seed"] + slot}
        )

    def generate(
        self, requests: Sequence[GenRequest], params: SamplingParams, threads: int | None = None
    ) -> list[list[GenResult]]:
        """Results in request order, each worker generating with ``threads`` torch threads (None: as started).
        A worker that dies is replaced and its share re-run once."""
        import ray

        shares = balance_by_tokens(requests, params.max_tokens, len(self.workers))
        slot_params = [share_params(params, slot) for slot in range(len(shares))]
        pending = {
            slot: self.workers[slot].generate.remote([requests[i] for i in share], slot_params[slot], threads)
            for slot, share in enumerate(shares)
            if share
        }
        results: list[list[GenResult] | None] = [None] * len(requests)
        for slot, ref in pending.items():
            try:
                outputs = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                if not _is_death_of(self.workers[slot], err):
                    raise
                log.warning(
                    "rollout worker %d died; replacing it and re-running its %d requests", slot, len(shares[slot])
                )
                self._replace(slot)
                retry = self.workers[slot].generate.remote(
                    [requests[i] for i in shares[slot]], slot_params[slot], threads
                )
                outputs = ray.get(retry)
            for index, output in zip(shares[slot], outputs):
                results[index] = output
        return results  # type: ignore[return-value]

    def ready_refs(self) -> list:
        """One object ref per worker, resolved once its engine is up (raises if its start failed)."""
        return [worker.ready.remote() for worker in self.workers]

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
            except ray.exceptions.RayActorError as err:
                if not _is_death_of(self.workers[slot], err):
                    raise  # e.g. the learner that exported the weights died
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


def create_reward_worker(
    threads: int,
    grader_options: dict[str, Any],
    placement: dict,
    env_options: dict[str, Any] | None = None,
    wait: bool = True,
):
    """The reward actor, in ``placement`` (Ray actor options); ``env_options``: its EnvRunner's, if any.
    ``wait=False``: return while it starts (its ``ready`` method says when it is up)."""
    import ray

    worker = ray.remote(RewardWorker).options(**placement).remote(threads, grader_options, env_options)
    if wait:
        ray.get(worker.ready.remote())
    return worker


class TorchLearnerGroup:
    """One torch learner actor. The DeepSpeed group (rltrain/dist/deepspeed_group.py) has the same methods.

    Every call goes through ``get_named``: a dead learner is a RunError naming it, never a hang or a traceback.
    """

    def __init__(self, threads: int, model_path: str, options: dict[str, Any], placement: dict):
        """The learner actor, in ``placement`` (Ray actor options)."""
        import ray

        self.placement = placement
        remote = ray.remote(max_restarts=0, runtime_env=ZERO_COPY_RUNTIME_ENV)(LearnerWorker)
        self.actor = remote.options(**placement).remote(threads, model_path, options)
        self.labels = actor_labels("learner rank", [self.actor])

    @property
    def use_gpu(self) -> bool:
        return actor_uses_gpu(self.placement)

    def _call(self, ref, what: str):
        with receiving_read_only_tensors():
            return get_named([ref], self.labels, what)[0]

    def logprobs(self, batch, reference: bool = False, threads: int | None = None):
        """``threads``: torch threads for this call (None: as started); the same for every method below. Returned
        tensors are copies: what arrives from the actor is a read-only view of the object store."""
        return self._call(self.actor.logprobs.remote(batch, reference, threads), "logprobs").clone()

    def train_step(self, batch, loss_fn, threads: int | None = None, micro_threads: int = 1) -> dict[str, float]:
        """``micro_threads``: micro-batches computed at once, one torch thread each (rltrain/learner/micro_threads.py)."""
        return self._call(self.actor.train_step.remote(batch, loss_fn, threads, micro_threads), "train_step")

    def forward_extras(self, batch, extras_fn, threads: int | None = None) -> dict:
        extras = self._call(self.actor.forward_extras.remote(batch, extras_fn, threads), "forward_extras")
        return {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in extras.items()}

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
        self._call(self.actor.save.remote(directory), "save")

    def load(self, directory: str) -> None:
        self._call(self.actor.load.remote(directory), "load")
