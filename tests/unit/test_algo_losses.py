"""Policy losses, aggregation modes and KL estimators: hand-computed values, masking, micro-batch invariance."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from rltrain import algo
from rltrain.algo.aggregation import seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm, token_mean
from rltrain.algo.kl import k1, k2, k3, kl_token_penalty
from rltrain.algo.losses import gspo, ppo_clip
from rltrain.learner.base import LossFn, LossNorm
from rltrain.types import RolloutBatch

AGG_MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


def make_micro(mask: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, ref=None, rollout=None, extras=None):
    b, t = mask.shape
    return RolloutBatch(
        prompt_ids=torch.ones(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2),
        response_ids=torch.ones(b, t, dtype=torch.long),
        response_mask=mask,
        rollout_logprobs=old.clone() if rollout is None else rollout,
        group=torch.arange(b),
        finish_reason=torch.zeros(b, dtype=torch.long),
        policy_version=torch.zeros(b, dtype=torch.long),
        old_logprobs=old,
        ref_logprobs=ref,
        advantages=advantages,
        extras=extras or {},
    )


# ---- aggregation -------------------------------------------------------------------------------
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_aggregation_modes_hand_computed():
    norm = LossNorm(global_tokens=3, global_seqs=2)
    assert float(token_mean(VALUES, MASK, norm)) == pytest.approx(7 / 3)
    assert float(seq_mean_token_mean(VALUES, MASK, norm)) == pytest.approx((1.5 + 4.0) / 2)
    assert float(seq_mean_token_sum(VALUES, MASK, norm)) == pytest.approx(3.5)
    assert float(seq_mean_token_sum_norm(VALUES, MASK, norm, 4.0)) == pytest.approx(7 / 8)


def test_aggregation_divides_by_global_counts_not_micro_counts():
    norm = LossNorm(global_tokens=6, global_seqs=4)  # this micro-batch is part of a bigger step
    assert float(token_mean(VALUES, MASK, norm)) == pytest.approx(7 / 6)
    assert float(seq_mean_token_mean(VALUES, MASK, norm)) == pytest.approx(5.5 / 4)
    assert float(token_mean(VALUES, torch.zeros_like(MASK), LossNorm(0, 0))) == 0.0
    with pytest.raises(ValueError, match="loss_agg_constant"):
        seq_mean_token_sum_norm(VALUES, MASK, norm, None)


# ---- KL ----------------------------------------------------------------------------------------
def test_kl_estimators_values_and_gradients():
    ref = torch.tensor([math.log(0.25)], dtype=torch.float64)
    delta = math.log(2.0)
    expected = {"k1": (delta, 1.0), "k2": (delta**2 / 2, delta), "k3": (0.5 + delta - 1, 0.5)}
    expected["k1+"] = (delta, delta)  # value of k1, gradient of k2
    expected["k3+"] = (0.5 + delta - 1, delta)
    for name, (value, grad) in expected.items():
        logp = torch.tensor([math.log(0.5)], dtype=torch.float64, requires_grad=True)
        out = algo.get("kl", name)(logp, ref)
        out.sum().backward()
        assert float(out.detach()) == pytest.approx(value, abs=1e-12), name
        assert float(logp.grad) == pytest.approx(grad, abs=1e-12), name


def test_k3_is_nonnegative_and_clamped_like_verl():
    gen = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(100, generator=gen), torch.randn(100, generator=gen)
    assert (k3(logp, ref) >= 0).all()
    assert float(k3(torch.tensor([0.0]), torch.tensor([30.0]))) == 10.0  # exp(20) - 20 - 1 clamped to 10
    torch.testing.assert_close(k2(logp, ref), 0.5 * k1(logp, ref) ** 2)


def test_kl_token_penalty_is_per_masked_token_and_sums_to_the_reward_penalty():
    old = torch.tensor([[math.log(0.5), math.log(0.5), 7.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), 0.0]])
    micro = make_micro(torch.tensor([[1.0, 1.0, 0.0]]), old, torch.zeros(1, 3), ref=ref)
    per_token = kl_token_penalty(micro, coef=0.1, estimator="k1")
    torch.testing.assert_close(per_token, torch.tensor([[0.1 * math.log(2.0), 0.0, 0.0]]))
    torch.testing.assert_close(algo.kl_reward_penalty(micro, coef=0.1, estimator="k1"), per_token.sum(1))


def test_kl_reward_penalty_sums_masked_tokens():
    old = torch.tensor([[math.log(0.5), math.log(0.5), 7.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), 0.0]])
    micro = make_micro(torch.tensor([[1.0, 1.0, 0.0]]), old, torch.zeros(1, 3), ref=ref)
    penalty = algo.kl_reward_penalty(micro, coef=0.1, estimator="k1")
    torch.testing.assert_close(penalty, torch.tensor([0.1 * math.log(2.0)]))
    with pytest.raises(ValueError, match="ref_logprobs"):
        algo.kl_reward_penalty(micro.replace(ref_logprobs=None), 0.1)


# ---- policy losses -----------------------------------------------------------------------------
# one row, four tokens: (ratio, advantage) = (1.5, +1), (0.5, +1), (1.5, -1), (0.5, -1)
RATIOS = torch.tensor([[1.5, 0.5, 1.5, 0.5]])
ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
OLD = torch.zeros(1, 4)
FULL = torch.ones(1, 4)


def test_ppo_clip_hand_computed():
    out = ppo_clip(RATIOS.log(), OLD, ADV, FULL, clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(out.loss, torch.tensor([[-1.2, -0.5, 1.5, 0.8]]))
    assert out.clipped.tolist() == [[True, False, False, True]]
    assert not out.dual_clipped.any()


def test_ppo_clip_higher_and_dual_clip_hand_computed():
    out = ppo_clip(RATIOS.log(), OLD, ADV, FULL, clip_low=0.2, clip_high=0.28, clip_c=1.4)
    torch.testing.assert_close(out.loss, torch.tensor([[-1.28, -0.5, 1.4, 0.8]]))
    assert out.dual_clipped.tolist() == [[False, False, True, False]]
    loose = ppo_clip(RATIOS.log(), OLD, ADV, FULL, clip_c=3.0)  # bound 3 > 1.5: inactive
    torch.testing.assert_close(loose.loss[0, 2], torch.tensor(1.5))


def test_gspo_uses_length_normalised_sequence_ratio():
    logp = torch.tensor([[math.log(1.2), math.log(0.8), 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 30.0]], dtype=torch.float64)  # masked third token must not count
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    adv = torch.ones(1, 3, dtype=torch.float64)
    out = gspo(logp, old, adv, mask)
    s = math.sqrt(1.2 * 0.8)  # exp(mean log ratio) = 0.9798, below 1 - 3e-4: the unclipped term is active
    torch.testing.assert_close(out.loss[0, :2], torch.full((2,), -s, dtype=torch.float64))
    (out.loss * mask).sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-s, -s, 0.0]], dtype=torch.float64))


def test_gspo_refuses_a_dual_clip():
    with pytest.raises(ValueError, match="clip_c=3.0: gspo has no dual clip"):
        gspo(RATIOS.log(), OLD, -ADV, FULL, clip_c=3.0)


def test_tis_weights_are_capped_and_detached():
    old = torch.tensor([[math.log(3.0), math.log(0.5)]], requires_grad=True)
    weights, capped = algo.tis_weights(old, torch.zeros(1, 2), cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5]]))
    assert capped.tolist() == [[True, False]] and not weights.requires_grad


def test_loss_fn_hand_computed_with_tis_kl_entropy():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rollout = torch.tensor([[-math.log(3.0), 0.0, 0.0, 0.0]])  # tis weight of token 0: min(3, 2) = 2
    ref = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    micro = make_micro(mask, OLD, ADV, ref=ref, rollout=rollout)
    logp = RATIOS.log().requires_grad_()
    entropy = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    loss_fn = algo.make_loss_fn(tis_cap=2.0, kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01)
    loss, metrics = loss_fn(logp, entropy, micro, LossNorm(global_tokens=3, global_seqs=1))
    policy = (2 * -1.2 - 0.5 + 1.5) / 3
    kl = (math.log(1.5) + math.log(0.5) + math.log(1.5)) / 3
    assert float(loss.detach()) == pytest.approx(policy + 0.1 * kl - 0.01 * 2.0)
    assert metrics["loss/policy"] == pytest.approx(policy)
    assert metrics["loss/kl"] == pytest.approx(kl)
    assert metrics["loss/entropy"] == pytest.approx(2.0)
    assert metrics["loss/clipfrac"] == pytest.approx(1 / 3)
    assert metrics["loss/tis_clipfrac"] == pytest.approx(1 / 3)
    assert metrics["loss/clipfrac_lower"] == 0.0
    assert metrics["loss/approx_kl"] == pytest.approx(-kl)


DUAL_CLIP = {"ppo_clip": 3.0, "gspo": None}  # GSPO has no dual clip


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("policy_loss", ["ppo_clip", "gspo"])
def test_masked_tokens_get_zero_gradient(agg, policy_loss):
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    old = torch.where(mask > 0, torch.randn(2, 4, generator=gen), torch.full((2, 4), 40.0))  # garbage padding
    micro = make_micro(mask, old, torch.randn(2, 4, generator=gen), ref=old * 0.5, rollout=old - 30)
    logp = torch.randn(2, 4, generator=gen).requires_grad_()
    entropy = torch.rand(2, 4, generator=gen).requires_grad_()
    loss_fn = algo.make_loss_fn(
        policy_loss=policy_loss, loss_agg=agg, loss_agg_constant=4.0, clip_c=DUAL_CLIP[policy_loss], tis_cap=2.0,
        entropy_coef=0.01, kl_coef=0.1, kl_estimator="k3+",
    )  # fmt: skip
    loss, _ = loss_fn(logp, entropy, micro, LossNorm(global_tokens=5, global_seqs=2))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(logp.grad[mask == 0], torch.zeros(3)) and torch.equal(entropy.grad[mask == 0], torch.zeros(3))
    assert (logp.grad[mask > 0] != 0).any()


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("policy_loss", ["ppo_clip", "gspo"])
def test_micro_batch_contributions_sum_to_full_batch(agg, policy_loss):
    gen = torch.Generator().manual_seed(3)
    b, t = 8, 6
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.float64)
    old = torch.randn(b, t, generator=gen, dtype=torch.float64) * mask
    adv = torch.randn(b, 1, generator=gen, dtype=torch.float64) * mask
    micro = make_micro(mask, old, adv, ref=old + 0.3 * mask, rollout=old - 0.5 * mask)
    base_logp = old + 0.4 * torch.randn(b, t, generator=gen, dtype=torch.float64) * mask
    base_entropy = torch.rand(b, t, generator=gen, dtype=torch.float64)
    loss_fn = algo.make_loss_fn(
        policy_loss=policy_loss, loss_agg=agg, loss_agg_constant=6.0, clip_high=0.28, clip_c=DUAL_CLIP[policy_loss],
        tis_cap=1.5,
        entropy_coef=0.01, kl_coef=0.05, kl_estimator="k3",
    )  # fmt: skip
    norm = LossNorm(global_tokens=int(mask.sum()), global_seqs=b)

    logp_full, ent_full = base_logp.clone().requires_grad_(), base_entropy.clone().requires_grad_()
    loss_full, metrics_full = loss_fn(logp_full, ent_full, micro, norm)
    loss_full.backward()

    logp_split, ent_split = base_logp.clone().requires_grad_(), base_entropy.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    metrics_sum: dict[str, float] = {}
    for i in range(b):
        part, metrics = loss_fn(logp_split[i : i + 1], ent_split[i : i + 1], micro.select([i]), norm)
        part.backward()
        total = total + part.detach()
        for key, value in metrics.items():
            metrics_sum[key] = metrics_sum.get(key, 0.0) + value

    assert abs(float(total - loss_full.detach())) < 1e-10
    torch.testing.assert_close(logp_split.grad, logp_full.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(ent_split.grad, ent_full.grad, rtol=0, atol=1e-10)
    assert metrics_sum.keys() == metrics_full.keys()
    for key, value in metrics_full.items():
        assert metrics_sum[key] == pytest.approx(value, abs=1e-10), key


# ---- make_loss_fn contract ---------------------------------------------------------------------
def test_make_loss_fn_is_a_picklable_loss_fn():
    loss_fn = algo.make_loss_fn(entropy_coef=0.01)
    assert isinstance(loss_fn, LossFn) and loss_fn.needs_entropy
    assert not algo.make_loss_fn().needs_entropy
    assert pickle.loads(pickle.dumps(loss_fn)) == loss_fn


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy_loss": "cispo"}, r"unknown policy_loss 'cispo'; known: \['gspo', 'ppo_clip'\]"),
        ({"loss_agg": "seq-mean-token-mean"}, "unknown agg"),
        ({"kl_estimator": "k4"}, r"known: \['k1', 'k1\+', 'k2', 'k3', 'k3\+'\]"),
        ({"clip_c": 1.0}, "clip_c"),
        ({"policy_loss": "gspo", "clip_c": 3.0}, "clip_c=3.0: gspo has no dual clip"),
        ({"tis_cap": 0.0}, "tis_cap"),
        ({"clip_low": 1.0}, "clip_low"),
        ({"loss_agg": "seq_mean_token_sum_norm"}, "loss_agg_constant"),
        ({"thr": {"q": 1}}, "unknown key"),
    ],
)
def test_make_loss_fn_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        algo.make_loss_fn(**kwargs)


def test_loss_fn_needs_ref_logprobs_when_kl_is_a_loss_term():
    micro = make_micro(FULL, OLD, ADV)
    with pytest.raises(ValueError, match="ref_logprobs"):
        algo.make_loss_fn(kl_coef=0.1)(RATIOS.log(), None, micro, LossNorm(4, 1))
    with pytest.raises(ValueError, match="advantages"):
        algo.make_loss_fn()(RATIOS.log(), None, micro.replace(advantages=None), LossNorm(4, 1))
