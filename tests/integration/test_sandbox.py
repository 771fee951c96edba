"""Sandbox containment for the ``code`` grader: hostile programs are contained and scored as failures.

Each program runs twice: with every layer, and (where the kernel offers Landlock + seccomp) with the
Python audit hook switched off, so the kernel layers are shown to hold on their own. The fork bomb runs
only once a probe has shown that process creation is refused inside the sandbox.
"""

import os
import subprocess
import time

import pytest
from processes import cmdline

from rewards import code
from rewards.sandbox import SandboxLimits, active_layers, run_python
from rltrain.grading import RewardGrader

pytestmark = pytest.mark.integration
SECRET = "rltrain-test-secret-4b1d"
ESCAPE = "/tmp/rltrain-sandbox-escape-test.txt"


def _variants() -> list[SandboxLimits]:
    variants = [SandboxLimits(timeout_s=3.0, memory_mb=256)]
    if {"landlock", "seccomp"} <= set(active_layers()):
        variants.append(SandboxLimits(timeout_s=3.0, memory_mb=256, audit_hook=False))
    return variants


@pytest.fixture(autouse=True)
def parent_secret(monkeypatch):
    monkeypatch.setenv("RLTRAIN_TEST_SECRET", SECRET)
    yield
    assert os.environ["RLTRAIN_TEST_SECRET"] == SECRET  # the run (this process) is unaffected


def _processes() -> set[int]:
    return {int(pid) for pid in os.listdir("/proc") if pid.isdigit()}


def _assert_contained(source: str, limits: SandboxLimits, stdin: str = ""):
    before = _processes()
    start = time.monotonic()
    result = run_python(source, stdin, limits)
    assert time.monotonic() - start < limits.timeout_s + 2.0
    assert not result.ok, (result.stdout, result.stderr)
    assert SECRET not in result.stdout + result.stderr
    time.sleep(0.1)
    leftovers = [pid for pid in _processes() - before if cmdline(pid).startswith("/") and "sandbox" in cmdline(pid)]
    assert not leftovers, "sandbox processes survived their run"
    return result


@pytest.mark.parametrize("limits", _variants(), ids=lambda limits: "all-layers" if limits.audit_hook else "kernel-only")
class TestContainment:
    def test_infinite_loop_is_killed_at_the_deadline(self, limits):
        result = _assert_contained("while True:\n    pass\n", limits)
        assert result.timed_out or result.returncode is not None and result.returncode < 0

    def test_ten_gigabyte_allocation_fails(self, limits):
        result = _assert_contained("x = bytearray(10 * 2**30)\nprint('allocated')\n", limits)
        assert "allocated" not in result.stdout and "MemoryError" in result.stderr

    def test_writing_outside_the_temp_dir_fails(self, limits):
        source = f"open({ESCAPE!r}, 'w').write('escaped')\nprint('wrote')\n"
        result = _assert_contained(source, limits)
        assert "wrote" not in result.stdout and not os.path.exists(ESCAPE)

    def test_sockets_cannot_reach_anything(self, limits):
        source = (
            "import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', 22))\nprint('connected')\n"
        )
        assert "connected" not in _assert_contained(source, limits).stdout

    def test_parent_environment_secrets_are_unreadable(self, limits):
        source = (
            "import os\n"
            "print(os.environ.get('RLTRAIN_TEST_SECRET'))\n"
            "print(open(f'/proc/{os.getppid()}/environ', 'rb').read())\n"
        )
        result = _assert_contained(source, limits)
        assert result.stdout.strip() == "None"  # the scrubbed environment; the /proc read then fails

    def test_files_outside_are_unreadable_where_landlock_holds(self, limits):
        if "landlock" not in active_layers():
            pytest.skip("no Landlock on this kernel: reads outside the sandbox are not confined")
        source = f"print(open({__file__!r}).read()[:20])\n"
        _assert_contained(source, limits)


def test_fork_bomb_is_contained():
    """Runs only after a probe shows forks fail inside the sandbox (seccomp, or RLIMIT_NPROC for non-root)."""
    probe = "import _posixsubprocess, os\n" + _FORK_ONCE
    result = run_python(probe, limits=SandboxLimits(timeout_s=5.0, audit_hook=False))
    if "forked" in result.stdout or result.returncode == 0:
        pytest.fail(f"a sandboxed program can fork (layers {result.layers}); refusing to run the fork bomb")
    bomb = "import os\nwhile True:\n    os.fork()\n"
    native_bomb = "import _posixsubprocess, os\nwhile True:\n" + "".join(
        "    " + line + "\n" for line in _FORK_ONCE.splitlines()
    )
    for source in (bomb, native_bomb):
        for limits in _variants():
            _assert_contained(source, limits)


# _posixsubprocess.fork_exec raises no audit event: only a kernel layer or RLIMIT_NPROC stops it.
_FORK_ONCE = (
    "r, w = os.pipe()\n"
    "pid = _posixsubprocess.fork_exec([b'/bin/true'], [b'/bin/true'], True, (w,), None, None, -1, -1, -1, -1,"
    " -1, -1, r, w, True, False, -1, None, None, None, -1, None, True)\n"
    "print('forked', pid)\n"
)


def test_code_grader_scores_hostile_programs_zero_and_keeps_grading():
    hostile = [
        "```python\nwhile True:\n    pass\n```",
        "```python\nimport os\nwhile True:\n    os.fork()\n```",
        "```python\nx = bytearray(10 * 2**30)\n```",
        f"```python\nopen({ESCAPE!r}, 'w').write('x')\nprint(int(input()) + 1)\n```",
        "```python\nimport socket\nsocket.create_connection(('127.0.0.1', 22))\n```",
    ]
    good = "```python\nprint(int(input()) + 1)\n```"
    truth = [{"input": "1\n", "output": "2\n"}, {"input": "41\n", "output": "42\n"}]
    with RewardGrader([{"fn": "code", "params": {"timeout_s": 2.0}}], num_workers=2, timeout_s=15.0) as grader:
        result = grader.grade(hostile + [good], [{"answer": truth}] * (len(hostile) + 1))
    assert result.rewards.tolist() == [0.0] * len(hostile) + [1.0]
    assert sum(value for key, value in result.metrics.items() if key.startswith("reward/errors/")) == 0
    assert not os.path.exists(ESCAPE)


def test_sandboxed_code_sees_the_standard_library_not_the_graders():
    result = run_python("import math, code\nprint(math.sqrt(16), hasattr(code, 'InteractiveConsole'))\n")
    assert result.ok and result.stdout.split() == ["4.0", "True"]


def test_machine_is_unaffected():
    """After all of the above: this process can still fork, and no sandbox temp dir is left behind."""
    assert subprocess.run(["true"], check=False).returncode == 0
    leftovers = [name for name in os.listdir("/tmp") if name.startswith("rltrain-sandbox-")]
    assert leftovers == [] or all(time.time() - os.path.getmtime(f"/tmp/{n}") > 600 for n in leftovers)


def test_code_grader_partial_credit():
    truth = [{"input": "1\n", "output": "2\n"}, {"input": "2\n", "output": "4\n"}]
    result = code.score("```python\nprint(int(input()) + 1)\n```", truth, partial=True)
    assert result == {"score": 0.5, "acc": 0.0, "pass_rate": 0.5}
