"""How a learner cuts a step's rows into micro-batches and computes one: padded, packed or prefix-shared.

One implementation for the torch learner and the DeepSpeed ranks (whose group plans every rank's micro-batches
on the driver). ``micro_batch_size`` consecutive padded rows by default; with ``max_tokens`` (the
``learner.max_tokens_per_micro_batch`` budget) rows packed padding-free under the budget (rltrain/learner/packing.py);
with ``share_prefixes`` whole prompt groups with each distinct prefix computed once: a flat group's prompt through
the KV cache (rltrain/learner/prefix_cache.py), a tree's shared segments in a token trie
(rltrain/learner/tree_packing.py). The padded forward is the learner's own (the DeepSpeed ranks trim all-padding
columns first); the packed ones are here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rltrain.learner.packing import packed_micro_batches, packed_sequence_logprobs
from rltrain.learner.prefix_cache import prefix_cache_applies, prefix_cached_logprobs
from rltrain.learner.tree_packing import group_micro_batches, shared_sequence_logprobs
from rltrain.types import RolloutBatch


@dataclass(frozen=True)
class MicroForward:
    """One micro-batch's forward: logprobs [b,T], entropy [b,T] | None (0 where response_mask is 0), the tokens
    computed, and the tokens the same rows hold without prefix sharing (equal to ``tokens`` unless shared)."""

    logprobs: Tensor
    entropy: Tensor | None
    tokens: int
    unshared_tokens: int


@dataclass(frozen=True)
class MicroBatching:
    """A learner's micro-batch settings: ``micro_batch_size``, ``max_tokens`` (None: no token budget) and
    ``share_prefixes``."""

    micro_batch_size: int
    max_tokens: int | None = None
    share_prefixes: bool = False

    @property
    def packs(self) -> bool:
        """Whether micro-batches are packed into one padding-free row (a token budget or prefix sharing)."""
        return self.share_prefixes or self.max_tokens is not None

    def rows(self, batch: RolloutBatch, micro_threads: int = 1) -> list[list[int]]:
        """Row indices of each micro-batch of ``batch``: whole prompt groups when sharing prefixes, packed under the
        token budget, else consecutive chunks of ``micro_batch_size`` rows. ``micro_threads`` > 1
        (rltrain/learner/micro_threads.py) caps a micro-batch at ``ceil(rows / micro_threads)`` rows, so that each
        thread has one; a token budget's bins stay."""
        max_rows = max(1, min(self.micro_batch_size, -(-batch.batch_size // max(1, micro_threads))))
        if self.share_prefixes:
            return group_micro_batches(batch, max_rows, self.max_tokens)
        if self.max_tokens is not None:
            return packed_micro_batches(batch, self.max_tokens)
        return [chunk.tolist() for chunk in torch.arange(batch.batch_size).split(max_rows)]

    def packed_forward(
        self, model: torch.nn.Module, micro: RolloutBatch, temperature: float, with_entropy: bool
    ) -> MicroForward:
        """The prefix-shared or packed forward of ``micro`` (only when ``packs``)."""
        # Under a token budget the trie stays: the budget bins groups by their trie size, which the cache path's
        # padding to the widest prompt and response could exceed.
        if self.share_prefixes and self.max_tokens is None and prefix_cache_applies(model, micro):
            return MicroForward(*prefix_cached_logprobs(model, micro, temperature, with_entropy))
        if self.share_prefixes:
            logprobs, entropy, packed = shared_sequence_logprobs(model, micro, temperature, with_entropy)
            return MicroForward(logprobs, entropy, packed.tokens, packed.unshared_tokens)
        logprobs, entropy, tokens = packed_sequence_logprobs(model, micro, temperature, with_entropy)
        return MicroForward(logprobs, entropy, tokens, tokens)

    def token_metrics(self, computed: int, unshared: int) -> dict[str, float]:
        """``perf/learner_tokens`` (tokens computed) and, when sharing prefixes, ``perf/learner_tokens_saved``."""
        metrics = {"perf/learner_tokens": float(computed)}
        if self.share_prefixes:
            metrics["perf/learner_tokens_saved"] = float(unshared - computed)
        return metrics


def rows_in_batch_order(parts: Sequence[Tensor], micro_rows: Sequence[Sequence[int]], shape: torch.Size) -> Tensor:
    """Per-micro-batch results ``parts[i]`` [len(micro_rows[i]),T] put back into the batch's row order: [B,T]."""
    out = torch.zeros(shape)
    if parts:
        out[torch.tensor([row for rows in micro_rows for row in rows])] = torch.cat(parts)
    return out
