"""Advantage estimators: hand-computed values, invariants, and a loop reference for the tree advantage."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rltrain import algo
from rltrain.algo.advantages import dr_grpo, grpo, reinforce_pp, rloo, tree, whiten
from rltrain.types import RolloutBatch

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0])
GROUP = torch.tensor([0, 0, 0, 0, 1, 1, 2])


def make_batch(rewards: torch.Tensor, group: torch.Tensor, lengths: list[int], ancestors=None) -> RolloutBatch:
    b, t = len(lengths), max(lengths)
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return RolloutBatch(
        prompt_ids=torch.ones(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2),
        response_ids=torch.ones(b, t, dtype=torch.long),
        response_mask=mask,
        rollout_logprobs=torch.zeros(b, t),
        group=group,
        finish_reason=torch.zeros(b, dtype=torch.long),
        policy_version=torch.zeros(b, dtype=torch.long),
        ancestors=ancestors,
        rewards=rewards,
    )


def test_grpo_hand_computed_unbiased_std():
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected std of {1, 0, 0, 1}
    a = 0.5 / (std + 1e-6)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 5.0 / (1 + 1e-6)])
    torch.testing.assert_close(grpo(REWARDS, GROUP), expected)


def test_grpo_population_std_and_eps():
    out = grpo(REWARDS, GROUP, unbiased=False, eps=0.5)
    torch.testing.assert_close(out[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))  # 0.5 / (0.5 + 0.5)


def test_dr_grpo_and_rloo_hand_computed():
    torch.testing.assert_close(dr_grpo(REWARDS, GROUP), torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 5.0]))
    two_thirds = 2.0 / 3.0  # 1 - mean(0, 0, 1)
    expected = torch.tensor([two_thirds, -two_thirds, -two_thirds, two_thirds, 0.0, 0.0, 5.0])
    torch.testing.assert_close(rloo(REWARDS, GROUP), expected)


@pytest.mark.parametrize("fn", [grpo, dr_grpo, rloo])
def test_group_advantages_sum_to_zero_and_constant_group_is_exactly_zero(fn):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(40, generator=gen)
    group = torch.randint(0, 6, (40,), generator=gen) * 7 + 3  # arbitrary, non-contiguous ids
    rewards[group == group[0]] = 0.1  # one constant group, a value with no exact binary representation
    out = fn(rewards, group)
    for g in torch.unique(group):
        assert abs(float(out[group == g].sum())) < 1e-5
    assert torch.equal(out[group == group[0]], torch.zeros(int((group == group[0]).sum())))


def test_reinforce_pp_whitening_token_weighted_matches_masked_whiten():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    lengths = torch.tensor([1, 1, 1, 3])
    out = reinforce_pp(rewards, torch.zeros(4, dtype=torch.long), token_counts=lengths)
    # hand: token mean 4/6, weighted var (1/9 + 8/9 + 3/9) / 6 = 2/9, Bessel * 6/5 = 4/15
    expected = (rewards - 2.0 / 3.0) / math.sqrt(4.0 / 15.0 + 1e-8)
    torch.testing.assert_close(out, expected)
    tokens = torch.cat([rewards[i].repeat(int(n)) for i, n in enumerate(lengths)])
    torch.testing.assert_close(out[3], (1.0 - tokens.mean()) / torch.sqrt(tokens.var() + 1e-8))


def test_reinforce_pp_group_baseline_and_unweighted():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    group = torch.tensor([0, 0, 1, 1])
    centred = torch.tensor([0.5, -0.5, 0.0, 0.0])
    torch.testing.assert_close(reinforce_pp(rewards, group, group_baseline=True), whiten(centred))
    torch.testing.assert_close(whiten(centred), centred / torch.sqrt(centred.var() + 1e-8))


# ---- tree --------------------------------------------------------------------------------------
# one prompt, binary tree of depth 2: leaves a, b under segment 10 and c, d under segment 11
TREE_ANCESTORS = torch.tensor([[10, 20], [10, 21], [11, 22], [11, 23]])
TREE_REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0])
TREE_GROUP = torch.zeros(4, dtype=torch.long)


def test_tree_average_hand_computed():
    # root mean 0.75; subgroup 10 mean 0.5; subgroup 11 mean 1; depth-1 segments are singletons (skipped)
    out = tree(TREE_REWARDS, TREE_GROUP, TREE_ANCESTORS, whiten_batch=False)
    torch.testing.assert_close(out, torch.tensor([0.375, -0.625, 0.125, 0.125]))


def test_tree_subgroup_size_weighting_hand_computed():
    out = tree(TREE_REWARDS, TREE_GROUP, TREE_ANCESTORS, weighting="subgroup_size", whiten_batch=False)
    torch.testing.assert_close(out, torch.tensor([1 / 3, -2 / 3, 1 / 6, 1 / 6]))


def test_tree_drop_zero_variance_skips_constant_subgroup_not_root():
    out = tree(TREE_REWARDS, TREE_GROUP, TREE_ANCESTORS, drop_zero_variance=True, whiten_batch=False)
    torch.testing.assert_close(out, torch.tensor([0.375, -0.625, 0.25, 0.25]))


def test_tree_without_ancestors_is_reinforce_pp_with_group_baseline():
    gen = torch.Generator().manual_seed(1)
    rewards, group = torch.rand(12, generator=gen), torch.arange(12) // 4
    counts = torch.randint(1, 9, (12,), generator=gen)
    expected = reinforce_pp(rewards, group, group_baseline=True, token_counts=counts)
    torch.testing.assert_close(tree(rewards, group, None, token_counts=counts), expected)


def test_tree_segment_ids_are_scoped_by_group():
    # two prompts reusing the same segment ids must not share subgroups
    ancestors = torch.cat([TREE_ANCESTORS, TREE_ANCESTORS])
    rewards = torch.cat([TREE_REWARDS, 1 - TREE_REWARDS])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    out = tree(rewards, group, ancestors, whiten_batch=False)
    torch.testing.assert_close(out[:4], tree(TREE_REWARDS, TREE_GROUP, TREE_ANCESTORS, whiten_batch=False))


def test_tree_rejects_malformed_paths():
    with pytest.raises(ValueError, match="after a -1"):
        tree(TREE_REWARDS, TREE_GROUP, torch.tensor([[10, -1, 5], [10, 21, -1], [11, 22, -1], [11, 23, -1]]))
    with pytest.raises(ValueError, match="two different parents"):
        tree(TREE_REWARDS, TREE_GROUP, torch.tensor([[10, 20], [10, 20], [11, 20], [11, 23]]))
    with pytest.raises(ValueError, match="weighting"):
        tree(TREE_REWARDS, TREE_GROUP, TREE_ANCESTORS, weighting="group_size")


def random_forest(rng: random.Random, num_groups: int, max_depth: int) -> tuple[list[int], list[list[int]]]:
    """Leaves of random trees: (group of each leaf, its path of globally unique segment ids)."""
    groups, paths, next_id = [], [], 0

    def grow(g: int, path: list[int]) -> None:
        nonlocal next_id
        if len(path) == max_depth or (path and rng.random() < 0.3):
            groups.append(g)
            paths.append(path)
            return
        for _ in range(rng.randint(1, 3)):
            next_id += 1
            grow(g, path + [next_id])

    for g in range(num_groups):
        grow(g, [])
    return groups, paths


def tree_loop_reference(rewards, groups, paths, weighting, drop_zero_variance, lengths):
    """The released TreePO code's behaviour (string uid keys, per-level dicts), then token-level whitening."""
    uids = ["#".join([f"q{g}"] + [str(s) for s in p]) for g, p in zip(groups, paths)]
    levels = max(len(u.split("#")) for u in uids)
    members: dict[str, list[int]] = {}
    for j in range(levels):
        for i, u in enumerate(uids):
            fields = u.split("#")
            if j < len(fields):
                members.setdefault("#".join(fields[: j + 1]), []).append(i)
    advantages = []
    for i, u in enumerate(uids):
        fields = u.split("#")
        num, den = 0.0, 0.0
        for j in range(len(fields)):
            rows = members["#".join(fields[: j + 1])]
            values = [rewards[k] for k in rows]
            mean = sum(values) / len(values) if len(rows) > 1 else 0.0
            constant = max(values) == min(values)
            if j == 0 or (len(rows) > 1 and not (drop_zero_variance and constant)):
                w = len(rows) if weighting == "subgroup_size" else 1.0
                num += w * (rewards[i] - mean)
                den += w
        advantages.append(num / den)
    tokens = [a for a, n in zip(advantages, lengths) for _ in range(n)]
    mean = sum(tokens) / len(tokens)
    var = sum((x - mean) ** 2 for x in tokens) / (len(tokens) - 1)
    return [(a - mean) / math.sqrt(var + 1e-8) for a in advantages]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("weighting", "drop"), [("average", False), ("subgroup_size", False), ("average", True)])
def test_tree_vectorised_matches_loop_reference_on_random_trees(seed, weighting, drop):
    rng = random.Random(seed)
    groups, paths = random_forest(rng, num_groups=3, max_depth=4)
    rewards = [float(rng.choice([0, 1, 1, 0.5])) for _ in groups]
    lengths = [rng.randint(1, 12) for _ in groups]
    depth = max(len(p) for p in paths)
    ancestors = torch.tensor([p + [-1] * (depth - len(p)) for p in paths])
    out = tree(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(groups),
        ancestors,
        weighting=weighting,
        drop_zero_variance=drop,
        token_counts=torch.tensor(lengths),
    )
    expected = tree_loop_reference(rewards, groups, paths, weighting, drop, lengths)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)


# ---- batch-level helper ------------------------------------------------------------------------
def test_advantages_for_batch_broadcasts_over_response_tokens():
    batch = make_batch(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0, 0, 1]), [2, 3, 1])
    out = algo.advantages_for_batch(batch, "dr_grpo", {})
    expected = torch.tensor([[0.5, 0.5, 0.0], [-0.5, -0.5, -0.5], [2.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)


def test_advantages_for_batch_passes_token_counts_for_whitening():
    rewards, group = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long)
    batch = make_batch(rewards, group, [1, 1, 1, 3])
    out = algo.advantages_for_batch(batch, "reinforce_pp", {})
    scalar = reinforce_pp(rewards, group, token_counts=torch.tensor([1, 1, 1, 3]))
    torch.testing.assert_close(out, scalar[:, None] * batch.response_mask)
    tree_out = algo.advantages_for_batch(batch.replace(ancestors=torch.tensor([[1], [1], [2], [3]])), "tree", {})
    assert tree_out.shape == (4, 3) and float(tree_out[0, 1]) == 0.0


def test_reinforce_pp_kl_in_reward_gives_per_token_returns_to_go():
    """REINFORCE++ (arXiv 2501.03262 Eq. 8-10): A_t = R - beta * sum_{i>=t} KL_i, whitened over response tokens."""
    batch = make_batch(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), [3, 2])
    kl_penalty = torch.tensor([[0.1, 0.2, 0.3], [0.2, -0.1, 9.0]])  # beta * KL_t; 9.0 is padding, never counted
    out = algo.advantages_for_batch(batch, "reinforce_pp", {}, kl_penalty=kl_penalty)
    # returns-to-go: row 0: 1 - (0.6, 0.5, 0.3) = (0.4, 0.5, 0.7); row 1: 0 - (0.1, -0.1) = (-0.1, 0.1)
    # mean of the 5 tokens 0.32; deviations (0.08, 0.18, 0.38), (-0.42, -0.22); Bessel variance 0.408 / 4
    std = math.sqrt(0.408 / 4 + 1e-8)
    expected = torch.tensor([[0.08, 0.18, 0.38], [-0.42, -0.22, 0.0]]) / std
    expected[1, 2] = 0.0
    torch.testing.assert_close(out, expected)


def test_kl_in_reward_for_sequence_estimators_is_the_summed_penalty():
    batch = make_batch(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 0]), [2, 1, 2, 1])
    kl_penalty = torch.tensor([[0.1, 0.2], [0.3, 5.0], [0.0, 0.1], [0.2, 5.0]])  # 5.0: padding
    summed = torch.tensor([0.3, 0.3, 0.1, 0.2])
    for name, params in (("grpo", {}), ("reinforce_pp", {"group_baseline": True})):
        out = algo.advantages_for_batch(batch, name, params, kl_penalty=kl_penalty)
        expected = algo.advantages_for_batch(batch.replace(rewards=batch.rewards - summed), name, params)
        torch.testing.assert_close(out, expected)


def test_advantages_for_batch_rejects_bad_params_and_missing_rewards():
    batch = make_batch(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), [1, 1])
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['epsilon'\]; accepted: \['eps', 'unbiased'\]"):
        algo.advantages_for_batch(batch, "grpo", {"epsilon": 1e-6})
    with pytest.raises(ValueError, match="token_counts"):
        algo.advantages_for_batch(batch, "reinforce_pp", {"token_counts": 3})
    with pytest.raises(ValueError, match="rewards is None"):
        algo.advantages_for_batch(batch.replace(rewards=None), "grpo", {})
    with pytest.raises(KeyError, match="known: \\['dr_grpo', 'grpo'"):
        algo.advantages_for_batch(batch, "gae", {})


def test_non_finite_rewards_raise_naming_rows():
    with pytest.raises(ValueError, match=r"not finite at rows \[1\]"):
        grpo(torch.tensor([0.0, float("nan")]), torch.tensor([0, 0]))
