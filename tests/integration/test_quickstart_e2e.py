"""The quickstart recipe end to end through the real CLI: Ray actors, torch engine, grader pool, learner."""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

pytestmark = pytest.mark.integration

SMALL = [
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=128",
    "model.tiny.num_layers=2",
    "data.num_train=256",
    "data.num_eval=16",
    "sft.steps=5",
    "sft.batch_size=16",
    "trainer.prompts_per_step=4",
    "rollout.n=4",
    "tracking=minimal",
    "reward.num_workers=1",
    # a custom reward function by file path: non-constant even for an untrained policy
    f"reward.functions=[{{fn: '{os.path.dirname(__file__)}/data/length_reward.py:score', weight: 1.0}}]",
]


# One model cache for the whole pytest session: the tiny model and its SFT warm start are keyed by a hash of
# their settings, so runs of the same settings share them instead of rebuilding them per test.
SESSION_CACHE = os.path.join(tempfile.gettempdir(), f"rltrain-test-cache-{os.getpid()}")
atexit.register(shutil.rmtree, SESSION_CACHE, True)
# A reward that sleeps 50 ms a call and adds 0: a tiny model's step takes ~1 s instead of a few ms, so a signal
# sent when step k is seen done lands in step k + 1, as in a real run.
PACED_REWARD = (
    f"reward.functions=[{{fn: '{os.path.dirname(__file__)}/data/length_reward.py:score'}}, "
    f"{{fn: '{os.path.dirname(__file__)}/data/faulty_rewards.py:sleeps'}}]"
)


def _command(tmp_path, *overrides: str, cache_dir=None) -> list[str]:
    """The rltrain CLI on the shrunk quickstart; models cached in ``cache_dir`` (default: the session's cache)."""
    cache = f"model.cache_dir={cache_dir or SESSION_CACHE}"
    return [sys.executable, "-m", "rltrain", "--config-name", "quickstart", *SMALL, cache, *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _rltrain(
    tmp_path, *overrides: str, timeout: float = 420, check: bool = True, cache_dir=None
) -> subprocess.CompletedProcess:
    command = _command(tmp_path, *overrides, cache_dir=cache_dir)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"rltrain failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_two_rl_steps_change_parameters_and_write_the_run_dir(tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    args = [f"run.dir={run_dir}", "trainer.steps=2", "trainer.save_every=2", "trainer.eval_every=0"]
    proc = _rltrain(tmp_path, *args, cache_dir=tmp_path / "cache")  # its own cache: the SFT base is compared
    assert "held-out pass@1 (greedy) before RL" in proc.stdout and "after RL" in proc.stdout
    records = _metrics(run_dir)
    steps = [r["step"] for r in records]
    assert steps == [0, 1, 2]
    for record in records[1:]:
        for key in ("reward/mean", "loss/total", "perf/step_time_s", "rollout/logprob_diff", "perf/grad_norm"):
            assert key in record and record[key] is not None and math.isfinite(record[key]), key
    assert records[1]["rollout/logprob_diff"] < 1e-3  # rollout engine samples from the learner's weights
    assert "reward/score/mean" in records[1] or any(k.startswith("reward/score") for k in records[1])
    assert os.path.isfile(run_dir / "config.yaml")
    assert any(name.endswith(".png") for name in os.listdir(run_dir))
    ckpt = run_dir / "checkpoints" / "step_2"
    policy = AutoModelForCausalLM.from_pretrained(ckpt)
    sft_dirs = [d for d in (tmp_path / "cache" / "sft").iterdir() if d.is_dir()]
    base = AutoModelForCausalLM.from_pretrained(sft_dirs[0])
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed, "RL steps did not change any parameter"


def test_bad_config_fails_fast_before_ray(tmp_path):
    start = time.time()
    proc = _rltrain(tmp_path, "trainer.nonexistent=1", check=False)
    assert proc.returncode != 0 and "nonexistent" in proc.stderr
    proc = _rltrain(tmp_path, "data.task=jsonl", "data.path=/no/such/file", check=False)
    assert proc.returncode == 2 and "data.path" in proc.stderr and "/no/such/file" in proc.stderr
    proc = _rltrain(tmp_path, "data.path=/no/such/file", check=False)
    assert proc.returncode == 2 and "data.path" in proc.stderr
    assert "ray" not in (proc.stdout + proc.stderr).lower().replace("array", "")
    assert time.time() - start < 60


def test_a_gpu_layout_on_a_cpu_cluster_is_a_clear_error(tmp_path):
    proc = _rltrain(tmp_path, "cluster.num_gpus=1", "trainer.steps=1", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cluster.num_gpus=1" in proc.stderr and "0 GPUs" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigkill_then_resume_auto_continues_from_the_last_checkpoint_as_if_never_stopped(tmp_path):
    run_dir = tmp_path / "run"
    args = [f"run.dir={run_dir}", "trainer.steps=6", "trainer.save_every=1", "trainer.eval_every=0", PACED_REWARD]
    proc = subprocess.Popen(
        _command(tmp_path, *args),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    ckpts = run_dir / "checkpoints"
    while time.time() < deadline and not (ckpts / "step_2").is_dir() and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpts / "step_2").is_dir(), "the run never reached its second checkpoint"
    _rltrain(tmp_path, *args, "run.resume=auto")
    records = _metrics(run_dir)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == 6, steps
    assert sorted(os.listdir(ckpts)) == ["step_5", "step_6"]  # keep_checkpoints=2, no tmp leftovers
    for name in os.listdir(ckpts):
        assert os.path.isfile(ckpts / name / "COMPLETE")
    # Rollout seeds follow the checkpointed prompt-stream position: every step, before and after the
    # kill, equals the uninterrupted run's (same threads, CPU, fp32: deterministic).
    straight_dir = tmp_path / "straight"
    _rltrain(tmp_path, *args[1:], f"run.dir={straight_dir}")
    straight = {r["step"]: r for r in _metrics(straight_dir)}
    for record in records[1:]:
        for key in ("loss/total", "reward/mean", "perf/grad_norm", "rollout/response_len_mean"):
            assert abs(record[key] - straight[record["step"]][key]) <= 1e-6, (record["step"], key)


def test_ctrl_c_ends_in_one_line_whose_resume_command_finishes_the_run(tmp_path):
    run_dir = tmp_path / "run"
    args = [f"run.dir={run_dir}", "trainer.steps=4", "trainer.save_every=1", "trainer.eval_every=0", PACED_REWARD]
    proc = subprocess.Popen(
        _command(tmp_path, *args),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "checkpoints" / "step_1").is_dir() and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-5000:]
    lines = [line for line in stderr.splitlines() if line.startswith("rltrain:")]
    assert len(lines) == 1, stderr[-3000:]
    found = re.fullmatch(
        r"rltrain: interrupted at step (\d+); the last complete checkpoint is (\S+) \(step (\d+)\); "
        r"resume with: (rltrain --config-name quickstart .*)",
        lines[0],
    )
    assert found, lines[0]
    assert found.group(2) == str(run_dir / "checkpoints" / f"step_{found.group(3)}")
    command = shlex.split(found.group(4))
    assert command[-2:] == [f"run.dir={run_dir}", "run.resume=auto"]
    resumed = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=420, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [r["step"] for r in _metrics(run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 4, steps
