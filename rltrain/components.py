"""The pure components of a run, built from the config: sampling parameters and the loss function.

Built once in the driver before Ray starts (so a bad value fails there, by the component's own check) and
again where they are used.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from rltrain import algo
from rltrain.types import SamplingParams


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
        entropy_coef=ac.entropy_coef,
        kl_coef=0.0 if ac.kl_in_reward else ac.kl_coef,
        kl_estimator=ac.kl_estimator,
        thr=OmegaConf.to_container(ac.thr) or None,
    )
