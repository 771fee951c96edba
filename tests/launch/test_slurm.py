"""launch/slurm/rltrain.sbatch on a one-node Slurm: the default layout runs, SIGTERM checkpoints and a requeued
attempt resumes as if never stopped, a layout that cannot fit fails before Ray starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from launching import REPO, SMALL, assert_same_metrics, free_port, processes_naming, read_metrics

pytestmark = [pytest.mark.launch, pytest.mark.usefixtures("slurm")]

SBATCH = os.path.join(REPO, "launch", "slurm", "rltrain.sbatch")
SUBMITTED: list[str] = []  # job ids, whose Ray temp dirs (/tmp/ray-slurm-<job id>) go at the end
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")


def _submit(env, tmp, *overrides: str, wait: bool = False, **job_env: str) -> tuple[str, subprocess.CompletedProcess]:
    """sbatch the launcher with the quickstart recipe; returns the job id and sbatch's result."""
    env = {**env, "RECIPE": "quickstart", "RAY_PORT": str(free_port()), "RAY_AUTH_MODE": "disabled", **job_env}
    env["RAY_START_ARGS"] = "--include-dashboard=false"
    command = ["sbatch", "--parsable", f"--output={tmp}/job-%j.out", *(["--wait"] if wait else []), SBATCH]
    proc = subprocess.run([*command, *overrides], capture_output=True, text=True, env=env, timeout=600, cwd=tmp)
    job_id = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else ""
    assert job_id.isdigit(), f"sbatch did not submit: {proc.stdout}\n{proc.stderr}"
    SUBMITTED.append(job_id)
    return job_id, proc


@pytest.fixture(scope="module", autouse=True)
def _remove_ray_temp_dirs():
    yield
    for job_id in SUBMITTED:
        shutil.rmtree(f"/tmp/ray-slurm-{job_id}", ignore_errors=True)


def _job(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (MinJobAge keeps a finished job queryable)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _wait_finished(job_id: str, timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = _job(job_id)
        if info["JobState"] in FINISHED:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish within {timeout_s:g} s: {_job(job_id)['JobState']}")


def _wait_state(job_id: str, state: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while _job(job_id)["JobState"] != state:
        assert time.monotonic() < deadline, f"job {job_id} is {_job(job_id)['JobState']}, not {state}"
        time.sleep(0.2)


def _log(tmp, job_id: str) -> str:
    with open(os.path.join(tmp, f"job-{job_id}.out"), encoding="utf-8", errors="replace") as f:
        return f.read()


@pytest.fixture(scope="module")
def straight(launch_env, tmp_path_factory):
    """An uninterrupted 5-step run through sbatch with no layout override: (job id, log dir, run dir)."""
    tmp = tmp_path_factory.mktemp("straight")
    job_id, proc = _submit(launch_env, tmp, *SMALL, f"run.dir={tmp}/run", wait=True)
    assert proc.returncode == 0, _log(tmp, job_id)[-5000:]
    return job_id, tmp, tmp / "run"


def test_sbatch_completes_with_the_layout_slurm_gave(straight):
    job_id, tmp, run_dir = straight
    info = _job(job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0")
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3, 4, 5]
    assert processes_naming(f"ray-slurm-{job_id}") == []
    log = _log(tmp, job_id)
    assert f"job {job_id} attempt 1 on" in log
    assert "layout from Slurm: learner=torch rollout.num_workers=1 cluster.num_gpus=0" in log
    assert "quickstart step 5/5 (100%)" in log  # the plain progress line: stdout is a file
    assert "\x1b[" not in log


def test_sigterm_checkpoints_at_the_next_step_and_the_requeued_attempt_resumes_identically(
    straight, launch_env, tmp_path
):
    run_dir = tmp_path / "run"
    job_id, _ = _submit(launch_env, tmp_path, *SMALL, f"run.dir={run_dir}")
    deadline = time.monotonic() + 300
    while len(read_metrics(run_dir)) < 3 and time.monotonic() < deadline:  # step 0 (eval) and steps 1, 2 logged
        assert _job(job_id)["JobState"] not in FINISHED, _log(tmp_path, job_id)[-5000:]
        time.sleep(0.2)
    signalled = time.monotonic()
    # A plain scancel signals the job's steps only: the sbatch's relay step hands it to rltrain (docs/cluster.md).
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    info = _wait_finished(job_id, timeout_s=90)
    assert time.monotonic() - signalled <= 30, "the job took more than 30 s to stop after SIGTERM"
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), _log(tmp_path, job_id)[-5000:]
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert 2 <= stopped_at < 5
    assert os.path.isfile(run_dir / "checkpoints" / f"step_{stopped_at}" / "COMPLETE")
    log = _log(tmp_path, job_id)
    assert "forwarding it to rltrain" in log and f"stopped by SIGTERM after step {stopped_at}" in log
    assert processes_naming(f"ray-slurm-{job_id}") == []

    # slurmd revoked the job's credential as it ended, with a one-second resolution: a restart within that second
    # is refused ("Job credential revoked"). Slurm's own requeue hold (below) avoids that; this test waits 2 s.
    time.sleep(2)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    _wait_state(job_id, "PENDING")
    # Slurm holds a requeued job for about two minutes (its begin time); release it now.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    info = _wait_finished(job_id, timeout_s=420)
    log = _log(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-5000:]
    assert f"job {job_id} attempt 1 on" in log and f"job {job_id} attempt 2 on" in log  # one log, appended
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at}" in log
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert_same_metrics(records, read_metrics(straight[2]))


def test_a_layout_that_cannot_fit_fails_before_ray_starts(launch_env, tmp_path):
    started = time.monotonic()
    job_id, proc = _submit(launch_env, tmp_path, *SMALL, f"run.dir={tmp_path}/run", wait=True, CLUSTER="multi_node")
    assert time.monotonic() - started < 60
    info = _job(job_id)
    log = _log(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    assert "rltrain: config error: cluster.num_gpus=16" in log and "resource  needed  job" in log
    assert "Ray was not started" in log and not os.path.exists(tmp_path / "run")
