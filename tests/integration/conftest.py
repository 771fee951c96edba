"""Integration tests run the real backends. With RLTRAIN_REQUIRE_BACKENDS=1 (set by `make test` / CI),
a missing backend or a skipped test is a failure, so CI cannot go green without vLLM and DeepSpeed."""

from __future__ import annotations

import importlib
import os

import pytest

REQUIRED = ("ray", "vllm", "deepspeed")
_STRICT = os.environ.get("RLTRAIN_REQUIRE_BACKENDS") == "1"


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _STRICT:
        return
    missing = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - report any import failure, e.g. a broken torchvision
            missing.append(f"{name}: {type(err).__name__}: {err}")
    if missing:
        raise pytest.UsageError("integration backends cannot be imported:\n  " + "\n  ".join(missing))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _STRICT and report.skipped and "gpu" not in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"skipped under RLTRAIN_REQUIRE_BACKENDS=1 (integration tests must run): {report.longrepr}"


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> dict[int, dict]:
    """step -> metrics of the RESUMABLE run (test_quickstart_e2e) never stopped: the reference of every test that
    stops such a run (Ctrl-C, SIGKILL, SIGTERM, a dead learner) and resumes it. One run for the session."""
    from test_quickstart_e2e import RESUMABLE, _metrics, _rltrain

    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    _rltrain(tmp_path, *RESUMABLE, f"run.dir={tmp_path / 'run'}")
    return {record["step"]: record for record in _metrics(tmp_path / "run")}
