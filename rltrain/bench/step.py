"""Seconds per training step and its phases; with ``--peer trl``, TRL's GRPOTrainer on the same workload.

The workload (the defaults): the quickstart recipe with a random tiny Qwen2 (hidden 256, ~2.5M parameters, no
SFT), 8 prompts x 4 samples x at most 32 tokens per step, one rollout worker, run with rltrain's settings for it
(``SETTINGS``: the asynchronous pipeline one step ahead, prompts shared per group); any Hydra override after the
options changes it. Each rltrain run is the ``rltrain`` command in its own process (its own local Ray) for
``--steps`` steps; the phases come from its ``metrics.jsonl`` (``perf/*``), the first ``--warmup`` steps
skipped, median per run. The TRL peer (rltrain/bench/trl_peer.py, its own process) trains the same model
directory on the same prompts, group size, lengths, learning rate and reward functions. rltrain and TRL runs
alternate, ``--runs`` each; the report gives the median of the runs' medians and rltrain's time / TRL's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from rltrain.bench.report import emit, machine_info
from rltrain.bench.trl_peer import INSTALL_HINT, run_peer, trl_installed

# The workload: 8 prompts x 4 samples x 32 tokens, one rollout worker, a random 2.5M-parameter model.
WORKLOAD = (
    "model.tiny.hidden_size=256",
    "sft.enabled=false",
    "rollout.num_workers=1",
    "rollout.n=4",
    "rollout.max_tokens=32",
    "trainer.prompts_per_step=8",
)
# rltrain's settings for this workload (docs/benchmarks.md): the asynchronous pipeline one step ahead (importance-
# corrected, docs/async.md) and each group's prompt computed once (the same losses to float rounding, learner.md).
# ``trainer.max_staleness=0 learner.share_prefixes=false`` after the options runs the synchronous loop instead.
SETTINGS = ("trainer.max_staleness=1", "learner.share_prefixes=true")
# Nothing but steps in the timed run: no evaluation before, a tiny one after, no plots, W&B, bar or saves between.
QUIET = (
    "trainer.eval_before=false",
    "trainer.eval_every=0",
    "trainer.save_every=1000000",
    "data.num_eval=8",
    "tracking.plots=false",
    "tracking.progress=false",
    "tracking.wandb.enabled=false",
)
# (row label, metrics.jsonl key); "other" (driver work, Ray calls) is the step minus these.
PHASES = (
    ("rollout", "perf/rollout_s"),
    ("grading", "perf/grading_s"),
    ("logprobs", "perf/logprobs_s"),
    ("train", "perf/train_s"),
    ("weight sync", "perf/weight_sync_s"),
)
STEP_KEY = "perf/step_time_s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rltrain-bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="quickstart", help="the Hydra recipe (--config-name) of the rltrain runs")
    parser.add_argument("--steps", type=int, default=12, help="steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of its median")
    parser.add_argument("--runs", type=int, default=5, help="runs of each trainer, alternating")
    parser.add_argument("--peer", choices=("trl",), default=None, help="also run TRL's GRPOTrainer (rltrain[bench])")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="limit of one run")
    parser.add_argument("--json", dest="json_path", default=None, help="write the full report here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after the workload's, e.g. rollout.n=8")
    args = parser.parse_args(argv)
    for name in ("steps", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be >= 0 and < --steps")
    if args.peer == "trl" and not trl_installed():
        parser.error(INSTALL_HINT)
    return args


def phase_medians(rows: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """{phase: median seconds} over the steps after ``warmup`` of one run's metrics rows, plus ``other`` (the
    step's time outside the named phases) and ``step``. Phases a run does not log count as 0."""
    timed = [row for row in rows if row.get("step", 0) > warmup and STEP_KEY in row]
    if not timed:
        raise RuntimeError(f"no step after the first {warmup} logged {STEP_KEY}")
    medians = {label: statistics.median(row.get(key, 0.0) for row in timed) for label, key in PHASES}
    medians["other"] = statistics.median(row[STEP_KEY] - sum(row.get(key, 0.0) for _, key in PHASES) for row in timed)
    medians["step"] = statistics.median(row[STEP_KEY] for row in timed)
    return medians


def median_of_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    """{phase: median over runs} of per-run medians."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def rltrain_command(recipe: str, overrides: list[str], model_dir: str, run_dir: str, steps: int) -> list[str]:
    """The ``rltrain`` command of one timed run: the prepared model directory, SFT already applied to it."""
    return [
        sys.executable,
        "-m",
        "rltrain",
        "--config-name",
        recipe,
        *overrides,
        f"model.path={model_dir}",
        "sft.enabled=false",
        f"trainer.steps={steps}",
        f"run.dir={run_dir}",
    ]


def measure_rltrain(args: argparse.Namespace, overrides: list[str], model_dir: str) -> dict[str, float]:
    """One rltrain run in its own process; its phase medians."""
    from rltrain.tracking import read_metrics

    with tempfile.TemporaryDirectory(prefix="rltrain-bench-step-") as run_dir:
        command = rltrain_command(args.recipe, overrides, model_dir, run_dir, args.steps)
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
        if done.returncode != 0:
            command_line = " ".join(command)
            raise RuntimeError(f"rltrain run failed (exit {done.returncode}): {command_line}\n{done.stderr[-4000:]}")
        return phase_medians(read_metrics(os.path.join(run_dir, "metrics.jsonl")), args.warmup)


def prepare_workload(recipe: str, overrides: list[str]):
    """The run's config and ``Prepared`` (validated config, data, model directory, SFT if the recipe has it)."""
    from hydra import compose, initialize_config_module

    from rltrain.config import register_configs
    from rltrain.prepare import prepare

    register_configs()
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        cfg = compose(config_name=recipe, overrides=[*overrides, f"run.dir={tempfile.gettempdir()}/rltrain-bench"])
    return cfg, prepare(cfg)


def peer_spec(cfg, prep, steps: int, threads: int) -> dict[str, Any]:
    """What the TRL peer trains: rltrain's model directory, its first ``steps`` batches of training prompts (as
    text, with their rows for the reward functions), group size, lengths, learning rate, temperature, seed."""
    from omegaconf import OmegaConf

    from rltrain.data.prompts import render_prompt

    rows = prep.train_rows[: steps * cfg.trainer.prompts_per_step]
    return {
        "model_dir": prep.model_path,
        "prompts": [render_prompt(row, prep.tokenizer, cfg.data.template, cfg.data.system_prompt) for row in rows],
        "rows": [json.dumps(row, default=str) for row in rows],
        "reward_functions": OmegaConf.to_container(cfg.reward.functions, resolve=True),
        "prompts_per_step": cfg.trainer.prompts_per_step,
        "num_generations": cfg.rollout.n,
        "max_completion_length": cfg.rollout.max_tokens,
        "temperature": cfg.rollout.temperature,
        "learning_rate": cfg.learner.lr,
        "seed": cfg.run.seed,
        "steps": steps,
        "threads": threads,
    }


def trl_medians(report: dict[str, Any], warmup: int) -> dict[str, float]:
    """One TRL run's median step and ``model.generate`` seconds after ``warmup`` steps (one generate per step)."""
    return {
        "generate": statistics.median(report["generate_s"][warmup:]),
        "step": statistics.median(report["step_s"][warmup:]),
    }


def format_report(title: str, rltrain: dict[str, float], trl: dict[str, float] | None) -> str:
    """The phase table (median seconds) and, with a peer, TRL's step and the ratio."""
    lines = [title, f"  {'phase':12s} {'rltrain s':>10s}" + (f" {'TRL s':>10s}" if trl else "")]
    for label in (*(label for label, _ in PHASES), "other", "step"):
        peer = ""
        if trl and label in ("rollout", "step"):
            peer = f" {trl['generate' if label == 'rollout' else 'step']:10.3f}"
        lines.append(f"  {label:12s} {rltrain[label]:10.3f}{peer}")
    if trl:
        lines.append(f"  rltrain / TRL step time: {rltrain['step'] / trl['step']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = [*WORKLOAD, *SETTINGS, *QUIET, *args.overrides]
    cfg, prep = prepare_workload(args.recipe, overrides)
    spec = peer_spec(cfg, prep, args.steps, threads=len(os.sched_getaffinity(0))) if args.peer else None
    rltrain_runs, trl_runs, trl_reports = [], [], []
    for run in range(1, args.runs + 1):
        rltrain_runs.append(measure_rltrain(args, overrides, prep.model_path))
        line = f"run {run}/{args.runs}: rltrain {rltrain_runs[-1]['step']:.3f} s/step"
        if spec is not None:
            trl_reports.append(run_peer(spec, args.timeout_s))
            trl_runs.append(trl_medians(trl_reports[-1], args.warmup))
            line += f", TRL {trl_runs[-1]['step']:.3f} s/step"
        print(line, file=sys.stderr, flush=True)  # a long bench shows where it is
    rltrain = median_of_runs(rltrain_runs)
    trl = median_of_runs(trl_runs) if trl_runs else None
    title = (
        f"step time, {args.recipe} {' '.join([*SETTINGS, *args.overrides])}"
        + f": {args.runs} runs x {args.steps} steps (first {args.warmup} left out), median of run medians"
    )
    report = {
        "benchmark": "step",
        "args": vars(args),
        "overrides": overrides,
        "model_dir": prep.model_path,
        "machine": machine_info(),
        "rltrain": {"median": rltrain, "runs": rltrain_runs},
        "trl": None if trl is None else {"median": trl, "runs": trl_runs, "reports": trl_reports},
        "ratio": None if trl is None else rltrain["step"] / trl["step"],
    }
    return emit(format_report(title, rltrain, trl), report, args.json_path)
