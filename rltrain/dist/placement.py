"""Placement of the run's actors: one Ray placement group reserved up front.

Reserving every actor's resources at once turns "the cluster is too small" into one early error that
names the missing resources, instead of an actor that waits forever for a CPU or GPU mid-start-up.
``plan_placement`` is pure (unit-testable without Ray); ``reserve``, ``actor_options`` and ``release``
are the thin Ray side.

- ``disaggregated``: every actor (rollout worker i, learner rank j, reward worker) has its own bundle.
- ``colocated``: bundle i holds rollout worker i and learner rank i, which share its CPUs and its GPU,
  so generation and training take turns on one device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

PLACEMENTS = ("disaggregated", "colocated")
# Each actor's own CPU, as the groups asked for before placement groups (rollout, learner, reward).
ACTOR_CPUS = 1.0


@dataclass(frozen=True)
class ActorSlot:
    """Where one actor goes: its bundle and the share of that bundle it asks Ray for."""

    bundle_index: int
    num_cpus: float
    num_gpus: float


@dataclass(frozen=True)
class PlacementPlan:
    """The placement group's bundles and every actor's slot in them."""

    bundles: list[dict[str, float]]
    rollout: list[ActorSlot]
    learner: list[ActorSlot]
    reward: ActorSlot
    strategy: str = "PACK"

    def totals(self) -> dict[str, float]:
        """Resources the whole plan reserves, summed over bundles."""
        total: dict[str, float] = {}
        for bundle in self.bundles:
            for name, amount in bundle.items():
                total[name] = total.get(name, 0.0) + amount
        return total


def gpus_per_actor(
    cluster_gpus: float, rollout_engine: str, tensor_parallel_size: int, learner_backend: str, learner_ranks: int
) -> tuple[int, int]:
    """(GPUs per rollout worker, GPUs per learner rank): the one rule deciding which actors use a GPU.

    A vLLM engine (``rollout.engine`` vllm or auto) takes its tensor-parallel size when the cluster has GPUs:
    Ray hides every GPU from an actor that reserves none. A DeepSpeed rank takes one GPU when the cluster has
    one per rank (else all ranks run on CPU over gloo). The torch engine and the torch learner run on CPU.
    Everything else reads the decision from an actor's placement (``actor_uses_gpu``).
    """
    if cluster_gpus <= 0:
        return 0, 0
    rollout = tensor_parallel_size if rollout_engine in ("vllm", "auto") else 0
    learner = 1 if learner_backend == "deepspeed" and cluster_gpus >= learner_ranks else 0
    return rollout, learner


def actor_uses_gpu(placement: dict[str, Any]) -> bool:
    """Whether an actor placed with these Ray options (``actor_options``) has a GPU."""
    return placement.get("num_gpus", 0) > 0


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    """A Ray bundle; a zero GPU entry is left out because Ray rejects a bundle of only zeros."""
    return {"CPU": cpus, "GPU": float(gpus)} if gpus else {"CPU": cpus}


def _check_counts(placement: str, num_rollout: int, rollout_gpus: int, learner_ranks: int, learner_gpus: int) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"cluster.placement must be one of {PLACEMENTS}, got {placement!r}")
    if num_rollout < 1 or learner_ranks < 1:
        raise ValueError(
            f"placement needs at least one rollout worker and one learner rank, got rollout.num_workers="
            f"{num_rollout}, learner ranks={learner_ranks}"
        )
    if rollout_gpus < 0 or learner_gpus not in (0, 1):
        raise ValueError(
            f"GPUs per actor: a rollout worker takes 0 or its tensor-parallel size (got {rollout_gpus}), "
            f"a learner rank takes 0 or 1 (got {learner_gpus})"
        )
    if placement != "colocated":
        return
    if num_rollout != learner_ranks:
        raise ValueError(
            f"cluster.placement=colocated pairs rollout worker i with learner rank i: rollout.num_workers="
            f"{num_rollout} must equal learner.world_size={learner_ranks}"
        )
    if rollout_gpus > 1:
        raise ValueError(
            f"cluster.placement=colocated shares one GPU per learner rank: a rollout worker may use at most 1 GPU "
            f"(rollout.tensor_parallel_size=1), got {rollout_gpus}"
        )


def _disaggregated(num_rollout: int, rollout_gpus: int, learner_ranks: int, learner_gpus: int) -> PlacementPlan:
    gpus = [rollout_gpus] * num_rollout + [learner_gpus] * learner_ranks + [0]
    slots = [ActorSlot(index, ACTOR_CPUS, float(g)) for index, g in enumerate(gpus)]
    return PlacementPlan(
        bundles=[_bundle(ACTOR_CPUS, g) for g in gpus],
        rollout=slots[:num_rollout],
        learner=slots[num_rollout:-1],
        reward=slots[-1],
    )


def _colocated(num_pairs: int, rollout_gpus: int, learner_gpus: int) -> PlacementPlan:
    """Pair i shares bundle i; the actors that use the GPU split its one device evenly (0.5 each when both do)."""
    users = (rollout_gpus > 0) + (learner_gpus > 0)
    share = 1.0 / users if users else 0.0
    bundles = [_bundle(2 * ACTOR_CPUS, 1 if users else 0) for _ in range(num_pairs)]
    return PlacementPlan(
        bundles=bundles + [_bundle(ACTOR_CPUS, 0)],
        rollout=[ActorSlot(i, ACTOR_CPUS, share if rollout_gpus else 0.0) for i in range(num_pairs)],
        learner=[ActorSlot(i, ACTOR_CPUS, share if learner_gpus else 0.0) for i in range(num_pairs)],
        reward=ActorSlot(num_pairs, ACTOR_CPUS, 0.0),
    )


def plan_placement(
    placement: str, num_rollout: int, rollout_gpus: int, learner_ranks: int, learner_gpus: int
) -> PlacementPlan:
    """Bundles and actor slots for ``placement``. Pure: no Ray needed.

    ``rollout_gpus`` is GPUs per rollout worker (0 on CPU, the tensor-parallel size on GPU);
    ``learner_gpus`` is GPUs per learner rank (0 or 1). Bad combinations raise ``ValueError``.
    """
    _check_counts(placement, num_rollout, rollout_gpus, learner_ranks, learner_gpus)
    if placement == "colocated":
        return _colocated(num_rollout, rollout_gpus, learner_gpus)
    return _disaggregated(num_rollout, rollout_gpus, learner_ranks, learner_gpus)


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{name}={resources.get(name, 0.0):g}" for name in ("CPU", "GPU"))


def gpu_shortfall(num_gpus: int, available: float, holder: str) -> str | None:
    """Why ``cluster.num_gpus`` cannot run on the ``available`` GPUs of ``holder`` (e.g. "this machine", "the Ray
    cluster"); None when they suffice."""
    if num_gpus <= available:
        return None
    return (
        f"cluster.num_gpus={num_gpus}, but {holder} has {available:g} GPUs; run where there are that many, or lower "
        "cluster.num_gpus (0 on CPU)"
    )


def resource_table(needed: dict[str, float], columns: dict[str, dict[str, float]]) -> str:
    """``needed`` against each of ``columns`` (e.g. the cluster's total and available), one row per resource::

    resource  needed  total  available
    CPU       4       2      2
    """
    header = ["resource", "needed", *columns]
    rows = [header] + [
        [name, f"{needed.get(name, 0.0):g}", *(f"{column.get(name, 0.0):g}" for column in columns.values())]
        for name in ("CPU", "GPU")
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def shortfall_message(
    plan: PlacementPlan, timeout_s: float, total: dict[str, float], free: dict[str, float], *, local_ray: bool = True
) -> str:
    """Why the reservation failed: what the plan needs against what the cluster has, and what to change.

    ``local_ray``: the run started its own Ray, whose logical CPUs ``cluster.num_cpus`` raises; a cluster that
    was joined is sized by whoever started it, so that hint is left out there.
    """
    sizes = sorted({_fmt(b) for b in plan.bundles})
    cpus_hint = "raise cluster.num_cpus, " if local_ray else ""
    return (
        f"could not reserve the placement group within {timeout_s:g}s ({len(plan.bundles)} bundles, each on one "
        f"node; sizes: {'; '.join(sizes)}):\n{resource_table(plan.totals(), {'total': total, 'available': free})}\n"
        f"Lower rollout.num_workers or learner.world_size, switch cluster.placement (colocated shares a GPU per "
        f"learner rank), {cpus_hint}or raise cluster.placement_timeout_s if the cluster is still scaling up."
    )


def reserve(plan: PlacementPlan, timeout_s: float, *, local_ray: bool = True) -> Any:
    """Create the placement group and wait up to ``timeout_s`` for all its bundles.

    A group that is not ready is removed (so it does not hold a partial reservation) and ``RuntimeError``
    names the shortfall (``shortfall_message``).
    """
    import ray
    from ray.util import placement_group

    pg = placement_group(plan.bundles, strategy=plan.strategy)
    if pg.wait(timeout_seconds=timeout_s):
        return pg
    release(pg)
    total, free = ray.cluster_resources(), ray.available_resources()
    raise RuntimeError(shortfall_message(plan, timeout_s, total, free, local_ray=local_ray))


def actor_options(pg: Any, slot: ActorSlot) -> dict[str, Any]:
    """Keyword arguments for ``ray.remote(...)`` / ``.options(...)`` placing one actor in its bundle.

    Child tasks are captured so that anything an actor starts stays inside the reservation; such a child
    must then fit in the bundle's unused share.
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=slot.bundle_index, placement_group_capture_child_tasks=True
    )
    return {"num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus, "scheduling_strategy": strategy}


def release(pg: Any) -> None:
    """Remove the placement group. Best effort and idempotent: safe on ``None``, twice, or after Ray stopped."""
    if pg is None:
        return
    import ray
    from ray.util import remove_placement_group

    if not ray.is_initialized():
        return
    try:
        remove_placement_group(pg)
    except Exception as err:  # noqa: BLE001 - shutdown must go on whatever Ray says
        log.warning("could not remove placement group %s: %s", pg.id.hex(), err)
