"""The trainer loop against an in-process fake runtime (tests/unit/fake_runtime.py): seconds, no Ray, no model."""

from __future__ import annotations

import json

import pytest
import torch
from fake_runtime import FakeRuntime, compose, prepared

from rltrain.algo.filters import nonconstant_group_mask
from rltrain.config import ConfigError
from rltrain.errors import RunError
from rltrain.trainer import Trainer, minibatch_rows
from rltrain.types import FinishReason


def make_trainer(overrides=(), runtime: FakeRuntime | None = None, **data) -> tuple[Trainer, FakeRuntime]:
    runtime = runtime or FakeRuntime()
    return Trainer(compose(overrides), prepared(**data), runtime), runtime


# ---- mini-batches of whole groups ---------------------------------------------------------------
def _groups_of(rows: torch.Tensor, group: torch.Tensor) -> list[int]:
    return sorted(set(group[rows].tolist()))


def test_minibatch_rows_split_whole_groups_near_equally():
    group = torch.tensor([5, 5, 7, 7, 7, 2, 2, 9, 9, 9, 9])
    chunks = minibatch_rows(group, epochs=1, mini_batches=3, generator=torch.Generator().manual_seed(0))
    assert [len(_groups_of(c, group)) for c in chunks] == [2, 1, 1]  # 4 groups in 3 chunks
    for chunk in chunks:  # every group in a chunk is there with all its rows
        assert all(int((group[chunk] == g).sum()) == int((group == g).sum()) for g in _groups_of(chunk, group))
    assert sorted(torch.cat(chunks).tolist()) == list(range(len(group)))
    assert torch.cat(chunks).tolist() == [5, 6, 0, 1, 2, 3, 4, 7, 8, 9, 10]  # one epoch: group order, no shuffle


def test_minibatch_rows_shuffle_groups_not_rows_across_epochs():
    group = torch.arange(8).repeat_interleave(3)  # 8 groups of 3 contiguous rows
    orders = set()
    for seed in range(5):
        chunks = minibatch_rows(group, epochs=2, mini_batches=2, generator=torch.Generator().manual_seed(seed))
        assert len(chunks) == 4
        for epoch in (chunks[:2], chunks[2:]):
            rows = torch.cat(epoch)
            assert sorted(rows.tolist()) == list(range(24))  # each epoch sees every row once
            assert all(rows[i : i + 3].tolist() == list(range(rows[i], rows[i] + 3)) for i in range(0, 24, 3))
            orders.add(tuple(rows.tolist()))
    assert len(orders) > 1  # the group order is shuffled


def test_minibatch_rows_refuse_more_mini_batches_than_groups():
    with pytest.raises(ConfigError, match=r"algorithm\.mini_batches=3: 1 to the batch's 2 groups"):
        minibatch_rows(torch.tensor([0, 0, 1, 1]), 1, 3, torch.Generator())


# ---- one step -----------------------------------------------------------------------------------
def test_step_trains_the_rollout_batch_and_syncs_its_version():
    trainer, runtime = make_trainer()
    metrics = trainer.step(1)
    (batch,) = runtime.train_batches
    assert batch.batch_size == 16 and batch.advantages is not None and runtime.synced == [1]
    assert metrics["rollout/gen_batches"] == 1.0 and metrics["rollout/logprob_diff"] == 0.0
    assert metrics["reward/mean"] == pytest.approx(float(batch.rewards.mean()))
    lengths = batch.response_mask.sum(-1)
    assert metrics["rollout/response_len_mean"] == pytest.approx(float(lengths.mean()))
    assert metrics["rollout/decoded"] == float(lengths.sum())
    assert metrics["reward/fake/tokens"] == pytest.approx(float(lengths.mean()))
    assert metrics["loss/nonfinite_skipped"] == 0.0 and "loss/policy" in metrics


def test_dynamic_sampling_refills_and_metrics_describe_the_trained_batch():
    trainer, runtime = make_trainer(["algorithm=dapo", "algorithm.overlong_buffer=0", "algorithm.filter_metric=acc"])
    metrics = trainer.step(1)
    (batch,) = runtime.train_batches
    gen_batches = runtime.grade_calls
    assert gen_batches > 1 and metrics["rollout/gen_batches"] == gen_batches == metrics["filter/gen_batches"]
    assert len(batch.group.unique()) == 4 and nonconstant_group_mask(batch.reward_parts["acc"], batch.group).all()
    # means are of the kept rows, not of the last generation batch
    assert metrics["reward/mean"] == pytest.approx(float(batch.rewards.mean()))
    assert metrics["reward/fake/mean"] == pytest.approx(float(batch.reward_parts["fake"].mean()))
    assert metrics["reward/accuracy"] == pytest.approx(float(batch.reward_parts["acc"].mean()))
    truncated = (batch.finish_reason == FinishReason.LENGTH).float().mean()
    assert metrics["rollout/truncated_frac"] == pytest.approx(float(truncated))
    # counters and times add up over generation batches, maxima take the max
    assert metrics["reward/errors/exception"] == gen_batches and metrics["perf/grading_s"] == 0.5 * gen_batches
    assert metrics["perf/grading_call_max_s"] == gen_batches
    prefill = sum(req.n * len(req.context_ids) for call in runtime.requests for req in call)
    assert metrics["rollout/prefill_computed"] == prefill


def test_overlong_shaping_and_filter_use_the_algo_filters():
    trainer, runtime = make_trainer(
        ["algorithm.overlong_buffer=3", "algorithm.overlong_penalty=1.0", "algorithm.overlong_filter=true"],
        FakeRuntime(reward_of=lambda row, tokens: 0.0),
    )
    metrics = trainer.step(1)
    (batch,) = runtime.train_batches
    truncated = batch.finish_reason == FinishReason.LENGTH
    assert truncated.any() and (~truncated).any()
    assert (batch.response_mask[truncated] == 0).all() and (batch.response_mask[~truncated].sum(-1) > 0).all()
    assert (batch.advantages[truncated] == 0).all()
    # soft punishment from 8 - 3 = 5 tokens: -(len - 5) / 3, at least -1 (truncated rows have 8 tokens)
    expected = (-(batch.response_mask.sum(-1).clamp(min=0) - 5) / 3).clamp(-1.0, 0.0)
    assert batch.rewards[truncated].eq(-1.0).all()
    torch.testing.assert_close(batch.rewards[~truncated], expected[~truncated])
    assert metrics["rollout/response_len_max"] == 8.0  # measured before the filter masked them


def _reinforce_pp_reference(rewards: list[float], lengths: list[int], beta_kl: float) -> list[list[float]]:
    """REINFORCE++ per token (arXiv 2501.03262): A_t = R - sum_{i>=t} beta KL_i, whitened over all tokens."""
    returns = [[r - beta_kl * (n - t) for t in range(n)] for r, n in zip(rewards, lengths)]
    flat = [g for row in returns for g in row]
    mean = sum(flat) / len(flat)
    var = sum((g - mean) ** 2 for g in flat) / (len(flat) - 1)
    return [[(g - mean) / (var + 1e-8) ** 0.5 for g in row] for row in returns]


def test_kl_in_reward_gives_reinforce_pp_per_token_returns():
    trainer, runtime = make_trainer(
        [
            "algorithm=reinforce_pp",
            "algorithm.kl_in_reward=true",
            "algorithm.kl_coef=0.1",
            "algorithm.kl_estimator=k1",
            "learner.use_reference=true",
        ],
        FakeRuntime(ref_shift=0.5),
    )
    metrics = trainer.step(1)
    (batch,) = runtime.train_batches
    lengths = batch.response_mask.sum(-1).long().tolist()
    assert len(set(lengths)) > 1
    expected = _reinforce_pp_reference(batch.rewards.tolist(), lengths, 0.1 * 0.5)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(batch.advantages[row, :n], torch.tensor(expected[row]), rtol=1e-4, atol=1e-5)
        assert (batch.advantages[row, n:] == 0).all()
    assert metrics["reward/kl_penalty"] == pytest.approx(0.05 * sum(lengths) / len(lengths))


def test_epochs_times_mini_batches_train_whole_groups_and_reduce_metrics():
    trainer, runtime = make_trainer(["algorithm.epochs=2", "algorithm.mini_batches=2"])
    metrics = trainer.step(1)
    assert len(runtime.train_batches) == 4
    for epoch in (runtime.train_batches[:2], runtime.train_batches[2:]):
        assert sum(b.batch_size for b in epoch) == 16
        for part in epoch:
            assert all(int((part.group == g).sum()) == 4 for g in part.group.unique())  # rollout.n = 4
    assert metrics["perf/lr"] == 0.25  # last
    assert metrics["loss/nonfinite_skipped"] == 0.0  # sum
    assert "loss/policy" in metrics and "loss/clipfrac" in metrics  # mean


def test_tree_sampler_statistics_reach_the_metrics_summed_over_generation_batches():
    trainer, runtime = make_trainer(
        ["rollout=tree", "rollout.max_tokens=8", "algorithm=dapo", "algorithm.overlong_buffer=0"],
        FakeRuntime(max_len=8),
    )
    sampled = []
    sample = trainer.sampler.sample

    def recording_sample(prompts, params):
        traj = sample(prompts, params)
        sampled.append(traj.metrics)
        return traj

    trainer.sampler.sample = recording_sample
    metrics = trainer.step(1)
    width = trainer.cfg.rollout.tree.width
    leaves = sum(v for k, v in metrics.items() if k.startswith("tree/leaves_"))
    assert leaves == width * 4 * len(sampled)
    assert metrics["tree/rounds"] == sum(m["tree/rounds"].value for m in sampled) >= len(sampled)
    assert metrics["tree/restarts"] == sum(m["tree/restarts"].value for m in sampled)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_nonfinite_update_is_counted_or_stops_the_run(policy):
    trainer, runtime = make_trainer([f"trainer.on_nonfinite={policy}"], FakeRuntime(nonfinite_calls=(0,)))
    if policy == "stop":
        with pytest.raises(RunError, match=r"step 1: the loss or gradient was not finite.*on_nonfinite=stop"):
            trainer.step(1)
        assert runtime.synced == []
    else:
        assert trainer.step(1)["loss/nonfinite_skipped"] == 1.0
        assert trainer.step(2)["loss/nonfinite_skipped"] == 0.0


def test_state_dict_round_trip_resumes_the_prompt_stream():
    trainer, runtime = make_trainer()
    trainer.step(1)
    state = json.loads(json.dumps(trainer.state_dict()))  # plain types only
    assert set(state) >= {"stream", "next_group_id"} and state["next_group_id"] == 4
    trainer.step(2)
    resumed, resumed_runtime = make_trainer()
    resumed.load_state_dict(state)
    resumed.step(2)
    assert resumed_runtime.requests == runtime.requests[1:]
    torch.testing.assert_close(resumed_runtime.train_batches[0].advantages, runtime.train_batches[1].advantages)
    assert resumed.state_dict() == trainer.state_dict()
