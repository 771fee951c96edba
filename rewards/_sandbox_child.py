"""First code run in a sandbox child: lock the process down, then execute ``main.py`` of the working dir.

Started by ``rewards.sandbox`` as ``python -I _sandbox_child.py <settings json>`` in a fresh session whose
working directory is the sandbox's temp dir. Order matters: namespaces first (they change credentials,
which clears the parent-death signal), then the parent-death signal, resource limits, and last the audit
hook (which forbids ctypes, used above).
"""

import ctypes
import json
import os
import resource
import signal
import sys

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_BLOCKED_EVENT_PREFIXES = (
    "socket.",
    "ctypes.",
    "subprocess.",
    "os.exec",
    "os.fork",
    "os.posix_spawn",
    "os.spawn",
    "os.system",
    "os.kill",
    "os.killpg",
    "os.setuid",
    "os.setsid",
    "os.setpgid",
    "pty.",
    "signal.pthread_kill",
)
_PATH_EVENTS = {
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.chmod",
    "os.chown",
    "os.truncate",
    "os.link",
    "os.symlink",
    "os.utime",
    "os.mkfifo",
    "os.mknod",
    "shutil.rmtree",
    "shutil.copyfile",
    "shutil.copymode",
    "shutil.copystat",
    "shutil.move",
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def isolate_network(libc: ctypes.CDLL) -> str:
    """Move into an empty network namespace (as root, or via a user namespace); report what worked."""
    for flags in (_CLONE_NEWNET, _CLONE_NEWUSER | _CLONE_NEWNET):
        if libc.unshare(flags) == 0:
            return "namespace"
    return "audit-hook"


def apply_limits(settings: dict) -> None:
    """CPU seconds, address space, file size, open files, processes; no core dumps."""
    limits = {
        resource.RLIMIT_CPU: (settings["cpu_s"], settings["cpu_s"] + 1),
        resource.RLIMIT_AS: (settings["memory_bytes"],) * 2,
        resource.RLIMIT_FSIZE: (settings["file_size_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (settings["open_files"],) * 2,
        resource.RLIMIT_NPROC: (settings["processes"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, (soft, hard) in limits.items():
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing silently


def _resolved(path: object) -> str | None:
    if isinstance(path, int):
        return None  # an already-open descriptor
    return os.path.realpath(os.fsdecode(path))


def make_audit_hook(workdir: str):
    """Refuse sockets, process creation, signals, ctypes, writes outside ``workdir`` and other processes' /proc."""
    inside = os.path.realpath(workdir) + os.sep
    own_proc = f"/proc/{os.getpid()}/"

    def writable(path: str | None) -> bool:
        return path is None or path.startswith(inside) or path == "/dev/null"

    def readable(path: str | None) -> bool:
        if path is None or not path.startswith("/proc/"):
            return True
        first = path[len("/proc/") :].split("/", 1)[0]
        return not first.isdigit() or path.startswith(own_proc) or path == own_proc[:-1]

    def hook(event: str, args: tuple) -> None:
        if event.startswith(_BLOCKED_EVENT_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            path = _resolved(path)
            writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & _WRITE_FLAGS)
            if (writing and not writable(path)) or not readable(path):
                raise PermissionError(f"sandbox: opening {path!r} is not allowed")
        elif event in _PATH_EVENTS:
            for arg in args:
                if isinstance(arg, str | bytes | os.PathLike) and not writable(_resolved(arg)):
                    raise PermissionError(f"sandbox: {event} on {arg!r} is not allowed")

    return hook


def main() -> None:
    settings = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    isolate_network(libc)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != settings["parent_pid"]:  # the parent died before the death signal was armed
        os._exit(1)
    apply_limits(settings)
    with open("main.py", encoding="utf-8") as file:
        source = file.read()
    sys.dont_write_bytecode = True
    sys.argv = ["main.py"]
    code = compile(source, "main.py", "exec")
    sys.addaudithook(make_audit_hook(os.getcwd()))
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
