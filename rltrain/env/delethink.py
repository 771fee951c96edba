"""``delethink``: reasoning in chunks with a bounded context (Aghajohari et al. 2025, "The Markovian Thinker").

An episode is a run of chunks. Chunk 1 is generated from the query alone, at most ``chunk_tokens`` tokens; at
each boundary the context is reset to the query plus the last ``carryover_tokens`` ids of the previous chunk's
context (its carried-over ids and its output), and the next chunk adds at most ``chunk_tokens -
carryover_tokens`` tokens, so no chunk's context exceeds query + ``chunk_tokens``. The episode ends when a chunk
stops (EOS or a stop string) or after ``max_chunks`` chunks (truncated). Ids are the engine's, kept verbatim.

Grading: one call of ``DelethinkEnv`` per episode, in the grader processes (rltrain/env/runner.py), on the final
chunk's context (carry-over and output): the last ``<answer>N</answer>`` (else the last integer) against the
row's ``answer``; reward and ``acc`` 1 if equal. ``max_chunks=1`` with ``chunk_tokens`` = the budget is LongCoT.
The sampler and the training rows: rltrain/env/delethink_sampler.py. This module imports no torch (grader
processes load it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from rltrain.config import ConfigError
from rltrain.env.base import Environment, StepResult

DELETHINK = "delethink"
_ANSWER = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")
_INTEGER = re.compile(r"-?\d+")


def check_chunking(chunk_tokens: int = 0, carryover_tokens: int = 0, max_chunks: int = 1) -> None:
    """ConfigError unless ``chunk_tokens >= 1``, ``0 <= carryover_tokens < chunk_tokens``, ``max_chunks >= 1``."""
    values = {"chunk_tokens": chunk_tokens, "carryover_tokens": carryover_tokens, "max_chunks": max_chunks}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"env.params.{key}={value!r}: an integer")
    if chunk_tokens < 1:
        raise ConfigError(f"env.params.chunk_tokens={chunk_tokens}: an integer >= 1")
    if not 0 <= carryover_tokens < chunk_tokens:
        raise ConfigError(
            f"env.params.carryover_tokens={carryover_tokens}: in [0, chunk_tokens) = [0, {chunk_tokens}) "
            "(a chunk after the first adds chunk_tokens - carryover_tokens tokens)"
        )
    if max_chunks < 1:
        raise ConfigError(f"env.params.max_chunks={max_chunks}: an integer >= 1")


def graded_answer(text: str) -> int | None:
    """The last ``<answer>N</answer>`` of ``text``, else its last integer; None without one."""
    tagged = _ANSWER.findall(text)
    if tagged:
        return int(tagged[-1])
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


class DelethinkEnv(Environment):
    """The grader of Delethink episodes (one ``step``: the final chunk's context). The chunking parameters are
    the sampler's; they live here so that ``env.params`` are checked once, with the environment's signature."""

    check_params = staticmethod(check_chunking)

    def __init__(self, chunk_tokens: int, carryover_tokens: int = 0, max_chunks: int = 1):
        self.answer: Any = None

    def reset(self, row: dict[str, Any]) -> str:
        self.answer = row["answer"]
        return ""

    def step(self, action_text: str, action_ids: tuple[int, ...]) -> StepResult:
        correct = graded_answer(action_text) == int(self.answer)
        return StepResult(reward=float(correct), done=True, metrics={"acc": float(correct)})


# ---------------------------------------------------------------- chunk arithmetic (sampler and SFT)


def chunk_budget(index: int, chunk_tokens: int, carryover_tokens: int) -> int:
    """New tokens chunk ``index`` (0-based) may generate: ``chunk_tokens``, then ``chunk_tokens - carryover``."""
    return chunk_tokens if index == 0 else chunk_tokens - carryover_tokens


def thinking_budget(chunk_tokens: int, carryover_tokens: int, max_chunks: int) -> int:
    """Most tokens an episode generates: C + (I - 1)(C - m)."""
    return chunk_tokens + (max_chunks - 1) * (chunk_tokens - carryover_tokens)


def attention_cost(context: int, generated: int) -> int:
    """Sum over ``generated`` tokens sampled after ``context`` ids of the ids each attends to: n*L + n(n-1)/2."""
    return generated * context + generated * (generated - 1) // 2


def chunk_sft_pairs(
    prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], chunk_tokens: int, carryover_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """SFT examples chunked the way the sampler chunks episodes: target ids cut into chunks of
    ``chunk_budget``; chunk k's prompt is the query plus the ``carryover_tokens`` ids before it."""
    chunk_prompts, chunk_targets = [], []
    for prompt, target in zip(prompts, targets):
        start, index = 0, 0
        while start < len(target):
            end = start + chunk_budget(index, chunk_tokens, carryover_tokens)
            carry = list(target[max(0, start - carryover_tokens) : start]) if index else []
            chunk_prompts.append(list(prompt) + carry)
            chunk_targets.append(list(target[start:end]))
            start, index = end, index + 1
    return chunk_prompts, chunk_targets


def chunking(params: Mapping[str, Any]) -> dict[str, int]:
    """``chunk_tokens``, ``carryover_tokens`` and ``max_chunks`` of ``env.params`` (defaults: 0 and 1), checked."""
    values = {"carryover_tokens": 0, "max_chunks": 1, **params}
    check_chunking(**values)
    return {key: int(values[key]) for key in ("chunk_tokens", "carryover_tokens", "max_chunks")}


def sft_chunking(env: Any) -> tuple[int, int] | None:
    """(chunk_tokens, carryover_tokens) when ``env.fn`` is Delethink (its SFT targets are chunked), else None."""
    if env.fn != DELETHINK:
        return None
    values = chunking(env.params)
    return values["chunk_tokens"], values["carryover_tokens"]
