"""Console scripts: ``rltrain`` (train), ``rltrain-sft`` (warm start), ``rltrain-eval`` (score a model).

All three are Hydra apps over the recipes in ``recipes/``:
``rltrain --config-name quickstart key=value ...``; ``--cfg job`` prints the composed config.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from rltrain.config import ConfigError, register_configs
from rltrain.errors import RunError
from rltrain.run_control import EXIT_INTERRUPTED, RunStopped

register_configs()
log = logging.getLogger("rltrain")
RECIPES = "pkg://recipes"


def _setup_env() -> None:
    # No hub is reachable on laptops/CI; a hub name still works where HF_HUB_OFFLINE is unset by the user.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _run_guarded(fn, cfg: DictConfig) -> None:
    """Turn user errors into one clear line and exit code 2, instead of a traceback."""
    try:
        fn(cfg)
    except ConfigError as err:
        print(f"rltrain: config error: {err}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as err:
        print(f"rltrain: {err}", file=sys.stderr)
        sys.exit(2)
    except RunError as err:
        print(f"rltrain: error: {err}", file=sys.stderr)
        sys.exit(1)
    except RunStopped as err:
        print(f"rltrain: {err}; resume with: {resume_command(cfg)}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("rltrain: interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


def resume_command(cfg: DictConfig) -> str:
    """The command that resumes this run: this one's config name and overrides, the absolute run dir, resume=auto."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = os.path.abspath(os.path.expanduser(cfg.run.dir))
    words = ["rltrain"]
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        kept = [o for o in hydra_cfg.overrides.task if not o.startswith(("run.dir=", "run.resume="))]
        words += ["--config-name", hydra_cfg.job.config_name, *kept]
    return shlex.join([*words, f"run.dir={run_dir}", "run.resume=auto"])


def _train(cfg: DictConfig) -> None:
    from rltrain.driver import run

    summary = run(cfg)
    print_summary(cfg, summary)


def print_summary(cfg: DictConfig, summary: dict) -> None:
    before, after = summary.get("eval/accuracy_before"), summary.get("eval/accuracy_after")
    lines = [f"run dir: {os.path.abspath(os.path.expanduser(cfg.run.dir))}"]
    label = _accuracy_label(cfg)
    if before is not None:
        lines.append(f"{label} before RL (SFT base): {100 * before:.1f}%")
    if after is not None:
        lines.append(f"{label} after RL (policy):    {100 * after:.1f}%")
    if before is not None and after is not None:
        lines.append(f"change: {100 * (after - before):+.1f} points (seed {cfg.run.seed})")
    print("\n".join(lines), flush=True)


def _accuracy_label(cfg: DictConfig) -> str:
    """What ``eval/accuracy`` measured: greedy held-out pass@1 by default, else pass@1 of the set it comes from."""
    from rltrain.eval.sets import HELDOUT, parse_eval_sets

    names = [spec.name for spec in parse_eval_sets(cfg.trainer.eval_sets, "trainer.eval_sets")]
    if not names:
        return "held-out pass@1 (greedy)"
    return "held-out pass@1" if HELDOUT in names else f"{names[0]} pass@1"


def _sft(cfg: DictConfig) -> None:
    from rltrain.prepare import prepare

    if not cfg.sft.enabled:
        cfg = OmegaConf.merge(cfg, {"sft": {"enabled": True}})
    prep = prepare(cfg)
    print(f"SFT model: {prep.model_path}", flush=True)


def _eval(cfg: DictConfig) -> None:
    """``model.path`` (an HF model dir or a checkpoint) on ``eval.sets``: a table, eval.json and samples.jsonl in
    ``eval.output_dir`` (default run.dir); a re-run resumes from samples.jsonl (rltrain.eval.cli)."""
    from rltrain.eval.cli import evaluate_model

    evaluate_model(cfg)


@hydra.main(config_path=RECIPES, config_name="quickstart", version_base="1.3")
def _train_app(cfg: DictConfig) -> None:
    _run_guarded(_train, cfg)


@hydra.main(config_path=RECIPES, config_name="quickstart", version_base="1.3")
def _sft_app(cfg: DictConfig) -> None:
    _run_guarded(_sft, cfg)


@hydra.main(config_path=RECIPES, config_name="quickstart", version_base="1.3")
def _eval_app(cfg: DictConfig) -> None:
    _run_guarded(_eval, cfg)


def train_main() -> None:
    _setup_env()
    _train_app()


def sft_main() -> None:
    _setup_env()
    _sft_app()


def eval_main() -> None:
    _setup_env()
    _eval_app()
