"""Process checks shared by the grader-process tests (unit and integration): is a pid still running?"""

from __future__ import annotations

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
