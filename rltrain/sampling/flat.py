"""Samplers turn prompts into trajectories by driving a generate function.

A sampler only calls ``generate(requests, params)``; it never touches an engine directly, so the
same sampler runs over the torch engine, vLLM, or a Ray rollout group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from rltrain.metrics import Metric
from rltrain.rollout.base import total_stats
from rltrain.types import GenRequest, GenResult, SamplingParams, TokenStats

GenerateFn = Callable[[Sequence[GenRequest], SamplingParams], list[list[GenResult]]]


@dataclass
class Trajectories:
    """Sampler output: trajectory i answers prompt ``prompt_index[i]``.

    The response of trajectory i is ``prefixes[i] + results[i].token_ids`` (tree paths carry their
    earlier segments in ``prefixes``; flat sampling leaves them empty). ``ancestors`` [N,D] is set by
    tree samplers only. ``metrics``: the sampler's own statistics of this call, each with its reduction
    (``rltrain.metrics``), logged by the trainer.
    """

    prompt_index: list[int]
    results: list[GenResult]
    prefixes: list[tuple[int, ...]] = field(default_factory=list)
    prefix_logprobs: list[tuple[float, ...]] = field(default_factory=list)
    ancestors: Tensor | None = None
    stats: TokenStats = field(default_factory=TokenStats)
    generate_calls: int = 0
    metrics: dict[str, Metric] = field(default_factory=dict)


class FlatSampler:
    """``n`` independent samples per prompt; the engine shares each prompt's prefill across its group."""

    def __init__(self, generate: GenerateFn, n: int):
        self.generate = generate
        self.n = n

    def sample(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Trajectories:
        requests = [GenRequest(tuple(p), n=self.n) for p in prompts]
        outputs = self.generate(requests, params)
        index = [i for i, group in enumerate(outputs) for _ in group]
        results = [r for group in outputs for r in group]
        return Trajectories(index, results, stats=total_stats(outputs), generate_calls=1)
