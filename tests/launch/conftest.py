"""The launchers for real: a one-node Slurm started here (tests/launch/slurm_node.sh) and a Ray head with its
dashboard. Run by `make launch` (`pytest -m launch tests/launch`), after the integration suite; selected
only with ``-m launch``. Where this OS cannot run Slurm (no apt-get, not root) the Slurm tests are skipped
with a banner saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from launching import SKIPPED, SLURM_NODE, banner


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "launch: the Slurm and `ray job submit` launchers for real (make launch)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "launch" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="launcher tests start Slurm and Ray: run them with `make launch`")
    for item in items:
        if "launch" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_cache():
    """One model cache for every launched run: the tiny model and its SFT warm start are built once."""
    path = tempfile.mkdtemp(prefix="rltrain-launch-cache-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def launch_env(model_cache) -> dict[str, str]:
    """The environment a launched run needs: this venv first on PATH (sbatch exports it), offline, one thread."""
    bin_dir = os.path.dirname(sys.executable)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "PYTHON": sys.executable,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RLTRAIN_CACHE": model_cache,
    }


@pytest.fixture(scope="session")
def slurm():
    """A one-node Slurm (started here, stopped at the end, unless one was already running)."""
    proc = subprocess.run([SLURM_NODE, "up"], capture_output=True, text=True, timeout=300)
    if proc.returncode == SKIPPED:
        banner(f"SLURM TESTS SKIPPED: {proc.stderr.strip()}")
        pytest.skip(f"no one-node Slurm on this OS: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"slurm_node.sh up failed:\n{proc.stdout}\n{proc.stderr}"
    yield
    subprocess.run([SLURM_NODE, "down"], capture_output=True, text=True, timeout=120)
