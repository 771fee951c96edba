"""Fault injection through the real CLI: each fault of docs/reliability.md and its outcome. Runs whose fault is
injected into the run's own actors or Ray head start a local Ray below the run; the others join the session's head.

Faults are injected by real means: actor processes killed by pid (found by their Ray process title among the
run's descendants), reward functions that raise, hang or return NaN / None / overflowing values
(``data/faulty_rewards.py``), a checkpoint filesystem that fills up (a tiny tmpfs), SIGTERM as Slurm sends it,
and the run's Ray head (``gcs_server``) killed.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import cmdline, kill_session, processes
from test_quickstart_e2e import (
    FAST,
    PACED_REWARD,
    RESUMABLE,
    RESUMED_STEPS,
    _assert_same_numbers,
    _command,
    _env,
    _metrics,
    _rltrain,
)

pytestmark = pytest.mark.integration

FAULTY = os.path.join(os.path.dirname(__file__), "data", "faulty_rewards.py")
LENGTH = os.path.join(os.path.dirname(__file__), "data", "length_reward.py")
SAMPLES_PER_STEP = 16  # SMALL (test_quickstart_e2e): 4 prompts x 4 samples


def _reward_functions(*names: str, length_first: bool = True) -> str:
    entries = [f"{{fn: '{LENGTH}:score'}}"] if length_first else []
    entries += [f"{{fn: '{FAULTY}:{name}'}}" for name in names]
    return f"reward.functions=[{', '.join(entries)}]"


# ---- the run as a process tree -------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``: the run's Ray head (gcs_server, raylet) and, below the raylet, its actors."""
    children: dict[int, list[int]] = {}
    for child, parent, _ in processes():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _find(proc: subprocess.Popen, match, what: str, timeout_s: float = 300) -> int:
    """Pid of the run's descendant whose title satisfies ``match``, waiting for it to appear."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        for pid in _descendants(proc.pid):
            if match(cmdline(pid)):
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no {what} process under the run (exit code {proc.poll()})")


def _actor(name: str):
    return lambda title: title == f"ray::{name}" or title.startswith(f"ray::{name}.")


def _gcs_server(title: str) -> bool:
    return os.path.basename(title.split(" ", 1)[0]) == "gcs_server"


def _started(tmp_path: Path, *overrides: str, env: dict[str, str] | None = None, own_ray: bool = False):
    """The CLI running in the background (its own session), output to files; everything it started is killed
    on the way out, whatever the test did. ``own_ray``: a local Ray below the run, for tests that find the run's
    actors or Ray head among its descendants (otherwise the run joins the session's Ray head)."""
    return _running(tmp_path, _command(tmp_path, *overrides, own_ray=own_ray), env)


@contextlib.contextmanager
def _running(tmp_path: Path, command: list[str], env: dict[str, str] | None = None):
    """``command`` running in the background as ``_started`` describes."""
    logs = tmp_path / f"logs-{time.monotonic_ns()}"
    logs.mkdir()
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen(command, env={**_env(), **(env or {})}, stdout=out, stderr=err, start_new_session=True)
    proc.logs = logs
    try:
        yield proc
    finally:
        kill_session(proc.pid)  # the run leads its own session (start_new_session)
        proc.wait()


def _finished(proc: subprocess.Popen, within_s: float, after: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) once the run exits; a run still going after ``within_s`` fails the test."""
    try:
        code = proc.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"rltrain still running {within_s:g} s after {after}: {_tail(proc)}") from None
    return code, (proc.logs / "stdout").read_text(), (proc.logs / "stderr").read_text()


def _tail(proc: subprocess.Popen) -> str:
    return (proc.logs / "stderr").read_text()[-3000:]


def _wait_until(proc: subprocess.Popen, ready, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"rltrain exited ({proc.returncode}) before {what}: {_tail(proc)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"rltrain did not reach {what} in {timeout_s:g} s: {_tail(proc)}")
        time.sleep(0.1)


def _logged_steps(run_dir: Path) -> list[int]:
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    return [record["step"] for record in _metrics(run_dir)]


def _checkpoints(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        int(name.removeprefix("step_"))
        for name in os.listdir(root)
        if name.startswith("step_") and (root / name / "COMPLETE").is_file()
    )


def _error_line(stderr: str) -> str:
    """The one line the CLI prints for a RunError."""
    lines = [line for line in stderr.splitlines() if line.startswith("rltrain: error:")]
    assert lines, stderr[-3000:]
    return lines[0]


# ---- a run stopped three ways, each stop resumed -------------------------------------------------------------
def test_ctrl_c_sigterm_and_a_dead_learner_then_resume_give_the_uninterrupted_runs_numbers(tmp_path, uninterrupted):
    """Ctrl-C ends the run in one line whose resume command continues it; SIGTERM to that run (Slurm's --signal
    before preemption) checkpoints at the next step boundary and exits 0; the requeued run loses its learner actor
    mid-step and exits 1 naming it; resumed once more with run.resume=auto, every step equals the uninterrupted
    run's (rollout seeds follow the checkpointed prompt-stream position; same threads, CPU, fp32: deterministic)."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    with _started(tmp_path, *RESUMABLE, f"run.dir={run_dir}") as proc:
        _wait_until(proc, lambda: (ckpts / "step_1").is_dir(), "its step-1 checkpoint")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground process group
        code, _, stderr = _finished(proc, within_s=120, after="Ctrl-C")
    assert code == 130 and "Traceback" not in stderr, stderr[-5000:]
    lines = [line for line in stderr.splitlines() if line.startswith("rltrain:")]
    assert len(lines) == 1, stderr[-3000:]
    found = re.fullmatch(
        r"rltrain: interrupted at step (\d+); the last complete checkpoint is (\S+) \(step (\d+)\); "
        r"resume with: (rltrain --config-name quickstart .*)",
        lines[0],
    )
    assert found, lines[0]
    interrupted = int(found.group(3))
    assert found.group(2) == str(ckpts / f"step_{interrupted}") and interrupted <= 2, lines[0]
    command = shlex.split(found.group(4))
    assert command[-2:] == [f"run.dir={run_dir}", "run.resume=auto"]

    # The printed command, with no periodic checkpoint: the one after SIGTERM is SIGTERM's own.
    with _running(tmp_path, [sys.executable, "-m", *command, "trainer.save_every=100"]) as proc:
        _wait_until(proc, lambda: interrupted + 1 in _logged_steps(run_dir), f"step {interrupted + 1}")
        proc.send_signal(signal.SIGTERM)
        code, _, stderr = _finished(proc, within_s=120, after="SIGTERM")
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    saved = [step for step in _checkpoints(run_dir) if step > interrupted]
    assert len(saved) == 1 and saved[0] <= interrupted + 2 and _logged_steps(run_dir)[-1] == saved[0], saved

    with _started(tmp_path, *RESUMABLE, f"run.dir={run_dir}", own_ray=True) as proc:  # run.resume=auto: default
        learner = _find(proc, _actor("LearnerWorker"), "learner actor")
        _wait_until(proc, lambda: saved[0] + 1 in _checkpoints(run_dir), "its first checkpoint after the resume")
        os.kill(learner, signal.SIGKILL)
        code, _, stderr = _finished(proc, within_s=60, after="its learner actor was killed")
    assert code == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "learner" in _error_line(stderr) and "died" in _error_line(stderr)
    assert _checkpoints(run_dir)[-1] < RESUMED_STEPS

    _rltrain(tmp_path, *RESUMABLE, f"run.dir={run_dir}")
    assert sorted(os.listdir(ckpts)) == [f"step_{RESUMED_STEPS - 1}", f"step_{RESUMED_STEPS}"]  # keep 2, no tmp
    assert all((ckpts / name / "COMPLETE").is_file() for name in os.listdir(ckpts))
    _assert_same_numbers(run_dir, uninterrupted)


# ---- rewards -------------------------------------------------------------------------------------------------
def test_failing_reward_functions_and_a_killed_reward_actor_cost_on_error_and_the_run_completes(tmp_path):
    """Functions that raise, hang, return NaN or return None score reward.on_error and are counted by kind; the
    reward actor killed mid-run is replaced and its grading re-run."""
    run_dir = tmp_path / "run"
    faulty = [
        _reward_functions("raises", "hangs", "returns_nan", "returns_none"),
        "reward.on_error=-1.0",
        "reward.timeout_s=0.5",
        "reward.num_workers=4",  # 4 grader processes: the 16 hanging calls of a step take 4 deadlines, not 8
        "reward.max_error_frac=1.0",  # never stop: this test is about going on
    ]
    # Two steps: the actor is killed once step 1 is logged, so step 2 grades on its replacement.
    args = [*FAST, *faulty, "trainer.steps=2", "trainer.eval_every=0", f"run.dir={run_dir}"]
    with _started(tmp_path, *args, own_ray=True) as proc:
        _wait_until(proc, lambda: 1 in _logged_steps(run_dir), "step 1")
        os.kill(_find(proc, _actor("RewardWorker"), "reward actor"), signal.SIGKILL)
        code, _, stderr = _finished(proc, within_s=300, after="its reward actor was killed")
    assert code == 0, stderr[-3000:]
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[-1]["reward/worker_replacements"] >= 1
    for record in records[1:]:
        for name in ("raises", "hangs", "returns_nan", "returns_none"):
            assert record[f"reward/{name}/mean"] == -1.0, name  # every call of each scored reward.on_error
        errors = {kind: record[f"reward/errors/{kind}"] for kind in ("exception", "timeout", "nonfinite")}
        # raises and returns_none raise (None is no reward), hangs passes its deadline, returns_nan is NaN;
        # on a loaded machine a fast call may time out as well, so each kind is a lower bound.
        assert errors["timeout"] >= SAMPLES_PER_STEP and errors["exception"] >= 1 and errors["nonfinite"] >= 1
        assert sum(errors.values()) >= 4 * SAMPLES_PER_STEP
        assert math.isfinite(record["loss/total"])


def test_a_reward_failing_past_max_error_frac_stops_the_run_naming_it(tmp_path):
    only_raises = _reward_functions("raises", length_first=False)
    proc = _rltrain(tmp_path, *FAST, only_raises, "trainer.steps=2", f"run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = _error_line(proc.stderr)
    assert f"{FAULTY}:raises" in message and "injected fault" in message and "max_error_frac" in message


# ---- non-finite updates --------------------------------------------------------------------------------------
def test_non_finite_updates_are_skipped_and_counted_and_weights_stay_finite(tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    overflowing = [
        *FAST,
        _reward_functions("huge", length_first=False),
        "algorithm=dr_grpo",  # no std division: the huge rewards reach the loss as huge advantages
        "trainer.eval_every=0",
        "trainer.on_nonfinite=skip",
    ]
    _rltrain(tmp_path, *overflowing, "trainer.steps=2", f"run.dir={run_dir}")
    records = _metrics(run_dir)[1:]
    assert [r["step"] for r in records] == [1, 2]
    assert sum(r.get("loss/nonfinite_skipped", 0) for r in records) >= 1
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step_2")
    assert all(torch.isfinite(p).all() for p in policy.parameters()), "a non-finite update reached the weights"
    # trainer.on_nonfinite=stop turns the skipped update into a RunError: tests/unit/test_trainer.py (the CLI's
    # exit 1 for a RunError is checked by the other faults here).


# ---- storage -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _tmpfs(path: Path, size_mb: int):
    """A small tmpfs at ``path`` (needs root, as on the CI machine)."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> None:
    """Write one file until the filesystem is full."""
    chunk = b"\0" * 2**20
    with open(directory / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
                f.flush()


def test_a_full_disk_at_checkpoint_time_names_the_path_and_keeps_the_previous_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from rltrain.checkpoint import load_trainer_state

    run_dir = tmp_path / "run"
    args = [*FAST, PACED_REWARD, "trainer.steps=3", "trainer.save_every=1", "trainer.eval_every=0"]
    with _tmpfs(run_dir / "checkpoints", size_mb=64) as checkpoints:
        with _started(tmp_path, *args, f"run.dir={run_dir}") as proc:
            _wait_until(proc, lambda: 1 in _checkpoints(run_dir), "its step-1 checkpoint")
            _fill(checkpoints)
            code, _, stderr = _finished(proc, within_s=120, after="its checkpoint filesystem filled up")
        assert code == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert str(checkpoints) in _error_line(stderr)
        os.remove(checkpoints / "filler")
        assert _checkpoints(run_dir) == [1]
        assert load_trainer_state(str(checkpoints / "step_1"))["step"] == 1
        AutoModelForCausalLM.from_pretrained(checkpoints / "step_1")


# ---- the Ray head --------------------------------------------------------------------------------------------
def test_ray_head_lost_exits_non_zero_in_bounded_time(tmp_path):
    run_dir = tmp_path / "run"
    # Ray gives up on a lost head after RAY_gcs_rpc_server_reconnect_timeout_s (rltrain's default 20 s for its
    # local Ray; a user's value is kept): 5 s here keeps the test short without changing the path taken.
    env = {"RAY_gcs_rpc_server_reconnect_timeout_s": "5"}
    args = [*FAST, "trainer.steps=200", "trainer.eval_every=0", f"run.dir={run_dir}"]
    with _started(tmp_path, *args, env=env, own_ray=True) as proc:
        _wait_until(proc, lambda: 1 in _logged_steps(run_dir), "step 1")
        os.kill(_find(proc, _gcs_server, "gcs_server"), signal.SIGKILL)
        code, _, stderr = _finished(proc, within_s=180, after="its Ray head (gcs_server) was killed")
    assert code != 0, stderr[-3000:]
