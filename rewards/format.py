"""``format``: does the completion follow the reasoning template? (no ground truth needed)

Modes (``mode=``):
- ``think_answer`` (default, DeepSeek-R1-Zero template): ``<think>…</think>`` then ``<answer>…</answer>`` and
  nothing else; each tag exactly once, non-empty answer.
- ``think``: ``<think>…</think>`` first (each tag once), then a non-empty final answer after it.
- ``tags``: partial credit, 0.25 for each of the four tags that occurs exactly once (open-r1 ``tag_count``).
- ``regex``: the completion (stripped) must fully match the ``regex`` parameter (``re.DOTALL``).
Checks are plain string scans, linear in the completion's length whatever it contains.
"""

from __future__ import annotations

import functools
import re
from typing import Any

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def _each_once(text: str, tags: tuple[str, ...]) -> bool:
    return all(text.count(tag) == 1 for tag in tags)


def think_answer(text: str) -> bool:
    """``<think>…</think>`` then ``<answer>…</answer>``, each tag once, whitespace only between and around."""
    text = text.strip()
    if not (_each_once(text, _TAGS) and text.startswith("<think>") and text.endswith("</answer>")):
        return False
    between, answer = text[text.index("</think>") + len("</think>") :].split("<answer>", 1)
    return not between.strip() and bool(answer[: -len("</answer>")].strip())


def think_then_answer(text: str) -> bool:
    """``<think>…</think>`` at the start (each tag once), followed by a non-empty answer."""
    text = text.strip()
    if not (_each_once(text, _TAGS[:2]) and text.startswith("<think>")):
        return False
    return bool(text.split("</think>", 1)[1].strip())


def tag_credit(text: str) -> float:
    """0.25 for each of ``<think> </think> <answer> </answer>`` that occurs exactly once."""
    return 0.25 * sum(text.count(tag) == 1 for tag in _TAGS)


@functools.lru_cache(maxsize=64)
def _compiled(regex: str) -> re.Pattern[str]:
    return re.compile(regex, re.DOTALL)


def score(
    completion: str, ground_truth: Any = None, *, mode: str = "think_answer", regex: str | None = None, **fields: Any
) -> float:
    """1.0 if the completion has the format of ``mode`` else 0.0 (``tags``: 0.0-1.0 partial credit)."""
    text = completion if isinstance(completion, str) else str(completion)
    if mode == "think_answer":
        return float(think_answer(text))
    if mode == "think":
        return float(think_then_answer(text))
    if mode == "tags":
        return tag_credit(text)
    if mode == "regex":
        if regex is None:
            raise ValueError("format mode 'regex' needs the 'regex' parameter")
        return float(_compiled(regex).fullmatch(text.strip()) is not None)
    raise ValueError(f"format mode {mode!r} is not one of ['think_answer', 'think', 'tags', 'regex']")
