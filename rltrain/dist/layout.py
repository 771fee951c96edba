"""The layout a Slurm job can hold: derived from what Slurm gave the job, checked before Ray starts.

``launch/slurm/rltrain.sbatch`` runs ``python -m rltrain.dist.layout <recipe> [key=value ...]`` on the first
node before it starts Ray. It reads the job's resources from Slurm's environment (``job_resources``), derives
a layout that fits them (``derived_overrides``, for ``cluster=slurm``), composes the recipe with that layout
and the user's overrides (which win), runs the validation pass, and checks the GPUs and per-node bundle sizes
the run will reserve against the job's (``check_fits``). It prints the Ray CPUs each node should offer on its
first line, then the derived overrides one per line; a layout that cannot fit is ``ConfigError`` naming needed
against available and the keys to change (exit 2), seconds after submission instead of after Ray and SFT.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from omegaconf import DictConfig

from rltrain.config import ConfigError
from rltrain.dist.placement import PlacementPlan, resource_table

SLURM_OPTION = "cluster=slurm"


@dataclass(frozen=True)
class JobResources:
    """What the job may use: ``nodes`` alike, each with ``cpus_per_node`` CPUs and ``gpus_per_node`` GPUs."""

    nodes: int
    cpus_per_node: int
    gpus_per_node: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return f"{self.nodes} node(s) x {self.cpus_per_node} CPUs, {self.gpus_per_node} GPUs"


def _visible_gpus(value: str) -> int:
    """GPUs named by ``CUDA_VISIBLE_DEVICES`` ("0,1" -> 2; "" or Slurm's "NoDevFiles" -> 0)."""
    if value.strip() in ("", "NoDevFiles"):
        return 0
    return len([device for device in value.split(",") if device.strip()])


def job_resources(env: Mapping[str, str]) -> JobResources:
    """The job's resources from Slurm's environment; ``RAY_NUM_CPUS`` / ``RAY_NUM_GPUS`` (what the sbatch tells
    each Ray node to offer) win. GPUs: ``SLURM_GPUS_ON_NODE``, else ``CUDA_VISIBLE_DEVICES``, else none."""
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    cpus = int(env.get("RAY_NUM_CPUS") or env.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)
    if env.get("RAY_NUM_GPUS"):
        gpus = int(env["RAY_NUM_GPUS"])
    elif env.get("SLURM_GPUS_ON_NODE"):
        gpus = int(env["SLURM_GPUS_ON_NODE"])
    else:
        gpus = _visible_gpus(env.get("CUDA_VISIBLE_DEVICES", ""))
    return JobResources(nodes=nodes, cpus_per_node=cpus, gpus_per_node=gpus)


def derived_overrides(resources: JobResources) -> list[str]:
    """The layout ``cluster=slurm`` gives a job with these resources, as command-line overrides.

    No GPU: one torch rollout worker and the torch learner (with the reward worker, three actors taking turns
    on the CPUs). One GPU: a vLLM engine and a DeepSpeed rank sharing it (colocated). More: half the GPUs run
    vLLM engines, the other half DeepSpeed ZeRO-3 ranks, one GPU each (disaggregated). Each actor gets the
    node's CPUs divided by the actors on it as torch threads.
    """
    gpus = resources.gpus
    if gpus == 0:
        workers, ranks = 1, 1
        layout = ["learner=torch", f"rollout.num_workers={workers}", "cluster.num_gpus=0"]
    elif gpus == 1:
        workers, ranks = 1, 1
        layout = ["cluster.placement=colocated", "rollout.engine=vllm", "rollout.num_workers=1"]
        layout += ["learner=deepspeed", "learner.world_size=1", "cluster.num_gpus=1"]
    else:
        workers, ranks = gpus // 2, gpus - gpus // 2
        layout = ["cluster.placement=disaggregated", "rollout.engine=vllm", f"rollout.num_workers={workers}"]
        layout += ["rollout.tensor_parallel_size=1", "learner=deepspeed", "learner.zero_stage=3"]
        layout += [f"learner.world_size={ranks}"]
        layout += [f"cluster.num_gpus={gpus}"]
    actors_per_node = math.ceil((workers + ranks + 1) / resources.nodes)
    return [*layout, f"cluster.omp_threads={max(1, resources.cpus_per_node // actors_per_node)}"]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def without_user_keys(derived: Sequence[str], user: Sequence[str]) -> list[str]:
    """``derived`` less what the user sets: the same key, or every key of a group the user picks
    (``learner=torch`` drops the derived ``learner=...`` and ``learner.world_size=...``)."""
    user_keys = {_key(override) for override in user}
    return [o for o in derived if _key(o) not in user_keys and _key(o).split(".")[0] not in user_keys]


def ray_cpus_per_node(plan: PlacementPlan, resources: JobResources) -> int:
    """Logical CPUs each Ray node offers: the job's, or more where the plan's actors need more. Like a local Ray
    (rltrain.dist.groups.start_ray), logical CPUs may exceed physical ones: the actors take turns."""
    return max(resources.cpus_per_node, math.ceil(plan.totals().get("CPU", 0.0) / resources.nodes))


def check_fits(cfg: DictConfig, plan: PlacementPlan, resources: JobResources) -> None:
    """ConfigError when the run's GPUs cannot fit the job: ``cluster.num_gpus`` or the plan's total above the
    job's GPUs, or one bundle (an engine's tensor-parallel GPUs) above a node's."""
    needed = plan.totals()
    largest = max(bundle.get("GPU", 0.0) for bundle in plan.bundles)
    gpus_needed = max(needed.get("GPU", 0.0), float(cfg.cluster.num_gpus))
    if gpus_needed <= resources.gpus and largest <= resources.gpus_per_node:
        return
    available = {"CPU": float(resources.cpus_per_node * resources.nodes), "GPU": float(resources.gpus)}
    table = resource_table({**needed, "GPU": gpus_needed}, {"job": available})
    raise ConfigError(
        f"cluster.num_gpus={cfg.cluster.num_gpus}: the layout does not fit the Slurm job ({resources.describe()}; "
        f"largest bundle {largest:g} GPUs):\n{table}\nLower rollout.num_workers, learner.world_size, "
        "rollout.tensor_parallel_size or cluster.num_gpus, pick a layout by name (cluster=gpu_node ...), or ask "
        "Slurm for more (sbatch --nodes, --gpus-per-node)"
    )


def compose(recipe: str, overrides: Sequence[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from rltrain.config import register_configs

    register_configs()
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        return hydra_compose(config_name=recipe, overrides=list(overrides))


def plan_for_job(recipe: str, cluster: str, user: Sequence[str], env: Mapping[str, str]) -> tuple[int, list[str]]:
    """(Ray CPUs per node, the overrides to pass before the user's) for ``recipe`` with ``cluster=<cluster>``;
    the composed run validated and checked against the job (ConfigError)."""
    from rltrain.config_rules import validate
    from rltrain.runtime import plan_run_placement

    resources = job_resources(env)
    derived = without_user_keys(derived_overrides(resources), user) if cluster == "slurm" else []
    cfg = compose(recipe, [f"cluster={cluster}", *derived, *user])
    validate(cfg)
    plan = plan_run_placement(cfg, resources.gpus)
    check_fits(cfg, plan, resources)
    return ray_cpus_per_node(plan, resources), derived


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """``python -m rltrain.dist.layout <recipe> [key=value ...]`` (``CLUSTER`` in the environment, default
    slurm): prints the Ray CPUs per node, then the derived overrides; exit 2 with one line if it cannot fit."""
    env = os.environ if env is None else env
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m rltrain.dist.layout <recipe> [key=value ...]", file=sys.stderr)
        return 2
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cpus, derived = plan_for_job(args[0], env.get("CLUSTER", "slurm"), args[1:], env)
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        print(f"rltrain: config error: {err}", file=sys.stderr)
        return 2
    print("\n".join([str(cpus), *derived]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
