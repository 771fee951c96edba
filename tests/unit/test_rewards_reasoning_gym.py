"""``reasoning_gym``: real generated tasks scored by their own verifiers, directly and through the grader pool.

reasoning-gym is in the ``dev`` extra: a missing package fails this module instead of skipping it.
"""

import json
from decimal import Decimal

import pytest
import reasoning_gym as rg
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards import reasoning_gym as grader
from rltrain.grading import RewardGrader

# Tasks with one oracle answer each; countdown's verifier checks the expression's value with SymPy.
NUMERIC_TASKS = ("basic_arithmetic", "chain_sum", "gsm_symbolic", "leg_counting")
TASKS = (*NUMERIC_TASKS, "countdown", "fraction_simplification", "word_sorting")
ODD_COMPLETIONS = [
    "",
    "<answer></answer>",
    "<answer>   </answer>",
    "<answer>" * 1000,
    "</answer><answer>",
    "<answer>\x00\x01\x7f</answer>",
    "<answer>\ud800 surrogate</answer>",
    "<answer>((((((</answer>",
    "<answer>1/0</answer>",
    "<answer>nan</answer>",
    "<answer>-inf</answer>",
    "<answer>**</answer>",
    "<answer>[[1, 2], {}]</answer>",
    "<answer>" + "9" * 5000 + "</answer>",
    "<answer>é 答案 🙂</answer>",
]


def _entries(task: str, size: int = 3) -> list[dict]:
    return list(rg.create_dataset(task, size=size, seed=7))


def _wrong(entry: dict) -> str:
    """A wrong answer that does not contain the oracle (the default verifier credits a containing answer)."""
    task = entry["metadata"]["source_dataset"]
    if task in NUMERIC_TASKS:
        return str(Decimal(entry["answer"]) + 1)
    return {"countdown": "1 + 1", "fraction_simplification": "0/1", "word_sorting": "zz"}[task]


@pytest.mark.parametrize("task", TASKS)
def test_correct_answer_scores_one_and_wrong_answer_scores_zero(task):
    for entry in _entries(task):
        assert grader.score(f"<think>...</think>\n<answer>{entry['answer']}</answer>", entry["answer"], **entry) == {
            "score": 1.0,
            "acc": 1.0,
        }
        assert grader.score(f"<answer>{_wrong(entry)}</answer>", entry["answer"], **entry) == {"score": 0.0, "acc": 0.0}
        assert grader.score("no tags at all", entry["answer"], **entry) == {"score": 0.0, "acc": 0.0}


@pytest.mark.parametrize("task", TASKS)
def test_format_credit_is_kept_only_when_asked(task):
    for entry in _entries(task):
        credited = grader.score(f"<answer>{_wrong(entry)}</answer>", entry["answer"], format_credit=True, **entry)
        assert credited["acc"] == 0.0 and 0.0 <= credited["score"] <= grader.FORMAT_CREDIT_MAX
    if task == "countdown":  # its verifier: 0.05 for a wrong expression, 0.01 for one it cannot parse
        assert credited["score"] == 0.05
        assert grader.score("<answer>((</answer>", entry["answer"], format_credit=True, **entry)["score"] == 0.01


def test_partial_credit_above_the_format_credit_is_kept_with_acc_zero():
    entry = _entries("word_sorting", size=1)[0]
    words = entry["metadata"]["sorted_words"]
    in_place = len(words) // 2
    half_in_place = ", ".join(words[:in_place] + ["zz"] * (len(words) - in_place))
    result = grader.score(f"<answer>{half_in_place}</answer>", entry["answer"], **entry)
    assert result == {"score": in_place / len(words), "acc": 0.0} and result["score"] > grader.FORMAT_CREDIT_MAX


@pytest.mark.parametrize("task", TASKS)
def test_odd_completions_score_in_range_and_never_raise(task):
    entry = _entries(task, size=1)[0]
    for completion in [*ODD_COMPLETIONS, 42, None]:
        for format_credit in (False, True):
            result = grader.score(completion, entry["answer"], format_credit=format_credit, **entry)
            assert 0.0 <= result["score"] <= 1.0 and result["acc"] in (0.0, 1.0), (completion, result)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=200), st.sampled_from(["basic_arithmetic", "gsm_symbolic", "word_sorting"]))
def test_random_text_in_tags_never_raises(text, task):
    entry = rg.create_dataset(task, size=1, seed=1)[0]
    result = grader.score(f"<answer>{text}</answer>", entry["answer"], format_credit=True, **entry)
    assert 0.0 <= result["score"] <= 1.0 and result["acc"] == float(result["score"] == 1.0)


def test_metadata_may_be_a_json_string():
    entry = _entries("countdown", size=1)[0]
    fields = {**entry, "metadata": json.dumps(entry["metadata"])}
    assert grader.score(f"<answer>{entry['answer']}</answer>", entry["answer"], **fields)["acc"] == 1.0


def test_answer_tag_false_reads_the_whole_completion():
    entry = _entries("basic_arithmetic", size=1)[0]
    assert grader.score(f"  {entry['answer']} ", entry["answer"], answer_tag=False, **entry)["acc"] == 1.0
    assert grader.score(f"<answer>{entry['answer']}</answer>", entry["answer"], answer_tag=False, **entry)["acc"] == 0


def test_task_parameter_overrides_the_metadata():
    entry = _entries("chain_sum", size=1)[0]
    fields = {**entry, "metadata": {**entry["metadata"], "source_dataset": "no_such_task"}}
    assert grader.score(f"<answer>{entry['answer']}</answer>", entry["answer"], task="chain_sum", **fields)["acc"] == 1


def test_answer_in_tags_is_the_last_pair():
    assert grader.answer_in_tags("<answer>1</answer> <answer> 2 </answer>") == "2"
    assert grader.answer_in_tags("<answer>" * 10_000) is None


def test_task_is_required_and_checked_at_start_up():
    with pytest.raises(ValueError, match="source_dataset"):
        grader.score("<answer>1</answer>", "1")
    with pytest.raises(ValueError, match="no_such_task"):
        grader.validate_params({"task": "no_such_task"})


def test_graded_through_the_pool_with_dataset_columns():
    """Rows as a dataset gives them (answer, question, metadata, other columns): the pool passes the grader only
    its columns; an answer its verifier would compute for ever (``9**9**9`` in countdown) scores 0 at once."""
    entries = [entry for task in ("gsm_symbolic", "countdown", "word_sorting") for entry in _entries(task, size=2)]
    rows = [{**entry, "id": f"row {i}", "task": "rg"} for i, entry in enumerate(entries)]
    completions = [f"<answer>{entry['answer']}</answer>" for entry in entries]
    wrong = [f"<answer>{_wrong(entry)}</answer>" for entry in entries]
    countdown = next(row for row in rows if row["metadata"]["source_dataset"] == "countdown")
    options = {"num_workers": 2, "timeout_s": 3.0, "on_error": -1.0, "max_error_frac": 1.0}
    with RewardGrader([{"fn": "reasoning_gym"}], **options) as pool:
        result = pool.grade(completions + wrong + ["<answer>9**9**9</answer>"], rows + rows + [countdown])
    assert result.rewards.tolist() == [1.0] * len(rows) + [0.0] * len(rows) + [0.0]
    assert result.metrics["reward/errors/timeout"] == 0 and result.metrics["reward/errors/exception"] == 0
