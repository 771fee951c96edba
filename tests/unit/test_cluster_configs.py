"""Every cluster/ option composes with every recipe, validates, and lays out the workers it documents.

The GPU layouts (gpu_node, gpu_node_colocated, multi_node) are only composed and validated here: a CPU
machine cannot run them. docs/cluster.md says what has been run where.
"""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_module

from rltrain.config import ConfigError, register_configs
from rltrain.config_rules import validate

register_configs()
RECIPES_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
CLUSTERS = sorted(f[:-5] for f in os.listdir(os.path.join(RECIPES_DIR, "cluster")) if f.endswith(".yaml"))
RECIPES = ("quickstart", "treepo")

# option -> (mode, placement, engine, rollout workers, learner backend, learner ranks, zero stage, num_gpus)
LAYOUTS = {
    "gpu_node": ("local", "disaggregated", "vllm", 4, "deepspeed", 4, 3, 8),
    "gpu_node_colocated": ("local", "colocated", "vllm", 8, "deepspeed", 8, 3, 8),
    "multi_node": ("address", "disaggregated", "vllm", 8, "deepspeed", 8, 3, 16),
}


def _compose(recipe: str, overrides=()):
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        return compose(config_name=recipe, overrides=list(overrides))


def test_the_documented_options_exist():
    assert {"local", "ray", *LAYOUTS} <= set(CLUSTERS)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("cluster", CLUSTERS)
def test_cluster_option_composes_and_validates(recipe, cluster):
    validate(_compose(recipe, [f"cluster={cluster}"]))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("cluster", sorted(LAYOUTS))
def test_gpu_layout_values(recipe, cluster):
    cfg = _compose(recipe, [f"cluster={cluster}"])
    mode, placement, engine, workers, backend, ranks, zero, gpus = LAYOUTS[cluster]
    assert cfg.cluster.mode == mode
    assert cfg.cluster.placement == placement
    assert cfg.cluster.num_gpus == gpus
    assert cfg.rollout.engine == engine
    assert cfg.rollout.num_workers == workers  # the cluster option, not the recipe's CPU default, lays out workers
    assert cfg.rollout.tensor_parallel_size == 1
    assert cfg.rollout.weight_sync == "auto"
    assert cfg.learner.backend == backend
    assert cfg.learner.world_size == ranks
    assert cfg.learner.zero_stage == zero
    # GPUs the layout reserves fit the node(s): disaggregated = workers * tp + ranks, colocated = ranks.
    needed = ranks if placement == "colocated" else workers * cfg.rollout.tensor_parallel_size + ranks
    assert needed == gpus
    # The recipe's own choices survive the cluster option.
    assert cfg.run.name == recipe
    assert cfg.rollout.sampler == ("tree" if recipe == "treepo" else "flat")


def test_multi_node_joins_an_address_given_on_the_command_line():
    cfg = _compose("quickstart", ["cluster=multi_node", "cluster.address=10.0.0.1:6379"])
    validate(cfg)
    assert cfg.cluster.mode == "address" and cfg.cluster.address == "10.0.0.1:6379"


def test_command_line_overrides_the_cluster_layout():
    cfg = _compose("quickstart", ["cluster=gpu_node", "learner=torch", "rollout.num_workers=2", "rollout.engine=torch"])
    validate(cfg)
    assert cfg.learner.backend == "torch" and cfg.rollout.num_workers == 2 and cfg.rollout.engine == "torch"


def test_local_options_keep_the_recipe_cpu_layout():
    for cluster in ("local", "ray"):
        cfg = _compose("quickstart", [f"cluster={cluster}"])
        assert cfg.rollout.num_workers == 2 and cfg.learner.backend == "torch" and cfg.rollout.engine == "torch"


@pytest.mark.parametrize(
    "override,key",
    [
        ("rollout.num_workers=4", "rollout.num_workers"),
        ("rollout.tensor_parallel_size=2", "rollout.tensor_parallel_size"),
        ("rollout.weight_sync=collective", "rollout.weight_sync=collective"),
    ],
)
def test_colocated_layout_refuses_what_cannot_share_a_gpu(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(_compose("quickstart", ["cluster=gpu_node_colocated", override]))
