"""rltrain-bench step: its pure parts (the timed runs are measured in docs/benchmarks.md, not tested)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from rltrain.bench import step
from rltrain.bench.trl_peer import INSTALL_HINT, reward_function


def metrics_row(step_no: int, rollout: float, train: float, total: float) -> dict:
    return {"step": step_no, "perf/rollout_s": rollout, "perf/train_s": train, "perf/step_time_s": total}


def test_phase_medians_leave_out_warmup_and_count_the_rest_as_other():
    rows = [
        metrics_row(1, 9.0, 9.0, 20.0),  # warm-up
        metrics_row(2, 0.2, 0.3, 0.6),
        metrics_row(3, 0.4, 0.3, 0.8),
        metrics_row(4, 0.3, 0.5, 0.9),
        {"step": 4, "eval/accuracy": 0.5},  # a row without step time (not a timed step)
    ]
    medians = step.phase_medians(rows, warmup=1)
    assert medians["rollout"] == pytest.approx(0.3)
    assert medians["train"] == pytest.approx(0.3)
    assert medians["logprobs"] == 0.0  # not logged: the train forward gave the old logprobs
    assert medians["step"] == pytest.approx(0.8)
    assert medians["other"] == pytest.approx(0.1)  # per step 0.1, 0.1, 0.1


def test_phase_medians_without_a_timed_step_is_an_error():
    with pytest.raises(RuntimeError, match="no step after the first 2"):
        step.phase_medians([metrics_row(1, 0.1, 0.1, 0.3), metrics_row(2, 0.1, 0.1, 0.3)], warmup=2)


def test_median_of_runs_is_per_phase():
    runs = [{"step": 1.0, "train": 0.5}, {"step": 3.0, "train": 0.1}, {"step": 2.0, "train": 0.2}]
    assert step.median_of_runs(runs) == {"step": 2.0, "train": 0.2}


def test_rltrain_command_puts_the_prepared_model_after_the_overrides():
    command = step.rltrain_command("quickstart", ["rollout.n=4", "model.path=tiny"], "/m", "/r", steps=7)
    assert command[1:5] == ["-m", "rltrain", "--config-name", "quickstart"]
    tail = command[5:]
    assert tail.index("model.path=/m") > tail.index("model.path=tiny")  # Hydra: the last value wins
    assert {"sft.enabled=false", "trainer.steps=7", "run.dir=/r"} <= set(tail)


def test_peer_without_trl_installed_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # find_spec("trl") is None: as if it were not installed
    with pytest.raises(SystemExit) as exit_info:
        step.parse_args(["--peer", "trl"])
    assert exit_info.value.code == 2
    assert INSTALL_HINT in capsys.readouterr().err
    assert "pip install 'rltrain[bench]'" in INSTALL_HINT


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--runs", "0"], ["--steps", "3", "--warmup", "3"]])
def test_bad_counts_are_refused(argv):
    with pytest.raises(SystemExit):
        step.parse_args(argv)


def test_the_workload_runs_asynchronously_with_shared_prompts_unless_overridden(monkeypatch):
    seen = []

    class Prepared(Exception):
        """Stops the bench where it would start preparing the model."""

    def prepare_workload(recipe, overrides):
        seen.append(overrides)
        raise Prepared

    monkeypatch.setattr(step, "prepare_workload", prepare_workload)
    with pytest.raises(Prepared):
        step.main(["trainer.max_staleness=0"])
    overrides = seen[0]
    assert {"trainer.max_staleness=1", "learner.share_prefixes=true", "rollout.n=4"} <= set(overrides)
    assert overrides.index("trainer.max_staleness=0") > overrides.index("trainer.max_staleness=1")  # the last wins


def test_overrides_follow_the_options():
    args = step.parse_args(["--runs", "2", "rollout.n=8", "trainer.prompts_per_step=4"])
    assert args.runs == 2 and args.peer is None
    assert args.overrides == ["rollout.n=8", "trainer.prompts_per_step=4"]


def test_peer_spec_matches_the_rltrain_workload():
    cfg = OmegaConf.create(
        {
            "trainer": {"prompts_per_step": 2},
            "data": {"template": "plain", "system_prompt": None},
            "reward": {"functions": [{"fn": "countdown", "weight": 1.0}]},
            "rollout": {"n": 4, "max_tokens": 32, "temperature": 1.0},
            "learner": {"lr": 2e-4},
            "run": {"seed": 0},
        }
    )
    rows = [{"prompt": f"Use 1, {i} to make:", "answer": {"target": i + 1, "numbers": [1, i]}} for i in range(9)]
    prep = SimpleNamespace(model_path="/model", train_rows=rows, tokenizer=None)
    spec = step.peer_spec(cfg, prep, steps=3, threads=2)
    assert spec["prompts"] == [row["prompt"] for row in rows[:6]]  # 3 steps x 2 prompts
    assert [json.loads(r) for r in spec["rows"]] == rows[:6]
    assert (spec["num_generations"], spec["max_completion_length"], spec["prompts_per_step"]) == (4, 32, 2)
    assert (spec["model_dir"], spec["learning_rate"], spec["threads"]) == ("/model", 2e-4, 2)


def test_trl_reward_scores_with_rltrain_reward_functions():
    score = reward_function([{"fn": "countdown", "weight": 2.0}])
    row = json.dumps({"prompt": "Use 16, 17 to make 1:", "answer": {"target": 1, "numbers": [16, 17]}})
    assert score(["p", "p"], ["17-16", "16+17"], [row, row]) == [2.0, 0.0]


def test_report_has_the_phase_table_and_with_a_peer_the_ratio():
    rltrain = {"rollout": 0.2, "grading": 0.0, "logprobs": 0.0, "train": 0.2, "weight sync": 0.02, "other": 0.01}
    rltrain["step"] = 0.43
    alone = step.format_report("title", rltrain, None)
    assert "TRL" not in alone and "train" in alone and "0.430" in alone
    paired = step.format_report("title", rltrain, {"generate": 0.3, "step": 0.5})
    assert "rltrain / TRL step time: 0.86x" in paired
    assert "0.500" in paired and "0.300" in paired
