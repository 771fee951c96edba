"""rltrain-bench pipeline: its arguments, a run's figures from metrics rows, the per-setting medians."""

from __future__ import annotations

import pytest

from rltrain.bench.pipeline import LONG_RESPONSES, LONG_RESPONSES_RECIPE, medians, parse_args, summarize_run, workload


def _rows(step_times, rollout, accuracy=(0.2, 0.5), waits=None):
    rows = [{"step": 0, "eval/accuracy": accuracy[0]}]
    for step, (seconds, gen) in enumerate(zip(step_times, rollout), start=1):
        row = {"step": step, "perf/step_time_s": seconds, "perf/rollout_s": gen, "rollout/decoded": 100.0}
        if waits:
            row["perf/buffer_wait_s"] = waits[step - 1]
        rows.append(row)
    rows[-1]["eval/accuracy"] = accuracy[1]
    return rows


def test_a_run_is_summarised_from_its_metrics():
    run = summarize_run(_rows([2.0, 2.0, 4.0], [1.0, 1.0, 2.0], waits=[0.5, 0.0, 0.0]), 1, process_s=30.0)
    assert run["wall_s"] == 8.0 and run["steps"] == 3 and run["tokens_generated"] == 300
    assert run["eval_accuracy_before"] == 0.2 and run["eval_accuracy_after"] == 0.5
    assert run["generation_share"] == pytest.approx(0.5) and run["buffer_wait_s"] == 0.5
    with pytest.raises(RuntimeError, match="no steps"):
        summarize_run([{"step": 0, "eval/accuracy": 0.1}], 0, 1.0)


def test_medians_per_setting_and_arguments():
    runs = [summarize_run(_rows([t], [0.5]), k, 1.0) for k, t in [(0, 3.0), (1, 2.0), (0, 5.0), (1, 1.0), (0, 4.0)]]
    table = medians(runs, [0, 1])
    assert [(row["max_staleness"], row["runs"], row["wall_s"]) for row in table] == [(0, 3, 4.0), (1, 2, 1.5)]
    args = parse_args(["--staleness", "0,2", "trainer.steps=5"])
    assert args.settings == [0, 2]
    recipe, overrides = workload(args)
    assert recipe == LONG_RESPONSES_RECIPE and overrides[: len(LONG_RESPONSES)] == list(LONG_RESPONSES)
    assert overrides[-1] == "trainer.steps=5"  # the user's overrides come last
    assert workload(parse_args(["--recipe", "quickstart"]))[1][-1] == "trainer.save_every=1000"
    with pytest.raises(SystemExit):
        parse_args(["--staleness", "one"])
