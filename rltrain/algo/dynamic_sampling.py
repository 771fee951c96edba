"""DAPO dynamic sampling (arXiv 2503.14476 §3.2; verl ``recipe/dapo`` loop, docs/algorithms.md).

One ``GroupFilter`` per training step::

    keep = GroupFilter(target_groups=prompts_per_step, metric="acc", max_gen_batches=10)
    while not keep.is_full:
        keep.add(generate_and_grade(next_prompts()))      # raises DynamicSamplingError at the limit
    batch = keep.take()                                   # exactly target_groups complete groups
    log(keep.metrics())                                   # filter/gen_batches, ...

Groups whose metric is constant (all correct / all wrong) are dropped; surplus kept groups beyond
``target_groups`` are discarded, as in verl. A short batch is never returned.

Group ids: each added batch is re-keyed so that ids from different generation rounds never collide
(round r's groups get ids after every id handed out before, in order of sorted original id); tree segment
ids in ``ancestors`` are offset the same way. The original group id is kept in
``extras["filter/source_group"]``. ``take()`` renumbers the returned groups 0..target_groups-1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rltrain.algo.filters import nonconstant_group_mask
from rltrain.errors import RunError
from rltrain.types import RolloutBatch

SOURCE_GROUP_KEY = "filter/source_group"


class DynamicSamplingError(RunError):
    """Too few groups with a non-constant metric after ``max_gen_batches`` generation batches (the CLI prints
    the message and exits 1)."""


class GroupFilter:
    """Accumulates groups whose ``metric`` varies until ``target_groups`` are collected.

    ``metric``: "score" reads ``batch.rewards``; any other name reads ``batch.reward_parts[metric]``
    (unless ``add`` gets explicit values). ``max_gen_batches <= 0`` means unlimited (verl semantics).
    """

    def __init__(self, target_groups: int, *, metric: str = "acc", max_gen_batches: int = 10) -> None:
        if target_groups < 1:
            raise ValueError(f"target_groups must be >= 1, got {target_groups}")
        self.target_groups = target_groups
        self.metric = metric
        self.max_gen_batches = max_gen_batches
        self.gen_batches = 0
        self.groups_seen = 0
        self.groups_kept = 0
        self._kept: list[RolloutBatch] = []
        self._next_group = 0
        self._next_segment = 0
        self._taken = False

    @property
    def is_full(self) -> bool:
        return self.groups_kept >= self.target_groups

    @property
    def kept_fraction(self) -> float:
        """Kept groups / groups seen so far (0 before any batch)."""
        return self.groups_kept / max(self.groups_seen, 1)

    def _metric_values(self, batch: RolloutBatch) -> Tensor:
        if self.metric == "score":
            if batch.rewards is None:
                raise ValueError("dynamic sampling on 'score' needs batch.rewards (grade the batch first)")
            return batch.rewards
        if self.metric not in batch.reward_parts:
            raise ValueError(
                f"dynamic sampling metric {self.metric!r} is not among the batch's reward parts "
                f"{sorted(batch.reward_parts)} (or 'score' for the total reward)"
            )
        return batch.reward_parts[self.metric]

    def _rekey(self, batch: RolloutBatch) -> RolloutBatch:
        originals, index = torch.unique(batch.group, return_inverse=True)
        changes: dict[str, object] = {
            "group": index + self._next_group,
            "extras": {**batch.extras, SOURCE_GROUP_KEY: batch.group.clone()},
        }
        self._next_group += len(originals)
        if batch.ancestors is not None and batch.ancestors.numel() > 0:
            valid = batch.ancestors >= 0
            changes["ancestors"] = torch.where(valid, batch.ancestors + self._next_segment, batch.ancestors)
            self._next_segment += int(batch.ancestors.max().clamp(min=-1)) + 1
        return batch.replace(**changes)

    def add(self, batch: RolloutBatch, metric_values: Tensor | None = None) -> None:
        """Add one graded generation batch; keep its groups whose metric varies ([B] values, default per ``metric``).

        Raises DynamicSamplingError when this is generation batch ``max_gen_batches`` and the filter is not full.
        """
        if self._taken:
            raise RuntimeError("GroupFilter.take() was already called; use a new GroupFilter per training step")
        values = self._metric_values(batch) if metric_values is None else metric_values
        keep = nonconstant_group_mask(values, batch.group)
        self.gen_batches += 1
        self.groups_seen += len(torch.unique(batch.group))
        if keep.any():
            kept = self._rekey(batch).select(torch.nonzero(keep).flatten())
            self._kept.append(kept)
            self.groups_kept += len(torch.unique(kept.group))
        if not self.is_full and 0 < self.max_gen_batches <= self.gen_batches:
            raise DynamicSamplingError(
                f"dynamic sampling: only {self.groups_kept} of {self.target_groups} groups had a non-constant "
                f"{self.metric!r} after {self.gen_batches} generation batches (max_gen_batches="
                f"{self.max_gen_batches}, {self.groups_seen} groups seen). The data is too hard or too easy for the "
                "policy (every group all wrong or all correct): raise algorithm.max_gen_batches, use data of "
                "suitable difficulty, or set algorithm.dynamic_sampling=false."
            )

    def take(self) -> RolloutBatch:
        """Exactly ``target_groups`` complete groups (the earliest kept), renumbered 0..target_groups-1."""
        if not self.is_full:
            raise RuntimeError(f"GroupFilter.take(): only {self.groups_kept} of {self.target_groups} groups collected")
        if self._taken:
            raise RuntimeError("GroupFilter.take() was already called")
        self._taken = True
        merged = RolloutBatch.concat(self._kept)
        chosen = torch.unique(merged.group)[: self.target_groups]
        rows = torch.nonzero(torch.isin(merged.group, chosen)).flatten()
        selected = merged.select(rows)
        return selected.replace(group=torch.unique(selected.group, return_inverse=True)[1])

    def metrics(self) -> dict[str, float]:
        """Counts for logging: generation batches used, groups seen / kept and the kept fraction."""
        return {
            "filter/gen_batches": float(self.gen_batches),
            "filter/groups_seen": float(self.groups_seen),
            "filter/groups_kept": float(self.groups_kept),
            "filter/kept_frac": self.kept_fraction,
        }
