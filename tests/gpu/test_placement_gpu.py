"""GPU placement and weight sync through the real CLI: colocated vLLM + DeepSpeed on one GPU (the engine
sleeps while the learner trains) and the NCCL broadcast sync between two GPUs.

Run on a CUDA machine with ``pytest -m gpu tests/gpu``; skipped where CUDA or vllm is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("vllm")

# The quickstart, shrunk; head size 32 as in the CPU vLLM tests.
RUN = [
    "rollout.engine=vllm",
    "learner=deepspeed",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=1",
    "trainer.steps=3",
    "trainer.prompts_per_step=8",
    "data.num_eval=16",
    "sft.steps=20",
    "tracking=minimal",
    "rollout.gpu_memory_utilization=0.3",
]


def rltrain(tmp_path, *overrides: str) -> list[dict]:
    """Run the CLI; return the run's metrics rows (the run must exit 0)."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "rltrain", "--config-name", "quickstart", *RUN, *overrides]
    command += [f"model.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_colocated_engine_sleeps_while_the_learner_trains_and_stays_in_sync(tmp_path):
    rows = rltrain(tmp_path, "cluster.placement=colocated", "rollout.num_workers=1", "learner.world_size=1")
    trained = [row for row in rows if "loss/total" in row]
    assert len(trained) == 3
    # Woken engines load each step's weights: the learner recomputes the rollout logprobs to fp32 noise.
    assert all(row["rollout/logprob_diff"] < 1e-3 for row in trained[1:])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs the learner and the engine on two GPUs")
def test_nccl_broadcast_sync_keeps_the_engine_in_sync(tmp_path):
    rows = rltrain(tmp_path, "rollout.weight_sync=collective", "rollout.num_workers=1", "learner.world_size=1")
    trained = [row for row in rows if "loss/total" in row]
    assert all(row["rollout/weight_sync_fallbacks"] == 0 and row["perf/weight_sync_mb"] > 0 for row in trained)
    assert all(row["rollout/logprob_diff"] < 1e-3 for row in trained[1:])
