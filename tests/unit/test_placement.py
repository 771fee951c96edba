"""Placement planning (pure): bundle shapes and actor slots for CPU/GPU × disaggregated/colocated."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rltrain.dist.placement import ActorSlot, gpu_shortfall, plan_placement, shortfall_message


def _fits(plan) -> None:
    """Every bundle holds the actors placed in it (Ray refuses an actor larger than its bundle's remainder)."""
    used: dict[int, dict[str, float]] = {}
    for slot in [*plan.rollout, *plan.learner, plan.reward]:
        bundle = used.setdefault(slot.bundle_index, {"CPU": 0.0, "GPU": 0.0})
        bundle["CPU"] += slot.num_cpus
        bundle["GPU"] += slot.num_gpus
    assert sorted(used) == list(range(len(plan.bundles)))  # no empty bundle, no slot outside the plan
    for index, need in used.items():
        have = plan.bundles[index]
        assert need["CPU"] <= have["CPU"] and need["GPU"] <= have.get("GPU", 0.0), (index, need, have)


def test_module_imports_without_ray():
    code = "import sys, rltrain.dist.placement; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_disaggregated_cpu_one_bundle_per_actor():
    plan = plan_placement("disaggregated", 2, 0, 3, 0)
    assert plan.bundles == [{"CPU": 1.0}] * 6
    assert plan.rollout == [ActorSlot(0, 1.0, 0.0), ActorSlot(1, 1.0, 0.0)]
    assert plan.learner == [ActorSlot(i, 1.0, 0.0) for i in (2, 3, 4)]
    assert plan.reward == ActorSlot(5, 1.0, 0.0)
    assert plan.strategy == "PACK"
    assert plan.totals() == {"CPU": 6.0}
    _fits(plan)


def test_disaggregated_gpu_rollout_takes_tp_gpus():
    plan = plan_placement("disaggregated", 2, 2, 2, 1)
    assert plan.bundles == [{"CPU": 1.0, "GPU": 2.0}] * 2 + [{"CPU": 1.0, "GPU": 1.0}] * 2 + [{"CPU": 1.0}]
    assert [s.num_gpus for s in plan.rollout] == [2.0, 2.0]
    assert [s.num_gpus for s in plan.learner] == [1.0, 1.0]
    assert plan.reward == ActorSlot(4, 1.0, 0.0)
    assert plan.totals() == {"CPU": 5.0, "GPU": 6.0}
    _fits(plan)


def test_colocated_cpu_pairs_share_a_bundle():
    plan = plan_placement("colocated", 2, 0, 2, 0)
    assert plan.bundles == [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 1.0}]
    assert plan.rollout == [ActorSlot(0, 1.0, 0.0), ActorSlot(1, 1.0, 0.0)]
    assert plan.learner == [ActorSlot(0, 1.0, 0.0), ActorSlot(1, 1.0, 0.0)]
    assert plan.reward == ActorSlot(2, 1.0, 0.0)
    _fits(plan)


def test_colocated_gpu_pairs_split_one_device():
    plan = plan_placement("colocated", 3, 1, 3, 1)
    assert plan.bundles == [{"CPU": 2.0, "GPU": 1.0}] * 3 + [{"CPU": 1.0}]
    assert all(s.num_gpus == 0.5 for s in [*plan.rollout, *plan.learner])
    assert [s.bundle_index for s in plan.rollout] == [s.bundle_index for s in plan.learner] == [0, 1, 2]
    assert plan.totals() == {"CPU": 7.0, "GPU": 3.0}
    _fits(plan)


def test_colocated_gpu_single_user_takes_whole_device():
    """A CPU rollout engine (torch engine) beside a GPU learner rank: the rank keeps the whole device."""
    plan = plan_placement("colocated", 1, 0, 1, 1)
    assert plan.bundles[0] == {"CPU": 2.0, "GPU": 1.0}
    assert plan.rollout[0].num_gpus == 0.0 and plan.learner[0].num_gpus == 1.0
    _fits(plan)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("colocated", 2, 0, 1, 0), "must equal learner.world_size=1"),
        (("colocated", 2, 2, 2, 1), "at most 1 GPU"),
        (("disaggregated", 0, 0, 1, 0), "at least one rollout worker"),
        (("disaggregated", 1, 0, -1, 0), "at least one rollout worker"),
        (("disaggregated", 1, -1, 1, 0), "got -1"),
        (("disaggregated", 1, 0, 1, 2), "a learner rank takes 0 or 1"),
        (("spread", 1, 0, 1, 0), "cluster.placement must be one of"),
    ],
)
def test_bad_combinations_raise(args, match):
    with pytest.raises(ValueError, match=match):
        plan_placement(*args)


def test_shortfall_message_names_needs_and_keys():
    plan = plan_placement("colocated", 2, 1, 2, 1)
    message = shortfall_message(plan, 3.0, {"CPU": 4.0}, {"CPU": 2.0})
    for part in ("3 bundles", "CPU=2, GPU=1", "resource  needed  total  available", "CPU       5       4      2"):
        assert part in message, (part, message)
    assert message.splitlines()[3].split() == ["GPU", "2", "0", "0"]
    for key in ("rollout.num_workers", "learner.world_size", "cluster.placement", "cluster.num_cpus"):
        assert key in message


def test_shortfall_message_of_a_joined_cluster_has_no_local_ray_hint():
    plan = plan_placement("disaggregated", 1, 0, 1, 0)
    message = shortfall_message(plan, 60.0, {"CPU": 2.0}, {"CPU": 2.0}, local_ray=False)
    assert "within 60s" in message and "cluster.num_cpus" not in message
    assert "learner.world_size" in message and "cluster.placement_timeout_s" in message


def test_a_gpu_shortfall_names_the_key_the_holder_and_the_fix():
    message = gpu_shortfall(2, 1, "the Ray cluster")
    assert message.startswith("cluster.num_gpus=2, but the Ray cluster has 1 GPUs;")
    assert "lower cluster.num_gpus (0 on CPU)" in message
    assert gpu_shortfall(2, 2, "this machine") is None and gpu_shortfall(0, 0, "this machine") is None
