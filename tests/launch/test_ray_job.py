"""launch/ray_job.sh against a Ray head started here with its dashboard (the jobs API): a 5-step quickstart run,
and the one-line error where there is no jobs API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from launching import REPO, SMALL, free_port, processes_naming, read_metrics
from processes import kill_session

pytestmark = pytest.mark.launch

RAY_JOB = os.path.join(REPO, "launch", "ray_job.sh")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except OSError:
        return False


def _submit_error(address: str, env: dict[str, str]) -> str | None:
    """Why a trivial job cannot run yet (the last line of `ray job submit`), or None once it runs."""
    command = [RAY, "job", "submit", "--address", address, "--", "true"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


@pytest.fixture(scope="module")
def ray_head(launch_env):
    """`ray start --head --block` with the dashboard, own temp dir and ports; stopped by its pid. Yields the jobs
    API address."""
    temp_dir = tempfile.mkdtemp(prefix="rjob-", dir="/tmp")  # short: Ray's socket paths are length-capped
    dashboard_port = free_port()
    command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}"]
    command += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    # The job agent listens on 52365 unless told: another Ray on this machine may hold it ("No available agent").
    command += [f"--dashboard-agent-listen-port={free_port()}"]
    command += ["--num-cpus=4", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    command += ["--log-style=record", "--log-color=false"]
    log_path = os.path.join(temp_dir, "head.log")
    env = {**launch_env, "RAY_AUTH_MODE": "disabled"}  # the job's entrypoint inherits the head's environment
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 240
    # The jobs API answers before the node's job agent registers ("No available agent"): wait for a trivial job.
    error = "no jobs API yet"
    while error is not None:
        if head.poll() is not None or time.monotonic() > deadline:
            kill_session(head.pid)
            head_log = open(log_path).read()[-3000:]
            shutil.rmtree(temp_dir, ignore_errors=True)
            pytest.fail(f"the Ray head did not run a job ({error}):\n{head_log}")
        time.sleep(1)
        error = _submit_error(dashboard, env) if _answers(f"{dashboard}/api/version") else "no jobs API yet"
    yield dashboard
    head.terminate()  # `ray start --block` stops the processes it started
    try:
        head.wait(timeout=60)
    finally:
        kill_session(head.pid)
    left = processes_naming(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert left == [], f"Ray processes left by the head: {left}"


def test_ray_job_runs_a_five_step_quickstart(ray_head, launch_env, tmp_path):
    env = {**launch_env, "RAY_ADDRESS": ray_head, "RAY": RAY, "RLTRAIN_PYTHON": sys.executable, "CLUSTER": "ray"}
    env["RAY_AUTH_MODE"] = "disabled"
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [RAY_JOB, "quickstart", *SMALL, f"run.dir={run_dir}"], env=env, capture_output=True, text=True, timeout=420
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3, 4, 5]


def test_no_jobs_api_is_one_line_naming_the_fix(launch_env):
    address = f"http://127.0.0.1:{free_port()}"
    env = {**launch_env, "RAY_ADDRESS": address, "RAY": RAY}
    proc = subprocess.run([RAY_JOB, "quickstart"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"launch/ray_job.sh: no Ray jobs API at {address}")
    assert "rltrain[cluster]" in lines[0] and "ray[default]" in lines[0]
