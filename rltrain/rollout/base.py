"""The Generator protocol: tokens in, tokens out. Engines live beside this file."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

from rltrain.types import GenRequest, GenResult, SamplingParams, TokenStats


@runtime_checkable
class Generator(Protocol):
    """A sampling engine.

    ``generate`` returns, for each request, a list of ``request.n`` results (in request order).
    ``load_weights`` replaces the model weights (HF parameter names) and records ``version``, the
    learner's policy version that produced them; ``policy_version`` reports it.
    """

    def generate(self, requests: Sequence[GenRequest], params: SamplingParams) -> list[list[GenResult]]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None: ...

    @property
    def policy_version(self) -> int: ...


def total_stats(results: Iterable[Sequence[GenResult]]) -> TokenStats:
    """Sum the token accounting of nested generate results."""
    total = TokenStats()
    for per_request in results:
        for result in per_request:
            total = total + result.stats
    return total


def with_version(outputs: list[list[GenResult]], version: int) -> list[list[GenResult]]:
    """``outputs`` with every result's ``policy_version`` set: how an engine reports the weights it sampled under."""
    return [[dataclasses.replace(result, policy_version=version) for result in group] for group in outputs]
