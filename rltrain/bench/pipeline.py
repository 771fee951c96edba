"""Synchronous vs asynchronous training: wall time and held-out accuracy at ``trainer.max_staleness`` 0, 1, 2.

Each run is the ``rltrain`` command in its own process (its own local Ray) on the same recipe, seed and step
count; the settings alternate (0, 1, 2, 0, 1, 2, ...) so that a drifting machine load hits them alike. A run's
``wall_s`` is its training time: the sum of its steps' ``perf/step_time_s`` (evaluation, start-up and the SFT
warm start, shared by every setting, are left out; ``process_s`` has them). The default workload is
rollout-heavy (``LONG_RESPONSES``: the delethink recipe's addition chains written as one sequence of up to 72
tokens, over one vLLM rollout worker); the report says which share of a synchronous step generation took.
``--recipe quickstart`` runs the plain quickstart; Hydra overrides after the options change either.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from rltrain.bench.report import emit, machine_info

# Rollout-heavy: long responses. The delethink recipe's task (a chain of 6-12 one-digit additions whose trace writes
# every running total, 37-67 tokens) as one sequence (no environment) of up to 72 tokens, one vLLM rollout worker,
# 4 prompts x 8 samples: generation + grading is ~55-60% of a synchronous step. The warm start and learning rate are
# pinned so that the recipe's later tuning does not move these figures; at the quickstart's 2e-4 RL collapses the
# 72-token traces in every mode (docs/benchmarks.md). Time sharing is off so that every setting runs each actor on
# one thread (the overlapping settings do anyway).
LONG_RESPONSES_RECIPE = "delethink"
LONG_RESPONSES = (
    "env.fn=null",
    "rollout.max_tokens=72",
    "rollout.engine=vllm",
    "rollout.num_workers=1",
    "trainer.prompts_per_step=4",
    "trainer.steps=40",
    "trainer.eval_every=0",
    "sft.steps=200",
    "sft.lr=3e-3",
    "sft.batch_size=64",
    "learner.lr=2e-5",
    "cluster.share_cpu_threads=false",
)
QUIET = ("tracking.plots=false", "tracking.progress=false", "tracking.wandb.enabled=false", "trainer.save_every=1000")
GENERATION_KEYS = ("perf/rollout_s", "perf/grading_s")
SYNC_KEY = "perf/weight_sync_s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rltrain-bench pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipe",
        default=None,
        help="quickstart (as shipped) or another recipe; default: the long-response workload (LONG_RESPONSES)",
    )
    parser.add_argument("--staleness", default="0,1,2", help="trainer.max_staleness settings, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting, alternating")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="limit of one run")
    parser.add_argument("--json", dest="json_path", default=None, help="write the full report here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after the workload's")
    args = parser.parse_args(argv)
    try:
        args.settings = [int(k) for k in args.staleness.split(",")]
    except ValueError:
        parser.error(f"--staleness {args.staleness!r}: comma-separated integers, e.g. 0,1,2")
    if args.repeats < 1 or any(k < 0 for k in args.settings):
        parser.error("--repeats must be >= 1 and every --staleness >= 0")
    return args


def workload(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(recipe, overrides) of every run."""
    if args.recipe is None:
        return LONG_RESPONSES_RECIPE, [*LONG_RESPONSES, *QUIET, *args.overrides]
    return args.recipe, [*QUIET, *args.overrides]


def summarize_run(rows: list[dict[str, Any]], max_staleness: int, process_s: float) -> dict[str, Any]:
    """One run's figures from its metrics.jsonl rows."""
    steps = [row for row in rows if "perf/step_time_s" in row]
    evals = [row for row in rows if "eval/accuracy" in row]
    if not steps or not evals:
        raise RuntimeError("the run logged no steps or no evaluation")
    generation = sum(sum(row.get(key, 0.0) for key in GENERATION_KEYS) for row in steps)
    weight_loads = sum(row.get(SYNC_KEY, 0.0) for row in steps)
    wall = sum(row["perf/step_time_s"] for row in steps)
    return {
        "max_staleness": max_staleness,
        "wall_s": wall,
        "process_s": process_s,
        "steps": len(steps),
        "eval_accuracy_before": evals[0]["eval/accuracy"] if evals[0]["step"] == 0 else None,
        "eval_accuracy_after": evals[-1]["eval/accuracy"],
        "tokens_generated": int(sum(row.get("rollout/decoded", 0.0) for row in steps)),
        "generation_share": generation / wall if wall else 0.0,
        "rollout_side_share": (generation + weight_loads) / wall if wall else 0.0,
        "buffer_wait_s": sum(row.get("perf/buffer_wait_s", 0.0) for row in steps),
        "staleness_mean": statistics.mean(row.get("rollout/staleness_mean", 0.0) for row in steps),
        "stale_dropped": sum(row.get("rollout/stale_dropped", 0.0) for row in steps),
    }


def run_once(recipe: str, overrides: list[str], max_staleness: int, timeout_s: float) -> dict[str, Any]:
    from rltrain.tracking import read_metrics

    with tempfile.TemporaryDirectory(prefix="rltrain-bench-pipeline-") as run_dir:
        command = [
            sys.executable, "-m", "rltrain", "--config-name", recipe, *overrides,
            f"trainer.max_staleness={max_staleness}", f"run.dir={run_dir}",
        ]  # fmt: skip
        start = time.time()
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            command_line = " ".join(command)
            raise RuntimeError(f"rltrain run failed (exit {done.returncode}): {command_line}\n{done.stderr[-4000:]}")
        return summarize_run(read_metrics(os.path.join(run_dir, "metrics.jsonl")), max_staleness, time.time() - start)


def medians(runs: list[dict[str, Any]], settings: list[int]) -> list[dict[str, Any]]:
    """Per setting: the median of each numeric figure over its runs."""
    table = []
    for k in settings:
        mine = [run for run in runs if run["max_staleness"] == k]
        row = {"max_staleness": k, "runs": len(mine)}
        keys = ("wall_s", "eval_accuracy_after", "generation_share", "rollout_side_share", "buffer_wait_s")
        for key in (*keys, "tokens_generated"):
            row[key] = statistics.median(run[key] for run in mine)
        table.append(row)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe, overrides = workload(args)
    runs = []
    for repeat in range(args.repeats):
        for k in args.settings:
            print(f"run {repeat + 1}/{args.repeats}, max_staleness={k} ...", flush=True)
            runs.append(run_once(recipe, overrides, k, args.timeout_s))
    table = medians(runs, args.settings)
    base = next((row for row in table if row["max_staleness"] == 0), table[0])
    lines = [
        f"pipeline: {recipe} {' '.join(overrides)}",
        f"median of {args.repeats} alternating runs per setting; wall = training time (sum of step times)",
        f"{'k':>3} {'wall s':>8} {'x sync':>7} {'held-out after':>15} {'gen share':>10} {'buffer wait s':>14}",
    ]
    for row in table:
        lines.append(
            f"{row['max_staleness']:>3} {row['wall_s']:8.1f} {row['wall_s'] / base['wall_s']:7.2f} "
            f"{100 * row['eval_accuracy_after']:14.1f}% {100 * row['generation_share']:9.0f}% "
            f"{row['buffer_wait_s']:14.1f}"
        )
    sync_share = base["generation_share"]
    lines.append(
        f"generation share of a synchronous step: {100 * sync_share:.0f}% (rollout + grading / step time), "
        f"{100 * base['rollout_side_share']:.0f}% with the rollout workers' weight loading"
    )
    report = {
        "benchmark": "pipeline",
        "recipe": recipe,
        "overrides": overrides,
        "args": {k: v for k, v in vars(args).items() if k != "settings"},
        "machine": machine_info(),
        "runs": runs,
        "medians": table,
    }
    return emit("\n".join(lines), report, args.json_path)
