"""The value of a constant LaTeX number (``\\frac{14}{3}``, ``3\\sqrt{13}``, ``-\\frac{\\pi}{2}``, ``10^{-2}``)
without the LaTeX parser: a small recursive-descent reader over a closed grammar.

Grammar: sums and differences of products (implicit, ``\\cdot``, ``\\times``, ``*``, ``/``) of powers (``^{n}``,
``^n``) of atoms: decimal numbers, ``\\pi``, ``\\frac{a}{b}`` (also ``\\dfrac``/``\\tfrac``), ``\\sqrt{a}``,
parentheses (``\\left``/``\\right`` allowed), braces. Anything else (letters, commas, sets, ``\\text``, ``%``,
degrees) makes ``value`` return None, so a caller only ever learns the value of a plain constant.
"""

from __future__ import annotations

import math
import re

_TOKEN_RE = re.compile(r"\s*(\d+\.?\d*|\.\d+|\\[a-zA-Z]+|[-+*/^(){}])")
_SPACING_RE = re.compile(r"\\[,!; ]|\\left|\\right")
_MAX_CHARS = 200
_IMPLICIT_FACTORS = ("\\sqrt", "\\pi", "(")


class _NotANumber(Exception):
    pass


def _tokens(text: str) -> list[str]:
    text = _SPACING_RE.sub(" ", text).strip()
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN_RE.match(text, position)
        if match is None:
            raise _NotANumber
        tokens.append(match.group(1))
        position = match.end()
        while position < len(text) and text[position].isspace():
            position += 1
    return tokens


class _Reader:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.index = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise _NotANumber
        self.index += 1
        return token

    def sum(self) -> float:
        sign = -1.0 if self.peek() == "-" else 1.0
        if self.peek() in ("-", "+"):
            self.take()
        total = sign * self.product()
        while self.peek() in ("+", "-"):
            total += (1.0 if self.take() == "+" else -1.0) * self.product()
        return total

    def product(self) -> float:
        result = self.power()
        while True:
            token = self.peek()
            if token in ("*", "\\cdot", "\\times"):
                self.take()
                result *= self.power()
            elif token == "/":
                self.take()
                result /= self.power()
            elif token in _IMPLICIT_FACTORS:
                result *= self.power()  # implicit: 3\sqrt{2}, 2\pi, 2(3+1)
            elif token in ("+", "-", ")", "}", None):
                return result
            else:  # "1 000" (a thousands space), "2\frac12" (a mixed number): not products, not read here
                raise _NotANumber

    def power(self) -> float:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        exponent = self.group() if self.peek() == "{" else self.atom()
        if abs(exponent) > 1000:
            raise _NotANumber
        return base**exponent

    def group(self) -> float:
        self.take("{")
        value = self.sum()
        self.take("}")
        return value

    def atom(self) -> float:
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            return float(token)
        if token == "\\pi":
            return math.pi
        if token in ("\\frac", "\\dfrac", "\\tfrac"):
            return self.group() / self.group()
        if token == "\\sqrt":
            return math.sqrt(self.group())
        if token == "(":
            value = self.sum()
            self.take(")")
            return value
        if token == "{":
            self.index -= 1
            return self.group()
        raise _NotANumber


def value(text: str) -> float | None:
    """The real value of a constant LaTeX number, or None when ``text`` is anything else or undefined."""
    if len(text) > _MAX_CHARS:
        return None
    try:
        reader = _Reader(_tokens(text))
        result = reader.sum()
        if reader.peek() is not None:
            return None
    except (_NotANumber, ZeroDivisionError, OverflowError, ValueError, TypeError):
        return None
    return result if isinstance(result, float) and math.isfinite(result) else None
