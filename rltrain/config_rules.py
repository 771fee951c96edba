"""The validation pass (``validate``) and its value rules: allowed choices and numeric ranges of the keys no
component checks, and the cross-key rules.

A component that checks its own inputs (rltrain.components builds the sampling params, the loss, the advantage
estimator, the tree sampler, the DeepSpeed config, the gradient clip) is the one place of its rules; these tables
hold the rest, one entry per key.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rltrain.config import ConfigError, setting

CHOICES = {
    "rollout.engine": ("torch", "vllm", "auto"),
    "rollout.sampler": ("flat", "tree"),
    "learner.backend": ("torch", "deepspeed"),
    "learner.lr_schedule": ("constant", "cosine", "linear"),
    "data.task": (
        "arithmetic",
        "countdown",
        "calculator",
        "countdown_retry",
        "addition_chain",
        "jsonl",
        "parquet",
        "hf",
    ),
    "data.template": ("plain", "chat"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "cluster.mode": ("local", "address"),
    "cluster.placement": ("disaggregated", "colocated"),
    "rollout.weight_sync": ("auto", "object_store", "collective"),
    "tracking.wandb.mode": ("auto", "online", "offline", "disabled"),
    "algorithm.filter_metric": ("score", "acc"),
    "trainer.on_nonfinite": ("skip", "stop"),
    "eval.engine": ("auto", "torch", "vllm"),
}
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
MIN_TINY_VOCAB = 259  # a byte-level BPE: 256 byte tokens + 3 special tokens (rltrain.models)


@dataclass(frozen=True)
class Rule:
    """A range rule of one numeric key: ``allowed`` says it in words, ``test(value)`` decides it."""

    allowed: str
    test: Callable[[Any], bool]

    def holds(self, value: Any) -> bool:
        numbers = value if isinstance(value, list | tuple) else [value]
        return all(isinstance(x, int | float) and math.isfinite(x) for x in numbers) and self.test(value)


def _at_least(low: float) -> Rule:
    return Rule(f"must be >= {low}", lambda v: v >= low)


def _above(low: float) -> Rule:
    return Rule(f"must be > {low}", lambda v: v > low)


def _optional(rule: Rule) -> Rule:
    return Rule(f"{rule.allowed} (or null)", rule.test)


_POSITIVE, _COUNT, _NON_NEGATIVE = _above(0), _at_least(1), _at_least(0)
_FINITE = Rule("must be a finite number", lambda v: True)
_TINY_DIMS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_position_embeddings")

# Every numeric key without a component that checks it (rltrain.components builds the sampling params, the loss,
# the advantage estimator and the tree sampler, which check the rest). Keys under a prefix of _WHEN are checked
# only when that part of the config is used. Every number must also be finite.
RULES: dict[str, Rule] = {
    "run.seed": _NON_NEGATIVE,
    **{f"model.tiny.{name}": _COUNT for name in _TINY_DIMS},
    "model.tiny.vocab_size": Rule(
        f"must be >= {MIN_TINY_VOCAB} (256 bytes + 3 special tokens)", lambda v: v >= MIN_TINY_VOCAB
    ),
    "model.tiny.seed": _NON_NEGATIVE,
    "data.num_train": _COUNT,
    "data.num_eval": _COUNT,
    "data.seed": _NON_NEGATIVE,
    "data.max_prompt_tokens": _COUNT,
    "rollout.num_workers": _COUNT,
    "rollout.n": _COUNT,
    "rollout.tensor_parallel_size": _COUNT,
    "rollout.gpu_memory_utilization": Rule("must be in (0, 1]", lambda v: 0 < v <= 1),
    "rollout.vllm_block_size": _optional(_COUNT),
    "rollout.logprob_diff_warn": _POSITIVE,
    "rollout.logprob_diff_error": _POSITIVE,
    "rollout.weight_sync_bucket_mb": _COUNT,
    "rollout.weight_sync_timeout_s": _POSITIVE,
    "algorithm.entropy_coef": _FINITE,
    "algorithm.kl_coef": _NON_NEGATIVE,
    "algorithm.overlong_buffer": _NON_NEGATIVE,
    "algorithm.overlong_penalty": _NON_NEGATIVE,
    "algorithm.epochs": _COUNT,
    "algorithm.mini_batches": _COUNT,
    "learner.lr": _POSITIVE,
    "learner.betas": Rule("must be two numbers in [0, 1)", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)),
    "learner.weight_decay": _NON_NEGATIVE,
    "learner.adam_eps": _POSITIVE,
    "learner.warmup_steps": _NON_NEGATIVE,
    "learner.micro_batch_size": _COUNT,
    "learner.max_tokens_per_micro_batch": _optional(_COUNT),
    "learner.world_size": _COUNT,
    "learner.export_bucket_mb": _COUNT,
    "learner.lora.rank": Rule("must be >= 0 (0: no LoRA, full fine-tune)", lambda v: v >= 0),
    "learner.lora.alpha": _POSITIVE,
    "learner.lora.dropout": Rule("must be in [0, 1)", lambda v: 0 <= v < 1),
    "trainer.steps": _COUNT,
    "trainer.max_staleness": Rule("must be >= 0 (0: synchronous, on-policy)", lambda v: v >= 0),
    "rollout.partial_chunk_tokens": _COUNT,
    "trainer.prompts_per_step": _COUNT,
    "trainer.eval_every": Rule("must be >= 0 (0: evaluate before and after training only)", lambda v: v >= 0),
    "trainer.save_every": _COUNT,
    "trainer.keep_checkpoints": _COUNT,
    "sft.steps": _COUNT,
    "sft.batch_size": _COUNT,
    "sft.lr": _POSITIVE,
    "sft.warmup_steps": _NON_NEGATIVE,
    "cluster.num_cpus": _optional(_COUNT),
    "cluster.num_gpus": _NON_NEGATIVE,
    "cluster.omp_threads": _COUNT,
    "cluster.placement_timeout_s": _POSITIVE,
    "tracking.log_every_s": _NON_NEGATIVE,
    "eval.num_workers": _COUNT,
    "env.max_turns": _COUNT,
    "env.max_tokens": _COUNT,
    "env.max_observation_chars": _COUNT,
}


_WHEN = {"sft.": lambda cfg: cfg.sft.enabled, "model.tiny.": lambda cfg: cfg.model.path == "tiny"}


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def _is_used(cfg: DictConfig, key: str) -> bool:
    return all(used(cfg) for prefix, used in _WHEN.items() if key.startswith(prefix))


def validate(cfg: DictConfig) -> None:
    """The one validation pass before anything starts: choices, ranges, paths and cross-key rules here, then
    the run's pure components built once (``rltrain.components.check_components``), each by its own checks.

    Raises ConfigError ``"<key>=<value>: <what is allowed>"``. Cheap: no model, no Ray, no data.
    """
    from rltrain.components import check_components

    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{setting(key, value)}: must be one of {list(choices)}")
    for key, rule in RULES.items():
        value = _get(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if value is not None and _is_used(cfg, key) and not rule.holds(value):
            raise ConfigError(f"{setting(key, value)}: {rule.allowed}")
    _validate_data(cfg.data)
    _validate_model(cfg.model, cfg.rollout.engine)
    _validate_algorithm(cfg)
    _validate_placement(cfg)
    _validate_packing(cfg)
    _validate_async(cfg)
    _validate_lora(cfg.learner.lora)
    _validate_eval_sets(cfg)
    _validate_env(cfg)
    if not cfg.reward.functions:
        raise ConfigError("reward.functions=[]: name at least one grader, e.g. [{fn: math, weight: 1.0}]")
    if cfg.rollout.logprob_diff_warn > cfg.rollout.logprob_diff_error:
        raise ConfigError(
            f"{setting('rollout.logprob_diff_warn', cfg.rollout.logprob_diff_warn)}: must be <= "
            f"rollout.logprob_diff_error={cfg.rollout.logprob_diff_error}"
        )
    if cfg.cluster.mode == "local" and cfg.cluster.address is not None:
        raise ConfigError(f"{setting('cluster.address', cfg.cluster.address)}: needs cluster.mode=address")
    check_components(cfg)


def _validate_env(cfg: DictConfig) -> None:
    from rltrain.env.resolve import check_env_config

    check_env_config(cfg.env, cfg.rollout.sampler)
    if cfg.env.fn is not None and cfg.trainer.eval_sets:
        key = setting("trainer.eval_sets", OmegaConf.to_container(cfg.trainer.eval_sets))
        raise ConfigError(
            f"{key}: with env.fn set, evaluation is one greedy episode per held-out row through the environment "
            "(docs/environments.md); eval sets are scored single-turn, so leave trainer.eval_sets empty"
        )


def _validate_eval_sets(cfg: DictConfig) -> None:
    from rltrain.eval.sets import parse_eval_sets

    parse_eval_sets(cfg.trainer.eval_sets, "trainer.eval_sets")
    parse_eval_sets(cfg.eval.sets, "eval.sets")


def _validate_packing(cfg: DictConfig) -> None:
    budget = cfg.learner.max_tokens_per_micro_batch
    if budget is None:
        return
    key = setting("learner.max_tokens_per_micro_batch", budget)
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_tokens
    if budget < longest:
        raise ConfigError(
            f"{key}: must hold the longest sequence, data.max_prompt_tokens={cfg.data.max_prompt_tokens} + "
            f"rollout.max_tokens={cfg.rollout.max_tokens} = {longest}"
        )


def _validate_lora(lora: DictConfig) -> None:
    if lora.rank > 0 and (not lora.target_modules or not all(lora.target_modules)):
        raise ConfigError(
            f"{setting('learner.lora.target_modules', lora.target_modules)}: name at least one module (non-empty "
            "names), e.g. [q_proj, v_proj]"
        )


def _validate_async(cfg: DictConfig) -> None:
    staleness, rc = cfg.trainer.max_staleness, cfg.rollout
    if staleness == 0:
        if rc.partial:
            raise ConfigError(
                "rollout.partial=True: loads weights during generation, so it needs trainer.max_staleness >= 1"
            )
        return
    key = setting("trainer.max_staleness", staleness)
    if rc.weight_sync == "collective":
        raise ConfigError(
            f"{key}: the pipeline loads published weights while the learner trains on, which a broadcast (it needs the "
            "learner's rank) cannot do; use rollout.weight_sync=object_store or auto"
        )
    if cfg.cluster.placement == "colocated" and cfg.cluster.num_gpus > 0:
        raise ConfigError(
            f"{key}: colocated engines sleep while the learner uses their GPU, so nothing overlaps; use "
            "cluster.placement=disaggregated or trainer.max_staleness=0"
        )
    if rc.partial and rc.sampler == "tree":
        raise ConfigError("rollout.partial=True: flat sampler only (a tree's segments already end between calls)")


def _validate_placement(cfg: DictConfig) -> None:
    rc = cfg.rollout
    if rc.weight_sync == "collective" and rc.tensor_parallel_size != 1:
        raise ConfigError(
            "rollout.weight_sync=collective: loads weights in the rollout actor's process, but a tensor-parallel "
            f"engine (rollout.tensor_parallel_size={rc.tensor_parallel_size}) holds them in its own workers; "
            "use rollout.weight_sync=object_store"
        )
    if cfg.cluster.placement != "colocated":
        return
    if rc.num_workers != cfg.learner.world_size:
        raise ConfigError(
            f"rollout.num_workers={rc.num_workers}: cluster.placement=colocated pairs rollout worker i with learner "
            f"rank i, so it must equal learner.world_size={cfg.learner.world_size}"
        )
    if rc.tensor_parallel_size != 1:
        raise ConfigError(
            f"rollout.tensor_parallel_size={rc.tensor_parallel_size}: must be 1 with cluster.placement=colocated "
            "(one device per learner rank)"
        )
    if rc.weight_sync == "collective":
        raise ConfigError(
            "rollout.weight_sync=collective: needs learner and rollout on different devices (NCCL cannot connect "
            "two processes on one GPU); with cluster.placement=colocated use weight_sync=auto or object_store"
        )


def _validate_data(data: DictConfig) -> None:
    if data.task in ("jsonl", "parquet"):
        if not data.path:
            raise ConfigError(f"data.path=None: a file is required for data.task={data.task}")
        if not os.path.isfile(os.path.expanduser(data.path)):
            raise ConfigError(f"{setting('data.path', data.path)}: no such file")
    elif data.path is not None and data.task != "hf":
        raise ConfigError(
            f"{setting('data.path', data.path)}: set, but data.task={data.task!r} is procedural; "
            "use data.task=jsonl|parquet|hf to load a dataset"
        )


def _validate_model(model: DictConfig, engine: str) -> None:
    path = model.path
    if path != "tiny":
        looks_local = path.startswith(("/", ".", "~"))
        expanded = os.path.expanduser(path)
        if os.path.exists(expanded) and not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ConfigError(f"{setting('model.path', path)}: exists but has no config.json (not an HF model dir)")
        if looks_local and not os.path.exists(expanded):
            raise ConfigError(f"{setting('model.path', path)}: no such directory")
        return
    tiny = model.tiny
    if tiny.hidden_size % tiny.num_heads:
        raise ConfigError(
            f"model.tiny.num_heads={tiny.num_heads}: must divide model.tiny.hidden_size={tiny.hidden_size}"
        )
    if tiny.num_heads % tiny.num_kv_heads:
        raise ConfigError(
            f"model.tiny.num_heads={tiny.num_heads}: must be divisible by num_kv_heads={tiny.num_kv_heads}"
        )
    head_dim = tiny.hidden_size // tiny.num_heads
    if engine in ("vllm", "auto") and head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ConfigError(
            f"model.tiny.num_heads={tiny.num_heads}: head size hidden_size/num_heads={head_dim} is not supported by "
            f"vLLM's CPU attention (supported: {list(VLLM_CPU_HEAD_SIZES)}); change num_heads or hidden_size"
        )


def _validate_algorithm(cfg: DictConfig) -> None:
    algo = cfg.algorithm
    if algo.overlong_buffer > cfg.rollout.max_tokens:
        raise ConfigError(
            f"algorithm.overlong_buffer={algo.overlong_buffer}: must be <= rollout.max_tokens={cfg.rollout.max_tokens}"
        )
    if algo.kl_coef > 0 and not cfg.learner.use_reference:
        raise ConfigError(
            f"algorithm.kl_coef={algo.kl_coef}: KL needs a reference model; set learner.use_reference=true"
        )
    if algo.thr and cfg.learner.backend != "torch":
        raise ConfigError(
            f"{setting('algorithm.thr', algo.thr)}: needs the old policy's hidden states, computed by "
            f"learner.backend=torch only (got learner.backend={cfg.learner.backend})"
        )
