"""The eval runner: samples.jsonl resume after a kill, metrics from the log, in-training evaluation keys."""

from __future__ import annotations

import dataclasses
import json

import pytest
from fake_runtime import FakeRuntime, FakeTokenizer, compose, prepared

from rltrain.eval.run import SampleLog, SetJob, evaluate_policy, evaluate_sets, missing_samples
from rltrain.eval.sets import EvalSet
from rltrain.types import SamplingParams

N = 3
ROWS = [{"id": f"p{i}", "prompt": f"q{i}", "answer": "4", "kind": i % 3} for i in range(5)]


class Killed(Exception):
    pass


def _job(runtime: FakeRuntime) -> SetJob:
    def grade(completions, rows):
        result = runtime.grade(completions, rows)
        return (result.rewards >= 0.5).tolist(), result.rewards.tolist()

    params = SamplingParams(temperature=1.0, max_tokens=8)
    prompts = [[1, 2, 10 + i] for i in range(len(ROWS))]
    return SetJob(EvalSet("toy", n=N, temperature=1.0), ROWS, prompts, params, grade, "countdown")


def _run(path, runtime: FakeRuntime, generate=None) -> dict:
    with SampleLog(path) as log:
        job = _job(runtime)
        return evaluate_sets([job], log, generate or runtime.generate, FakeTokenizer().decode, chunk_prompts=2)


def test_a_killed_evaluation_resumes_without_regenerating_done_samples(tmp_path):
    reference = _run(str(tmp_path / "whole.jsonl"), FakeRuntime())
    path = str(tmp_path / "samples.jsonl")
    runtime = FakeRuntime()
    calls = []

    def dies_on_the_second_chunk(requests, params):
        calls.append(requests)
        if len(calls) == 2:
            raise Killed
        return runtime.generate(requests, params)

    with pytest.raises(Killed):
        _run(path, runtime, dies_on_the_second_chunk)
    with open(path) as f:
        done = [json.loads(line) for line in f]
    assert sorted((r["prompt_id"], r["index"]) for r in done) == [(f"p{i}", j) for i in range(2) for j in range(N)]
    with open(path, "a") as f:
        f.write('{"set": "toy", "prompt_id": "p2", "ind')  # a line cut by the kill

    resumed = FakeRuntime()
    assert _run(path, resumed) == reference
    regenerated = [r.prompt_ids[-1] - 10 for batch in resumed.requests for r in batch]
    assert regenerated == [2, 3, 4]
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == len(ROWS) * N
    assert set(lines[0]) >= {"set", "prompt_id", "index", "completion", "answer", "gold", "correct", "length"}


def test_only_missing_sample_indices_are_generated(tmp_path):
    with SampleLog(None) as log:
        job = _job(FakeRuntime())
        log.append([{"set": "toy", "prompt_id": "p0", "index": 1}])
        assert missing_samples(job, log)[0] == (0, [0, 2])
        assert [position for position, _ in missing_samples(job, log)] == [0, 1, 2, 3, 4]


class EncodingTokenizer(FakeTokenizer):
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_samples_of_another_model_or_setting_are_regenerated_not_reused(tmp_path):
    path = str(tmp_path / "samples.jsonl")
    _run(path, FakeRuntime())
    with SampleLog(path) as log:
        assert missing_samples(_job(FakeRuntime()), log) == []
        other_model = dataclasses.replace(_job(FakeRuntime()), identity="another-model")
        assert missing_samples(other_model, log) == [(i, list(range(N))) for i in range(len(ROWS))]


def test_sample_identity_follows_model_and_sampling_settings():
    from rltrain.eval.run import sample_identity

    spec, params = EvalSet("toy", n=N, temperature=1.0), SamplingParams(temperature=1.0, max_tokens=8)
    base = sample_identity("/models/a", spec, params)
    assert base == sample_identity("/models/a", spec, params)
    assert base != sample_identity("/models/b", spec, params)
    assert base != sample_identity("/models/a", dataclasses.replace(spec, temperature=0.6), params)
    assert base != sample_identity("/models/a", spec, dataclasses.replace(params, max_tokens=16))


def test_in_training_evaluation_logs_each_set_and_the_compat_keys():
    cfg = compose(["trainer.eval_sets=[{name:heldout,n:4,temperature:1.0}]"])
    prep = dataclasses.replace(prepared(), tokenizer=EncodingTokenizer(), eval_rows=ROWS)
    runtime = FakeRuntime()
    metrics = evaluate_policy(cfg, prep, runtime.generate, runtime.grade)
    for k in range(1, 5):
        assert f"eval/heldout/pass@{k}" in metrics and f"eval/heldout/maj@{k}" in metrics
    assert metrics["eval/heldout/pass@1"] <= metrics["eval/heldout/pass@4"]
    assert metrics["eval/accuracy"] == metrics["eval/heldout/pass@1"] == metrics["eval/heldout/avg@4"]
    assert [r.n for r in runtime.requests[0]] == [4] * len(ROWS)


def test_without_eval_sets_training_logs_greedy_heldout_pass_at_1_only():
    prep = dataclasses.replace(prepared(), tokenizer=EncodingTokenizer(), eval_rows=ROWS)
    runtime = FakeRuntime()
    metrics = evaluate_policy(compose(), prep, runtime.generate, runtime.grade)
    assert sorted(metrics) == ["eval/accuracy", "eval/num_prompts", "eval/response_len_mean", "eval/reward_mean"]
    assert metrics["eval/num_prompts"] == len(ROWS)
