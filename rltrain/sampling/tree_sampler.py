"""TreePO tree-segment sampler: drives any generate function through ``SegmentTree`` one segment at a time.

Each round sends every live path of every prompt in one generate call (one call per distinct segment
budget, normally one; always one when segment ends are aligned to the engine's KV blocks): a path with
``k`` planned children is one ``GenRequest(prompt, prefix=path so far, n=k)``, so the engine prefills the
shared prefix once and forks it ``k`` ways. Requests go out as token ids, ordered by prompt, so an engine
with a prefix cache (vLLM APC, ``TorchTreeGenerator``) finds each path's earlier segments already
computed. See docs/tree.md.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from rltrain.metrics import SUM, Metric
from rltrain.rollout.base import total_stats
from rltrain.sampling.flat import GenerateFn, Trajectories
from rltrain.sampling.tree import (
    DIVERGENCE_POLICIES,
    FALLBACK_POLICIES,
    Branching,
    Path,
    SegmentTree,
    StopRules,
    segment_budget,
)
from rltrain.types import FinishReason, GenRequest, GenResult, SamplingParams, TokenStats

log = logging.getLogger(__name__)


class TreeSampler:
    """``width`` finished trajectories per prompt, grown as trees of ``segment_len``-token segments.

    Settings (docs/algorithms.md): ``segment_len`` l, ``max_depth`` d, ``width`` w, ``branching`` b;
    ``init_divergence_min/max``: children of the root, fixed (max = -1) or uniform in [min, max] per prompt
    (-1 = b); ``divergence_policy`` even | logprob | entropy with ``divergence_temperature``; ``fallback``
    restarts a prompt from a finished STOP path (False: from the root), cut at a segment boundary
    (``fallback_policy="segment"``) or at one of the ``critical_top_k`` highest-surprisal tokens
    (``"critical"``, CURE). ``answer_pattern`` (regex) ends a path at its first match; ``repetition_ngram``
    > 0 ends a path whose response repeats an n-gram ``repetition_count`` times. ``decode`` (token ids ->
    text) is needed by the text rules (answer, stop strings across segment boundaries). ``seed`` seeds
    the branching choices (budget remainders, fallback cuts). ``kv_block_size`` (the engine's prefix-cache
    block, vLLM) aligns segment ends to it (``tree.segment_budget``), so a continued path recomputes one
    context token instead of its partial last block; None: every segment is ``segment_len``.
    """

    def __init__(
        self,
        generate: GenerateFn,
        *,
        segment_len: int = 16,
        max_depth: int = 6,
        width: int = 8,
        branching: int = 2,
        init_divergence_min: int = -1,
        init_divergence_max: int = -1,
        divergence_policy: str = "even",
        divergence_temperature: float = 2.0,
        fallback: bool = True,
        fallback_policy: str = "segment",
        critical_top_k: int = 20,
        answer_pattern: str | None = None,
        repetition_ngram: int = 0,
        repetition_count: int = 8,
        seed: int | None = None,
        decode: Callable[[Sequence[int]], str] | None = None,
        kv_block_size: int | None = None,
    ):
        for name, value in (
            ("segment_len", segment_len),
            ("max_depth", max_depth),
            ("width", width),
            ("branching", branching),
            ("critical_top_k", critical_top_k),
            ("repetition_count", repetition_count),
        ):
            if value < 1:
                raise ValueError(f"tree sampler: {name} must be >= 1, got {value}")
        if kv_block_size is not None and kv_block_size < 1:
            raise ValueError(f"tree sampler: kv_block_size must be >= 1 (or None), got {kv_block_size}")
        if repetition_ngram < 0:
            raise ValueError(f"tree sampler: repetition_ngram must be >= 0 (0 disables), got {repetition_ngram}")
        if divergence_policy not in DIVERGENCE_POLICIES:
            raise ValueError(
                f"tree sampler: divergence_policy={divergence_policy!r} is not one of {list(DIVERGENCE_POLICIES)}"
            )
        if fallback_policy not in FALLBACK_POLICIES:
            raise ValueError(
                f"tree sampler: fallback_policy={fallback_policy!r} is not one of {list(FALLBACK_POLICIES)}"
            )
        if divergence_temperature <= 0:
            raise ValueError(f"tree sampler: divergence_temperature must be > 0, got {divergence_temperature}")
        self.init_low = branching if init_divergence_min == -1 else init_divergence_min
        self.init_high = self.init_low if init_divergence_max == -1 else init_divergence_max
        if not 1 <= self.init_low <= self.init_high:
            raise ValueError(
                f"tree sampler: need 1 <= init_divergence_min <= init_divergence_max (-1 = branching), "
                f"got min={init_divergence_min}, max={init_divergence_max}"
            )
        self.generate = generate
        self.segment_len = segment_len
        self.kv_block_size = kv_block_size
        self.max_depth = max_depth
        self.branching = Branching(
            width, branching, divergence_policy, divergence_temperature, fallback, fallback_policy, critical_top_k
        )
        self.answer_pattern = re.compile(answer_pattern) if answer_pattern else None
        self.repetition = (repetition_ngram, repetition_count)
        self.decode = decode
        self.rng = random.Random(seed)
        self.next_node_id = 0  # segment ids stay unique across calls, so batches can be concatenated
        self.last_counts: dict[str, int] = {}
        self._versions: set[int] = set()  # policy versions the engine reported during the current sample()

    @property
    def width(self) -> int:
        return self.branching.width

    def sample(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Trajectories:
        """Exactly ``width`` trajectories per prompt; ``ancestors`` [N,D] holds each one's segment ids."""
        if not prompts:
            raise ValueError("tree sampler: no prompts")
        rules = StopRules(
            max_tokens=params.max_tokens,
            max_depth=self.max_depth,
            stop_token_ids=tuple(params.stop_token_ids),
            stop_strings=tuple(params.stop_strings),
            answer_pattern=self.answer_pattern,
            repetition_ngram=self.repetition[0],
            repetition_count=self.repetition[1],
            decode=self.decode,
        )
        if params.seed is not None:  # a seeded call is reproducible on its own (resumed runs, re-runs)
            self.rng = random.Random(params.seed)
        tree = SegmentTree(len(prompts), self.branching, rules, self.rng, first_id=self.next_node_id)
        tree.start([self.rng.randint(self.init_low, self.init_high) for _ in prompts])
        prompt_ids = [tuple(p) for p in prompts]
        stats, calls, rounds = TokenStats(), 0, 0
        self._versions = set()
        while tree.live:
            segments, round_stats, round_calls = self._generate_round(prompt_ids, tree.live, params, calls)
            tree.grow(segments)
            stats, calls, rounds = stats + round_stats, calls + round_calls, rounds + 1
        self.next_node_id = tree.next_id
        leaves = tree.ordered_leaves()
        self.last_counts = {
            "restarts": tree.restarts,
            "rounds": rounds,
            **{f"leaves_{FinishReason(r).name.lower()}": c for r, c in Counter(leaf.reason for leaf in leaves).items()},
        }
        log.debug("tree sampler: %s", self.last_counts)
        # The weights change only between sampler calls (rltrain/pipeline.py), so one version samples a whole tree;
        # the oldest is kept should an engine report more.
        traj = _trajectories(leaves, stats, calls, version=min(self._versions, default=0))
        traj.metrics = {f"tree/{name}": Metric(float(count), SUM) for name, count in self.last_counts.items()}
        return traj

    def _generate_round(
        self, prompts: list[tuple[int, ...]], live: list[Path], params: SamplingParams, calls_before: int
    ) -> tuple[list[list[tuple[tuple[int, ...], tuple[float, ...], FinishReason]]], TokenStats, int]:
        """Sample every live path's children. Block-aligned budgets differ per path and go in one call as
        per-request ``max_tokens`` (vLLM); otherwise one call per distinct budget (normally one)."""
        budgets = [
            min(
                segment_budget(len(prompts[path.prompt]), len(path.tokens), self.segment_len, self.kv_block_size),
                params.max_tokens - len(path.tokens),
            )
            for path in live
        ]
        if self.kv_block_size is None:
            distinct = sorted(set(budgets), reverse=True)
            groups = [[i for i, b in enumerate(budgets) if b == budget] for budget in distinct]
        else:
            groups = [list(range(len(live)))]
        segments: list[list[tuple[tuple[int, ...], tuple[float, ...], FinishReason]]] = [[] for _ in live]
        stats, calls = TokenStats(), 0
        for rows in groups:
            budget = max(budgets[i] for i in rows)
            requests = [
                GenRequest(
                    prompts[live[i].prompt],
                    tuple(live[i].tokens),
                    n=live[i].fan_out,
                    max_tokens=budgets[i] if budgets[i] < budget else None,
                )
                for i in rows
            ]
            # A fixed seed must not replay the same random stream in every round.
            seed = None if params.seed is None else params.seed + calls_before + calls
            outputs = self.generate(requests, dataclasses.replace(params, max_tokens=budget, seed=seed))
            if len(outputs) != len(requests) or any(len(o) != r.n for o, r in zip(outputs, requests)):
                raise RuntimeError("tree sampler: generate returned a different number of results than requested")
            for i, results in zip(rows, outputs):
                segments[i] = [(r.token_ids, r.logprobs, r.finish_reason) for r in results]
                self._versions.update(r.policy_version for r in results)
            stats, calls = stats + total_stats(outputs), calls + 1
        return segments, stats, calls


def _trajectories(leaves: list[Path], stats: TokenStats, calls: int, version: int = 0) -> Trajectories:
    """Leaves -> Trajectories: the last generate call's tokens are the result, earlier segments the prefix;
    ``version``: the policy version that sampled the tree.

    Per-leaf ``GenResult.stats`` are zero: shared prefixes belong to no single leaf; the totals are in
    ``Trajectories.stats``.
    """
    depth = max(leaf.depth for leaf in leaves)
    ancestors = torch.full((len(leaves), depth), -1, dtype=torch.long)
    results, prefixes, prefix_logprobs = [], [], []
    for row, leaf in enumerate(leaves):
        ancestors[row, : leaf.depth] = torch.tensor(leaf.nodes, dtype=torch.long)
        split = len(leaf.tokens) - leaf.last_len
        assert leaf.reason is not None
        tokens, logprobs = tuple(leaf.tokens[split:]), tuple(leaf.logprobs[split:])
        results.append(GenResult(tokens, logprobs, leaf.reason, policy_version=version))
        prefixes.append(tuple(leaf.tokens[:split]))
        prefix_logprobs.append(tuple(leaf.logprobs[:split]))
    return Trajectories(
        prompt_index=[leaf.prompt for leaf in leaves],
        results=results,
        prefixes=prefixes,
        prefix_logprobs=prefix_logprobs,
        ancestors=ancestors,
        stats=stats,
        generate_calls=calls,
    )
