"""Tree-segment bookkeeping for TreePO sampling (arXiv 2508.17445; docs/algorithms.md): pure Python, no engine.

A tree per prompt. Its root is the prompt; every other node is one generated *segment* of at most ``l``
tokens, named by an integer id that is unique across every tree a ``SegmentTree`` (and a sampler reusing
its counter) ever builds. A ``Path`` is a root-to-node walk: its ``nodes`` are the ids at depth 0, 1, ...
(the ``ancestors`` row of the trajectory once it is a leaf) and its ``tokens`` the concatenated response.

One round (``SegmentTree.grow``): every live path has been extended by ``fan_out`` sampled segments, each
a new child node. Children that stop (EOS / stop string / answer / repetition / response length / depth)
become leaves; the others are *active*. Per prompt the active children share a branching budget

    total = max(min(w - leaves, b * (finished_now + active)), active)

so that a prompt's in-flight + finished paths never exceed ``w``, the tree grows ``b``-fold per round until
it holds ``w`` paths, and the budget of paths that just ended moves to live ones ("budget transfer"). A
prompt left with no live path and fewer than ``w`` leaves restarts from a finished path that ended with
STOP (EOS, stop string or answer), cut at a random segment boundary or at a high-surprisal token
("fallback"; CURE-style critical-token branching, docs/algorithms.md), or from the root when there is
none. Every prompt therefore ends with exactly ``w`` leaves.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rltrain.types import FinishReason

Decode = Callable[[Sequence[int]], str]
DIVERGENCE_POLICIES = ("even", "logprob", "entropy")
FALLBACK_POLICIES = ("segment", "critical")


@dataclass(frozen=True)
class StopRules:
    """When a path ends. ``decode`` (token ids -> text) enables the text rules (stop strings, answer)."""

    max_tokens: int  # response length limit: LENGTH
    max_depth: int  # segments per path: MAX_DEPTH
    stop_token_ids: tuple[int, ...] = ()  # never a critical-token cut point
    stop_strings: tuple[str, ...] = ()
    answer_pattern: re.Pattern[str] | None = None  # a match ends the path with STOP (TreePO "boxed_as_eos")
    repetition_ngram: int = 0  # 0 disables; else an n-gram of this many tokens seen repetition_count times
    repetition_count: int = 8
    decode: Decode | None = None

    @property
    def uses_text(self) -> bool:
        return self.decode is not None and (bool(self.stop_strings) or self.answer_pattern is not None)


@dataclass
class Path:
    """A walk from a prompt's root. ``node_starts[i]`` is where segment ``nodes[i]`` starts in ``tokens``.

    ``open_from`` is where the next segment starts; it is below ``len(tokens)`` only after a critical-token
    cut, when the tokens before the cut that were part of a longer segment join the next segment.
    """

    prompt: int
    nodes: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    node_starts: list[int] = field(default_factory=list)
    open_from: int = 0
    fan_out: int = 0  # live paths: children requested in the next generate call
    reason: FinishReason | None = None  # leaves: why the path ended
    last_len: int = 0  # tokens added by the last generate call (the leaf's own GenResult)

    @property
    def depth(self) -> int:
        return len(self.nodes)

    def last_segment_logprobs(self) -> list[float]:
        return self.logprobs[self.node_starts[-1] :] if self.nodes else []


# ---- stop rules -------------------------------------------------------------------------------------------
def has_repetition(tokens: Sequence[int], ngram: int, count: int) -> bool:
    """True when some ``ngram``-token window occurs at least ``count`` times in ``tokens``."""
    if ngram < 1 or len(tokens) < ngram:
        return False
    windows = Counter(tuple(tokens[i : i + ngram]) for i in range(len(tokens) - ngram + 1))
    return max(windows.values()) >= count


def text_stop(response: Sequence[int], segment: Sequence[int], rules: StopRules) -> int | None:
    """Tokens of ``segment`` to keep when the text of ``response + segment`` hits a stop string or the
    answer pattern (the shortest prefix of the segment that hits it); None when nothing hits.

    Catches stop strings that straddle a segment boundary, which an engine seeing one segment cannot.
    """
    if not rules.uses_text or not segment:
        return None
    decode = rules.decode
    assert decode is not None

    def hits(ids: Sequence[int]) -> bool:
        text = decode(ids)
        if any(s in text for s in rules.stop_strings):
            return True
        return rules.answer_pattern is not None and rules.answer_pattern.search(text) is not None

    head = list(response)
    if not hits(head + list(segment)):
        return None
    return next(k for k in range(1, len(segment) + 1) if hits(head + list(segment[:k])))


def end_of_segment(
    response: Sequence[int], segment: Sequence[int], engine_reason: FinishReason, depth: int, rules: StopRules
) -> tuple[int, FinishReason | None]:
    """(tokens of ``segment`` kept, why the path ends or None to continue) after appending ``segment``.

    Priority as in TreePO: abort, repetition, stop (text rules, then the engine's EOS / stop string),
    response length, depth. ``depth`` counts segments including this one.
    """
    kept = len(segment)
    if engine_reason == FinishReason.ABORT:
        return kept, FinishReason.ABORT
    if rules.repetition_ngram and has_repetition(
        list(response) + list(segment), rules.repetition_ngram, rules.repetition_count
    ):
        return kept, FinishReason.REPETITION
    cut = text_stop(response, segment, rules)
    if cut is not None:
        return cut, FinishReason.STOP
    if engine_reason == FinishReason.STOP:
        return kept, FinishReason.STOP
    if len(response) + kept >= rules.max_tokens:
        return kept, FinishReason.LENGTH
    if depth >= rules.max_depth:
        return kept, FinishReason.MAX_DEPTH
    return kept, None


# ---- segment length --------------------------------------------------------------------------------------
def segment_budget(prompt_len: int, response_len: int, segment_len: int, block_size: int | None) -> int:
    """Tokens to decode in a path's next segment: ``segment_len``, or, aligned to a prefix cache of
    ``block_size``-token blocks (vLLM), the smallest count >= ``segment_len`` after which the context
    (prompt + response) is one token past a block boundary.

    A prefix cache reuses whole blocks only and always recomputes the last context token; a context of
    ``k * block_size + 1`` tokens is therefore the cheapest to continue (1 token recomputed instead of up
    to ``block_size``). With ``segment_len`` a multiple of ``block_size`` only a path's first segment is
    lengthened (by < ``block_size`` tokens); later ones are exactly ``segment_len``.
    """
    if block_size is None:
        return segment_len
    context_end = prompt_len + response_len + segment_len
    return segment_len + (1 - context_end) % block_size


# ---- branching budget -------------------------------------------------------------------------------------
def children_total(remaining: int, finished_now: int, active: int, branching: int) -> int:
    """Children for a prompt's ``active`` paths: ``b`` per path that was live this round (finished ones
    transfer theirs), capped by the ``remaining`` leaves, and at least one per active path."""
    return max(min(remaining, branching * (finished_now + active)), active)


def split_even(total: int, n: int, rng: random.Random) -> list[int]:
    """``total`` children over ``n`` paths as evenly as possible; the remainder goes to random paths."""
    if n < 1 or total < n:
        raise ValueError(f"split_even: need total >= n >= 1, got total={total}, n={n}")
    base, extra = divmod(total, n)
    lucky = set(rng.sample(range(n), extra))
    return [base + (i in lucky) for i in range(n)]


def divergence_weights(scores: Sequence[float], temperature: float) -> list[float]:
    """softmax((score - min score) / temperature) -> weights summing to 1."""
    if temperature <= 0:
        raise ValueError(f"divergence temperature must be > 0, got {temperature}")
    low = min(scores)
    exps = [math.exp((s - low) / temperature) for s in scores]
    norm = sum(exps)
    return [e / norm for e in exps]


def split_weighted(total: int, weights: Sequence[float]) -> list[int]:
    """One child per path, the other ``total - n`` in proportion to ``weights`` (largest remainder)."""
    n = len(weights)
    if n < 1 or total < n:
        raise ValueError(f"split_weighted: need total >= n >= 1, got total={total}, n={n}")
    shares = [(total - n) * w for w in weights]
    counts = [1 + math.floor(s) for s in shares]
    by_remainder = sorted(range(n), key=lambda i: (math.floor(shares[i]) - shares[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def path_score(path: Path, policy: str) -> float:
    """Mean logprob ("logprob": favours likely paths) or mean surprisal ("entropy": a one-sample entropy
    estimate, favours uncertain paths) of the path's last segment."""
    logprobs = path.last_segment_logprobs()
    mean = sum(logprobs) / len(logprobs) if logprobs else 0.0
    return mean if policy == "logprob" else -mean


def allocate(total: int, paths: Sequence[Path], policy: str, temperature: float, rng: random.Random) -> list[int]:
    """Children per active path under the divergence ``policy`` (even | logprob | entropy)."""
    if policy == "even":
        return split_even(total, len(paths), rng)
    if policy not in DIVERGENCE_POLICIES:
        raise ValueError(f"divergence policy {policy!r} is not one of {list(DIVERGENCE_POLICIES)}")
    scores = [path_score(p, policy) for p in paths]
    return split_weighted(total, divergence_weights(scores, temperature))


# ---- fallback cut points ----------------------------------------------------------------------------------
def segment_cut(num_nodes: int, max_depth: int, rng: random.Random) -> int:
    """Segments of a finished path to keep: uniform over its boundaries before the last segment
    (0 = restart from the prompt), at most ``max_depth - 1`` so the restarted path can grow."""
    return min(rng.randrange(num_nodes), max_depth - 1) if num_nodes else 0


def critical_positions(path: Path, top_k: int, rules: StopRules) -> list[int]:
    """CURE candidates: the ``top_k`` response positions with the highest surprisal (-logprob of the sampled
    token), skipping position 0, stop tokens and (with ``decode``) tokens whose stripped text is <= 1 char."""
    stops = set(rules.stop_token_ids)
    eligible = []
    for t in range(1, len(path.tokens)):
        if path.tokens[t] in stops:
            continue
        if rules.decode is not None and len(rules.decode([path.tokens[t]]).strip()) <= 1:
            continue
        eligible.append(t)
    eligible.sort(key=lambda t: (path.logprobs[t], t))
    return eligible[:top_k]


def truncate(path: Path, position: int) -> Path:
    """A live copy of ``path`` keeping ``tokens[:position]`` (``0 <= position < len(tokens)``): segments that
    end at or before the cut stay shared nodes; the kept head of the cut segment opens the next segment."""
    cut_node = bisect.bisect_right(path.node_starts, position) - 1  # the segment holding token ``position``
    return Path(
        prompt=path.prompt,
        nodes=path.nodes[:cut_node],
        tokens=path.tokens[:position],
        logprobs=path.logprobs[:position],
        node_starts=path.node_starts[:cut_node],
        open_from=path.node_starts[cut_node],
    )


@dataclass(frozen=True)
class Branching:
    """How a prompt's tree branches (the sampler's settings, validated there)."""

    width: int
    branching: int
    divergence_policy: str = "even"
    divergence_temperature: float = 2.0
    fallback: bool = True
    fallback_policy: str = "segment"
    critical_top_k: int = 20


class SegmentTree:
    """The trees of one batch of prompts. Drive it with ``start``, then ``grow`` until ``live`` is empty."""

    def __init__(self, num_prompts: int, branching: Branching, rules: StopRules, rng: random.Random, first_id: int = 0):
        self.num_prompts = num_prompts
        self.cfg = branching
        self.rules = rules
        self.rng = rng
        self.next_id = first_id
        self.live: list[Path] = []
        self.leaves: list[list[Path]] = [[] for _ in range(num_prompts)]
        self.restarts = 0

    def start(self, divergence: Sequence[int]) -> None:
        """One root path per prompt with ``divergence[p]`` children (clamped to ``[1, width]``)."""
        if len(divergence) != self.num_prompts:
            raise ValueError(f"start: {len(divergence)} divergences for {self.num_prompts} prompts")
        self.live = [Path(p, fan_out=max(1, min(k, self.cfg.width))) for p, k in enumerate(divergence)]

    def grow(self, segments: Sequence[Sequence[tuple[Sequence[int], Sequence[float], FinishReason]]]) -> None:
        """Apply one round: ``segments[i]`` are the ``live[i].fan_out`` sampled (tokens, logprobs, engine reason)."""
        if len(segments) != len(self.live):
            raise ValueError(f"grow: {len(segments)} segment lists for {len(self.live)} live paths")
        active: list[list[Path]] = [[] for _ in range(self.num_prompts)]
        finished_now = [0] * self.num_prompts
        for parent, children in zip(self.live, segments):
            if len(children) != parent.fan_out:
                raise ValueError(f"grow: a path asked for {parent.fan_out} children and got {len(children)}")
            for tokens, logprobs, reason in children:
                child = self._extend(parent, tokens, logprobs, reason)
                if child.reason is None:
                    active[child.prompt].append(child)
                else:
                    self.leaves[child.prompt].append(child)
                    finished_now[child.prompt] += 1
        self.live = []
        for p in range(self.num_prompts):
            if active[p]:
                self.live.extend(self._branch(p, active[p], finished_now[p]))
            elif len(self.leaves[p]) < self.cfg.width:
                self.live.extend(self._restart(p))

    def _extend(self, parent: Path, tokens: Sequence[int], logprobs: Sequence[float], reason: FinishReason) -> Path:
        kept, end = end_of_segment(parent.tokens, tokens, reason, parent.depth + 1, self.rules)
        child = Path(
            prompt=parent.prompt,
            nodes=[*parent.nodes, self.next_id],
            tokens=parent.tokens + list(tokens[:kept]),
            logprobs=parent.logprobs + list(logprobs[:kept]),
            node_starts=[*parent.node_starts, parent.open_from],
            reason=end,
            last_len=kept,
        )
        child.open_from = len(child.tokens)
        self.next_id += 1
        return child

    def _branch(self, prompt: int, active: list[Path], finished_now: int) -> list[Path]:
        remaining = self.cfg.width - len(self.leaves[prompt])
        total = children_total(remaining, finished_now, len(active), self.cfg.branching)
        counts = allocate(total, active, self.cfg.divergence_policy, self.cfg.divergence_temperature, self.rng)
        for path, count in zip(active, counts):
            path.fan_out = count
        return active

    def _restart(self, prompt: int) -> list[Path]:
        """Fallback for a prompt with no live path and fewer than ``width`` leaves."""
        remaining = self.cfg.width - len(self.leaves[prompt])
        candidates: list[Path | None] = []
        if self.cfg.fallback:
            candidates = [leaf for leaf in self.leaves[prompt] if leaf.reason == FinishReason.STOP]
            self.rng.shuffle(candidates)
        restarts = []
        for leaf in candidates or [None]:
            if remaining <= 0:
                break
            path = Path(prompt) if leaf is None else self._cut(leaf)
            path.fan_out = min(self.cfg.branching, remaining)
            remaining -= path.fan_out
            restarts.append(path)
        self.restarts += len(restarts)
        return restarts

    def _cut(self, leaf: Path) -> Path:
        if self.cfg.fallback_policy == "critical":
            positions = critical_positions(leaf, self.cfg.critical_top_k, self.rules)
            if positions:
                return truncate(leaf, self.rng.choice(positions))
        return truncate(leaf, leaf.node_starts[segment_cut(leaf.depth, self.rules.max_depth, self.rng)])

    def ordered_leaves(self) -> list[Path]:
        """All leaves, by prompt, each tree in depth-first order of its node ids."""
        return [leaf for leaves in self.leaves for leaf in sorted(leaves, key=lambda path: path.nodes)]
