"""Tools: plain Python functions, registered by name or loaded from ``path.py:fn``, their JSON schema derived
from the signature, and the two formats a model calls them in.

- ``hermes``: what Hermes/Qwen instruct models emit, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
  the result comes back as the chat template renders a ``tool`` message (Qwen2.5's ChatML: a user turn holding
  ``<tool_response>...</tool_response>``, then the assistant's generation prompt).
- ``plain``: a tag for the tiny model, ``<calc>expression</calc>``, calling the environment's first tool with its
  first parameter; the result comes back as ``<result>...</result>`` on its own line (``base.on_own_line``).

No torch import (environments run in grader processes).
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rltrain.config import ConfigError
from rltrain.env.base import on_own_line

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    schema: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of integers with + - * / and parentheses (exact; integer when whole)."""
    from rltrain.data.tasks import evaluate_expression

    value = evaluate_expression(expression)
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.6g}"


BUILTIN_TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator}


def tool_schema(fn: Callable[..., Any], name: str | None = None) -> dict[str, Any]:
    """OpenAI/Hermes function schema from the signature: parameter types from annotations (str, int, float,
    bool, list, dict; others untyped), parameters without a default required, the docstring's first line as
    the description."""
    hints = typing.get_type_hints(fn)
    properties, required = {}, []
    for parameter in inspect.signature(fn).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        kind = _JSON_TYPES.get(typing.get_origin(hints.get(parameter.name)) or hints.get(parameter.name))
        properties[parameter.name] = {"type": kind} if kind else {}
        if parameter.default is parameter.empty:
            required.append(parameter.name)
    description = (inspect.getdoc(fn) or "").split("\n", 1)[0]
    parameters = {"type": "object", "properties": properties, "required": required}
    function = {"name": name or fn.__name__, "description": description, "parameters": parameters}
    return {"type": "function", "function": function}


def load_tools(refs: Sequence[str]) -> list[Tool]:
    """Tools from built-in names (``calculator``) or ``path/to/file.py:fn`` / ``pkg.mod:fn``; ConfigError naming
    a bad one."""
    from rltrain.grading.resolve import _absolute_ref, load_function

    tools = []
    for index, ref in enumerate(refs):
        key = f"env.params.tools[{index}]"
        fn = BUILTIN_TOOLS.get(ref) or load_function(_absolute_ref(ref), key)
        name = ref if ref in BUILTIN_TOOLS else ref.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        tools.append(Tool(name, fn, tool_schema(fn, name)))
    if not tools:
        raise ConfigError("env.params.tools=[]: name at least one tool")
    return tools


def call_tool(tools: Sequence[Tool], call: ToolCall) -> tuple[str, bool]:
    """(result text, failed): the tool's return as text, or the error a model can read and react to."""
    by_name = {tool.name: tool for tool in tools}
    if call.name not in by_name:
        return f"error: no tool named {call.name!r}; tools: {sorted(by_name)}", True
    try:
        return str(by_name[call.name].fn(**call.arguments)), False
    except Exception as error:  # noqa: BLE001 - a failing tool is an observation, not an environment error
        return f"error: {type(error).__name__}: {error}", True


class PlainTagFormat:
    """``<calc>expression</calc>`` -> the first tool with its first parameter; results as ``<result>...</result>``."""

    name = "plain"

    def __init__(self, tools: Sequence[Tool], open_tag: str = "<calc>", close_tag: str = "</calc>"):
        self.tool = tools[0]
        self.parameter = next(iter(self.tool.schema["function"]["parameters"]["properties"]), None)
        self.open_tag, self.close_tag = open_tag, close_tag

    def parse(self, text: str) -> ToolCall | None:
        start = text.rfind(self.open_tag)
        if start < 0:
            return None
        inner = text[start + len(self.open_tag) :]
        inner = inner.split(self.close_tag, 1)[0]
        return ToolCall(self.tool.name, {self.parameter: inner.strip()} if self.parameter else {})

    def render_result(self, result: str, action_text: str = "") -> str:
        return on_own_line(f"<result>{result}</result>", action_text)


class HermesFormat:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; results as Qwen2.5's chat template renders a
    tool message after an assistant turn that ended with ``<|im_end|>``."""

    name = "hermes"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def __init__(self, tools: Sequence[Tool]):
        self.tools = tools

    def parse(self, text: str) -> ToolCall | None:
        calls = self._CALL.findall(text)
        if not calls:
            return None
        try:
            payload = json.loads(calls[-1])
        except json.JSONDecodeError as error:
            return ToolCall("", {"error": f"the tool call is not JSON: {error}"})
        if not isinstance(payload, dict) or not isinstance(payload.get("arguments", {}), dict):
            return ToolCall("", {"error": 'a tool call is {"name": ..., "arguments": {...}}'})
        return ToolCall(str(payload.get("name", "")), payload.get("arguments", {}))

    def render_result(self, result: str, action_text: str = "") -> str:
        return f"\n<|im_start|>user\n<tool_response>\n{result}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


FORMATS = {"plain": PlainTagFormat, "hermes": HermesFormat}


def make_format(name: str, tools: Sequence[Tool]) -> PlainTagFormat | HermesFormat:
    if name not in FORMATS:
        raise ConfigError(f"env.params.format={name!r}: one of {sorted(FORMATS)}")
    return FORMATS[name](tools)
