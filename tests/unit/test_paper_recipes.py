"""Every paper recipe (recipes/paper_*.yaml) composes, validates and carries its paper's values; its dataset's
keys load rows in the hub dataset's own layout and the recipe's grader scores their ground truth.

No hub and no GPU: the rows are a few written here in each hub dataset's column layout, read through the
parquet loader with the recipe's own prompt/answer keys (``data.task=hf`` differs only in where the records
come from). docs/recipes.md lists the recipes.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from rltrain.config import register_configs
from rltrain.config_rules import validate
from rltrain.data import load_task_data
from rltrain.eval.sets import parse_eval_sets
from rltrain.grading.resolve import call_reward, resolve_reward_functions

register_configs()
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
RECIPES_DIR = os.path.join(ROOT, "recipes")
PAPER_RECIPES = sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.startswith("paper_") and f.endswith(".yaml"))

_GRPO_VERL = {  # verl's GRPO examples (run_qwen2-7b.sh, run_qwen2-7b_math.sh)
    "algorithm.advantage": "grpo",
    "algorithm.policy_loss": "ppo_clip",
    "algorithm.loss_agg": "token_mean",
    "algorithm.clip_low": 0.2,
    "algorithm.clip_high": 0.2,
    "algorithm.kl_coef": 0.001,
    "algorithm.kl_estimator": "k3",
    "algorithm.mini_batches": 4,
    "learner.use_reference": True,
    "learner.lr": 1e-6,
    "rollout.n": 5,
    "rollout.max_tokens": 1024,
    "rollout.eval_temperature": 0.0,
    "trainer.prompts_per_step": 1024,
}
_DAPO_PIECES = {  # DAPO §3.1-3.3, also TreePO's training recipe
    "algorithm.clip_low": 0.2,
    "algorithm.clip_high": 0.28,
    "algorithm.loss_agg": "token_mean",
    "algorithm.kl_coef": 0.0,
    "algorithm.dynamic_sampling": True,
    "algorithm.filter_metric": "acc",
    "algorithm.max_gen_batches": 10,
    "algorithm.overlong_penalty": 1.0,
    "algorithm.mini_batches": 16,
    "learner.lr": 1e-6,
    "learner.weight_decay": 0.1,
    "trainer.prompts_per_step": 512,
}

# recipe -> the values its header cites (dotted key -> value)
PAPER_VALUES: dict[str, dict[str, Any]] = {
    "paper_grpo_gsm8k": {**_GRPO_VERL, "model.path": "Qwen/Qwen2.5-0.5B-Instruct", "reward.functions.0.fn": "gsm8k"},
    "paper_grpo_math": {**_GRPO_VERL, "model.path": "Qwen/Qwen2.5-1.5B-Instruct", "reward.functions.0.fn": "math"},
    "paper_gspo_math": {
        **_GRPO_VERL,
        "algorithm.policy_loss": "gspo",
        "algorithm.loss_agg": "seq_mean_token_mean",
        "algorithm.clip_low": 3e-4,
        "algorithm.clip_high": 4e-4,
        "algorithm.clip_c": None,
        "algorithm.kl_coef": 0.0,
        "learner.use_reference": False,
        "model.path": "Qwen/Qwen2.5-1.5B-Instruct",
    },
    "paper_dr_grpo": {
        "algorithm.advantage": "dr_grpo",
        "algorithm.loss_agg": "seq_mean_token_sum_norm",
        "algorithm.loss_agg_constant": None,  # = rollout.max_tokens
        "algorithm.kl_coef": 0.0,
        "algorithm.mini_batches": 8,
        "rollout.n": 8,
        "rollout.max_tokens": 3000,
        "rollout.temperature": 1.0,
        "rollout.eval_temperature": 0.0,
        "learner.lr": 1e-6,
        "trainer.prompts_per_step": 128,
        "model.path": "Qwen/Qwen2.5-Math-1.5B",
        "data.system_prompt": "Please reason step by step, and put your final answer within \\boxed{}.",
    },
    "paper_dapo": {
        **_DAPO_PIECES,
        "algorithm.advantage": "grpo",
        "algorithm.overlong_buffer": 4096,
        "rollout.max_tokens": 20480,
        "rollout.n": 16,
        "learner.warmup_steps": 20 * 16,
        "reward.functions.0.params.wrong_score": -1.0,
        "trainer.eval_sets.0.n": 32,
        "trainer.eval_sets.0.top_p": 0.7,
    },
    "paper_treepo": {
        **_DAPO_PIECES,
        "algorithm.advantage": "tree",
        "algorithm.advantage_params.weighting": "average",
        "algorithm.clip_c": 10.0,
        "algorithm.overlong_buffer": 512,
        "rollout.sampler": "tree",
        "rollout.tree.segment_len": 512,
        "rollout.tree.max_depth": 14,
        "rollout.tree.width": 16,
        "rollout.tree.branching": 2,
        "rollout.tree.init_divergence_min": 2,
        "rollout.tree.init_divergence_max": 8,
        "rollout.tree.divergence_policy": "even",
        "rollout.max_tokens": 512 * 14,
        "learner.warmup_steps": 10 * 16,
        "model.path": "Qwen/Qwen2.5-7B",
        "trainer.eval_sets.0.n": 16,
    },
}

# hub dataset -> (rows in its column layout, a completion its gold answer grades correct, one graded wrong)
_DAPO_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{}\n\nRemember to put "
    'your answer on its own line after "Answer:".'
)
_DAPO_PROMPT = _DAPO_INSTRUCTION.format("What is the sum of the positive divisors of 12?")
HUB_ROWS: dict[str, tuple[list[dict[str, Any]], str, str]] = {
    "openai/gsm8k:main": (
        [
            {
                "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                "in May. How many clips did Natalia sell altogether in April and May?",
                "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                "clips altogether in April and May.\n#### 72",
            }
        ],
        "In May she sold 24, so 48 + 24 = 72.\n#### 72",
        "She sold 48 + 48 = 96.\n#### 96",
    ),
    "DigitalLearningGmbH/MATH-lighteval": (
        [
            {
                "problem": "What is $\\frac{1}{2} + \\frac{1}{3}$?",
                "level": "Level 1",
                "solution": "We have $\\frac{1}{2}+\\frac{1}{3}=\\frac{3}{6}+\\frac{2}{6}=\\boxed{\\frac{5}{6}}$.",
                "type": "Prealgebra",
            }
        ],
        "Over a common denominator the sum is $\\boxed{\\frac{5}{6}}$.",
        "The sum is $\\boxed{\\frac{2}{5}}$.",
    ),
    "open-r1/DAPO-Math-17k-Processed:en": (
        [
            {
                "prompt": _DAPO_PROMPT,
                "solution": "28",
                "data_source": "math_dapo",
                "source_prompt": [{"content": _DAPO_PROMPT, "role": "user"}],
                "ability": "MATH",
                "reward_model": {"ground_truth": "28", "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": "0b4e2c2a-0000-4000-8000-000000000000"},
            }
        ],
        "1 + 2 + 3 + 4 + 6 + 12 = 28.\nAnswer: 28",
        "1 + 2 + 3 + 4 + 6 = 16.\nAnswer: 16",
    ),
    "agentica-org/DeepScaleR-Preview-Dataset": (
        [
            {
                "problem": "Find the positive real $x$ with $x^2 = \\frac{1}{4}$.",
                "answer": "\\frac{1}{2}",
                "solution": "Taking the positive square root, $x = \\frac{1}{2}$.",
            }
        ],
        "So $x = \\boxed{\\frac{1}{2}}$.",
        "So $x = \\boxed{\\frac{1}{4}}$.",
    ),
}


def _compose(recipe: str, overrides=()):
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        return compose(config_name=recipe, overrides=list(overrides))


def test_every_paper_recipe_is_checked_and_documented():
    assert set(PAPER_RECIPES) == set(PAPER_VALUES)
    with open(os.path.join(ROOT, "docs", "recipes.md"), encoding="utf-8") as f:
        doc = f.read()
    for recipe in PAPER_RECIPES:
        assert f"rltrain --config-name {recipe}" in doc


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_paper_recipe_validates_with_the_paper_values(recipe):
    cfg = _compose(recipe)
    validate(cfg)
    for key, expected in PAPER_VALUES[recipe].items():
        assert OmegaConf.select(cfg, key, throw_on_missing=True) == expected, key
    assert cfg.run.name == recipe


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_paper_recipe_runs_on_the_gpu_node_layout(recipe):
    cfg = _compose(recipe)
    assert (cfg.rollout.engine, cfg.learner.backend, cfg.cluster.num_gpus) == ("vllm", "deepspeed", 8)
    assert cfg.model.dtype == "bfloat16" and not cfg.sft.enabled
    # Sizes the header leaves implicit: every response fits the model's budget, every mini-batch holds groups.
    assert cfg.algorithm.overlong_buffer < cfg.rollout.max_tokens
    assert cfg.trainer.prompts_per_step % cfg.algorithm.mini_batches == 0


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_paper_recipe_scores_math500_aime24_amc23(recipe):
    names = {spec.name for spec in parse_eval_sets(_compose(recipe).trainer.eval_sets, "trainer.eval_sets")}
    assert {"math500", "aime24", "amc23"} <= names


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_paper_recipe_dataset_keys_load_and_grade(recipe, tmp_path):
    cfg = _compose(recipe)
    assert cfg.data.task == "hf" and cfg.data.hf_split == "train"
    rows, right, wrong = HUB_ROWS[cfg.data.path]
    table = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows * 2), table)
    local = _compose(recipe, ["data.task=parquet", f"data.path={table}", "data.num_eval=1"])
    train, held_out = load_task_data(local.data)
    row = train[0]
    assert row["prompt"] == rows[0][cfg.data.prompt_key] and len(held_out) == 1
    (spec,) = resolve_reward_functions(OmegaConf.to_container(cfg.reward.functions, resolve=True))
    fields = {key: value for key, value in row.items() if key != "answer"}
    assert call_reward(spec, right, row["answer"], fields)["score"] == 1.0
    wrong_score = spec.params.get("wrong_score", 0.0)
    assert call_reward(spec, wrong, row["answer"], fields)["score"] == wrong_score
