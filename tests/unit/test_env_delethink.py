"""Delethink: chunked episodes (context reset to query + carry-over), one grade per episode shared by its chunks,
per-episode advantages, chunked SFT targets, the addition_chain task and the context metrics."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from fake_runtime import FakeRuntime, FakeTokenizer, compose, prepared

from rltrain.algo.advantages import EPISODE_KEY, advantages_for_batch, grpo
from rltrain.config import ConfigError
from rltrain.data.tasks import generate_task
from rltrain.env.delethink import (
    DelethinkEnv,
    attention_cost,
    chunk_sft_pairs,
    graded_answer,
    sft_chunking,
    thinking_budget,
)
from rltrain.env.delethink_sampler import DelethinkSampler
from rltrain.env.resolve import check_env_config
from rltrain.env.worker import load_env, run_env_call
from rltrain.grading.pool import Outcome
from rltrain.sampling.episodes import EpisodeLimits
from rltrain.trainer import Trainer
from rltrain.types import FinishReason, SamplingParams, build_rollout_batch

LIMITS = EpisodeLimits(max_turns=4, max_tokens=200, on_error=-1.0, max_error_frac=0.5)
QUERY = (1, 2, 10)


def grader_calls(log: list | None = None):
    """DelethinkEnv calls run here as a grader process runs them (load_env + run_env_call)."""
    state = load_env({"fn": "delethink", "params": {"chunk_tokens": 6}, "max_observation_chars": 1000})

    def calls(batch):
        if log is not None:
            log.append(batch)
        outcomes = []
        for row, actions in batch:
            kind, payload = run_env_call(state, row, actions)
            outcomes.append(Outcome(kind, payload, "") if kind == "ok" else Outcome(kind, {}, payload))
        return outcomes

    return calls


class RecordingRuntime(FakeRuntime):
    def __init__(self, max_len: int):
        super().__init__(max_len=max_len)
        self.params: list[SamplingParams] = []

    def generate(self, requests, params):
        self.params.append(params)
        return super().generate(requests, params)


def sampler(runtime, calls, n=2, chunk_tokens=6, carryover_tokens=2, max_chunks=3) -> DelethinkSampler:
    tokenizer = FakeTokenizer()
    return DelethinkSampler(
        runtime.generate,
        calls,
        lambda text: [],
        lambda ids: tokenizer.decode(ids),
        n,
        LIMITS,
        "delethink",
        2,
        chunk_tokens=chunk_tokens,
        carryover_tokens=carryover_tokens,
        max_chunks=max_chunks,
    )


def test_each_chunk_restarts_from_the_query_and_the_last_carryover_ids_kept_verbatim():
    runtime = RecordingRuntime(max_len=40)  # chunks want up to 40 tokens: most hit their budget
    episodes = sampler(runtime, grader_calls()).sample([QUERY], SamplingParams(max_tokens=99), [{"answer": 5}])
    assert [p.max_tokens for p in runtime.params] == [6, 4, 4]  # C, then C - m new tokens per chunk
    replay = FakeRuntime(max_len=40)
    for e in range(2):  # both episodes of the prompt
        rows = [r for r, ep in enumerate(episodes.episode_index) if ep == e]
        carry = ()
        for k, row in enumerate(rows):
            request = runtime.requests[k][rows_active(episodes, k, e)]
            assert request.prompt_ids == QUERY and request.prefix_ids == carry
            expected = replay.generate([request], runtime.params[k])[0][0]
            result = episodes.results[row]
            assert result.token_ids == carry + expected.token_ids  # carried-over ids, then the engine's ids
            assert episodes.loss_masks[row] == (0,) * len(carry) + (1,) * len(expected.token_ids)
            assert result.logprobs == (0.0,) * len(carry) + expected.logprobs
            carry = (carry + expected.token_ids)[-2:]


def rows_active(episodes, chunk: int, episode: int) -> int:
    """The position of ``episode`` among the episodes that generated chunk ``chunk``."""
    counts = [episodes.episode_index.count(e) for e in sorted(set(episodes.episode_index))]
    active = [e for e, count in enumerate(counts) if count > chunk]
    return active.index(episode)


def test_one_grade_per_episode_on_the_final_chunk_shared_by_every_chunk():
    log: list = []
    runtime = FakeRuntime(max_len=14)
    rows = [{"answer": a} for a in range(10)]
    prompts = [(1, 2, 10 + i) for i in range(10)]
    episodes = sampler(runtime, grader_calls(log), n=2).sample(prompts, SamplingParams(), rows)
    assert len(log) == 1 and len(log[0]) == 20  # one environment call per episode, all in one batch
    for (row, actions), rows_of in zip(log[0], episodes.episode_rows()):
        (text, ids), last = actions[0], episodes.results[rows_of[-1]]
        assert len(actions) == 1 and ids == last.token_ids  # the final chunk's context after the query
        reward = float(graded_answer(text) == row["answer"])
        assert {episodes.rewards[r] for r in rows_of} == {reward}
        assert {episodes.reward_parts["env/acc"][r] for r in rows_of} == {reward}
    assert 0 < sum(episodes.rewards) < len(episodes.rewards)  # some graded right, some wrong


def test_truncation_after_max_chunks_and_the_metrics():
    runtime = FakeRuntime(max_len=40)
    episodes = sampler(runtime, grader_calls(), n=1, max_chunks=2).sample([QUERY], SamplingParams(), [{"answer": 1}])
    metrics = {key: m.value for key, m in episodes.metrics.items()}
    assert len(episodes.results) == 2 and metrics["env/turns_mean"] == 2.0 and metrics["env/truncated_frac"] == 1.0
    assert [r.finish_reason for r in episodes.results] == [FinishReason.STOP, FinishReason.LENGTH]
    assert metrics["env/episode_tokens_mean"] == 6 + 4  # model tokens of both chunks
    assert metrics["env/peak_context_mean"] == 3 + 6  # query + the 6-token window, in both chunks
    assert metrics["env/attention_cost_mean"] == attention_cost(3, 6) + attention_cost(3 + 2, 4)
    assert attention_cost(3, 4) == 3 + 4 + 5 + 6


def test_context_stays_bounded_while_longcot_cost_grows_quadratically():
    """Same thinking budget (C + (I-1)(C-m)): Delethink's peak context is constant in the budget, its attention
    cost linear; one sequence (max_chunks=1) holds it all and pays a quadratic cost."""
    peaks, costs, long_costs = [], [], []
    for max_chunks in (3, 6, 12):
        budget = thinking_budget(8, 4, max_chunks)
        episodes = sampler(FakeRuntime(max_len=999), grader_calls(), 1, 8, 4, max_chunks).sample(
            [QUERY], SamplingParams(), [{"answer": 0}]
        )
        longcot = sampler(FakeRuntime(max_len=999), grader_calls(), 1, budget, 0, 1).sample(
            [QUERY], SamplingParams(), [{"answer": 0}]
        )
        peaks.append(episodes.metrics["env/peak_context_mean"].value)
        costs.append(episodes.metrics["env/attention_cost_mean"].value)
        long_costs.append(longcot.metrics["env/attention_cost_mean"].value)
        assert episodes.metrics["env/episode_tokens_mean"].value == budget
        assert longcot.metrics["env/peak_context_mean"].value == 3 + budget
    assert peaks == [3 + 8] * 3
    assert costs[2] - costs[1] == 2 * (costs[1] - costs[0])  # linear: 6 more chunks cost twice 3 more
    assert long_costs[2] - long_costs[1] > 2 * (long_costs[1] - long_costs[0])


def test_advantages_are_per_episode_and_broadcast_to_its_chunks():
    # group 0: episode 0 (reward 1) in 3 chunks, episodes 1 and 2 (reward 0) in 1 chunk each
    chunk_episode = [0, 0, 0, 1, 2]
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    from rltrain.types import GenResult

    results = [GenResult((5, 6), (-1.0, -1.0), FinishReason.STOP) for _ in chunk_episode]
    batch = build_rollout_batch([[1, 2]] * 5, results, [0] * 5).replace(
        rewards=rewards, extras={EPISODE_KEY: torch.tensor(chunk_episode)}
    )
    values = advantages_for_batch(batch, "grpo", {})[:, 0]
    per_episode = grpo(torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3, dtype=torch.long))
    assert torch.allclose(values, per_episode[torch.tensor(chunk_episode)])
    plain = advantages_for_batch(batch.replace(extras={}), "grpo", {})[:, 0]
    assert not torch.allclose(plain, values)  # chunk-weighted statistics would differ


def test_trainer_trains_on_every_chunk_with_its_context_and_logs_the_metrics():
    cfg = compose(
        ["env.fn=delethink", "+env.params.chunk_tokens=6", "+env.params.carryover_tokens=2", "+env.params.max_chunks=3"]
    )
    prep = prepared()
    prep.train_rows = [{"answer": i % 3} for i in range(12)]
    runtime = FakeRuntime(max_len=12)
    runtime.env_calls = grader_calls()
    metrics = Trainer(cfg, prep, runtime).step(1)
    batch = runtime.train_batches[0]
    assert batch.batch_size > 16  # 4 prompts x 4 episodes, some in more than one chunk
    assert batch.response_ids.shape[1] <= 6 and metrics["rollout/logprob_diff"] == 0.0
    assert (batch.response_mask.sum(1) > 0).all()
    for key in ("env/turns_mean", "env/peak_context_mean", "env/attention_cost_mean", "env/truncated_frac"):
        assert key in metrics


def test_bad_chunking_is_a_config_error_naming_the_key():
    for params, key in (
        ({"chunk_tokens": 0}, "chunk_tokens=0"),
        ({"chunk_tokens": 8, "carryover_tokens": 8}, "carryover_tokens=8"),
        ({"chunk_tokens": 8, "max_chunks": 0}, "max_chunks=0"),
        ({"chunk_tokens": 8, "max_chunks": 1.5}, "max_chunks=1.5"),
    ):
        with pytest.raises(ConfigError, match=f"env.params.{key}"):
            check_env_config(SimpleNamespace(fn="delethink", params=params), "flat")
    with pytest.raises(ConfigError, match="env.params"):
        check_env_config(SimpleNamespace(fn="delethink", params={}), "flat")  # chunk_tokens is required


def test_sft_targets_are_chunked_like_episodes():
    prompts, targets = chunk_sft_pairs([[1, 2]], [list(range(10, 24))], chunk_tokens=6, carryover_tokens=2)
    assert targets == [list(range(10, 16)), list(range(16, 20)), list(range(20, 24))]
    assert prompts == [[1, 2], [1, 2, 14, 15], [1, 2, 18, 19]]
    assert chunk_sft_pairs([[1]], [[5, 6]], 8, 2) == ([[1]], [[5, 6]])
    assert sft_chunking(compose(["env.fn=delethink", "+env.params.chunk_tokens=6"]).env) == (6, 0)
    assert sft_chunking(compose().env) is None


def test_addition_chain_trace_counts_down_and_writes_running_totals():
    train, held_out = generate_task("addition_chain", 50, 20, seed=0, min_steps=3, max_steps=9, modulus=10)
    for row in train + held_out:
        start, addend, letter = int(row["prompt"][0]), int(row["prompt"][2]), row["prompt"][4]
        steps = ord(letter) - ord("a") + 1
        trace = row["solution"].split()[:-1]
        assert [step[0] for step in trace] == [chr(ord("a") + k) for k in range(steps - 1, -1, -1)]
        totals = [(start + addend * (k + 1)) % 10 for k in range(steps)]
        assert [int(step.split("=")[1]) for step in trace] == totals and {step[1:3] for step in trace} == {f"+{addend}"}
        assert row["answer"] == totals[-1] and graded_answer(row["solution"]) == totals[-1]
        assert 3 <= steps <= 9
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    with pytest.raises(ConfigError, match="max_steps=27"):
        generate_task("addition_chain", 5, 5, seed=0, max_steps=27)
    with pytest.raises(ConfigError, match="min_steps=9"):
        generate_task("addition_chain", 5, 5, seed=0, min_steps=9, max_steps=8)


def test_grader_reads_the_answer_tag_else_the_last_integer():
    env = DelethinkEnv(chunk_tokens=8)
    env.reset({"answer": 7})
    assert env.step(" x3=7 <answer>7</answer>", ()).reward == 1.0
    assert env.step(" <answer>7</answer> 5", ()).reward == 1.0
    assert env.step(" x3=9 y2=1", ()).reward == 0.0
    assert graded_answer("no number") is None


def test_evaluation_counts_episodes_not_chunks():
    prep = prepared()
    prep.eval_rows = [{"answer": i} for i in range(5)]
    prep.eval_prompts = prep.train_prompts[:5]
    runtime = FakeRuntime(max_len=20)
    runtime.env_calls = grader_calls()
    cfg = compose(["env.fn=delethink", "+env.params.chunk_tokens=6", "+env.params.max_chunks=3"])
    metrics = Trainer(cfg, prep, runtime).evaluate()
    assert metrics["eval/num_prompts"] == 5.0 and metrics["eval/env/turns_mean"] > 1.0
    assert metrics["eval/response_len_mean"] > 6  # every chunk's model tokens
    assert metrics["eval/accuracy"] == metrics["eval/env/acc_mean"]
    assert "eval/env/peak_context_mean" in metrics and "eval/env/attention_cost_mean" in metrics


def test_random_chunk_rows_reassemble_the_episode():
    """The model ids of an episode's rows, in order, are its whole trace; carried-over ids repeat earlier ids."""
    runtime = FakeRuntime(max_len=30)
    rng = random.Random(0)
    prompts = [(1, 2, rng.randint(10, 99)) for _ in range(6)]
    episodes = sampler(runtime, grader_calls(), n=3, chunk_tokens=5, carryover_tokens=3, max_chunks=6).sample(
        prompts, SamplingParams(), [{"answer": 0}] * 6
    )
    for rows in episodes.episode_rows():
        trace: tuple[int, ...] = ()
        for row in rows:
            ids, mask = episodes.results[row].token_ids, episodes.loss_masks[row]
            carried = ids[: mask.count(0)]
            assert carried == trace[-3:]
            trace += ids[mask.count(0) :]
