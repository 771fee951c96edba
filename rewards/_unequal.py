"""Answers that Math-Verify would reject, found by evaluating them instead of running SymPy's ``simplify``.

Math-Verify's ``verify`` accepts a (gold, prediction) pair of SymPy expressions when they print alike, when
they are numerically equal, or when ``simplify(gold - prediction)`` is zero; a rejection costs the full
``simplify`` (~20-250 ms for an expression with symbols, e.g. an equation picked out of an unfinished
solution). Two values that differ clearly at one point cannot pass any of those tests, so the pair is
rejected here after evaluating both sides: constants as they are, expressions with symbols at one fixed point
(every symbol a distinct positive non-integer). Likewise a number against an interval of positive length
(Math-Verify compares them as sets, ~10-30 ms for the symmetric difference). Only what is sure to reach those
tests is judged here: Math-Verify's own unwrapping of equations is applied first, and anything it compares
another way (symbols by name, finite sets, tuples, matrices, relations, unevaluated sums, integrals or
functions) is left to it.
"""

from __future__ import annotations

import cmath
import itertools
import math
from typing import Any

import sympy
from math_verify.grader import is_assignment_relation, is_equation, take_last_relation

# The node types whose value at a point is what ``simplify`` preserves: arithmetic and elementary functions.
_ELEMENTARY = (
    sympy.Add,
    sympy.Mul,
    sympy.Pow,
    sympy.Symbol,
    sympy.Number,
    sympy.NumberSymbol,
    sympy.core.numbers.ImaginaryUnit,
    sympy.UnevaluatedExpr,
    sympy.exp,
    sympy.log,
    sympy.Abs,
    sympy.functions.elementary.trigonometric.TrigonometricFunction,
    sympy.functions.elementary.trigonometric.InverseTrigonometricFunction,
)
_DIGITS = 30


def close(gold: complex, predicted: complex, float_rounding: int) -> bool:
    """Whether two values may be equal to Math-Verify: within ``10**-float_rounding`` or a relative 1e-6 (so
    0.333333 against 1/3 is close), or a factor 100 apart (percentages)."""
    tolerance = max(10.0**-float_rounding, 1e-6 * max(abs(gold), abs(predicted)))
    return abs(gold - predicted) <= tolerance or abs(gold * 100 - predicted) <= tolerance


def all_far(gold_values: list | None, predicted_values: list | None, float_rounding: int) -> bool:
    """True when both lists hold values and no (gold, predicted) pair is ``close``."""
    if not gold_values or not predicted_values:
        return False
    return not any(
        close(gold, predicted, float_rounding) for gold, predicted in itertools.product(gold_values, predicted_values)
    )


def clearly_unequal(golds: list, prediction: list, float_rounding: int, strict: bool) -> bool:
    """True when Math-Verify's ``verify(golds, prediction)`` is sure to be False: every (gold, predicted) pair
    of SymPy objects has clearly different values, and no pair of source strings is equal (Math-Verify
    accepts equal strings). False means "not known": Math-Verify decides. ``strict=False`` renames variables
    before comparing, so only constants are judged then."""
    if not golds or not prediction:
        return False
    for gold, predicted in itertools.product(golds, prediction):
        if isinstance(gold, str) or isinstance(predicted, str):
            if isinstance(gold, str) and isinstance(predicted, str) and gold.strip() == predicted.strip():
                return False
            continue
        if not _pair_unequal(gold, predicted, float_rounding, strict):
            return False
    return True


def _pair_unequal(gold: Any, predicted: Any, float_rounding: int, strict: bool) -> bool:
    """Math-Verify's unwrapping (an equation answers a non-equation gold by its last right-hand side; an
    assignment gold ``x = 5`` is its right-hand side against a non-equation), then: a number against an
    interval of positive length (Math-Verify compares them as sets), or values at the point."""
    if is_equation(predicted) and not is_equation(gold):
        predicted = take_last_relation(predicted).rhs
    elif is_assignment_relation(gold) and not is_equation(predicted):
        gold = take_last_relation(gold).rhs
    if (_is_constant(gold) and _has_length(predicted)) or (_is_constant(predicted) and _has_length(gold)):
        return True  # one point is not a set with a whole interval in it
    if not (_by_value(gold) and _by_value(predicted)):
        return False
    if not strict and (gold.free_symbols or predicted.free_symbols):
        return False
    point = _point(gold.free_symbols | predicted.free_symbols)
    gold_value, predicted_value = _value(gold, point), _value(predicted, point)
    if gold_value is None or predicted_value is None:
        return False
    return not close(gold_value, predicted_value, float_rounding)


def _is_constant(expr: Any) -> bool:
    return isinstance(expr, sympy.Expr) and not isinstance(expr, sympy.MatrixBase | sympy.MatrixExpr) and expr.is_number


def _has_length(item: Any) -> bool:
    """An interval with constant endpoints and positive length, or a union holding one."""
    if isinstance(item, sympy.Union):
        return any(_has_length(part) for part in item.args)
    if not isinstance(item, sympy.Interval) or not (item.start.is_number and item.end.is_number):
        return False
    return bool((item.end - item.start).is_extended_positive)


def _by_value(expr: Any) -> bool:
    """Whether Math-Verify compares ``expr`` by value: a constant number, or an expression with symbols that
    is no lone symbol (compared by name) and is built from ``_ELEMENTARY`` nodes over symbols that may take a
    positive non-integer value."""
    if _is_constant(expr):
        return True
    if not isinstance(expr, sympy.Expr) or isinstance(expr, sympy.MatrixBase | sympy.MatrixExpr | sympy.Symbol):
        return False
    return all(isinstance(node, _ELEMENTARY) for node in sympy.preorder_traversal(expr)) and all(
        symbol.is_integer is not True and symbol.is_positive is not False for symbol in expr.free_symbols
    )


def _point(symbols: set) -> dict:
    """Distinct positive non-integer values, one per symbol, in name order (the same for both sides)."""
    ordered = sorted(symbols, key=lambda symbol: symbol.name)
    return {symbol: sympy.Float(math.e / (index + 2), _DIGITS) for index, symbol in enumerate(ordered)}


def _value(expr: Any, point: dict) -> complex | None:
    """``expr``'s finite value at ``point``, or None (undefined there, or not a number)."""
    try:
        value = complex(expr.evalf(_DIGITS, subs=point) if point else expr.evalf(_DIGITS))
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, AttributeError):
        return None
    return value if cmath.isfinite(value) else None
