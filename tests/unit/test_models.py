"""The tiny model and its tokenizer: offline save/reload, exact round-trips, determinism, resolve_model."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rltrain.config import ConfigError
from rltrain.data.prompts import render_completion, render_prompt, task_corpus
from rltrain.data.tasks import generate_task
from rltrain.models import (
    EOS_TOKEN,
    IM_END,
    IM_START,
    build_tiny_model,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}


def test_tiny_model_reloads_offline_as_qwen2(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == 512 and len(tokenizer) <= 512
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.convert_tokens_to_ids([EOS_TOKEN, IM_START, IM_END]) == [0, 1, 2]
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == EOS_TOKEN
    assert set(model.generation_config.eos_token_id) == {0, 2}
    ids = tokenizer("23+58=", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 512)


def test_tokenizer_round_trips_task_text_exactly(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    countdown_train, _ = generate_task("countdown", num_train=50, num_eval=5, seed=3)
    texts = ["-18", "Hello  wörld\n\n\t😀 (x)", f"{IM_START}user\n2+2={IM_END}\n"]
    for row in countdown_train:
        for template in ("plain", "chat"):
            texts.append(render_prompt(row, tokenizer, template) + render_completion(row, tokenizer, template))
    for text in texts:
        assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_digits_are_one_token_each(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.tokenize("12345+678=") == ["1", "2", "3", "4", "5", "+", "6", "7", "8", "="]


def test_chat_template_renders_chatml(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    row = {"prompt": "2+2=", "solution": "4"}
    assert render_prompt(row, tokenizer, "chat", "Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_completion(row, tokenizer, "chat") == "4<|im_end|>"


def test_build_is_deterministic_and_seeded(tmp_path):
    corpus = list(task_corpus(generate_task("arithmetic", num_train=200, num_eval=10, seed=0)[0]))
    dirs = [build_tiny_model(str(tmp_path / name), corpus, seed=seed, **SMALL) for name, seed in (("a", 0), ("b", 0))]
    other = build_tiny_model(str(tmp_path / "c"), corpus, seed=1, **SMALL)
    with open(os.path.join(dirs[0], "tokenizer.json")) as a, open(os.path.join(dirs[1], "tokenizer.json")) as b:
        assert a.read() == b.read()
    weights = [load_file(os.path.join(d, "model.safetensors")) for d in (*dirs, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["model.embed_tokens.weight"], weights[2]["model.embed_tokens.weight"])


def test_build_replaces_existing_dir_without_leftovers(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build_tiny_model(str(out), ["1+1=2"], **SMALL)
    assert not (out / "stale.txt").exists()
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_bad_tiny_shapes_raise():
    with pytest.raises(ValueError, match="num_heads"):
        build_tiny_model("/nonexistent/never-written", ["x"], hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_model("/nonexistent/never-written", ["x"], vocab_size=100)


def test_resolve_tiny_builds_once_then_reuses(tmp_path, monkeypatch):
    calls = []

    def corpus():
        calls.append(1)
        return ["12+34=46", "5-7=-2"]

    first = resolve_model("tiny", str(tmp_path), dict(SMALL), corpus)
    assert os.path.isfile(os.path.join(first, "config.json"))

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached tiny model should have been reused")

    monkeypatch.setattr("rltrain.models.build_tiny_model", no_rebuild)
    assert resolve_model("tiny", str(tmp_path), dict(SMALL), corpus) == first
    monkeypatch.undo()
    different_corpus = resolve_model("tiny", str(tmp_path), dict(SMALL), lambda: ["9*9=81"])
    different_params = resolve_model("tiny", str(tmp_path), {**SMALL, "seed": 1}, corpus)
    assert len({first, different_corpus, different_params}) == 3
    assert len(calls) == 3
    assert resolve_model("tiny", str(tmp_path), {**SMALL, "seed": 0, "vocab_size": 512}, corpus) == first
    with pytest.raises(ConfigError, match=r"model.tiny: unknown parameter\(s\) \['depth'\]"):
        resolve_model("tiny", str(tmp_path), {"depth": 3}, corpus)


def test_resolve_local_dir(tiny_model_dir, tmp_path):
    assert resolve_model(tiny_model_dir, str(tmp_path), {}, lambda: []) == tiny_model_dir
    with pytest.raises(ConfigError, match="config.json"):
        resolve_model(str(tmp_path), str(tmp_path), {}, lambda: [])
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_model(str(tmp_path / "missing"), str(tmp_path), {}, lambda: [])


def test_resolve_hub_name_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"model.path=nobody/no-such-model: not a local directory"):
        resolve_model("nobody/no-such-model", str(tmp_path), {}, lambda: [])


def test_load_causal_lm_dtype(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir, "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(tiny_model_dir, "float8")
