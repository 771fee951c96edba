"""The final answer of a completion and when two answers are the same, as the set's grader reads them.

maj@k votes over these answers (rltrain.eval.metrics). ``gsm8k`` reads numbers and compares exact values;
``math`` reads the last box / answer phrase and compares with ``rewards.math.equivalent`` (Math-Verify);
any other grader (countdown, your own) votes on the answer text itself.
"""

from __future__ import annotations

from collections.abc import Callable

from rewards.extract import after_answer_phrase, after_last, last_boxed, numeric_answer, tail, to_fraction

_MAX_SCAN_CHARS = 20_000  # answers come last; scans stay bounded on huge completions
_MAX_ANSWER_CHARS = 200


def extract_answer(completion: str, grader: str) -> str | None:
    """The final answer in ``completion`` for ``grader`` (None when there is none).

    gsm8k: its numeric answer. Otherwise the last ``\\boxed{}``, else after the last ``####``, else after an
    answer phrase ("final answer is", "Answer:"), else the last non-empty line (countdown's bare expression).
    """
    text = tail(completion, _MAX_SCAN_CHARS)
    if grader == "gsm8k":
        return numeric_answer(text)
    answer = last_boxed(text) or after_last(text, "####") or after_answer_phrase(text)
    if answer is None:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        answer = lines[-1] if lines else None
    return None if answer is None else answer[-_MAX_ANSWER_CHARS:]


def _same_number(a: str, b: str) -> bool:
    x, y = to_fraction(a), to_fraction(b)
    return x is not None and x == y if (x is not None or y is not None) else a == b


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def equivalence(grader: str) -> Callable[[str, str], bool]:
    """``same(a, b)`` of the grader's own answer equivalence (text equality for graders without one)."""
    if grader == "gsm8k":
        return _same_number
    if grader == "math":
        from rewards.math import equivalent

        return equivalent
    return _same_text
