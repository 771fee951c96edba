"""Kill a grader process and everything it started, wherever it went (Linux ``/proc``; elsewhere the group).

A reward function may start processes in their own session (``start_new_session=True``), which a kill of the
grader's process group misses, and may let them outlive their parent. Each grader process is therefore a child
subreaper (orphans below it are re-parented to it, not to init, so the parent chain stays whole) and carries
an environment tag (``<pool tag>/<worker number>``) that the programs it starts inherit. ``kill_tree``
freezes the grader and every process whose parent chain leads to it or whose environment carries the tag,
until no new one appears, then SIGKILLs them all.
"""

from __future__ import annotations

import ctypes
import os
import signal

TAG_VARIABLE = "RLTRAIN_GRADER_TAG"
_PR_SET_CHILD_SUBREAPER = 36
_MAX_FREEZE_ROUNDS = 50


def become_subreaper() -> None:
    """Orphaned descendants of this process get it, not init, as their parent (Linux 3.4+; else a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _parents() -> dict[int, int]:
    """{pid: parent pid} of every process visible in /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
                parents[int(entry)] = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return parents


def _tagged(pids: list[int], tag: str) -> set[int]:
    """The ``pids`` whose environment has ``TAG_VARIABLE`` = ``tag``, or ``tag/...`` (a worker of pool ``tag``)."""
    exact, below = f"{TAG_VARIABLE}={tag}".encode(), f"{TAG_VARIABLE}={tag}/".encode()
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if any(entry == exact or entry.startswith(below) for entry in environ.read().split(b"\0")):
                    found.add(pid)
        except OSError:
            continue  # another user's process, or exited
    return found


def descendants(roots: set[int], tag: str | None = None) -> set[int]:
    """Live processes below ``roots`` (by parent chain), plus those whose environment carries ``tag``."""
    parents = _parents()
    found = _tagged([pid for pid in parents if pid != os.getpid()], tag) if tag else set()
    found -= roots
    frontier = set(roots) | found
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found - roots
        found |= frontier
    found.discard(os.getpid())
    return found


def kill_tree(pid: int | None, tag: str | None = None) -> None:
    """SIGKILL ``pid`` (its process group too) and every descendant or ``tag``-carrying process.

    Everything found is stopped (SIGSTOP) before anything is killed: a stopped process cannot fork, and a
    living subreaper keeps its orphans' parent chain whole, so repeated scans see the whole tree.
    """
    roots = {pid} if pid is not None else set()
    doomed: set[int] = set()
    if os.path.isdir("/proc"):
        _signal_all(roots, signal.SIGSTOP)
        for _ in range(_MAX_FREEZE_ROUNDS):
            new = descendants(roots, tag) - doomed
            if not new:
                break
            _signal_all(new, signal.SIGSTOP)
            doomed |= new
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _signal_all(roots | doomed, signal.SIGKILL)


def _signal_all(pids: set[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
