"""Nothing a reward function starts outlives its grader: processes in their own session, orphans, a crashed
grader's leftovers (real processes; Linux /proc)."""

import os
import subprocess
import sys
import time

import pytest
from processes import alive, gone

from rltrain.grading import RewardGrader
from rltrain.grading.procs import TAG_VARIABLE, descendants, kill_tree

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="process trees are read from /proc")

SPAWNS = """
import os, subprocess, time

def spawn(completion, ground_truth, pids):
    if completion == "orphan":  # the shell exits at once: sleep is re-parented (to the grader, a subreaper)
        shell = subprocess.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                               start_new_session=True)
        pid = int(shell.stdout)
    else:
        pid = subprocess.Popen(["sleep", "300"], start_new_session=True).pid
    with open(pids, "a") as out:
        out.write(f"{pid}\\n")
    if completion == "hang":
        time.sleep(3600)
    if completion == "crash":
        os._exit(9)
    return 1.0
"""


def _grader(tmp_path, pids_file):
    path = tmp_path / "spawns.py"
    path.write_text(SPAWNS)
    functions = [{"fn": f"{path}:spawn", "params": {"pids": str(pids_file)}}]
    return RewardGrader(functions, num_workers=2, timeout_s=2.0, max_error_frac=1.0)


def _pids(pids_file) -> list[int]:
    return [int(line) for line in pids_file.read_text().split()]


def test_a_timed_out_call_takes_its_new_session_children_with_it(tmp_path):
    pids_file = tmp_path / "pids"
    with _grader(tmp_path, pids_file) as grader:
        result = grader.grade(["hang"], [{"answer": None}])
        assert result.metrics["reward/errors/timeout"] == 1.0
        assert gone(_pids(pids_file))  # killed with the call, not at close


def test_close_kills_what_returning_calls_left_running(tmp_path):
    pids_file = tmp_path / "pids"
    with _grader(tmp_path, pids_file) as grader:
        assert grader.grade(["child", "orphan"] * 2, [{"answer": None}] * 4).rewards.tolist() == [1.0] * 4
        assert all(alive(pid) for pid in _pids(pids_file))  # a call may leave a helper running for later calls
    assert gone(_pids(pids_file))


def test_a_crashed_grader_leaves_nothing_behind(tmp_path):
    pids_file = tmp_path / "pids"
    with _grader(tmp_path, pids_file) as grader:
        assert grader.grade(["crash"], [{"answer": None}]).metrics["reward/errors/crash"] == 1.0
        assert gone(_pids(pids_file))


def test_kill_tree_finds_processes_by_parent_chain_and_by_tag():
    tagged = subprocess.Popen(["sleep", "300"], env={**os.environ, TAG_VARIABLE: "t-test/1"}, start_new_session=True)
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"]
    )
    try:
        deadline = time.monotonic() + 30
        while not descendants({parent.pid}) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = descendants({parent.pid})
        assert len(child) == 1 and tagged.pid in descendants(set(), "t-test")
        assert tagged.pid not in descendants(set(), "t-tes")  # a tag matches whole, or as a pool prefix "t-test/"
        kill_tree(parent.pid)
        kill_tree(None, "t-test")
        assert gone([parent.pid, tagged.pid, *child])
    finally:
        for process in (tagged, parent):
            process.kill()
            process.wait()
