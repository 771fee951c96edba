"""The LearnerGroup protocol and the loss-function contract shared by every learner backend.

Loss normalisation is global: a loss function returns this micro-batch's *contribution* to the
loss of the whole optimizer step, already divided by the step's global token / sequence counts
(``LossNorm``, summed over all micro-batches and all data-parallel ranks). The learner calls
``backward()`` on each contribution as it is, so the gradient does not depend on how the step is
split into micro-batches or ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

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
class LearnerGroup(Protocol):
    """What the driver calls on a learner backend: the torch group (one actor, rltrain/dist/groups.py) and the
    DeepSpeed group (K ranks, rltrain/dist/deepspeed_group.py) both implement it; ``Runtime`` and ``WeightSync``
    (rltrain/dist/syncer.py) know nothing else about them. Calls block until every rank answered; a dead rank is a
    RunError naming it (``labels``: actor id -> "learner rank i (actor ..., pid ...)").
    """

    labels: dict[str, str]

    @property
    def use_gpu(self) -> bool: ...

    def logprobs(self, batch: RolloutBatch, reference: bool = False, threads: int | None = None) -> Tensor:
        """[B,T] logprobs of the response tokens (0 where masked), no grad; ``reference``: the reference policy."""
        ...

    def train_step(
        self, batch: RolloutBatch, loss_fn: LossFn, threads: int | None = None, micro_threads: int = 1
    ) -> dict[str, float]:
        """One optimizer step over ``batch`` (micro-batched and, for K ranks, split by tokens) with ``loss_fn``;
        ``micro_threads`` > 1 only for the torch learner (rltrain/learner/micro_threads.py)."""
        ...

    def export_weights_ref(self) -> Any:
        """An object ref to the HF-named weights (or their buckets) that rollout workers load themselves."""
        ...

    def sync_sender(self) -> Any:
        """The actor that sends collective weight syncs (rank 0)."""
        ...

    def broadcast_weights_refs(self, bucket_mb: int) -> list:
        """Start a collective sync on the sending rank; refs resolve to its send statistics."""
        ...

    def save(self, directory: str) -> None: ...

    def load(self, directory: str) -> None: ...

    def actors(self) -> list:
        """Every Ray actor of the group (for shutdown)."""
        ...
