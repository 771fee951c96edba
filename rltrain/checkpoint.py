"""Checkpoints: ``<run_dir>/checkpoints/step_N/`` written atomically, found, pruned, and the driver's RNG state.

A checkpoint is built in ``checkpoints/.tmp-step_N-<pid>/``: the learner writes the HF model dir and its
optimizer state there (``write_model``), then ``trainer_state.pt`` (step, data position, RNG, ...) and last a
``COMPLETE`` marker; everything is fsynced and the directory is renamed to ``step_N`` in one ``os.rename``. So a
run killed at any moment leaves either a complete ``step_N`` or a ``.tmp-*`` dir, which ``latest_checkpoint``
ignores and the next save removes. Old checkpoints are removed by renaming them back to ``.tmp-*`` first, so a
kill during deletion never leaves a half-deleted ``step_N`` behind. One run dir has one writing process
(``rltrain.run_control.RunDirLock``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import struct
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rltrain.config import ConfigError
from rltrain.fsutil import atomic_write_text, fsync_dir, fsync_tree, replace_dir, storage_error, storage_errors

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE_FILE = "trainer_state.pt"

# What trainer_state.pt may hold: it is loaded with torch.load(weights_only=True), which refuses arbitrary
# pickled objects (so loading a checkpoint never runs code); checking at save time fails fast instead of at resume.
STATE_LEAF_TYPES = (type(None), bool, int, float, str, bytes, torch.Tensor)


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the config; the message names the path."""


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
    If anything fails, the temporary dir is removed and no ``step_N`` appears; a storage failure (full disk,
    no permission) raises ``RunError`` naming the path, the OS reason and the previous checkpoint, which is intact.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep (trainer.keep_checkpoints) must be an int >= 1, got {keep!r}")
    check_state_types(state)
    root = os.path.join(run_dir, CHECKPOINTS_DIR)
    tmp_dir = os.path.join(root, f"{TMP_PREFIX}{STEP_PREFIX}{step}-{os.getpid()}")
    final_dir = checkpoint_dir(run_dir, step)
    try:
        os.makedirs(root, exist_ok=True)
        remove_stale_tmp_dirs(root, own_pid_is_stale=True)
        os.makedirs(tmp_dir)
        _fill_checkpoint(tmp_dir, step, write_model, state)
        replace_dir(tmp_dir, final_dir, aside_prefix=f"{TMP_PREFIX}replaced-")
    except Exception as err:
        # Judge the cause before the tmp dir is removed: removing it frees the space a full disk lacked.
        run_error = storage_error(f"write checkpoint {STEP_PREFIX}{step} under", root, err, _previous_note(run_dir))
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if run_error is None:
            raise
        raise run_error from err
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    with storage_errors("remove old checkpoints under", root):
        prune_checkpoints(run_dir, keep=keep, newest_step=step)
    return final_dir


def _previous_note(run_dir: str) -> str:
    try:
        checkpoints = list_checkpoints(run_dir)
    except OSError:
        return "earlier checkpoints were not touched"
    if not checkpoints:
        return "there is no earlier checkpoint"
    return f"the previous checkpoint {os.path.basename(checkpoints[-1][1])} is intact"


def _fill_checkpoint(tmp_dir: str, step: int, write_model: Callable[[str], None], state: Mapping[str, Any]) -> None:
    write_model(tmp_dir)
    for reserved in (TRAINER_STATE_FILE, COMPLETE_MARKER):
        if os.path.exists(os.path.join(tmp_dir, reserved)):
            raise CheckpointError(f"write_model wrote {reserved!r} into {tmp_dir}; that name is reserved")
    with open(os.path.join(tmp_dir, TRAINER_STATE_FILE), "wb") as f:
        torch.save(dict(state), f)  # through our file object, so a failed write raises OSError with its errno
    fsync_tree(tmp_dir)
    atomic_write_text(os.path.join(tmp_dir, COMPLETE_MARKER), json.dumps({"step": step}) + "\n")


def resolve_resume(run_dir: str, resume: str) -> str | None:
    """``run.resume`` to a verified checkpoint dir, or ``None`` for a fresh start. Raises ``CheckpointError``.

    ``never`` → ``None``; ``auto`` → the latest complete checkpoint of ``run_dir`` (``None`` if there is none);
    a run dir → its latest complete checkpoint; a checkpoint dir → itself. Every candidate is verified
    (``checkpoint_problem``); when the latest one of a run is corrupt, the newest sound one before it is used,
    with a warning naming the corrupt file (none sound: ``CheckpointError``). A checkpoint named explicitly must
    be complete and sound: the error names what is wrong and offers the newest complete checkpoint beside it.
    """
    if resume == "never":
        return None
    if resume == "auto":
        remove_stale_tmp_dirs(os.path.join(run_dir, CHECKPOINTS_DIR), own_pid_is_stale=False)
        return _latest_sound(run_dir, "run.resume=auto")
    path = os.path.abspath(os.path.expanduser(resume))
    if not os.path.isdir(path):
        raise CheckpointError(
            f"run.resume={resume}: no such directory; use auto, never, a checkpoint dir (<run.dir>/checkpoints/step_N) "
            "or a run dir"
        )
    if is_complete(path):
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"run.resume={resume}: {problem}; {_offer_beside(path)}")
        return path
    if os.path.basename(path) == CHECKPOINTS_DIR:
        path = os.path.dirname(path)
    if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
        found = _latest_sound(path, f"run.resume={resume}")
        if found is None:
            raise CheckpointError(
                f"run.resume={resume} is a run dir without a complete checkpoint; use run.resume=never"
            )
        return found
    if os.path.basename(os.path.dirname(path)) == CHECKPOINTS_DIR:
        raise CheckpointError(
            f"run.resume={resume} is incomplete (no {COMPLETE_MARKER} marker: its save was cut); {_offer_beside(path)}"
        )
    raise CheckpointError(
        f"run.resume={resume} is neither a checkpoint (no {COMPLETE_MARKER} marker) "
        f"nor a run dir (no {CHECKPOINTS_DIR}/)"
    )


def _latest_sound(run_dir: str, what: str) -> str | None:
    """The newest complete checkpoint of ``run_dir`` without a ``checkpoint_problem``, warning about newer bad ones;
    ``None`` when there is no complete checkpoint. When every one is corrupt, ``CheckpointError``: starting over
    would silently drop the run's progress."""
    problems = []
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("%s: skipping %s (%s); trying the previous complete checkpoint", what, path, problem)
        problems.append(problem)
    if problems:
        raise CheckpointError(
            f"{what}: no complete checkpoint in {run_dir} is sound ({'; '.join(problems)}); "
            "start over with run.resume=never or a new run.dir"
        )
    return None


def _offer_beside(ckpt_dir: str) -> str:
    """Where to go instead of ``ckpt_dir``: the newest sound checkpoint before it in the same run, if any."""
    run_dir = os.path.dirname(os.path.dirname(ckpt_dir))
    name = os.path.basename(ckpt_dir)
    step = (
        int(name[len(STEP_PREFIX) :]) if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX) :].isdigit() else None
    )
    for earlier_step, path in reversed(list_checkpoints(run_dir)):
        if path != ckpt_dir and (step is None or earlier_step < step) and checkpoint_problem(path) is None:
            return f"the newest complete checkpoint beside it is run.resume={path}"
    return "there is no complete checkpoint beside it: start over with run.resume=never"


def checkpoint_problem(ckpt_dir: str) -> str | None:
    """What is wrong with a complete checkpoint's files (naming the file), or ``None``; cheap, nothing is loaded
    but ``trainer_state.pt``.

    safetensors files: the header parses and its tensor data ends exactly at the end of the file. torch files
    (``*.pt``, ``*.bin``, optimizer states, at any depth): zip archives whose central directory reads and whose
    members lie inside the file. A truncated or partly written file fails one of these.
    """
    try:
        load_trainer_state(ckpt_dir)
    except CheckpointError as err:
        return str(err)
    for parent, _, files in os.walk(ckpt_dir):
        for name in sorted(files):
            path = os.path.join(parent, name)
            if name.endswith(".safetensors"):
                problem = safetensors_problem(path)
            elif name.endswith((".pt", ".bin")):
                problem = torch_zip_problem(path)
            else:
                continue
            if problem is not None:
                return f"{path} is corrupt: {problem}"
    return None


def safetensors_problem(path: str) -> str | None:
    """Why ``path`` is not a whole safetensors file (8-byte header length, JSON header, data), or ``None``."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0] if size >= 8 else None
            if header_len is None or 8 + header_len > size:
                return f"file of {size} bytes is shorter than its header"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return f"header does not parse ({err})"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        return f"tensor data needs {expected} bytes, the file has {size} (truncated or partly written)"
    return None


def torch_zip_problem(path: str) -> str | None:
    """Why the torch file ``path`` is not a whole zip archive (torch.save's format), or ``None``."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            ends = [info.header_offset + info.compress_size for info in archive.infolist()]
    except (OSError, zipfile.BadZipFile) as err:
        return f"not a readable torch zip archive ({err}; truncated or partly written)"
    if max(ends, default=0) > size:
        return f"its members reach past the end of the file ({size} bytes)"
    return None


FINGERPRINT_MODEL_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def model_fingerprint(model_dir: str) -> dict[str, str]:
    """``{"model.<key>": value}`` of the architecture in ``model_dir/config.json`` (what a state dict's shapes
    follow)."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the model config {path}: {err}") from err
    return {f"model.{key}": str(config[key]) for key in FINGERPRINT_MODEL_KEYS if key in config}


def rows_fingerprint(rows: Sequence[Mapping[str, Any]]) -> str:
    """``"<count> rows sha256:<first 16 hex>"`` over the rows' canonical JSON, order included."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode("utf-8") + b"\n")
    return f"{len(rows)} rows sha256:{digest.hexdigest()[:16]}"


def check_fingerprint(ckpt_dir: str, saved: Mapping[str, str] | None, current: Mapping[str, str]) -> None:
    """Raise ``CheckpointError`` listing each item where the checkpoint's fingerprint differs from the config's.

    A checkpoint saved before fingerprints existed (``saved`` is ``None``) is checked on its model architecture
    only (from its ``config.json``), with a warning.
    """
    if saved is None:
        logger.warning(
            "%s has no fingerprint (saved by an older rltrain): only its model architecture is checked "
            "against the config; data, eval set and algorithm are assumed unchanged",
            ckpt_dir,
        )
        saved = model_fingerprint(ckpt_dir)
    differ = [
        f"{key}: checkpoint {saved[key]}, config {value}"
        for key, value in current.items()
        if key in saved and saved[key] != value
    ]
    if differ:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} does not fit this config ({'; '.join(differ)}); resume with the config it was "
            "saved with, or start over with run.resume=never or a new run.dir"
        )


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
