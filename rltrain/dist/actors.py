"""Thin Ray actors: each holds exactly one backend and forwards explicit methods to it.

The classes are plain Python so that they can also be used in-process (tests); ``ray.remote`` is
applied where actors are created (rltrain/dist/groups.py), so ray is not imported here.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from rltrain.dist.weight_sync import WeightReceiver, WeightSender
from rltrain.types import GenRequest, GenResult, SamplingParams


# Learner actors return CPU tensors through Ray's zero-copy torch serialisation: a returned tensor's bytes go into the
# object store once, with no pickled copy in the actor's memory (exporting a 2.5M-parameter model's 50 tensors:
# 21.6 ms -> 10.0 ms per put including the export's copy). Safe because Ray serialises a result before the actor
# runs its next call; receivers get read-only tensors and never write into them.
ZERO_COPY_RUNTIME_ENV = {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}}


def quiet_zero_copy_sender() -> None:
    """In an actor started with ``ZERO_COPY_RUNTIME_ENV``: drop Ray's notice that zero-copy is on (not for users)."""
    warnings.filterwarnings("ignore", message="Zero-copy tensor serialization is enabled")


_READ_ONLY_NOTICE = "The given NumPy array is not writable"


@contextlib.contextmanager
def receiving_read_only_tensors() -> Iterator[None]:
    """Receive zero-copy tensors (read-only views of the object store) without torch's not-writable warning; the
    receiver copies them or reads them only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_READ_ONLY_NOTICE)
        yield


def quiet_read_only_receiver() -> None:
    """The same for a whole actor that only reads the tensors it is sent (a rollout worker: Ray resolves a call's
    object-ref arguments before the call runs, so a filter inside the call would come too late)."""
    warnings.filterwarnings("ignore", message=_READ_ONLY_NOTICE)


def _limit_threads(threads: int) -> None:
    """One actor per core on small machines: oversubscribed BLAS threads make a 2-core box 30x slower."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def use_threads(threads: int | None) -> None:
    """Run this call with ``threads`` torch threads (the driver's plan for this phase, rltrain/dist/threads.py);
    None keeps the current count."""
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def build_generator(engine: str, model_path: str, seed: int, options: dict[str, Any]):
    """Construct the rollout engine named ``engine`` (torch | vllm | auto)."""
    if engine == "auto":
        import importlib.util

        engine = "vllm" if importlib.util.find_spec("vllm") is not None else "torch"
    if engine == "vllm":
        from rltrain.rollout.vllm_engine import VLLMGenerator

        return VLLMGenerator(model_path, seed=seed, **options)
    if engine == "torch":
        from rltrain.rollout.torch_engine import TorchGenerator
        from rltrain.rollout.torch_tree_engine import TorchTreeGenerator

        cls = TorchTreeGenerator if options.get("kv_fork") else TorchGenerator
        return cls.from_pretrained(model_path, dtype=options.get("dtype", "float32"), seed=seed)
    raise ValueError(f"unknown rollout engine {engine!r}; known: torch, vllm, auto")


class RolloutWorker(WeightReceiver):
    """Holds one Generator; receives weights from the object store (``load_weights``) or the sync group."""

    def __init__(self, engine: str, model_path: str, seed: int, threads: int, options: dict[str, Any]):
        _limit_threads(threads)
        quiet_read_only_receiver()
        self.generator = build_generator(engine, model_path, seed, options)

    def generate(
        self, requests: list[GenRequest], params: SamplingParams, threads: int | None = None
    ) -> list[list[GenResult]]:
        use_threads(threads)
        return self.generator.generate(requests, params)

    def load_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> int:
        """``named_tensors``: the learner's export, resolved by Ray from its object ref (read-only tensors)."""
        self.generator.load_weights(named_tensors.items(), version)
        return self.generator.policy_version

    def policy_version(self) -> int:
        return self.generator.policy_version

    def kv_block_size(self) -> int | None:
        """The engine's prefix-cache block in tokens; None for engines that reuse exact prefixes (torch)."""
        return getattr(self.generator, "kv_block_size", None)

    def score(self, pairs: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[tuple[float, ...]]:
        """Logprobs of given continuations under the engine's current weights (vLLM engine only)."""
        return self.generator.score(pairs)

    def sleep(self) -> None:
        self.generator.sleep()

    def wake_up(self) -> None:
        self.generator.wake_up()

    def ready(self) -> bool:
        return True


class RewardWorker:
    """Holds one RewardGrader (itself a pool of grader processes with deadlines) and, with ``env_options``, an
    EnvRunner (environment calls in their own pool of such processes; rltrain/env/runner.py)."""

    def __init__(self, threads: int, grader_options: dict[str, Any], env_options: dict[str, Any] | None = None):
        from rltrain.grading import RewardGrader

        _limit_threads(threads)
        self.grader = RewardGrader(**grader_options)
        self.env = None
        if env_options is not None:
            from rltrain.env.runner import EnvRunner

            self.env = EnvRunner(**env_options)

    def grade(self, completions: list[str], rows: list[dict]):
        return self.grader.grade(completions, rows)

    def env_calls(self, calls: list) -> list:
        return self.env.run(calls)

    def close(self) -> None:
        self.grader.close()
        if self.env is not None:
            self.env.close()

    def ready(self) -> bool:
        return True


class LearnerWorker(WeightSender):
    """Holds one Learner backend (torch here; DeepSpeed ranks live in their own group)."""

    def __init__(self, threads: int, model_path: str, options: dict[str, Any]):
        from rltrain.learner.torch_learner import TorchLearner

        _limit_threads(threads)
        quiet_zero_copy_sender()
        self.learner = TorchLearner(model_path, **options)

    def logprobs(self, batch, reference: bool = False, threads: int | None = None) -> torch.Tensor:
        use_threads(threads)
        return self.learner.logprobs(batch, reference)

    def train_step(self, batch, loss_fn, threads: int | None = None, micro_threads: int = 1) -> dict[str, float]:
        use_threads(threads)
        return self.learner.train_step(batch, loss_fn, micro_threads)

    def forward_extras(self, batch, extras_fn, threads: int | None = None) -> dict[str, torch.Tensor]:
        use_threads(threads)
        return self.learner.forward_extras(batch, extras_fn)

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The weights as views (no copy): Ray serialises them into the object store as this call returns, before
        any later call can change them."""
        return dict(self.learner.export_weights(copy=False))

    def save(self, directory: str) -> None:
        self.learner.save(directory)

    def load(self, directory: str) -> None:
        self.learner.load(directory)

    def ready(self) -> bool:
        return True
