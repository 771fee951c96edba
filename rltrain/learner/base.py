"""The Learner protocol and the loss-function contract shared by every learner backend.

Loss normalisation is global: a loss function returns this micro-batch's *contribution* to the
loss of the whole optimizer step, already divided by the step's global token / sequence counts
(``LossNorm``, summed over all micro-batches and all data-parallel ranks). The learner calls
``backward()`` on each contribution as it is, so the gradient does not depend on how the step is
split into micro-batches or ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from rltrain.types import RolloutBatch


@dataclass(frozen=True)
class LossNorm:
    """Counts over the whole optimizer step (all micro-batches, all ranks)."""

    global_tokens: int  # sum of response_mask
    global_seqs: int  # number of trajectories


@runtime_checkable
class LossFn(Protocol):
    """``loss_fn(logprobs, entropy, micro, norm) -> (loss, metrics)``.

    logprobs [b,T]: current-policy logprobs of ``micro.response_ids`` (with grad).
    entropy [b,T] | None: per-token entropy, computed only when ``loss_fn.needs_entropy`` is True.
    loss: scalar contribution (see module docstring). metrics: float contributions that are summed
    over micro-batches and ranks (so they must be normalised by ``norm`` as well).
    """

    needs_entropy: bool

    def __call__(
        self, logprobs: Tensor, entropy: Tensor | None, micro: RolloutBatch, norm: LossNorm
    ) -> tuple[Tensor, dict[str, float]]: ...


@runtime_checkable
class Learner(Protocol):
    """Algorithm-blind trainer of a causal LM policy."""

    def logprobs(self, batch: RolloutBatch, reference: bool = False) -> Tensor:
        """[B,T] logprobs of the response tokens (0 where masked), no grad; ``reference`` uses the ref model."""
        ...

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over ``batch`` (split into micro-batches internally)."""
        ...

    def export_weights(self) -> Iterator[tuple[str, Tensor]]:
        """HF-named parameters for weight sync, streamed."""
        ...

    def save(self, directory: str) -> None: ...

    def load(self, directory: str) -> None: ...
