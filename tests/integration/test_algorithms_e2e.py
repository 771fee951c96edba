"""Every algorithm config trains 2 steps of the quickstart recipe over real Ray actors (in-process driver).

The actors are algorithm-blind (rollout workers generate, the reward worker grades, the learner computes
logprobs and applies whatever loss function it is sent), so one Runtime serves every algorithm: it is started
once with what any algorithm needs (a reference model for the KL variants, a KV-forking engine for the tree
sampler), and each algorithm gets its own validated config, Trainer, sampler and loss function. The driver
loop around the steps (eval, metrics file, checkpoints) is checked through the CLI in test_quickstart_e2e.py.
"""

from __future__ import annotations

import math
import os

import pytest
from hydra import compose, initialize_config_module
from ray_head import joined_ray

from rltrain.config import register_configs

pytestmark = pytest.mark.integration
register_configs()
RECIPES_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
ALGORITHMS = sorted(f[:-5] for f in os.listdir(os.path.join(RECIPES_DIR, "algorithm")) if f.endswith(".yaml"))
LENGTH_REWARD = os.path.join(os.path.dirname(__file__), "data", "length_reward.py")
STEPS = 2


def small_config(cache_dir, *overrides: str):
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
                "rollout.n=4",
                "tracking=minimal",
                "reward.num_workers=1",
                f"reward.functions=[{{fn: '{LENGTH_REWARD}:score', weight: 1.0}}]",
                f"model.cache_dir={cache_dir}",
                *overrides,
            ],
        )


def algorithm_overrides(algorithm: str) -> list[str]:
    extra = [f"algorithm={algorithm}"]
    if algorithm.endswith("_kl"):
        extra.append("learner.use_reference=true")
    if algorithm == "tree":
        extra.append("rollout=tree")
    return extra


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    """One set of actors (on the session's Ray head) for every algorithm; yields (runtime, model cache dir, step
    counter)."""
    from rltrain.prepare import prepare
    from rltrain.runtime import Runtime

    cache_dir = tmp_path_factory.mktemp("algorithms") / "cache"
    cfg = small_config(cache_dir, "rollout=tree", "learner.use_reference=true")
    prep = prepare(cfg)
    with joined_ray():
        built = Runtime(cfg, prep.model_path, total_optimizer_steps=STEPS * len(ALGORITHMS))
        try:
            yield built, cache_dir, [0]
        finally:
            built.shutdown()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_trains_two_steps(runtime, algorithm):
    from rltrain.prepare import prepare
    from rltrain.trainer import Trainer

    shared, cache_dir, last_step = runtime
    cfg = small_config(cache_dir, *algorithm_overrides(algorithm))
    trainer = Trainer(cfg, prepare(cfg), shared)
    for _ in range(STEPS):
        last_step[0] += 1  # policy versions keep rising across algorithms: the actors are the same
        metrics = trainer.step(last_step[0])
        for key in ("loss/total", "adv/std", "reward/mean", "perf/step_time_s"):
            assert metrics.get(key) is not None and math.isfinite(metrics[key]), (algorithm, key)
        assert metrics["rollout/logprob_diff"] < 1e-3  # the engines sample from the learner's current weights
        if algorithm == "dapo":
            assert metrics["rollout/gen_batches"] >= 1
        if algorithm == "grpo_thr":
            assert 0.0 <= metrics["loss/thr_reweighted_frac"] <= 1.0
        if algorithm == "tree":
            assert metrics["rollout/prefill_reused"] > 0  # continued paths reuse the kept KV rows


@pytest.mark.parametrize("k, algorithm", [(1, "grpo"), (2, "dapo"), (1, "tree")])
def test_the_async_pipeline_trains_within_its_staleness_bound(runtime, k, algorithm):
    """trainer.max_staleness=k over the same actors: the rollout thread generates ahead, every trained batch is at
    most k versions old, and the on-policy check still holds where a batch is on-policy."""
    from rltrain.prepare import prepare
    from rltrain.trainer import Trainer

    shared, cache_dir, last_step = runtime
    first = last_step[0] + 1
    steps = [first, first + 1, first + 2]
    cfg = small_config(
        cache_dir, *algorithm_overrides(algorithm), f"trainer.max_staleness={k}", f"trainer.steps={steps[-1]}"
    )
    trainer = Trainer(cfg, prepare(cfg), shared)
    try:
        for step in steps:
            last_step[0] = step
            metrics = trainer.step(step)
            assert metrics["rollout/stale_dropped"] == 0.0 and metrics["rollout/staleness_max"] <= k
            assert math.isfinite(metrics["loss/total"]) and "perf/buffer_wait_s" in metrics
            if "rollout/logprob_diff" in metrics:
                assert metrics["rollout/logprob_diff"] < 1e-3
            else:
                assert metrics["rollout/offpolicy_logprob_diff"] > 0
    finally:
        trainer.close()
    shared.sync_weights(last_step[0])  # the next test's synchronous trainer starts on-policy
