"""The reward actor on a real local Ray, driven by ``Runtime.grade``: a reward function over
``reward.max_error_frac`` reaches the driver as its own RunError; a dead reward actor is replaced and the call
re-run, a second death is a RunError; what the dead actor's reward functions left running is killed."""

from __future__ import annotations

import os
import time

import pytest
from processes import alive, gone
from ray_head import joined_ray

ray = pytest.importorskip("ray")

from rltrain.dist.groups import create_reward_worker  # noqa: E402
from rltrain.errors import RunError  # noqa: E402
from rltrain.grading import RewardFunctionError  # noqa: E402
from rltrain.runtime import Runtime  # noqa: E402

pytestmark = pytest.mark.integration
REWARDS = """
import os, signal, subprocess, time

def by_mode(completion, ground_truth, pids):
    if completion == "raise":
        raise ValueError("not a reward")
    if completion == "spawn":
        child = subprocess.Popen(["sleep", "300"], start_new_session=True)
        with open(pids, "a") as out:
            out.write(f"{child.pid}\\n")
    if completion == "kill actor":  # grader process -> forkserver -> the reward actor
        with open(f"/proc/{os.getppid()}/stat") as stat:
            os.kill(int(stat.read().rsplit(")", 1)[1].split()[1]), signal.SIGKILL)
        time.sleep(60)
    return 1.0
"""


@pytest.fixture(scope="module", autouse=True)
def session_ray():
    with joined_ray():
        yield


@pytest.fixture
def runtime(tmp_path):
    """A Runtime with only its reward half built (the reward actor as ``Runtime.__init__`` creates it)."""
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    options = {
        "functions": [{"fn": f"{path}:by_mode", "params": {"pids": str(tmp_path / "pids")}}],
        "num_workers": 1,
        "timeout_s": 30.0,
        "max_error_frac": 0.5,
        "process_tag": f"rltrain-test-{os.getpid()}",
    }
    runtime = Runtime.__new__(Runtime)
    runtime._reward_args = {"threads": 1, "grader_options": options, "placement": {"num_cpus": 1}}
    runtime.reward = create_reward_worker(**runtime._reward_args)
    runtime.reward_replacements = 0
    yield runtime
    ray.kill(runtime.reward)


def _kill(actor) -> None:
    """``ray.kill`` is asynchronous: a call sent right after it may still reach the actor. Return once it is dead."""
    ray.kill(actor)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed actor still answers after 60 s")


def _rows(n: int) -> list[dict]:
    return [{"answer": None}] * n


def test_a_function_over_max_error_frac_raises_its_own_error_at_the_driver(runtime):
    with pytest.raises(RewardFunctionError) as caught:
        runtime.grade(["raise", "raise", "ok"], _rows(3))
    assert type(caught.value) is RewardFunctionError  # unwrapped: not a RayTaskError
    assert "by_mode failed on 2 of 3 calls" in str(caught.value) and "ValueError: not a reward" in str(caught.value)
    assert runtime.grade(["ok", "raise"], _rows(2)).metrics["reward/worker_replacements"] == 0.0


def test_a_dead_reward_actor_is_replaced_and_its_leftovers_killed(runtime, tmp_path):
    assert runtime.grade(["spawn"], _rows(1)).rewards.tolist() == [1.0]
    (leftover,) = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
    assert alive(leftover)
    _kill(runtime.reward)
    result = runtime.grade(["ok", "ok"], _rows(2))
    assert result.rewards.tolist() == [1.0, 1.0] and result.metrics["reward/worker_replacements"] == 1.0
    assert gone([leftover])


def test_a_reward_actor_dying_twice_in_one_call_is_a_run_error(runtime):
    with pytest.raises(RunError, match=r"reward worker \(Ray actor RewardWorker\) died twice"):
        runtime.grade(["kill actor"], _rows(1))
    assert runtime.reward_replacements == 1
