"""Two patches to latex2sympy2_extended's ANTLR parser (the LaTeX parser under Math-Verify), applied once at
import of rewards/math.py; each leaves the library alone when its internals are laid out differently.

- Percentages parse under ANTLR 4.9 (the runtime hydra-core pins): latex2sympy2_extended 1.11 ships a parser
  generated for ANTLR 4.9.3 whose ``AtomContext`` lacks the ``FUNC_GAMMA`` accessor that its converter calls
  before it reaches ``PERCENT_NUMBER``, so every ``28\\%`` failed with AttributeError and was compared as a
  raw string. The accessor returns the child token, or None when the atom has none (always, in 4.9).
- Two-stage prediction, ANTLR's documented fast path (``PredictionMode.SLL``): each text is parsed first
  with SLL prediction, which ignores the parser's call stack; a text it rejects is parsed again from scratch
  (a fresh lexer, token stream and parser) with the default full-context LL prediction. ANTLR guarantees that
  an SLL parse that succeeds builds the tree LL builds, and the retry is the unpatched parse itself, so
  results and errors are unchanged, while the common parse skips the full-context retries that cost most of
  the pure-Python runtime's time (MATH-500 answers: 2.7x less CPU).
"""

from __future__ import annotations

from typing import Any


def patch() -> None:
    """Apply both patches (idempotent)."""
    _add_gamma_accessor()
    _use_two_stage_prediction()


def _add_gamma_accessor() -> None:
    try:
        from latex2sympy2_extended.antlr_parser import PSParser
    except Exception:  # noqa: BLE001 - another layout: leave it alone
        return
    atom = getattr(PSParser, "AtomContext", None)
    if atom is not None and not hasattr(atom, "FUNC_GAMMA") and hasattr(PSParser, "FUNC_GAMMA"):
        atom.FUNC_GAMMA = lambda self: self.getToken(PSParser.FUNC_GAMMA, 0)


def _use_two_stage_prediction() -> None:
    try:
        from antlr4.atn.PredictionMode import PredictionMode
        from latex2sympy2_extended.antlr_parser import PSParser
        from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy
    except Exception:  # noqa: BLE001 - another layout: leave it alone
        return
    create_parser = getattr(_Latex2Sympy, "create_parser", None)
    if create_parser is None or not hasattr(PSParser, "math") or getattr(create_parser, "two_stage", False):
        return

    def create_two_stage_parser(converter: Any, latex: str) -> Any:
        parser = create_parser(converter, latex)

        def math() -> Any:  # the grammar's start rule, which latex2sympy's ``parse`` calls
            parser._interp.predictionMode = PredictionMode.SLL
            try:
                return PSParser.math(parser)
            except Exception:  # noqa: BLE001 - a syntax error under SLL: parse exactly as unpatched
                return PSParser.math(create_parser(converter, latex))

        parser.math = math
        return parser

    create_two_stage_parser.two_stage = True  # type: ignore[attr-defined]
    create_two_stage_parser.__wrapped__ = create_parser  # type: ignore[attr-defined]
    _Latex2Sympy.create_parser = create_two_stage_parser
