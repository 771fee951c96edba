"""``math``: final-answer equivalence for competition maths, via Math-Verify (SymPy).

Prediction: the last ``\\boxed{}``/``\\fbox{}`` (nested braces, unterminated boxes) is parsed first; when
there is none, Math-Verify's own extraction runs on the tail of the completion ("final answer is $x$",
"Answer: x", any LaTeX environment, the last plain number); then ``####`` or an answer phrase. Gold: one
plain number (``7,425,000``, ``1 000``, ``2.5``, ``25%``) is read as a number; any other plain string (``1,-2``
is a set, ``\\$18.90`` money) as the LaTeX inside ``\\boxed{}``; a string that already carries LaTeX
delimiters (``$``, ``\\(``, ``\\[``, ``\\boxed``) is extracted like a completion; a GSM8K solution by its
``####`` line.

Before Math-Verify, both sides are normalised where the public graders agree and Math-Verify does not
(docs/evaluation.md, "Grader: answer equivalence"): a number followed by unit words (``5 dollars``,
``\\text{12 square units}``) is the number, and ``1e3`` is ``1\\times10^{3}``. Pairs Math-Verify could not
accept (clearly different values) are rejected before its SymPy work (rewards/_unequal.py).

Time: Math-Verify's signal-based timeouts are switched off (they fail outside the main thread). Instead
``score`` bounds its own time wherever it is called (rewards/_timebound.py): pathological answers and golds
(power towers, numbers of thousands of digits, deep nesting, huge answers) are refused before parsing, and
in the main thread the SymPy work is cut off after ``time_limit_s``; both score ``wrong_score``. Inside
``rltrain.grading.RewardGrader`` the pool's deadline kills a grader process that still overruns.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rewards import _latex_number as latex_number
from rewards import _latex_parser
from rewards._timebound import TimeUp, refusal_reason, time_limit
from rewards._unequal import all_far, clearly_unequal
from rewards.extract import after_answer_phrase, after_last, last_boxed, to_fraction


class _DisabledTimeoutNotice(logging.Filter):
    """Drop Math-Verify's "Timeout is disabled" warning: disabling it is deliberate here (see above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _logger_name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger_name).addFilter(_DisabledTimeoutNotice())


_latex_parser.patch()  # percentages under ANTLR 4.9; two-stage (SLL, then LL) prediction

MAX_COMPLETION_CHARS = 4000  # tail handed to Math-Verify's regex extraction when there is no box
_LATEX_MARKERS = ("\\(", "\\[", "\\boxed", "\\fbox")
_MATH_DOLLAR_RE = re.compile(r"(?<!\\)\$")  # a "$" delimiter; "\\$" is a currency sign
_PLAIN_NUMBER_GOLD_RE = re.compile(r"[\s\d.,%+\-]+")
_FINAL_ANSWER_RE = re.compile(r"final answer is", re.IGNORECASE)
_LATEX_SPACING_RE = re.compile(r"\\[,!; ]|\s")
DEFAULT_TIME_LIMIT_S = 3.0
_MAX_CACHED_PARSE_CHARS = 300
# Verdicts on answers read from the whole window, keyed by what was extracted (its SymPy form and source
# text): a group's samples, and a model's habits, repeat the same final expression.
_WINDOW_VERDICTS: dict[tuple, bool] = {}
_MAX_WINDOW_VERDICTS = 8192
_FRAC_VARIANT_RE = re.compile(r"\\[dt]frac(?![a-zA-Z])")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_VARIABLE_PREFIX_RE = re.compile(r"^[a-zA-Z]=(?!.*=)")  # "x=" before an answer that has no other "="
# "5 dollars", "\\text{12 square units}", "7\\text{ cm}^2": a number and unit words (2+ letters) only
_NUMBER_WITH_UNITS_RE = re.compile(
    r"(?:\\(?:text|textbf|mathrm|mbox)\{)?\s*(?P<number>-?(?:\\\$)?\s*\d[\d,]*(?:\.\d+)?)\s*\}?\s*"
    r"(?:\\(?:text|textbf|mathrm|mbox)\{)?\s*(?P<units>[A-Za-z][A-Za-z .]*[A-Za-z.])\s*\}?"
    r"\s*(?:\^\{?[23]\}?)?\s*"
)
_NOT_UNITS = frozenset({"pi", "sqrt", "log", "sin", "cos", "tan", "sec", "csc", "cot", "mod", "and", "or"})
_SHORT_UNITS = frozenset({"cm", "mm", "km", "ft", "in", "kg", "mg", "mi", "hr", "yd", "oz", "lb", "ml"})
_SCIENTIFIC_RE = re.compile(r"(-?\d+(?:\.\d+)?)[eE]([+-]?\d{1,3})")  # "1e3", "2.5E-4"; 3-digit exponents at most


@functools.lru_cache(maxsize=16)
def _extraction_configs(extract: tuple[str, ...]) -> tuple[Any, ...]:
    """Math-Verify targets named by ``extract`` ("latex" and/or "expr"); boxes have top priority."""
    unknown = set(extract) - {"latex", "expr"}
    if unknown or not extract:
        raise ValueError(f"extract must name 'latex' and/or 'expr', got {list(extract)}")
    configs = []
    if "latex" in extract:
        configs.append(LatexExtractionConfig(boxed_match_priority=0))
    if "expr" in extract:
        configs.append(ExprExtractionConfig())
    return tuple(configs)


def _parse(text: str, extract: tuple[str, ...]) -> list:
    """Math-Verify's parse; short texts (answers, golds, boxes: they repeat across a group and across
    problems) come from a per-process cache. SymPy objects are immutable, so sharing them is safe."""
    if len(text) <= _MAX_CACHED_PARSE_CHARS:
        return list(_parse_cached(text, extract))
    return parse(text, list(_extraction_configs(extract)), parsing_timeout=None)


@functools.lru_cache(maxsize=16384)
def _parse_cached(text: str, extract: tuple[str, ...]) -> tuple:
    return tuple(parse(text, list(_extraction_configs(extract)), parsing_timeout=None))


def normalize(answer: str) -> str:
    """The answer with the rewrites Math-Verify lacks: a number followed by unit words is the number (as
    hendrycks' ``math_equivalence``, Minerva/DAPO and Qwen2.5-Math strip units), and calculator notation
    ``1e3`` is ``1\\times10^{3}`` (as Qwen2.5-Math's float parsing reads it). Anything else unchanged."""
    text = answer.strip()
    units = _NUMBER_WITH_UNITS_RE.fullmatch(text)
    if units and _are_units(units.group("units")):
        return units.group("number").strip()
    scientific = _SCIENTIFIC_RE.fullmatch(text)
    if scientific:
        return f"{scientific.group(1)}\\times10^{{{scientific.group(2)}}}"
    return answer


def _are_units(words: str) -> bool:
    """Unit words, not maths: a first word of 3+ letters that is no function name, or a 2-letter unit."""
    first = words.strip(" .").split()[0].lower() if words.strip(" .") else ""
    return (len(first) >= 3 and first not in _NOT_UNITS) or first in _SHORT_UNITS


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, extract: tuple[str, ...]) -> tuple:
    """Parsed gold answer(s); cached because a prompt's group shares one gold string."""
    gold = normalize(gold)
    if "####" in gold:  # a whole GSM8K-style solution: the answer follows the last "####"
        gold = after_last(gold, "####") or gold
    if any(marker in gold for marker in _LATEX_MARKERS) or _MATH_DOLLAR_RE.search(gold):
        return tuple(_parse(gold, extract))
    if "expr" in extract and _PLAIN_NUMBER_GOLD_RE.fullmatch(gold) and to_fraction(gold.strip()) is not None:
        return tuple(_parse(gold, ("expr",)))  # one number: "7,425,000", "1 000", "2.5", "25%"
    return tuple(_parse(f"\\boxed{{{gold}}}", extract) or _parse(gold, extract))


def answer_window(completion: str, max_chars: int = MAX_COMPLETION_CHARS) -> str:
    """At most ``max_chars`` of the completion where its final answer lives: the tail, or, when the last
    box lies before the tail, the text from that box on (models ramble after boxing the answer)."""
    if len(completion) <= max_chars:
        return completion
    box_start = max(completion.rfind(command) for command in ("\\boxed", "\\fbox"))
    if 0 <= box_start < len(completion) - max_chars:
        return completion[box_start : box_start + max_chars]
    return completion[-max_chars:]


def parse_prediction(completion: str, extract: tuple[str, ...] = ("latex", "expr")) -> list:
    """Math-Verify objects for the completion's final answer (empty list when none is found).

    Math-Verify's extraction runs first (boxes and "final answer is $x$" share the top priority, right-most
    wins, several boxes become a set); then the last box alone (catches unterminated boxes); then the text
    after ``####`` or an answer phrase.
    """
    window = answer_window(completion)
    parsed = _parse(window, extract)
    if parsed:
        return parsed
    boxed = last_boxed(window) if "latex" in extract else None
    candidates = (f"\\boxed{{{boxed}}}" if boxed else None, after_last(window, "####"), after_answer_phrase(window))
    for candidate in candidates:
        if candidate is not None:
            parsed = _parse(candidate, extract) or _parse(f"${candidate}$", extract)
            if parsed:
                return parsed
    return []


def _golds(ground_truth: Any) -> list[str]:
    if isinstance(ground_truth, list | tuple):  # several acceptable answers
        return [str(item) for item in ground_truth]
    return [str(ground_truth)]


def _count_boxes(text: str) -> int:
    return text.count("\\boxed") + text.count("\\fbox")


def single_box(window: str) -> str | None:
    """Content of the window's only box when Math-Verify would read exactly that box, else None.

    Qualifies: exactly one ``\\boxed``/``\\fbox`` with content and no "final answer is" after it (that
    phrase shares the box's top priority and the right-most match wins).
    """
    if _count_boxes(window) != 1:
        return None
    box_start = max(window.rfind("\\boxed"), window.rfind("\\fbox"))
    if _FINAL_ANSWER_RE.search(window, box_start):
        return None
    return last_boxed(window)


def quick_verdict(window: str, golds: list[str], float_rounding: int) -> bool | None:
    """Decide the common cases without SymPy; None when Math-Verify must decide.

    Only a window with a ``single_box`` qualifies. Correct: the box holds the gold string verbatim. Decided
    either way: box and every gold are plain numbers (compared exactly, or at ``float_rounding`` decimals
    when one has a decimal point, as Math-Verify does).
    """
    content = single_box(window)
    return None if content is None else _quick(content, golds, float_rounding)


def _spelling(answer: str) -> str:
    """The answer with only its spelling normalised: no spaces or LaTeX spacing, ``\\dfrac``/``\\tfrac`` as
    ``\\frac``, no ``\\left``/``\\right``, no trailing period, no ``x =`` in front (hendrycks'
    ``math_equivalence`` normalisations). Equal spellings are equal answers, decided without parsing."""
    text = _LATEX_SPACING_RE.sub("", answer).rstrip(".")
    text = _FRAC_VARIANT_RE.sub(r"\\frac", _LEFT_RIGHT_RE.sub("", text))
    return _VARIABLE_PREFIX_RE.sub("", text, count=1)


def _quick(content: str, golds: list[str], float_rounding: int) -> bool | None:
    content = content.strip().rstrip(".").replace("{,}", ",")
    if content in (gold.strip() for gold in golds):
        return True
    if _spelling(content) in (_spelling(gold) for gold in golds):
        return True
    predicted = _plain_number(_LATEX_SPACING_RE.sub("", normalize(content)))
    expected = [_plain_number(normalize(gold).strip()) for gold in golds]
    if predicted is None or any(value is None for value in expected):
        return None
    return any(_numbers_equal(predicted, value, float_rounding) for value in expected)


@functools.lru_cache(maxsize=8192)
def _box_verdict(golds: tuple[str, ...], content: str, extract: tuple[str, ...], options: tuple) -> bool | None:
    """Math-Verify's verdict on a single box; None when the box alone does not parse (then the rest of the
    window is read). Cached: the samples of one prompt often give the same answer."""
    prediction = _parse(f"\\boxed{{{normalize(content)}}}", extract)
    if not prediction:
        return None
    parsed_golds = [parsed for gold in golds for parsed in _parse_gold(gold, extract)]
    return bool(parsed_golds) and _verify(parsed_golds, prediction, options)


def _verify(golds: list, prediction: list, options: tuple) -> bool:
    float_rounding, numeric_precision, strict, allow_set_relation_comp = options
    if clearly_unequal(golds, prediction, float_rounding, strict):
        return False
    return verify(
        golds,
        prediction,
        float_rounding=float_rounding,
        numeric_precision=numeric_precision,
        strict=strict,
        allow_set_relation_comp=allow_set_relation_comp,
        timeout_seconds=None,
    )


def _constants_differ(box: str, golds: list[str], float_rounding: int) -> bool:
    """``clearly_unequal`` before any parsing, when the box and every gold are constant LaTeX numbers that
    ``rewards._latex_number`` reads (``\\frac{14}{3}`` against ``3\\sqrt{13}``): saves two LaTeX parses."""
    predicted = latex_number.value(normalize(box))
    if predicted is None:
        return False
    gold_values = [latex_number.value(normalize(gold)) for gold in golds]
    return None not in gold_values and all_far(gold_values, [predicted], float_rounding)


def _plain_number(text: str) -> tuple | None:
    """(value, has_decimal_point) for a plain number without percent sign, else None."""
    if not _PLAIN_NUMBER_GOLD_RE.fullmatch(text) or "%" in text:
        return None
    value = to_fraction(text)
    return None if value is None else (value, "." in text)


def _numbers_equal(a: tuple, b: tuple, float_rounding: int) -> bool:
    if a[1] or b[1]:
        return round(a[0], float_rounding) == round(b[0], float_rounding)
    return a[0] == b[0]


def score(
    completion: str,
    ground_truth: Any,
    *,
    float_rounding: int = 6,
    numeric_precision: int = 15,
    strict: bool = True,
    allow_set_relation_comp: bool = False,
    extract: Sequence[str] = ("latex", "expr"),
    correct_score: float = 1.0,
    wrong_score: float = 0.0,
    time_limit_s: float | None = DEFAULT_TIME_LIMIT_S,
    **fields: Any,
) -> dict[str, float]:
    """``{"score": correct_score | wrong_score, "acc": 1.0 | 0.0, "gold_unparsed": 1.0 | 0.0}``.

    ``float_rounding``: decimals kept when either side is a float (0.333333 == 1/3 at 6).
    ``strict=False`` lets sets compare with tuples and matches variables by position.
    ``allow_set_relation_comp``: a predicted inequality may answer a gold set/interval.
    ``extract``: which Math-Verify targets read answers ("latex", "expr").
    ``time_limit_s``: SymPy time after which the answer scores wrong (main thread only; None: no limit).
    ``gold_unparsed`` is 1.0 when the ground truth itself yields no answer (a data problem, scored wrong).
    Pathological answers or golds (rewards/_timebound.py) score wrong without being parsed.
    """
    extract = tuple(extract)
    text = completion if isinstance(completion, str) else str(completion)
    gold_strings = _golds(ground_truth)
    window = answer_window(text)
    box = single_box(window) if "latex" in extract else None
    correct = None if box is None else _quick(box, gold_strings, float_rounding)
    if correct is None and box is not None and _constants_differ(box, gold_strings, float_rounding):
        correct = False
    if correct is None:
        answer_refused = refusal_reason(box) if box is not None else refusal_reason(window, prose=True)
        if answer_refused or any(refusal_reason(gold, prose=True) for gold in gold_strings):
            correct = False
        else:
            options = (float_rounding, numeric_precision, strict, allow_set_relation_comp)
            try:
                with time_limit(time_limit_s):
                    correct = _symbolic_verdict(text, box, gold_strings, extract, options)
            except TimeUp:
                correct = False
        if correct is None:
            return {"score": wrong_score, "acc": 0.0, "gold_unparsed": 1.0}
    return {"score": correct_score if correct else wrong_score, "acc": float(correct), "gold_unparsed": 0.0}


def _symbolic_verdict(
    text: str, box: str | None, gold_strings: list[str], extract: tuple[str, ...], options: tuple
) -> bool | None:
    """Math-Verify's verdict (the box alone first, then the whole window); None when no gold parses."""
    golds = [parsed for gold in gold_strings for parsed in _parse_gold(gold, extract)]
    if not golds:
        return None
    correct = None if box is None else _box_verdict(tuple(gold_strings), box, extract, options)
    if correct is None:
        prediction = parse_prediction(text, extract)
        if not prediction:
            return False
        key = (tuple(gold_strings), tuple(map(str, prediction)), extract, options)
        correct = _WINDOW_VERDICTS.get(key)
        if correct is None:
            correct = _verify(golds, prediction, options)
            if len(_WINDOW_VERDICTS) >= _MAX_WINDOW_VERDICTS:
                _WINDOW_VERDICTS.pop(next(iter(_WINDOW_VERDICTS)))  # the oldest entry
            _WINDOW_VERDICTS[key] = correct
    return correct


def equivalent(answer: str, gold: str, **options: Any) -> bool:
    """Whether the final ``answer`` (bare, e.g. ``\\dfrac12``, or a completion with a box) is equivalent to
    ``gold`` under ``score``'s rules and time bound; ``options`` are ``score``'s keywords. Used by maj@k."""
    text = str(answer)
    if not text.strip():
        return False
    completion = text if any(command in text for command in ("\\boxed", "\\fbox")) else f"\\boxed{{{text}}}"
    return score(completion, gold, **options)["acc"] == 1.0
