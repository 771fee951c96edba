"""One Ray head shared by the CLI runs of a test session (``cluster.mode=address``).

Each CLI run or test module that starts a local Ray pays Ray's start and shutdown (several seconds on the 2-core CI
machine); most join this head instead (CLI runs with ``cluster.mode=address``, in-process tests through
``joined_ray``), as a run joins a user's cluster. Tests that need a cluster of a given size or environment (placement,
DeepSpeed's memory measurement) keep a local Ray. Runs whose test finds the run's own actor or
Ray processes among its descendants (the fault suite), or kills its Ray head, keep a local Ray of their own.

The head is started on first use and stopped, with every process of its session, when pytest exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from processes import kill_session

# Logical CPUs: placement only. Runs of the suite follow one another; a killed run's actors are released by Ray
# when it sees the driver gone, and the next run's reservation fits beside them meanwhile.
NUM_CPUS = 16
START_TIMEOUT_S = 120

_address: str | None = None


def shared_ray_address() -> str:
    """``host:port`` of the session's Ray head, started now if this is the first call."""
    global _address
    if _address is None:
        _address = _start()
    return _address


def shared_ray_overrides() -> list[str]:
    """The CLI overrides that make a run join the session's Ray head instead of starting a local Ray."""
    return ["cluster.mode=address", f"cluster.address={shared_ray_address()}"]


@contextlib.contextmanager
def joined_ray() -> Iterator[None]:
    """This (pytest) process joins the session's Ray head as a driver, as a user's script joins a cluster; a Runtime
    built meanwhile uses it and leaves it running. Its actors end when the driver disconnects."""
    import ray

    ray.init(address=shared_ray_address(), log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start() -> str:
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rltrain-ray-", dir="/tmp")  # short: Ray's socket paths are length-capped
    log_path = os.path.join(temp_dir, "head.log")
    command = [
        os.path.join(os.path.dirname(sys.executable), "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={NUM_CPUS}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        "--block",
    ]
    # Actors inherit the head's environment, not the driver's: give them what the CLI runs' drivers get.
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    atexit.register(_stop, head, temp_dir)
    deadline = time.monotonic() + START_TIMEOUT_S
    while "Ray runtime started" not in _read(log_path):
        if head.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the tests' Ray head did not start (exit {head.poll()}):\n{_read(log_path)[-3000:]}")
        time.sleep(0.2)
    return f"127.0.0.1:{port}"


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _stop(head: subprocess.Popen, temp_dir: str) -> None:
    """``ray start --block`` stops its node's processes on SIGTERM; whatever is left of its session is killed."""
    head.terminate()
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    kill_session(head.pid)
    head.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)
