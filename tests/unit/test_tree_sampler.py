"""TreeSampler over a scripted fake generator: leaf counts, budget transfer, fallback, ancestors, early stops."""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rltrain.metrics import SUM, Metric
from rltrain.sampling.tree_sampler import TreeSampler
from rltrain.types import FinishReason, GenRequest, GenResult, SamplingParams, TokenStats

EOS = 0
Script = Callable[[GenRequest, int, int], tuple[list[int], FinishReason]]


class ScriptedGenerator:
    """A fake engine. ``script(request, sample_index, max_tokens) -> (tokens, reason)`` decides every segment;
    logprobs are -(token % 7) / 4 so that tests can reason about surprisal. Records every call."""

    def __init__(self, script: Script):
        self.script = script
        self.calls: list[tuple[list[GenRequest], SamplingParams]] = []

    def generate(self, requests, params):
        self.calls.append((list(requests), params))
        outputs = []
        for request in requests:
            group = []
            for k in range(request.n):
                tokens, reason = self.script(request, k, params.max_tokens)
                assert 1 <= len(tokens) <= params.max_tokens
                stats = TokenStats(prefill_computed=len(request.context_ids) if k == 0 else 0, decoded=len(tokens))
                group.append(GenResult(tuple(tokens), tuple(-(t % 7) / 4 for t in tokens), reason, stats))
            outputs.append(group)
        return outputs


def random_script(stop_prob: float, seed: int) -> Script:
    """Tokens 1..49 at random; EOS with probability ``stop_prob`` per token."""
    rng = random.Random(seed)

    def script(request, k, max_tokens):
        tokens = []
        for _ in range(max_tokens):
            token = EOS if rng.random() < stop_prob else rng.randint(1, 49)
            tokens.append(token)
            if token == EOS:
                return tokens, FinishReason.STOP
        return tokens, FinishReason.LENGTH

    return script


def params(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, stop_token_ids=(EOS,), **kw)


def check_tree(traj, prompts, width, max_depth, max_tokens, segment_len=None) -> None:
    """Invariants of any tree sampler output. With ``segment_len`` (no critical-token cuts) segment boundaries
    sit at multiples of it, so leaves through a depth-d node share their first (d+1)*segment_len tokens."""
    n = len(traj.results)
    assert traj.prompt_index == sorted(traj.prompt_index)
    assert [traj.prompt_index.count(p) for p in range(len(prompts))] == [width] * len(prompts)
    assert traj.ancestors.dtype == torch.long and traj.ancestors.shape[0] == n
    assert traj.ancestors.shape[1] <= max_depth
    through: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)  # node -> (leaf, depth, parent, prompt)
    responses = []
    for i in range(n):
        row = traj.ancestors[i].tolist()
        depth = sum(1 for a in row if a >= 0)
        assert depth >= 1 and row[:depth] == [a for a in row if a >= 0]
        responses.append(traj.prefixes[i] + traj.results[i].token_ids)
        assert len(responses[i]) <= max_tokens and len(traj.prefix_logprobs[i]) == len(traj.prefixes[i])
        for d, node in enumerate(row[:depth]):
            through[node].append((i, d, row[d - 1] if d else -1, traj.prompt_index[i]))
        assert len(through[row[depth - 1]]) == 1, "a leaf's own segment is shared"
    for node, entries in through.items():
        assert len({e[1:] for e in entries}) == 1, f"segment {node} has two depths, parents or prompts"
        depth = entries[0][1]
        shared = (depth + 1) * segment_len if segment_len else depth + 1
        assert len({responses[e[0]][:shared] for e in entries}) == 1, f"leaves through {node} differ before its end"


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(2, 12),
    branching=st.integers(1, 4),
    max_depth=st.integers(1, 6),
    segment_len=st.integers(1, 5),
    stop_prob=st.sampled_from([0.0, 0.05, 0.3, 0.9]),
    init=st.sampled_from([(-1, -1), (1, 1), (2, 6)]),
    policy=st.sampled_from(["even", "logprob", "entropy"]),
    fallback=st.sampled_from([(True, "segment"), (True, "critical"), (False, "segment")]),
    seed=st.integers(0, 10_000),
)
def test_exactly_width_leaves_and_a_consistent_tree(
    width, branching, max_depth, segment_len, stop_prob, init, policy, fallback, seed
):
    max_tokens = max(1, segment_len * max_depth - seed % 3)
    sampler = TreeSampler(
        ScriptedGenerator(random_script(stop_prob, seed)).generate,
        segment_len=segment_len,
        max_depth=max_depth,
        width=width,
        branching=branching,
        init_divergence_min=init[0],
        init_divergence_max=init[1],
        divergence_policy=policy,
        fallback=fallback[0],
        fallback_policy=fallback[1],
        seed=seed,
    )
    prompts = [[5, 6], [7], [8, 9, 10]]
    traj = sampler.sample(prompts, params(max_tokens))
    check_tree(traj, prompts, width, max_depth, max_tokens, None if fallback[1] == "critical" else segment_len)
    for result, prefix in zip(traj.results, traj.prefixes):
        response = prefix + result.token_ids
        if result.finish_reason == FinishReason.STOP:
            assert response[-1] == EOS
        elif result.finish_reason == FinishReason.LENGTH:
            assert len(response) == max_tokens and EOS not in response
        else:
            assert result.finish_reason == FinishReason.MAX_DEPTH and EOS not in response


def test_binary_tree_without_stops_doubles_then_continues_and_decodes_shared_prefixes_once():
    gen = ScriptedGenerator(random_script(0.0, 0))
    sampler = TreeSampler(gen.generate, segment_len=4, max_depth=6, width=16, branching=2, seed=0)
    traj = sampler.sample([[1, 2, 3]], params(24))
    fan_outs = [[r.n for r in requests] for requests, _ in gen.calls]
    assert fan_outs == [[2], [2] * 2, [2] * 4, [2] * 8, [1] * 16, [1] * 16]
    assert traj.stats.decoded == 4 * (2 + 4 + 8 + 16 + 16 + 16)
    assert traj.generate_calls == 6
    assert {r.finish_reason for r in traj.results} == {FinishReason.LENGTH}
    # every leaf is a distinct path through a binary tree of depth 4, then a chain of 2
    assert traj.ancestors.shape == (16, 6) and len({tuple(a[:4].tolist()) for a in traj.ancestors}) == 16
    assert all(requests == sorted(requests, key=lambda r: r.prompt_ids) for requests, _ in gen.calls)


def test_budget_of_finished_paths_moves_to_live_ones():
    def script(request, k, max_tokens):
        depth = len(request.prefix_ids) // 2
        if depth == 1 and request.prefix_ids[0] == 10:  # both children of the first depth-0 node stop
            return [EOS], FinishReason.STOP
        return [10 + k, 20 + depth], FinishReason.LENGTH

    gen = ScriptedGenerator(script)
    sampler = TreeSampler(gen.generate, segment_len=2, max_depth=4, width=8, branching=2, seed=0)
    traj = sampler.sample([[1]], params(8))
    fan_outs = [[r.n for r in requests] for requests, _ in gen.calls]
    # round 2: 2 of 4 paths ended -> remaining 6 leaves, total = min(6, 2*(2+2)) = 6 over 2 live paths
    assert fan_outs[:3] == [[2], [2, 2], [3, 3]]
    check_tree(traj, [[1]], 8, 4, 8, segment_len=2)


def test_fallback_restarts_from_a_segment_boundary_of_a_stopped_path():
    def script(request, k, max_tokens):
        if len(request.prefix_ids) >= 4:  # every path stops in its third segment
            return [30 + k, EOS], FinishReason.STOP
        return [10 + len(request.prefix_ids), 20 + k], FinishReason.LENGTH

    gen = ScriptedGenerator(script)
    sampler = TreeSampler(gen.generate, segment_len=2, max_depth=6, width=16, branching=2, seed=1)
    traj = sampler.sample([[1]], params(12))
    check_tree(traj, [[1]], 16, 6, 12, segment_len=2)
    assert sampler.last_counts["restarts"] > 0
    assert traj.metrics["tree/restarts"] == Metric(float(sampler.last_counts["restarts"]), SUM)
    assert traj.metrics["tree/leaves_stop"].value == 16 and traj.metrics["tree/rounds"].value >= 3
    stopped = {prefix + r.token_ids for prefix, r in zip(traj.prefixes, traj.results)}
    first_round_leaves = 8
    restart_requests = [r for requests, _ in gen.calls[3:] for r in requests if len(r.prefix_ids) in (0, 2)]
    assert restart_requests, "a prompt with no live path and fewer than w leaves must restart"
    for request in restart_requests:  # the restarted prefix is a segment boundary of a finished path
        assert any(s[: len(request.prefix_ids)] == request.prefix_ids for s in stopped)
    assert len(traj.results) == 16 > first_round_leaves


def test_without_stop_candidates_or_with_fallback_off_restarts_from_the_root():
    def script(request, k, max_tokens):
        return [40 + k] * max_tokens, FinishReason.LENGTH  # repetition ends every path in its first segment

    for fallback in (True, False):
        gen = ScriptedGenerator(script)
        sampler = TreeSampler(
            gen.generate,
            segment_len=3,
            max_depth=4,
            width=5,
            branching=2,
            fallback=fallback,
            repetition_ngram=1,
            repetition_count=3,
            seed=0,
        )
        traj = sampler.sample([[1], [2]], params(12))
        check_tree(traj, [[1], [2]], 5, 4, 12)
        assert {r.finish_reason for r in traj.results} == {FinishReason.REPETITION}
        assert all(r.prefix_ids == () for requests, _ in gen.calls for r in requests)
        assert traj.ancestors.shape[1] == 1 and len(set(traj.ancestors[:, 0].tolist())) == 10


def test_critical_fallback_cuts_at_a_high_surprisal_token():
    def script(request, k, max_tokens):
        if len(request.prefix_ids) >= 4:
            return [1, EOS], FinishReason.STOP
        # token 6 has the lowest logprob (-6/4) of the script's tokens: the only critical candidate with top_k=1
        return ([1, 6] if len(request.prefix_ids) == 2 else [1, 1]), FinishReason.LENGTH

    gen = ScriptedGenerator(script)
    sampler = TreeSampler(
        gen.generate,
        segment_len=2,
        max_depth=4,
        width=16,
        branching=2,
        fallback_policy="critical",
        critical_top_k=1,
        seed=0,
    )
    traj = sampler.sample([[9]], params(8))
    check_tree(traj, [[9]], 16, 4, 8)
    restarts = [r for requests, _ in gen.calls[3:4] for r in requests]
    assert restarts and all(r.prefix_ids == (1, 1, 1) for r in restarts)  # cut right before the token 6
    responses = [p + r.token_ids for p, r in zip(traj.prefixes, traj.results)]
    first = [a for a, resp in zip(traj.ancestors.tolist(), responses) if resp[3] == 6]
    again = [a for a, resp in zip(traj.ancestors.tolist(), responses) if resp[3] != 6]
    assert len(first) == 8 and len(again) == 8
    # the cut falls inside the second segment: restarts share the first segment's node, not the second's
    assert {a[0] for a in again} <= {a[0] for a in first}
    assert not {a[1] for a in again} & {a[1] for a in first}


def test_early_stops_depth_length_and_text_rules():
    def script(request, k, max_tokens):
        return [3, 4, 5][:max_tokens], FinishReason.LENGTH

    def run(max_tokens, max_depth=6, **kwargs):
        sampler = TreeSampler(ScriptedGenerator(script).generate, segment_len=3, max_depth=max_depth, width=2, **kwargs)
        traj = sampler.sample([[1]], params(max_tokens, stop_strings=kwargs.pop("stop", ())))
        return {p + r.token_ids for p, r in zip(traj.prefixes, traj.results)}, {r.finish_reason for r in traj.results}

    assert run(20, max_depth=2) == ({(3, 4, 5, 3, 4, 5)}, {FinishReason.MAX_DEPTH})
    assert run(7) == ({(3, 4, 5, 3, 4, 5, 3)}, {FinishReason.LENGTH})

    def decode(ids):
        return "".join(chr(ord("a") + i) for i in ids)  # 3 4 5 -> "def"

    # "fd" straddles two segments, which the engine (one segment at a time) cannot see
    sampler = TreeSampler(ScriptedGenerator(script).generate, segment_len=3, max_depth=6, width=2, decode=decode)
    traj = sampler.sample([[1]], params(20, stop_strings=("fd",)))
    assert {p + r.token_ids for p, r in zip(traj.prefixes, traj.results)} == {(3, 4, 5, 3)}
    assert {r.finish_reason for r in traj.results} == {FinishReason.STOP}
    assert run(20, decode=decode, answer_pattern=r"fde") == ({(3, 4, 5, 3, 4)}, {FinishReason.STOP})
    assert run(20, answer_pattern=r"fde")[1] == {FinishReason.MAX_DEPTH}  # text rules need decode


def test_fixed_seed_changes_between_rounds():
    gen = ScriptedGenerator(random_script(0.0, 0))
    TreeSampler(gen.generate, segment_len=2, max_depth=3, width=4, seed=0).sample([[1]], params(6, seed=7))
    assert [p.seed for _, p in gen.calls] == [7, 8, 9]
    assert {p.max_tokens for _, p in gen.calls} == {2}


def test_node_ids_stay_unique_across_sample_calls_and_are_never_strings():
    gen = ScriptedGenerator(random_script(0.2, 3))
    sampler = TreeSampler(gen.generate, segment_len=2, max_depth=3, width=4, seed=0)
    first = sampler.sample([[1]], params(6))
    second = sampler.sample([[1]], params(6))
    ids = lambda t: set(t.ancestors[t.ancestors >= 0].tolist())  # noqa: E731
    assert not ids(first) & ids(second)
    for field in dataclasses.fields(first):
        assert not isinstance(getattr(first, field.name), str)
    assert first.results[0].stats == TokenStats() and first.stats.decoded > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0},
        {"branching": 0},
        {"segment_len": 0},
        {"max_depth": 0},
        {"divergence_policy": "greedy"},
        {"fallback_policy": "best"},
        {"divergence_temperature": 0.0},
        {"init_divergence_min": 5, "init_divergence_max": 2},
        {"repetition_ngram": -1},
    ],
)
def test_bad_settings_raise_naming_the_setting(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        TreeSampler(lambda r, p: [], **kwargs)


@settings(max_examples=200, deadline=None)
@given(
    prompt_len=st.integers(1, 300),
    response_len=st.integers(0, 300),
    segment_len=st.integers(1, 64),
    block=st.sampled_from([1, 16, 32, 128]),
)
def test_aligned_segments_end_one_token_past_a_block_boundary(prompt_len, response_len, segment_len, block):
    from rltrain.sampling.tree import segment_budget

    assert segment_budget(prompt_len, response_len, segment_len, None) == segment_len
    budget = segment_budget(prompt_len, response_len, segment_len, block)
    assert segment_len <= budget < segment_len + block
    assert (prompt_len + response_len + budget) % block == 1 % block


def test_with_kv_blocks_only_the_first_segment_is_lengthened():
    """Prompts of 27 and 33 tokens, l = 32 = block: first segments of 38 and 32 tokens, then 32 each, so
    every continued context is k * 32 + 1 tokens long; the max_tokens cap shortens the last segment."""

    def script(request, k, max_tokens):
        return [5] * request.token_budget(max_tokens), FinishReason.LENGTH

    engine = ScriptedGenerator(script)
    sampler = TreeSampler(engine.generate, segment_len=32, max_depth=3, width=2, branching=2, kv_block_size=32)
    traj = sampler.sample([[1] * 27, [1] * 33], params(96))
    contexts = {len(r.context_ids) for requests, _ in engine.calls for r in requests if r.prefix_ids}
    assert contexts and all(length % 32 == 1 for length in contexts)
    # One call per round; a request whose budget is below the call's carries its own max_tokens.
    budgets = [[r.token_budget(p.max_tokens) for r in requests] for requests, p in engine.calls]
    assert budgets == [[38, 32], [32, 32, 32, 32], [26, 26, 32, 32]]
    assert all(len(prefix) + len(result.token_ids) == 96 for prefix, result in zip(traj.prefixes, traj.results))


def test_engine_returning_too_few_results_is_a_clear_error():
    sampler = TreeSampler(lambda requests, p: [[] for _ in requests], width=2)
    with pytest.raises(RuntimeError, match="different number of results"):
        sampler.sample([[1]], params(4))


def test_every_tree_config_key_is_a_sampler_setting_and_bad_values_fail_before_start():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from rltrain.config import ConfigError, register_configs
    from rltrain.config_rules import validate
    from rltrain.runtime import rollout_options

    register_configs()

    def compose_tree(*overrides):
        with initialize_config_module(config_module="recipes", version_base="1.3"):
            return compose(config_name="treepo", overrides=list(overrides))

    cfg = compose_tree()
    validate(cfg)
    assert cfg.rollout.sampler == "tree" and cfg.algorithm.advantage == "tree"
    tree = OmegaConf.to_container(cfg.rollout.tree)
    assert tree.pop("align_to_kv_blocks") is True  # read by the trainer: the engine's block, or None
    TreeSampler(lambda r, p: [], kv_block_size=None, **tree)  # no unknown keyword
    assert rollout_options(cfg)["kv_fork"] and not rollout_options(compose_tree("rollout=flat"))["kv_fork"]
    for override, key in [
        ("rollout.tree.fallback_policy=best", "fallback_policy"),
        ("rollout.tree.segment_len=0", "segment_len"),
        ("rollout.tree.answer_pattern='(x'", "answer_pattern"),
        ("rollout.tree.width=1", "width"),
    ]:
        with pytest.raises(ConfigError, match=key):
            validate(compose_tree(override))
