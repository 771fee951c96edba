"""Progress in logs that are files (Slurm, CI): plain lines, no ANSI, one per ``tracking.log_every_s`` seconds."""

from __future__ import annotations

import io
import json
import os

import rltrain.tracking
from rltrain.progress_log import PlainProgress, plain_ray_logs, progress_line
from rltrain.tracking import Tracker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_line_names_step_reward_accuracy_step_time_and_eta():
    latest = {"reward/mean": 0.25, "reward/accuracy": 0.125, "perf/step_time_s": 1.2345, "loss/total": 3.0}
    line = progress_line("quickstart", 3, 5, latest, elapsed_s=12.0, steps_done=3)
    assert line == "quickstart step 3/5 (60%)  reward 0.25  acc 0.125  step 1.23s  elapsed 0:00:12  ETA 0:00:08"


def test_a_resumed_run_estimates_from_the_steps_it_ran_itself():
    line = progress_line("run", 12, 20, {}, elapsed_s=20.0, steps_done=2)  # resumed at step 10
    assert line.endswith("elapsed 0:00:20  ETA 0:01:20")


def test_lines_come_at_most_every_interval_and_always_for_the_last_step():
    clock, out = FakeClock(), io.StringIO()
    progress = PlainProgress("run", total_steps=4, start_step=0, every_s=30.0, stream=out, clock=clock)
    assert progress.update(0, {"eval/accuracy": 0.5}) is None  # evaluation before training is not a step
    clock.now += 5
    assert progress.update(1, {"reward/mean": 1.0}).startswith("run step 1/4")
    clock.now += 10
    assert progress.update(2, {"reward/mean": 1.0}) is None
    clock.now += 25
    assert progress.update(3, {"reward/mean": 1.0}).startswith("run step 3/4")
    clock.now += 1
    assert progress.update(4, {"reward/mean": 1.0}).startswith("run step 4/4")
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["1/4", "3/4", "4/4"]
    assert "\x1b" not in out.getvalue()


def test_interval_zero_prints_every_step():
    out = io.StringIO()
    progress = PlainProgress("run", total_steps=3, start_step=0, every_s=0.0, stream=out, clock=FakeClock())
    for step in (1, 2, 3):
        progress.update(step, {})
    assert len(out.getvalue().splitlines()) == 3


def _tracker(tmp_path, **kwargs) -> Tracker:
    return Tracker(str(tmp_path / "run"), {}, total_steps=2, run_name="demo", wandb=None, **kwargs)


def test_a_tracker_writing_to_a_file_prints_plain_lines(tmp_path, capsys):
    tracker = _tracker(tmp_path, log_every_s=0.0)
    tracker.log(1, {"reward/mean": 0.25})
    tracker.log(2, {"reward/mean": 0.5})
    tracker.finish(plots=False)
    out = capsys.readouterr().out
    assert [line.split()[:3] for line in out.splitlines()] == [["demo", "step", "1/2"], ["demo", "step", "2/2"]]
    assert "\x1b" not in out
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_a_tracker_on_a_terminal_draws_the_live_bar_instead(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rltrain.tracking, "is_terminal", lambda stream: True)
    tracker = _tracker(tmp_path, log_every_s=0.0)
    tracker.log(1, {"reward/mean": 0.25})
    assert tracker._plain is None and tracker._progress is not None
    tracker.finish(plots=False)
    assert "demo step 1/2" not in capsys.readouterr().out


def test_ray_log_colours_are_turned_off_for_a_file_only(monkeypatch):
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    plain_ray_logs(io.StringIO())
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    plain_ray_logs(io.StringIO())
    assert os.environ["RAY_COLOR_PREFIX"] == "1"  # the user's choice stays
