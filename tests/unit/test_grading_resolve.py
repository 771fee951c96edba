"""Reward-function resolution (start-up errors), result normalisation and batch assembly."""

import math

import pytest

from rltrain.config import ConfigError
from rltrain.grading.grader import assemble
from rltrain.grading.pool import Outcome
from rltrain.grading.resolve import call_reward, normalise_result, resolve_reward_functions

CUSTOM = """
import asyncio

def plain(completion, ground_truth):
    return float(completion == ground_truth)

def with_columns(completion, ground_truth, difficulty=0, **fields):
    return {"score": 1.0, "difficulty": difficulty, "n_fields": len(fields), "pred": "text is dropped"}

def only_question(completion, ground_truth, question=""):
    return len(question)

async def slow_async(completion, ground_truth, scale=1.0):
    await asyncio.sleep(0)
    return {"score": scale}

NOT_CALLABLE = 3
"""


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(CUSTOM)
    return str(path)


def test_builtin_and_file_and_module_references(reward_file):
    specs = resolve_reward_functions(
        [{"fn": "math"}, {"fn": f"{reward_file}:plain", "weight": 0.5}, {"fn": "rewards.gsm8k:score"}]
    )
    assert [spec.name for spec in specs] == ["math", "plain", "score"]
    assert specs[1].weight == 0.5 and specs[1].ref.startswith("/")


def test_duplicate_names_are_made_unique():
    assert [s.name for s in resolve_reward_functions([{"fn": "format"}, {"fn": "format"}])] == ["format", "format_2"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"fn": "/no/such/file.py:f"}, "does not exist"),
        ({"fn": "nosuchmodule_xyz:f"}, "cannot import"),
        ({"fn": "rewards.math:nope"}, "no attribute"),
        ({"fn": "not_a_builtin"}, "not a built-in grader"),
        ({"fn": "math", "weight": "heavy"}, "weight"),
        ({"fn": "math", "weight": float("nan")}, "weight"),
        ({"fn": "math", "params": {"no_such_param": 1}}, "unknown parameter"),
        ({"fn": "math", "colour": "red"}, "unknown key"),
        ({"fn": "code", "params": {"timeout_s": -1}}, "timeout_s"),
        ({"weight": 1.0}, "'fn'"),
    ],
)
def test_bad_entries_fail_at_start_up_naming_the_problem(entry, message):
    with pytest.raises(ConfigError, match=message):
        resolve_reward_functions([entry])


def test_bad_custom_functions_fail_at_start_up(reward_file, tmp_path):
    with pytest.raises(ConfigError, match="not a function"):
        resolve_reward_functions([{"fn": f"{reward_file}:NOT_CALLABLE"}])
    with pytest.raises(ConfigError, match="cannot be called"):
        resolve_reward_functions([{"fn": f"{reward_file}:plain", "params": {"extra": 1}}])
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('import-time failure')\n")
    with pytest.raises(ConfigError, match="import-time failure"):
        resolve_reward_functions([{"fn": f"{broken}:f"}])
    with pytest.raises(ConfigError, match="non-empty list"):
        resolve_reward_functions([])


def test_columns_are_passed_only_when_accepted(reward_file):
    plain, columns, question = resolve_reward_functions(
        [{"fn": f"{reward_file}:plain"}, {"fn": f"{reward_file}:with_columns"}, {"fn": f"{reward_file}:only_question"}]
    )
    fields = {"difficulty": 3, "question": "why?", "id": 7}
    assert call_reward(plain, "a", "a", fields) == {"score": 1.0}
    assert call_reward(columns, "a", "b", fields) == {"score": 1.0, "difficulty": 3.0, "n_fields": 2.0}
    assert call_reward(question, "a", "b", fields) == {"score": 4.0}


def test_async_functions_and_params(reward_file):
    (spec,) = resolve_reward_functions([{"fn": f"{reward_file}:slow_async", "params": {"scale": 0.25}}])
    assert call_reward(spec, "x", None, {}) == {"score": 0.25}


@pytest.mark.parametrize("bad", ["1.0", None, {"acc": 1.0}, {"score": "1"}, [1.0]])
def test_normalise_result_rejects_non_numbers(bad):
    with pytest.raises(TypeError):
        normalise_result(bad)


def test_normalise_result_accepts_numbers_and_dicts():
    assert normalise_result(True) == {"score": 1.0}
    assert normalise_result({"score": 2, "acc": 1, "pred": "x"}) == {"score": 2.0, "acc": 1.0}


def test_assemble_weights_errors_and_metrics():
    specs = resolve_reward_functions([{"fn": "math", "weight": 1.0}, {"fn": "format", "weight": 0.5}])
    outcomes = [
        Outcome("ok", {"score": 1.0, "acc": 1.0}, elapsed_s=0.1),  # sample 0, math
        Outcome("ok", {"score": 1.0}, elapsed_s=0.2),  # sample 0, format
        Outcome("timeout", message="killed", elapsed_s=5.3),  # sample 1, math
        Outcome("exception", message="ValueError: x", elapsed_s=0.0),  # sample 1, format
    ]
    result = assemble(specs, outcomes, batch=2, on_error=-1.0)
    assert result.rewards.tolist() == [1.5, -1.5]
    assert result.parts["math"].tolist() == [1.0, -1.0]
    assert result.parts["math/acc"].tolist() == [1.0, 0.0]
    assert result.metrics["reward/errors/timeout"] == 1.0
    assert result.metrics["reward/errors/exception"] == 1.0
    assert result.metrics["reward/errors/crash"] == 0.0
    assert result.metrics["reward/math/mean"] == 0.0
    assert math.isclose(result.metrics["perf/grading_call_max_s"], 5.3)
