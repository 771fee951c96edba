"""Loss aggregation modes (verl ``agg_loss``), normalised over the whole optimizer step.

Registered under kind ``agg`` with the signature ``fn(values [b,T], mask [b,T], norm, constant) -> scalar``.
Each returns this micro-batch's *contribution*: the numerator is summed over the micro-batch rows and the
denominator uses the step's global counts (``LossNorm``), so summing the contributions of all micro-batches
(and ranks) gives exactly the full-batch value. B below is ``norm.global_seqs``, N is ``norm.global_tokens``.
Empty counts (every token masked) give a zero contribution instead of NaN.
"""

from __future__ import annotations

from torch import Tensor

from rltrain.algo.registry import register
from rltrain.learner.base import LossNorm


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum()


@register("agg", "token_mean")
def token_mean(values: Tensor, mask: Tensor, norm: LossNorm, constant: float | None = None) -> Tensor:
    """sum_{i,t} m L / N: every token weighs equally (DAPO token-level loss; verl default)."""
    return _masked_sum(values, mask) / max(norm.global_tokens, 1)


@register("agg", "seq_mean_token_mean")
def seq_mean_token_mean(values: Tensor, mask: Tensor, norm: LossNorm, constant: float | None = None) -> Tensor:
    """(1/B) sum_i [sum_t m L / |o_i|]: every sequence weighs equally (original GRPO)."""
    lengths = mask.sum(dim=-1).clamp(min=1)
    return ((values * mask).sum(dim=-1) / lengths).sum() / max(norm.global_seqs, 1)


@register("agg", "seq_mean_token_sum")
def seq_mean_token_sum(values: Tensor, mask: Tensor, norm: LossNorm, constant: float | None = None) -> Tensor:
    """(1/B) sum_i sum_t m L: sequences weighted by their length."""
    return _masked_sum(values, mask) / max(norm.global_seqs, 1)


@register("agg", "seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(values: Tensor, mask: Tensor, norm: LossNorm, constant: float | None = None) -> Tensor:
    """(1/B) sum_i sum_t m L / C with a fixed constant C (Dr.GRPO, e.g. the max response length).

    Dr.GRPO's objective (per-sequence token sum / C, mean over sequences). verl HEAD divides the batch
    sum by C only; the two differ by the constant factor B.
    """
    if constant is None or constant <= 0:
        raise ValueError(
            f"seq_mean_token_sum_norm needs a positive constant C (algorithm.loss_agg_constant), got {constant}"
        )
    return _masked_sum(values, mask) / (constant * max(norm.global_seqs, 1))
