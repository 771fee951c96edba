"""The early rejection before Math-Verify's ``verify`` (rewards/_unequal.py): it may only ever say "unequal"
where ``verify`` says False, and it must say so for the costly common case (an expression with symbols
against a different answer), so that ``simplify`` is skipped."""

import pytest
import sympy
from math_verify import verify

from rewards import math as math_grader
from rewards._unequal import clearly_unequal

EXTRACT = ("latex", "expr")
SUM_EQUATION = r"\sum_{k=1}^{n} \frac{1}{k(k+1)} = 1 - \frac{1}{n+1}"

# (gold, answer): clearly different values, so rejected without Math-Verify
REJECTED = [
    ("2", SUM_EQUATION),  # an equation answers by its right-hand side, which has a symbol
    ("x^2+1", "x^2+2"),
    (r"\frac{11+9a}{20}", "5r^5"),
    ("0.15", "x+1"),
    ("6", "x = 5"),
    ("y = 2x+3", "2x+4"),  # an assignment gold is its right-hand side
    (r"\frac{14}{3}", r"3\sqrt{13}"),
    ("2", "[1,3]"),  # a number is no interval of positive length
    ("28", r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]"),
    ("2", r"(0,9) \cup (9,36)"),
    (r"(2,\infty)", "5"),
    ("5", r"x \in [-2,7]"),
]
# (gold, answer): equal, compared another way than by value, or too close to call: Math-Verify decides
DEFERRED = [
    ("5", "x = 5"),
    ("x+1", "1+x"),
    (r"\frac{x^2-1}{x-1}", "x+1"),
    ("e", r"\text{e}"),  # a lone symbol is compared by name
    (r"\text{east}", "east"),
    ("(1,2)", "1,2"),  # an open interval against two numbers: Math-Verify compares the endpoints
    ("[a,b]", "3"),  # an interval with symbolic endpoints
    (r"\{1,2\}", "1"),  # finite sets
    ("x", "x+10^{-20}"),  # within the tolerance
    ("y = 2x + 3", "2x+3"),
    (r"10\%", "0.1"),
    (r"\sin^2 x + \cos^2 x", "1"),
    (r"\sqrt{x^2}", "x"),  # equal at the (positive) point, unequal to Math-Verify: deferring is safe
    ("0.333333", r"\frac{1}{3}"),
    (r"\frac{1}{10}", "10"),  # a factor 100 (a percentage written without its sign)
]


def _parsed(gold: str, answer: str) -> tuple[list, list]:
    return list(math_grader._parse_gold(gold, EXTRACT)), math_grader._parse(rf"\boxed{{{answer}}}", EXTRACT)


@pytest.mark.parametrize("gold, answer", REJECTED)
def test_clearly_different_values_are_rejected_as_math_verify_rejects_them(gold, answer):
    golds, prediction = _parsed(gold, answer)
    assert clearly_unequal(golds, prediction, 6, strict=True)
    assert not verify(golds, prediction, timeout_seconds=None)


@pytest.mark.parametrize("gold, answer", DEFERRED)
def test_equal_close_or_non_numeric_answers_are_left_to_math_verify(gold, answer):
    golds, prediction = _parsed(gold, answer)
    assert not clearly_unequal(golds, prediction, 6, strict=True)


@pytest.mark.parametrize("gold, answer", REJECTED[:4])
def test_without_strict_only_constants_are_judged(gold, answer):
    """``strict=False`` renames the prediction's variables to the gold's before comparing."""
    golds, prediction = _parsed(gold, answer)
    assert not clearly_unequal(golds, prediction, 6, strict=False)
    assert not clearly_unequal(*_parsed("x+1", "y+1"), 6, strict=False)
    assert verify(*_parsed("x+1", "y+1"), strict=False, timeout_seconds=None)


def test_unevaluated_calculus_is_left_to_math_verify():
    x = sympy.Symbol("x", real=True)
    derivative = sympy.Derivative(x, x, evaluate=False)  # Math-Verify evaluates it (doit) to 1
    assert not clearly_unequal([sympy.Integer(1)], [derivative], 6, strict=True)
    assert verify([sympy.Integer(1)], [derivative], timeout_seconds=None)


def test_equal_source_strings_are_never_rejected():
    """Math-Verify accepts two equal source strings whatever their SymPy forms."""
    assert not clearly_unequal([sympy.Integer(1), "a"], [sympy.Integer(2), "a"], 6, strict=True)
    assert clearly_unequal([sympy.Integer(1), "a"], [sympy.Integer(2), "b"], 6, strict=True)


def test_an_unfinished_solution_scores_wrong_against_every_kind_of_gold():
    """No box: Math-Verify picks the last equation out of the reasoning; the verdict is unchanged by the
    early rejection (a number gold) and by deferring (an equation or interval gold)."""
    completion = f"We find ${SUM_EQUATION}$, which telescopes. I could not finish in time."
    for gold in ("2", r"\frac{3\sqrt{3}}{4}", "y = 2x + 3", r"(2,\infty)", "1"):
        assert math_grader.score(completion, gold, time_limit_s=None)["acc"] == 0.0
