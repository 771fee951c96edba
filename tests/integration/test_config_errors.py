"""A bad value through the real CLI: exit 2 with ``rltrain: config error: <key>=<value>: ...``, before Ray starts.

Each call stops in the validation pass (no data, model, SFT or Ray work), so it takes seconds; RAY_TMPDIR points
at a fresh folder that Ray would create its session in, and it must not exist afterwards.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_quickstart_e2e import _command, _env

pytestmark = pytest.mark.integration

# (overrides, the key the message must name): the seven values, then two silent failures it lists.
CASES = [
    (["algorithm.clip_low=1.5"], "algorithm.clip_low"),
    (["algorithm.kl_estimator=k9"], "algorithm.kl_estimator"),
    (["rollout.temperature=-1"], "rollout.temperature"),
    (["rollout.top_p=1.5"], "rollout.top_p"),
    (["algorithm.clip_high=-1"], "algorithm.clip_high"),
    (["learner.lr=-1"], "learner.lr"),
    (
        ["rollout=tree", "rollout.tree.init_divergence_min=9", "rollout.tree.init_divergence_max=2"],
        "rollout.tree.init_divergence_min",
    ),
    (["rollout.n=1"], "rollout.n"),
    (["learner.grad_clip=-1"], "learner.grad_clip"),
]
# Every other key's invalid values go through the same validation in-process: tests/unit/test_validation_table.py


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """key -> (the CLI's outcome, its RAY_TMPDIR) for every case, the calls run side by side: each is mostly the
    interpreter's start and imports, so they overlap on the cores instead of queueing (9 calls: ~21 s -> ~9 s)."""
    started = {}
    for overrides, key in CASES:
        tmp_path = tmp_path_factory.mktemp(key)
        env = {**_env(), "RAY_TMPDIR": str(tmp_path / "ray")}
        command = _command(
            tmp_path, f"run.dir={tmp_path / 'run'}", *overrides, cache_dir=tmp_path / "cache", own_ray=True
        )
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        started[key] = (command, process, tmp_path)
    finished = {}
    for key, (command, process, tmp_path) in started.items():
        stdout, stderr = process.communicate(timeout=180)
        finished[key] = (subprocess.CompletedProcess(command, process.returncode, stdout, stderr), tmp_path)
    return finished


@pytest.mark.parametrize("key", [key for _, key in CASES])
def test_bad_value_is_a_config_error_before_ray(outcomes, key):
    proc, tmp_path = outcomes[key]
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rltrain: config error: ") and f" {key}=" in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "Ray" not in proc.stderr and not (tmp_path / "ray").exists()
    assert not (tmp_path / "cache").exists()  # no tiny model, no SFT
