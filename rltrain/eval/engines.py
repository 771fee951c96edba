"""``rltrain-eval``'s generation: one engine in this process (``eval.num_workers=1``), or N rollout-worker Ray
actors (the training run's ``RolloutGroup``, rltrain/dist/groups.py) sharing each chunk of prompts by tokens.

Both build their engine with the rollout workers' own options (``rltrain.runtime.rollout_options``), so the same
settings give the same engine. docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import signal
import threading
from collections.abc import Iterator

from omegaconf import DictConfig, OmegaConf

from rltrain.config import ConfigError
from rltrain.eval.run import Generate

log = logging.getLogger(__name__)


def resolve_engine(engine: str) -> str:
    """``auto``: vllm where it is installed, else torch."""
    if engine == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "torch"
    return engine


def engine_options(cfg: DictConfig, engine: str) -> dict:
    """A rollout worker's engine options for ``engine`` (dtype; vLLM's rollout.* settings), flat sampling."""
    from rltrain.runtime import rollout_options

    return rollout_options(OmegaConf.merge(cfg, {"rollout": {"engine": engine, "sampler": "flat"}}))


def make_generator(cfg: DictConfig, model_path: str, engine: str):
    """The in-process engine for ``model_path``; the torch engine on the GPU when there is one."""
    from rltrain.dist.actors import build_generator

    if engine == "torch":
        import torch

        from rltrain.rollout.torch_engine import TorchGenerator

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return TorchGenerator.from_pretrained(model_path, dtype=cfg.model.dtype, seed=cfg.run.seed, device=device)
    return build_generator(engine, model_path, cfg.run.seed, engine_options(cfg, engine))


@contextlib.contextmanager
def generation(cfg: DictConfig, model_path: str) -> Iterator[Generate]:
    """``generate(requests, params)`` of ``eval.engine``: in this process, or over ``eval.num_workers`` actors.
    Everything started is stopped on exit."""
    engine = resolve_engine(cfg.eval.engine)
    workers = cfg.eval.num_workers
    log.info("rltrain-eval: %s engine, %d worker%s", engine, workers, "s" if workers > 1 else "")
    if workers > 1:
        with _rollout_group(cfg, model_path, engine) as group:
            yield group.generate
        return
    generator = make_generator(cfg, model_path, engine)
    try:
        yield generator.generate
    finally:
        if hasattr(generator, "close"):
            generator.close()


@contextlib.contextmanager
def _rollout_group(cfg: DictConfig, model_path: str, engine: str):
    """``eval.num_workers`` RolloutWorker actors, each in its own bundle of a placement group (one CPU, and the
    GPUs ``gpus_per_actor`` gives the engine); a SIGTERM interrupts like Ctrl-C so that Ray is shut down."""
    import ray

    from rltrain.dist.groups import RolloutGroup, start_ray, stop_ray
    from rltrain.dist.placement import actor_options, gpus_per_actor, plan_placement, release, reserve

    workers = cfg.eval.num_workers
    owns_ray = start_ray(cfg.cluster.mode, cfg.cluster.address, cfg.cluster.num_cpus, cpus_needed=workers)
    placement_group = group = None
    with _sigterm_interrupts():
        try:
            gpus, _ = gpus_per_actor(
                ray.cluster_resources().get("GPU", 0), engine, cfg.rollout.tensor_parallel_size, "torch", 1
            )
            plan = plan_placement("disaggregated", workers, gpus, learner_ranks=1, learner_gpus=0)
            # Only the rollout workers' bundles: grading runs in this process, and there is no learner.
            plan = dataclasses.replace(plan, bundles=plan.bundles[:workers], learner=[])
            try:
                local_ray = cfg.cluster.mode == "local"
                placement_group = reserve(plan, cfg.cluster.placement_timeout_s, local_ray=local_ray)
            except RuntimeError as err:
                raise ConfigError(f"eval.num_workers={workers}: {err}") from None
            args = {"engine": engine, "model_path": model_path, "seed": cfg.run.seed}
            group = RolloutGroup(
                workers,
                worker_args={**args, "threads": cfg.cluster.omp_threads, "options": engine_options(cfg, engine)},
                placements=[actor_options(placement_group, slot) for slot in plan.rollout],
            )
            yield group
        finally:
            if group is not None:
                group.shutdown()
            release(placement_group)
            if owns_ray:
                stop_ray()


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt (Ray's own driver handler would abort, leaving its processes behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
