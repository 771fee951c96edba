"""rltrain-eval on environment recipes: episodes through the environment (the in-training evaluation's code), a
clear ConfigError for sets episodes cannot score, eval.json with the eval/env/* metrics."""

from __future__ import annotations

import contextlib
import json

import pytest
from fake_runtime import FakeRuntime, compose, prepared
from omegaconf import OmegaConf
from test_env_episodes import COUNTING_ENV, EpisodeRuntime, Tokenizer, env_file, in_process_calls

from rltrain.config import ConfigError
from rltrain.eval import cli
from rltrain.eval.episodes import env_eval_set, evaluate_env_set
from rltrain.eval.sets import EvalSet, parse_eval_sets
from rltrain.trainer import Trainer


def _prep(num_rows: int = 6):
    prep = prepared(num_rows)
    prep.tokenizer = Tokenizer()
    prep.eval_rows, prep.eval_prompts = prep.train_rows, prep.train_prompts
    return prep


def test_env_eval_reports_what_in_training_evaluation_logs(tmp_path):
    fn = env_file(tmp_path, COUNTING_ENV, "countingEnv")
    cfg, prep = compose([f"env.fn={fn}"]), _prep()
    trained = Trainer(cfg, prep, EpisodeRuntime(max_len=5, env_calls=in_process_calls(fn))).evaluate()
    metrics, num_rows = evaluate_env_set(
        cfg, prep, EvalSet("heldout"), FakeRuntime(max_len=5).generate, in_process_calls(fn)
    )
    assert num_rows == 6
    assert {f"eval/{key}": value for key, value in metrics.items()} == trained
    assert metrics["env/turns_mean"] == 3.0 and metrics["env/tool_calls_mean"] == 2.0


def test_env_eval_applies_the_sets_limit_temperature_and_max_tokens(tmp_path):
    fn = env_file(tmp_path, COUNTING_ENV, "countingEnv")
    runtime, seen = FakeRuntime(max_len=5), []

    def generate(requests, params):
        seen.append(params)
        return runtime.generate(requests, params)

    spec = EvalSet("heldout", temperature=0.7, max_tokens=3, limit=4)
    metrics, num_rows = evaluate_env_set(compose([f"env.fn={fn}"]), _prep(), spec, generate, in_process_calls(fn))
    assert num_rows == 4 and metrics["num_prompts"] == 4.0
    assert {(p.temperature, p.max_tokens) for p in seen} == {(0.7, 3)}
    first_turns = runtime.requests[0]  # later turns: only the episodes not yet done
    assert len(first_turns) == 4 and all(request.n == 1 for request in first_turns)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ("[gsm8k]", r"eval.sets=\['gsm8k'\]: with env.fn=.* eval.sets=\[heldout\]"),
        ("[heldout, gsm8k]", r"eval.sets=\['heldout', 'gsm8k'\]"),
        ("[{name: heldout, path: rows.jsonl}]", r"eval.sets=\['heldout'\]"),
        ("[{name: heldout, n: 4}]", r"eval.sets\[0\].n=4: .*only temperature, max_tokens, limit"),
        ("[{name: heldout, reward: math}]", r"eval.sets\[0\].reward=math"),
    ],
)
def test_env_recipes_refuse_sets_episodes_cannot_score(sets, message):
    specs = parse_eval_sets(OmegaConf.create({"s": OmegaConf.create(sets)})["s"], "eval.sets")
    with pytest.raises(ConfigError, match=message):
        env_eval_set(specs, "feedback")


def test_rltrain_eval_of_an_env_recipe_writes_episode_metrics_to_eval_json(tmp_path, monkeypatch, capsys):
    fn = env_file(tmp_path, COUNTING_ENV, "countingEnv")
    prep, runtime = _prep(), FakeRuntime(max_len=5)
    monkeypatch.setattr("rltrain.prepare.prepare", lambda cfg, with_sft: prep)
    monkeypatch.setattr(cli, "generation", lambda cfg, path: contextlib.nullcontext(runtime.generate))
    cfg = compose([f"env.fn={fn}", f"eval.output_dir={tmp_path}", "reward.num_workers=1"])
    report = cli.evaluate_model(cfg)
    heldout = report["sets"]["heldout"]
    assert heldout["num_rows"] == 6 and heldout["env/turns_mean"] == 3.0 and heldout["settings"]["env"] == fn
    assert 0.0 <= heldout["accuracy"] <= 1.0 and heldout["accuracy"] == heldout["env/acc_mean"]
    assert json.loads((tmp_path / "eval.json").read_text()) == report
    assert not (tmp_path / "samples.jsonl").exists()
    assert "eval/env/turns_mean" in capsys.readouterr().out


def test_rltrain_eval_refuses_an_env_recipe_set_before_loading_anything(tmp_path, monkeypatch):
    def must_not_run(cfg, with_sft):
        raise AssertionError("prepare ran")

    monkeypatch.setattr("rltrain.prepare.prepare", must_not_run)
    cfg = compose(["env.fn=feedback", "eval.sets=[gsm8k]", f"eval.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="eval.sets=.*env.fn=feedback"):
        cli.evaluate_model(cfg)
