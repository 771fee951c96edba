"""The quickstart recipe through the real CLI with a two-rank DeepSpeed learner: train, weight sync, resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_quickstart_e2e import _metrics, _rltrain

pytestmark = pytest.mark.integration

RUN = ["learner=deepspeed", "learner.world_size=2", "trainer.save_every=1", "trainer.eval_every=0", "data.num_eval=8"]


def test_quickstart_trains_with_deepspeed_on_two_ranks_and_resumes(tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    proc = _rltrain(tmp_path, f"run.dir={run_dir}", *RUN, "trainer.steps=2", cache_dir=tmp_path / "cache")
    assert "held-out pass@1 (greedy) before RL" in proc.stdout and "after RL" in proc.stdout
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        for key in ("loss/total", "perf/grad_norm", "reward/mean"):
            assert record.get(key) is not None and math.isfinite(record[key]), key
    # The rollout worker samples with the weights the two ranks exported after the previous step.
    assert records[2]["rollout/logprob_diff"] < 1e-3
    ckpt = run_dir / "checkpoints" / "step_2"
    meta = json.loads((ckpt / "rltrain_deepspeed.json").read_text())
    assert meta == {"world_size": 2, "zero_stage": 2}
    policy = dict(AutoModelForCausalLM.from_pretrained(ckpt).named_parameters())
    base_dir = next(d for d in (tmp_path / "cache" / "sft").iterdir() if d.is_dir())
    base = dict(AutoModelForCausalLM.from_pretrained(base_dir).named_parameters())
    assert any(not torch.equal(policy[name], base[name]) for name in base), "RL steps did not change any parameter"

    # A checkpoint of another world size is refused with a message naming both values, before any actor starts.
    proc = _rltrain(
        tmp_path,
        f"run.dir={run_dir}",
        *RUN,
        "learner.world_size=1",
        "trainer.steps=3",
        check=False,
        cache_dir=tmp_path / "cache",
        own_ray=True,  # a local Ray would announce itself: it must not start
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "learner.world_size=2" in proc.stderr and "world_size=1" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr

    # The same run stopped after its step-1 checkpoint (a copy without step_2) resumes; rollout seeds follow the
    # checkpointed prompt-stream position and the ZeRO state resumes exactly, so step 2 equals the
    # uninterrupted run's (fp32, CPU, deterministic).
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_2")
    proc = _rltrain(
        tmp_path, f"run.dir={resumed_dir}", *RUN, "trainer.steps=2", "run.resume=auto", cache_dir=tmp_path / "cache"
    )
    assert "resumed from" in proc.stdout + proc.stderr and "step_1" in proc.stdout + proc.stderr
    resumed = _metrics(resumed_dir)
    assert [r["step"] for r in resumed] == [0, 1, 2]
    assert resumed[2]["rollout/logprob_diff"] < 1e-3
    for key in ("loss/total", "reward/mean", "perf/grad_norm", "rollout/response_len_mean"):
        assert abs(resumed[2][key] - records[2][key]) <= 1e-6, key


def test_zero3_broadcast_sync_and_colocated_placement_train_the_same_run(tmp_path):
    """Two ZeRO-3 ranks and two rollout workers: disaggregated with the collective (gloo) sync, and colocated
    (worker i in rank i's bundle) with the object-store sync. Placement and transport must not change a number."""
    layout = [*RUN, "learner.zero_stage=3", "rollout.num_workers=2", "trainer.steps=2"]
    broadcast_dir, colocated_dir = tmp_path / "broadcast", tmp_path / "colocated"
    _rltrain(tmp_path, f"run.dir={broadcast_dir}", *layout, "rollout.weight_sync=collective")
    _rltrain(tmp_path, f"run.dir={colocated_dir}", *layout, "cluster.placement=colocated")
    broadcast, colocated = _metrics(broadcast_dir)[1:], _metrics(colocated_dir)[1:]
    assert all(row["rollout/weight_sync_fallbacks"] == 0 and row["perf/weight_sync_mb"] > 0 for row in broadcast)
    assert all("perf/weight_sync_mb" not in row for row in colocated)
    assert broadcast[1]["rollout/logprob_diff"] < 1e-3 and colocated[1]["rollout/logprob_diff"] < 1e-3
    for ours, theirs in zip(broadcast, colocated, strict=True):
        for key in ("loss/total", "reward/mean", "perf/grad_norm", "rollout/response_len_mean"):
            assert abs(ours[key] - theirs[key]) <= 1e-6, (ours["step"], key)
