"""Run control: one run per run dir (flock, released with the process), SIGTERM / SIGINT handling."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from rltrain.config import ConfigError
from rltrain.run_control import LOCK_FILE, RunDirLock, StopSignals


def test_a_second_lock_on_a_run_dir_names_the_holder_and_the_first_release_frees_it(tmp_path):
    run_dir = str(tmp_path / "run")
    first = RunDirLock(run_dir)
    with open(os.path.join(run_dir, LOCK_FILE)) as f:
        assert f.read() == f"{os.getpid()} {socket.gethostname()}\n"
    with pytest.raises(ConfigError) as err:
        RunDirLock(run_dir)
    assert str(err.value) == (
        f"run.dir={run_dir} is in use by another rltrain run (pid {os.getpid()} on host {socket.gethostname()}); "
        "wait for it or choose another run.dir"
    )
    first.release()
    with RunDirLock(run_dir):
        pass


def hold_lock(run_dir: str, locked) -> None:
    RunDirLock(run_dir)
    locked.set()
    signal.pause()


def test_a_sigkilled_holder_leaves_no_stale_lock(tmp_path):
    run_dir = str(tmp_path / "run")
    ctx = multiprocessing.get_context("spawn")
    locked = ctx.Event()
    holder = ctx.Process(target=hold_lock, args=(run_dir, locked))
    holder.start()
    try:
        assert locked.wait(60)
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on host"):
            RunDirLock(run_dir)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    with RunDirLock(run_dir):
        assert os.path.isfile(os.path.join(run_dir, LOCK_FILE))


def test_sigterm_sets_the_stop_flag_and_a_second_one_interrupts():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.stop_requested == "SIGTERM" and not signals.interrupted
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
        assert signals.interrupted
    assert signal.getsignal(signal.SIGTERM) is previous


def test_sigint_interrupts_and_a_second_sigint_exits_at_once_with_one_line():
    script = textwrap.dedent(
        """
        import os, signal, time
        from rltrain.run_control import StopSignals

        with StopSignals() as signals:
            try:
                os.kill(os.getpid(), signal.SIGINT)
            except KeyboardInterrupt:
                print("interrupted", signals.interrupted, flush=True)
            os.kill(os.getpid(), signal.SIGINT)  # while shutting down
            time.sleep(30)
            print("not reached", flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130
    assert proc.stdout == "interrupted True\n"
    assert proc.stderr == "rltrain: interrupted again; exiting now\n"


def test_install_reclaims_sigterm_from_a_handler_set_later_and_exit_restores_the_first():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as ray.init does with its own (aborting) handler
        signals.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.stop_requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous
