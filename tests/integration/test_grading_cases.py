"""Answer-equivalence agreement: public Math-Verify cases, and GSM8K / MATH-500 gold answers.

Data: tests/data (each file's origin and licence in tests/data/README.md), so these run on a fresh clone.
"""

import json
from pathlib import Path

import pytest

from rewards import gsm8k
from rewards import math as math_grader

pytestmark = pytest.mark.integration
DATA = Path(__file__).resolve().parents[1] / "data"
MATH_VERIFY_GRADER = "math_verify (parse gold & pred, verify(gold, pred))"
# Disagreements kept on purpose, by case id, each explained in docs/rewards.md. Empty: none kept.
KNOWN_DISAGREEMENTS: dict[int, str] = {}


def _params(config: dict) -> dict:
    """The math grader's parameters for the Math-Verify test harness settings of one case."""
    params = {}
    if "match_types" in config:
        params["extract"] = tuple(config["match_types"])
    if "precision" in config:
        params["float_rounding"] = int(config["precision"])
    for key in ("strict", "allow_set_relation_comp"):
        if key in config:
            params[key] = config[key]
    return params


def test_math_verify_cases_agree():
    path = DATA / "grader_cases_public.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cases = [row for row in rows if row["grader"] == MATH_VERIFY_GRADER]
    assert len(cases) >= 250
    disagreements = []
    for row in cases:
        result = math_grader.score(row["output"], row["ground_truth"], **_params(row["config"]))
        if (result["acc"] == 1.0) != row["expected"] and row["id"] not in KNOWN_DISAGREEMENTS:
            disagreements.append((row["id"], row["output"][-80:], row["ground_truth"][-80:], row["expected"]))
    agreement = 1 - len(disagreements) / len(cases)
    print(f"math-verify-style cases: {len(cases)}, agreement {agreement:.2%}, disagreements: {disagreements}")
    assert agreement >= 0.99, f"agreement {agreement:.2%}; disagreements (id, output, gold, expected): {disagreements}"
    assert not disagreements, f"undocumented disagreements (add to KNOWN_DISAGREEMENTS + docs): {disagreements}"


def _math500_answers() -> list[str]:
    return [row["answer"] for row in json.loads((DATA / "math500_test.json").read_text())]


def _gsm8k_solutions() -> list[str]:
    """The 1,319 GSM8K test solutions, each ending in its '#### n' line."""
    return [json.loads(line)["answer"] for line in (DATA / "gsm8k_test.jsonl").read_text().splitlines()]


def _gsm8k_answers() -> list[str]:
    """The number after '####' as written (thousands separators kept: '2,125')."""
    return [solution.rsplit("####", 1)[1].strip() for solution in _gsm8k_solutions()]


def _check_gold(answers: list[str], grade) -> None:
    own = [grade(f"The answer is $\\boxed{{{answer}}}$.", answer) for answer in answers]
    assert [a for a, score in zip(answers, own) if score != 1.0] == []
    # "a different problem's answer": the next problem whose answer is a different string
    pairs = []
    for i, answer in enumerate(answers):
        others = (answers[(i + k) % len(answers)] for k in range(1, len(answers)))
        pairs.append((answer, next(other for other in others if other != answer)))
    scored_one = [(gold, other) for gold, other in pairs if grade(f"so \\boxed{{{other}}}", gold) != 0.0]
    rate = 1 - len(scored_one) / len(pairs)
    print(f"{len(pairs)} cross pairs, {rate:.2%} score 0.0; equivalent pairs: {scored_one}")
    assert rate >= 0.995, scored_one


def test_math500_gold_answers():
    _check_gold(_math500_answers(), lambda completion, gold: math_grader.score(completion, gold)["score"])


@pytest.mark.parametrize("grader", [gsm8k, math_grader], ids=["gsm8k", "math"])
def test_gsm8k_gold_answers(grader):
    _check_gold(_gsm8k_answers(), lambda completion, gold: grader.score(completion, gold)["score"])


def test_gsm8k_full_solutions_as_ground_truth():
    """The whole GSM8K solution as the ground truth (its '#### n' line is the answer)."""
    solutions = _gsm8k_solutions()
    answers = [answer.replace(",", "") for answer in _gsm8k_answers()]
    assert len(solutions) == 1319
    for grader in (gsm8k, math_grader):
        scores = [grader.score(f"\\boxed{{{a}}}", solution)["score"] for a, solution in zip(answers, solutions)]
        assert scores.count(1.0) == len(solutions)
