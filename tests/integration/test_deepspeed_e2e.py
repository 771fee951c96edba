"""The quickstart recipe through the real CLI with a two-rank ZeRO-3 learner: train, broadcast weight sync, a
refused layout change, and an exact resume in the colocated placement."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_quickstart_e2e import _metrics, _rltrain

pytestmark = pytest.mark.integration

RUN = ["learner=deepspeed", "learner.world_size=2", "trainer.save_every=1", "trainer.eval_every=0", "data.num_eval=8"]
# Two ZeRO-3 ranks (parameters partitioned: every export gathers them on both ranks) and two rollout workers.
LAYOUT = [*RUN, "learner.zero_stage=3", "rollout.num_workers=2", "trainer.steps=2"]
COMPARED = ("loss/total", "reward/mean", "perf/grad_norm", "rollout/response_len_mean")


def test_quickstart_trains_on_two_zero3_ranks_then_resumes_colocated_with_the_same_numbers(tmp_path):
    """Two ZeRO-3 ranks, disaggregated, weights broadcast (gloo) to two rollout workers: 2 GRPO steps, each
    checkpoint loadable with ``from_pretrained``. A resume with another world size is refused before Ray starts.
    The run stopped after its step-1 checkpoint then resumes colocated (worker i in rank i's bundle, object-store
    sync): the ZeRO state resumes exactly and rollout seeds follow the checkpointed prompt-stream position, and
    neither placement nor transport may change a number, so step 2 equals the uninterrupted run's (fp32, CPU)."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    proc = _rltrain(tmp_path, f"run.dir={run_dir}", *LAYOUT, "rollout.weight_sync=collective")
    assert "held-out pass@1 (greedy) before RL" in proc.stdout and "after RL" in proc.stdout
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        for key in ("loss/total", "perf/grad_norm", "reward/mean"):
            assert record.get(key) is not None and math.isfinite(record[key]), key
        assert record["rollout/weight_sync_fallbacks"] == 0 and record["perf/weight_sync_mb"] > 0
    # The rollout workers sample with the weights the two ranks broadcast after the previous step.
    assert records[2]["rollout/logprob_diff"] < 1e-3
    checkpoints = run_dir / "checkpoints"
    meta = json.loads((checkpoints / "step_2" / "rltrain_deepspeed.json").read_text())
    assert meta == {"world_size": 2, "zero_stage": 3}
    policy = dict(AutoModelForCausalLM.from_pretrained(checkpoints / "step_2").named_parameters())
    before = dict(AutoModelForCausalLM.from_pretrained(checkpoints / "step_1").named_parameters())
    assert any(not torch.equal(policy[name], before[name]) for name in before), "step 2 changed no parameter"

    # A checkpoint of another world size is refused with a message naming both values, before any actor starts.
    proc = _rltrain(
        tmp_path,
        f"run.dir={run_dir}",
        *LAYOUT,
        "learner.world_size=1",
        "trainer.steps=3",
        check=False,
        own_ray=True,  # a local Ray would announce itself: it must not start
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "learner.world_size=2" in proc.stderr and "world_size=1" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_2")
    proc = _rltrain(tmp_path, f"run.dir={resumed_dir}", *LAYOUT, "cluster.placement=colocated", "run.resume=auto")
    assert "resumed from" in proc.stdout + proc.stderr and "step_1" in proc.stdout + proc.stderr
    resumed = _metrics(resumed_dir)
    assert [r["step"] for r in resumed] == [0, 1, 2]
    assert "perf/weight_sync_mb" not in resumed[2]  # colocated: the object store, no broadcast
    assert resumed[2]["rollout/logprob_diff"] < 1e-3
    for key in COMPARED:
        assert abs(resumed[2][key] - records[2][key]) <= 1e-6, key
