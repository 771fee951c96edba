"""The driver around the loop: resume checks before Ray (fingerprint), SIGTERM → checkpoint at the step
boundary and exit 0, the interruption message. The trainer is a stand-in; the real loop runs in
tests/integration/test_quickstart_e2e.py."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import save_file

from rltrain.checkpoint import list_checkpoints, load_trainer_state, save_checkpoint
from rltrain.config import ConfigError, register_configs
from rltrain.driver import _interrupted_message, loop, resume_point, run_fingerprint
from rltrain.prepare import Prepared
from rltrain.run_control import RunStopped, StopSignals
from rltrain.tracking import Tracker, read_metrics


def make_cfg(*overrides: str):
    register_configs()
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        return compose(config_name="quickstart", overrides=list(overrides))


def write_model(directory: str, hidden_size: int = 8) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file({"w": torch.zeros(2, hidden_size)}, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_type": "qwen2", "hidden_size": hidden_size, "num_hidden_layers": 1, "vocab_size": 16}, f)


def make_prep(model_path: str, num_eval: int) -> Prepared:
    rows = [{"question": f"{i}+1", "answer": str(i + 1)} for i in range(64)]
    return Prepared(
        model_path=model_path,
        base_model_path=model_path,
        tokenizer=None,
        train_rows=rows[:32],
        eval_rows=rows[32 : 32 + num_eval],
        train_prompts=[[1]] * 32,
        eval_prompts=[[1]] * num_eval,
        primary_reward="score",
        stop_token_ids=(),
    )


def test_resume_refuses_a_checkpoint_of_another_eval_set_or_model_size_before_ray(tmp_path):
    cfg = make_cfg(f"run.dir={tmp_path / 'run'}")
    model = str(tmp_path / "model")
    write_model(model)
    prep = make_prep(model, num_eval=16)
    state = {"step": 3, "fingerprint": run_fingerprint(cfg, prep)}
    path = save_checkpoint(str(tmp_path / "run"), 3, write_model, state)

    point = resume_point(cfg, prep, str(tmp_path / "run"))
    assert (point.checkpoint, point.step) == (path, 3)

    with pytest.raises(ConfigError) as err:
        resume_point(cfg, make_prep(model, num_eval=32), str(tmp_path / "run"))
    message = str(err.value)
    assert f"checkpoint {path} does not fit this config" in message
    assert "data.eval: checkpoint 16 rows sha256:" in message and ", config 32 rows sha256:" in message
    assert "data.train" not in message and "run.resume=never" in message

    bigger = str(tmp_path / "bigger")
    write_model(bigger, hidden_size=16)
    with pytest.raises(ConfigError, match="model.hidden_size: checkpoint 8, config 16"):
        resume_point(cfg, make_prep(bigger, num_eval=16), str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="algorithm.advantage: checkpoint grpo, config rloo"):
        resume_point(make_cfg(f"run.dir={tmp_path / 'run'}", "algorithm.advantage=rloo"), prep, str(tmp_path / "run"))


class StandInRuntime:
    def save(self, directory: str) -> None:
        write_model(directory)


class StandInTrainer:
    """Steps return fixed metrics; ``sigterm_at`` sends this process SIGTERM in the middle of that step."""

    def __init__(self, prep: Prepared, sigterm_at: int):
        self.prep, self.runtime, self.sigterm_at = prep, StandInRuntime(), sigterm_at
        self.steps_run: list[int] = []

    def step(self, step: int) -> dict[str, float]:
        if step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.steps_run.append(step)
        return {"reward/mean": 0.1 * step}

    def evaluate(self) -> dict[str, float]:
        return {"eval/accuracy": 0.5}

    def state_dict(self) -> dict:
        return {"stream": {"epoch": 0, "position": len(self.steps_run)}, "next_group_id": len(self.steps_run)}


def test_sigterm_finishes_the_step_saves_a_checkpoint_there_and_stops_with_exit_code_0(tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = make_cfg(f"run.dir={run_dir}", "trainer.steps=6", "trainer.save_every=4", "trainer.eval_every=0")
    model = str(tmp_path / "model")
    write_model(model)
    trainer = StandInTrainer(make_prep(model, num_eval=4), sigterm_at=3)
    tracker = Tracker(run_dir, {}, total_steps=6, progress=False)
    with StopSignals() as signals, pytest.raises(RunStopped) as stopped:
        loop(cfg, trainer, tracker, run_dir, 0, {}, signals=signals)
    checkpoint = os.path.join(run_dir, "checkpoints", "step_3")
    assert stopped.value.exit_code == 0
    assert str(stopped.value) == f"stopped by SIGTERM after step 3; checkpoint {checkpoint}"
    assert trainer.steps_run == [1, 2, 3]
    assert list_checkpoints(run_dir) == [(3, checkpoint)]
    assert [r["step"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))] == [0, 1, 2, 3]
    state = load_trainer_state(checkpoint)
    assert state["next_group_id"] == 3 and state["fingerprint"] == run_fingerprint(cfg, trainer.prep)


def test_the_interruption_message_names_the_last_complete_checkpoint(tmp_path):
    run_dir = str(tmp_path / "run")
    assert _interrupted_message(run_dir, 0) == (
        "interrupted at step 1; there is no complete checkpoint yet (a rerun starts over)"
    )
    path = save_checkpoint(run_dir, 4, write_model, {"step": 4})
    assert _interrupted_message(run_dir, 5) == f"interrupted at step 6; the last complete checkpoint is {path} (step 4)"
