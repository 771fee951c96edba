"""Checkpoints: atomic save (also under SIGKILL), latest/resume, pruning, trainer state and RNG round trips."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rltrain.checkpoint import (
    COMPLETE_MARKER,
    TRAINER_STATE_FILE,
    CheckpointError,
    capture_rng,
    check_fingerprint,
    checkpoint_dir,
    checkpoint_problem,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    model_fingerprint,
    resolve_resume,
    restore_rng,
    rows_fingerprint,
    safetensors_problem,
    save_checkpoint,
    torch_zip_problem,
)
from rltrain.errors import RunError
from rltrain.fsutil import storage_reason

MODEL_CONFIG = {"model_type": "qwen2", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 16}


def write_fake_model(directory: str, config: dict | None = None) -> None:
    """What a learner writes: real safetensors weights, an HF config.json and a torch optimizer-state file."""
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config or MODEL_CONFIG, f)
    torch.save({"optimizer": {"step": torch.tensor(3.0)}}, os.path.join(directory, "learner_state.pt"))


def entries(run_dir) -> list[str]:
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def test_save_writes_a_complete_step_dir_and_state_round_trips(tmp_path):
    state = {"step": 5, "data": {"epoch": 1, "cursor": 40, "order": [3, 1, 2]}, "note": None, "w": torch.ones(2)}
    path = save_checkpoint(str(tmp_path), 5, write_fake_model, state)
    assert path == checkpoint_dir(str(tmp_path), 5)
    expected = ["model.safetensors", "config.json", "learner_state.pt", TRAINER_STATE_FILE, COMPLETE_MARKER]
    assert sorted(os.listdir(path)) == sorted(expected)
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


def test_resolve_resume_auto_never_and_a_checkpoint_dir(tmp_path):
    assert resolve_resume(str(tmp_path), "auto") is None
    path = save_checkpoint(str(tmp_path), 4, write_fake_model, {})
    assert resolve_resume(str(tmp_path), "auto") == path
    assert resolve_resume(str(tmp_path), "never") is None
    assert resolve_resume(str(tmp_path / "elsewhere"), path) == path


def test_resolve_resume_of_a_run_dir_is_its_latest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        save_checkpoint(str(run), step, write_fake_model, {}, keep=3)
    (run / "checkpoints" / "step_6").mkdir()  # a cut save
    latest = checkpoint_dir(str(run), 4)
    assert resolve_resume(str(tmp_path / "other"), str(run)) == latest
    assert resolve_resume(str(tmp_path / "other"), str(run / "checkpoints")) == latest
    empty_run = tmp_path / "empty"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="run dir without a complete checkpoint.*run.resume=never"):
        resolve_resume(str(tmp_path), str(empty_run))


def test_resolve_resume_of_an_incomplete_checkpoint_offers_the_newest_complete_one(tmp_path):
    complete = save_checkpoint(str(tmp_path), 2, write_fake_model, {})
    cut = tmp_path / "checkpoints" / "step_4"
    cut.mkdir()
    with pytest.raises(CheckpointError, match=f"step_4 is incomplete \\(no COMPLETE marker.*run.resume={complete}$"):
        resolve_resume(str(tmp_path), str(cut))
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_resume(str(tmp_path), str(tmp_path / "nope"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint .* nor a run dir"):
        resolve_resume(str(tmp_path), str(tmp_path / "plain"))


def truncate(path: str, keep_fraction: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction))


@pytest.mark.parametrize("name", ["model.safetensors", "learner_state.pt", TRAINER_STATE_FILE])
def test_a_truncated_file_is_named_and_the_previous_checkpoint_offered(tmp_path, name, caplog):
    previous = save_checkpoint(str(tmp_path), 1, write_fake_model, {"step": 1})
    latest = save_checkpoint(str(tmp_path), 2, write_fake_model, {"step": 2})
    assert checkpoint_problem(latest) is None
    truncate(os.path.join(latest, name))
    problem = checkpoint_problem(latest)
    assert problem is not None and name in problem
    with pytest.raises(CheckpointError, match=f"{name}.*run.resume={previous}$"):
        resolve_resume(str(tmp_path), latest)
    # auto falls back to the newest sound checkpoint, warning with the corrupt file's name
    assert resolve_resume(str(tmp_path), "auto") == previous
    assert name in caplog.text and "skipping" in caplog.text
    truncate(os.path.join(previous, name))  # none sound: refused rather than silently starting over
    with pytest.raises(CheckpointError, match=f"no complete checkpoint in {tmp_path} is sound.*{name}.*resume=never"):
        resolve_resume(str(tmp_path), "auto")


def test_file_checks_accept_whole_files_and_measure_safetensors_against_the_header(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"a": torch.zeros(5), "b": torch.ones(2, 2)}, path)
    torch.save({"x": torch.zeros(3)}, str(tmp_path / "s.pt"))
    assert safetensors_problem(path) is None and torch_zip_problem(str(tmp_path / "s.pt")) is None
    with open(path, "ab") as f:
        f.write(b"\0" * 4)
    assert "needs" in safetensors_problem(path) and "the file has" in safetensors_problem(path)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    assert "zip" in torch_zip_problem(str(tmp_path / "junk.pt"))


def test_a_fingerprint_mismatch_lists_each_differing_item_and_the_way_out(tmp_path):
    path = save_checkpoint(str(tmp_path), 1, write_fake_model, {})
    saved = {"data.eval": "16 rows sha256:aaaa", "data.train": "256 rows sha256:bbbb", "algorithm.advantage": "grpo"}
    check_fingerprint(path, saved, dict(saved))
    current = {**saved, "data.eval": "32 rows sha256:cccc", "algorithm.advantage": "rloo"}
    with pytest.raises(CheckpointError) as err:
        check_fingerprint(path, saved, current)
    message = str(err.value)
    assert "data.eval: checkpoint 16 rows sha256:aaaa, config 32 rows sha256:cccc" in message
    assert "algorithm.advantage: checkpoint grpo, config rloo" in message
    assert "data.train" not in message and "run.resume=never" in message and "run.dir" in message


def test_a_checkpoint_without_fingerprint_is_checked_on_its_model_architecture(tmp_path, caplog):
    path = save_checkpoint(str(tmp_path), 1, write_fake_model, {})
    model = tmp_path / "model"
    model.mkdir()
    write_fake_model(str(model), {**MODEL_CONFIG, "hidden_size": 16})
    check_fingerprint(path, None, model_fingerprint(path))
    assert "no fingerprint" in caplog.text
    with pytest.raises(CheckpointError, match="model.hidden_size: checkpoint 8, config 16"):
        check_fingerprint(path, None, {**model_fingerprint(str(model)), "data.eval": "1 rows sha256:x"})


def test_rows_fingerprint_counts_rows_and_changes_with_their_content():
    rows = [{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4"}]
    assert rows_fingerprint(rows).startswith("2 rows sha256:")
    assert rows_fingerprint(rows) == rows_fingerprint([dict(reversed(list(r.items()))) for r in rows])
    assert rows_fingerprint(rows) != rows_fingerprint([rows[0], {"question": "2+2", "answer": "5"}])
    assert rows_fingerprint(rows) != rows_fingerprint(rows[::-1])


def write_to_full_disk(directory: str) -> None:
    """A learner writing onto a full disk: /dev/full fails every write with ENOSPC."""
    write_fake_model(directory)
    os.symlink("/dev/full", os.path.join(directory, "optimizer.bin"))
    with open(os.path.join(directory, "optimizer.bin"), "wb") as f:
        f.write(b"x" * 100)
        f.flush()


def test_a_full_disk_names_the_path_and_reason_and_keeps_the_previous_checkpoint(tmp_path):
    previous = save_checkpoint(str(tmp_path), 2, write_fake_model, {"step": 2})
    with pytest.raises(RunError) as err:
        save_checkpoint(str(tmp_path), 4, write_to_full_disk, {"step": 4})
    assert str(err.value) == (
        f"cannot write checkpoint step_4 under {tmp_path / 'checkpoints'}: No space left on device (ENOSPC); "
        "the previous checkpoint step_2 is intact"
    )
    assert entries(tmp_path) == ["step_2"] and checkpoint_problem(previous) is None


def test_unwritable_storage_is_a_run_error_with_the_os_reason(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run dir should be")
    with pytest.raises(
        RunError, match=r"cannot write checkpoint step_1 under .*file/checkpoints: Not a directory \(ENOTDIR\)"
    ):
        save_checkpoint(str(blocker), 1, write_fake_model, {})

    def denied(directory: str) -> None:  # as a learner actor's failure arrives: the OSError is its cause
        raise RuntimeError("the learner's save failed") from PermissionError(13, "Permission denied", directory)

    def broken(directory: str) -> None:
        raise ValueError("not storage")

    with pytest.raises(RunError, match=r"Permission denied \(EACCES\); there is no earlier checkpoint"):
        save_checkpoint(str(tmp_path / "run"), 1, denied, {})
    with pytest.raises(ValueError, match="not storage"):  # any other failure passes unchanged
        save_checkpoint(str(tmp_path / "run"), 1, broken, {})
    assert entries(tmp_path / "run") == []


def test_torchs_unexpected_pos_on_a_nearly_full_disk_reads_as_enospc(tmp_path, monkeypatch):
    def torch_write_failure(directory: str) -> None:
        torch.save({"x": torch.zeros(100_000)}, "/dev/full")  # RuntimeError "unexpected pos", no errno

    with pytest.raises(RuntimeError, match="unexpected pos") as err:
        torch_write_failure(str(tmp_path))
    assert storage_reason(err.value, str(tmp_path)).startswith("the write failed")  # plenty of space here
    full = os.statvfs_result((4096, 4096, 1000, 0, 0, 100, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    with pytest.raises(RunError, match=r"No space left on device \(ENOSPC\)"):
        save_checkpoint(str(tmp_path), 1, torch_write_failure, {})
