"""The pure components of a run, built from the config: sampling parameters, the loss function, the advantage
estimator and the tree sampler.

``check_components(cfg)`` builds each of them once before Ray starts (``config_rules.validate``), so a bad value fails
in seconds by the component's own check, the only copy of each rule; its ValueError is re-raised as a ConfigError
naming the config keys (``_config_error``). The trainer builds them again where they are used.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf

from rltrain import algo
from rltrain.config import ConfigError, TreeConfig, setting
from rltrain.types import RolloutBatch, SamplingParams

T = TypeVar("T")

# Constructor parameter (or registry kind, as in "unknown kl 'k9'") -> the config key it comes from.
_SAMPLING_KEYS = {name: f"rollout.{name}" for name in ("temperature", "top_p", "top_k", "max_tokens", "stop_strings")}
_EVAL_SAMPLING_KEYS = {**_SAMPLING_KEYS, "temperature": "rollout.eval_temperature"}
_LOSS_KEYS = {
    **{
        name: f"algorithm.{name}"
        for name in (
            "policy_loss",
            "loss_agg",
            "loss_agg_constant",
            "clip_low",
            "clip_high",
            "clip_c",
            "tis_cap",
            "correction",
            "correction_level",
            "mis_low",
            "mis_high",
            "decoupled_cap",
            "entropy_coef",
            "kl_coef",
            "kl_estimator",
            "thr",
        )
    },
    "agg": "algorithm.loss_agg",
    "kl": "algorithm.kl_estimator",
}
_TREE_KEYS = {f.name: f"rollout.tree.{f.name}" for f in dataclasses.fields(TreeConfig)}
_DEEPSPEED_KEYS = {
    **{
        name: f"learner.{name}"
        for name in ("zero_stage", "micro_batch_size", "world_size", "grad_clip", "offload_optimizer", "offload_params")
    },
    "dtype": "model.dtype",
}


def sampling_params(
    rc: DictConfig, stop_token_ids: tuple[int, ...] = (), *, evaluation: bool = False
) -> SamplingParams:
    """``rollout`` config -> SamplingParams for training (sampled) or evaluation (``eval_temperature``, no top-p/k)."""
    return SamplingParams(
        temperature=rc.eval_temperature if evaluation else rc.temperature,
        top_p=1.0 if evaluation else rc.top_p,
        top_k=-1 if evaluation else rc.top_k,
        max_tokens=rc.max_tokens,
        stop_token_ids=tuple(stop_token_ids),
        stop_strings=tuple(rc.stop_strings),
    )


def build_loss_fn(cfg: DictConfig):
    ac = cfg.algorithm
    return algo.make_loss_fn(
        policy_loss=ac.policy_loss,
        loss_agg=ac.loss_agg,
        loss_agg_constant=ac.loss_agg_constant if ac.loss_agg_constant is not None else cfg.rollout.max_tokens,
        clip_low=ac.clip_low,
        clip_high=ac.clip_high,
        clip_c=ac.clip_c,
        tis_cap=ac.tis_cap,
        correction=ac.correction,
        correction_level=ac.correction_level,
        mis_low=ac.mis_low,
        mis_high=ac.mis_high,
        decoupled_cap=ac.decoupled_cap,
        entropy_coef=ac.entropy_coef,
        kl_coef=0.0 if ac.kl_in_reward else ac.kl_coef,
        kl_estimator=ac.kl_estimator,
        thr=OmegaConf.to_container(ac.thr) or None,
    )


def tree_sampler_settings(tree: DictConfig) -> dict[str, Any]:
    """``rollout.tree`` -> TreeSampler keyword arguments (``align_to_kv_blocks`` is the caller's: it picks
    ``kv_block_size`` from the engine)."""
    settings = OmegaConf.to_container(tree, resolve=True)
    settings.pop("align_to_kv_blocks")
    return settings


def deepspeed_settings(cfg: DictConfig) -> dict:
    """The DeepSpeed config of one learner rank (its own checks; deepspeed itself is not imported)."""
    from rltrain.learner.deepspeed_learner import deepspeed_config

    lc = cfg.learner
    return deepspeed_config(
        zero_stage=lc.zero_stage,
        micro_batch_size=lc.micro_batch_size,
        world_size=lc.world_size,
        grad_clip=lc.grad_clip,
        dtype=cfg.model.dtype,
        offload_optimizer=lc.offload_optimizer,
        offload_params=lc.offload_params,
    )


def group_size(cfg: DictConfig) -> tuple[str, int]:
    """(config key, value) of the trajectories per prompt: ``rollout.tree.width`` for the tree sampler, else ``n``."""
    if cfg.rollout.sampler == "tree":
        return "rollout.tree.width", cfg.rollout.tree.width
    return "rollout.n", cfg.rollout.n


def check_components(cfg: DictConfig) -> None:
    """Build every pure component of ``cfg`` once; raise ConfigError naming the key of the first bad value."""
    _built(lambda: sampling_params(cfg.rollout), _SAMPLING_KEYS, cfg, "rollout")
    _built(lambda: sampling_params(cfg.rollout, evaluation=True), _EVAL_SAMPLING_KEYS, cfg, "rollout")
    _built(lambda: build_loss_fn(cfg), _LOSS_KEYS, cfg, "algorithm")
    check_advantage(cfg)
    from rltrain.learner.optim import clip_max_norm

    clip_max_norm(cfg.learner.grad_clip)  # the learners' own rule for learner.grad_clip (raises ConfigError)
    if cfg.learner.backend == "deepspeed":
        _built(lambda: deepspeed_settings(cfg), _DEEPSPEED_KEYS, cfg, "learner")
    if cfg.rollout.sampler == "tree":
        from rltrain.sampling.tree_sampler import TreeSampler

        settings = tree_sampler_settings(cfg.rollout.tree)
        try:
            _built(lambda: TreeSampler(None, **settings), _TREE_KEYS, cfg, "rollout.tree")
        except re.error as err:
            raise ConfigError(f"{setting('rollout.tree.answer_pattern', settings['answer_pattern'])}: {err}") from None


def check_advantage(cfg: DictConfig) -> None:
    """The advantage estimator exists, its groups are big enough (registry ``min_group_size``) and it accepts
    ``advantage_params``: it is run on one two-trajectory group, so its own checks see the params."""
    ac = cfg.algorithm
    try:
        needed = algo.metadata("advantage", ac.advantage).get("min_group_size", 1)
    except algo.UnknownNameError as err:
        raise ConfigError(f"{setting('algorithm.advantage', ac.advantage)}: {err}") from None
    key, size = group_size(cfg)
    if size < needed:
        raise ConfigError(
            f"{key}={size}: advantage {ac.advantage!r} compares each response with the others of its prompt, "
            f"so it needs {key} >= {needed}"
        )
    params = OmegaConf.to_container(ac.advantage_params, resolve=True)
    try:
        algo.advantages_for_batch(_probe_batch(), ac.advantage, params)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{setting('algorithm.advantage_params', params)}: {err}") from None


def _probe_batch() -> RolloutBatch:
    """One prompt group of two one-token trajectories with rewards 0 and 1."""
    ones = torch.ones(2, 1)
    return RolloutBatch(
        prompt_ids=torch.ones(2, 1, dtype=torch.long),
        prompt_mask=ones,
        response_ids=torch.ones(2, 1, dtype=torch.long),
        response_mask=ones,
        rollout_logprobs=torch.zeros(2, 1),
        group=torch.zeros(2, dtype=torch.long),
        finish_reason=torch.zeros(2, dtype=torch.long),
        policy_version=torch.zeros(2, dtype=torch.long),
        rewards=torch.tensor([0.0, 1.0]),
    )


def _built(build: Callable[[], T], keys: Mapping[str, str], cfg: DictConfig, section: str) -> T:
    """``build()``, its ValueError re-raised as ConfigError ``"<key>=<value>[, ...]: <message>"`` naming the config
    key of every constructor parameter the message mentions (``section`` when it mentions none)."""
    try:
        return build()
    except ValueError as err:
        message = str(err)
        named = sorted(
            {key for name, key in keys.items() if re.search(rf"\b{re.escape(name)}\b", message)},
            key=lambda key: _first_mention(message, keys, key),
        )
        culprits = ", ".join(setting(key, OmegaConf.select(cfg, key)) for key in named) or section
        raise ConfigError(f"{culprits}: {message}") from None


def _first_mention(message: str, keys: Mapping[str, str], key: str) -> int:
    return min(
        m.start() for name, k in keys.items() if k == key for m in re.finditer(rf"\b{re.escape(name)}\b", message)
    )
