"""What controls a run from outside: one run per run dir (a lock), and the signals that stop it.

``RunDirLock`` holds ``fcntl.flock`` on ``<run.dir>/.lock``: a second run on the same dir fails at once, naming
the first one's pid and host. The kernel drops the lock with the process, so a SIGKILLed run leaves none behind.

``StopSignals`` is the one place signals are handled (main thread of the driver):

- SIGTERM (Slurm's warning before preemption or a time limit, ``kill``): sets ``stop_requested``; the loop
  finishes the current step, saves a checkpoint at that step boundary and the run exits 0. A second SIGTERM
  interrupts at once, like SIGINT.
- SIGINT (Ctrl-C): raises ``KeyboardInterrupt`` where the driver is, which stops the step; the driver reports
  the last complete checkpoint in one line (exit 130). A second SIGINT while shutting down exits at once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
from types import FrameType

from rltrain.config import ConfigError
from rltrain.fsutil import storage_errors

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class RunStopped(Exception):  # noqa: N818 - not an error: the run was asked to stop
    """The run stopped on a signal; ``message`` says where and how to resume, ``exit_code`` is the CLI's status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RunDirLock:
    """Exclusive ``flock`` on ``<run_dir>/.lock`` (holding ``pid host``) for the life of this object / ``with``."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.run_dir = run_dir
        with storage_errors("create the run dir lock", self.path):
            os.makedirs(run_dir, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(self._fd)
            self.release()
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise ConfigError(
                f"run.dir={run_dir} is in use by another rltrain run ({holder}); wait for it or choose another run.dir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock); the file stays, so nobody races on it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    return f"pid {text[0]} on host {text[1]}" if len(text) >= 2 else "holder unknown"


class StopSignals:
    """Installs the SIGTERM / SIGINT handlers for a ``with`` block (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.stop_requested: str | None = None  # the signal's name once SIGTERM arrived
        self.interrupted = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def install(self) -> None:
        """(Re)claim SIGTERM and SIGINT. Call again after ``ray.init``: Ray installs a SIGTERM handler in the
        driver that aborts the process (exit -6)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGTERM and self.stop_requested is None and not self.interrupted:
            self.stop_requested = signal.Signals(signum).name
            log.warning("SIGTERM: stopping after this step with a checkpoint (a second SIGTERM stops at once)")
            return
        if self.interrupted:
            print("rltrain: interrupted again; exiting now", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        self.interrupted = True
        raise KeyboardInterrupt
