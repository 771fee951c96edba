"""``gsm8k`` numeric grader: the quickstart's short answers and GSM8K-style solutions."""

import pytest

from rewards import gsm8k

GSM8K_SOLUTION = "She eats 3 and bakes 4, so 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18"


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        ("82", 82),
        ("Answer: 82", 82),
        ("23+59=82", 82),
        ("so\n#### 82", "82"),
        (r"thus \boxed{82}.", 82),
        ("The final answer is 1,234.", 1234),
        ("She pays $1,234.50 in total.", "1234.5"),
        ("-7", -7),
        ("0.1", 0.1),
        ("the answer is 18", GSM8K_SOLUTION),
    ],
)
def test_correct(completion, gold):
    assert gsm8k.score(completion, gold) == {"score": 1.0, "acc": 1.0, "extracted": 1.0, "gold_unparsed": 0.0}


@pytest.mark.parametrize(("completion", "gold"), [("83", 82), ("Answer: 81 then 82 was wrong", 82), ("18.5", 18)])
def test_wrong(completion, gold):
    assert gsm8k.score(completion, gold)["acc"] == 0.0


def test_no_number_is_not_extracted():
    assert gsm8k.score("no idea", 5) == {"score": 0.0, "acc": 0.0, "extracted": 0.0, "gold_unparsed": 0.0}


def test_format_score_rewards_a_wrong_number_only():
    assert gsm8k.score("4", 5, format_score=0.1)["score"] == 0.1
    assert gsm8k.score("none", 5, format_score=0.1)["score"] == 0.0


def test_relative_tolerance():
    assert gsm8k.score("100.4", 100, rel_tol=0.01)["acc"] == 1.0
    assert gsm8k.score("100.4", 100)["acc"] == 0.0


@pytest.mark.parametrize("gold", [None, "", "no number", float("nan"), True])
def test_gold_without_number_is_reported(gold):
    assert gsm8k.score("5", gold)["gold_unparsed"] == 1.0


@pytest.mark.parametrize("completion", ["", "9" * 100_000, "1e999999999", "\x00", "," * 10_000, "1/0"])
def test_never_raises(completion):
    assert gsm8k.score(completion, 5)["score"] == 0.0
