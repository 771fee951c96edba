"""``format``: template checks by linear string scans."""

import pytest

from rewards import format as format_grader

GOOD = "<think>\nreasoning\n</think>\n<answer>\n42\n</answer>"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (GOOD, 1.0),
        ("  " + GOOD + "\n", 1.0),
        ("<answer>42</answer><think>x</think>", 0.0),
        ("<think>x</think> text <answer>42</answer>", 0.0),
        ("<think>x</think><answer> </answer>", 0.0),
        ("<think>x</think><answer>1</answer><answer>2</answer>", 0.0),
        (GOOD + " trailing", 0.0),
        ("42", 0.0),
    ],
)
def test_think_answer(completion, expected):
    assert format_grader.score(completion) == expected


def test_think_mode_needs_an_answer_after_thinking():
    assert format_grader.score("<think>x</think> 42", mode="think") == 1.0
    assert format_grader.score("<think>x</think>  ", mode="think") == 0.0


def test_tag_credit_is_partial():
    assert format_grader.score("<think>x</think> 42", mode="tags") == 0.5


def test_regex_mode():
    assert format_grader.score("Answer: 5", mode="regex", regex=r"Answer: \d+") == 1.0


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="mode"):
        format_grader.score("x", mode="nope")


def test_linear_on_adversarial_tags():
    assert format_grader.score("<think></think><answer>" * 20_000 + "x" * 100_000) == 0.0
