"""``reasoning_gym``: score with a reasoning-gym task's own verifier (optional dependency).

Needs ``pip install reasoning-gym`` (extra ``rltrain[reasoning-gym]``). Rows are reasoning-gym entries:
ground truth under ``answer`` and the entry's ``metadata`` column (a dict or its JSON string), whose
``source_dataset`` names the task (``task=`` overrides it). The answer is the content of the last
``<answer>…</answer>`` (``answer_tag=False``: the whole stripped completion). Many verifiers give a wrong
but present answer a small "format credit" (0.01-0.05); it is kept only with ``format_credit=True``. Larger
partial credit (e.g. ``word_sorting``'s share of words in place) is kept, with ``acc`` 0.

Time: some verifiers evaluate the answer (countdown's with SymPy, where ``9**9**9`` never finishes), so an
answer holding a power tower or a huge power/factorial scores 0 without the verifier, and in the main thread
the verifier is cut off after ``time_limit_s`` (rewards/_timebound.py).
"""

from __future__ import annotations

import json
from typing import Any

try:
    import reasoning_gym
except ImportError as error:  # raised at start-up by rltrain.grading, before any model loads
    raise ImportError(
        "the reasoning_gym grader needs the reasoning-gym package: pip install 'rltrain[reasoning-gym]'"
    ) from error

from rewards._timebound import TimeUp, power_refusal_reason, time_limit

COLUMNS = ("metadata", "question")  # dataset columns rltrain.grading passes to this grader
FORMAT_CREDIT_MAX = 0.05  # verifier scores at or below this for a wrong answer are format credit


def answer_in_tags(completion: str, tag: str = "answer") -> str | None:
    """Stripped content of the last ``<tag>…</tag>``, or None (rfind: linear however many tags there are)."""
    end = completion.rfind(f"</{tag}>")
    start = completion.rfind(f"<{tag}>", 0, end) if end >= 0 else -1
    return completion[start + len(tag) + 2 : end].strip() if start >= 0 else None


def score(
    completion: str,
    ground_truth: Any,
    *,
    task: str | None = None,
    answer_tag: bool = True,
    format_credit: bool = False,
    time_limit_s: float | None = 5.0,
    metadata: Any = None,
    question: str = "",
    **fields: Any,
) -> dict[str, float]:
    """``{"score": verifier score in [0, 1], "acc": 1.0 iff the verifier gave full marks}``."""
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    metadata = dict(metadata or {})
    name = task or metadata.get("source_dataset")
    if not name:
        raise ValueError("reasoning_gym needs the row's metadata.source_dataset or the 'task' parameter")
    text = completion if isinstance(completion, str) else str(completion)
    answer = answer_in_tags(text) if answer_tag else text.strip()
    entry = {"question": question, "answer": ground_truth, "metadata": metadata}
    if answer is not None and power_refusal_reason(answer):
        return {"score": 0.0, "acc": 0.0}
    try:
        with time_limit(time_limit_s):
            value = min(1.0, max(0.0, float(reasoning_gym.get_score_answer_fn(name)(answer, entry))))
    except TimeUp:
        return {"score": 0.0, "acc": 0.0}
    if not format_credit and value <= FORMAT_CREDIT_MAX:
        value = 0.0
    return {"score": value, "acc": float(value >= 1.0)}


def validate_params(params: dict[str, Any]) -> None:
    """Checked at start-up: a named task must exist."""
    if params.get("task") is not None:
        reasoning_gym.get_score_answer_fn(params["task"])
