"""Final-answer extraction shared by the graders: linear-time scans that never raise on any string.

Completions can be huge or adversarial (``\\boxed{`` repeated 10^4 times, unbalanced braces), so every
scan here is one pass (or a small, fixed number of passes) over the text, and the regexes are simple
enough that Python's engine cannot backtrack catastrophically on them.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_MAX_BOX_CANDIDATES = 3  # right-most boxes tried before giving up (each try may scan to the end)
_BRACE_RE = re.compile(r"[{}]")

# A number as people write it: sign, thousands separators (1,234,567), decimals (.5, 3.25), a fraction 3/4.
_UNSIGNED = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
NUMBER_RE = re.compile(rf"(?<![\w.])(-?{_UNSIGNED}(?:\s*/\s*{_UNSIGNED})?)")
_PLAIN_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/(?:\d+(?:\.\d*)?|\.\d+))?")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MAX_NUMBER_CHARS = 200  # longer "numbers" are not answers; also keeps int parsing cheap
_SENTENCE_END_RE = re.compile(r"[.!?](?:\s|$)")
_ANSWER_PHRASES = (
    re.compile(r"final answer is", re.IGNORECASE),
    re.compile(r"answer\s*[:：]", re.IGNORECASE),
    re.compile(r"answer is", re.IGNORECASE),
)


def tail(text: str, max_chars: int) -> str:
    """The last ``max_chars`` characters: answers sit at the end, and scanning less bounds the time."""
    return text if len(text) <= max_chars else text[-max_chars:]


def _balanced_group(text: str, open_index: int) -> str:
    """Content of the ``{...}`` group opening at ``open_index``; when it never closes, the rest of the text."""
    depth = 0
    for match in _BRACE_RE.finditer(text, open_index):
        depth += 1 if match.group() == "{" else -1
        if depth == 0:
            return text[open_index + 1 : match.start()]
    return text[open_index + 1 :]


def _box_content(text: str, start: int, command: str) -> str:
    """Answer written after the box command at ``start``: ``\\boxed{...}`` (nested braces) or ``\\boxed 5``."""
    after = start + len(command)
    rest = text[after:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        return _balanced_group(text, after + len(rest) - len(stripped)).strip()
    if rest[:1].isspace():  # Hendrycks' space form "\boxed 5$": up to the next "$" or line end
        return re.split(r"[$\n]", stripped, maxsplit=1)[0].strip()
    return ""


def last_boxed(text: str) -> str | None:
    """Content of the right-most non-empty ``\\boxed{}`` / ``\\fbox{}`` (nested braces; unterminated: the rest).

    Returns None when the text has no box with content.
    """
    end = len(text)
    for _ in range(_MAX_BOX_CANDIDATES):
        start, command = max((text.rfind(command, 0, end), command) for command in _BOX_COMMANDS)
        if start < 0:
            return None
        content = _box_content(text, start, command)
        if content:
            return content
        end = start
    return None


def after_last(text: str, marker: str) -> str | None:
    """Text after the last ``marker`` up to the end of its line, or None when absent or empty."""
    index = text.rfind(marker)
    if index < 0:
        return None
    answer = text[index + len(marker) :].split("\n", 1)[0].strip()
    return answer or None


def after_answer_phrase(text: str) -> str | None:
    """Text after the last "final answer is", else "Answer:", else "answer is", up to the end of its line
    or sentence."""
    for pattern in _ANSWER_PHRASES:
        last = None
        for last in pattern.finditer(text):  # noqa: B007 - keeps the right-most match
            pass
        if last is not None:
            answer = _SENTENCE_END_RE.split(text[last.end() :].split("\n", 1)[0], maxsplit=1)[0]
            answer = answer.strip().strip("$").strip()
            if answer:
                return answer
    return None


def last_number(text: str) -> str | None:
    """The right-most number in ``text`` (``-1,234.5``, ``.5``, ``3/4``), or None."""
    found = None
    for found in NUMBER_RE.finditer(text):  # noqa: B007 - keeps the right-most match
        pass
    return None if found is None else found.group(1)


def to_fraction(number: str) -> Fraction | None:
    """Exact value of a number string (``-1,234.50``, ``$12``, ``3/4``, ``25%`` -> 1/4), or None.

    Exponent notation is refused on purpose: ``Fraction("1e999999999")`` would build a gigantic integer.
    """
    text = number.strip().rstrip(".").replace("$", "").replace(" ", "")
    percent = text.endswith("%")
    text = text.rstrip("%")
    if _THOUSANDS_RE.fullmatch(text):
        text = text.replace(",", "")
    if len(text) > _MAX_NUMBER_CHARS or not _PLAIN_NUMBER_RE.fullmatch(text):
        return None
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def first_number(text: str) -> str | None:
    """The left-most number in ``text``, or None."""
    match = NUMBER_RE.search(text)
    return None if match is None else match.group(1)


def numeric_answer(text: str) -> str | None:
    """A numeric final answer: the first number after the last ``####``, else the last number in the last box,
    else the first number after an answer phrase, else the last number in the text. The result parses with
    ``to_fraction``, or is None."""
    candidates = (
        (after_last(text, "####"), first_number),
        (last_boxed(text), last_number),
        (after_answer_phrase(text), first_number),
    )
    for candidate, pick in candidates:
        if candidate is None:
            continue
        number = candidate if to_fraction(candidate) is not None else pick(candidate)
        if number is not None and to_fraction(number) is not None:
            return number
    number = last_number(text)
    return number if number is not None and to_fraction(number) is not None else None
