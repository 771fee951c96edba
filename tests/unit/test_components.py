"""The pure components built from the config before Ray: their own checks, re-raised naming the config keys."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from rltrain import algo
from rltrain.components import build_loss_fn, check_components, sampling_params
from rltrain.config import ConfigError, register_configs

register_configs()


def _compose(*overrides: str):
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        return compose(config_name="quickstart", overrides=list(overrides))


def test_the_quickstart_builds_its_components():
    cfg = _compose()
    check_components(cfg)
    assert sampling_params(cfg.rollout).temperature == cfg.rollout.temperature
    assert sampling_params(cfg.rollout, evaluation=True).temperature == cfg.rollout.eval_temperature
    assert build_loss_fn(cfg).clip_high == cfg.algorithm.clip_high


def test_a_message_mentioning_two_parameters_names_both_keys_with_their_values():
    with pytest.raises(ConfigError) as info:
        check_components(_compose("algorithm.clip_high=-1"))
    assert str(info.value).startswith("algorithm.clip_low=0.2, algorithm.clip_high=-1.0: ")


def test_evaluation_temperature_is_named_as_its_own_key():
    with pytest.raises(ConfigError, match=r"^rollout\.eval_temperature=-1\.0: temperature"):
        check_components(_compose("rollout.eval_temperature=-1"))


def test_registry_kind_in_an_unknown_name_maps_to_its_key():
    with pytest.raises(ConfigError, match=r"^algorithm\.loss_agg='median': unknown agg 'median'"):
        check_components(_compose("algorithm.loss_agg=median"))


def test_group_relative_advantages_need_two_responses_per_prompt():
    assert algo.metadata("advantage", "grpo") == {"min_group_size": 2}
    assert algo.metadata("advantage", "reinforce_pp") == {}
    for name in ("grpo", "dr_grpo", "rloo", "tree"):
        with pytest.raises(ConfigError, match=rf"^rollout\.n=1: advantage '{name}'.*rollout\.n >= 2"):
            check_components(_compose(f"algorithm.advantage={name}", "algorithm.advantage_params={}", "rollout.n=1"))
    check_components(_compose("algorithm=reinforce_pp", "rollout.n=1"))


def test_the_tree_samplers_group_is_its_width():
    check_components(_compose("rollout=tree", "rollout.n=1"))  # n is the flat sampler's
    with pytest.raises(ConfigError, match=r"^rollout\.tree\.width=1: "):
        check_components(_compose("rollout=tree", "rollout.tree.width=1"))


def test_advantage_params_values_are_checked_by_running_the_estimator():
    with pytest.raises(ConfigError, match=r"^algorithm\.advantage_params=\{.*'weighting': 'median'.*weighting"):
        check_components(_compose("algorithm=tree", "algorithm.advantage_params.weighting=median"))
