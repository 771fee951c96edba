"""KL estimators (Schulman, "Approximating KL divergence"; verl ``kl_penalty``) and the reward-folded KL.

Registered under kind ``kl`` with the signature ``fn(logprobs, ref_logprobs) -> Tensor`` (elementwise,
same shape as the inputs). With delta = logprobs - ref_logprobs on tokens sampled from the policy:

- ``k1``: delta (unbiased, high variance, can be negative)
- ``k2``: delta^2 / 2 (its gradient is the KL gradient on-policy)
- ``k3``: exp(-delta) + delta - 1 (unbiased, >= 0, low variance; DeepSeekMath / verl ``low_var_kl``;
  -delta clamped to [-20, 20] before exp and the result to [-10, 10], as verl)
- ``k1+`` / ``k3+``: the forward value of k1 / k3 with the gradient of k2 (straight-through
  ``k2 - sg[k2] + sg[k]``), for an unbiased KL gradient when KL is a loss term.
"""

from __future__ import annotations

from torch import Tensor

from rltrain.algo.registry import get, register
from rltrain.types import RolloutBatch


@register("kl", "k1")
def k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """delta = log pi - log pi_ref; [...] -> [...]."""
    return logprobs - ref_logprobs


@register("kl", "k2")
def k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """delta^2 / 2; [...] -> [...]."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@register("kl", "k3")
def k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """exp(-delta) + delta - 1 with verl's clamps; [...] -> [...]."""
    neg_delta = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (neg_delta.exp() - neg_delta - 1.0).clamp(-10.0, 10.0)


def _straight_through(value: Tensor, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    grad_carrier = k2(logprobs, ref_logprobs)
    return grad_carrier - grad_carrier.detach() + value.detach()


@register("kl", "k1+")
def k1_plus(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Value of k1, gradient of k2; [...] -> [...]."""
    return _straight_through(k1(logprobs, ref_logprobs), logprobs, ref_logprobs)


@register("kl", "k3+")
def k3_plus(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Value of k3, gradient of k2; [...] -> [...]."""
    return _straight_through(k3(logprobs, ref_logprobs), logprobs, ref_logprobs)


def kl_token_penalty(batch: RolloutBatch, coef: float, estimator: str = "k1") -> Tensor:
    """Per-token KL penalty [B,T] = coef * mask * kl(old_logprobs, ref_logprobs), no grad.

    The token-level rewards of KL-in-reward (``algorithm.kl_in_reward``; verl ``apply_kl_penalty``) are
    ``-kl_token_penalty`` at every response token plus the outcome reward at the last one.
    """
    if batch.old_logprobs is None or batch.ref_logprobs is None:
        raise ValueError("the KL penalty needs batch.old_logprobs and batch.ref_logprobs (learner.use_reference=true)")
    per_token = get("kl", estimator)(batch.old_logprobs.detach(), batch.ref_logprobs.detach())
    return coef * per_token * batch.response_mask


def kl_reward_penalty(batch: RolloutBatch, coef: float, estimator: str = "k1") -> Tensor:
    """Per-trajectory KL penalty [B] = coef * sum_t mask * kl(old_logprobs, ref_logprobs), no grad.

    The sequence sum of ``kl_token_penalty``: what a sequence-level estimator (GRPO, RLOO, ...) subtracts
    from the outcome reward under KL-in-reward, as verl sums its token-level rewards into one score.
    """
    return kl_token_penalty(batch, coef, estimator).sum(dim=1)
