"""A pool of grader processes with per-call wall-clock deadlines enforced from outside the grader.

Each worker gets chunks of calls and reports every call as it finishes, so the parent always knows which
call is running and since when. A call past its deadline gets its worker (and the worker's process
group) SIGKILLed and replaced; a worker that dies mid-call (segfault, os._exit, OOM kill) costs that call
alone. The calls it had not started yet go back to the queue. Works from any thread and inside Ray actors:
processes come from a multiprocessing forkserver (single-threaded, graders preloaded, so a replacement
starts in milliseconds), never from forking the caller. Unlike plain multiprocessing, grader processes do
not re-import the caller's ``__main__`` module: a script without an ``if __name__ == "__main__":`` guard
works, and a Ray worker's entry module (which imports all of Ray) is not loaded into every grader.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.spawn
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from rltrain.grading.worker import serve

_START_TIMEOUT_S = 180.0  # a fresh worker imports the graders; slow on a loaded 2-core machine
_MAX_START_FAILURES = 3
_PRELOAD = ["rltrain.grading.worker", "rewards.extract", "rewards.math", "rewards.gsm8k", "rewards.countdown"]
_STARTING = threading.local()  # .active: this thread is starting a grader process
_MAIN_KEYS = ("init_main_from_path", "init_main_from_name")


def _install_main_module_filter() -> None:
    """Wrap ``multiprocessing.spawn.get_preparation_data`` so processes started by a GraderPool are not told
    to re-import ``__main__`` (graders are loaded by reference). Other callers see no change."""
    original = multiprocessing.spawn.get_preparation_data
    if getattr(original, "_rltrain_wrapped", False):
        return

    def get_preparation_data(name: str) -> dict:
        data = original(name)
        if getattr(_STARTING, "active", False):
            for key in _MAIN_KEYS:
                data.pop(key, None)
        return data

    get_preparation_data._rltrain_wrapped = True  # type: ignore[attr-defined]
    multiprocessing.spawn.get_preparation_data = get_preparation_data


_install_main_module_filter()


@dataclass
class Outcome:
    """What one call produced: ``kind`` "ok" with its values, or an error kind with a short message."""

    kind: str
    values: dict[str, float] = field(default_factory=dict)
    message: str = ""
    elapsed_s: float = 0.0  # wall time of the call as seen from the parent (start to result or to the kill decision)


@dataclass
class _Worker:
    process: Any
    conn: Connection
    started: float
    ready: bool = False
    in_flight: deque = field(default_factory=deque)  # task ids sent and not yet reported, in order
    current_since: float = 0.0  # when the call at the head of in_flight started (as seen from here)


class GraderPool:
    """``run(tasks)`` -> one Outcome per task; a task is ``(spec_index, completion, ground_truth, fields)``."""

    def __init__(self, functions: list[dict], num_workers: int, timeout_s: float, memory_mb: int, batch_size: int):
        self._functions = functions
        self._timeout_s = timeout_s
        self._memory_mb = memory_mb
        self._batch_size = batch_size
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(_PRELOAD)
        self._workers = [self._spawn() for _ in range(num_workers)]
        self._start_failures = 0

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=serve, args=(child_conn, self._functions, self._memory_mb), name="rltrain-grader", daemon=True
        )
        _STARTING.active = True
        try:
            process.start()
        finally:
            _STARTING.active = False
        child_conn.close()
        return _Worker(process, parent_conn, started=time.monotonic())

    def run(self, tasks: list[tuple]) -> list[Outcome]:
        """Grade every task; returns outcomes in task order. Raises RuntimeError if workers cannot start."""
        pending: deque[int] = deque(range(len(tasks)))
        outcomes: list[Outcome | None] = [None] * len(tasks)
        remaining = len(tasks)
        while remaining:
            self._dispatch(tasks, pending)
            ready = wait(self._waitables(), timeout=self._next_wakeup())
            for index, worker in enumerate(self._workers):
                if worker.conn in ready or worker.process.sentinel in ready:
                    remaining -= self._receive(index, outcomes, pending)
            remaining -= self._enforce_deadlines(outcomes, pending)
        return [outcome for outcome in outcomes if outcome is not None]

    def _dispatch(self, tasks: list[tuple], pending: deque[int]) -> None:
        idle = [w for w in self._workers if w.ready and not w.in_flight]
        for worker in idle:
            if not pending:
                return
            size = max(1, min(self._batch_size, math.ceil(len(pending) / len(self._workers))))
            chunk_ids = [pending.popleft() for _ in range(min(size, len(pending)))]
            try:
                worker.conn.send([(task_id, *tasks[task_id]) for task_id in chunk_ids])
            except (BrokenPipeError, OSError):
                pending.extendleft(reversed(chunk_ids))  # the sentinel reports the dead worker next
                continue
            worker.in_flight.extend(chunk_ids)
            worker.current_since = time.monotonic()

    def _waitables(self) -> list:
        return [obj for worker in self._workers for obj in (worker.conn, worker.process.sentinel)]

    def _next_wakeup(self) -> float:
        now = time.monotonic()
        deadlines = [w.current_since + self._timeout_s for w in self._workers if w.in_flight]
        deadlines += [w.started + _START_TIMEOUT_S for w in self._workers if not w.ready]
        return max(0.0, min(deadlines) - now) if deadlines else 1.0

    def _receive(self, index: int, outcomes: list[Outcome | None], pending: deque[int]) -> int:
        """Drain one worker's messages; handle its death. Returns how many tasks finished."""
        worker, finished = self._workers[index], 0
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message[0] == "ready":
                    worker.ready, self._start_failures = True, 0
                elif message[0] == "fatal":
                    self.close()
                    raise RuntimeError(f"a grader process could not load the reward functions: {message[1]}")
                else:
                    task_id, kind, payload = message
                    worker.in_flight.popleft()
                    now = time.monotonic()
                    elapsed, worker.current_since = now - worker.current_since, now
                    if kind == "ok":
                        outcomes[task_id] = Outcome(kind, payload, elapsed_s=elapsed)
                    else:
                        outcomes[task_id] = Outcome(kind, message=payload, elapsed_s=elapsed)
                    finished += 1
        except (EOFError, OSError):
            pass
        if not worker.process.is_alive():
            finished += self._replace(index, outcomes, pending, "crash", self._death_message(worker))
        return finished

    @staticmethod
    def _death_message(worker: _Worker) -> str:
        worker.process.join(timeout=1.0)
        code = worker.process.exitcode
        if code is not None and code < 0:
            return f"grader process killed by signal {signal.Signals(-code).name}"
        return f"grader process exited with code {code}"

    def _enforce_deadlines(self, outcomes: list[Outcome | None], pending: deque[int]) -> int:
        now, finished = time.monotonic(), 0
        for index, worker in enumerate(self._workers):
            if worker.in_flight and now - worker.current_since > self._timeout_s:
                message = f"call exceeded reward.timeout_s={self._timeout_s:g}; grader process killed"
                finished += self._replace(index, outcomes, pending, "timeout", message)
            elif not worker.ready and now - worker.started > _START_TIMEOUT_S:
                self._replace(index, outcomes, pending, "crash", "grader process did not start in time")
        return finished

    def _replace(self, index: int, outcomes: list[Outcome | None], pending: deque[int], kind: str, why: str) -> int:
        """Kill worker ``index``, charge its running call with ``kind``, requeue the rest, start a new one."""
        worker = self._workers[index]
        # The call's outcome is decided now; reaping the killed process (up to seconds for a large one
        # on a loaded machine) delays the pool, not this call's verdict.
        elapsed = time.monotonic() - worker.current_since
        _kill_group(worker)
        finished = 0
        if worker.in_flight:
            outcomes[worker.in_flight.popleft()] = Outcome(kind, message=why, elapsed_s=elapsed)
            finished = 1
            pending.extendleft(reversed(worker.in_flight))
        elif not worker.ready:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                self.close()
                raise RuntimeError(f"grader processes fail to start ({why}); {_MAX_START_FAILURES} tries")
        self._workers[index] = self._spawn()
        return finished

    def close(self) -> None:
        """Stop every worker (politely, then by SIGKILL of its process group)."""
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 2.0
        for worker in self._workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            _kill_group(worker)
            worker.conn.close()
        self._workers = []


def _kill_group(worker: _Worker) -> None:
    """SIGKILL the worker's process group (the worker leads it once started), else the worker alone."""
    pid = worker.process.pid
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.process.join(timeout=5.0)
