"""Procedural reasoning tasks with exact ground truth, generated from a seed.

Each generator yields rows ``{"prompt", "answer", "solution", "task", "id"}``: ``prompt`` is the question text,
``answer`` the ground truth the grader checks, ``solution`` a reference completion (the SFT target; it continues
the prompt directly, no separator). ``generate_task`` splits rows into train and held-out sets that share no
question: held-out questions are drawn first (distinct), then train rows are drawn from a separate random stream,
skipping any held-out question. Train rows may repeat a question when the question space is small.
"""

from __future__ import annotations

import ast
import operator
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from rltrain.config import ConfigError, check_kwargs
from rltrain.data import chain_tasks, tool_tasks

_MAX_DRAWS_PER_ROW = 200  # rejection-sampling budget before concluding the question space is too small


@dataclass(frozen=True)
class Question:
    prompt: str
    answer: Any
    solution: str
    key: Hashable  # canonical identity: two questions with the same key count as the same question


# ---------------------------------------------------------------- expression evaluation


_BINARY_OPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def evaluate_expression(expression: str) -> Fraction:
    """Exact value of an expression of non-negative integers, ``+ - * /`` and parentheses.

    Raises ValueError on anything else (names, calls, powers, floats) and ZeroDivisionError on ``x/0``.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from exc
    return _evaluate_node(tree.body, expression)


def _evaluate_node(node: ast.AST, expression: str) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left = _evaluate_node(node.left, expression)
        right = _evaluate_node(node.right, expression)
        return _BINARY_OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate_node(node.operand, expression)
    raise ValueError(f"unsupported element {ast.dump(node)[:40]} in expression {expression!r}")


def expression_numbers(expression: str) -> list[int]:
    """The integer literals of an expression, in order of appearance (sorted comparison checks usage)."""
    tree = ast.parse(expression.strip(), mode="eval")
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and type(n.value) is int]


# ---------------------------------------------------------------- arithmetic


_ARITHMETIC_OPS = ("+", "-", "*")


def _random_operand(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def arithmetic(rng: random.Random, digits: int = 2, ops: Sequence[str] = ("+", "-"), num_operands: int = 2) -> Question:
    """``"23+58="`` -> answer 81 (int, ordinary precedence), solution ``"81"``. Operands have exactly ``digits``
    digits (0-9 when digits=1); each operator is drawn uniformly from ``ops``."""
    operands = [_random_operand(rng, digits) for _ in range(num_operands)]
    operators = [rng.choice(list(ops)) for _ in range(num_operands - 1)]
    expression = str(operands[0]) + "".join(op + str(x) for op, x in zip(operators, operands[1:]))
    value = evaluate_expression(expression)
    return Question(prompt=f"{expression}=", answer=int(value), solution=str(int(value)), key=expression)


def _check_arithmetic_params(digits: int = 2, ops: Sequence[str] = ("+", "-"), num_operands: int = 2) -> None:
    if not isinstance(digits, int) or digits < 1:
        raise ConfigError(f"data.task_params.digits must be an int >= 1, got {digits!r}")
    if not isinstance(num_operands, int) or num_operands < 2:
        raise ConfigError(f"data.task_params.num_operands must be an int >= 2, got {num_operands!r}")
    if not ops or any(op not in _ARITHMETIC_OPS for op in ops):
        raise ConfigError(f"data.task_params.ops={list(ops)!r}: each must be one of {list(_ARITHMETIC_OPS)}")


# ---------------------------------------------------------------- countdown

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3
_INTEGER_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}  # / is exact here


def _combine(left: tuple[str, int, int], op: str, right: tuple[str, int, int]) -> tuple[str, int, int] | None:
    """Join two (text, value, precedence) terms with the fewest parentheses; None when the result would be
    negative or a non-exact division (the reference solution stays in non-negative integers)."""
    (left_text, left_value, left_prec), (right_text, right_value, right_prec) = left, right
    if op == "-" and left_value < right_value:
        return None
    if op == "/" and (right_value == 0 or left_value % right_value):
        return None
    prec = _PRECEDENCE[op]
    if left_prec < prec:
        left_text = f"({left_text})"
    # Right operand of - and / also needs parentheses at equal precedence: a-(b+c), a/(b*c).
    if right_prec < prec or (op in "-/" and right_prec == prec):
        right_text = f"({right_text})"
    return f"{left_text}{op}{right_text}", _INTEGER_OPS[op](left_value, right_value), prec


def _random_solution(rng: random.Random, numbers: list[int], ops: Sequence[str]) -> tuple[str, int] | None:
    """A random expression using every number exactly once; None if a random choice hit an invalid step."""
    terms = [(str(n), n, _ATOM) for n in numbers]
    while len(terms) > 1:
        i, j = rng.sample(range(len(terms)), 2)
        joined = _combine(terms[i], rng.choice(list(ops)), terms[j])
        if joined is None:
            return None
        terms = [t for k, t in enumerate(terms) if k not in (i, j)] + [joined]
    return terms[0][0], terms[0][1]


def countdown(
    rng: random.Random,
    num_numbers: int = 3,
    max_number: int = 20,
    target_range: Sequence[int] = (1, 100),
    ops: Sequence[str] = ("+", "-", "*", "/"),
) -> Question:
    """``"Use 3, 5, 7 to make 22:"`` -> answer ``{"target": 22, "numbers": [3, 5, 7]}``, solution ``"3*5+7"``.

    Numbers are drawn from 1..max_number; the target is the value of a random expression that uses every
    number exactly once (so it is always solvable) and lies in ``target_range`` (inclusive).
    """
    low, high = target_range
    for _ in range(_MAX_DRAWS_PER_ROW):
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        found = _random_solution(rng, numbers, ops)
        if found is not None and low <= found[1] <= high:
            expression, target = found
            listed = ", ".join(map(str, numbers))
            return Question(
                prompt=f"Use {listed} to make {target}:",
                answer={"target": target, "numbers": numbers},
                solution=expression,
                key=(tuple(sorted(numbers)), target),
            )
    raise ConfigError(
        f"countdown: no solvable question with target in {list(target_range)} after {_MAX_DRAWS_PER_ROW} draws "
        f"(num_numbers={num_numbers}, max_number={max_number}); widen data.task_params.target_range"
    )


def _check_countdown_params(
    num_numbers: int = 3,
    max_number: int = 20,
    target_range: Sequence[int] = (1, 100),
    ops: Sequence[str] = ("+", "-", "*", "/"),
) -> None:
    if not isinstance(num_numbers, int) or num_numbers < 2:
        raise ConfigError(f"data.task_params.num_numbers must be an int >= 2, got {num_numbers!r}")
    if not isinstance(max_number, int) or max_number < 1:
        raise ConfigError(f"data.task_params.max_number must be an int >= 1, got {max_number!r}")
    if len(target_range) != 2 or target_range[0] > target_range[1]:
        raise ConfigError(f"data.task_params.target_range must be [low, high] with low <= high, got {target_range}")
    if not ops or any(op not in _PRECEDENCE for op in ops):
        raise ConfigError(f"data.task_params.ops={list(ops)!r}: each must be one of {list(_PRECEDENCE)}")


# ---------------------------------------------------------------- registry and splits

TASKS: dict[str, tuple[Callable[..., Question], Callable[..., None]]] = {
    "arithmetic": (arithmetic, _check_arithmetic_params),
    "countdown": (countdown, _check_countdown_params),
    "calculator": (tool_tasks.calculator, tool_tasks.check_calculator),  # environment recipes (tool_tasks.py)
    "countdown_retry": (tool_tasks.countdown_retry, tool_tasks.check_countdown_retry),
    "addition_chain": (chain_tasks.addition_chain, chain_tasks.check_addition_chain),  # recipe delethink
}


def _row(question: Question, task: str, split: str, index: int) -> dict[str, Any]:
    return {
        "prompt": question.prompt,
        "answer": question.answer,
        "solution": question.solution,
        "task": task,
        "id": f"{task}-{split}-{index}",
    }


def generate_task(
    task: str, num_train: int, num_eval: int, seed: int, **params: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows) of a procedural task; deterministic in (task, seed, params, sizes).

    Held-out questions are distinct; no train question equals a held-out one (compared by canonical key,
    e.g. countdown numbers as a multiset). Raises ConfigError for an unknown task or parameter, or when
    the question space is too small for ``num_eval`` distinct held-out questions.
    """
    if task not in TASKS:
        raise ConfigError(f"data.task={task!r} is not a procedural task; known: {sorted(TASKS)}")
    make, check = TASKS[task]
    check_kwargs(check, params, "data.task_params")
    check(**params)
    held_out_rng = random.Random(f"{task}:{seed}:held_out")
    held_out: dict[Hashable, Question] = {}
    for _ in range(max(num_eval, 1) * _MAX_DRAWS_PER_ROW):
        if len(held_out) >= num_eval:
            break
        question = make(held_out_rng, **params)
        held_out.setdefault(question.key, question)
    if len(held_out) < num_eval:
        raise ConfigError(
            f"data.num_eval={num_eval}: task {task!r} with params {params} yielded only {len(held_out)} "
            "distinct questions; lower data.num_eval or make the task larger"
        )
    train_rng = random.Random(f"{task}:{seed}:train")
    train: list[Question] = []
    for _ in range(max(num_train, 1) * _MAX_DRAWS_PER_ROW):
        if len(train) >= num_train:
            break
        question = make(train_rng, **params)
        if question.key not in held_out:
            train.append(question)
    if len(train) < num_train:
        raise ConfigError(f"task {task!r} with params {params}: every question is held out; lower data.num_eval")
    return (
        [_row(q, task, "train", i) for i, q in enumerate(train)],
        [_row(q, task, "eval", i) for i, q in enumerate(held_out.values())],
    )
