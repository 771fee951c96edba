"""``countdown``: each number exactly once, only + - * / and parentheses, exact arithmetic, no eval."""

import json

import pytest

from rewards import countdown

TRUTH = {"target": 24, "numbers": [4, 6, 1]}


@pytest.mark.parametrize(
    "completion",
    [
        "4*6*1",
        "<think>try</think><answer>(6*4)/1</answer>",
        "work\n4 * 6 * 1 = 24",
        "6 × 4 ÷ 1",
        "<answer>1*4*6</answer>\ntrailing words",
    ],
)
def test_correct_expressions(completion):
    assert countdown.score(completion, TRUTH) == {"score": 1.0, "acc": 1.0, "valid": 1.0}


@pytest.mark.parametrize(
    ("completion", "valid"),
    [
        ("4*6+1", 1.0),  # valid, wrong value
        ("4*6", 0.0),  # a number unused
        ("4*6*1*1", 0.0),  # a number used twice
        ("24", 0.0),
        ("4*6*1.0", 0.0),  # floats are not given numbers
        ("(4+6)**1", 0.0),  # power is not allowed
        ("__import__('os').system('true')", 0.0),
        ("4*6*(1/0)", 0.0),
        ("", 0.0),
        ("((((" * 300, 0.0),
    ],
)
def test_rejected_expressions(completion, valid):
    assert countdown.score(completion, TRUTH) == {"score": 0.0, "acc": 0.0, "valid": valid}


def test_exact_fractions():
    assert countdown.score("(1/3)*3*8", {"target": 8, "numbers": [1, 3, 3, 8]})["acc"] == 1.0


def test_unary_minus_and_json_ground_truth():
    assert countdown.score("-(1-5)*6", {"target": 24, "numbers": [1, 5, 6]})["acc"] == 1.0
    assert countdown.score("4*6*1", json.dumps(TRUTH))["acc"] == 1.0


def test_format_score_for_valid_but_wrong():
    assert countdown.score("4+6+1", TRUTH, format_score=0.1)["score"] == 0.1
    assert countdown.score("4+6", TRUTH, format_score=0.1)["score"] == 0.0


def test_bad_ground_truth_raises_a_clear_error():
    with pytest.raises(ValueError, match="target"):
        countdown.score("1", {"numbers": [1]})


@pytest.mark.parametrize("completion", ["<answer>" * 10_000, "9" * 100_000, "\x00\x01", "=" * 1000])
def test_never_raises_on_odd_input(completion):
    assert countdown.score(completion, TRUTH)["score"] == 0.0


@pytest.mark.parametrize("completion", ["1and 2", "4*6*1if 1", "0x1for", "(4)(6)(1)"])
def test_invalid_literals_warn_nothing(completion, recwarn):
    assert countdown.score(completion, TRUTH)["valid"] == 0.0
    assert not [w for w in recwarn if issubclass(w.category, SyntaxWarning | DeprecationWarning)]
