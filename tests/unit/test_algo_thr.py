"""THR token reweighting (reconstructed; see rltrain/algo/thr.py): scores vs a brute-force sum, reweighting."""

from __future__ import annotations

import pytest
import torch

from rltrain import algo
from rltrain.algo import thr
from rltrain.learner.base import LossNorm
from rltrain.types import RolloutBatch


def brute_force_influence(hidden, probs, token_index, mask, advantages, group, length_norm):
    """s_{i,k} = sum_{j in P} w_j sum_{k'} <g_ik, g_jk'> <h_ik, h_jk'> by explicit loops."""
    b, t, v = probs.shape
    lengths = mask.sum(1)
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for k in range(t):
            if mask[i, k] == 0:
                continue
            g_ik = torch.nn.functional.one_hot(token_index[i, k], v).double() - probs[i, k]
            for j in range(b):
                if group[j] != group[i] or advantages[j] <= 0:
                    continue
                w = 1 / lengths[j] if length_norm else 1.0
                for kk in range(t):
                    if mask[j, kk] == 0:
                        continue
                    g_jk = torch.nn.functional.one_hot(token_index[j, kk], v).double() - probs[j, kk]
                    out[i, k] += w * (g_ik @ g_jk) * (hidden[i, k] @ hidden[j, kk])
    return out


@pytest.mark.parametrize("length_norm", [True, False])
def test_token_hidden_reward_matches_brute_force(length_norm):
    gen = torch.Generator().manual_seed(0)
    b, t, h, v = 6, 4, 5, 7
    hidden = torch.randn(b, t, h, generator=gen, dtype=torch.float64)
    probs = torch.softmax(torch.randn(b, t, v, generator=gen, dtype=torch.float64), -1)
    token_index = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]]).double()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 0.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1, 2, 2])  # group 2 has no positive response
    score, anchor = thr.token_hidden_reward(
        hidden, probs, token_index, mask, advantages, group, length_norm=length_norm
    )
    influence = brute_force_influence(hidden, probs, token_index, mask, advantages, group, length_norm)
    torch.testing.assert_close(score, advantages[:, None] * influence)
    pos_mean = lambda i: float(influence[i].sum() / mask[i].sum())  # noqa: E731
    assert anchor[:2].tolist() == pytest.approx([pos_mean(0)] * 2)
    assert anchor[2:4].tolist() == pytest.approx([pos_mean(2)] * 2)
    assert torch.isinf(anchor[4:]).all() and torch.equal(score[4:], torch.zeros(2, t, dtype=torch.float64))
    token_adv = advantages[:, None] * mask  # [B,T] token advantages give the same scores
    torch.testing.assert_close(thr.token_hidden_reward(hidden, probs, token_index, mask, token_adv, group,
                                                       length_norm=length_norm)[0], score)  # fmt: skip


def test_reweight_hand_computed():
    advantages = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    score = torch.tensor([[2.0, -2.0], [0.1, -3.0]])
    anchor = torch.tensor([1.0, 1.0])
    out = thr.reweight(advantages, score, anchor, p=0.5)
    torch.testing.assert_close(out, torch.tensor([[1.5, 0.5], [-1.0, -0.5]]))
    only = thr.reweight(advantages, score, anchor, p=0.5, mode="only")
    torch.testing.assert_close(only, torch.tensor([[1.5, 0.5], [0.0, -0.5]]))
    strict = thr.reweight(advantages, score, anchor, p=-0.5, beta=2.5)  # only |score| > 2.5 is dominant
    torch.testing.assert_close(strict, torch.tensor([[1.0, 1.0], [-1.0, -1.5]]))


def test_loss_applies_thr_from_extras_and_reports_missing_extras():
    b, t = 1, 2
    micro = RolloutBatch(
        prompt_ids=torch.ones(b, 1, dtype=torch.long),
        prompt_mask=torch.ones(b, 1),
        response_ids=torch.ones(b, t, dtype=torch.long),
        response_mask=torch.ones(b, t),
        rollout_logprobs=torch.zeros(b, t),
        group=torch.zeros(b, dtype=torch.long),
        finish_reason=torch.zeros(b, dtype=torch.long),
        policy_version=torch.zeros(b, dtype=torch.long),
        old_logprobs=torch.zeros(b, t),
        advantages=torch.ones(b, t),
        extras={thr.THR_SCORE_KEY: torch.tensor([[2.0, -2.0]]), thr.THR_ANCHOR_KEY: torch.tensor([1.0])},
    )
    loss_fn = algo.make_loss_fn(thr={"p": 0.5})
    loss, _ = loss_fn(torch.zeros(b, t), None, micro, LossNorm(global_tokens=2, global_seqs=1))
    assert float(loss) == pytest.approx(-(1.5 + 0.5) / 2)  # ratio 1: loss = -mean(reweighted advantage)
    with pytest.raises(ValueError, match="thr_extras"):
        loss_fn(torch.zeros(b, t), None, micro.replace(extras={}), LossNorm(2, 1))


@pytest.mark.parametrize("options", [{}, {"p": 2.0}, {"p": 0.1, "beta": -1}, {"p": 0.1, "mode": "mask"}])
def test_thr_option_validation(options):
    with pytest.raises(ValueError, match="algorithm.thr"):
        thr.check_options(options)
