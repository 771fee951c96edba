"""``countdown``: combine the given numbers with + - * / and parentheses to reach the target.

Ground truth: ``{"target": int, "numbers": [int, ...]}`` (or that object as a JSON string). The expression is
the content of the last ``<answer>...</answer>``, else the last non-empty line; if it holds "=", its left side.
It is parsed with ``ast`` (never ``eval``): only integer literals, binary + - * /, unary minus and
parentheses are accepted. Score ``correct_score`` iff it uses each given number exactly once and evaluates,
in exact fraction arithmetic, to the target.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from collections import Counter
from fractions import Fraction
from typing import Any

MAX_EXPRESSION_CHARS = 1000  # longer "expressions" are not answers, and this bounds parsing time
_OPERATORS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__}
_ALLOWED_RE = re.compile(r"[0-9+\-*/()\s]*")  # anything else cannot be a valid answer
_SYMBOLS = {"×": "*", "\\times": "*", "·": "*", "\\cdot": "*", "÷": "/", "\\div": "/", "−": "-"}


class _Invalid(Exception):
    """The expression uses something other than integers, + - * /, unary minus and parentheses."""


def expression_from(completion: str) -> str:
    """The candidate expression: last ``<answer>`` content, else the last non-empty line; left of any "="."""
    end = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, end) if end >= 0 else -1
    if start >= 0:  # rfind, not a regex: many unclosed tags must not make this quadratic
        text = completion[start + len("<answer>") : end]
    else:
        lines = [line for line in completion.splitlines() if line.strip()]
        text = lines[-1] if lines else ""
    text = text.split("=", 1)[0]
    for symbol, operator in _SYMBOLS.items():
        text = text.replace(symbol, operator)
    return text.strip().strip("$").strip()


def _evaluate(node: ast.AST, literals: list[int]) -> Fraction:
    """Exact value of an allowed expression tree; appends every integer literal to ``literals``."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, literals)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, literals)
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, literals), _evaluate(node.right, literals)
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise _Invalid("division by zero")
            return left / right
        operator = _OPERATORS.get(type(node.op))
        if operator is not None:
            return operator(left, right)
    raise _Invalid(type(node).__name__)


def parse_ground_truth(ground_truth: Any) -> tuple[Fraction, list[int]]:
    """(target, numbers) from the dict or its JSON string; raises ValueError naming what is wrong."""
    if isinstance(ground_truth, str):
        ground_truth = json.loads(ground_truth)
    if not isinstance(ground_truth, dict) or "target" not in ground_truth or "numbers" not in ground_truth:
        raise ValueError(
            f"countdown ground truth must be {{'target': int, 'numbers': [int, ...]}}, got {ground_truth!r}"
        )
    return Fraction(ground_truth["target"]), [int(number) for number in ground_truth["numbers"]]


def check(expression: str, target: Fraction, numbers: list[int]) -> tuple[bool, bool]:
    """(valid, correct): valid = an allowed expression using exactly the given numbers; correct = it hits target."""
    if not expression or len(expression) > MAX_EXPRESSION_CHARS or not _ALLOWED_RE.fullmatch(expression):
        return False, False
    try:
        with warnings.catch_warnings():  # "1and 2" would print "SyntaxWarning: invalid decimal literal"
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            tree = ast.parse(expression, mode="eval")
        literals: list[int] = []
        value = _evaluate(tree, literals)
    except (_Invalid, SyntaxError, ValueError, TypeError, RecursionError, OverflowError):
        return False, False
    if Counter(literals) != Counter(numbers):
        return False, False
    return True, value == target


def score(
    completion: str,
    ground_truth: Any,
    *,
    correct_score: float = 1.0,
    wrong_score: float = 0.0,
    format_score: float | None = None,
    **fields: Any,
) -> dict[str, float]:
    """``{"score", "acc", "valid"}``; ``format_score`` (default ``wrong_score``) scores a valid but wrong expression."""
    target, numbers = parse_ground_truth(ground_truth)
    text = completion if isinstance(completion, str) else str(completion)
    valid, correct = check(expression_from(text), target, numbers)
    if correct:
        value = correct_score
    elif valid and format_score is not None:
        value = format_score
    else:
        value = wrong_score
    return {"score": value, "acc": float(correct), "valid": float(valid)}
