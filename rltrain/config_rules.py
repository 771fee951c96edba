"""The value rules of ``config.validate``: allowed choices and numeric ranges of the keys no component checks.

A component that checks its own inputs (rltrain.components builds the sampling params, the loss, the advantage
estimator, the tree sampler, the DeepSpeed config, the gradient clip) is the one place of its rules; these tables
hold the rest, one entry per key.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CHOICES = {
    "rollout.engine": ("torch", "vllm", "auto"),
    "rollout.sampler": ("flat", "tree"),
    "learner.backend": ("torch", "deepspeed"),
    "learner.lr_schedule": ("constant", "cosine", "linear"),
    "data.task": ("arithmetic", "countdown", "calculator", "countdown_retry", "jsonl", "parquet", "hf"),
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
