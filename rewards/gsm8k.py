"""``gsm8k``: numeric final answers (GSM8K, the quickstart's multi-digit arithmetic), exact arithmetic.

Prediction: the number after the last ``####``, else in the last ``\\boxed{}``, else after "final answer is" /
"Answer:", else the last number in the completion ("82", "Answer: 82", "so she pays $1,234.50."). Gold: an
int/float, a number string, or a whole GSM8K solution (the number after its last ``####``). Numbers are
compared as exact fractions (``1,234`` == ``1234.0``); ``rel_tol`` > 0 allows a relative tolerance.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from rewards.extract import numeric_answer, tail, to_fraction

MAX_COMPLETION_CHARS = 20_000  # only the tail is searched: answers come last, and scans stay bounded


def gold_value(ground_truth: Any) -> Fraction | None:
    """Exact value of the gold answer, or None when it holds no number."""
    if isinstance(ground_truth, bool):
        return None
    if isinstance(ground_truth, int):
        return Fraction(ground_truth)
    if isinstance(ground_truth, float):
        finite = ground_truth == ground_truth and abs(ground_truth) != float("inf")
        return Fraction(repr(ground_truth)) if finite else None  # repr: 0.1 is 1/10, not its binary value
    answer = numeric_answer(str(ground_truth))
    return None if answer is None else to_fraction(answer)


def score(
    completion: str,
    ground_truth: Any,
    *,
    rel_tol: float = 0.0,
    correct_score: float = 1.0,
    wrong_score: float = 0.0,
    format_score: float | None = None,
    **fields: Any,
) -> dict[str, float]:
    """``{"score", "acc", "extracted", "gold_unparsed"}``: ``acc`` is 1.0 iff the extracted number equals the gold.

    ``format_score`` (default: ``wrong_score``) is the score of a wrong answer that was at least a number;
    ``extracted`` is 1.0 when the completion held a number at all.
    """
    gold = gold_value(ground_truth)
    if gold is None:
        return {"score": wrong_score, "acc": 0.0, "extracted": 0.0, "gold_unparsed": 1.0}
    text = completion if isinstance(completion, str) else str(completion)
    answer = numeric_answer(tail(text, MAX_COMPLETION_CHARS))
    predicted = None if answer is None else to_fraction(answer)
    if predicted is None:
        return {"score": wrong_score, "acc": 0.0, "extracted": 0.0, "gold_unparsed": 0.0}
    correct = predicted == gold or (rel_tol > 0 and abs(predicted - gold) <= rel_tol * abs(gold))
    if correct:
        value = correct_score
    else:
        value = wrong_score if format_score is None else format_score
    return {"score": value, "acc": float(correct), "extracted": 1.0, "gold_unparsed": 0.0}
