"""pass@k against brute force over every k-subset; maj@k voting, clustering and ties; the per-set summary."""

from __future__ import annotations

import itertools
import random

import pytest

from rltrain.eval.answers import equivalence, extract_answer
from rltrain.eval.metrics import Sample, cluster, maj_at_k, majority_correct, pass_at_k, set_metrics


def _exact(a: str, b: str) -> bool:
    return a == b


def _brute_pass_at_k(verdicts: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(verdicts, k))
    return sum(any(subset) for subset in subsets) / len(subsets)


def test_pass_at_k_is_the_expectation_over_all_k_subsets():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 10)
        verdicts = [rng.random() < rng.random() for _ in range(n)]
        for k in range(1, n + 1):
            assert pass_at_k(n, sum(verdicts), k) == pytest.approx(_brute_pass_at_k(verdicts, k), abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_clusters_open_in_order_of_first_sight_and_none_abstains():
    assert cluster(["a", "b", "a", None, "c", "b"], _exact) == [0, 1, 0, None, 2, 1]


def test_majority_wins_and_a_tie_goes_to_the_first_seen_answer():
    assert maj_at_k(["5", "7", "7"], [True, False, False], 3, _exact) == 0.0
    assert maj_at_k(["5", "7", "7", "5"], [True, False, False, True], 4, _exact) == 1.0  # tie: 5 was seen first
    assert maj_at_k(["7", "5", "5", "7"], [False, True, True, False], 4, _exact) == 0.0
    assert maj_at_k(["5", "7", "7"], [True, False, False], 1, _exact) == 1.0  # only the first sample votes
    assert majority_correct([None, None], [True, True]) is False


def test_maj_at_k_groups_equivalent_answers():
    equivalent = equivalence("math")  # rewards.math.equivalent
    answers = ["3", "\\frac{1}{2}", "0.5", "3", "1/2"]
    assert cluster(answers, equivalent) == [0, 1, 1, 0, 1]
    assert maj_at_k(answers, [False, True, True, False, True], 5, equivalent) == 1.0
    assert maj_at_k(answers, [False, True, True, False, True], 4, equivalent) == 0.0  # 3 and 1/2 tie: 3 first


def _samples(verdicts: dict[str, list[bool]], answers: dict[str, list[str]]) -> list[Sample]:
    return [
        Sample(pid, i, answers[pid][i], ok, length=10 * (i + 1), truncated=i == 0)
        for pid, group in verdicts.items()
        for i, ok in enumerate(group)
    ]


def test_set_metrics_averages_over_prompts():
    verdicts = {"p0": [False, True, True], "p1": [False, False, False]}
    answers = {"p0": ["1", "2", "2"], "p1": ["1", "1", "9"]}
    metrics = set_metrics(_samples(verdicts, answers), 3, _exact)
    assert metrics["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert metrics["pass@3"] == pytest.approx(0.5)
    assert metrics["maj@1"] == 0.0 and metrics["maj@3"] == 0.5
    assert metrics["avg@3"] == pytest.approx(2 / 6)
    assert metrics["response_len_mean"] == pytest.approx(20.0)
    assert metrics["truncated_frac"] == pytest.approx(1 / 3)
    assert metrics["num_prompts"] == 2.0


def test_set_metrics_refuses_a_prompt_short_of_samples():
    samples = _samples({"p0": [True, False]}, {"p0": ["1", "2"]})
    with pytest.raises(ValueError, match="p0"):
        set_metrics(samples, 3, _exact)


def test_answers_are_extracted_as_the_grader_reads_them():
    assert extract_answer("so it is \\boxed{\\frac{1}{2}}.", "math") == "\\frac{1}{2}"
    assert extract_answer("She pays $1,234.50 in total.\n#### 1234.5", "gsm8k") == "1234.5"
    assert extract_answer("17-16", "countdown") == "17-16"
    assert extract_answer("   ", "countdown") is None
    assert equivalence("gsm8k")("1,234.50", "1234.5") and not equivalence("gsm8k")("12", "13")
    assert equivalence("countdown")("17 - 16", "17  - 16") and not equivalence("countdown")("17-16", "16-17")
