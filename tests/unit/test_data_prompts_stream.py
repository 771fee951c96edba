"""Prompt templates, the BPE corpus, and the resumable prompt stream."""

from __future__ import annotations

import types
from collections import Counter

import pytest

from rltrain.data import PromptStream, render_completion, render_prompt, task_corpus

ROW = {"prompt": "23+58=", "answer": 81, "solution": "81", "id": "r0"}
PLAIN_TOKENIZER = types.SimpleNamespace(eos_token="<eos>", chat_template=None)


def test_plain_template_is_the_question_as_is():
    assert render_prompt(ROW, PLAIN_TOKENIZER) == "23+58="
    assert render_prompt(ROW, PLAIN_TOKENIZER, "plain", system_prompt="Add.") == "Add.\n23+58="
    assert render_completion(ROW, PLAIN_TOKENIZER) == "81<eos>"
    messages = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]}
    assert render_prompt(messages, PLAIN_TOKENIZER) == "S\n\nQ"


def test_template_errors_are_clear():
    with pytest.raises(ValueError, match="has no chat_template"):
        render_prompt(ROW, PLAIN_TOKENIZER, "chat")
    with pytest.raises(ValueError, match="template='fancy'"):
        render_prompt(ROW, PLAIN_TOKENIZER, "fancy")
    with pytest.raises(KeyError, match="no 'solution'"):
        render_completion({"prompt": "x", "id": "r9"}, PLAIN_TOKENIZER)


def test_chat_template_with_message_list_prompt(tiny_model_dir):
    from rltrain.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    row = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "solution": "A"}
    prompt = render_prompt(row, tokenizer, "chat", system_prompt="ignored: the row has its own system turn")
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert render_completion(row, tokenizer, "chat") == "A<|im_end|>"


def test_task_corpus_covers_both_templates_deterministically():
    rows = [ROW, {"prompt": "1-2=", "solution": "-1"}]
    corpus = list(task_corpus(rows, system_prompt="Sys"))
    assert corpus == list(task_corpus(rows, system_prompt="Sys"))
    for text in ("23+58=", "81", "23+58=81", "user\n23+58=", "assistant\n81", "system\nSys", "assistant\n-1"):
        assert text in corpus
    assert not any("<|" in text for text in corpus)


def _rows(n):
    return [{"prompt": f"p{i}", "id": str(i)} for i in range(n)]


def test_each_epoch_visits_every_row_once_in_a_new_order():
    stream = PromptStream(_rows(10), batch_size=4, seed=3)
    seen = [row["id"] for _ in range(5) for row in stream.next_batch()]  # 20 rows = 2 epochs
    first, second = seen[:10], seen[10:]
    assert Counter(first) == Counter(second) == Counter(str(i) for i in range(10))
    assert first != second
    assert stream.state_dict() == {"epoch": 1, "position": 10, "seed": 3, "num_rows": 10}


def test_same_seed_same_stream_other_seed_differs():
    def take(seed):
        stream = PromptStream(_rows(50), batch_size=8, seed=seed)
        return [row["id"] for _ in range(3) for row in stream.next_batch()]

    assert take(1) == take(1) != take(2)


def test_batch_larger_than_the_data_spans_epochs():
    batch = PromptStream(_rows(3), batch_size=7, seed=0).next_batch()
    assert len(batch) == 7 and Counter(row["id"] for row in batch[:6]) == Counter({"0": 2, "1": 2, "2": 2})


def test_state_round_trip_resumes_with_the_same_prompts():
    uninterrupted = PromptStream(_rows(13), batch_size=5, seed=9)
    expected = [uninterrupted.next_batch() for _ in range(8)]
    first = PromptStream(_rows(13), batch_size=5, seed=9)
    for _ in range(3):
        first.next_batch()
    state = first.state_dict()
    resumed = PromptStream(_rows(13), batch_size=5, seed=12345)  # the saved seed wins
    resumed.load_state_dict(dict(state))
    assert [resumed.next_batch() for _ in range(5)] == expected[3:]


def test_batches_are_copies():
    rows = _rows(2)
    stream = PromptStream(rows, batch_size=1, seed=0)
    stream.next_batch()[0]["reward"] = 1.0
    assert all("reward" not in row for row in rows)


def test_bad_state_and_arguments_raise():
    stream = PromptStream(_rows(4), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="saved with 5 rows but the data now has 4"):
        stream.load_state_dict({"epoch": 0, "position": 1, "seed": 0, "num_rows": 5})
    with pytest.raises(ValueError, match="invalid prompt stream state"):
        stream.load_state_dict({"epoch": 0, "position": 9, "seed": 0})
    with pytest.raises(ValueError, match="at least one row"):
        PromptStream([], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        PromptStream(_rows(2), batch_size=0)
