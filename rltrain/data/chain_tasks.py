"""``addition_chain`` (recipe ``delethink``): a long chain of one-digit additions whose reasoning trace is longer than
one Delethink chunk (docs/environments.md). Registered in ``rltrain.data.tasks.TASKS``.

The prompt names each operand with a letter, ``"a3 b5 c2 d7:"``; the answer is their sum modulo ``modulus``. The
SFT ``solution`` writes one step per operand, its letter, its digit and the running total (mod ``modulus``):
``" a3=3 b5=8 c2=0 d7=7 <answer>7</answer>"``. Each step is a few tokens and depends only on the step before it
and the query (the next letter's digit), so a chunk that starts from the query and the last steps can continue:
the state a chunk needs fits in the carry-over. ``num_operands`` sets the trace's length (4 to 5 tokens a step).
"""

from __future__ import annotations

import random
import string
from typing import Any

from rltrain.config import ConfigError

_LETTERS = string.ascii_lowercase


def addition_chain(rng: random.Random, num_operands: int = 12, modulus: int = 10) -> Any:
    """``"a3 b5 c2:"`` -> answer ``(3+5+2) % modulus``, solution ``" a3=3 b5=8 c2=0 <answer>0</answer>"``."""
    from rltrain.data.tasks import Question

    digits = [rng.randint(0, 9) for _ in range(num_operands)]
    terms = [f"{letter}{digit}" for letter, digit in zip(_LETTERS, digits)]
    steps, total = [], 0
    for term, digit in zip(terms, digits):
        total = (total + digit) % modulus
        steps.append(f" {term}={total}")
    solution = "".join(steps) + f" <answer>{total}</answer>"
    return Question(prompt=" ".join(terms) + ":", answer=total, solution=solution, key=tuple(digits))


def check_addition_chain(num_operands: int = 12, modulus: int = 10) -> None:
    if isinstance(num_operands, bool) or not isinstance(num_operands, int) or not 1 <= num_operands <= len(_LETTERS):
        raise ConfigError(f"data.task_params.num_operands={num_operands!r}: an integer in [1, {len(_LETTERS)}]")
    if isinstance(modulus, bool) or not isinstance(modulus, int) or modulus < 2:
        raise ConfigError(f"data.task_params.modulus={modulus!r}: an integer >= 2")
