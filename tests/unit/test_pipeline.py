"""The asynchronous pipeline (trainer.max_staleness >= 1) against the in-process fake runtime: the staleness bound
holds whatever the speeds of generation and training, after a resume and after a worker that comes back with old
weights; nothing is lost, reordered or trained twice."""

from __future__ import annotations

import random

import pytest
import torch
from fake_runtime import FakeRuntime, compose, prepared
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rltrain.errors import RunError
from rltrain.pipeline import STALE_DROPPED, STALENESS_MAX, staleness_filter
from rltrain.trainer import Trainer
from rltrain.types import FinishReason, GenResult, build_rollout_batch


def _trainer(overrides=(), runtime: FakeRuntime | None = None) -> tuple[Trainer, FakeRuntime]:
    runtime = runtime or FakeRuntime()
    return Trainer(compose(["trainer.steps=6", *overrides]), prepared(), runtime), runtime


def _run(trainer: Trainer, steps, close: bool = True) -> list[dict]:
    """Run ``steps``; each step's metrics get ``_trained``: the batches the runtime trained in it."""
    runtime, records = trainer.runtime, []
    try:
        for step in steps:
            before = len(runtime.train_batches)
            metrics = trainer.step(step)
            records.append({**metrics, "_step": step, "_trained": runtime.train_batches[before:]})
        return records
    finally:
        if close:
            trainer.close()


def _assert_bound(records: list[dict], k: int) -> None:
    """Every trained token was sampled at most k versions before the learner's version at its step."""
    for record in records:
        for batch in record["_trained"]:
            oldest = int(batch.token_version[batch.response_mask > 0].min())
            assert (record["_step"] - 1) - oldest <= k, f"step {record['_step']} trained tokens of version {oldest}"
            assert int(batch.policy_version.min()) == oldest


def _prompts(batches) -> list[list[int]]:
    return [sorted(set(batch.prompt_ids[:, -1].tolist())) for batch in batches]


# ---- the filter ---------------------------------------------------------------------------------
def _batch(versions: list[int], groups: list[int]):
    results = [GenResult((5, 6), (-1.0, -1.0), FinishReason.STOP, policy_version=v) for v in versions]
    return build_rollout_batch([[1, 2]] * len(versions), results, groups)


def test_the_filter_drops_whole_groups_with_a_stale_member_and_counts_them():
    batch = _batch([3, 4, 4, 4, 2, 2], [0, 0, 1, 1, 2, 2])
    kept, metrics = staleness_filter(batch, learner_version=4, max_staleness=1)
    assert kept.group.tolist() == [0, 0, 1, 1]  # group 2 (version 2) is 2 versions old
    assert metrics[STALE_DROPPED] == 2.0 and metrics[STALENESS_MAX] == 1.0
    assert metrics["rollout/staleness_mean"] == pytest.approx(0.25)
    assert metrics["rollout/tokens_per_version/lag_0"] == 6.0 and metrics["rollout/tokens_per_version/lag_1"] == 2.0
    assert staleness_filter(batch, learner_version=9, max_staleness=1)[0] is None


def test_per_token_versions_come_from_the_engine_and_the_row_version_is_the_oldest():
    mixed = GenResult((5, 6, 7), (-1.0,) * 3, FinishReason.STOP, policy_version=2, token_versions=(2, 2, 3))
    batch = build_rollout_batch(
        [[1], [1]], [mixed, GenResult((5,), (-1.0,), FinishReason.STOP, policy_version=3)], [0, 1]
    )
    assert batch.token_version.tolist() == [[2, 2, 3], [3, 0, 0]]
    assert batch.policy_version.tolist() == [2, 3]


# ---- the trainer with the pipeline -------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_k_steps_ahead_train_the_same_prompts_in_order_within_the_bound(k):
    sync_trainer, sync_runtime = _trainer()
    _run(sync_trainer, range(1, 7))
    trainer, runtime = _trainer([f"trainer.max_staleness={k}"])
    metrics = _run(trainer, range(1, 7))
    assert _prompts(runtime.train_batches) == _prompts(sync_runtime.train_batches)
    assert runtime.published == [1, 2, 3, 4, 5, 6] and runtime.synced == []
    _assert_bound(metrics, k)
    assert all(m[STALE_DROPPED] == 0.0 and m[STALENESS_MAX] <= k for m in metrics)
    assert all("perf/buffer_wait_s" in m and "perf/rollout_idle_s" in m for m in metrics)
    assert trainer.state_dict() == sync_trainer.state_dict()  # the position after the last trained batch


def test_the_checkpointed_position_is_after_the_trained_batch_not_the_prefetched_ones():
    trainer, runtime = _trainer(["trainer.max_staleness=2"])
    _run(trainer, range(1, 3), close=False)
    reference, _ = _trainer()
    _run(reference, range(1, 3))
    assert trainer.state_dict() == reference.state_dict()
    trainer.close()


def test_a_resumed_pipeline_trains_what_the_uninterrupted_one_would():
    whole, whole_runtime = _trainer(["trainer.max_staleness=1"])
    _run(whole, range(1, 7))
    first, _ = _trainer(["trainer.max_staleness=1"])
    _run(first, range(1, 4))
    state = {**first.state_dict(), "step": 3}
    resumed, runtime = _trainer(["trainer.max_staleness=1"], FakeRuntime(version=3))
    resumed.load_state_dict(state)
    records = _run(resumed, range(4, 7))
    assert _prompts(runtime.train_batches) == _prompts(whole_runtime.train_batches[3:])
    assert [b.group.unique().tolist() for b in runtime.train_batches] == [
        b.group.unique().tolist() for b in whole_runtime.train_batches[3:]
    ]
    _assert_bound(records, 1)


class StaleReplacement(FakeRuntime):
    """A rollout worker replaced before generate call ``at`` comes back holding version 0 (a bug the filter must
    catch): its batch may not be trained."""

    at: int = 3

    def generate(self, requests, params):
        if len(self.requests) == self.at:
            self.version = 0
        return super().generate(requests, params)


def test_tokens_from_weights_older_than_the_bound_are_dropped_and_counted_never_trained():
    trainer, runtime = _trainer(["trainer.max_staleness=1"], StaleReplacement())
    metrics = _run(trainer, range(1, 7))
    _assert_bound(metrics, 1)
    dropped = [m[STALE_DROPPED] for m in metrics]
    assert sum(dropped) == 16.0  # the whole batch of the replaced worker's call (4 prompts x 4)
    assert len(runtime.train_batches) == 5  # that step trained nothing


def test_a_failure_in_the_rollout_thread_stops_the_step_with_it():
    class Failing(FakeRuntime):
        def grade(self, completions, rows):
            if self.grade_calls == 2:
                raise RunError("reward function 'fake' failed on most samples")
            return super().grade(completions, rows)

    trainer, _ = _trainer(["trainer.max_staleness=1"], Failing())
    with pytest.raises(RunError, match="failed on most samples"):
        _run(trainer, range(1, 7))


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    phases=[Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    k=st.integers(1, 3),
    seed=st.integers(0, 10**6),
    dynamic=st.booleans(),
)
def test_the_bound_holds_whatever_the_speeds(k, seed, dynamic):
    rng = random.Random(seed)
    gen = [rng.choice([0.0, 0.0, 0.002, 0.01]) for _ in range(200)]
    train = [rng.choice([0.0, 0.002, 0.01]) for _ in range(200)]
    runtime = FakeRuntime(generate_delay_s=lambda call: gen[call % 200], train_delay_s=lambda call: train[call % 200])
    overrides = [f"trainer.max_staleness={k}"]
    if dynamic:
        overrides += ["algorithm=dapo", "algorithm.overlong_buffer=0", "algorithm.filter_metric=acc"]
    trainer, runtime = _trainer(overrides, runtime)
    metrics = _run(trainer, range(1, 7))
    _assert_bound(metrics, k)
    assert len(runtime.train_batches) == 6 and all(m[STALENESS_MAX] <= k for m in metrics)
    reference, reference_runtime = _trainer(overrides[1:])  # the synchronous loop, same config
    _run(reference, range(1, 7))
    assert _prompts(runtime.train_batches) == _prompts(reference_runtime.train_batches)  # none lost or repeated


def test_the_logprob_check_runs_on_on_policy_batches_only():
    trainer, runtime = _trainer(["trainer.max_staleness=1"])
    metrics = _run(trainer, range(1, 4))
    assert "rollout/logprob_diff" in metrics[0]  # step 1: sampled by version 0, trained at version 0
    for m, batch in zip(metrics, runtime.train_batches):
        on_policy = bool((batch.token_version[batch.response_mask > 0] == batch.token_version.max()).all())
        assert ("rollout/logprob_diff" in m) or ("rollout/offpolicy_logprob_diff" in m)
        assert on_policy or "rollout/logprob_diff" not in m


def test_the_synchronous_loop_has_no_separate_old_logprob_forward_when_one_step_trains_the_batch():
    trainer, runtime = _trainer()
    metrics = trainer.step(1)
    assert runtime.awake_calls == [True, False, True]  # generate, learn (engines asleep on a GPU), sync
    assert runtime.train_batches[0].old_logprobs is None and metrics["rollout/logprob_diff"] == 0.0
    trainer, runtime = _trainer(["algorithm.mini_batches=2"])
    trainer.step(1)
    assert all(batch.old_logprobs is not None for batch in runtime.train_batches)


def test_token_versions_survive_select_and_concat():
    batch = _batch([1, 2], [0, 1])
    assert torch.equal(batch.select([1]).token_version, torch.tensor([[2, 2]]))
    assert type(batch).concat([batch, batch]).token_version.shape == (4, 2)


# ---- partial rollouts ---------------------------------------------------------------------------
def test_chunked_generation_joins_chunks_and_records_the_weights_switch():
    from rltrain.rollout.partial import generate_in_chunks
    from rltrain.types import GenRequest, SamplingParams

    runtime = FakeRuntime(max_len=12)

    def new_weights():
        runtime.version += 1

    requests = [GenRequest((1, 2, 10 + i), n=2) for i in range(6)]
    params = SamplingParams(max_tokens=10, seed=5)
    outputs = generate_in_chunks(runtime.generate, requests, params, chunk_tokens=4, between_chunks=new_weights)
    assert [len(group) for group in outputs] == [2] * 6
    results = [r for group in outputs for r in group]
    assert all(len(r.token_ids) <= 10 and len(r.logprobs) == len(r.token_ids) for r in results)
    assert all(r.finish_reason == FinishReason.LENGTH for r in results if len(r.token_ids) == 10)
    long = [r for r in results if len(r.token_ids) > 4]
    assert long and all(r.versions()[:4] == (0,) * 4 and r.versions()[4] == 1 for r in long)
    assert all(r.policy_version == 0 and set(r.versions()) <= {0, 1, 2} for r in results)
    assert all(not r.token_versions for r in results if len(r.token_ids) <= 4)  # one version: no per-token list
    continued = runtime.requests[1]  # the second call continues the long ones with their tokens as context
    assert all(len(request.prefix_ids) == 4 and request.n == 1 for request in continued)


def test_partial_rollouts_train_multi_version_trajectories_within_the_bound():
    trainer, runtime = _trainer(
        ["trainer.max_staleness=2", "rollout.partial=true", "rollout.partial_chunk_tokens=3"],
        FakeRuntime(train_delay_s=lambda call: 0.01),
    )
    records = _run(trainer, range(1, 7))
    _assert_bound(records, 2)
    assert runtime.train_batches and all(b.token_version is not None for b in runtime.train_batches)
