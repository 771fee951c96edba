"""Outcome advantage estimators: rewards [B] -> one scalar per trajectory [B] (or per token [B,T]).

Every estimator has the registry signature ``fn(rewards, group, ancestors=None, **params) -> Tensor``, [B]
(broadcast over the response) or [B,T] (per token). ``group[b]`` is the prompt id of trajectory b (any
integers; only equality matters) and ``ancestors[b, d]`` is the id of the depth-d tree segment leaf b passes
through (-1 past the leaf). All statistics are computed with scatter/index ops, never a Python loop over
trajectories.

Conventions shared by the group-centred estimators (GRPO, Dr.GRPO, RLOO), following verl:
- a group of size 1 has mean 0 (and std 1 for GRPO), so its advantage is its reward;
- a group of size > 1 whose rewards are all equal gets exactly 0 (not float noise / eps).

Keyword options filled from the batch by ``advantages_for_batch`` (never from the config), when the
estimator accepts them: ``token_counts [B]`` (response tokens per trajectory: whitening is then
token-weighted, identical to verl's ``masked_whiten`` of the broadcast advantage), ``response_mask [B,T]``
and ``kl_penalty [B,T]`` (the per-token KL-in-reward penalty, or None). An estimator without
``kl_penalty`` gets the KL folded into its sequence reward instead: R - sum_t kl_penalty_t (docs/algorithms.md).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from rltrain.algo.registry import get, register
from rltrain.types import RolloutBatch

# filled from the batch by advantages_for_batch, never from the config
_BATCH_PARAMS = ("token_counts", "response_mask", "kl_penalty")
EPISODE_KEY = "env/episode"  # batch extras [B] long: rows of one (group, episode) are chunks of one sample


def _check_inputs(rewards: Tensor, group: Tensor, ancestors: Tensor | None) -> None:
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor [B], got {rewards.dtype} {tuple(rewards.shape)}")
    if rewards.numel() == 0:
        raise ValueError("advantage of an empty batch (no trajectories)")
    if group.shape != rewards.shape or group.dtype != torch.long:
        raise ValueError(f"group must be a long tensor {tuple(rewards.shape)}, got {group.dtype} {tuple(group.shape)}")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"rewards are not finite at rows {bad[:10]}")
    if ancestors is not None and (ancestors.dim() != 2 or ancestors.shape[0] != rewards.shape[0]):
        raise ValueError(f"ancestors must be [B={rewards.shape[0]},D], got {tuple(ancestors.shape)}")


def _scatter_stats(values: Tensor, index: Tensor, num: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-key count, mean, min and max of ``values [E]`` grouped by ``index [E]`` (keys 0..num-1)."""
    count = torch.zeros(num, dtype=values.dtype).index_add_(0, index, torch.ones_like(values))
    mean = torch.zeros(num, dtype=values.dtype).index_add_(0, index, values) / count
    low = torch.full((num,), torch.inf, dtype=values.dtype).scatter_reduce_(0, index, values, "amin")
    high = torch.full((num,), -torch.inf, dtype=values.dtype).scatter_reduce_(0, index, values, "amax")
    return count, mean, low, high


def _group_centred(rewards: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row [B]: R - group mean (size-1 groups: mean 0; constant groups: exactly 0), the group size,
    whether the group is constant with size > 1, and the row's group index (0..num_groups-1)."""
    keys, index = torch.unique(group, return_inverse=True)
    count, mean, low, high = _scatter_stats(rewards, index, len(keys))
    size = count[index]
    centred = rewards - torch.where(size > 1, mean[index], torch.zeros_like(rewards))
    constant = (size > 1) & (low[index] == high[index])
    return torch.where(constant, torch.zeros_like(centred), centred), size, constant, index


def whiten(values: Tensor, weights: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """(values - mean) / sqrt(var + eps) over the batch; values, weights of one shape ([B] or [B,T]) -> same.

    With ``weights`` (token counts [B], or the response mask [B,T]) this equals verl ``masked_whiten``
    over the response tokens: weighted mean, Bessel-corrected weighted variance (n = total weight).
    """
    w = torch.ones_like(values) if weights is None else weights.to(values.dtype)
    total = w.sum()
    if total <= 0:
        return torch.zeros_like(values)
    mean = (w * values).sum() / total
    var = (w * (values - mean) ** 2).sum() / total
    if total > 1:
        var = var * total / (total - 1)
    return (values - mean) * torch.rsqrt(var + eps)


@register("advantage", "grpo", min_group_size=2)
def grpo(
    rewards: Tensor, group: Tensor, ancestors: Tensor | None = None, *, eps: float = 1e-6, unbiased: bool = True
) -> Tensor:
    """GRPO (arXiv 2402.03300): (R - mean_g) / (std_g + eps); [B] -> [B].

    ``unbiased=True`` uses the Bessel-corrected std (n - 1) like verl's torch.std; False uses the
    population std of the paper. Size-1 groups: mean 0, std 1.
    """
    _check_inputs(rewards, group, ancestors)
    centred, size, constant, index = _group_centred(rewards, group)
    sq = torch.zeros(int(index.max()) + 1, dtype=rewards.dtype).index_add_(0, index, centred**2)[index]
    dof = size - 1 if unbiased else size
    std = torch.where(size > 1, torch.sqrt(sq / dof.clamp(min=1)), torch.ones_like(rewards))
    return torch.where(constant, torch.zeros_like(centred), centred / (std + eps))


@register("advantage", "dr_grpo", min_group_size=2)
def dr_grpo(rewards: Tensor, group: Tensor, ancestors: Tensor | None = None) -> Tensor:
    """Dr.GRPO (arXiv 2503.20783): R - mean_g, no std division; [B] -> [B]."""
    _check_inputs(rewards, group, ancestors)
    return _group_centred(rewards, group)[0]


@register("advantage", "rloo", min_group_size=2)
def rloo(rewards: Tensor, group: Tensor, ancestors: Tensor | None = None) -> Tensor:
    """RLOO leave-one-out baseline: R_i - mean_{j != i} R_j = G/(G-1) (R_i - mean_g); [B] -> [B]."""
    _check_inputs(rewards, group, ancestors)
    centred, size, _, _ = _group_centred(rewards, group)
    return torch.where(size > 1, centred * size / (size - 1).clamp(min=1), centred)


@register("advantage", "reinforce_pp")
def reinforce_pp(
    rewards: Tensor,
    group: Tensor,
    ancestors: Tensor | None = None,
    *,
    group_baseline: bool = False,
    eps: float = 1e-8,
    token_counts: Tensor | None = None,
    response_mask: Tensor | None = None,
    kl_penalty: Tensor | None = None,
) -> Tensor:
    """REINFORCE++ (arXiv 2501.03262, gamma = 1): batch-whitened returns; [B] -> [B], or [B,T] with a KL penalty.

    Without ``kl_penalty``: whiten(R), token-weighted with ``token_counts``; [B].
    With ``kl_penalty`` [B,T] (beta * KL_t on response tokens, KL in the reward): the token rewards are
    r_t = R * 1[t = last] - beta * KL_t, so the return-to-go is G_t = R - beta * sum_{i >= t} KL_i, whitened
    over the batch's response tokens (``response_mask`` [B,T]; verl ``compute_reinforce_plus_plus_outcome_
    advantage``); [B,T], 0 past the response.
    ``group_baseline=True`` (verl ``reinforce_plus_plus_baseline``): the sequence score R - beta * sum_t KL_t
    minus its group mean, then whitened; [B].
    """
    _check_inputs(rewards, group, ancestors)
    if kl_penalty is not None:
        if response_mask is None or kl_penalty.shape != response_mask.shape or kl_penalty.shape[0] != len(rewards):
            raise ValueError(
                f"kl_penalty {tuple(kl_penalty.shape)} needs a response_mask of the same shape [B={len(rewards)},T]"
            )
        mask = response_mask.to(rewards.dtype)
        if group_baseline:
            rewards = rewards - (kl_penalty * mask).sum(dim=1)
        else:
            tail_kl = (kl_penalty * mask).flip(-1).cumsum(-1).flip(-1)  # sum_{i >= t} beta * KL_i
            return whiten((rewards[:, None] - tail_kl) * mask, mask, eps) * mask
    values = _group_centred(rewards, group)[0] if group_baseline else rewards
    return whiten(values, token_counts, eps)


def _check_tree(ancestors: Tensor, group: Tensor) -> None:
    """Raise unless every row's segment ids are a -1-padded path and each segment (per group) has one parent."""
    if ancestors.dtype != torch.long:
        raise ValueError(f"ancestors must be torch.long, got {ancestors.dtype}")
    valid = ancestors >= 0
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        rows = torch.nonzero((valid[:, 1:] & ~valid[:, :-1]).any(1)).flatten().tolist()
        raise ValueError(f"ancestors rows {rows[:10]} have a segment id after a -1 (paths must be -1-padded)")
    if ancestors.shape[1] == 0:
        return
    parent = torch.cat([group[:, None], ancestors[:, :-1]], dim=1)  # depth 0 hangs off the prompt
    depth = torch.arange(ancestors.shape[1]).expand_as(ancestors)
    owner = group[:, None].expand_as(ancestors)
    node = torch.stack([owner[valid], depth[valid], ancestors[valid]], dim=1)
    node_parent = torch.stack([owner[valid], depth[valid], ancestors[valid], parent[valid]], dim=1)
    if len(torch.unique(node, dim=0)) != len(torch.unique(node_parent, dim=0)):
        raise ValueError("ancestors is not a tree: a segment id of a prompt group appears with two different parents")


@register("advantage", "tree", min_group_size=2)
def tree(
    rewards: Tensor,
    group: Tensor,
    ancestors: Tensor | None = None,
    *,
    weighting: str = "average",
    drop_zero_variance: bool = False,
    whiten_batch: bool = True,
    eps: float = 1e-8,
    token_counts: Tensor | None = None,
) -> Tensor:
    """TreePO (arXiv 2508.17445 §3.3, Eq. 4-7; docs/algorithms.md): multi-level subgroup baseline; [B] -> [B].

    Levels of leaf i: its root group (always) and each ancestor segment whose subgroup (leaves through it)
    has > 1 member. Contribution per level: R_i - mean(subgroup); a size-1 root group has mean 0.
    ``weighting``: "average" (mean over levels, the paper's choice) or "subgroup_size" (weighted by
    |subgroup|, the released code's default). ``drop_zero_variance`` skips constant non-root subgroups.
    Then batch whitening (token-weighted with ``token_counts``), as in the released code.
    ``ancestors=None`` is a flat group (every leaf forks at the root): only the root level remains.
    Subgroups are keyed by (group, depth, id), so ids need only be unique within a prompt group.
    """
    _check_inputs(rewards, group, ancestors)
    if weighting not in ("average", "subgroup_size"):
        raise ValueError(f"tree advantage: weighting={weighting!r} is not one of ['average', 'subgroup_size']")
    b = rewards.shape[0]
    if ancestors is None:
        ancestors = torch.full((b, 0), -1, dtype=torch.long)
    _check_tree(ancestors, group)
    valid = ancestors >= 0
    depth = torch.arange(ancestors.shape[1]).expand_as(ancestors)
    rows = torch.arange(b)
    entry_row = torch.cat([rows, rows[:, None].expand_as(ancestors)[valid]])
    # a root entry is keyed (group, -1, -1); a segment entry (group, depth, segment id)
    root_key = torch.stack([group, torch.full_like(group, -1), torch.full_like(group, -1)], dim=1)
    seg_key = torch.stack([group[:, None].expand_as(ancestors)[valid], depth[valid], ancestors[valid]], dim=1)
    keys, index = torch.unique(torch.cat([root_key, seg_key]), dim=0, return_inverse=True)
    values = rewards[entry_row]
    count, mean, low, high = _scatter_stats(values, index, len(keys))
    is_root = torch.arange(len(entry_row)) < b
    size = count[index]
    baseline = torch.where(size > 1, mean[index], torch.zeros_like(values))
    include = is_root | ((size > 1) & ~(drop_zero_variance & (low[index] == high[index])))
    weight = include.to(values.dtype) * (size if weighting == "subgroup_size" else 1.0)
    total = torch.zeros(b, dtype=values.dtype).index_add_(0, entry_row, weight * (values - baseline))
    norm = torch.zeros(b, dtype=values.dtype).index_add_(0, entry_row, weight)
    advantages = total / norm
    return whiten(advantages, token_counts, eps) if whiten_batch else advantages


def advantages_for_batch(
    batch: RolloutBatch, name: str, params: dict[str, Any], kl_penalty: Tensor | None = None
) -> Tensor:
    """Token advantages [B,T] of the registered estimator ``name``, 0 where ``response_mask`` is 0: its [B]
    scalar broadcast over response tokens, or its [B,T] values as they are.

    ``params`` are the estimator's keyword options (``algorithm.advantage_params``). ``kl_penalty`` [B,T]
    (KL in the reward, ``algo.kl_token_penalty``) goes to an estimator that accepts it (per-token returns);
    any other gets ``rewards - kl_penalty.sum(1)``, the KL folded into its sequence reward.
    """
    fn = get("advantage", name)
    if batch.rewards is None:
        raise ValueError("advantages_for_batch: batch.rewards is None (grade the batch first)")
    accepted = set(inspect.signature(fn).parameters) - {"rewards", "group", "ancestors"}
    unknown = sorted(set(params) - (accepted - set(_BATCH_PARAMS)))
    if unknown:
        options = sorted(accepted - set(_BATCH_PARAMS))
        raise ValueError(f"advantage {name!r}: unknown parameter(s) {unknown}; accepted: {options}")
    kwargs = dict(params)
    from_batch = {"token_counts": batch.response_mask.sum(dim=1), "response_mask": batch.response_mask}
    kwargs.update({key: value for key, value in from_batch.items() if key in accepted})
    rewards = batch.rewards
    if "kl_penalty" in accepted:
        kwargs["kl_penalty"] = kl_penalty
    elif kl_penalty is not None:
        rewards = rewards - (kl_penalty * batch.response_mask).sum(dim=1)
    if EPISODE_KEY in batch.extras:
        values = _per_episode(fn, name, rewards, batch, kwargs)
    else:
        values = fn(rewards, batch.group, batch.ancestors, **kwargs)
    shape = tuple(values.shape)
    if shape not in ((batch.batch_size,), tuple(batch.response_mask.shape)) or not torch.isfinite(values).all():
        raise ValueError(f"advantage {name!r} returned a non-finite or mis-shaped tensor {shape}")
    return (values[:, None] if values.dim() == 1 else values) * batch.response_mask


def _per_episode(fn: Any, name: str, rewards: Tensor, batch: RolloutBatch, kwargs: dict[str, Any]) -> Tensor:
    """[B] advantages when rows are chunks of episodes (Delethink, docs/environments.md): the estimator sees one
    sample per (group, ``extras[EPISODE_KEY]``) with the episode's reward (KL folded in: its rows' sum) and token
    count; each row gets its episode's value. Per-token estimators (``response_mask``) need whole sequences."""
    if "response_mask" in kwargs or "kl_penalty" in kwargs:
        raise ValueError(f"advantage {name!r} is per token; rows that are chunks of episodes need a [B] estimator")
    if len(rewards) == 0:
        return fn(rewards, batch.group, None, **kwargs)  # the estimator's own empty-batch error
    keys = torch.stack([batch.group, batch.extras[EPISODE_KEY].long()], dim=1)
    _, episode = torch.unique(keys, dim=0, return_inverse=True)  # [B] -> episode number
    count, rows = int(episode.max()) + 1, torch.arange(len(episode))
    first = torch.full((count,), len(episode)).scatter_reduce(0, episode, rows, "amin")
    kl_folded = torch.zeros(count, dtype=rewards.dtype).index_add_(0, episode, rewards - batch.rewards.to(rewards))
    episode_kwargs = dict(kwargs)
    if "token_counts" in kwargs:
        counts = kwargs["token_counts"]
        episode_kwargs["token_counts"] = torch.zeros(count, dtype=counts.dtype).index_add_(0, episode, counts)
    values = fn(batch.rewards.to(rewards)[first] + kl_folded, batch.group[first], None, **episode_kwargs)
    if values.dim() != 1:
        raise ValueError(f"advantage {name!r} returned {tuple(values.shape)}; episodes need one value each")
    return values[episode]
