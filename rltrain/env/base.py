"""The environment interface: what a multi-turn episode asks of the world between model turns.

An episode alternates model turns and environment turns: ``reset(row)`` gives the first observation (text
appended after the prompt, may be empty), then each model turn's text and token ids go to ``step``, whose
``StepResult`` says what the model sees next, the turn's reward and whether the episode is over. The sampler
(rltrain/sampling/episodes.py) ends an episode also at ``env.max_turns`` or ``env.max_tokens``.

Environments run in grader processes (rltrain/env/worker.py), never in the driver or a rollout worker, and each
call replays the episode in a fresh object: an environment must be a deterministic function of its constructor
parameters, the row and the actions so far. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepResult:
    """One environment turn: text for the model, this turn's reward, whether the episode ended, and numeric
    metrics (summed over the episode's turns: ``tool_calls``, ``tool_errors``, ``acc`` ...)."""

    observation: str = ""
    reward: float = 0.0
    done: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


class Environment:
    """Base class of environments (subclassing is optional: any class with ``reset`` and ``step`` works).

    Constructed as ``cls(**env.params)`` in a grader process. ``reset(row)``: the dataset row (prompt, answer,
    other columns) -> first observation text (or a StepResult). ``step(action_text, action_ids)``: the model
    turn, decoded with special tokens kept, and its sampled token ids -> StepResult (or an
    ``(observation, reward, done)`` tuple). Optional ``replay(action_text, action_ids)``: called instead of
    ``step`` for the earlier actions when a call replays the episode, for environments whose steps are costly.
    """

    def reset(self, row: dict[str, Any]) -> str | StepResult:
        return ""

    def step(self, action_text: str, action_ids: tuple[int, ...]) -> StepResult | tuple:
        raise NotImplementedError


def as_step_result(value: Any) -> StepResult:
    """A StepResult from what ``reset``/``step`` returned: a StepResult, a str/bytes observation, or a tuple
    ``(observation, reward, done[, metrics])``. Raises TypeError for anything else or a non-finite number."""
    if isinstance(value, StepResult):
        result = value
    elif isinstance(value, str | bytes):
        result = StepResult(observation=value)  # type: ignore[arg-type] - bytes are cleaned by the worker
    elif isinstance(value, tuple) and 3 <= len(value) <= 4:
        result = StepResult(value[0], value[1], value[2], dict(value[3]) if len(value) == 4 else {})
    else:
        raise TypeError(
            f"environment returned {type(value).__name__}; expected a StepResult, an observation string, "
            "or (observation, reward, done[, metrics])"
        )
    if not isinstance(result.observation, str | bytes):
        raise TypeError(f"observation must be str or bytes, got {type(result.observation).__name__}")
    if not isinstance(result.metrics, Mapping):
        raise TypeError(f"metrics must be a mapping, got {type(result.metrics).__name__}")
    numbers = {"reward": result.reward, **{f"metrics[{k!r}]": v for k, v in result.metrics.items()}}
    for name, number in numbers.items():
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            raise TypeError(f"{name} must be a finite number, got {number!r}")
    return StepResult(result.observation, float(result.reward), bool(result.done), dict(result.metrics))


def on_own_line(text: str, action_text: str) -> str:
    """``text`` as a line of its own after the model's turn: a line break before it (unless the turn ended with
    one) and after it. Why: a byte-level BPE merges punctuation runs (``</calc><`` -> ``</``, ``calc``, ``><``), so
    an observation glued to a close tag would leave its first character inside the turn's last sampled token."""
    separator = "" if action_text.endswith("\n") else "\n"
    return f"{separator}{text}\n"


def clean_observation(observation: str | bytes, max_chars: int) -> tuple[str, bool, bool]:
    """(text, was cut, was not UTF-8): bytes are decoded as UTF-8 (invalid sequences become U+FFFD), a string's
    lone surrogates (not encodable) become ``?``; then at most ``max_chars`` characters are kept."""
    if isinstance(observation, bytes):
        text = observation.decode("utf-8", errors="replace")
        non_utf8 = "\ufffd" in text and b"\xef\xbf\xbd" not in observation
    else:
        text = observation.encode("utf-8", errors="replace").decode("utf-8")
        non_utf8 = text != observation
    cut = len(text) > max_chars
    return (text[:max_chars] if cut else text), cut, non_utf8
