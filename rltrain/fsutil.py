"""Durable file-system writes, one implementation each, and storage errors that say why.

``atomic_write`` replaces a file so a reader sees the old or the whole new content; ``replace_dir`` moves a
finished directory into place in one rename; ``storage_error`` turns an ``OSError`` (or torch's wrapped write
failure on a full disk) into a ``RunError`` naming the path and the OS reason, e.g. ``No space left on device
(ENOSPC)``.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from rltrain.errors import RunError

# Below this much free space, a write that failed without an errno is taken for a full disk (torch.save's
# "unexpected pos" RuntimeError hides the ENOSPC of the write under it).
FULL_DISK_BYTES = 64 * 2**20
# torch's zip writer reports a failed write as a RuntimeError with one of these in its message.
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def fsync_dir(directory: str) -> None:
    """Persist a directory entry change (create / rename) on filesystems that need it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str) -> None:
    """fsync every file under ``directory`` and every directory in it."""
    for parent, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(parent)


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` with what ``write(file)`` writes: temp file in the same dir, fsync, rename, fsync dir.

    A reader (or a run killed at any moment) sees the old file or the whole new one, never a mix.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp makes it owner-only; the result should read like any other file
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    fsync_dir(directory)


def atomic_write_text(path: str, text: str) -> None:
    """``atomic_write`` of UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def replace_dir(src: str, dst: str, *, aside_prefix: str = ".old-") -> None:
    """Move the finished directory ``src`` to ``dst`` in one rename and fsync the parent.

    An existing ``dst`` is first renamed to ``<parent>/<aside_prefix><name>-<pid>`` and deleted after the swap,
    so at every moment ``dst`` is either the old or the new directory (``src`` and ``dst`` share a parent).
    """
    parent = os.path.dirname(os.path.abspath(dst))
    aside = None
    if os.path.exists(dst):
        aside = os.path.join(parent, f"{aside_prefix}{os.path.basename(dst)}-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(dst, aside)
    os.rename(src, dst)
    fsync_dir(parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def os_error_in(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err``: itself, its cause / context chain, or a Ray task error's ``cause``."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return None


def storage_reason(err: BaseException, path: str) -> str | None:
    """Why writing under ``path`` failed, as ``"<strerror> (<ERRNO>)"``; ``None`` when ``err`` is no storage error.

    An ``OSError`` anywhere in the chain gives its errno. torch's zip writer reports a failed write as a
    RuntimeError without one; then a nearly full file system means ENOSPC.
    """
    os_error = os_error_in(err)
    if os_error is not None:
        return _errno_text(os_error.errno)
    if any(marker in str(err) for marker in TORCH_WRITE_FAILURES):
        if _free_bytes(path) < FULL_DISK_BYTES:
            return _errno_text(errno.ENOSPC)
        detail = str(getattr(err, "cause", None) or err).strip()  # a Ray task error's cause: the worker's own error
        return f"the write failed ({detail.splitlines()[0] if detail else type(err).__name__})"
    return None


def storage_error(action: str, path: str, err: BaseException, consequence: str = "") -> RunError | None:
    """``RunError("cannot <action> <path>: <reason>[; <consequence>]")`` for a storage failure, else ``None``."""
    reason = storage_reason(err, path)
    if reason is None:
        return None
    return RunError(f"cannot {action} {path}: {reason}" + (f"; {consequence}" if consequence else ""))


@contextmanager
def storage_errors(action: str, path: str, consequence: str = "") -> Iterator[None]:
    """Raise ``storage_error(...)`` from a storage failure inside the block; other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        run_error = storage_error(action, path, err, consequence)
        if run_error is None:
            raise
        raise run_error from err


def _errno_text(code: int) -> str:
    name = errno.errorcode.get(code, str(code))
    return f"{os.strerror(code)} ({name})"


def _free_bytes(path: str) -> int:
    """Free bytes (for unprivileged users) on the file system holding ``path`` or its nearest existing parent."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        stats = os.statvfs(probe)
    except OSError:
        return FULL_DISK_BYTES  # unknown: do not claim the disk is full
    return stats.f_bavail * stats.f_frsize
