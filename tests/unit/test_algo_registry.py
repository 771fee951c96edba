"""The algorithm registry: lookups, error messages, duplicate registration, and the recipe configs."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from rltrain import algo
from rltrain.algo import registry
from rltrain.config import AlgorithmConfig

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "algorithm"


def test_builtins_are_registered():
    assert algo.names("advantage") == ["dr_grpo", "grpo", "reinforce_pp", "rloo", "tree"]
    assert algo.names("policy_loss") == ["gspo", "ppo_clip"]
    assert algo.names("kl") == ["k1", "k1+", "k2", "k3", "k3+"]
    assert algo.names("agg") == ["seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm", "token_mean"]


def test_unknown_name_and_kind_raise_with_known_names():
    with pytest.raises(KeyError) as info:
        algo.get("advantage", "ppo")
    assert isinstance(info.value, ValueError)
    assert str(info.value) == "unknown advantage 'ppo'; known: ['dr_grpo', 'grpo', 'reinforce_pp', 'rloo', 'tree']"
    with pytest.raises(algo.UnknownNameError, match="known kinds"):
        algo.get("reward", "math")


def test_register_custom_and_duplicate_raises():
    name = "test_only_constant"
    try:

        @algo.register("advantage", name)
        def constant(rewards, group, ancestors=None):
            return rewards * 0

        assert algo.get("advantage", name) is constant
        with pytest.raises(ValueError, match="already registered"):
            algo.register("advantage", name)(constant)
    finally:
        registry._REGISTRY["advantage"].pop(name, None)
    with pytest.raises(ValueError, match="'grpo' is already registered"):
        algo.register("advantage", "grpo")(lambda rewards, group, ancestors=None: rewards)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_options_are_valid_algorithm_configs(path):
    options = yaml.safe_load(path.read_text())
    fields = set(AlgorithmConfig.__dataclass_fields__)
    assert set(options) <= fields, f"{path.name}: keys not in AlgorithmConfig: {set(options) - fields}"
    merged = {**AlgorithmConfig().__dict__, **options}
    accepted = set(inspect.signature(algo.get("advantage", merged["advantage"])).parameters)
    assert set(merged["advantage_params"]) <= accepted - {"rewards", "group", "ancestors", "token_counts"}
    constant = merged["loss_agg_constant"] or 32.0  # the trainer defaults it to rollout.max_tokens
    algo.make_loss_fn(
        policy_loss=merged["policy_loss"], loss_agg=merged["loss_agg"], loss_agg_constant=constant,
        clip_low=merged["clip_low"], clip_high=merged["clip_high"], clip_c=merged["clip_c"],
        tis_cap=merged["tis_cap"], entropy_coef=merged["entropy_coef"], kl_coef=merged["kl_coef"],
        kl_estimator=merged["kl_estimator"], thr=merged["thr"],
    )  # fmt: skip


def test_every_registered_advantage_has_a_recipe():
    advantages = {yaml.safe_load(p.read_text()).get("advantage") for p in RECIPES.glob("*.yaml")}
    assert set(algo.names("advantage")) <= advantages
