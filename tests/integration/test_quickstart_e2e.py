"""The quickstart recipe end to end through the real CLI: Ray actors, torch engine, grader pool, learner."""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from ray_head import shared_ray_overrides

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

# One rollout worker and a 4-prompt held-out set: for runs about the run's control flow, not rollout or evaluation.
FAST = ["rollout.num_workers=1", "data.num_eval=4"]
RESUMED_STEPS = 6  # three stops and their resumes (test_faults.py), each at least a step apart
# A paced run that checkpoints every step. The same run never stopped (the ``uninterrupted`` fixture, conftest.py)
# is the reference of every stopped-and-resumed run of these settings.
RESUMABLE = [*FAST, PACED_REWARD, f"trainer.steps={RESUMED_STEPS}", "trainer.save_every=1", "trainer.eval_every=0"]
COMPARED = ("loss/total", "reward/mean", "perf/grad_norm", "rollout/response_len_mean")


def _command(tmp_path, *overrides: str, cache_dir=None, own_ray: bool = False) -> list[str]:
    """The rltrain CLI on the shrunk quickstart; models cached in ``cache_dir`` (default: the session's cache). The
    run joins the session's Ray head (ray_head.py) unless ``own_ray``: then it starts a local Ray of its own."""
    cache = f"model.cache_dir={cache_dir or SESSION_CACHE}"
    cluster = [] if own_ray else shared_ray_overrides()
    return [sys.executable, "-m", "rltrain", "--config-name", "quickstart", *SMALL, cache, *cluster, *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _rltrain(
    tmp_path, *overrides: str, timeout: float = 420, check: bool = True, cache_dir=None, own_ray: bool = False
) -> subprocess.CompletedProcess:
    command = _command(tmp_path, *overrides, cache_dir=cache_dir, own_ray=own_ray)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"rltrain failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _assert_same_numbers(run_dir, reference: dict[int, dict]) -> None:
    """Every step of ``run_dir`` equals the uninterrupted run's, each step logged once."""
    records = [record for record in _metrics(run_dir) if record["step"] > 0]
    steps = [record["step"] for record in records]
    assert steps == sorted(set(steps)) and steps[-1] == max(reference), steps
    for record in records:
        for key in COMPARED:
            assert abs(record[key] - reference[record["step"]][key]) <= 1e-6, (record["step"], key)


def test_async_steps_sigkilled_and_resumed_keep_the_bound_change_parameters_and_log_each_eval_set(tmp_path):
    """The asynchronous pipeline at trainer.max_staleness=2 (the next batches are generated while a step trains)
    with two eval sets, SIGKILLed once its step-2 checkpoint is written, then resumed with run.resume=auto: every
    step is logged once, no trained token is more than 2 versions old on either side of the kill, the resumed
    run's first batch is sampled at the checkpoint's version (the buffer is regenerated, never trained stale), and
    the eval sets are logged before RL (step 0) and after it. The rollout workers generate the eval sets; gsm8k is
    graded by its own grader; every pass@k / maj@k for k up to each set's n is logged."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    args = [
        f"run.dir={run_dir}",
        PACED_REWARD,  # ~1 s steps: the kill lands while later batches are in flight
        "trainer.steps=4",
        "trainer.max_staleness=2",
        "trainer.save_every=1",
        "trainer.eval_every=0",
        "data.max_prompt_tokens=400",  # GSM8K questions in a byte-level tokenizer
        "trainer.eval_sets=[{name:heldout,n:3,temperature:1.0},{name:gsm8k,limit:4,n:2,max_tokens:8}]",
    ]
    cache = tmp_path / "cache"  # its own cache: the SFT base is compared
    with open(tmp_path / "first.out", "w") as out:
        first = subprocess.Popen(
            _command(tmp_path, *args, cache_dir=cache), env=_env(), stdout=out, stderr=out, start_new_session=True
        )
    ckpts = run_dir / "checkpoints"
    _poll_until(lambda: (ckpts / "step_2" / "COMPLETE").is_file() or first.poll() is not None)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (ckpts / "step_2").is_dir(), (tmp_path / "first.out").read_text()[-3000:]
    proc = _rltrain(tmp_path, *args, "run.resume=auto", cache_dir=cache)
    assert "after RL (policy)" in proc.stdout

    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    for step in (0, 4):
        logged = set(records[step])
        for name, n in (("heldout", 3), ("gsm8k", 2)):
            for k in range(1, n + 1):
                assert {f"eval/{name}/pass@{k}", f"eval/{name}/maj@{k}"} <= logged, (step, name, k)
            assert f"eval/{name}/avg@{n}" in logged
        assert "eval/accuracy" in logged
    for record in records[1:]:
        for key in ("reward/mean", "loss/total", "perf/step_time_s", "perf/grad_norm", "perf/buffer_wait_s"):
            assert key in record and record[key] is not None and math.isfinite(record[key]), key
        assert record["rollout/staleness_max"] <= 2 and record["rollout/stale_dropped"] == 0
    for on_policy in (1, 3):  # the first batch of each process is sampled with the learner's weights
        assert records[on_policy]["rollout/staleness_max"] == 0
        assert records[on_policy]["rollout/logprob_diff"] < 1e-3
    assert "reward/score/mean" in records[1] or any(k.startswith("reward/score") for k in records[1])
    assert os.path.isfile(run_dir / "config.yaml")
    assert any(name.endswith(".png") for name in os.listdir(run_dir))
    policy = AutoModelForCausalLM.from_pretrained(ckpts / "step_4")
    sft_dirs = [d for d in (cache / "sft").iterdir() if d.is_dir()]
    base = AutoModelForCausalLM.from_pretrained(sft_dirs[0])
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed, "RL steps did not change any parameter"


def test_bad_config_fails_fast_before_ray(tmp_path):
    start = time.time()
    proc = _rltrain(tmp_path, "trainer.nonexistent=1", check=False, own_ray=True)
    assert proc.returncode != 0 and "nonexistent" in proc.stderr
    proc = _rltrain(tmp_path, "data.task=jsonl", "data.path=/no/such/file", check=False, own_ray=True)
    assert proc.returncode == 2 and "data.path" in proc.stderr and "/no/such/file" in proc.stderr
    proc = _rltrain(tmp_path, "data.path=/no/such/file", check=False, own_ray=True)
    assert proc.returncode == 2 and "data.path" in proc.stderr
    assert "ray" not in (proc.stdout + proc.stderr).lower().replace("array", "")
    assert time.time() - start < 60


def test_a_gpu_layout_on_a_cpu_cluster_is_a_clear_error(tmp_path):
    proc = _rltrain(tmp_path, "cluster.num_gpus=1", "trainer.steps=1", check=False, own_ray=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cluster.num_gpus=1" in proc.stderr and "0 GPUs" in proc.stderr
    assert "Traceback" not in proc.stderr


def _poll_until(done, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and not done():
        time.sleep(0.1)
