"""A pool of grader processes with per-call wall-clock deadlines enforced from outside the grader.

Each worker gets chunks of calls and reports every call as it finishes, so the parent always knows which
call is running and since when. A call past its deadline gets its worker (and every process it started,
rltrain/grading/procs.py) SIGKILLed and replaced; a worker that dies mid-call (segfault, os._exit, OOM kill)
costs that call alone. The calls it had not started yet go back to the queue. A ``stop_when`` hook (the
error budget, rltrain/grading/limits.py) may end a batch early: its unfinished calls come back ``skipped``.
Works from any thread and inside Ray actors: processes come from a multiprocessing forkserver (single-
threaded, graders preloaded, so a replacement starts in milliseconds), never from forking the caller. Unlike
plain multiprocessing, grader processes do not re-import the caller's ``__main__`` module: a script without an
``if __name__ == "__main__":`` guard works, and a Ray worker's entry module (which imports all of Ray) is not
loaded into every grader.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.spawn
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from rltrain.grading.procs import kill_tree
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


SKIPPED = "skipped"  # a call not run because its batch was already over its error budget: not the function's error


@dataclass
class Outcome:
    """What one call produced: ``kind`` "ok" with its values, an error kind with a short message, or skipped."""

    kind: str
    values: dict[str, float] = field(default_factory=dict)
    message: str = ""
    elapsed_s: float = 0.0  # wall time of the call as seen from the parent (start to result or to the kill decision)


@dataclass
class _Worker:
    process: Any
    conn: Connection
    started: float
    tag: str  # RLTRAIN_GRADER_TAG of the programs it starts
    ready: bool = False
    in_flight: deque = field(default_factory=deque)  # task ids sent and not yet reported, in order
    current_since: float = 0.0  # when the call at the head of in_flight started (as seen from here)


@dataclass
class _Batch:
    """The state of one ``run``: outcomes so far, calls not sent yet, and whether ``stop_when`` ended it."""

    tasks: list[tuple]
    stop_when: Callable[[tuple, Outcome], bool]
    outcomes: list[Outcome | None]
    pending: deque[int]
    remaining: int
    stopped: bool = False

    def finish(self, task_id: int, outcome: Outcome) -> None:
        self.outcomes[task_id] = outcome
        self.remaining -= 1
        if not self.stopped and self.stop_when(self.tasks[task_id], outcome):
            self.stopped = True


def _never(task: tuple, outcome: Outcome) -> bool:
    return False


class GraderPool:
    """``run(tasks)`` -> one Outcome per task; a task is ``(spec_index, completion, ground_truth, fields)``.

    ``tag`` marks the programs the workers start (``RLTRAIN_GRADER_TAG=<tag>/<n>``); a pool kills whatever
    carries its tag when it starts (left by an earlier pool with the same tag, e.g. a killed reward actor)
    and when it closes. None: a fresh random tag. ``target``: the worker main loop, called as
    ``target(conn, functions, memory_mb, tag)`` (a module-level function built on ``worker.serve_calls``; default:
    the reward grader's ``serve``; environments use rltrain/env/worker.py's).
    """

    def __init__(
        self,
        functions: list[dict],
        num_workers: int,
        timeout_s: float,
        memory_mb: int,
        batch_size: int,
        tag: str | None = None,
        target: Callable[..., None] = serve,
    ):
        self._functions = functions
        self._target = target
        self._timeout_s = timeout_s
        self._memory_mb = memory_mb
        self._batch_size = batch_size
        self._tag = tag or f"rltrain-{uuid.uuid4().hex[:12]}"
        kill_tree(None, self._tag)
        self._spawned = 0
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(_PRELOAD)
        self._workers = [self._spawn() for _ in range(num_workers)]
        self._start_failures = 0

    def _spawn(self) -> _Worker:
        self._spawned += 1
        tag = f"{self._tag}/{self._spawned}"
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=self._target,
            args=(child_conn, self._functions, self._memory_mb, tag),
            name="rltrain-grader",
            daemon=True,
        )
        _STARTING.active = True
        try:
            process.start()
        finally:
            _STARTING.active = False
        child_conn.close()
        return _Worker(process, parent_conn, started=time.monotonic(), tag=tag)

    def run(self, tasks: list[tuple], stop_when: Callable[[tuple, Outcome], bool] = _never) -> list[Outcome]:
        """Grade every task; returns outcomes in task order. Once ``stop_when(task, outcome)`` is True for a
        finished call, the calls not finished are not run (workers running them are replaced): ``skipped``.
        Raises RuntimeError if workers cannot start."""
        batch = _Batch(tasks, stop_when, [None] * len(tasks), deque(range(len(tasks))), len(tasks))
        while batch.remaining and not batch.stopped:
            self._dispatch(batch)
            ready = wait(self._waitables(), timeout=self._next_wakeup())
            for index, worker in enumerate(self._workers):
                if not batch.stopped and (worker.conn in ready or worker.process.sentinel in ready):
                    self._receive(index, batch)
            self._enforce_deadlines(batch)
        if batch.stopped:
            self._skip_unfinished(batch)
        return [outcome for outcome in batch.outcomes if outcome is not None]

    def _dispatch(self, batch: _Batch) -> None:
        idle = [w for w in self._workers if w.ready and not w.in_flight]
        pending = batch.pending
        for worker in idle:
            if not pending:
                return
            size = max(1, min(self._batch_size, math.ceil(len(pending) / len(self._workers))))
            chunk_ids = [pending.popleft() for _ in range(min(size, len(pending)))]
            try:
                worker.conn.send([(task_id, *batch.tasks[task_id]) for task_id in chunk_ids])
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

    def _receive(self, index: int, batch: _Batch) -> None:
        """Drain one worker's messages; handle its death."""
        worker = self._workers[index]
        try:
            while not batch.stopped and worker.conn.poll():
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
                        batch.finish(task_id, Outcome(kind, payload, elapsed_s=elapsed))
                    else:
                        batch.finish(task_id, Outcome(kind, message=payload, elapsed_s=elapsed))
        except (EOFError, OSError):
            pass
        if not batch.stopped and not worker.process.is_alive():
            self._replace(index, batch, "crash", self._death_message(worker))

    @staticmethod
    def _death_message(worker: _Worker) -> str:
        worker.process.join(timeout=1.0)
        code = worker.process.exitcode
        if code is not None and code < 0:
            return f"grader process killed by signal {signal.Signals(-code).name}"
        return f"grader process exited with code {code}"

    def _enforce_deadlines(self, batch: _Batch) -> None:
        now = time.monotonic()
        for index, worker in enumerate(self._workers):
            if batch.stopped:
                return
            if worker.in_flight and now - worker.current_since > self._timeout_s:
                message = f"call exceeded reward.timeout_s={self._timeout_s:g}; grader process killed"
                self._replace(index, batch, "timeout", message)
            elif not worker.ready and now - worker.started > _START_TIMEOUT_S:
                self._replace(index, batch, "crash", "grader process did not start in time")

    def _replace(self, index: int, batch: _Batch, kind: str, why: str) -> None:
        """Kill worker ``index``, charge its running call with ``kind``, requeue the rest, start a new one."""
        worker = self._workers[index]
        # The call's outcome is decided now; reaping the killed process (up to seconds for a large one
        # on a loaded machine) delays the pool, not this call's verdict.
        elapsed = time.monotonic() - worker.current_since
        _kill(worker)
        if worker.in_flight:
            task_id = worker.in_flight.popleft()
            batch.pending.extendleft(reversed(worker.in_flight))
            batch.finish(task_id, Outcome(kind, message=why, elapsed_s=elapsed))
        elif not worker.ready:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                self.close()
                raise RuntimeError(f"grader processes fail to start ({why}); {_MAX_START_FAILURES} tries")
        self._workers[index] = self._spawn()

    def _skip_unfinished(self, batch: _Batch) -> None:
        """After ``stop_when``: replace the workers still busy and mark every unfinished call skipped."""
        for index, worker in enumerate(self._workers):
            if worker.in_flight:
                _kill(worker)
                self._workers[index] = self._spawn()
        for task_id, outcome in enumerate(batch.outcomes):
            if outcome is None:
                batch.outcomes[task_id] = Outcome(SKIPPED, message="not run: the batch was over its error budget")

    def close(self) -> None:
        """Kill every worker and everything the reward functions started (idempotent)."""
        for worker in self._workers:
            _kill(worker)
            worker.conn.close()
        self._workers = []
        kill_tree(None, self._tag)  # programs started by workers that died earlier (their parent chain is gone)


def _kill(worker: _Worker) -> None:
    """SIGKILL the worker, its process group and every process it started; wait for the worker."""
    kill_tree(worker.process.pid, worker.tag)
    worker.process.join(timeout=5.0)
