"""Run a Python program in a locked-down child process (used by the ``code`` grader).

Layers, outermost first (``rewards/_sandbox_child.py`` applies those inside the child):
- a fresh temp working dir (deleted afterwards) and a scrubbed environment (PATH, HOME, TMPDIR, LANG only):
  the parent's secrets (API keys in its environment) are never handed down;
- a new session: on the wall-clock deadline or an output overflow the whole process group is SIGKILLed,
  and the child dies with its parent (PR_SET_PDEATHSIG);
- resource limits: CPU seconds, address space, file size, open files, processes (RLIMIT_NPROC counts every
  process of the user and is not enforced for root, so it is a backstop only), no core dumps;
- kernel layers, each used where the kernel offers it (``SandboxResult.layers`` says which held):
  ``netns`` (an empty network namespace: root, or unprivileged user namespaces), ``landlock`` (writes only
  beneath the working dir, no TCP, no signals to or ptrace of outside processes, hence no reading their
  ``/proc/<pid>/environ``), ``seccomp`` (no fork/vfork/clone of a process/clone3/execve: a fork bomb fails at
  its first fork, for any user id, without counting against anyone else's processes);
- ``audit-hook``: a Python audit hook refuses sockets, process creation, signals, ctypes, writes outside the
  working dir and reading other processes' /proc entries, with a clear PermissionError. On its own it guards
  against accidents, not a determined attacker (``_posixsubprocess.fork_exec`` raises no audit event).
Run untrusted code at scale inside a container or VM sandbox as well.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
_READ_CHUNK = 65536
_LAYERS_FILE = ".rltrain_sandbox_layers"  # written by the child: which protections took effect


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock; the process group is killed when it passes
    memory_mb: int = 512  # address space
    file_size_mb: int = 16  # largest file the program may write
    open_files: int = 64
    processes: int = 16  # RLIMIT_NPROC (also caps threads; per user, not enforced for root)
    output_bytes: int = 1 << 20  # per stream; more kills the program and sets output_truncated
    kernel_layers: bool = True  # Landlock + seccomp; switch off only to test the other layers
    audit_hook: bool = True  # the Python audit hook; switch off only to test the kernel layers


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    output_truncated: bool
    layers: tuple[str, ...] = ()  # protections that took effect: netns, landlock, seccomp, audit-hook

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


def run_python(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``source`` as ``main.py`` with ``stdin``; never raises for anything the program does."""
    workdir = tempfile.mkdtemp(prefix="rltrain-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8", errors="surrogatepass") as file:
            file.write(source)
        result = _run_in(workdir, stdin.encode("utf-8", errors="replace"), limits)
        return dataclasses.replace(result, layers=_read_layers(workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _read_layers(workdir: str) -> tuple[str, ...]:
    try:
        with open(os.path.join(workdir, _LAYERS_FILE), encoding="utf-8") as file:
            layers = json.loads(file.read(1000))
    except (OSError, ValueError):
        return ()
    return tuple(str(layer) for layer in layers) if isinstance(layers, list) else ()


@functools.lru_cache(maxsize=1)
def active_layers() -> tuple[str, ...]:
    """The protections a sandboxed program gets on this machine (runs an empty program once)."""
    return run_python("pass", limits=SandboxLimits(timeout_s=30.0)).layers


def _settings(limits: SandboxLimits) -> str:
    return json.dumps(
        {
            "parent_pid": os.getpid(),
            "cpu_s": max(1, int(limits.timeout_s + 0.999)),
            "memory_bytes": limits.memory_mb * 2**20,
            "file_size_bytes": limits.file_size_mb * 2**20,
            "open_files": limits.open_files,
            "processes": limits.processes,
            "kernel_layers": limits.kernel_layers,
            "audit_hook": limits.audit_hook,
        }
    )


def _run_in(workdir: str, stdin: bytes, limits: SandboxLimits) -> SandboxResult:
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    process = subprocess.Popen(
        [sys.executable, "-I", _CHILD_SCRIPT, _settings(limits)],
        cwd=workdir,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    try:
        stdout, stderr, timed_out, truncated = _communicate(process, stdin, limits)
    finally:
        _kill_group(process.pid)
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None and not stream.closed:
                stream.close()
    return SandboxResult(process.returncode, _text(stdout), _text(stderr), timed_out, truncated)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _communicate(process: subprocess.Popen, stdin: bytes, limits: SandboxLimits) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin and collect output until the program exits, the deadline passes or the output cap is hit.

    Returns (stdout, stderr, timed_out, output_truncated); the caller kills the process group afterwards.
    """
    deadline = time.monotonic() + limits.timeout_s
    out_fd, err_fd = process.stdout.fileno(), process.stderr.fileno()
    outputs = {out_fd: bytearray(), err_fd: bytearray()}
    timed_out = truncated = False
    with selectors.DefaultSelector() as selector:
        for fd in outputs:
            selector.register(fd, selectors.EVENT_READ)
        if stdin:
            os.set_blocking(process.stdin.fileno(), False)
            selector.register(process.stdin.fileno(), selectors.EVENT_WRITE)
        else:
            process.stdin.close()
        offset = 0
        while selector.get_map() and not (timed_out or truncated):
            remaining = deadline - time.monotonic()
            timed_out = remaining <= 0
            for key, _ in [] if timed_out else selector.select(remaining):
                if key.fd not in outputs:
                    offset = _feed(selector, process, stdin, offset)
                    continue
                data = os.read(key.fd, _READ_CHUNK)
                if not data:
                    selector.unregister(key.fd)
                outputs[key.fd] += data
                truncated = truncated or len(outputs[key.fd]) > limits.output_bytes
    if not (timed_out or truncated):
        try:  # streams closed: the program is exiting, or closed them and kept running
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    cap = limits.output_bytes
    return bytes(outputs[out_fd][:cap]), bytes(outputs[err_fd][:cap]), timed_out, truncated


def _feed(selector: selectors.BaseSelector, process: subprocess.Popen, stdin: bytes, offset: int) -> int:
    """Write the next piece of stdin; close it when done or when the program stopped reading."""
    try:
        offset += os.write(process.stdin.fileno(), stdin[offset : offset + _READ_CHUNK])
    except BlockingIOError:
        return offset
    except OSError:  # BrokenPipeError: the program exited or closed its stdin
        offset = len(stdin)
    if offset >= len(stdin):
        selector.unregister(process.stdin.fileno())
        process.stdin.close()
    return offset


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
