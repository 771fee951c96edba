"""Procedural tasks: determinism, disjoint splits, correct ground truth, solvable countdown, clear errors."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rltrain.config import ConfigError
from rltrain.data.tasks import evaluate_expression, expression_numbers, generate_task


def _countdown_key(row):
    return tuple(sorted(row["answer"]["numbers"])), row["answer"]["target"]


def test_generation_is_deterministic_per_seed():
    for task in ("arithmetic", "countdown"):
        assert generate_task(task, 300, 30, seed=7) == generate_task(task, 300, 30, seed=7)
        assert generate_task(task, 300, 30, seed=7) != generate_task(task, 300, 30, seed=8)


def test_row_schema():
    train, held_out = generate_task("arithmetic", 5, 5, seed=0)
    for split, rows in (("train", train), ("eval", held_out)):
        for i, row in enumerate(rows):
            assert set(row) == {"prompt", "answer", "solution", "task", "id"}
            assert row["task"] == "arithmetic" and row["id"] == f"arithmetic-{split}-{i}"


@pytest.mark.parametrize("params", [{}, {"digits": 1, "ops": ["+"]}])
def test_arithmetic_splits_are_disjoint_and_held_out_distinct(params):
    # digits=1 with "+" has only 100 questions: train must repeat questions yet never touch held-out ones.
    train, held_out = generate_task("arithmetic", 2000, 60, seed=0, **params)
    held_out_prompts = [row["prompt"] for row in held_out]
    assert len(train) == 2000 and len(held_out) == 60
    assert len(set(held_out_prompts)) == 60
    assert not set(held_out_prompts) & {row["prompt"] for row in train}


def test_countdown_splits_are_disjoint_up_to_number_order():
    train, held_out = generate_task("countdown", 3000, 100, seed=0, max_number=6, target_range=[1, 30])
    held_out_keys = [_countdown_key(row) for row in held_out]
    assert len(set(held_out_keys)) == 100
    assert not set(held_out_keys) & {_countdown_key(row) for row in train}


@pytest.mark.parametrize(
    "params",
    [{}, {"digits": 3, "ops": ["+", "-", "*"], "num_operands": 3}, {"digits": 1, "ops": ["*"], "num_operands": 4}],
)
def test_arithmetic_ground_truth(params):
    digits = params.get("digits", 2)
    train, _ = generate_task("arithmetic", 200, 10, seed=1, **params)
    for row in train:
        expression = row["prompt"].removesuffix("=")
        assert row["prompt"].endswith("=")
        assert row["answer"] == eval(expression)  # Python's own precedence as the reference
        assert row["solution"] == str(row["answer"])
        operands = expression.replace("*", " ").replace("+", " ").replace("-", " ").split()
        assert len(operands) == params.get("num_operands", 2)
        assert all(len(x) == digits for x in operands)


def test_arithmetic_default_uses_both_ops():
    train, _ = generate_task("arithmetic", 200, 10, seed=0)
    assert any("+" in row["prompt"] for row in train) and any("-" in row["prompt"] for row in train)
    assert any(row["answer"] < 0 for row in train)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    num_numbers=st.integers(2, 4),
    max_number=st.integers(2, 30),
)
def test_countdown_is_solvable_by_its_reference_solution(seed, num_numbers, max_number):
    train, held_out = generate_task(
        "countdown", 20, 3, seed=seed, num_numbers=num_numbers, max_number=max_number, target_range=[0, 1000]
    )
    for row in train + held_out:
        numbers, target = row["answer"]["numbers"], row["answer"]["target"]
        assert len(numbers) == num_numbers and all(1 <= n <= max_number for n in numbers)
        assert evaluate_expression(row["solution"]) == target
        assert sorted(expression_numbers(row["solution"])) == sorted(numbers)  # every number exactly once
        assert 0 <= target <= 1000
        assert row["prompt"] == f"Use {', '.join(map(str, numbers))} to make {target}:"


def test_countdown_respects_target_range_and_ops():
    train, _ = generate_task("countdown", 300, 10, seed=0, target_range=[10, 20], ops=["+", "-"])
    assert all(10 <= row["answer"]["target"] <= 20 for row in train)
    assert not any(op in row["solution"] for row in train for op in "*/")


def test_evaluate_expression():
    assert evaluate_expression("(17+11)*3") == 84
    assert evaluate_expression("7/2") == Fraction(7, 2)
    assert evaluate_expression("10-(2+3)") == 5
    for bad in ("2**3", "__import__('os')", "1.5+1", "x+1", "3+"):
        with pytest.raises(ValueError):
            evaluate_expression(bad)
    with pytest.raises(ZeroDivisionError):
        evaluate_expression("1/(2-2)")


@pytest.mark.parametrize(
    ("task", "params", "match"),
    [
        ("sudoku", {}, "not a procedural task"),
        ("arithmetic", {"digitz": 2}, r"data.task_params: unknown parameter\(s\) \['digitz'\]"),
        ("arithmetic", {"ops": ["/"]}, "ops"),
        ("arithmetic", {"digits": 0}, "digits"),
        ("countdown", {"target_range": [50, 10]}, "target_range"),
        ("countdown", {"num_numbers": 1}, "num_numbers"),
    ],
)
def test_bad_task_config_raises(task, params, match):
    with pytest.raises(ConfigError, match=match):
        generate_task(task, 10, 5, seed=0, **params)


def test_question_space_too_small_for_held_out_raises():
    with pytest.raises(ConfigError, match="data.num_eval=150"):
        generate_task("arithmetic", 10, 150, seed=0, digits=1, ops=["+"])
    with pytest.raises(ConfigError, match="every question is held out"):
        generate_task("arithmetic", 10, 100, seed=0, digits=1, ops=["+"])
