"""load_task_data: procedural tasks from the config node, jsonl / json / parquet files, HF datasets."""

from __future__ import annotations

import json
import struct
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from rltrain.config import ConfigError, DataConfig
from rltrain.data import DataError, generate_task, load_task_data


def _cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), overrides)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _gsm8k_like(n):
    return [{"question": f"q{i}?", "answer": f"work\n#### {i}", "level": i % 3} for i in range(n)]


def test_procedural_task_from_config_node():
    cfg = _cfg(task="countdown", num_train=40, num_eval=8, seed=5, task_params={"max_number": 9})
    train, held_out = load_task_data(cfg)
    assert (train, held_out) == generate_task("countdown", 40, 8, seed=5, max_number=9)
    assert all(n <= 9 for row in train for n in row["answer"]["numbers"])


def test_jsonl_maps_keys_keeps_fields_and_holds_out_last_rows(tmp_path):
    path = _write_jsonl(tmp_path / "gsm.jsonl", _gsm8k_like(10))
    train, held_out = load_task_data(
        _cfg(task="jsonl", path=path, prompt_key="question", answer_key="answer", num_train=5, num_eval=3)
    )
    assert [row["prompt"] for row in train] == ["q0?", "q1?", "q2?", "q3?", "q4?"]
    assert [row["prompt"] for row in held_out] == ["q7?", "q8?", "q9?"]
    assert held_out[0]["answer"] == "work\n#### 7" and held_out[0]["level"] == 1
    assert held_out[0]["task"] == "gsm" and held_out[0]["id"] == f"{path}:8"


def test_json_array_file_and_chat_message_prompts(tmp_path):
    records = [{"prompt": [{"role": "user", "content": f"p{i}"}], "label": str(i)} for i in range(4)]
    path = tmp_path / "dapo.json"
    path.write_text(json.dumps(records, indent=2))
    train, held_out = load_task_data(_cfg(task="jsonl", path=str(path), answer_key="label", num_eval=1))
    assert len(train) == 3 and held_out[0]["answer"] == "3"
    assert held_out[0]["prompt"] == [{"role": "user", "content": "p3"}]


def test_parquet(tmp_path):
    path = str(tmp_path / "rows.parquet")
    pq.write_table(pa.Table.from_pylist(_gsm8k_like(6)), path)
    train, held_out = load_task_data(_cfg(task="parquet", path=path, prompt_key="question", num_eval=2))
    assert [row["prompt"] for row in held_out] == ["q4?", "q5?"] and len(train) == 4
    assert held_out[1]["id"] == f"{path}:row 6"


def test_missing_key_names_file_line_and_key(tmp_path):
    records = _gsm8k_like(5)
    del records[2]["answer"]
    path = _write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError, match=rf"{path}:3: missing key 'answer'"):
        load_task_data(_cfg(task="jsonl", path=path, prompt_key="question", num_eval=1))
    with pytest.raises(DataError, match=rf"{path}:1: missing key 'prompt'"):
        load_task_data(_cfg(task="jsonl", path=path, num_eval=1))


def test_dotted_answer_key_reads_a_nested_field(tmp_path):
    records = [{"prompt": f"p{i}", "reward_model": {"ground_truth": str(i), "style": "rule"}} for i in range(4)]
    path = _write_jsonl(tmp_path / "verl_style.jsonl", records)
    train, held_out = load_task_data(_cfg(task="jsonl", path=path, answer_key="reward_model.ground_truth", num_eval=1))
    assert [row["answer"] for row in train + held_out] == ["0", "1", "2", "3"]
    with pytest.raises(DataError, match=rf"{path}:1: missing key 'reward_model.label'"):
        load_task_data(_cfg(task="jsonl", path=path, answer_key="reward_model.label", num_eval=1))


def test_bad_json_line_and_bad_prompt_type(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "b", "answer":\n')
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON \(Expecting value at column 26\)$"):
        load_task_data(_cfg(task="jsonl", path=str(path), num_eval=1))
    path = _write_jsonl(tmp_path / "int_prompt.jsonl", [{"prompt": 5, "answer": 1}] * 3)
    with pytest.raises(DataError, match=rf"{path}:1: 'prompt' must be a string"):
        load_task_data(_cfg(task="jsonl", path=path, num_eval=1))


def test_bad_json_array_names_its_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "a", "answer": 1},\n  {"prompt": "b" "answer": 2}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON array \(Expecting ',' delimiter at column 18\)$"):
        load_task_data(_cfg(task="jsonl", path=str(path), num_eval=1))


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_non_utf8_bytes_name_file_line_byte_and_column(tmp_path, suffix):
    path = tmp_path / f"latin1.{suffix}"
    lines = ['{"prompt": "a", "answer": 1},', '{"prompt": "caf\xe9", "answer": 2}']
    text = "[\n" + "\n".join(lines) + "\n]\n" if suffix == "json" else "\n".join(lines) + "\n"
    path.write_bytes(text.encode("latin-1"))
    line = 3 if suffix == "json" else 2
    message = rf"^{path}:{line}: not UTF-8 \(byte 0xe9 at column 16\); save the file as UTF-8$"
    with pytest.raises(DataError, match=message) as raised:
        load_task_data(_cfg(task="jsonl", path=str(path), num_eval=1))
    assert isinstance(raised.value, ConfigError)  # the CLI reports it as a config error (exit 2)


def test_utf8_byte_order_mark_is_accepted_and_not_counted_in_columns(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "answer": 1}\n{"prompt": "b", "answer": 2}\n')
    train, held_out = load_task_data(_cfg(task="jsonl", path=str(path), num_eval=1))
    assert [row["prompt"] for row in train + held_out] == ["a", "b"]
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}:1: not UTF-8 \(byte 0xff at column 13\)"):
        load_task_data(_cfg(task="jsonl", path=str(path), num_eval=1))


def test_parquet_text_that_is_not_utf8_names_row_and_column(tmp_path):
    """pyarrow writes and reads such a file without checking; only converting the value fails."""
    values = b"abc" + b"q\xff?" + b"xy"
    offsets = pa.py_buffer(struct.pack("<4i", 0, 3, 6, 8))
    prompts = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(values)])
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"prompt": prompts, "answer": ["1", "2", "3"]}), path)
    message = rf"^{path}:row 2: column 'prompt' is not UTF-8 \(byte 0xff at offset 1 of the value\)$"
    with pytest.raises(DataError, match=message):
        load_task_data(_cfg(task="parquet", path=path, num_eval=1))


def test_missing_file_and_too_few_rows(tmp_path):
    with pytest.raises(ConfigError, match="data.path='/no/such/file.jsonl': no such file"):
        load_task_data(_cfg(task="jsonl", path="/no/such/file.jsonl"))
    path = _write_jsonl(tmp_path / "small.jsonl", [{"prompt": "a", "answer": 1}] * 3)
    with pytest.raises(DataError, match="3 rows, but data.num_eval=3"):
        load_task_data(_cfg(task="jsonl", path=path, num_eval=3))
    not_parquet = _write_jsonl(tmp_path / "x.parquet", [{"prompt": "a"}])
    with pytest.raises(DataError, match="cannot read as parquet"):
        load_task_data(_cfg(task="parquet", path=not_parquet))


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ConfigError, match="pip install datasets"):
        load_task_data(_cfg(task="hf", path="openai/gsm8k:main"))


def test_hf_dataset_by_name_maps_rows(monkeypatch):
    calls = []

    def load_dataset(repo, config_name, split):
        calls.append((repo, config_name, split))
        if repo == "offline/missing":
            raise ConnectionError("hub unreachable")
        return _gsm8k_like(5)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    train, held_out = load_task_data(
        _cfg(task="hf", path="openai/gsm8k:main", hf_split="test", prompt_key="question", num_eval=2)
    )
    assert calls == [("openai/gsm8k", "main", "test")]
    assert len(train) == 3 and held_out[-1]["prompt"] == "q4?" and held_out[-1]["id"] == "openai/gsm8k:main[test] row 5"
    with pytest.raises(ConfigError, match="data.path=offline/missing: cannot load HF dataset split 'train'"):
        load_task_data(_cfg(task="hf", path="offline/missing"))
