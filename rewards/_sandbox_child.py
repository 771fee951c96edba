"""First code run in a sandbox child: lock the process down, then execute ``main.py`` of the working dir.

Started by ``rewards.sandbox`` as ``python -I _sandbox_child.py <settings json>`` in a fresh session whose
working directory is the sandbox's temp dir. Order matters: namespaces first (they change credentials,
which clears the parent-death signal), then the parent-death signal, resource limits, the kernel layers
(Landlock, seccomp: both need ctypes) and last the audit hook (which forbids ctypes). The layers that took
effect are written to ``.rltrain_sandbox_layers`` in the working dir for the parent to report.

Kernel layers (Linux; each is skipped where the kernel lacks it, and the parent can tell which held):
- ``netns``: an empty network namespace (root, or unprivileged user namespaces);
- ``landlock``: writes only beneath the working dir (and to /dev/null); reads only there, in system dirs and
  in the interpreter's prefixes and import path (so not another process's ``/proc/<pid>/environ``, nor
  ``~/.netrc``, nor the project's files); no TCP bind/connect; no signals to processes outside the sandbox;
- ``seccomp``: no new processes (fork, vfork, clone without CLONE_THREAD, clone3) and no execve: a fork
  bomb fails at its first fork, whatever the user id (RLIMIT_NPROC is not enforced for root).
"""

import ctypes
import json
import os
import platform
import resource
import signal
import struct
import sys

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_CLONE_THREAD = 0x00010000
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_LAYERS_FILE = ".rltrain_sandbox_layers"

# Landlock (uapi/linux/landlock.h); the syscall numbers are the same on every architecture.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 1, 1 << 2, 1 << 3
_FS_WRITE_RIGHTS_V1 = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make_*
# Read-only beneath these (plus the interpreter's prefixes and sys.path); everything else is unreadable,
# e.g. other processes' /proc/<pid>/environ, ~/.netrc, the project's files. Missing paths are skipped.
_READABLE = (
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/os-release",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
    "/proc/self",
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/stat",
    "/sys/devices/system/cpu",
)
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

# seccomp: (AUDIT_ARCH, {syscall: errno}, clone nr, clone3 nr) per architecture.
_EPERM, _ENOSYS = 1, 38
_SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, {57: _EPERM, 58: _EPERM, 59: _EPERM, 322: _EPERM}, 56, 435),  # fork vfork execve(at)
    "aarch64": (0xC00000B7, {221: _EPERM, 281: _EPERM}, 220, 435),  # execve execveat
}

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
    "sqlite3.connect",
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


def isolate_network(libc: ctypes.CDLL) -> bool:
    """Move into an empty network namespace (as root, or via a user namespace); True if it worked."""
    return any(libc.unshare(flags) == 0 for flags in (_CLONE_NEWNET, _CLONE_NEWUSER | _CLONE_NEWNET))


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


def _syscall(libc: ctypes.CDLL, number: int, *args: object) -> int:
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(ctypes.c_long(number), *args)


def readable_paths() -> list[str]:
    """What a sandboxed program may read: system dirs, the interpreter and its import path."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths = list(_READABLE) + sorted(prefixes) + [entry for entry in sys.path if entry]
    return [path for path in dict.fromkeys(paths) if os.path.exists(path)]


def apply_landlock(libc: ctypes.CDLL, workdir: str) -> bool:
    """Writes only beneath ``workdir`` (and /dev/null), reads only there and in ``readable_paths()``; no TCP,
    no signals to or ptrace of outside processes. True if it took effect."""
    abi = _syscall(libc, _SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), _LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return False
    read = _FS_READ_FILE | _FS_READ_DIR
    fs = read | _FS_WRITE_RIGHTS_V1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    buffer = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _syscall(libc, _SYS_LANDLOCK_CREATE_RULESET, buffer, ctypes.c_size_t(len(attr)), 0)
    if ruleset < 0:
        return False
    try:
        null_rights = _FS_READ_FILE | _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0)
        rules = [(workdir, fs), ("/dev/null", null_rights)] + [(path, read) for path in readable_paths()]
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not os.path.isdir(f"/proc/self/fd/{fd}"):
                    rights &= _FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE  # the rights a file rule may carry
                rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
                if _syscall(libc, _SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, rule, 0) != 0:
                    return False
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return False
        return _syscall(libc, _SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) == 0
    finally:
        os.close(ruleset)


def seccomp_program(arch: str) -> bytes | None:
    """Classic-BPF filter refusing process creation and execve on ``arch`` (None: not supported)."""
    if arch not in _SECCOMP_ARCHES:
        return None
    audit_arch, denied, clone_nr, clone3_nr = _SECCOMP_ARCHES[arch]
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, errno_base = 0x7FFF0000, 0x00050000
    # (code, jt, jf, k); jumps name labels resolved below. Offsets: 0 nr, 4 arch, 16 args[0] (low half).
    program: list[tuple] = [
        (ld_abs, 0, 0, 4),
        (jeq, 0, "enosys", audit_arch),  # another ABI (e.g. i386 via int 0x80): refuse every syscall
        (ld_abs, 0, 0, 0),
        (jge, "eperm", 0, 0x40000000),  # x32 syscalls
        *[(jeq, "eperm" if code == _EPERM else "enosys", 0, nr) for nr, code in denied.items()],
        (jeq, "enosys", 0, clone3_nr),  # libc falls back to clone(), checked below
        (jeq, 0, "allow", clone_nr),
        (ld_abs, 0, 0, 16),
        (jset, "allow", "eperm", _CLONE_THREAD),
        ("allow", ret, allow),
        ("eperm", ret, errno_base | _EPERM),
        ("enosys", ret, errno_base | _ENOSYS),
    ]
    labels = {item[0]: index for index, item in enumerate(program) if isinstance(item[0], str)}
    words = []
    for index, item in enumerate(program):
        if isinstance(item[0], str):
            _, code, k = item
            words.append(struct.pack("=HBBI", code, 0, 0, k))
            continue
        code, jt, jf, k = item
        jt = labels[jt] - index - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - index - 1 if isinstance(jf, str) else jf
        words.append(struct.pack("=HBBI", code, jt, jf, k))
    return b"".join(words)


def apply_seccomp(libc: ctypes.CDLL) -> bool:
    """Install the process-creation filter; True if it took effect."""
    program = seccomp_program(platform.machine())
    if program is None:
        return False
    filters = ctypes.create_string_buffer(program, len(program))

    class _Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _Fprog(len(program) // 8, ctypes.addressof(filters))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


def _resolved(path: object) -> str | None:
    if isinstance(path, int):
        return None  # an already-open descriptor
    return os.path.realpath(os.fsdecode(path))


def make_audit_hook(workdir: str):
    """Refuse sockets, process creation, signals, ctypes, writes outside ``workdir`` and other processes' /proc."""
    inside = os.path.realpath(workdir) + os.sep
    own_proc = f"/proc/{os.getpid()}/"

    def writable(path: str | None) -> bool:
        return path is None or path.startswith(inside) or path in (inside[:-1], "/dev/null")

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
    layers = ["netns"] if isolate_network(libc) else []
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != settings["parent_pid"]:  # the parent died before the death signal was armed
        os._exit(1)
    apply_limits(settings)
    workdir = os.getcwd()
    if settings.get("kernel_layers", True):
        layers += ["landlock"] if apply_landlock(libc, workdir) else []
        layers += ["seccomp"] if apply_seccomp(libc) else []
    with open("main.py", encoding="utf-8") as file:
        source = file.read()
    sys.dont_write_bytecode = True
    sys.argv = ["main.py"]
    code = compile(source, "main.py", "exec")
    if settings.get("audit_hook", True):
        sys.addaudithook(make_audit_hook(workdir))
        layers.append("audit-hook")
    with open(_LAYERS_FILE, "w") as file:
        file.write(json.dumps(layers))
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
