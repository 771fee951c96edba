"""Micro-batch threads (CPU): a step's micro-batches computed side by side, each on a thread with one torch thread.

Why not more intra-op threads: an OpenMP team waits at every kernel's barrier, so when one of its threads loses its
core to another actor (a rollout worker generating while the learner trains, ``trainer.max_staleness`` >= 1) the
whole team waits for it (``cluster.omp_threads=2`` made that step more than 4x slower). Micro-batch threads share
nothing between kernels: while a rollout worker runs, they share the core it leaves; while it waits, they have both.
On an idle 2-core machine two of them also beat two intra-op threads on a tiny model's small kernels
(docs/benchmarks.md).

Same gradients as one thread: the calling thread backpropagates the first micro-batch of each round into ``.grad``
as the sequential loop does; the other threads return theirs (``torch.autograd.grad``), added in micro-batch order
after the round, so every parameter's gradient is summed in the loop's order (bit for bit, tests/unit/
test_micro_threads.py). The price is ``count - 1`` extra gradient copies while a round runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch
from torch import Tensor

# A micro-batch's work: its forward and loss, returning (loss with its graph, anything the caller wants back).
MicroTask = Callable[[], tuple[Tensor, Any]]


class MicroBatchThreads:
    """Runs micro-batch tasks ``count`` at a time and accumulates their gradients into ``params``' ``.grad``."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def backward(self, tasks: Sequence[MicroTask], params: Sequence[Tensor], count: int) -> list[tuple[Tensor, Any]]:
        """(detached loss, payload) of each task in order, each loss backpropagated into ``params`` as
        ``for task in tasks: task()[0].backward()`` would, ``count`` tasks at a time."""
        if count <= 1 or len(tasks) <= 1:
            return [_backward(task) for task in tasks]
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # this thread computes micro-batches too
        try:
            results = []
            for start in range(0, len(tasks), count):
                results.extend(self._round(tasks[start : start + count], params))
            return results
        finally:
            torch.set_num_threads(previous_threads)

    def _round(self, tasks: Sequence[MicroTask], params: Sequence[Tensor]) -> list[tuple[Tensor, Any]]:
        pool = self._pool_of(len(tasks) - 1)
        others: list[Future] = [pool.submit(_gradients, task, params) for task in tasks[1:]]
        try:
            first = _backward(tasks[0])
        finally:
            wait(others)  # never leave a thread running on the model while an error propagates
        results = [first]
        for future in others:
            loss, payload, grads = future.result()
            for param, grad in zip(params, grads):
                if grad is not None:
                    param.grad = grad if param.grad is None else param.grad.add_(grad)
            results.append((loss, payload))
        return results

    def _pool_of(self, size: int) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_size < size:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = ThreadPoolExecutor(
                size, "rltrain-micro-batch", initializer=torch.set_num_threads, initargs=(1,)
            )
            self._pool_size = size
        return self._pool


def _backward(task: MicroTask) -> tuple[Tensor, Any]:
    loss, payload = task()
    loss.backward()
    return loss.detach(), payload


def _gradients(task: MicroTask, params: Sequence[Tensor]) -> tuple[Tensor, Any, tuple[Tensor | None, ...]]:
    loss, payload = task()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), payload, grads
