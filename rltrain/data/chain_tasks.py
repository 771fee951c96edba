"""``addition_chain`` (recipe ``delethink``): a chain of one-digit additions whose reasoning trace is longer than one
Delethink chunk (docs/environments.md). Registered in ``rltrain.data.tasks.TASKS``.

The prompt gives a start digit, an addend and the number of additions as a letter (``a`` = 1 ... ``z`` = 26):
``"5+7 c:"`` is 5 + 7 + 7 + 7. The answer is the sum modulo ``modulus``. The SFT ``solution`` writes one step per
addition, counting the letter down to ``a``, repeating the addend and writing the running total (mod
``modulus``): ``" c+7=2 b+7=9 a+7=6 <answer>6</answer>"``. A step is 5 tokens and depends only on the step before
it, so a chunk that starts from the query and the last steps can continue: the state a chunk needs fits in the
carry-over. The number of additions is drawn from ``[min_steps, max_steps]``: the trace's length.
"""

from __future__ import annotations

import random
import string
from typing import Any

from rltrain.config import ConfigError

_LETTERS = string.ascii_lowercase


def addition_chain(rng: random.Random, min_steps: int = 6, max_steps: int = 12, modulus: int = 10) -> Any:
    """``"5+7 c:"`` -> answer ``(5 + 3 * 7) % modulus``, solution ``" c+7=2 b+7=9 a+7=6 <answer>6</answer>"``."""
    from rltrain.data.tasks import Question

    start, addend, steps = rng.randrange(modulus), rng.randint(1, modulus - 1), rng.randint(min_steps, max_steps)
    total, trace = start, []
    for remaining in range(steps, 0, -1):
        total = (total + addend) % modulus
        trace.append(f" {_LETTERS[remaining - 1]}+{addend}={total}")
    solution = "".join(trace) + f" <answer>{total}</answer>"
    prompt = f"{start}+{addend} {_LETTERS[steps - 1]}:"
    return Question(prompt=prompt, answer=total, solution=solution, key=(start, addend, steps))


def check_addition_chain(min_steps: int = 6, max_steps: int = 12, modulus: int = 10) -> None:
    for key, value in (("min_steps", min_steps), ("max_steps", max_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= len(_LETTERS):
            raise ConfigError(f"data.task_params.{key}={value!r}: an integer in [1, {len(_LETTERS)}]")
    if min_steps > max_steps:
        raise ConfigError(f"data.task_params.min_steps={min_steps}: at most max_steps={max_steps}")
    if isinstance(modulus, bool) or not isinstance(modulus, int) or not 2 <= modulus <= 10:
        raise ConfigError(f"data.task_params.modulus={modulus!r}: an integer in [2, 10] (one-digit totals)")
