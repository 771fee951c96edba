"""CPU time sharing: the per-phase thread plan (rltrain/dist/threads.py) and the actors applying it per call."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rltrain.dist.actors import RolloutWorker, use_threads
from rltrain.dist.threads import PhaseThreads, phase_threads, run_phase_threads
from rltrain.types import GenRequest, SamplingParams


@pytest.mark.parametrize(
    ("omp", "cores", "rollout", "learner", "overlapping", "expected"),
    [
        (1, 2, 1, 1, False, PhaseThreads(rollout=2, learner=2)),  # one phase at a time: each takes the machine
        (1, 2, 2, 1, False, PhaseThreads(rollout=1, learner=2)),  # two rollout workers split it while generating
        (1, 16, 3, 2, False, PhaseThreads(rollout=5, learner=8)),
        (1, 2, 1, 1, True, PhaseThreads(rollout=1, learner=1)),  # overlapping: each keeps its share
        (1, 16, 2, 2, True, PhaseThreads(rollout=4, learner=4)),
        (4, 2, 1, 1, False, PhaseThreads(rollout=4, learner=4)),  # never below cluster.omp_threads
        (1, 2, 4, 1, True, PhaseThreads(rollout=1, learner=1)),  # more actors than cores: at least one thread
    ],
)
def test_phase_threads(omp, cores, rollout, learner, overlapping, expected):
    assert phase_threads(omp, cores, rollout, learner, overlapping) == expected


@pytest.mark.parametrize(
    ("cores", "learner", "overlapping", "micro_threads"),
    [
        (2, 1, True, 2),  # overlapping: the torch learner's micro_threads take up the cores a waiting rollout leaves
        (2, 1, False, 2),
        (16, 2, False, 8),
        (2, 4, True, 1),
    ],
)
def test_a_torch_learner_gets_a_micro_batch_thread_per_core(cores, learner, overlapping, micro_threads):
    plan = phase_threads(1, cores, 1, learner, overlapping, micro_threads=True)
    assert plan.learner_micro_threads == micro_threads
    assert plan.learner == phase_threads(1, cores, 1, learner, overlapping).learner  # threads as without micro_threads
    assert phase_threads(1, cores, 1, learner, overlapping).learner_micro_threads == 1  # a DeepSpeed group: none


def cluster(**changes) -> SimpleNamespace:
    values = {"share_cpu_threads": True, "mode": "local", "omp_threads": 1, "num_cpus": 6}
    return SimpleNamespace(**{**values, **changes})


def test_run_plan_shares_a_local_cpu_machine_by_default():
    from rltrain.config import ClusterConfig

    assert ClusterConfig().share_cpu_threads is True
    assert run_phase_threads(cluster(), 2, 1, cluster_gpus=0, overlapping=False, micro_threads=True) == PhaseThreads(
        3, 6, 6
    )
    assert run_phase_threads(cluster(), 2, 1, cluster_gpus=0, overlapping=True, micro_threads=False) == PhaseThreads(
        2, 2
    )


@pytest.mark.parametrize(
    ("changes", "gpus"),
    [({"share_cpu_threads": False}, 0), ({"mode": "address"}, 0), ({}, 1)],
)
def test_run_plan_keeps_the_started_threads_when_off_joined_or_on_gpus(changes, gpus):
    plan = run_phase_threads(cluster(**changes), 1, 1, cluster_gpus=gpus, overlapping=False, micro_threads=True)
    assert plan == PhaseThreads()
    assert plan.learner_micro_threads == 1


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_use_threads_sets_the_count_for_the_call_and_none_keeps_it(restore_threads):
    use_threads(2)
    assert torch.get_num_threads() == 2
    use_threads(None)
    assert torch.get_num_threads() == 2
    use_threads(1)
    assert torch.get_num_threads() == 1


def test_rollout_worker_generates_with_the_threads_of_the_call(tiny_model_dir, restore_threads):
    worker = RolloutWorker("torch", tiny_model_dir, seed=0, threads=1, options={})
    assert torch.get_num_threads() == 1
    params = SamplingParams(max_tokens=3, seed=0)
    shared = worker.generate([GenRequest((5, 6, 7), n=2)], params, threads=2)
    assert torch.get_num_threads() == 2
    kept = worker.generate([GenRequest((5, 6, 7), n=2)], params)
    assert torch.get_num_threads() == 2
    assert [r.token_ids for r in shared[0]] == [r.token_ids for r in kept[0]]  # same seed, same samples
