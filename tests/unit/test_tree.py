"""Pure tree bookkeeping: budgets, allocation, stop rules, cut points."""

from __future__ import annotations

import random
import re

import pytest

from rltrain.sampling.tree import (
    Path,
    StopRules,
    allocate,
    children_total,
    critical_positions,
    divergence_weights,
    end_of_segment,
    has_repetition,
    segment_cut,
    split_even,
    split_weighted,
    truncate,
)
from rltrain.types import FinishReason

RULES = StopRules(max_tokens=10, max_depth=3)


def test_children_total_doubles_transfers_and_caps():
    assert children_total(remaining=16, finished_now=0, active=2, branching=2) == 4
    assert children_total(remaining=14, finished_now=2, active=2, branching=2) == 8  # transfer from 2 finished
    assert children_total(remaining=13, finished_now=3, active=13, branching=2) == 13  # saturated: 1 each
    assert children_total(remaining=3, finished_now=0, active=3, branching=4) == 3


@pytest.mark.parametrize("total,n", [(7, 3), (4, 4), (16, 5), (1, 1)])
def test_split_even(total, n):
    counts = split_even(total, n, random.Random(0))
    assert sum(counts) == total and max(counts) - min(counts) <= 1 and min(counts) >= 1


def test_split_weighted_gives_one_each_then_follows_weights():
    assert split_weighted(10, [0.0, 0.0, 1.0]) == [1, 1, 8]
    assert split_weighted(5, [0.5, 0.5]) in ([3, 2], [2, 3])
    assert sum(split_weighted(11, [0.2, 0.3, 0.1, 0.4])) == 11
    with pytest.raises(ValueError, match="total >= n"):
        split_weighted(1, [0.5, 0.5])


def test_divergence_weights_softmax_with_temperature():
    w = divergence_weights([0.0, 1.0], temperature=1.0)
    assert w[1] / w[0] == pytest.approx(2.718281828)
    hot = divergence_weights([0.0, 1.0], temperature=100.0)
    assert hot[0] == pytest.approx(0.5, abs=0.01)


def _path(logprobs, starts=(0,)):
    n = len(logprobs)
    return Path(
        0,
        nodes=list(range(len(starts))),
        tokens=list(range(1, n + 1)),
        logprobs=list(logprobs),
        node_starts=list(starts),
        open_from=n,
    )


def test_logprob_and_entropy_policies_favour_opposite_paths():
    likely, unlikely = _path([-0.1, -0.1]), _path([-3.0, -3.0])
    rng = random.Random(0)
    assert allocate(6, [likely, unlikely], "logprob", 0.5, rng) == [5, 1]
    assert allocate(6, [likely, unlikely], "entropy", 0.5, rng) == [1, 5]
    assert sorted(allocate(6, [likely, unlikely], "even", 0.5, rng)) == [3, 3]


def test_end_of_segment_priority():
    rep = StopRules(max_tokens=10, max_depth=3, repetition_ngram=2, repetition_count=2)
    assert end_of_segment([1, 2], [1, 2, 0], FinishReason.STOP, 2, rep) == (3, FinishReason.REPETITION)
    assert end_of_segment([1], [2, 0], FinishReason.STOP, 3, RULES) == (2, FinishReason.STOP)
    assert end_of_segment([1] * 8, [2, 3], FinishReason.LENGTH, 3, RULES) == (2, FinishReason.LENGTH)
    assert end_of_segment([1], [2, 3], FinishReason.LENGTH, 3, RULES) == (2, FinishReason.MAX_DEPTH)
    assert end_of_segment([1], [2, 3], FinishReason.LENGTH, 2, RULES) == (2, None)
    assert end_of_segment([1], [2], FinishReason.ABORT, 1, rep) == (1, FinishReason.ABORT)


def test_text_rules_cut_the_segment_at_the_first_hit():
    rules = StopRules(
        max_tokens=20,
        max_depth=5,
        stop_strings=("cd",),
        decode=lambda ids: "".join(map(chr, ids)),
        answer_pattern=re.compile(r"\[\d\]"),
    )
    a, b, c, d = map(ord, "abcd")
    assert end_of_segment([a, b, c], [d, a, b], FinishReason.LENGTH, 2, rules) == (1, FinishReason.STOP)
    answer = [ord(ch) for ch in "x[7]yz"]
    assert end_of_segment([a], answer, FinishReason.LENGTH, 2, rules) == (4, FinishReason.STOP)


def test_has_repetition():
    assert has_repetition([1, 2, 1, 2, 1, 2], ngram=2, count=3)
    assert not has_repetition([1, 2, 1, 2, 3], ngram=2, count=3)
    assert not has_repetition([1], ngram=2, count=1)


def test_segment_cut_keeps_a_boundary_before_the_last_segment_and_below_max_depth():
    rng = random.Random(0)
    cuts = {segment_cut(4, max_depth=6, rng=rng) for _ in range(200)}
    assert cuts == {0, 1, 2, 3}
    assert {segment_cut(6, max_depth=3, rng=rng) for _ in range(200)} == {0, 1, 2}


def test_truncate_at_a_boundary_and_inside_a_segment():
    leaf = Path(
        3,
        nodes=[10, 11, 12],
        tokens=list(range(9)),
        logprobs=[0.0] * 9,
        node_starts=[0, 3, 6],
        open_from=9,
        reason=FinishReason.STOP,
    )
    at_boundary = truncate(leaf, 3)
    assert (at_boundary.nodes, at_boundary.tokens, at_boundary.open_from) == ([10], [0, 1, 2], 3)
    inside = truncate(leaf, 5)
    assert (inside.nodes, inside.tokens, inside.node_starts, inside.open_from) == ([10], [0, 1, 2, 3, 4], [0], 3)
    root = truncate(leaf, 0)
    assert (root.nodes, root.tokens, root.prompt, root.reason) == ([], [], 3, None)


def test_critical_positions_skip_the_first_token_stop_tokens_and_short_text():
    leaf = _path([-9.0, -1.0, -5.0, -2.0, -7.0])  # tokens 1..5
    rules = StopRules(max_tokens=10, max_depth=3, stop_token_ids=(5,))
    assert critical_positions(leaf, 2, rules) == [2, 3]
    wordy = StopRules(max_tokens=10, max_depth=3, decode=lambda ids: "ab" if ids[0] != 3 else "c")
    assert critical_positions(leaf, 2, wordy) == [4, 3]
