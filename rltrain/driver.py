"""The driver: prepare (validation, data, model, SFT), lock the run dir, check the resume point, start the
runtime, run the loop, save; stop cleanly on SIGTERM / SIGINT (rltrain/run_control.py)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from rltrain.prepare import Prepared, prepare
from rltrain.run_control import EXIT_INTERRUPTED, RunDirLock, RunStopped, StopSignals

if TYPE_CHECKING:
    from rltrain.runtime import Runtime
    from rltrain.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class ResumePoint:
    """Where a run starts: a verified checkpoint and its trainer state, or nothing (a fresh start)."""

    checkpoint: str | None = None
    state: dict[str, Any] | None = None

    @property
    def step(self) -> int:
        return self.state["step"] if self.state else 0


@dataclass
class Progress:
    """The last step the loop completed (logged), for the interruption message."""

    step: int = 0


def run(cfg: DictConfig) -> dict[str, float]:
    """Train per ``cfg``; returns the summary (held-out accuracy before and after).

    Raises ``RunStopped`` when a signal stopped the run (SIGTERM: after a checkpoint, exit code 0; SIGINT: exit
    code 130), ``ConfigError`` for a config or checkpoint that cannot run (before Ray starts), ``RunError``.
    """
    with StopSignals() as signals:
        progress = Progress()
        run_dir = os.path.abspath(os.path.expanduser(cfg.run.dir))
        try:
            return _run(cfg, run_dir, signals, progress)
        except KeyboardInterrupt:
            raise RunStopped(_interrupted_message(run_dir, progress.step), EXIT_INTERRUPTED) from None


def _run(cfg: DictConfig, run_dir: str, signals: StopSignals, progress: Progress) -> dict[str, float]:
    torch.manual_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    prep = prepare(cfg)
    # Imported after prepare()'s validation pass: a config error exits before transformers and Ray are loaded.
    from rltrain.runtime import Runtime
    from rltrain.tracking import Tracker
    from rltrain.trainer import Trainer

    with RunDirLock(run_dir):
        resume = resume_point(cfg, prep, run_dir)  # every check on the checkpoint runs before Ray starts
        progress.step = resume.step
        total_optimizer_steps = cfg.trainer.steps * cfg.algorithm.epochs * cfg.algorithm.mini_batches
        runtime = Runtime(cfg, prep.model_path, total_optimizer_steps)
        signals.install()  # after ray.init, whose SIGTERM handler would abort the driver
        with contextlib.ExitStack() as stack:
            stack.callback(runtime.shutdown)
            trainer = Trainer(cfg, prep, runtime)
            stack.callback(trainer.close)  # the rollout pipeline's thread stops before the actors do
            summary = _restore(trainer, runtime, resume)
            tracker = Tracker(
                run_dir,
                OmegaConf.to_container(cfg, resolve=True),
                total_steps=cfg.trainer.steps,
                start_step=resume.step,
                progress=cfg.tracking.progress,
                log_every_s=cfg.tracking.log_every_s,
                wandb=OmegaConf.to_container(cfg.tracking.wandb),
                run_name=cfg.run.name,
            )
            return loop(cfg, trainer, tracker, run_dir, resume.step, summary, signals=signals, progress=progress)


def run_fingerprint(cfg: DictConfig, prep: Prepared) -> dict[str, str]:
    """What a checkpoint must share with the config to be resumed: model architecture, train and eval rows,
    the algorithm's advantage / policy loss / aggregation, the learner backend and its LoRA settings (a DeepSpeed
    checkpoint's world size and ZeRO stage are checked by ``check_learner_checkpoint``)."""
    from rltrain.checkpoint import model_fingerprint, rows_fingerprint
    from rltrain.learner.lora import fingerprint as lora_fingerprint

    ac = cfg.algorithm
    return {
        **model_fingerprint(prep.model_path),
        "data.train": rows_fingerprint(prep.train_rows),
        "data.eval": rows_fingerprint(prep.eval_rows),
        "algorithm.advantage": str(ac.advantage),
        "algorithm.policy_loss": str(ac.policy_loss),
        "algorithm.loss_agg": str(ac.loss_agg),
        "learner.backend": str(cfg.learner.backend),
        "learner.lora": lora_fingerprint(cfg.learner.lora),
    }


def resume_point(cfg: DictConfig, prep: Prepared, run_dir: str) -> ResumePoint:
    """Resolve ``run.resume`` to a verified checkpoint that fits ``cfg`` (ConfigError naming what does not)."""
    from rltrain.checkpoint import check_fingerprint, load_trainer_state, resolve_resume
    from rltrain.runtime import check_learner_checkpoint

    checkpoint = resolve_resume(run_dir, cfg.run.resume)
    if checkpoint is None:
        return ResumePoint()
    state = load_trainer_state(checkpoint)
    check_fingerprint(checkpoint, state.get("fingerprint"), run_fingerprint(cfg, prep))
    check_learner_checkpoint(cfg, checkpoint)
    return ResumePoint(checkpoint, state)


def _restore(trainer: Trainer, runtime: Runtime, resume: ResumePoint) -> dict[str, float]:
    """Load the learner, loop position and RNG of the resume point into the started runtime; return the summary."""
    from rltrain.checkpoint import restore_rng

    if resume.state is None:
        return {}
    runtime.load(resume.checkpoint)
    trainer.load_state_dict(resume.state)
    restore_rng(resume.state["rng"])
    runtime.sync_weights(resume.step)
    log.info("resumed from %s at step %d", resume.checkpoint, resume.step)
    return dict(resume.state.get("summary", {}))


def loop(
    cfg: DictConfig,
    trainer: Trainer,
    tracker,
    run_dir: str,
    start_step: int,
    summary: dict,
    *,
    signals: StopSignals | None = None,
    progress: Progress | None = None,
) -> dict:
    """Steps ``start_step + 1 .. trainer.steps`` with evaluation and checkpoints; after a SIGTERM (``signals``),
    the step in progress ends with a checkpoint and ``RunStopped`` (exit code 0)."""
    tc = cfg.trainer
    progress = progress or Progress()
    fingerprint = run_fingerprint(cfg, trainer.prep)
    if start_step == 0 and tc.eval_before:
        before = trainer.evaluate()
        summary["eval/accuracy_before"] = before["eval/accuracy"]
        tracker.log(0, before)
    for step in range(start_step + 1, tc.steps + 1):
        if signals is not None and signals.stop_requested:  # before the first step: nothing new to save
            tracker.finish(plots=False)
            raise RunStopped(f"stopped by {signals.stop_requested} before step {step}; nothing to save", 0)
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
        progress.step = step
        stopping = signals is not None and signals.stop_requested
        if step % tc.save_every == 0 or step == tc.steps or stopping:
            saved = _save(trainer, run_dir, step, summary, fingerprint, tc.keep_checkpoints)
            log.info("checkpoint %s", saved)
        if stopping and step != tc.steps:
            tracker.finish(plots=False)
            raise RunStopped(f"stopped by {signals.stop_requested} after step {step}; checkpoint {saved}", 0)
    tracker.finish(plots=cfg.tracking.plots)
    return summary


def _save(trainer: Trainer, run_dir: str, step: int, summary: dict, fingerprint: dict, keep: int) -> str:
    from rltrain.checkpoint import capture_rng, save_checkpoint

    state = {
        "step": step,
        **trainer.state_dict(),
        "rng": capture_rng(),
        "summary": dict(summary),
        "fingerprint": fingerprint,
    }
    return save_checkpoint(run_dir, step, trainer.runtime.save, state, keep=keep)


def _interrupted_message(run_dir: str, last_step: int) -> str:
    from rltrain.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return f"interrupted at step {last_step + 1}; there is no complete checkpoint yet (a rerun starts over)"
    step, path = checkpoints[-1]
    return f"interrupted at step {last_step + 1}; the last complete checkpoint is {path} (step {step})"
