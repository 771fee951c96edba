"""Every algorithm config runs 2 training steps of the quickstart recipe (real Ray actors, in-process driver)."""

from __future__ import annotations

import json
import math
import os

import pytest
from hydra import compose, initialize_config_module

from rltrain.config import register_configs

pytestmark = pytest.mark.integration
register_configs()
RECIPES_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
ALGORITHMS = sorted(f[:-5] for f in os.listdir(os.path.join(RECIPES_DIR, "algorithm")) if f.endswith(".yaml"))
LENGTH_REWARD = os.path.join(os.path.dirname(__file__), "data", "length_reward.py")


@pytest.fixture(scope="module")
def shared_ray():
    import ray

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def small_config(tmp_path, *overrides: str):
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        return compose(
            config_name="quickstart",
            overrides=[
                "model.tiny.hidden_size=64",
                "model.tiny.intermediate_size=128",
                "model.tiny.num_layers=2",
                "data.num_train=256",
                "data.num_eval=8",
                "sft.steps=3",
                "sft.batch_size=16",
                "trainer.prompts_per_step=4",
                "trainer.steps=2",
                "trainer.eval_every=0",
                "trainer.save_every=2",
                "rollout.n=4",
                "tracking=minimal",
                "reward.num_workers=1",
                f"reward.functions=[{{fn: '{LENGTH_REWARD}:score', weight: 1.0}}]",
                f"model.cache_dir={tmp_path / 'cache'}",
                f"run.dir={tmp_path / 'run'}",
                *overrides,
            ],
        )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_runs_two_steps(tmp_path, shared_ray, algorithm):
    from rltrain.driver import run

    extra = ["learner.use_reference=true"] if algorithm.endswith("_kl") else []
    if algorithm == "tree":
        extra.append("rollout=tree")
    run(small_config(tmp_path, f"algorithm={algorithm}", *extra))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        for key in ("loss/total", "adv/std", "reward/mean", "perf/step_time_s"):
            assert record.get(key) is not None and math.isfinite(record[key]), (algorithm, key)
        if algorithm == "dapo":
            assert record["rollout/gen_batches"] >= 1
        if algorithm == "grpo_thr":
            assert 0.0 <= record["loss/thr_reweighted_frac"] <= 1.0
