"""DAPO reward shaping and sample filters (arXiv 2503.14476 §3; verl ``DAPORewardManager``), as pure functions.

- ``overlong_penalty``: soft overlong punishment added to the correctness reward.
- ``overlong_filter_mask`` / ``apply_overlong_filter``: drop truncated samples from the loss (their tokens
  are masked; they still count in group statistics, so apply after computing advantages).
- ``nonconstant_group_mask``: the dynamic-sampling rule, keep a group iff its metric varies (or size 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rltrain.types import FinishReason, RolloutBatch


def overlong_penalty(lengths: Tensor, max_tokens: int, buffer: int, factor: float = 1.0) -> Tensor:
    """Soft overlong punishment (DAPO Eq. 13); lengths [B] -> penalty [B] in [-factor, 0].

    0 up to ``max_tokens - buffer`` tokens, then linear down to -factor at ``max_tokens``
    (verl: min(-(len - expected) / buffer * factor, 0)); clamped at -factor beyond the limit.
    """
    if buffer <= 0 or buffer > max_tokens:
        raise ValueError(f"overlong buffer must be in [1, max_tokens={max_tokens}], got {buffer}")
    expected = max_tokens - buffer
    excess = lengths.to(torch.float32) - expected
    return (-excess / buffer * factor).clamp(min=-factor, max=0.0)


def overlong_filter_mask(finish_reason: Tensor, reasons: Sequence[FinishReason] = (FinishReason.LENGTH,)) -> Tensor:
    """1.0 for kept rows, 0.0 for rows that stopped for one of ``reasons`` (truncated); [B] long -> [B] float."""
    truncated = torch.zeros_like(finish_reason, dtype=torch.bool)
    for reason in reasons:
        truncated |= finish_reason == int(reason)
    return (~truncated).to(torch.float32)


def apply_overlong_filter(
    batch: RolloutBatch, reasons: Sequence[FinishReason] = (FinishReason.LENGTH,)
) -> RolloutBatch:
    """Overlong filtering (DAPO): zero the ``response_mask`` (and advantages) of truncated trajectories.

    Their tokens then neither contribute to the loss nor to the step's token count. The tree sampler's
    MAX_DEPTH is also a truncation; pass ``reasons=(LENGTH, MAX_DEPTH)`` to drop those too.
    """
    keep = overlong_filter_mask(batch.finish_reason, reasons).to(batch.response_mask.dtype)
    changes: dict[str, Tensor] = {"response_mask": batch.response_mask * keep[:, None]}
    if batch.advantages is not None:
        changes["advantages"] = batch.advantages * keep[:, None]
    return batch.replace(**changes)


def nonconstant_group_mask(values: Tensor, group: Tensor) -> Tensor:
    """Rows [B] bool whose group's ``values`` are not all equal, or whose group has one member.

    DAPO dynamic sampling: a group whose metric is constant (all correct / all wrong) has zero
    advantage and no gradient, so it is dropped. Equality is exact (max == min).
    """
    if values.shape != group.shape:
        raise ValueError(f"metric values {tuple(values.shape)} and group {tuple(group.shape)} differ in shape")
    keys, index = torch.unique(group, return_inverse=True)
    values = values.to(torch.float64)
    count = torch.zeros(len(keys), dtype=torch.long).index_add_(0, index, torch.ones_like(index))
    low = torch.full((len(keys),), torch.inf, dtype=torch.float64).scatter_reduce_(0, index, values, "amin")
    high = torch.full((len(keys),), -torch.inf, dtype=torch.float64).scatter_reduce_(0, index, values, "amax")
    keep_group = (count == 1) | (low < high)
    return keep_group[index]
