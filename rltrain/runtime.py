"""The actors of one run behind explicit methods: what the trainer loop calls.

Rollout workers, the reward worker and the learner are Ray actors; weights travel learner →
rollout workers through the Ray object store as one object ref (no copy through the driver).
"""

from __future__ import annotations

import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rltrain.dist.groups import RolloutGroup, TorchLearnerGroup, create_reward_worker, start_ray, stop_ray
from rltrain.learner.base import LossFn
from rltrain.types import GenRequest, GenResult, RolloutBatch, SamplingParams


def grader_options(reward_cfg: DictConfig) -> dict[str, Any]:
    return {
        "functions": OmegaConf.to_container(reward_cfg.functions, resolve=True),
        "num_workers": reward_cfg.num_workers,
        "timeout_s": reward_cfg.timeout_s,
        "memory_mb": reward_cfg.memory_mb,
        "on_error": reward_cfg.on_error,
        "batch_size": reward_cfg.batch_size,
    }


def learner_options(cfg: DictConfig, total_optimizer_steps: int) -> dict[str, Any]:
    lc = cfg.learner
    return {
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


def create_learner_group(cfg: DictConfig, model_path: str, options: dict[str, Any]):
    """The learner backend named by ``learner.backend`` behind the same group methods."""
    if cfg.learner.backend == "deepspeed":
        from rltrain.dist.deepspeed_group import DeepSpeedLearnerGroup

        return DeepSpeedLearnerGroup(cfg.learner, model_path, options, threads=cfg.cluster.omp_threads)
    return TorchLearnerGroup(cpus=1, threads=cfg.cluster.omp_threads, model_path=model_path, options=options)


def check_learner_checkpoint(cfg: DictConfig, directory: str) -> None:
    """Raise ConfigError, before any actor starts, when ``cfg.learner`` cannot resume the checkpoint ``directory``."""
    if cfg.learner.backend == "deepspeed":
        from rltrain.learner.deepspeed_learner import check_checkpoint

        check_checkpoint(directory, world_size=cfg.learner.world_size, zero_stage=cfg.learner.zero_stage)


class Runtime:
    def __init__(self, cfg: DictConfig, model_path: str, total_optimizer_steps: int):
        threads = cfg.cluster.omp_threads
        workers = cfg.rollout.num_workers
        self.owns_ray = start_ray(
            cfg.cluster.mode,
            cfg.cluster.address,
            cfg.cluster.num_cpus,
            cpus_needed=workers + 1 + cfg.learner.world_size,
        )
        self.rollout = RolloutGroup(
            workers,
            cpus=1,
            worker_args={
                "engine": cfg.rollout.engine,
                "model_path": model_path,
                "seed": cfg.run.seed,
                "threads": threads,
                "options": rollout_options(cfg),
            },
        )
        self.reward = create_reward_worker(cpus=1, threads=1, grader_options=grader_options(cfg.reward))
        self.learner = create_learner_group(cfg, model_path, learner_options(cfg, total_optimizer_steps))

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[GenResult]]:
        return self.rollout.generate(requests, params)

    def grade(self, completions: list[str], rows: list[dict]):
        import ray

        return ray.get(self.reward.grade.remote(completions, rows))

    def logprobs(self, batch: RolloutBatch, reference: bool = False):
        return self.learner.logprobs(batch, reference)

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn) -> dict[str, float]:
        return self.learner.train_step(batch, loss_fn)

    def forward_extras(self, batch: RolloutBatch, extras_fn) -> dict:
        """Per-token extras computed on the learner from the current policy's hidden states (THR)."""
        return self.learner.forward_extras(batch, extras_fn)

    def sync_weights(self, version: int) -> float:
        """Learner → rollout workers; returns seconds taken. Every worker must report ``version``."""
        start = time.time()
        weights_ref = self.learner.export_weights_ref()
        versions = self.rollout.load_weights(weights_ref, version)
        if any(v != version for v in versions):
            raise RuntimeError(f"weight sync: rollout workers report versions {versions}, expected {version}")
        return time.time() - start

    def save(self, directory: str) -> None:
        self.learner.save(directory)

    def load(self, directory: str) -> None:
        self.learner.load(directory)

    def shutdown(self) -> None:
        import ray

        try:
            ray.get(self.reward.close.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - best effort: the run is over either way
            pass
        if self.owns_ray:
            stop_ray()
        else:
            self.rollout.shutdown()
            for actor in (self.reward, *self.learner.actors()):
                ray.kill(actor)
