"""load_task_data: procedural tasks from the config node, jsonl / json / parquet files, HF datasets."""

from __future__ import annotations

import json
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


def test_bad_json_line_and_bad_prompt_type(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "b", "answer":\n')
    with pytest.raises(DataError, match=rf"{path}:3: not a JSON object"):
        load_task_data(_cfg(task="jsonl", path=str(path), num_eval=1))
    path = _write_jsonl(tmp_path / "int_prompt.jsonl", [{"prompt": 5, "answer": 1}] * 3)
    with pytest.raises(DataError, match=rf"{path}:1: 'prompt' must be a string"):
        load_task_data(_cfg(task="jsonl", path=path, num_eval=1))


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
