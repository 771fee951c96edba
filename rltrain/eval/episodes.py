"""``rltrain-eval`` on an environment recipe (``env.fn`` set): episodes through the environment, not single-turn
completions graded by ``reward.functions``.

The episodes and their metrics are the in-training evaluation's (``rltrain.env.episodes.evaluate_episodes``): one
episode per held-out row, model turns from the eval engine, environment turns in a local pool of grader processes
(``EnvRunner``, the reward actor's in training). So the numbers are the ones training logs: ``accuracy``,
``reward_mean``, ``response_len_mean``, ``num_prompts``, ``env/turns_mean``, ``env/truncated_frac``,
``env/<metric>_mean`` (``env/first_acc_mean`` ...). docs/evaluation.md, docs/environments.md.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from omegaconf import OmegaConf

from rltrain.config import ConfigError
from rltrain.eval.sets import HELDOUT, EvalSet

EVAL_PREFIX = "eval/"


def env_eval_set(specs: list[EvalSet], env_fn: str) -> EvalSet:
    """The one set an environment recipe can score: ``heldout`` (its rows carry what the environment checks),
    one greedy or sampled episode per row; its ``temperature``, ``max_tokens`` (per model turn) and ``limit``
    apply. Anything else raises ConfigError rather than scoring completions without the environment."""
    allowed = f"with env.fn={env_fn}, rltrain-eval scores one episode per held-out row: eval.sets=[heldout]"
    if len(specs) != 1 or specs[0].name != HELDOUT or specs[0].path is not None:
        names = [spec.name for spec in specs]
        raise ConfigError(f"eval.sets={names}: {allowed} (other sets need env.fn=null)")
    spec = specs[0]
    defaults = EvalSet(HELDOUT)
    for key in ("n", "top_p", "template", "reward", "split", "prompt_key", "answer_key"):
        value = getattr(spec, key)
        if value != getattr(defaults, key):
            raise ConfigError(f"eval.sets[0].{key}={value}: {allowed}, setting only temperature, max_tokens, limit")
    return spec


def evaluate_env_set(cfg: Any, prep: Any, spec: EvalSet, generate, env_calls) -> tuple[dict[str, float], int]:
    """(metrics without the ``eval/`` prefix, rows scored) of ``spec`` (from ``env_eval_set``): one episode per
    held-out row (the first ``limit``) at ``spec.temperature``, ``generate(requests, params)`` for model turns and
    ``env_calls(calls)`` for environment turns."""
    from rltrain.env.episodes import evaluate_episodes

    rows = prep.eval_rows[: spec.limit] if spec.limit else prep.eval_rows
    prompts = prep.eval_prompts[: len(rows)]
    rollout = {"eval_temperature": spec.temperature, "max_tokens": spec.max_tokens or cfg.rollout.max_tokens}
    run_cfg = OmegaConf.merge(cfg, {"rollout": rollout})
    view = SimpleNamespace(
        tokenizer=prep.tokenizer, stop_token_ids=prep.stop_token_ids, eval_rows=rows, eval_prompts=prompts
    )
    metrics = evaluate_episodes(run_cfg, view, SimpleNamespace(generate=generate, env_calls=env_calls))
    return {key.removeprefix(EVAL_PREFIX): value for key, value in metrics.items()}, len(rows)


def env_settings(cfg: Any, spec: EvalSet) -> dict:
    """eval.json's settings of an environment set: the set's, the environment and its episode limits."""
    settings = dataclasses.asdict(spec)
    settings.update(
        max_tokens=spec.max_tokens or cfg.rollout.max_tokens,
        env=str(cfg.env.fn),
        env_params=OmegaConf.to_container(cfg.env.params, resolve=True),
        max_turns=cfg.env.max_turns,
        episode_max_tokens=cfg.env.max_tokens,
    )
    return settings


def print_env_table(report: dict) -> None:
    """One row per metric of each set (accuracies in percent), named as in training's ``eval/`` keys."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rltrain-eval: {report['model']} (episodes: {report['env']})")
    for column in ("set", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for name, result in report["sets"].items():
        for key, value in result.items():
            if key in ("settings", "num_rows"):
                continue
            shown = (
                f"{100 * value:.1f}%" if key == "accuracy" or key.endswith(("acc_mean", "_frac")) else f"{value:.3g}"
            )
            table.add_row(name, f"{EVAL_PREFIX}{key}", shown)
    Console().print(table)
