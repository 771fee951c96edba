"""Tracker: config.yaml, metrics.jsonl durability / resume / non-finite values, plots, W&B (offline and failing)."""

from __future__ import annotations

import json
import math
import os

import pytest
import yaml

from rltrain import plots
from rltrain.errors import RunError
from rltrain.tracking import (
    EVAL_TABLE_COLUMNS,
    WANDB_ID_FILE,
    Tracker,
    eval_table_rows,
    lag_histogram,
    log_eval_to_wandb,
    read_metrics,
    resolve_wandb_mode,
    to_finite_record,
    truncate_metrics,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def strict_json(line: str) -> dict:
    """json.loads that rejects the NaN / Infinity literals Python's json module would otherwise accept."""

    def reject(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=reject)


def steps_in(path: str) -> list[int]:
    with open(path, encoding="utf-8") as f:
        return [strict_json(line)["step"] for line in f]


def make_tracker(run_dir, **kwargs) -> Tracker:
    kwargs.setdefault("total_steps", 10)
    kwargs.setdefault("progress", False)
    return Tracker(str(run_dir), {"run": {"name": "t", "seed": 3}, "tags": ("a", "b")}, **kwargs)


def test_config_yaml_is_the_resolved_config_written_atomically(tmp_path):
    tracker = make_tracker(tmp_path)
    tracker.finish(plots=False)
    with open(tmp_path / "config.yaml", encoding="utf-8") as f:
        assert yaml.safe_load(f) == {"run": {"name": "t", "seed": 3}, "tags": ["a", "b"]}
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_config_yaml_resolves_omegaconf_interpolations(tmp_path):
    from omegaconf import OmegaConf

    config = OmegaConf.create({"run": {"name": "x", "dir": "outputs/${run.name}"}})
    Tracker(str(tmp_path), config, total_steps=1, progress=False).finish(plots=False)
    with open(tmp_path / "config.yaml", encoding="utf-8") as f:
        assert yaml.safe_load(f)["run"]["dir"] == "outputs/x"


def test_log_writes_one_json_line_per_call_with_step_and_nulls_for_non_finite(tmp_path, caplog):
    tracker = make_tracker(tmp_path)
    tracker.log(1, {"reward/mean": 0.5, "loss/pg": float("nan"), "perf/step_time_s": 1})
    tracker.log(2, {"reward/mean": 0.75, "loss/pg": float("inf")})
    tracker.finish(plots=False)
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        records = [strict_json(line) for line in f]
    assert records == [
        {"step": 1, "reward/mean": 0.5, "loss/pg": None, "perf/step_time_s": 1.0},
        {"step": 2, "reward/mean": 0.75, "loss/pg": None},
    ]
    assert tracker.non_finite_counts == {"loss/pg": 2}
    assert "loss/pg" in caplog.text


def test_to_finite_record_accepts_numeric_scalars_and_names_bad_values():
    import numpy as np
    import torch

    record, non_finite = to_finite_record(4, {"a": np.float32(0.5), "b": torch.tensor(2), "c": True, "d": -math.inf})
    assert record == {"step": 4, "a": 0.5, "b": 2.0, "c": 1.0, "d": None}
    assert non_finite == ["d"]
    with pytest.raises(TypeError, match="'reward/mean'"):
        to_finite_record(1, {"reward/mean": "high"})
    with pytest.raises(ValueError, match="'step'"):
        to_finite_record(1, {"step": 2})
    with pytest.raises(ValueError, match="step"):
        to_finite_record(-1, {})


def test_partial_last_line_from_a_crash_is_skipped_by_readers_and_dropped_on_resume(tmp_path):
    tracker = make_tracker(tmp_path)
    for step in (1, 2, 3):
        tracker.log(step, {"reward/mean": step / 10})
    tracker._metrics_file.close()  # simulate a kill: no finish(), then a half-written line
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 4, "reward/me')

    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3]
    resumed = make_tracker(tmp_path, start_step=3)
    resumed.log(4, {"reward/mean": 0.4})
    resumed.finish(plots=False)
    assert steps_in(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]


def test_resume_drops_lines_after_start_step_so_there_are_no_duplicates(tmp_path):
    tracker = make_tracker(tmp_path)
    for step in range(6):
        tracker.log(step, {"reward/mean": 0.0})
    tracker.finish(plots=False)

    resumed = make_tracker(tmp_path, start_step=3)
    for step in (4, 5, 6):
        resumed.log(step, {"reward/mean": 1.0})
    resumed.finish(plots=False)
    assert steps_in(tmp_path / "metrics.jsonl") == [0, 1, 2, 3, 4, 5, 6]


def test_fresh_start_replaces_an_old_metrics_file(tmp_path):
    old = make_tracker(tmp_path)
    old.log(7, {"reward/mean": 0.0})
    old.finish(plots=False)
    new = make_tracker(tmp_path, start_step=0)
    new.log(1, {"reward/mean": 1.0})
    new.finish(plots=False)
    assert steps_in(tmp_path / "metrics.jsonl") == [1]


def test_truncate_metrics_drops_garbage_and_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"no_step": 1}\n{"step": 2}\n{"step": 3}\n', encoding="utf-8")
    assert truncate_metrics(str(path), last_step=2) == 3
    assert path.read_text(encoding="utf-8") == '{"step": 1}\n{"step": 2}\n'
    assert truncate_metrics(str(path), last_step=2) == 0


def test_finish_writes_png_plots_and_is_idempotent(tmp_path):
    tracker = make_tracker(tmp_path)
    for step in range(1, 13):
        tracker.log(step, {"reward/mean": step / 12, "reward/accuracy": step / 24, "rollout/response_len_mean": 20})
    tracker.log_eval(12, {"eval/accuracy": 0.4})
    paths = tracker.finish()
    assert sorted(os.path.basename(p) for p in paths) == ["accuracy.png", "response_length.png", "reward.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert tracker.finish() == []
    with pytest.raises(RuntimeError, match="after finish"):
        tracker.log(13, {})


def test_plots_skip_a_figure_with_no_data_and_merge_lines_of_one_step(tmp_path):
    records = [{"step": 0, "eval/accuracy": 0.1}, {"step": 2, "reward/mean": None}, {"step": 2, "eval/accuracy": 0.3}]
    assert plots.series_by_key(records) == {"eval/accuracy": ([0, 2], [0.1, 0.3])}
    written = plots.write_plots(records, str(tmp_path))
    assert [os.path.basename(p) for p in written] == ["accuracy.png"]
    assert plots.moving_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]


def test_progress_bar_shows_live_reward_and_accuracy(tmp_path, capsys):
    tracker = make_tracker(tmp_path, total_steps=2, progress=True, run_name="demo")
    tracker.log(1, {"reward/mean": 0.25, "rollout/response_len_mean": 17})
    tracker.log_eval(2, {"eval/accuracy": 0.5})
    tracker.print_summary(["eval accuracy 0.50"])
    tracker.finish(plots=False)
    out = capsys.readouterr().out
    assert "demo" in out and "reward 0.25" in out and "eval acc 0.5" in out and "len 17" in out
    assert "eval accuracy 0.50" in out


def test_resolve_wandb_mode(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    with pytest.raises(ValueError, match="sometimes"):
        resolve_wandb_mode("sometimes")


def test_resolve_wandb_mode_auto_is_online_with_a_netrc_login(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_path = tmp_path / "netrc"
    netrc_path.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n", encoding="utf-8")
    netrc_path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_path))
    assert resolve_wandb_mode("auto") == "online"


class FakeRun:
    def __init__(self, fail_log: bool = False):
        self.logged, self.finished, self.fail_log = [], None, fail_log

    def log(self, metrics, step):
        if self.fail_log:
            raise ConnectionError("network down")
        self.logged.append((step, metrics))

    def finish(self, exit_code=0):
        self.finished = exit_code


def test_wandb_mirrors_metrics_and_a_resumed_run_keeps_its_wandb_id(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    options = {"enabled": True, "mode": "offline", "project": "proj", "entity": None, "tags": ["cpu"]}
    tracker = make_tracker(tmp_path, wandb=options)
    run = tracker._wandb_run
    tracker.log(1, {"reward/mean": 0.5})
    tracker.finish(plots=False)
    assert run.logged == [(1, {"reward/mean": 0.5})] and run.finished == 0
    assert calls[0]["mode"] == "offline" and calls[0]["project"] == "proj" and calls[0]["tags"] == ["cpu"]

    make_tracker(tmp_path, wandb=options, start_step=1).finish(plots=False)
    assert calls[1]["id"] == calls[0]["id"] == (tmp_path / WANDB_ID_FILE).read_text().strip()


def test_wandb_failures_never_crash_the_run(tmp_path, monkeypatch, caplog):
    wandb = pytest.importorskip("wandb")

    def broken_init(**kwargs):
        raise RuntimeError("wandb service did not start")

    monkeypatch.setattr(wandb, "init", broken_init)
    tracker = make_tracker(tmp_path, wandb={"enabled": True, "mode": "online"})
    assert not tracker.wandb_active and "wandb service did not start" in caplog.text
    tracker.log(1, {"reward/mean": 1.0})

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FakeRun(fail_log=True))
    flaky = make_tracker(tmp_path / "flaky", wandb={"enabled": True, "mode": "offline"})
    flaky.log(1, {"reward/mean": 1.0})
    flaky.log(2, {"reward/mean": 1.0})
    assert not flaky.wandb_active and caplog.text.count("network down") == 1
    flaky.finish(plots=False)
    assert steps_in(tmp_path / "flaky" / "metrics.jsonl") == [1, 2]


def _offline_runs(wandb_dir) -> list:
    return sorted(path for path in wandb_dir.iterdir() if path.name.startswith("offline-run-"))


def _summary_table(run_dir) -> dict:
    """The eval summary table W&B wrote into an offline run's files."""
    (table,) = (run_dir / "files" / "media" / "table" / "eval").glob("table_summary_*.table.json")
    return json.loads(table.read_text())


def test_wandb_offline_run_is_written_under_the_run_dir_with_the_latest_eval_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = make_tracker(tmp_path, wandb={"enabled": True, "mode": "auto", "project": "rltrain-test"})
    assert tracker.wandb_active
    tracker.log(0, {"eval/accuracy": 0.1, "eval/gsm8k/pass@1": 0.1, "eval/math500/maj@4": 0.2})
    tracker.log(1, {"reward/mean": 0.5, "eval/gsm8k/pass@1": 0.3})
    tracker.finish(plots=False)
    (offline_run,) = _offline_runs(tmp_path / "wandb")
    assert any(path.suffix == ".wandb" for path in offline_run.iterdir())
    table = _summary_table(offline_run)
    assert table["columns"] == list(EVAL_TABLE_COLUMNS)
    assert table["data"] == [["gsm8k", "pass@1", 0.3], ["math500", "maj@4", 0.2]]


def test_eval_table_rows_are_the_per_set_eval_keys():
    metrics = {"eval/accuracy": 0.5, "reward/mean": 1.0, "eval/heldout/pass@2": 0.75, "eval/gsm8k/avg@1": None}
    assert eval_table_rows(metrics) == [["heldout", "pass@2", 0.75]]
    assert eval_table_rows({"eval/accuracy": 0.5}) == []


def test_an_evaluation_is_logged_to_its_own_offline_wandb_run_with_the_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    metrics = {"eval/heldout/pass@1": 0.25, "eval/heldout/maj@1": 0.25}
    options = {"enabled": True, "mode": "auto", "project": "rltrain-test"}
    assert log_eval_to_wandb(options, str(tmp_path), "eval", {"eval": {"sets": ["heldout"]}}, metrics)
    (offline_run,) = _offline_runs(tmp_path / "wandb")
    assert _summary_table(offline_run)["data"] == [["heldout", "pass@1", 0.25], ["heldout", "maj@1", 0.25]]
    assert not log_eval_to_wandb({**options, "enabled": False}, str(tmp_path / "off"), "eval", {}, metrics)
    assert not (tmp_path / "off").exists()


def test_a_full_disk_under_metrics_is_a_run_error_naming_the_file(tmp_path):
    os.symlink("/dev/full", tmp_path / "metrics.jsonl")  # every write fails with ENOSPC
    tracker = make_tracker(tmp_path, total_steps=1, progress=False, wandb=None)
    with pytest.raises(RunError) as err:
        tracker.log(1, {"reward/mean": 0.5})
    assert str(err.value) == (f"cannot write metrics to {tmp_path / 'metrics.jsonl'}: No space left on device (ENOSPC)")


def test_an_unwritable_run_dir_is_a_run_error_naming_config_yaml(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run dir should be")
    with pytest.raises(RunError, match=r"cannot write .*file/run/config.yaml: Not a directory \(ENOTDIR\)"):
        Tracker(str(blocker / "run"), {}, total_steps=1, progress=False)


def test_a_plot_that_cannot_be_written_is_a_run_error_naming_it(tmp_path):
    (tmp_path / "reward.png").mkdir()  # a directory in the plot's place: the final rename fails
    records = [{"step": s, "reward/mean": 0.1 * s} for s in range(3)]
    with pytest.raises(RunError, match=r"cannot write plot .*reward.png: Is a directory \(EISDIR\)"):
        plots.write_plots(records, str(tmp_path))
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []


def test_tokens_per_version_lags_become_one_wandb_histogram(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: FakeRun())
    tracker = make_tracker(tmp_path, wandb={"enabled": True, "mode": "offline"})
    lags = {"rollout/tokens_per_version/lag_0": 30.0, "rollout/tokens_per_version/lag_2": 10.0}
    tracker.log(1, {"reward/mean": 0.5, **lags})
    ((step, logged),) = tracker._wandb_run.logged
    histogram = logged["rollout/tokens_per_version"]
    assert isinstance(histogram, wandb.Histogram) and histogram.histogram == [30.0, 0.0, 10.0]
    assert logged["rollout/tokens_per_version/lag_2"] == 10.0  # the scalars stay
    assert lag_histogram({"reward/mean": 1.0}) is None
    tracker.finish(plots=False)
