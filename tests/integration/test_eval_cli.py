"""rltrain-eval through the real CLI: two sets (the run's held-out rows and vendored GSM8K), the table, eval.json,
samples.jsonl; killed mid-way and re-run, it generates only the samples that were not written yet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

SETS = "eval.sets=[{name:heldout,n:4,temperature:1.0},{name:gsm8k,limit:6,n:2,temperature:1.0,max_tokens:12}]"
HELDOUT_ROWS, GSM8K_ROWS = 48, 6


def _command(tmp_path) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from rltrain.cli import eval_main; eval_main()",
        f"model.cache_dir={tmp_path / 'cache'}",
        f"run.dir={tmp_path / 'run'}",
        f"data.num_eval={HELDOUT_ROWS}",
        "data.num_train=64",
        "data.max_prompt_tokens=400",  # GSM8K questions in a byte-level tokenizer
        "eval.engine=torch",
        "tracking.progress=false",
        SETS,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def test_eval_writes_table_json_and_samples_and_resumes_after_a_kill(tmp_path):
    samples = tmp_path / "run" / "samples.jsonl"
    proc = subprocess.Popen(_command(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if samples.exists() and len(_lines(samples)) >= 32:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the evaluation ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _lines(samples)
    total = HELDOUT_ROWS * 4
    assert 32 <= len(done) < total

    finished = subprocess.run(_command(tmp_path), capture_output=True, text=True, timeout=420, env=_env())
    assert finished.returncode == 0, finished.stderr[-4000:]
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert sorted(report["sets"]) == ["gsm8k", "heldout"]
    assert 1 <= report["sets"]["gsm8k"]["num_prompts"] <= GSM8K_ROWS  # rows over data.max_prompt_tokens dropped
    left = sum(int(result["num_prompts"]) * result["settings"]["n"] for result in report["sets"].values())
    output = finished.stdout + finished.stderr
    assert f"{left - len(done)} of {left} samples to generate ({len(done)} already in" in output
    assert "pass@1" in finished.stdout and "gsm8k" in finished.stdout and "heldout" in finished.stdout

    lines = _lines(samples)
    assert lines[: len(done)] == done
    keys = [(r["set"], r["prompt_id"], r["index"]) for r in lines]
    assert len(keys) == len(set(keys)) == left
    heldout = report["sets"]["heldout"]
    assert heldout["num_prompts"] == HELDOUT_ROWS and heldout["settings"]["n"] == 4
    assert [f"pass@{k}" in heldout and f"maj@{k}" in heldout for k in range(1, 5)] == [True] * 4
    accuracy = sum(r["correct"] for r in lines if r["set"] == "heldout") / total
    assert heldout["avg@4"] == pytest.approx(accuracy) and heldout["pass@1"] == pytest.approx(accuracy)


def test_training_logs_each_eval_set_before_and_after_rl(tmp_path):
    """One RL step of the shrunk quickstart with two eval sets: the rollout workers generate them, gsm8k is graded
    by its own grader, and every pass@k / maj@k for k up to each set's n is logged at steps 0 and 1."""
    run_dir = tmp_path / "train"
    command = [
        sys.executable,
        "-m",
        "rltrain",
        "--config-name",
        "quickstart",
        f"model.cache_dir={tmp_path / 'cache'}",
        f"run.dir={run_dir}",
        "data.num_train=256",
        "data.num_eval=16",
        "data.max_prompt_tokens=400",
        "sft.steps=5",
        "sft.batch_size=16",
        "trainer.prompts_per_step=4",
        "trainer.steps=1",
        "rollout.n=4",
        "rollout.num_workers=1",
        "reward.num_workers=1",
        "tracking=minimal",
        "trainer.eval_sets=[{name:heldout,n:3,temperature:1.0},{name:gsm8k,limit:4,n:2,max_tokens:8}]",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=420, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = _lines(run_dir / "metrics.jsonl")
    for step in (0, 1):
        logged = {key for record in records if record["step"] == step for key in record}
        for name, n in (("heldout", 3), ("gsm8k", 2)):
            for k in range(1, n + 1):
                assert {f"eval/{name}/pass@{k}", f"eval/{name}/maj@{k}"} <= logged, (step, name, k)
            assert f"eval/{name}/avg@{n}" in logged
        assert "eval/accuracy" in logged
