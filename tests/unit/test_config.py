"""Recipes compose against the schema; validation names the bad key before anything starts."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from rltrain.config import ConfigError, register_configs
from rltrain.config_rules import validate

register_configs()
RECIPES_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


def _compose(overrides=(), name="quickstart"):
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _options(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(RECIPES_DIR, group)) if f.endswith(".yaml"))


def test_quickstart_composes_and_validates():
    cfg = _compose()
    validate(cfg)
    assert cfg.run.name == "quickstart" and cfg.sft.enabled


@pytest.mark.parametrize("recipe", sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml")))
def test_every_recipe_composes(recipe):
    validate(_compose(name=recipe))


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ("algorithm", "rollout", "learner", "cluster", "tracking", "reward", "data") for o in _options(g)],
)
def test_every_group_option_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    assert cfg[group] is not None


def test_unknown_key_is_rejected_at_composition():
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="nonexistent"):
        _compose(["trainer.nonexistent=1"])


def test_wrong_type_is_rejected_at_composition():
    with pytest.raises(ConfigCompositionException, match="trainer.steps"):
        _compose(["trainer.steps=many"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("rollout.engine=tensorrt", "rollout.engine"),
        ("trainer.steps=0", "trainer.steps"),
        ("rollout.n=-1", "rollout.n"),
        ("data.path=/no/such/file", "data.path"),
        ("model.path=/no/such/model", "model.path"),
        ("algorithm.clip_c=0.5", "algorithm.clip_c"),
        ("algorithm.kl_coef=0.1", "use_reference"),
        ("algorithm=grpo_thr learner=deepspeed", "learner.backend=torch"),
        ("reward.functions=[]", "reward.functions"),
        ("rollout.vllm_block_size=0", "rollout.vllm_block_size"),
        ("model.tiny.num_heads=3", "num_heads"),
    ],
)
def test_validation_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(_compose(override.split()))


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        validate(_compose(["data.task=jsonl", f"data.path={tmp_path}/missing.jsonl"]))


def test_vllm_rejects_unsupported_head_size():
    with pytest.raises(ConfigError, match="head size"):
        validate(
            _compose(
                [
                    "rollout.engine=vllm",
                    "model.tiny.hidden_size=48",
                    "model.tiny.num_heads=3",
                    "model.tiny.num_kv_heads=1",
                ]
            )
        )
