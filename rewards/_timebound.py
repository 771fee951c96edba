"""Time bounds a grader keeps by itself, inside or outside ``rltrain.grading.RewardGrader``'s pool.

Two layers, both process-free:
- ``refusal_reason`` is a linear scan run BEFORE any parsing: it refuses the inputs that make SymPy
  build astronomically large numbers or recurse without end (power towers such as ``10^{10^{10^{10}}}``,
  huge exponents or factorials, numbers of thousands of digits, deep brace or bracket nesting, huge
  answers). Such an answer is not something a person would write as a final answer; it scores wrong.
- ``time_limit`` cuts off whatever still runs too long, with ``signal.setitimer`` when it is called in
  the main thread and no other interval timer is running; elsewhere (a worker thread, a TRL reward
  function running under another timer) it is a no-op and the refusal scan is the only bound.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import signal
import threading
from collections.abc import Iterator

MAX_ANSWER_CHARS = 2000  # a final answer longer than this is refused (completions are windowed before)
MAX_DIGITS = 1000  # digits in one run: "10^{1000}" written out is 1,001 digits
MAX_NESTING = 10  # brace / bracket / parenthesis depth: the LaTeX parser slows down exponentially with it
MAX_POWER_DIGITS = 10_000  # estimated decimal digits of a numeric power a^b
MAX_EXPONENT_DEPTH = 2  # "a^{b^{c}}" has depth 2; a third level is always refused
MAX_FACTORIAL_ARG = 10_000

_DIGIT_RUN_RE = re.compile(rf"\d{{{MAX_DIGITS + 1},}}")
# a numeric (or numeric-tower) exponent: "10^{100}", "2^100", "9^{9^{9}}"; a base that is not a number
# ("x^{10^6}", "(10^{10})^{10^{10}}") is estimated as 10; an unbraced chain "9^9^9" is the tower 9^(9^9);
# Python's "2**(10**10)" is read with "**" as "^"
_NUMERIC_POWER_RE = re.compile(r"(\d+(?:\.\d+)?)?\s*\^\s*(\{[-\d\s^{}()]*\}|\([-\d\s^{}()]*\)|-?\d+(?:\s*\^\s*-?\d+)*)")
_FACTORIAL_RE = re.compile(r"(\d+)\s*!")
_EXPONENT_CHARS_RE = re.compile(r"[\^{}]")


class TimeUp(BaseException):  # noqa: N818 - BaseException: Math-Verify's "except Exception" must not swallow it
    """Raised inside the guarded block when its time is up."""


def _max_nesting(text: str, opening: str = "{[(", closing: str = "}])") -> int:
    depth = deepest = 0
    for match in _bracket_re(opening + closing).finditer(text):  # only the brackets: the scan stays in C
        if match.group() in opening:
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(depth - 1, 0)
    return deepest


@functools.lru_cache(maxsize=4)
def _bracket_re(brackets: str) -> re.Pattern:
    return re.compile("[" + re.escape(brackets) + "]")


def _exponent_depth(text: str) -> int:
    """Deepest nesting of ``^`` inside exponents (``a^b`` is 1, ``a^{b^c}`` is 2); one pass over the text's
    ``^``, ``{`` and ``}`` (the text between them only matters for whether it is blank)."""
    deepest = 0
    open_exponents: list[int] = []  # brace depths at which an exponent group opened
    depth = 0
    pending = False  # a "^" was just read: the next atom is its exponent
    previous_end = 0
    for match in _EXPONENT_CHARS_RE.finditer(text):
        gap = text[previous_end : match.start()]
        if gap and not gap.isspace():
            pending = False  # another atom came between the "^" and this character
        previous_end = match.end()
        char = match.group()
        if char == "^":
            deepest = max(deepest, len(open_exponents) + 1)
            pending = True
        elif char == "{":
            depth += 1
            if pending:
                open_exponents.append(depth)
            pending = False
        else:
            if open_exponents and open_exponents[-1] == depth:
                open_exponents.pop()
            depth = max(depth - 1, 0)
    return deepest


def _power_digits(base: str, exponent: str) -> float:
    """Estimated decimal digits of ``base ** exponent`` (exponent: a plain integer or a numeric tower)."""
    numbers = [float(part) for part in re.findall(r"\d+", exponent)]
    if not numbers:
        return 0.0
    exponent_log10 = 0.0  # log10 of the exponent's value, evaluated from the top of the tower down
    for number in reversed(numbers):
        exponent_log10 = math.log10(max(number, 1.0)) * (10**exponent_log10 if exponent_log10 < 300 else math.inf)
        if exponent_log10 > 300:
            return math.inf
    base_log10 = abs(math.log10(max(float(base), 1e-300)))
    return base_log10 * 10**exponent_log10


def refusal_reason(text: str, prose: bool = False) -> str | None:
    """Why ``text`` (an answer, or with ``prose`` a completion window or a gold solution) is refused before
    parsing, or None when it is safe to parse. Prose may be long and has unmatched brackets ("1)", "(a"),
    so only its braces count for nesting (LaTeX groups, always balanced) and its length is not limited."""
    if not prose and len(text) > MAX_ANSWER_CHARS:
        return f"answer longer than {MAX_ANSWER_CHARS} characters"
    if _DIGIT_RUN_RE.search(text):
        return f"number with more than {MAX_DIGITS} digits"
    if (_max_nesting(text, "{", "}") if prose else _max_nesting(text)) > MAX_NESTING:
        return f"nesting deeper than {MAX_NESTING}"
    return power_refusal_reason(text)


def power_refusal_reason(text: str) -> str | None:
    """Why ``text`` holds a number too large to compute (power tower, huge power or factorial), or None."""
    text = text.replace("**", "^")
    if "^" in text:
        if _exponent_depth(text) > MAX_EXPONENT_DEPTH:
            return f"exponents nested deeper than {MAX_EXPONENT_DEPTH}"
        for match in _NUMERIC_POWER_RE.finditer(text):
            if _power_digits(match.group(1) or "10", match.group(2)) > MAX_POWER_DIGITS:
                return f"power {match.group(0)!r} has more than {MAX_POWER_DIGITS} digits"
    if "!" in text and any(int(match.group(1)) > MAX_FACTORIAL_ARG for match in _FACTORIAL_RE.finditer(text)):
        return f"factorial of a number above {MAX_FACTORIAL_ARG}"
    return None


def _raise_time_up(signum: int, frame: object) -> None:
    raise TimeUp


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise ``TimeUp`` in the block after ``seconds`` when a timer can be armed here (main thread, no
    interval timer already running); otherwise run the block unbounded. ``None`` or ``0``: no limit."""
    armable = (
        bool(seconds)
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )
    if not armable:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_time_up)
    # repeats every 50 ms: a TimeUp raised where Python ignores exceptions (a gc callback) is raised again
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
