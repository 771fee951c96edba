"""The actors of one run behind explicit methods: what the trainer loop calls.

Rollout workers, the reward worker and the learner are Ray actors. Weights travel learner → rollout
workers either through the Ray object store as one object ref (no copy through the driver), or as a
bucketed broadcast in a torch.distributed group of the learner's rank 0 and the rollout workers
(``rollout.weight_sync``, rltrain/dist/weight_sync.py).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rltrain.config import ConfigError
from rltrain.dist.groups import (
    RolloutGroup,
    TorchLearnerGroup,
    create_reward_worker,
    reason_of,
    start_ray,
    stop_ray,
)
from rltrain.dist.placement import (
    PlacementPlan,
    actor_options,
    gpu_shortfall,
    gpus_per_actor,
    plan_placement,
    release,
    reserve,
)
from rltrain.dist.syncer import WeightSync, resolve_weight_sync
from rltrain.dist.threads import PhaseThreads, run_phase_threads
from rltrain.env.runner import env_runner_options
from rltrain.errors import RunError
from rltrain.learner.base import LossFn
from rltrain.progress_log import plain_ray_logs
from rltrain.types import GenRequest, GenResult, RolloutBatch, SamplingParams

log = logging.getLogger(__name__)


def _cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0)


def grader_options(reward_cfg: DictConfig) -> dict[str, Any]:
    """RewardGrader arguments from ``reward``; a fresh process tag, kept by whoever re-creates the grader with
    these options (a replacement reward actor then kills what its dead predecessor's functions left running)."""
    return {
        "functions": OmegaConf.to_container(reward_cfg.functions, resolve=True),
        "num_workers": reward_cfg.num_workers,
        "timeout_s": reward_cfg.timeout_s,
        "memory_mb": reward_cfg.memory_mb,
        "on_error": reward_cfg.on_error,
        "batch_size": reward_cfg.batch_size,
        "max_error_frac": reward_cfg.max_error_frac,
        "process_tag": f"rltrain-{uuid.uuid4().hex[:12]}",
    }


def learner_options(cfg: DictConfig, total_optimizer_steps: int) -> dict[str, Any]:
    lc = cfg.learner
    options = {
        "lr": lc.lr,
        "betas": tuple(lc.betas),
        "weight_decay": lc.weight_decay,
        "adam_eps": lc.adam_eps,
        "warmup_steps": lc.warmup_steps,
        "lr_schedule": lc.lr_schedule,
        "total_steps": total_optimizer_steps,
        "grad_clip": lc.grad_clip,
        "micro_batch_size": lc.micro_batch_size,
        "temperature": cfg.rollout.temperature,
        "use_reference": lc.use_reference,
        "dtype": cfg.model.dtype,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "seed": cfg.run.seed,
    }
    if lc.max_tokens_per_micro_batch is not None:  # packed micro-batches (rltrain/learner/micro_batches.py)
        options["max_tokens_per_micro_batch"] = lc.max_tokens_per_micro_batch
    if lc.share_prefixes:
        options["share_prefixes"] = True
    if lc.lora.rank > 0:  # LoRA adapters (rltrain/learner/lora.py); rank 0 trains every weight
        options["lora"] = OmegaConf.to_container(lc.lora, resolve=True)
    return options


def rollout_options(cfg: DictConfig) -> dict[str, Any]:
    rc = cfg.rollout
    options: dict[str, Any] = {"dtype": cfg.model.dtype}
    if rc.engine == "torch":
        options["kv_fork"] = rc.sampler == "tree"  # keep KV rows at segment ends (TorchTreeGenerator)
    if rc.engine in ("vllm", "auto"):
        options.update(
            enforce_eager=rc.enforce_eager,
            tensor_parallel_size=rc.tensor_parallel_size,
            gpu_memory_utilization=rc.gpu_memory_utilization,
        )
        if rc.vllm_block_size is not None:
            options["block_size"] = rc.vllm_block_size
    return options


def plan_run_placement(cfg: DictConfig, cluster_gpus: float) -> PlacementPlan:
    """The run's bundles, with the GPUs ``gpus_per_actor`` gives each rollout worker and learner rank."""
    ranks = cfg.learner.world_size
    rollout_gpus, learner_gpus = gpus_per_actor(
        cluster_gpus, cfg.rollout.engine, cfg.rollout.tensor_parallel_size, cfg.learner.backend, ranks
    )
    return plan_placement(
        cfg.cluster.placement,
        num_rollout=cfg.rollout.num_workers,
        rollout_gpus=rollout_gpus,
        learner_ranks=ranks,
        learner_gpus=learner_gpus,
    )


def create_learner_group(cfg: DictConfig, model_path: str, options: dict[str, Any], placements: list[dict]):
    """The learner backend named by ``learner.backend`` behind the same group methods, rank i in ``placements[i]``."""
    threads = cfg.cluster.omp_threads
    if cfg.learner.backend == "deepspeed":
        from rltrain.dist.deepspeed_group import DeepSpeedLearnerGroup

        return DeepSpeedLearnerGroup(cfg.learner, model_path, options, threads=threads, placements=placements)
    return TorchLearnerGroup(threads=threads, model_path=model_path, options=options, placement=placements[0])


def check_learner_checkpoint(cfg: DictConfig, directory: str) -> None:
    """Raise ConfigError, before any actor starts, when ``cfg.learner`` cannot resume the checkpoint ``directory``."""
    if cfg.learner.backend == "deepspeed":
        from rltrain.learner.deepspeed_learner import check_checkpoint

        check_checkpoint(directory, world_size=cfg.learner.world_size, zero_stage=cfg.learner.zero_stage)


class Runtime:
    def __init__(self, cfg: DictConfig, model_path: str, total_optimizer_steps: int):
        import ray

        cpus_needed = plan_run_placement(cfg, cluster_gpus=0).totals()["CPU"]
        plain_ray_logs()
        self.owns_ray = start_ray(cfg.cluster.mode, cfg.cluster.address, cfg.cluster.num_cpus, cpus_needed)
        self.cluster_gpus = _cluster_gpus()
        self.placement_group, plan = self._reserve(cfg)
        # Colocated vLLM engines on GPU sleep (weights to CPU, KV cache freed) while the learner uses the device.
        self.sleeps = cfg.cluster.placement == "colocated" and plan.rollout[0].num_gpus > 0
        self.rollout_awake = True
        options = {**rollout_options(cfg), **({"enable_sleep_mode": True} if self.sleeps else {})}
        self.rollout = RolloutGroup(
            cfg.rollout.num_workers,
            worker_args={
                "engine": cfg.rollout.engine,
                "model_path": model_path,
                "seed": cfg.run.seed,
                "threads": cfg.cluster.omp_threads,
                "options": options,
            },
            placements=[actor_options(self.placement_group, slot) for slot in plan.rollout],
            wait=False,
        )
        self._reward_args = {
            "threads": 1,
            "grader_options": grader_options(cfg.reward),
            "placement": actor_options(self.placement_group, plan.reward),
            "env_options": env_runner_options(cfg),
        }
        self.reward = create_reward_worker(**self._reward_args, wait=False)
        self.reward_replacements = 0
        self.learner = create_learner_group(
            cfg,
            model_path,
            learner_options(cfg, total_optimizer_steps),
            [actor_options(self.placement_group, slot) for slot in plan.learner],
        )
        # Every actor starts at once (imports, model loads, engine start-up overlap); wait for all of them here.
        ray.get([*self.rollout.ready_refs(), self.reward.ready.remote()])
        mode = resolve_weight_sync(
            cfg.rollout.weight_sync, self.cluster_gpus, cfg.cluster.placement, cfg.rollout.tensor_parallel_size
        )
        self.weight_sync = WeightSync(self.learner, self.rollout, cfg.rollout, mode)
        # Torch threads of each phase's calls (cluster.share_cpu_threads); with trainer.max_staleness >= 1 rollout and
        # learner overlap, so each keeps its own share of the cores.
        self.threads: PhaseThreads = run_phase_threads(
            cfg.cluster,
            len(self.rollout.workers),
            len(self.learner.actors()),
            self.cluster_gpus,
            overlapping=cfg.trainer.max_staleness > 0,
            micro_threads=isinstance(self.learner, TorchLearnerGroup),
        )

    def _reserve(self, cfg: DictConfig) -> tuple[Any, PlacementPlan]:
        """The run's placement group, or ConfigError (Ray stopped if this run started it) when the cluster
        has fewer GPUs than ``cluster.num_gpus`` or cannot hold the plan."""
        gpus = self.cluster_gpus
        try:
            shortfall = gpu_shortfall(cfg.cluster.num_gpus, gpus, "the Ray cluster")
            if shortfall:
                raise RuntimeError(shortfall)
            plan = plan_run_placement(cfg, gpus)
            local_ray = cfg.cluster.mode == "local"
            return reserve(plan, cfg.cluster.placement_timeout_s, local_ray=local_ray), plan
        except RuntimeError as err:
            if self.owns_ray:
                stop_ray()
            raise ConfigError(str(err)) from None

    def set_rollout_awake(self, awake: bool) -> None:
        """Colocated GPU runs: wake the engines before rollout / weight sync, sleep them before learner work."""
        if not self.sleeps or awake == self.rollout_awake:
            return
        if awake:
            self.rollout.wake_up()
        else:
            self.rollout.sleep()
        self.rollout_awake = awake

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[GenResult]]:
        self.set_rollout_awake(True)
        return self.rollout.generate(requests, params, self.threads.rollout)

    def grade(self, completions: list[str], rows: list[dict]):
        """The reward actor's GradeResult, with ``reward/worker_replacements`` (over the run) in its metrics.

        A RunError raised in the actor (a reward function over ``reward.max_error_frac``) is raised here as
        itself. A dead reward actor (stateless) is replaced in its placement and the call re-run once; a
        second death in the same call raises RunError.
        """
        import ray

        try:
            result = self._grade_once(completions, rows)
        except ray.exceptions.RayActorError as err:
            log.warning("the reward worker died (%s); replacing it and grading the batch again", reason_of(err))
            ray.kill(self.reward)
            self.reward = create_reward_worker(**self._reward_args)
            self.reward_replacements += 1
            try:
                result = self._grade_once(completions, rows)
            except ray.exceptions.RayActorError as again:
                raise RunError(
                    f"the reward worker (Ray actor RewardWorker) died twice grading one batch: {reason_of(again)}"
                ) from None
        result.metrics["reward/worker_replacements"] = float(self.reward_replacements)
        return result

    def env_calls(self, calls: list) -> list:
        """Environment calls (rltrain/env/runner.py) on the reward actor's grader processes; a RunError as itself."""
        import ray

        try:
            return ray.get(self.reward.env_calls.remote(calls))
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, RunError):
                raise err.cause from None
            raise

    def _grade_once(self, completions: list[str], rows: list[dict]):
        import ray

        try:
            return ray.get(self.reward.grade.remote(completions, rows))
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, RunError):
                raise err.cause from None
            raise

    def logprobs(self, batch: RolloutBatch, reference: bool = False):
        self.set_rollout_awake(False)
        return self.learner.logprobs(batch, reference, self.threads.learner)

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn) -> dict[str, float]:
        self.set_rollout_awake(False)
        return self.learner.train_step(batch, loss_fn, self.threads.learner, self.threads.learner_micro_threads)

    def forward_extras(self, batch: RolloutBatch, extras_fn) -> dict:
        """Per-token extras computed on the learner from the current policy's hidden states (THR)."""
        self.set_rollout_awake(False)
        return self.learner.forward_extras(batch, extras_fn, self.threads.learner)

    def sync_weights(self, version: int) -> dict[str, float]:
        """Learner → rollout workers as policy ``version``, waiting for every worker (rltrain/dist/syncer.py)."""
        self.set_rollout_awake(True)
        return self.weight_sync.sync(version)

    def publish_weights(self, version: int) -> None:
        """Offer the learner's current weights as ``version`` to the rollout thread (asynchronous pipeline)."""
        self.weight_sync.publish(version)

    def load_latest_weights(self) -> dict[str, float]:
        """Load the newest published weights into the rollout workers when newer than theirs (rollout thread)."""
        return self.weight_sync.load_latest()

    def save(self, directory: str) -> None:
        self.learner.save(directory)

    def load(self, directory: str) -> None:
        self.learner.load(directory)

    def shutdown(self) -> None:
        """Stop every actor; bounded even with dead actors or a lost cluster (kills do not wait for replies)."""
        import ray

        try:
            ray.get(self.reward.close.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - best effort: the run is over either way
            pass
        if not self.owns_ray:
            self.rollout.shutdown()
            for actor in (self.reward, *self.learner.actors()):
                ray.kill(actor)
        release(self.placement_group)
        if self.owns_ray:
            stop_ray()
