"""THR — Token Hidden Reward token reweighting for GRPO (arXiv 2510.03669; docs/algorithms.md).

RECONSTRUCTED: the THR paper body was not available. The influence term follows the NTHR paper (same
authors, exact); the THR score, its threshold and the reweighting form are a reconstruction from the THR
abstract and reviews (docs/algorithms.md). Check §3-4 of arXiv 2510.03669 before relying on the exact
normalisation.

For token k of response i (old policy): final hidden state h_{i,k} [H], prediction error
g_{i,k} = onehot(o_{i,k}) - pi_old(.|q, o_{i,<k}) [V]. With P_g = responses of i's group with advantage > 0:

    s_{i,k}   = sum_{j in P_g} w_j sum_{k'} <g_{i,k}, g_{j,k'}> <h_{i,k}, h_{j,k'}>   (w_j = 1/|o_j| if length_norm)
    THR_{i,k} = A_i * s_{i,k}                      > 0: the update raises the likelihood of correct responses
    anchor_g  = min_{i in P_g} mean_k s_{i,k}      (NTHR's positive self-influence anchor; +inf without P_g)
    A_{i,k}   = A_i * (1 + p * sign(THR_{i,k}))  if |THR_{i,k}| > beta * anchor_g
              = A_i (mode "reweight") or 0 (mode "only")  otherwise

p > 0 favours exploitation (Pass@1), p < 0 exploration (Pass@K). Efficient form (NTHR): per group
M_g = sum_{P_g} w g h^T [V,H], then s = g^T M_g h = (M_g h)[o] - <pi, M_g h>. ``probs`` may be restricted to
a vocabulary subset (e.g. the tokens that occur in the group, as NTHR does) with ``token_index`` pointing into
it; memory is O(tokens_in_group * V).

The trainer computes the scores once per rollout batch from the old policy's forward on the learner
(``learner.forward_extras(batch, thr_extras_from_forward)``, probabilities restricted to the tokens that
occur in the batch) and stores them in ``batch.extras``; the loss (``make_loss_fn(thr={...})``) reads them
per micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

THR_SCORE_KEY = "thr/score"  # [B,T] THR_{i,k}, 0 on masked tokens
THR_ANCHOR_KEY = "thr/anchor"  # [B] anchor_g of each row's group
_OPTIONS = {"p", "beta", "mode"}
_MODES = ("reweight", "only")


def _token_scalars(advantages: Tensor, mask: Tensor) -> Tensor:
    """Advantages [B] or token advantages [B,T] (constant per row) -> [B]."""
    if advantages.dim() == 1:
        return advantages
    return (advantages * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def token_hidden_reward(
    hidden: Tensor,
    probs: Tensor,
    token_index: Tensor,
    mask: Tensor,
    advantages: Tensor,
    group: Tensor,
    *,
    length_norm: bool = True,
) -> tuple[Tensor, Tensor]:
    """THR scores and group anchors (see module docstring), computed without grad.

    hidden [B,T,H] final hidden states predicting each response token; probs [B,T,V] old-policy next-token
    probabilities; token_index [B,T] long, column of the sampled token in ``probs``; mask [B,T];
    advantages [B] or [B,T]; group [B] long. Returns (thr [B,T], anchor [B]).
    """
    b, t = mask.shape
    if hidden.shape[:2] != (b, t) or probs.shape[:2] != (b, t) or token_index.shape != (b, t):
        raise ValueError(
            f"THR inputs disagree: hidden {tuple(hidden.shape)}, probs {tuple(probs.shape)}, "
            f"token_index {tuple(token_index.shape)}, mask {tuple(mask.shape)}"
        )
    with torch.no_grad():
        work = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # NTHR: accumulate in fp32
        hidden, probs, mask = hidden.to(work), probs.to(work), mask.to(work)
        scalar = _token_scalars(advantages.to(work), mask)
        lengths = mask.sum(dim=1).clamp(min=1)
        row_weight = 1.0 / lengths if length_norm else torch.ones_like(lengths)
        influence = torch.zeros(b, t, dtype=work)
        anchor = torch.full((b,), torch.inf, dtype=work)
        for g in torch.unique(group).tolist():  # one matmul pair per prompt group
            rows = torch.nonzero(group == g).flatten()
            positive = rows[scalar[rows] > 0]
            if len(positive) == 0:
                continue
            w = (row_weight[positive, None] * mask[positive])[..., None]  # [P,T,1]
            h_pos, p_pos = (hidden[positive] * w).flatten(0, 1), probs[positive].flatten(0, 1)
            m_g = torch.zeros(probs.shape[-1], hidden.shape[-1], dtype=work)
            m_g.index_add_(0, token_index[positive].flatten(), h_pos)
            m_g -= p_pos.T @ h_pos
            mh = hidden[rows] @ m_g.T  # [R,T,V]
            s = mh.gather(-1, token_index[rows, :, None]).squeeze(-1) - (probs[rows] * mh).sum(-1)
            influence[rows] = s * mask[rows]
            pos_mean = (influence[positive] * mask[positive]).sum(1) / lengths[positive]
            anchor[rows] = pos_mean.min()
        return scalar[:, None] * influence, anchor


def thr_extras(
    hidden: Tensor,
    probs: Tensor,
    token_index: Tensor,
    mask: Tensor,
    advantages: Tensor,
    group: Tensor,
    *,
    length_norm: bool = True,
) -> dict[str, Tensor]:
    """``{THR_SCORE_KEY: [B,T], THR_ANCHOR_KEY: [B]}`` to merge into ``batch.extras`` before training."""
    score, anchor = token_hidden_reward(hidden, probs, token_index, mask, advantages, group, length_norm=length_norm)
    return {THR_SCORE_KEY: score, THR_ANCHOR_KEY: anchor}


def thr_extras_from_forward(hidden: Tensor, probs: Tensor, token_index: Tensor, batch) -> dict[str, Tensor]:
    """``thr_extras`` for a RolloutBatch with advantages set; the ``extras_fn`` of the learner's ``forward_extras``."""
    if batch.advantages is None:
        raise ValueError("THR scores need the batch's advantages: compute them before forward_extras")
    return thr_extras(hidden, probs, token_index, batch.response_mask, batch.advantages, batch.group)


def check_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError for unknown keys, a missing or out-of-range ``p``, a negative ``beta`` or a bad ``mode``."""
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ValueError(f"algorithm.thr: unknown key(s) {unknown}; accepted: {sorted(_OPTIONS)}")
    if "p" not in options or not -1 <= float(options["p"]) <= 1:
        raise ValueError(f"algorithm.thr.p must be set in [-1, 1], got {options.get('p')}")
    if float(options.get("beta", 1.0)) < 0:
        raise ValueError(f"algorithm.thr.beta must be >= 0, got {options['beta']}")
    if options.get("mode", "reweight") not in _MODES:
        raise ValueError(f"algorithm.thr.mode={options['mode']!r} is not one of {list(_MODES)}")


def reweight(
    advantages: Tensor, score: Tensor, anchor: Tensor, *, p: float, beta: float = 1.0, mode: str = "reweight"
) -> Tensor:
    """Token advantages [b,T] reweighted by THR score [b,T] above the threshold beta * anchor [b]; -> [b,T]."""
    dominant = score.abs() > beta * anchor[:, None]
    amplified = advantages * (1.0 + p * torch.sign(score))
    rest = advantages if mode == "reweight" else torch.zeros_like(advantages)
    return torch.where(dominant, amplified, rest)


def reweight_from_extras(advantages: Tensor, extras: Mapping[str, Tensor], **options: Any) -> Tensor:
    """``reweight`` with the score and anchor stored in ``batch.extras`` by ``thr_extras``."""
    missing = [key for key in (THR_SCORE_KEY, THR_ANCHOR_KEY) if key not in extras]
    if missing:
        raise ValueError(
            f"algorithm.thr is set but the batch lacks extras {missing}; compute them from the old policy's hidden "
            "states and probabilities with rltrain.algo.thr.thr_extras before train_step"
        )
    return reweight(advantages, extras[THR_SCORE_KEY], extras[THR_ANCHOR_KEY], **options)
