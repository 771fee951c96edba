"""``rltrain-eval``: score a model directory (an HF model or an rltrain checkpoint) on ``eval.sets``.

Writes ``<eval.output_dir or run.dir>/samples.jsonl`` (every sample, appended as graded: a re-run resumes) and
``eval.json`` (per set: its settings and metrics), prints a table. An environment recipe (``env.fn`` set) scores
episodes on the held-out rows instead (rltrain.eval.episodes; eval.json and the table, no samples.jsonl).
docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os

from omegaconf import DictConfig, OmegaConf

from rltrain.eval.engines import generation
from rltrain.eval.episodes import env_eval_set, env_settings, evaluate_env_set, print_env_table
from rltrain.eval.run import (
    CHUNK_PROMPTS,
    Graders,
    SampleLog,
    build_job,
    decoder,
    evaluate_sets,
    flat_metrics,
    missing_samples,
)
from rltrain.eval.sets import parse_eval_sets

log = logging.getLogger(__name__)
TABLE_METRICS = ("pass@1", "maj@{n}", "pass@{n}", "avg@{n}", "response_len_mean", "truncated_frac")


def evaluate_model(cfg: DictConfig) -> dict:
    """Score ``model.path`` on every set of ``eval.sets`` (with ``env.fn``: episodes on ``heldout``); returns the
    eval.json report."""
    from rltrain.prepare import prepare

    specs = parse_eval_sets(cfg.eval.sets, "eval.sets")
    # An environment recipe scores episodes; a set they cannot score fails here, before anything loads.
    env_spec = env_eval_set(specs, cfg.env.fn) if cfg.env.fn is not None else None
    prep = prepare(cfg, with_sft=False)
    out_dir = os.path.expanduser(cfg.eval.output_dir or cfg.run.dir)
    os.makedirs(out_dir, exist_ok=True)
    if env_spec is not None:
        return _finish(cfg, out_dir, _evaluate_episodes(cfg, prep, env_spec), print_env_table)
    with Graders(cfg, prep.primary_reward) as graders, SampleLog(os.path.join(out_dir, "samples.jsonl")) as samples:
        jobs = [build_job(cfg, prep, spec, *graders.for_set(spec)) for spec in specs]
        todo = sum(len(indices) for job in jobs for _, indices in missing_samples(job, samples))
        total = sum(len(job.rows) * job.spec.n for job in jobs)
        log.info(
            "rltrain-eval: %d of %d samples to generate (%d already in %s)", todo, total, total - todo, samples.path
        )
        # Each worker gets about CHUNK_PROMPTS prompts per chunk; a kill loses at most the chunk in progress.
        chunk = CHUNK_PROMPTS * cfg.eval.num_workers
        with generation(cfg, prep.model_path) if todo else contextlib.nullcontext() as generate:
            with _progress(cfg, todo) as advance:
                results = evaluate_sets(jobs, samples, generate, decoder(prep.tokenizer), advance, chunk)
    report = {
        "model": prep.model_path,
        "sets": {
            job.spec.name: {"settings": _settings(job), "num_rows": len(job.rows), **results[job.spec.name]}
            for job in jobs
        },
    }
    return _finish(cfg, out_dir, report, print_table)


def _evaluate_episodes(cfg: DictConfig, prep, spec) -> dict:
    """The eval.json report of an environment recipe: one episode per held-out row (rltrain.eval.episodes), model
    turns from the eval engine, environment turns in a local EnvRunner. No samples.jsonl: episodes do not resume."""
    from rltrain.env.runner import EnvRunner, env_runner_options

    log.info("rltrain-eval: episodes through env.fn=%s on %s (samples.jsonl is not written)", cfg.env.fn, spec.name)
    with EnvRunner(**env_runner_options(cfg)) as runner, generation(cfg, prep.model_path) as generate:
        metrics, num_rows = evaluate_env_set(cfg, prep, spec, generate, runner.run)
    settings = env_settings(cfg, spec)
    return {
        "model": prep.model_path,
        "env": str(cfg.env.fn),
        "sets": {spec.name: {"settings": settings, "num_rows": num_rows, **metrics}},
    }


def _finish(cfg: DictConfig, out_dir: str, report: dict, print_report) -> dict:
    """Write eval.json, print the table, log to W&B when eval.wandb; returns the report."""
    from rltrain.fsutil import atomic_write_text

    atomic_write_text(os.path.join(out_dir, "eval.json"), json.dumps(report, indent=2) + "\n")
    print_report(report)
    if cfg.eval.wandb:
        from rltrain.tracking import log_eval_to_wandb

        results = {name: _numbers(result) for name, result in report["sets"].items()}
        wandb_options = OmegaConf.to_container(cfg.tracking.wandb, resolve=True)
        log_eval_to_wandb(wandb_options, out_dir, cfg.run.name, cfg, flat_metrics(results))
    return report


def _numbers(result: dict) -> dict[str, float]:
    return {key: value for key, value in result.items() if key not in ("settings", "num_rows")}


def _settings(job) -> dict:
    settings = dataclasses.asdict(job.spec)
    settings.update(max_tokens=job.params.max_tokens, grader=job.grader)
    return settings


@contextlib.contextmanager
def _progress(cfg: DictConfig, total: int):
    """A rich progress bar of samples generated and graded, with samples/s; yields ``advance(count)`` (None when
    tracking.progress is off or nothing is left to do)."""
    if not cfg.tracking.progress or total == 0:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class SamplesPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0.0:.1f} samples/s")

    with Progress(
        TextColumn("eval"), BarColumn(), MofNCompleteColumn(), SamplesPerSecond(), TimeRemainingColumn()
    ) as bar:
        task = bar.add_task("eval", total=total)
        yield lambda count: bar.advance(task, count)


def print_table(report: dict) -> None:
    """One row per set: prompts, n, pass@1, maj@n, pass@n, avg@n (percent), mean length, truncated %."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rltrain-eval: {report['model']}")
    for column in ("set", "prompts", "n", "pass@1", "maj@n", "pass@n", "avg@n", "len", "truncated"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for name, result in report["sets"].items():
        n = result["settings"]["n"]
        pass1, maj, passn, avg, length, truncated = (result[m.format(n=n)] for m in TABLE_METRICS)
        percents = [f"{100 * value:.1f}" for value in (pass1, maj, passn, avg)]
        table.add_row(
            name, str(int(result["num_prompts"])), str(n), *percents, f"{length:.1f}", f"{100 * truncated:.1f}%"
        )
    Console().print(table)
