"""``calculator``: arithmetic with a calculator tool (recipe ``tools``).

The model may call a tool (``<calc>47*83</calc>`` in the plain format, a ``<tool_call>`` in the Hermes format);
the environment runs it and answers with its result. A turn without a tool call is the final answer: its last
integer is compared with the row's ``answer``: reward 1 (``acc`` 1) if equal, else 0. Metrics per episode:
``tool_calls``, ``tool_errors`` (a failing tool or a malformed call), ``acc``. After ``max_calls`` tool calls the
next call ends the episode unanswered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rltrain.env.base import Environment, StepResult
from rltrain.env.tools import call_tool, load_tools, make_format

_INTEGER = re.compile(r"-?\d+")
_SPECIAL = re.compile(r"<\|[^|>]*\|>|</s>|<s>")  # chat special tokens left in the decoded text


def final_integer(text: str) -> int | None:
    """The last integer of a final answer, special tokens removed; None without one."""
    found = _INTEGER.findall(_SPECIAL.sub(" ", text))
    return int(found[-1]) if found else None


class CalculatorEnv(Environment):
    def __init__(self, format: str = "plain", tools: Sequence[str] = ("calculator",), max_calls: int = 3):
        self.tools = load_tools(list(tools))
        self.format = make_format(format, self.tools)
        self.max_calls = max_calls
        self.calls = 0
        self.answer: Any = None

    def reset(self, row: dict[str, Any]) -> str:
        self.answer = row["answer"]
        return ""

    def step(self, action_text: str, action_ids: tuple[int, ...]) -> StepResult:
        call = self.format.parse(action_text)
        if call is None:
            correct = final_integer(action_text) == int(self.answer)
            return StepResult(reward=float(correct), done=True, metrics={"acc": float(correct)})
        self.calls += 1
        if self.calls > self.max_calls:
            return StepResult(done=True, metrics={"tool_calls": 1.0, "acc": 0.0})
        result, failed = call_tool(self.tools, call) if call.name else (call.arguments["error"], True)
        metrics = {"tool_calls": 1.0, "tool_errors": float(failed)}
        return StepResult(observation=self.format.render_result(result, action_text), metrics=metrics)
