"""``math`` grader: extraction forms and Math-Verify equivalence; the SymPy-free fast path agrees with it."""

import pytest

from rewards import math as math_grader


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"so $\boxed{\frac{1}{2}}$", r"\frac12"),
        (r"\fbox{5}", "5"),
        (r"thus \boxed{42", "42"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}"),
        ("The final answer is $5$. I hope it is correct.", "5"),
        ("Answer: 7", "7"),
        ("work\n#### 72", "72"),
        ("so 3 apples", "3"),
        (r"\boxed{50\%}", r"50\%"),
        (r"\boxed{1,234}", "1234"),
        (r"\boxed{1{,}234}", "1234"),
        (r"\boxed{\{1,2\}}", r"\{2,1\}"),
        (r"\boxed{(0,1]}", "(0,1]"),
        (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
        (r"\boxed{x=3}", "3"),
        (r"\boxed{5\text{ cm}}", "5"),
        (r"\boxed{0.333333}", r"\frac13"),
        (r"\boxed{14/3}", r"\frac{14}{3}"),
        (r"\boxed{90^\circ}", "90"),
        (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}"),
        (r"\boxed{\sqrt{117}}", r"3\sqrt{13}"),
        (r"\boxed{-q+p}", "p - q"),
        (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{x \in [2, 5)}", "[2,5)"),
        (r"\boxed{1} and \boxed{2}", r"\{1, 2\}"),
        ("long preamble " * 500 + r"\boxed{8}" + " and then a long ramble" * 300, "8"),
    ],
)
def test_equivalent_answers_score_one(completion, gold):
    assert math_grader.score(completion, gold) == {"score": 1.0, "acc": 1.0, "gold_unparsed": 0.0}


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"\boxed{6}", "5"),
        (r"\boxed{[0,1]}", "(0,1]"),
        (r"\boxed{0.33}", r"\frac13"),
        (r"\boxed{2} is wrong, so \boxed{3}", "3"),  # several boxes form a set: hedging is not rewarded
        ("", "5"),
        (r"\boxed{}", "5"),
        (r"\boxed{\frac{1}{0}}", "5"),
    ],
)
def test_wrong_answers_score_zero(completion, gold):
    assert math_grader.score(completion, gold)["acc"] == 0.0


def test_custom_scores_keep_acc_binary():
    assert math_grader.score(r"\boxed{6}", "5", correct_score=1.0, wrong_score=-1.0) == {
        "score": -1.0,
        "acc": 0.0,
        "gold_unparsed": 0.0,
    }


def test_float_rounding_is_the_numeric_tolerance():
    assert math_grader.score(r"\boxed{0.33}", r"\frac13", float_rounding=2)["acc"] == 1.0


def test_list_ground_truth_accepts_any():
    assert math_grader.score(r"\boxed{4}", ["3", "4"])["acc"] == 1.0


def test_unparseable_gold_is_reported_not_hidden():
    assert math_grader.score(r"\boxed{4}", "") == {"score": 0.0, "acc": 0.0, "gold_unparsed": 1.0}


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"so \boxed{12}", "12"),
        (r"so \boxed{12}", "13"),
        (r"so \boxed{1,000}", "1000"),
        (r"so \boxed{2.50}", "2.5"),
        (r"so \boxed{-7}.", "-7"),
        (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"so \boxed{0.5}", r"\frac{1}{2}"),
        (r"so \boxed{3.14159265}", "3.141593"),
        (r"\boxed{255} then the final answer is $10,455$", "10455"),
    ],
)
def test_fast_path_agrees_with_math_verify(completion, gold):
    window = math_grader.answer_window(completion)
    quick = math_grader.quick_verdict(window, [gold], float_rounding=6)
    full = math_grader.verify(
        list(math_grader._parse_gold(gold, ("latex", "expr"))),
        math_grader.parse_prediction(completion),
        timeout_seconds=None,
    )
    assert quick is None or quick == full


@pytest.mark.parametrize(
    "completion",
    ["", "\x00\x01\x02", "}" * 1000, "{" * 1000, r"\boxed{" * 10_000, "$" * 5000, r"\frac{" * 2000, "\ud800", 12345],
)
def test_never_raises_on_odd_input(completion):
    result = math_grader.score(completion, "5")
    assert result["score"] in (0.0, 1.0)


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"\boxed{28\%}", "28"),  # percentages parse (ANTLR 4.9 parser patch)
        (r"\boxed{28\%}", r"28 \%"),
        (r"\boxed{1, -2}", "1,-2"),  # a list gold is a set, not the number 1 or -2.1
        (r"\boxed{-2,1}", "1,-2"),
        (r"\boxed{3,5,7}", "3, 5, 7"),
        (r"\boxed{18.9}", r"\$18.90"),  # "\$" is money, not a math delimiter
        (r"\boxed{32348}", r"\$32,\!348"),
    ],
)
def test_percent_list_and_money_golds(completion, gold):
    assert math_grader.score(completion, gold)["acc"] == 1.0


def test_list_gold_is_not_read_as_a_decimal():
    assert math_grader.score(r"\boxed{-2.1}", "-2,1")["acc"] == 0.0
    assert math_grader.score(r"\boxed{7}", "3, 5, 7")["acc"] == 0.0


@pytest.mark.parametrize(
    ("latex", "expected"),
    [
        (r"\frac{14}{3}", 14 / 3),
        (r"3\sqrt{13}", 3 * 13**0.5),
        (r"-\dfrac{\pi}{2}", -3.141592653589793 / 2),
        ("10^{-2}", 0.01),
        (r"\left(3\right)^2", 9.0),
        (r"2\cdot 3 + 1", 7.0),
    ],
)
def test_constant_latex_numbers_are_read_without_the_parser(latex, expected):
    from rewards._latex_number import value

    assert value(latex) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "latex", ["1 000", r"2\frac{1}{2}", r"\frac34", "x", r"\sqrt{-1}", "(1,2)", r"10^{10^{10}}", r"90^\circ", "1/0"]
)
def test_anything_but_a_plain_constant_is_left_to_math_verify(latex):
    from rewards._latex_number import value

    assert value(latex) is None


def test_constants_rejected_before_parsing_agree_with_math_verify():
    from math_verify import verify

    for box, gold in [(r"\frac{14}{3}", r"3\sqrt{13}"), (r"2\pi", r"\frac{\pi}{2}"), ("0.5", r"\frac{1}{3}")]:
        assert math_grader._constants_differ(box, [gold], 6)
        assert math_grader.score(rf"\boxed{{{box}}}", gold, time_limit_s=None)["acc"] == 0.0
        parsed_gold = list(math_grader._parse_gold(gold, ("latex", "expr")))
        assert not verify(parsed_gold, math_grader._parse(rf"\boxed{{{box}}}", ("latex", "expr")))
    assert not math_grader._constants_differ("0.333333", [r"\frac{1}{3}"], 6)  # close: Math-Verify decides
    assert not math_grader._constants_differ("10", [r"\frac{1}{10}"], 6)  # a factor 100 (percent): likewise
