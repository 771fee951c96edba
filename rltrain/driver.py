"""The driver: prepare (validation, data, model, SFT), start the runtime, resume, run the loop, save."""

from __future__ import annotations

import logging
import math
import os

import torch
from omegaconf import DictConfig, OmegaConf

from rltrain.prepare import prepare
from rltrain.runtime import Runtime, check_learner_checkpoint
from rltrain.trainer import Trainer

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train per ``cfg``; returns the summary (held-out accuracy before and after)."""
    from rltrain.checkpoint import latest_checkpoint, load_trainer_state, restore_rng
    from rltrain.tracking import Tracker

    torch.manual_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    prep = prepare(cfg)
    run_dir = os.path.abspath(os.path.expanduser(cfg.run.dir))
    resume_from = None
    if cfg.run.resume == "auto":
        resume_from = latest_checkpoint(run_dir)
    elif cfg.run.resume != "never":
        resume_from = cfg.run.resume
    if resume_from:
        check_learner_checkpoint(cfg, resume_from)
    total_optimizer_steps = cfg.trainer.steps * cfg.algorithm.epochs * cfg.algorithm.mini_batches
    runtime = Runtime(cfg, prep.model_path, total_optimizer_steps)
    try:
        trainer = Trainer(cfg, prep, runtime)
        start_step = 0
        summary: dict[str, float] = {}
        if resume_from:
            state = load_trainer_state(resume_from)
            runtime.load(resume_from)
            trainer.stream.load_state_dict(state["stream"])
            trainer.next_group_id = state["next_group_id"]
            summary = state.get("summary", {})
            restore_rng(state["rng"])
            start_step = state["step"]
            runtime.sync_weights(start_step)
            log.info("resumed from %s at step %d", resume_from, start_step)
        tracker = Tracker(
            run_dir,
            OmegaConf.to_container(cfg, resolve=True),
            total_steps=cfg.trainer.steps,
            start_step=start_step,
            progress=cfg.tracking.progress,
            wandb=OmegaConf.to_container(cfg.tracking.wandb),
            run_name=cfg.run.name,
        )
        return loop(cfg, trainer, tracker, run_dir, start_step, summary)
    finally:
        runtime.shutdown()


def loop(cfg: DictConfig, trainer: Trainer, tracker, run_dir: str, start_step: int, summary: dict) -> dict:
    from rltrain.checkpoint import capture_rng, save_checkpoint

    tc = cfg.trainer
    if start_step == 0 and tc.eval_before:
        summary["eval/accuracy_before"] = trainer.evaluate()["eval/accuracy"]
        tracker.log(0, {"eval/accuracy": summary["eval/accuracy_before"]})
    for step in range(start_step + 1, tc.steps + 1):
        metrics = trainer.step(step)
        if tc.eval_every and step % tc.eval_every == 0 and step != tc.steps:
            metrics.update(trainer.evaluate())
        if step == tc.steps:
            final = trainer.evaluate()
            metrics.update(final)
            summary["eval/accuracy_after"] = final["eval/accuracy"]
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            log.warning("non-finite metrics at step %d: %s", step, bad)
        tracker.log(step, metrics)
        if step % tc.save_every == 0 or step == tc.steps:
            state = {
                "step": step,
                "stream": trainer.stream.state_dict(),
                "rng": capture_rng(),
                "next_group_id": trainer.next_group_id,
                "summary": dict(summary),
            }
            save_checkpoint(run_dir, step, trainer.runtime.save, state, keep=tc.keep_checkpoints)
    tracker.finish(plots=cfg.tracking.plots)
    return summary
