"""Checkpoints: ``<run_dir>/checkpoints/step_N/`` written atomically, found, pruned, and the driver's RNG state.

A checkpoint is built in ``checkpoints/.tmp-step_N-<pid>/``: the learner writes the HF model dir and its
optimizer state there (``write_model``), then ``trainer_state.pt`` (step, data position, RNG, ...) and last a
``COMPLETE`` marker; everything is fsynced and the directory is renamed to ``step_N`` in one ``os.rename``. So a
run killed at any moment leaves either a complete ``step_N`` or a ``.tmp-*`` dir, which ``latest_checkpoint``
ignores and the next save removes. Old checkpoints are removed by renaming them back to ``.tmp-*`` first, so a
kill during deletion never leaves a half-deleted ``step_N`` behind. One run dir has one writing process.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from rltrain.tracking import fsync_dir

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE_FILE = "trainer_state.pt"

# What trainer_state.pt may hold: it is loaded with torch.load(weights_only=True), which refuses arbitrary
# pickled objects (so loading a checkpoint never runs code); checking at save time fails fast instead of at resume.
STATE_LEAF_TYPES = (type(None), bool, int, float, str, bytes, torch.Tensor)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the path."""


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS_DIR, f"{STEP_PREFIX}{step}")


def is_complete(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, COMPLETE_MARKER))


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run as ``(step, path)``, ascending by step; incomplete and ``.tmp-*`` are ignored."""
    root = os.path.join(run_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        suffix = name[len(STEP_PREFIX) :]
        path = os.path.join(root, name)
        if name.startswith(STEP_PREFIX) and suffix.isdigit() and is_complete(path):
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    """The complete checkpoint with the highest step, or ``None``. Removes ``.tmp-*`` dirs left by dead processes."""
    remove_stale_tmp_dirs(os.path.join(run_dir, CHECKPOINTS_DIR), own_pid_is_stale=False)
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_resume(run_dir: str, resume: str) -> str | None:
    """``run.resume`` to a checkpoint dir: ``auto`` → latest complete one (or ``None``), ``never`` → ``None``,
    anything else must be a complete checkpoint dir."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = os.path.expanduser(resume)
    if not is_complete(path):
        raise CheckpointError(f"run.resume={resume!r} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    return path


def save_checkpoint(
    run_dir: str,
    step: int,
    write_model: Callable[[str], None],
    state: Mapping[str, Any],
    *,
    keep: int = 2,
) -> str:
    """Write ``checkpoints/step_<step>/`` atomically and prune; return its path.

    ``write_model(dir)`` writes the HF model (and optimizer state) into the temporary dir. ``state`` is saved as
    ``trainer_state.pt`` and may hold only dicts / lists / tuples of None, bool, int, float, str, bytes and
    tensors (``TypeError`` naming the entry otherwise). After saving, the ``keep`` newest checkpoints up to
    ``step`` stay; checkpoints after ``step`` belong to a timeline this run has replaced and are removed.
    If ``write_model`` raises, the temporary dir is removed and the error propagates; no ``step_N`` appears.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep (trainer.keep_checkpoints) must be an int >= 1, got {keep!r}")
    check_state_types(state)
    root = os.path.join(run_dir, CHECKPOINTS_DIR)
    os.makedirs(root, exist_ok=True)
    remove_stale_tmp_dirs(root, own_pid_is_stale=True)

    tmp_dir = os.path.join(root, f"{TMP_PREFIX}{STEP_PREFIX}{step}-{os.getpid()}")
    os.makedirs(tmp_dir)
    try:
        _fill_checkpoint(tmp_dir, step, write_model, state)
        final_dir = checkpoint_dir(run_dir, step)
        _move_into_place(tmp_dir, final_dir, root)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep=keep, newest_step=step)
    return final_dir


def _fill_checkpoint(tmp_dir: str, step: int, write_model: Callable[[str], None], state: Mapping[str, Any]) -> None:
    write_model(tmp_dir)
    for reserved in (TRAINER_STATE_FILE, COMPLETE_MARKER):
        if os.path.exists(os.path.join(tmp_dir, reserved)):
            raise CheckpointError(f"write_model wrote {reserved!r} into {tmp_dir}; that name is reserved")
    torch.save(dict(state), os.path.join(tmp_dir, TRAINER_STATE_FILE))
    _fsync_tree(tmp_dir)
    marker = os.path.join(tmp_dir, COMPLETE_MARKER)
    with open(marker, "w", encoding="utf-8") as f:
        f.write(json.dumps({"step": step}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp_dir)


def _move_into_place(tmp_dir: str, final_dir: str, root: str) -> None:
    """Rename the finished tmp dir to ``step_N``; an existing ``step_N`` (a replaced timeline) is moved aside."""
    replaced = None
    if os.path.exists(final_dir):
        replaced = os.path.join(root, f"{TMP_PREFIX}replaced-{os.path.basename(final_dir)}-{os.getpid()}")
        os.rename(final_dir, replaced)
    os.rename(tmp_dir, final_dir)
    fsync_dir(root)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def prune_checkpoints(run_dir: str, *, keep: int, newest_step: int) -> list[str]:
    """Remove complete checkpoints after ``newest_step`` and all but the ``keep`` newest up to it; return paths."""
    checkpoints = list_checkpoints(run_dir)
    superseded = [(step, path) for step, path in checkpoints if step > newest_step]
    current = [(step, path) for step, path in checkpoints if step <= newest_step]
    doomed = superseded + current[:-keep]
    if superseded:
        logger.warning("removing checkpoints after step %d from a replaced run: %s", newest_step, superseded)
    root = os.path.join(run_dir, CHECKPOINTS_DIR)
    for _, path in doomed:
        # Rename first (atomic): a kill during rmtree leaves a .tmp-* dir, never a half-deleted step_N.
        trash = os.path.join(root, f"{TMP_PREFIX}pruned-{os.path.basename(path)}-{os.getpid()}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        fsync_dir(root)
    return [path for _, path in doomed]


def remove_stale_tmp_dirs(root: str, *, own_pid_is_stale: bool) -> list[str]:
    """Remove ``.tmp-*`` dirs whose writer process is gone; return their paths.

    The writer's pid ends the name. A dir carrying this process's own pid is stale when ``own_pid_is_stale``
    (at save time: saves are sequential, so it can only be left from an earlier process that had the same pid).
    """
    if not os.path.isdir(root):
        return []
    removed = []
    for name in os.listdir(root):
        if not name.startswith(TMP_PREFIX):
            continue
        pid_text = name.rsplit("-", 1)[-1]
        pid = int(pid_text) if pid_text.isdigit() else -1
        own = pid == os.getpid()
        if (own and own_pid_is_stale) or (not own and not _pid_alive(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(os.path.join(root, name))
    if removed:
        logger.info("removed leftovers of interrupted checkpoint saves: %s", removed)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync_tree(directory: str) -> None:
    for parent, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(parent)


def check_state_types(value: Any, where: str = "state") -> None:
    """Raise ``TypeError`` naming the first entry that ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise TypeError(f"{where} has key {key!r} of type {type(key).__name__}; use str or int keys")
            check_state_types(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_state_types(item, f"{where}[{index}]")
    elif not isinstance(value, STATE_LEAF_TYPES):
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__name__}; trainer state holds only dicts, lists, "
            "tuples, None, bool, int, float, str, bytes and tensors (convert numpy values with .tolist() / int())"
        )


def load_trainer_state(ckpt_dir: str) -> dict[str, Any]:
    """Read ``trainer_state.pt`` of a complete checkpoint (tensors on CPU)."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint dir {ckpt_dir} does not exist")
    if not is_complete(ckpt_dir):
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete (no {COMPLETE_MARKER} marker): its save was cut")
    path = os.path.join(ckpt_dir, TRAINER_STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {err}") from err


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python ``random``, numpy global, torch CPU, and CUDA when available).

    Only the global generators: a component with its own ``np.random.Generator`` or ``torch.Generator`` saves
    that state itself. Values are plain types and tensors, valid for ``save_checkpoint``'s ``state``.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": (version, tuple(internal), gauss_next),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore the generators captured by ``capture_rng``; a part missing from ``state`` is left as it is."""
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    if "numpy" in state:
        numpy_state = state["numpy"]
        keys = np.asarray(numpy_state["keys"].numpy(), dtype=np.uint32)
        np.random.set_state(
            (numpy_state["name"], keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state:
        _restore_cuda_rng(state["cuda"])


def _restore_cuda_rng(cuda_states: list[torch.Tensor]) -> None:
    if not torch.cuda.is_available():
        logger.warning("checkpoint has CUDA RNG state but CUDA is not available here; CUDA RNG not restored")
        return
    count = torch.cuda.device_count()
    if count != len(cuda_states):
        logger.warning(
            "checkpoint has CUDA RNG state for %d devices, %d visible; restoring the common ones",
            len(cuda_states),
            count,
        )
    for device, device_state in enumerate(cuda_states[:count]):
        torch.cuda.set_rng_state(device_state.cpu(), device)
