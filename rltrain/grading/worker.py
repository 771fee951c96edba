"""Body of one grader process: resolve the reward functions, cap memory, grade task chunks, report each call.

The process is forked from a multiprocessing forkserver (never from the trainer itself). It becomes the
leader of its own process group and a child subreaper carrying an environment tag, so the parent can kill it
and everything it started, even in other sessions (rltrain/grading/procs.py), and it dies with the
forkserver (PR_SET_PDEATHSIG), which dies with the parent. No torch import here.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from rltrain.grading.procs import TAG_VARIABLE, become_subreaper
from rltrain.grading.resolve import call_reward, resolve_reward_functions

ERROR_KINDS = ("exception", "timeout", "crash", "nonfinite", "memory")
_MAX_MESSAGE_CHARS = 300
_PR_SET_PDEATHSIG = 1


def serve(conn: Connection, functions: list[dict], memory_mb: int, tag: str) -> None:
    """Grader worker main loop: resolve the reward functions, then grade ``(spec_index, completion, ground_truth,
    fields)`` tasks (``serve_calls``)."""
    serve_calls(conn, memory_mb, tag, functools.partial(resolve_reward_functions, functions), _grade_task)


def serve_calls(
    conn: Connection,
    memory_mb: int,
    tag: str,
    load: Callable[[], Any],
    call: Callable[..., tuple[str, Any]],
) -> None:
    """Worker main loop of any GraderPool target. ``load()`` (before the memory cap) builds the state; then
    it sends ("ready", pid) once, and (task_id, *call(state, *task)) for every task, in order: ("ok", values) or
    (error kind, message). A None message or a closed pipe ends it. A failing ``load`` sends ("fatal", message).
    Programs started by the calls inherit ``RLTRAIN_GRADER_TAG=tag``."""
    os.setsid()
    become_subreaper()
    os.environ[TAG_VARIABLE] = tag
    _die_with_parent()
    try:
        state = load()
    except Exception as error:
        conn.send(("fatal", f"{type(error).__name__}: {error}"))
        return
    _limit_address_space(memory_mb)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for task_id, *task in chunk:
            conn.send((task_id, *call(state, *task)))
        _reap_orphans()


def _grade_task(specs: list, spec_index: int, completion: str, ground_truth: Any, fields: dict) -> tuple[str, Any]:
    return grade_one(specs[spec_index], completion, ground_truth, fields)


def grade_one(spec: Any, completion: str, ground_truth: Any, fields: dict[str, Any]) -> tuple[str, Any]:
    """("ok", {"score": ..., metrics...}) or (error kind, short message); never raises."""
    try:
        values = call_reward(spec, completion, ground_truth, fields)
    except MemoryError:
        return "memory", "MemoryError: the call needed more than reward.memory_mb of address space"
    except BaseException as error:  # noqa: BLE001 - SystemExit, KeyboardInterrupt too: the worker lives on
        return "exception", _short(f"{type(error).__name__}: {error}") + _where(error, spec.fn)
    bad = sorted(name for name, value in values.items() if not math.isfinite(value))
    if bad:
        return "nonfinite", f"non-finite {bad}: {[values[name] for name in bad]}"
    return "ok", values


def _where(error: BaseException, fn: Any) -> str:
    """`` (at file.py:12 in name: source line)``: the last traceback frame in the reward function's file."""
    code = getattr(fn, "__code__", None)
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    path = code.co_filename if code is not None else getattr(module, "__file__", None)
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == path]
    if not frames:
        return ""
    frame = frames[-1]
    return _short(f" (at {frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()})")


def _reap_orphans() -> None:
    """Collect exited children: as a subreaper this process adopts the orphans of what the functions started."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _short(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[:_MAX_MESSAGE_CHARS] + "..."


def _limit_address_space(memory_mb: int) -> None:
    """RLIMIT_AS = the address space already mapped (interpreter, imports) + ``memory_mb``."""
    mapped = _mapped_bytes()
    if mapped == 0:  # no /proc (not Linux): leave the limit alone rather than guess
        return
    limit = mapped + memory_mb * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard if hard != resource.RLIM_INFINITY else limit))


def _mapped_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the forkserver) exits."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the closed pipe still ends an idle worker
