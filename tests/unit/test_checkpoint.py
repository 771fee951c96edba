"""Checkpoints: atomic save (also under SIGKILL), latest/resume, pruning, trainer state and RNG round trips."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal

import numpy as np
import pytest
import torch

from rltrain.checkpoint import (
    COMPLETE_MARKER,
    TRAINER_STATE_FILE,
    CheckpointError,
    capture_rng,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)


def write_fake_model(directory: str) -> None:
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(b"weights")
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        f.write("{}")


def entries(run_dir) -> list[str]:
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def test_save_writes_a_complete_step_dir_and_state_round_trips(tmp_path):
    state = {"step": 5, "data": {"epoch": 1, "cursor": 40, "order": [3, 1, 2]}, "note": None, "w": torch.ones(2)}
    path = save_checkpoint(str(tmp_path), 5, write_fake_model, state)
    assert path == checkpoint_dir(str(tmp_path), 5)
    assert sorted(os.listdir(path)) == sorted(["model.safetensors", "config.json", TRAINER_STATE_FILE, COMPLETE_MARKER])
    assert entries(tmp_path) == ["step_5"]
    loaded = load_trainer_state(path)
    assert loaded["data"] == state["data"] and loaded["step"] == 5 and loaded["note"] is None
    assert torch.equal(loaded["w"], state["w"])
    assert latest_checkpoint(str(tmp_path)) == path


def test_a_failing_write_model_leaves_no_step_dir_and_latest_keeps_the_previous(tmp_path):
    previous = save_checkpoint(str(tmp_path), 1, write_fake_model, {"step": 1})

    def crash_midway(directory: str) -> None:
        write_fake_model(directory)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(tmp_path), 2, crash_midway, {"step": 2})
    assert entries(tmp_path) == ["step_1"]
    assert latest_checkpoint(str(tmp_path)) == previous


def _save_until_killed(run_dir: str, ready) -> None:
    def write_then_hang(directory: str) -> None:
        write_fake_model(directory)
        ready.set()
        signal.pause()

    save_checkpoint(run_dir, 2, write_then_hang, {"step": 2})


def test_sigkill_during_save_leaves_only_a_tmp_dir_that_is_ignored_then_removed(tmp_path):
    previous = save_checkpoint(str(tmp_path), 1, write_fake_model, {"step": 1})
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_save_until_killed, args=(str(tmp_path), ready))
    child.start()
    assert ready.wait(timeout=60), "child never reached write_model"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert entries(tmp_path) == [f".tmp-step_2-{child.pid}", "step_1"]

    assert latest_checkpoint(str(tmp_path)) == previous
    assert entries(tmp_path) == ["step_1"]  # the dead writer's tmp dir is cleaned up
    save_checkpoint(str(tmp_path), 2, write_fake_model, {"step": 2})
    assert load_trainer_state(latest_checkpoint(str(tmp_path)))["step"] == 2


def test_tmp_dirs_of_live_writers_are_kept_by_latest_and_own_leftovers_removed_by_save(tmp_path):
    root = tmp_path / "checkpoints"
    live_other = root / f".tmp-step_3-{os.getppid()}"
    own_leftover = root / f".tmp-step_3-{os.getpid()}"
    live_other.mkdir(parents=True)
    own_leftover.mkdir()
    assert latest_checkpoint(str(tmp_path)) is None
    assert live_other.exists() and own_leftover.exists()
    save_checkpoint(str(tmp_path), 3, write_fake_model, {})
    assert entries(tmp_path) == [live_other.name, "step_3"]


def test_incomplete_step_dirs_are_ignored_and_refused(tmp_path):
    save_checkpoint(str(tmp_path), 1, write_fake_model, {"step": 1})
    incomplete = tmp_path / "checkpoints" / "step_9"
    incomplete.mkdir()
    write_fake_model(str(incomplete))
    assert latest_checkpoint(str(tmp_path)) == checkpoint_dir(str(tmp_path), 1)
    with pytest.raises(CheckpointError, match="incomplete"):
        load_trainer_state(str(incomplete))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trainer_state(str(tmp_path / "nope"))


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(str(tmp_path), step, write_fake_model, {"step": step}, keep=2)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [30, 40]
    save_checkpoint(str(tmp_path), 50, write_fake_model, {"step": 50}, keep=1)
    assert entries(tmp_path) == ["step_50"]
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(str(tmp_path), 60, write_fake_model, {}, keep=0)


def test_saving_an_earlier_step_removes_the_replaced_timeline_and_resave_replaces(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(str(tmp_path), step, write_fake_model, {"step": step}, keep=3)
    save_checkpoint(str(tmp_path), 15, write_fake_model, {"step": 15, "timeline": "new"}, keep=3)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [10, 15]
    save_checkpoint(str(tmp_path), 15, write_fake_model, {"step": 15, "timeline": "newer"}, keep=3)
    assert entries(tmp_path) == ["step_10", "step_15"]
    assert load_trainer_state(checkpoint_dir(str(tmp_path), 15))["timeline"] == "newer"


def test_state_that_could_not_be_loaded_safely_is_rejected_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"state\['data'\]\['epoch'\].*numpy"):
        save_checkpoint(str(tmp_path), 1, write_fake_model, {"data": {"epoch": np.int64(3)}})
    assert not os.path.exists(checkpoint_dir(str(tmp_path), 1))


def test_write_model_may_not_write_reserved_names(tmp_path):
    def sneaky(directory: str) -> None:
        open(os.path.join(directory, COMPLETE_MARKER), "w").close()

    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(str(tmp_path), 1, sneaky, {})
    assert entries(tmp_path) == []


def draw_all() -> tuple:
    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's legacy state
    path = save_checkpoint(str(tmp_path), 1, write_fake_model, {"rng": capture_rng()})
    expected = draw_all()

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draw_all() != expected
    restore_rng(load_trainer_state(path)["rng"])
    assert draw_all() == expected


def test_resolve_resume(tmp_path):
    assert resolve_resume(str(tmp_path), "auto") is None
    path = save_checkpoint(str(tmp_path), 4, write_fake_model, {})
    assert resolve_resume(str(tmp_path), "auto") == path
    assert resolve_resume(str(tmp_path), "never") is None
    assert resolve_resume(str(tmp_path / "elsewhere"), path) == path
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path), str(tmp_path))
