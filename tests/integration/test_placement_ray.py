"""Placement groups on a real local Ray (CPU): actors land in their planned bundles; a plan the cluster
cannot hold fails fast, naming what it needs."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")

from rltrain.dist.placement import actor_options, plan_placement, release, reserve  # noqa: E402

pytestmark = pytest.mark.integration
CLUSTER_CPUS = 5  # a 2+2 plan needs 5: two pairs (or four actors) plus the reward worker


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=CLUSTER_CPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _probe_actor():
    """A tiny actor reporting its placement group; defined locally so Ray ships it by value (workers cannot
    import this test module)."""

    class Probe:
        def placement_group_id(self) -> str | None:
            return ray.get_runtime_context().get_placement_group_id()

    return ray.remote(Probe)


def _free_cpus_by_bundle(pg, count: int) -> list[float]:
    """Unused CPUs of each bundle, read from Ray's per-bundle resources (``CPU_group_<i>_<pg id>``)."""
    free = ray.available_resources()
    return [free.get(f"CPU_group_{index}_{pg.id.hex()}", 0.0) for index in range(count)]


def _eventually(read, expected, timeout_s: float = 15.0):
    """Ray reports available resources asynchronously: poll until ``read()`` equals ``expected``."""
    deadline = time.monotonic() + timeout_s
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert value == expected


def _place(pg, slots) -> list:
    actors = [_probe_actor().options(**actor_options(pg, slot)).remote() for slot in slots]
    assert ray.get([a.placement_group_id.remote() for a in actors], timeout=60) == [pg.id.hex()] * len(actors)
    return actors


def test_colocated_pairs_share_their_bundle():
    plan = plan_placement("colocated", 2, 0, 2, 0)
    pg = reserve(plan, timeout_s=30)
    try:
        assert ray.util.placement_group_table(pg)["bundles"] == dict(enumerate(plan.bundles))
        actors = _place(pg, [*plan.rollout, *plan.learner])
        # Both pairs fill their 2-CPU bundle; the reward worker's bundle is untouched.
        _eventually(lambda: _free_cpus_by_bundle(pg, 3), [0.0, 0.0, 1.0])
        for actor in actors:
            ray.kill(actor)
    finally:
        release(pg)
    _eventually(lambda: ray.available_resources().get("CPU"), float(CLUSTER_CPUS))


def test_disaggregated_actors_get_their_own_bundles():
    plan = plan_placement("disaggregated", 2, 0, 2, 0)
    pg = reserve(plan, timeout_s=30)
    try:
        actors = _place(pg, [*plan.rollout, plan.reward])
        # Rollout workers take bundles 0 and 1, the reward worker bundle 4; the learner ranks' stay free.
        _eventually(lambda: _free_cpus_by_bundle(pg, 5), [0.0, 0.0, 1.0, 1.0, 0.0])
        actors += _place(pg, plan.learner)
        _eventually(lambda: _free_cpus_by_bundle(pg, 5), [0.0] * 5)
        for actor in actors:
            ray.kill(actor)
    finally:
        release(pg)
        release(pg)  # idempotent


def test_impossible_plan_fails_fast_naming_the_need():
    plan = plan_placement("disaggregated", 98, 0, 1, 0)  # 100 CPUs
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"could not reserve .* \(100 bundles") as caught:
        reserve(plan, timeout_s=3)
    assert time.monotonic() - start < 20
    table = str(caught.value).splitlines()
    assert table[1].split() == ["resource", "needed", "total", "available"]
    assert table[2].split() == ["CPU", "100", str(CLUSTER_CPUS), str(CLUSTER_CPUS)]
    assert "rollout.num_workers" in str(caught.value)
    # The failed group was removed: nothing stays reserved.
    _eventually(lambda: ray.available_resources().get("CPU"), float(CLUSTER_CPUS))
