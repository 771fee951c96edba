"""Procedural tasks of the environment recipes (docs/environments.md), registered in ``rltrain.data.tasks.TASKS``.

- ``calculator`` (recipe ``tools``): ``arithmetic`` questions (default: 2-digit products, ``"47*83="``) whose
  SFT ``solution`` is a tool trace, ``<calc>47*83</calc>\n<result>3901</result>\n3901``: the call the model makes,
  the result the calculator environment answers, the final answer. ``tool=false``: the plain answer ``3901``
  (the no-tool baseline on the same questions).
- ``countdown_retry`` (recipe ``feedback``): ``countdown`` questions whose ``solution`` is, for a ``retry_frac``
  share of rows, a wrong attempt, the feedback environment's answer to it (``<fb>=13</fb>`` on its own line),
  then the correct expression.

Generators import ``rltrain.data.tasks`` inside their bodies: that module imports this one to register them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from rltrain.config import ConfigError

_WRONG_ATTEMPT_DRAWS = 20  # random expressions tried for a wrong first attempt (one may hit the target)


def calculator_trace(expression: str, value: int) -> str:
    """The plain-format tool trace of ``expression``: call, result (as CalculatorEnv renders it), answer."""
    return f"<calc>{expression}</calc>\n<result>{value}</result>\n{value}"


def calculator(
    rng: random.Random, digits: int = 2, ops: Sequence[str] = ("*",), num_operands: int = 2, tool: bool = True
) -> Any:
    from rltrain.data.tasks import Question, arithmetic

    question = arithmetic(rng, digits, ops, num_operands)
    expression = question.prompt.rstrip("=")
    solution = calculator_trace(expression, question.answer) if tool else question.solution
    return Question(question.prompt, question.answer, solution, question.key)


def check_calculator(digits: int = 2, ops: Sequence[str] = ("*",), num_operands: int = 2, tool: bool = True) -> None:
    from rltrain.data.tasks import _check_arithmetic_params

    _check_arithmetic_params(digits, ops, num_operands)
    if not isinstance(tool, bool):
        raise ConfigError(f"data.task_params.tool={tool!r}: true or false")


def countdown_retry(
    rng: random.Random,
    num_numbers: int = 3,
    max_number: int = 20,
    target_range: Sequence[int] = (1, 100),
    ops: Sequence[str] = ("+", "-", "*", "/"),
    retry_frac: float = 0.5,
) -> Any:
    """A countdown question whose solution is ``<answer>expr</answer>``, or for a ``retry_frac`` share a wrong
    attempt, the feedback environment's answer to it, then the right one (``retry_frac`` 0: answers only)."""
    from rltrain.data.tasks import Question, _random_solution, countdown
    from rltrain.env.base import on_own_line
    from rltrain.env.feedback import countdown_feedback

    question = countdown(rng, num_numbers, max_number, target_range, ops)
    solution = f"<answer>{question.solution}</answer>"
    if rng.random() < retry_frac:
        for _ in range(_WRONG_ATTEMPT_DRAWS):
            wrong = _random_solution(rng, question.answer["numbers"], ops)
            if wrong is not None and wrong[1] != question.answer["target"]:
                attempt = f"<answer>{wrong[0]}</answer>"
                feedback = on_own_line(countdown_feedback(attempt, question.answer)[1], attempt)
                solution = attempt + feedback + solution
                break
    return Question(question.prompt, question.answer, solution, question.key)


def check_countdown_retry(
    num_numbers: int = 3,
    max_number: int = 20,
    target_range: Sequence[int] = (1, 100),
    ops: Sequence[str] = ("+", "-", "*", "/"),
    retry_frac: float = 0.5,
) -> None:
    from rltrain.data.tasks import _check_countdown_params

    _check_countdown_params(num_numbers, max_number, target_range, ops)
    if isinstance(retry_frac, bool) or not isinstance(retry_frac, int | float) or not 0 <= retry_frac <= 1:
        raise ConfigError(f"data.task_params.retry_frac={retry_frac!r}: a fraction in [0, 1]")
