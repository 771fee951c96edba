"""Shared fixtures: a tiny Qwen2 model + BPE tokenizer built once per session, and procedural task rows."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def arithmetic_rows() -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows of 2-digit addition/subtraction; small, deterministic."""
    from rltrain.data.tasks import generate_task

    return generate_task("arithmetic", num_train=512, num_eval=64, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, arithmetic_rows) -> str:
    """HF directory of a randomly initialised tiny Qwen2 model (default tiny params) and its BPE tokenizer.

    The tokenizer is trained on the arithmetic task's text in both prompt templates. Read-only: copy it
    (``shutil.copytree``) before writing into it.
    """
    from rltrain.data.prompts import task_corpus
    from rltrain.models import build_tiny_model

    train, held_out = arithmetic_rows
    out_dir = tmp_path_factory.mktemp("tiny_model") / "model"
    return build_tiny_model(str(out_dir), task_corpus(train + held_out), seed=0)
