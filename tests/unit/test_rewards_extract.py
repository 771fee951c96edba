"""Final-answer extraction: boxes (nested, \\fbox, unterminated, space form), markers, numbers."""

from fractions import Fraction

import pytest

from rewards.extract import after_answer_phrase, after_last, last_boxed, last_number, numeric_answer, to_fraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{a} then \boxed{\sqrt{\frac{3}{4}}}", r"\sqrt{\frac{3}{4}}"),
        (r"\fbox{7}", "7"),
        (r"\boxed{3} and \fbox{4}", "4"),
        (r"the answer is \boxed{42", "42"),
        (r"\boxed 5$ done", "5"),
        (r"\boxed{\boxed{9}}", "9"),
        (r"\boxed{5} and then \boxed{}", "5"),
        ("no box here", None),
        (r"\boxed", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_last_boxed_is_linear_on_ten_thousand_unclosed_boxes():
    text = r"\boxed{" * 10_000 + "7"
    assert last_boxed(text) == "7"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("work\n#### 1,234\n", "1,234"),
        ("Answer: 82", "82"),
        ("so the final answer is 12. Answer: 13", "12"),
        ("She pays $1,234.50 in total.", "1,234.50"),
        ("x = -3", "-3"),
        ("it is 3/4 of it", "3/4"),
        ("AZYUK2A", None),
        ("nothing", None),
    ],
)
def test_numeric_answer(text, expected):
    assert numeric_answer(text) == expected


def test_markers():
    assert after_last("a #### 1\nb #### 2\nc", "####") == "2"
    assert after_last("no marker", "####") is None
    assert after_answer_phrase("Answer: $5$\nmore") == "5"
    assert last_number("1, 2 and 3.5") == "3.5"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234", Fraction(1234)),
        ("-2.50", Fraction(-5, 2)),
        ("$12", Fraction(12)),
        ("3/4", Fraction(3, 4)),
        ("25%", Fraction(1, 4)),
        (".5", Fraction(1, 2)),
        ("7.", Fraction(7)),
    ],
)
def test_to_fraction(text, value):
    assert to_fraction(text) == value


@pytest.mark.parametrize("text", ["1e999999999", "abc", "1/0", "9" * 500, "", "1,22"])
def test_to_fraction_refuses_non_numbers_and_huge_values(text):
    assert to_fraction(text) is None
