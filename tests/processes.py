"""Process checks shared by the tests (unit and integration): is a pid still running, which processes belong to a
session (a run started with ``start_new_session``)."""

from __future__ import annotations

import contextlib
import os
import signal
import time


def alive(pid: int) -> bool:
    """The process exists and is neither a zombie nor dead (read from /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def gone(pids: list[int], within_s: float = 10.0) -> bool:
    """SIGKILL is delivered asynchronously: give the kernel a moment to end the processes."""
    deadline = time.monotonic() + within_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(pid) for pid in pids)


def cmdline(pid: int) -> str:
    """A process's command line, arguments joined by spaces ("" once it is gone). Ray actors rename theirs to
    ``ray::<Class>`` / ``ray::<Class>.<method>``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, session id) of every process now running, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the name in () may hold spaces
            found.append((int(entry), int(fields[1]), int(fields[3])))
        except (OSError, IndexError, ValueError):
            continue
    return found


def session(sid: int) -> list[int]:
    """Every process of session ``sid``. Ray actors run in process groups of their own but stay in the session of
    the process that started Ray, also when their raylet died and they were re-parented."""
    return [pid for pid, _, session_id in processes() if session_id == sid]


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (what a test started with ``start_new_session``)."""
    for pid in session(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
