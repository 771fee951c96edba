"""``reasoning_gym``: a task's own verifier, answer tags, format credit (skipped without the package)."""

import json

import pytest

rg = pytest.importorskip("reasoning_gym")
from rewards import reasoning_gym as grader  # noqa: E402


@pytest.fixture(scope="module")
def entry():
    return rg.create_dataset("basic_arithmetic", size=1, seed=0)[0]


def test_correct_answer_in_tags_scores_one(entry):
    result = grader.score(f"<think>...</think><answer>{entry['answer']}</answer>", entry["answer"], **entry)
    assert result == {"score": 1.0, "acc": 1.0}


def test_metadata_may_be_a_json_string(entry):
    fields = {**entry, "metadata": json.dumps(entry["metadata"])}
    assert grader.score(f"<answer>{entry['answer']}</answer>", entry["answer"], **fields)["acc"] == 1.0


def test_wrong_or_missing_answer_scores_zero_without_format_credit(entry):
    assert grader.score("<answer>not it</answer>", entry["answer"], **entry)["score"] == 0.0
    assert grader.score("no tags at all", entry["answer"], **entry)["score"] == 0.0


def test_answer_tag_false_reads_the_whole_completion(entry):
    assert grader.score(f"  {entry['answer']} ", entry["answer"], answer_tag=False, **entry)["acc"] == 1.0


def test_answer_in_tags_is_the_last_pair():
    assert grader.answer_in_tags("<answer>1</answer> <answer> 2 </answer>") == "2"
    assert grader.answer_in_tags("<answer>" * 10_000) is None


def test_task_is_required_and_checked_at_start_up():
    with pytest.raises(ValueError, match="source_dataset"):
        grader.score("<answer>1</answer>", "1")
    with pytest.raises(Exception):  # noqa: B017 - reasoning-gym's own error for an unknown task
        grader.validate_params({"task": "no_such_task"})
