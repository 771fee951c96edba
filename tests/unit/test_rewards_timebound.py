"""Graders bound their own time when called directly (no grader pool): pathological answers are refused
before parsing, the main-thread timer cuts off the rest, and random LaTeX always gets a score quickly."""

import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards import countdown, gsm8k
from rewards import math as math_grader
from rewards._timebound import TimeUp, refusal_reason, time_limit

HANG_BOUND_S = 5.0  # a termination bound, not a speed claim: a hang runs for hours


@pytest.mark.parametrize(
    "answer",
    [
        r"10^{10^{10^{10}}}",
        r"10^{10^{10}}",
        r"9^{9^{9}}",
        "9^9^9^9",
        "2**2**2**2**2",
        r"(10^{10})^{10^{10}}",
        r"x^{1000000}",
        r"10^{-10^{10}}",
        r"100000!",
        "9" * 5000,
        "{" * 100 + "1" + "}" * 100,
        "(" * 100 + "1" + ")" * 100,
        "1+" * 2000 + "1",
    ],
)
def test_pathological_answers_are_refused_before_parsing(answer):
    assert refusal_reason(answer) is not None
    assert refusal_reason(f"\\boxed{{{answer}}}") is not None


@pytest.mark.parametrize(
    "answer",
    [
        r"\\frac{\\sqrt{3}}{2}",
        r"\\left(\\frac{1}{2}, \\sqrt{\\frac{3}{4}}\\right)",
        r"2^{100}",
        r"2^{2^{3}}",
        r"e^{x^2}",
        r"x^{-2}",
        r"\frac{1}{2}",
        "10^{6}",
        r"1000!",
        "3^4^2",
        "7,425,000",
    ],
)
def test_ordinary_answers_are_not_refused(answer):
    assert refusal_reason(answer) is None


@pytest.mark.parametrize(
    "text, refused",
    [("a^ {b^ {c^ {d}}}", True), ("a^b {c^d {e^f}}", False), ("x^{2} y^{3} z^{4}", False)],
)
def test_a_brace_is_an_exponent_only_when_nothing_but_space_follows_the_caret(text, refused):
    assert (refusal_reason(text, prose=True) is not None) is refused


def test_power_tower_scores_wrong_at_once_when_called_directly():
    start = time.monotonic()
    assert math_grader.score(r"\boxed{10^{10^{10^{10}}}}", "1") == {"score": 0.0, "acc": 0.0, "gold_unparsed": 0.0}
    assert time.monotonic() - start < HANG_BOUND_S


def test_pathological_gold_scores_wrong_instead_of_hanging():
    assert math_grader.score(r"\boxed{1}", r"10^{10^{10^{10}}}", wrong_score=-1.0)["score"] == -1.0


def test_refusal_applies_in_a_worker_thread_where_no_timer_can_be_armed():
    results = []
    worker = threading.Thread(target=lambda: results.append(math_grader.score(r"\boxed{9^{9^{9}}}", "1")))
    worker.start()
    worker.join(HANG_BOUND_S)
    assert not worker.is_alive() and results[0]["acc"] == 0.0


def test_time_limit_interrupts_the_main_thread():
    with pytest.raises(TimeUp), time_limit(0.05):
        while True:
            pass


def test_time_limit_is_a_no_op_outside_the_main_thread_and_restores_the_timer_state():
    outcome = []

    def busy_briefly():
        with time_limit(0.01):
            time.sleep(0.05)
        outcome.append("finished")

    worker = threading.Thread(target=busy_briefly)
    worker.start()
    worker.join()
    assert outcome == ["finished"]
    with time_limit(None):
        pass
    with time_limit(1.0):
        pass
    import signal

    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


_ATOMS = st.sampled_from(["1", "x", "10", "9", r"\pi", "e", "0.5", "-3", "9" * 1200, r"\infty", r"\sqrt{2}", "2"])


def _latex(children):
    return st.one_of(
        st.tuples(children, children).map(lambda pair: f"{pair[0]}^{{{pair[1]}}}"),
        st.tuples(children, children).map(lambda pair: f"\\frac{{{pair[0]}}}{{{pair[1]}}}"),
        st.tuples(children, children).map(lambda pair: f"{pair[0]}^{pair[1]}"),
        st.tuples(children, children).map(lambda pair: f"({pair[0]})!" if len(pair[0]) < 8 else f"{pair[0]}!"),
        children.map(lambda inner: f"\\sqrt{{{inner}}}"),
        st.tuples(children, st.sampled_from(["+", "-", "\\cdot", "*", "**", ","]), children).map("".join),
        children.map(lambda inner: f"\\left({inner}\\right)"),
        children.map(lambda inner: "{" * 30 + inner + "}" * 30),
    )


_EXPRESSIONS = st.recursive(_ATOMS, _latex, max_leaves=12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=_EXPRESSIONS, gold=st.sampled_from(["1", r"\frac{1}{2}", "x+1", r"10^{10}", r"\{1,2\}"]))
def test_random_latex_always_gets_a_score_in_bounded_time(answer, gold):
    for completion in (f"so $\\boxed{{{answer}}}$", f"The final answer is ${answer}$", answer):
        start = time.monotonic()
        result = math_grader.score(completion, gold, correct_score=1.0, wrong_score=-1.0)
        assert result["score"] in (1.0, -1.0) and result["acc"] in (0.0, 1.0)
        assert time.monotonic() - start < HANG_BOUND_S


@settings(max_examples=30, deadline=None)
@given(text=_EXPRESSIONS)
def test_numeric_graders_return_quickly_on_random_latex(text):
    start = time.monotonic()
    assert gsm8k.score(f"#### {text}", "12")["acc"] in (0.0, 1.0)
    assert countdown.score(f"<answer>{text}</answer>", {"target": 24, "numbers": [1, 2, 3, 4]}) is not None
    assert time.monotonic() - start < HANG_BOUND_S


@pytest.mark.parametrize("answer", ["9**9**9", "9**9**9**9", "2**(10**10)"])
def test_reasoning_gym_power_towers_score_zero_without_the_verifier(answer):
    import reasoning_gym as rg

    from rewards import reasoning_gym as rg_grader

    entry = next(iter(rg.create_dataset("countdown", size=1, seed=7)))
    start = time.monotonic()
    result = rg_grader.score(f"<answer>{answer}</answer>", entry["answer"], metadata=entry["metadata"])
    assert result == {"score": 0.0, "acc": 0.0}
    assert time.monotonic() - start < HANG_BOUND_S


def test_prose_windows_and_gold_solutions_are_judged_by_their_latex_only():
    prose = "Case (a: we try 1), 2), 3) and so on. " * 100 + "The final answer is $5$."
    assert refusal_reason(prose) is not None  # as an answer it would be far too long
    assert refusal_reason(prose, prose=True) is None
    assert refusal_reason("so $" + "{" * 12 + "1" + "}" * 12 + "$", prose=True) is not None
    assert math_grader.score(prose, "5")["acc"] == 1.0
