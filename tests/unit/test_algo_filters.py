"""DAPO pieces: soft overlong punishment, overlong filtering and dynamic sampling (GroupFilter)."""

from __future__ import annotations

import pytest
import torch

from rltrain import algo
from rltrain.algo.dynamic_sampling import SOURCE_GROUP_KEY
from rltrain.types import FinishReason, RolloutBatch


def make_batch(group: list[int], acc: list[float], finish=None, ancestors=None, t: int = 3) -> RolloutBatch:
    b = len(group)
    return RolloutBatch(
        prompt_ids=torch.ones(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2),
        response_ids=torch.ones(b, t, dtype=torch.long),
        response_mask=torch.ones(b, t),
        rollout_logprobs=torch.zeros(b, t),
        group=torch.tensor(group),
        finish_reason=torch.tensor(finish or [0] * b),
        policy_version=torch.zeros(b, dtype=torch.long),
        ancestors=ancestors,
        rewards=torch.tensor(acc) * 2 - 1,
        reward_parts={"acc": torch.tensor(acc)},
    )


def test_overlong_penalty_hand_computed():
    lengths = torch.tensor([10, 12, 13, 16, 20, 25])
    expected = torch.tensor([0.0, 0.0, -1 / 8, -4 / 8, -1.0, -1.0])  # expected length 20 - 8 = 12
    torch.testing.assert_close(algo.overlong_penalty(lengths, max_tokens=20, buffer=8, factor=1.0), expected)
    torch.testing.assert_close(algo.overlong_penalty(lengths, 20, 8, factor=0.5), expected * 0.5)
    with pytest.raises(ValueError, match="buffer"):
        algo.overlong_penalty(lengths, max_tokens=20, buffer=0)


def test_overlong_filter_masks_truncated_rows():
    finish = [FinishReason.STOP, FinishReason.LENGTH, FinishReason.MAX_DEPTH]
    batch = make_batch([0, 0, 0], [1, 0, 1], finish=[int(f) for f in finish])
    assert algo.overlong_filter_mask(batch.finish_reason).tolist() == [1.0, 0.0, 1.0]
    both = (FinishReason.LENGTH, FinishReason.MAX_DEPTH)
    assert algo.overlong_filter_mask(batch.finish_reason, both).tolist() == [1.0, 0.0, 0.0]
    filtered = algo.apply_overlong_filter(batch.replace(advantages=torch.ones(3, 3)))
    assert filtered.response_mask.sum(1).tolist() == [3.0, 0.0, 3.0]
    assert filtered.advantages.sum(1).tolist() == [3.0, 0.0, 3.0]


def test_nonconstant_group_mask_keeps_mixed_and_singleton_groups():
    values = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    keep = algo.nonconstant_group_mask(values, torch.tensor([0, 0, 1, 1, 2, 2, 3]))
    assert keep.tolist() == [False, False, True, True, False, False, True]


def generation_batch(gen: torch.Generator, prompts: int, n: int) -> RolloutBatch:
    """A task where most groups are all-correct or all-wrong: p(correct) is 0 (60%), 1 (30%) or 0.5 (10%).

    Group ids restart at 0 every round, like a per-round prompt index.
    """
    u = torch.rand(prompts, generator=gen)
    p = torch.where(u < 0.6, 0.0, torch.where(u < 0.9, 1.0, 0.5))
    acc = torch.bernoulli(p.repeat_interleave(n), generator=gen)
    return make_batch(torch.arange(prompts).repeat_interleave(n).tolist(), acc.tolist())


@pytest.mark.parametrize("seed", range(5))
def test_dynamic_sampling_always_returns_a_full_batch_and_counts_generation_batches(seed):
    gen = torch.Generator().manual_seed(seed)
    target, prompts, n = 6, 8, 4
    keep = algo.GroupFilter(target, metric="acc", max_gen_batches=100)
    added = 0
    while not keep.is_full:
        keep.add(generation_batch(gen, prompts, n))
        added += 1
    batch = keep.take()
    assert keep.gen_batches == added and added > 1
    assert keep.metrics()["filter/gen_batches"] == float(added)
    assert batch.batch_size == target * n
    assert sorted(torch.unique(batch.group).tolist()) == list(range(target))
    for g in range(target):
        acc = batch.reward_parts["acc"][batch.group == g]
        assert len(acc) == n and acc.min() < acc.max()  # complete, non-constant groups only
    assert batch.extras[SOURCE_GROUP_KEY].shape == (target * n,)


def test_dynamic_sampling_raises_a_clear_error_after_max_gen_batches():
    keep = algo.GroupFilter(2, metric="acc", max_gen_batches=3)
    keep.add(make_batch([0, 0, 1, 1], [1, 0, 1, 1]))  # one good group
    keep.add(make_batch([0, 0, 1, 1], [1, 1, 0, 0]))
    with pytest.raises(algo.DynamicSamplingError, match=r"too hard or too easy.*max_gen_batches") as info:
        keep.add(make_batch([0, 0, 1, 1], [0, 0, 0, 0]))
    assert "only 1 of 2 groups" in str(info.value) and "after 3 generation batches" in str(info.value)
    with pytest.raises(RuntimeError, match="only 1 of 2"):
        keep.take()


def test_dynamic_sampling_rekeys_groups_and_tree_segments_across_rounds():
    ancestors = torch.tensor([[0, 1], [0, 2], [3, 4], [3, 5]])
    keep = algo.GroupFilter(3, metric="score", max_gen_batches=0)  # 0: unlimited
    keep.add(make_batch([7, 7, 9, 9], [1, 0, 0, 1], ancestors=ancestors))
    keep.add(make_batch([7, 7, 9, 9], [0, 1, 1, 0], ancestors=ancestors))
    batch = keep.take()
    assert batch.batch_size == 6  # 3 complete groups of 2; the 4th kept group is surplus
    assert batch.group.tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.extras[SOURCE_GROUP_KEY].tolist() == [7, 7, 9, 9, 7, 7]
    assert batch.ancestors[4:].tolist() == [[6, 7], [6, 8]]  # second round's segment ids offset by 6
    with pytest.raises(RuntimeError, match="new GroupFilter"):
        keep.add(make_batch([0, 0], [1, 0]))


def test_dynamic_sampling_metric_lookup():
    keep = algo.GroupFilter(1, metric="format")
    with pytest.raises(ValueError, match=r"'format' is not among the batch's reward parts \['acc'\]"):
        keep.add(make_batch([0, 0], [1, 0]))
    explicit = algo.GroupFilter(1, metric="format")
    explicit.add(make_batch([0, 0], [1, 1]), metric_values=torch.tensor([0.2, 0.3]))
    assert explicit.is_full and explicit.kept_fraction == 1.0
