"""Policy-gradient surrogates and the loss function handed to the learner.

Per-token surrogates are registered under kind ``policy_loss`` with the signature
``fn(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, clip_c) -> Surrogate`` (all [b,T]).
``make_loss_fn`` combines a surrogate, an aggregation mode (``rltrain.algo.aggregation``), optional behaviour
importance weights (TIS / MIS / decoupled PPO, ``BehaviourCorrection``), KL and entropy terms and THR reweighting
into a ``LossFn`` (rltrain/learner/base.py): it returns this micro-batch's contribution to the optimizer-step loss,
normalised by the step's global counts.

loss = agg(w_is * surrogate) + kl_coef * agg(kl(logprobs, ref_logprobs)) - entropy_coef * agg(entropy)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rltrain.algo import thr as thr_lib
from rltrain.algo.aggregation import token_mean
from rltrain.algo.registry import get, register
from rltrain.learner.base import LossNorm
from rltrain.types import RolloutBatch

_LOG_RATIO_CLAMP = 20.0  # verl: keeps exp() finite for wildly off-policy tokens
_GSPO_LOG_RATIO_MAX = 10.0  # verl gspo: clamp of the sequence log-ratio
LOGPROB_DIFF = "rollout/logprob_diff"  # mean |learner logprob - rollout logprob| over the batch's tokens


@dataclass(frozen=True)
class Surrogate:
    """Per-token loss (to minimise) and which clip branch each token took; all [b,T]."""

    loss: Tensor
    clipped: Tensor  # bool: the clip(ratio) term was the active one
    dual_clipped: Tensor  # bool: A < 0 and the dual-clip bound -A*c was active


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float, clip_c: float | None
) -> Surrogate:
    """max(-A r, -A clip(r, 1-clip_low, 1+clip_high)), and for A < 0 at most -A c (dual clip, arXiv 1912.09729)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if clip_c is None:
        return Surrogate(loss, was_clipped, torch.zeros_like(was_clipped))
    bound = -advantages * clip_c
    negative = advantages < 0
    dual = negative & (loss > bound)
    return Surrogate(torch.where(negative, torch.minimum(loss, bound), loss), was_clipped, dual)


@register("policy_loss", "ppo_clip")
def ppo_clip(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float | None = None,
) -> Surrogate:
    """PPO clip with a token ratio r = exp(logp - logp_old); decoupled clip_low / clip_high (DAPO clip-higher)."""
    ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP).exp()
    return clipped_surrogate(ratio, advantages, clip_low, clip_high, clip_c)


@register("policy_loss", "gspo")
def gspo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    clip_c: float | None = None,
) -> Surrogate:
    """GSPO-token (arXiv 2507.18071; verl ``gspo``): sequence-level, length-normalised ratio.

    log s_{i,t} = sg[mean_t (logp - logp_old)] + logp - sg[logp], clamped at 10; the value of s_{i,t} is the
    sequence ratio s_i, its gradient flows through each token (identical to GSPO when A_{i,t} = A_i).
    GSPO has no dual clip: a ``clip_c`` raises ValueError.
    """
    _refuse_dual_clip("gspo", clip_c)
    lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1)
    seq_log_ratio = ((logprobs - old_logprobs) * mask).sum(dim=-1, keepdim=True) / lengths
    log_ratio = seq_log_ratio.detach() + logprobs - logprobs.detach()
    ratio = log_ratio.clamp(max=_GSPO_LOG_RATIO_MAX).exp()
    return clipped_surrogate(ratio, advantages, clip_low, clip_high, None)


def _refuse_dual_clip(policy_loss: str, clip_c: float | None) -> None:
    if clip_c is not None:
        raise ValueError(
            f"clip_c={clip_c}: {policy_loss} has no dual clip (its sequence ratio is clipped as a whole); "
            "set algorithm.clip_c=null"
        )


CORRECTIONS = ("none", "tis", "mis", "decoupled")
CORRECTION_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class BehaviourCorrection:
    """How the loss corrects for the behaviour policy that sampled the tokens (docs/async.md#corrections).

    With w = pi_old / pi_behaviour (``old_logprobs``: the learner's proximal policy; ``rollout_logprobs``: the
    engine's, possibly an older weights version), each token's surrogate is multiplied by:
    none: 1 | tis: min(w, cap) (truncated IS) | mis: w if low <= w <= high else 0 (masked IS / token rejection,
    ICEPOP) | decoupled: w, 0 where w > cap when a cap is set (decoupled PPO, AReaL). ``level=sequence`` uses one
    w per trajectory, exp(mean_t log w_t) (the length-normalised ratio of GSPO), and keeps or drops whole rows.
    """

    kind: str = "none"
    level: str = "token"
    cap: float | None = None
    low: float = 0.5
    high: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in CORRECTIONS:
            raise ValueError(f"correction {self.kind!r}: must be one of {list(CORRECTIONS)}")
        if self.level not in CORRECTION_LEVELS:
            raise ValueError(f"correction_level {self.level!r}: must be one of {list(CORRECTION_LEVELS)}")
        if self.kind == "tis" and self.cap is None:
            raise ValueError("correction 'tis' needs tis_cap > 0, e.g. 2.0")
        if self.cap is not None and self.cap <= 0:
            raise ValueError(f"tis_cap must be > 0, got {self.cap}")
        if self.kind == "mis" and not 0 <= self.low < 1 < self.high:
            raise ValueError(f"mis bounds must satisfy 0 <= mis_low < 1 < mis_high, got [{self.low}, {self.high}]")

    def weights(self, old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token weights [b,T] (detached) and where the cap or the mask changed w [b,T] bool."""
        log_w = (old_logprobs - rollout_logprobs).detach().clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        if self.level == "sequence":
            mean = (log_w * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
            log_w = mean.expand_as(log_w)
        w = log_w.exp()
        if self.kind == "none":
            return torch.ones_like(w), torch.zeros_like(w, dtype=torch.bool)
        if self.kind == "tis":
            return w.clamp(max=self.cap), w > self.cap
        if self.kind == "mis":
            rejected = (w < self.low) | (w > self.high)
        else:
            rejected = w > self.cap if self.cap is not None else torch.zeros_like(w, dtype=torch.bool)
        return w.masked_fill(rejected, 0.0), rejected


def tis_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """Truncated importance weights min(exp(logp_old - logp_rollout), cap), detached, and where the cap bit; [b,T]."""
    return BehaviourCorrection("tis", cap=cap).weights(old_logprobs, rollout_logprobs, torch.ones_like(old_logprobs))


@dataclass(frozen=True)
class PolicyLoss:
    """The LossFn built by ``make_loss_fn``; a plain picklable value (it travels to learner actors)."""

    policy_loss: str = "ppo_clip"
    loss_agg: str = "token_mean"
    loss_agg_constant: float | None = None
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_c: float | None = None
    correction: BehaviourCorrection = field(default_factory=BehaviourCorrection)
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    thr: Mapping[str, Any] | None = None
    _surrogate_fn: Callable[..., Surrogate] = field(init=False, repr=False, compare=False)
    _agg_fn: Callable[..., Tensor] = field(init=False, repr=False, compare=False)
    _kl_fn: Callable[[Tensor, Tensor], Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # resolved here so the functions travel with the pickled loss to learner processes, where a
        # user-registered name would not be in the registry
        object.__setattr__(self, "_surrogate_fn", get("policy_loss", self.policy_loss))
        object.__setattr__(self, "_agg_fn", get("agg", self.loss_agg))
        object.__setattr__(self, "_kl_fn", get("kl", self.kl_estimator))

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0

    def __call__(
        self, logprobs: Tensor, entropy: Tensor | None, micro: RolloutBatch, norm: LossNorm
    ) -> tuple[Tensor, dict[str, float]]:
        _check_micro(logprobs, micro, need_ref=self.kl_coef != 0)
        mask = micro.response_mask

        def aggregate(values: Tensor) -> Tensor:
            return self._agg_fn(values, mask, norm, self.loss_agg_constant)

        advantages = micro.advantages
        metrics: dict[str, float] = {}
        # No separate old-logprob forward (one optimizer step over an on-policy batch): the old policy is this
        # forward's, so the ratio is exactly 1, and the rollout check is measured here.
        old_logprobs = micro.old_logprobs
        if old_logprobs is None:
            old_logprobs = logprobs.detach()
            metrics[LOGPROB_DIFF] = token_mean((old_logprobs - micro.rollout_logprobs).abs(), mask, norm).item()
        if self.thr:
            reweighted = thr_lib.reweight_from_extras(advantages, micro.extras, **self.thr)
            changed = (reweighted != advantages.expand_as(reweighted)).to(mask.dtype)
            metrics["loss/thr_reweighted_frac"] = token_mean(changed, mask, norm).item()
            advantages = reweighted
        surrogate = self._surrogate_fn(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            clip_c=self.clip_c,
        )
        per_token = surrogate.loss
        if self.correction.kind != "none":
            weights, changed = self.correction.weights(old_logprobs, micro.rollout_logprobs, mask)
            per_token = per_token * weights
            changed_key = "loss/tis_clipfrac" if self.correction.kind == "tis" else "loss/is_masked_frac"
            metrics[changed_key] = token_mean(changed.to(mask.dtype), mask, norm).item()
            metrics["loss/is_weight_mean"] = token_mean(weights, mask, norm).item()
        loss = aggregate(per_token)
        metrics["loss/policy"] = loss.item()
        metrics["loss/clipfrac"] = token_mean(surrogate.clipped.to(mask.dtype), mask, norm).item()
        metrics["loss/clipfrac_lower"] = token_mean(surrogate.dual_clipped.to(mask.dtype), mask, norm).item()
        metrics["loss/approx_kl"] = token_mean((old_logprobs - logprobs).detach(), mask, norm).item()
        if self.kl_coef != 0:
            kl = aggregate(self._kl_fn(logprobs, micro.ref_logprobs))
            loss = loss + self.kl_coef * kl
            metrics["loss/kl"] = kl.item()
        if entropy is not None:
            mean_entropy = aggregate(entropy)
            if self.entropy_coef != 0:
                loss = loss - self.entropy_coef * mean_entropy
            metrics["loss/entropy"] = mean_entropy.item()
        return loss, metrics


def _check_micro(logprobs: Tensor, micro: RolloutBatch, need_ref: bool) -> None:
    if logprobs.shape != micro.response_ids.shape:
        raise ValueError(f"logprobs shape {tuple(logprobs.shape)} != response_ids {tuple(micro.response_ids.shape)}")
    missing = ["advantages"] if micro.advantages is None else []
    if need_ref and micro.ref_logprobs is None:
        missing.append("ref_logprobs (kl_coef != 0 needs learner.use_reference=true)")
    if missing:
        raise ValueError(f"loss function: micro-batch lacks {missing}")


def make_loss_fn(
    *,
    policy_loss: str = "ppo_clip",
    loss_agg: str = "token_mean",
    loss_agg_constant: float | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float | None = None,
    tis_cap: float | None = None,
    correction: str = "auto",
    correction_level: str = "token",
    mis_low: float = 0.5,
    mis_high: float = 2.0,
    decoupled_cap: float | None = None,
    entropy_coef: float = 0.0,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    thr: Mapping[str, Any] | None = None,
) -> PolicyLoss:
    """Validate the options (unknown names, out-of-range values raise ValueError) and build the LossFn.

    ``correction``: ``BehaviourCorrection.kind``; ``auto`` is ``tis`` when ``tis_cap`` is set, else ``none``.
    ``thr``: THR token reweighting options (``rltrain.algo.thr.reweight`` keywords); empty/None disables.
    """
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if clip_c is not None and clip_c <= 1:
        raise ValueError(f"clip_c (dual clip) must be > 1, got {clip_c}")
    if policy_loss == "gspo":
        _refuse_dual_clip(policy_loss, clip_c)
    if correction == "auto":
        correction = "tis" if tis_cap is not None else "none"
    if decoupled_cap is not None and decoupled_cap <= 0:
        raise ValueError(f"decoupled_cap must be > 0, got {decoupled_cap}")
    behaviour = BehaviourCorrection(
        kind=correction,
        level=correction_level,
        cap=decoupled_cap if correction == "decoupled" else tis_cap,
        low=mis_low,
        high=mis_high,
    )
    if loss_agg == "seq_mean_token_sum_norm" and (loss_agg_constant is None or loss_agg_constant <= 0):
        raise ValueError(
            "loss_agg=seq_mean_token_sum_norm needs loss_agg_constant > 0 (Dr.GRPO's C, e.g. rollout.max_tokens), "
            f"got {loss_agg_constant}"
        )
    thr_options = dict(thr or {})
    if thr_options:
        thr_lib.check_options(thr_options)
    return PolicyLoss(
        policy_loss=policy_loss,
        loss_agg=loss_agg,
        loss_agg_constant=loss_agg_constant,
        clip_low=clip_low,
        clip_high=clip_high,
        clip_c=clip_c,
        correction=behaviour,
        entropy_coef=entropy_coef,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        thr=thr_options or None,
    )
