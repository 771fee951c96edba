"""The patches to latex2sympy2_extended's parser (rewards/_latex_parser.py): two-stage prediction parses
every text exactly as the unpatched parser does, including texts that need the LL retry and texts that
fail (a lexer error must not leave the retry a half-read token stream)."""

import pytest
import sympy
from antlr4.atn.PredictionMode import PredictionMode
from latex2sympy2_extended.antlr_parser import PSParser
from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy, latex2sympy

import rewards.math  # noqa: F401 - applies the patches

TEXTS = [
    r"\frac{1}{2}",
    "x^3+3x-6",  # SLL rejects it: the LL retry parses it
    "5r^5",
    r"\left( 3, \frac{\pi}{2} \right)",
    r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]",
    r"28\%",
    r"\{1,2\}",
    r"x \in [-2,7]",
    "1,2",
    r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}",
    r"(a_1, a_2, \dots, a_n)",  # a lexer error
    r"9 \& 2",
    r"\frac{",
]


def _outcome(text: str) -> str:
    try:
        return sympy.srepr(latex2sympy(text))
    except Exception as error:  # noqa: BLE001 - the error is part of the outcome compared
        return f"{type(error).__name__}: {error}"


def test_sll_alone_rejects_a_text_the_default_parser_accepts():
    parser = _Latex2Sympy.create_parser.__wrapped__(_Latex2Sympy(), "x^3+3x-6")
    parser._interp.predictionMode = PredictionMode.SLL
    with pytest.raises(Exception, match="expected"):
        PSParser.math(parser)
    assert str(latex2sympy("x^3+3x-6")) == "x**3 + 3*x - 6"


def test_two_stage_parses_exactly_as_the_unpatched_parser(monkeypatch):
    patched = [_outcome(text) for text in TEXTS]
    monkeypatch.setattr(_Latex2Sympy, "create_parser", _Latex2Sympy.create_parser.__wrapped__)
    assert patched == [_outcome(text) for text in TEXTS]


def test_percentages_parse():
    assert latex2sympy(r"28\%").equals(sympy.Rational(28, 100))
