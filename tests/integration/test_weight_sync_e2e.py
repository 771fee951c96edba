"""Collective weight sync (``rollout.weight_sync=collective``, gloo on CPU) into 2 real vLLM rollout actors:
policy version and logprobs after a step, a worker lost before a sync (fallback + group rebuilt), a worker
lost mid-generate (the replacement fetches the current weights). The CLI run with this sync is in test_vllm_e2e.py."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from test_vllm_e2e import (  # noqa: E402
    COLLECTIVE,
    LOGPROB_TOL,
    KillAtDispatch,
    greedy_logprob_gap,
    vllm_trainer,
    worker_versions,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """2 vLLM actors syncing by broadcast; the large learning rate makes a stale engine obvious."""
    with vllm_trainer(tmp_path_factory.mktemp("weight_sync"), *COLLECTIVE) as built:
        yield built


def test_a_step_syncs_by_broadcast_and_the_engines_match_the_learner(trainer):
    assert trainer.runtime.weight_sync.mode == "collective"
    metrics = trainer.step(1)
    assert worker_versions(trainer.runtime) == [1, 1]
    assert metrics["rollout/weight_sync_fallbacks"] == 0
    assert metrics["perf/weight_sync_mb"] > 0
    assert greedy_logprob_gap(trainer) <= LOGPROB_TOL
    metrics = trainer.step(2)  # the group is reused: still no fallback, engines still in step
    assert metrics["rollout/logprob_diff"] <= LOGPROB_TOL
    assert metrics["rollout/weight_sync_fallbacks"] == 0
    assert worker_versions(trainer.runtime) == [2, 2]


def test_a_worker_lost_before_the_sync_falls_back_then_the_group_is_rebuilt(trainer):
    import ray

    rollout = trainer.runtime.rollout
    replaced_before = rollout.replacements
    trainer.runtime.sync_weights(2)  # the group is open and in use
    ray.kill(rollout.workers[0], no_restart=True)
    metrics = trainer.runtime.sync_weights(3)
    assert metrics["rollout/weight_sync_fallbacks"] == 1
    assert rollout.replacements == replaced_before + 1
    assert worker_versions(trainer.runtime) == [3, 3]
    assert greedy_logprob_gap(trainer) <= LOGPROB_TOL
    metrics = trainer.step(4)  # rebuilt group (new member): broadcast again, no second fallback
    assert metrics["rollout/weight_sync_fallbacks"] == 1
    assert metrics["rollout/logprob_diff"] <= LOGPROB_TOL
    assert worker_versions(trainer.runtime) == [4, 4]


def test_a_worker_killed_mid_generate_gets_the_current_weights(trainer):
    rollout = trainer.runtime.rollout
    doomed = KillAtDispatch(rollout.workers[1])
    rollout.workers[1] = doomed
    metrics = trainer.step(5)  # generates with version 4; the replacement exports version 4 from the learner
    assert doomed.dispatched == 1
    assert metrics["rollout/logprob_diff"] <= LOGPROB_TOL
    assert worker_versions(trainer.runtime) == [5, 5]
    assert metrics["rollout/weight_sync_fallbacks"] == 1  # the group was rebuilt before the sync, not failed
