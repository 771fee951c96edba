"""Episodes: exact token bookkeeping, environment rewards in the trainer, hostile environments in grader processes."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import pytest
import torch
from fake_runtime import FakeRuntime, FakeTokenizer, compose, prepared

from rltrain.env.runner import EnvRunner
from rltrain.env.worker import load_env, run_env_call
from rltrain.errors import RunError
from rltrain.grading.pool import Outcome
from rltrain.sampling.episodes import EpisodeLimits, EpisodeSampler
from rltrain.trainer import Trainer
from rltrain.types import SamplingParams

# Turn 1 and 2 get an observation "100 101 102"; turn 3 ends the episode with reward 1 iff the last turn had an
# even number of tokens (metric "acc" the same). Observations are token ids as text (the fake tokenizer).
COUNTING_ENV = """
from rltrain.env.base import StepResult

class CountingEnv:
    def __init__(self, turns=3):
        self.turns, self.turn = turns, 0

    def reset(self, row):
        return ""

    def step(self, action_text, action_ids):
        self.turn += 1
        if self.turn >= self.turns:
            even = float(len(action_ids) % 2 == 0)
            return StepResult(reward=even, done=True, metrics={"acc": even})
        return StepResult(observation="100 101 102", metrics={"tool_calls": 1.0})
"""

# Behaviour by row["kind"]: raise, hang, a 10 MB observation, non-UTF-8 bytes (then done), else a one-turn episode.
HOSTILE_ENV = """
import time

class HostileEnv:
    def reset(self, row):
        self.kind = row["kind"]
        if self.kind == "raise":
            raise RuntimeError("environment broke")
        if self.kind == "hang":
            time.sleep(600)
        return ""

    def step(self, action_text, action_ids):
        self.turn = getattr(self, "turn", 0) + 1
        if self.turn == 1 and self.kind == "big":
            return ("7 " * 5_000_000, 0.0, False)
        if self.turn == 1 and self.kind == "bytes":
            return (b"8 \\xff\\xfe 9", 0.0, False)
        return ("", 1.0, True)
"""


class Tokenizer(FakeTokenizer):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(word) for word in text.split() if word.isdigit()]


def env_file(tmp_path, source: str, name: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return f"{path}:{name[0].upper()}{name[1:]}"


def in_process_calls(fn: str, params: dict | None = None):
    """Environment calls run here, one after another (the pool's isolation is tested below)."""
    state = load_env({"fn": fn, "params": params or {}, "max_observation_chars": 1000})

    def calls(batch):
        return [Outcome(*_kind_and_values(run_env_call(state, row, actions))) for row, actions in batch]

    return calls


def _kind_and_values(result):
    kind, payload = result
    return (kind, payload, "") if kind == "ok" else (kind, {}, payload)


LIMITS = EpisodeLimits(max_turns=4, max_tokens=200, on_error=-1.0, max_error_frac=0.5)


def sampler(runtime, env_calls, n=2, limits=LIMITS) -> EpisodeSampler:
    tokenizer = Tokenizer()
    return EpisodeSampler(runtime.generate, env_calls, tokenizer.encode, tokenizer.decode, n, limits, "env", 2)


def test_episode_response_is_model_ids_and_observation_ids_verbatim(tmp_path):
    runtime = FakeRuntime(max_len=5)
    calls = in_process_calls(env_file(tmp_path, COUNTING_ENV, "countingEnv"))
    episodes = sampler(runtime, calls).sample([[1, 2, 10], [1, 2, 11]], SamplingParams(max_tokens=8), [{}, {}])
    assert len(runtime.requests) == 3  # one generate call per model turn
    replay = FakeRuntime(max_len=5)  # the same deterministic engine, to recompute each turn's sampled ids
    for i, result in enumerate(episodes.results):
        turns = [requests[i] for requests in runtime.requests]
        # every turn is generated on the prompt plus exactly the ids of the episode so far
        sampled = [replay.generate([turn], SamplingParams(max_tokens=8))[0][0].token_ids for turn in turns]
        expected = sampled[0] + (100, 101, 102) + sampled[1] + (100, 101, 102) + sampled[2]
        assert result.token_ids == expected
        assert turns[1].prefix_ids == sampled[0] + (100, 101, 102)
        mask = [1] * len(sampled[0]) + [0] * 3 + [1] * len(sampled[1]) + [0] * 3 + [1] * len(sampled[2])
        assert episodes.loss_masks[i] == tuple(mask)
        assert [lp for lp, m in zip(result.logprobs, mask) if not m] == [0.0] * 6
        assert [lp for lp, m in zip(result.logprobs, mask) if m] == [-1.0] * sum(mask)
        assert episodes.rewards[i] == float(len(sampled[2]) % 2 == 0)
        assert result.versions() == (0,) * len(expected)  # every id carries the weights version of its turn
    assert episodes.metrics["env/turns_mean"].value == 3.0
    assert episodes.metrics["env/tool_calls_mean"].value == 2.0


def test_episodes_end_at_max_turns_and_max_tokens(tmp_path):
    calls = in_process_calls(env_file(tmp_path, COUNTING_ENV, "countingEnv"), {"turns": 10})
    runtime = FakeRuntime(max_len=3)
    limits = EpisodeLimits(max_turns=2, max_tokens=200, on_error=0.0, max_error_frac=0.5)
    episodes = sampler(runtime, calls, n=1, limits=limits).sample([[1, 2, 10]], SamplingParams(max_tokens=8), [{}])
    assert episodes.metrics["env/turns_mean"].value == 2.0
    assert episodes.metrics["env/truncated_frac"].value == 1.0
    assert episodes.loss_masks[0][-1] == 1  # no observation after the last model turn
    short = EpisodeLimits(max_turns=9, max_tokens=6, on_error=0.0, max_error_frac=0.5)
    episodes = sampler(FakeRuntime(max_len=3), calls, n=1, limits=short).sample(
        [[1, 2, 10]], SamplingParams(max_tokens=8), [{}]
    )
    assert len(episodes.results[0].token_ids) < 6 + 3  # stopped before or at the model turn that crossed 6


@dataclass
class EpisodeRuntime(FakeRuntime):
    env_calls: object = None
    env_batches: list = field(default_factory=list)


def test_trainer_trains_on_model_tokens_with_environment_rewards(tmp_path):
    fn = env_file(tmp_path, COUNTING_ENV, "countingEnv")
    cfg = compose([f"env.fn={fn}", "env.max_turns=4", "env.max_tokens=200"])
    prep = prepared()
    prep.tokenizer = Tokenizer()
    runtime = EpisodeRuntime(max_len=5, env_calls=in_process_calls(fn))
    metrics = Trainer(cfg, prep, runtime).step(1)
    assert runtime.grade_calls == 0  # the environment rewards episodes; reward.functions are not called
    batch = runtime.train_batches[0]
    observation = batch.response_ids == 100
    assert observation.any() and not (batch.response_mask[observation] > 0).any()
    assert torch.equal(batch.reward_parts["acc"], batch.reward_parts["env/acc"] >= 0.5)
    assert metrics["env/turns_mean"] == 3.0
    assert metrics["rollout/logprob_diff"] == 0.0
    assert "env/errors/timeout" in metrics and "env/episode_tokens_mean" in metrics


def hostile_runner(tmp_path, timeout_s=2.0):
    fn = env_file(tmp_path, HOSTILE_ENV, "hostileEnv")
    return EnvRunner(fn, {}, max_observation_chars=100, num_workers=2, timeout_s=timeout_s, memory_mb=512)


def test_hostile_environment_costs_its_episodes_and_is_counted(tmp_path):
    kinds = ["raise", "hang", "big", "bytes", "ok", "ok", "ok", "ok"]
    with hostile_runner(tmp_path) as runner:
        episodes = sampler(FakeRuntime(max_len=3), runner.run, n=1).sample(
            [[1, 2, 10 + i] for i in range(len(kinds))], SamplingParams(max_tokens=8), [{"kind": k} for k in kinds]
        )
    metrics = {key: m.value for key, m in episodes.metrics.items()}
    assert metrics["env/errors/exception"] == 1.0 and metrics["env/errors/timeout"] == 1.0
    assert metrics["env/observations_cut"] == 1.0 and metrics["env/observations_non_utf8"] == 1.0
    assert episodes.rewards == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    big, replaced = episodes.results[2].token_ids, episodes.results[3].token_ids
    assert big.count(7) == 50  # the first 100 characters of the observation, "7 " * 50
    assert 8 in replaced and 9 in replaced


def test_environment_failing_on_most_episodes_stops_the_run_with_its_first_error(tmp_path):
    with hostile_runner(tmp_path) as runner, pytest.raises(RunError, match="environment .*environment broke"):
        sampler(FakeRuntime(max_len=3), runner.run, n=1).sample(
            [[1, 2, 10 + i] for i in range(4)], SamplingParams(max_tokens=8), [{"kind": "raise"}] * 3 + [{"kind": "ok"}]
        )


def test_evaluation_runs_one_greedy_episode_per_held_out_row(tmp_path):
    fn = env_file(tmp_path, COUNTING_ENV, "countingEnv")
    prep = prepared()
    prep.tokenizer = Tokenizer()
    prep.eval_rows, prep.eval_prompts = prep.train_rows[:5], prep.train_prompts[:5]
    runtime = EpisodeRuntime(max_len=5, env_calls=in_process_calls(fn))
    metrics = Trainer(compose([f"env.fn={fn}"]), prep, runtime).evaluate()
    assert metrics["eval/num_prompts"] == 5.0 and metrics["eval/env/turns_mean"] == 3.0
    assert metrics["eval/env/tool_use_frac"] == 1.0 and metrics["eval/env/tool_calls_mean"] == 2.0
    assert metrics["eval/accuracy"] == metrics["eval/env/acc_mean"] == metrics["eval/reward_mean"]
    assert all(request.n == 1 for request in runtime.requests[0])
