"""An in-process stand-in for ``rltrain.runtime.Runtime``, so ``Trainer`` runs in unit tests in seconds.

Deterministic: a response's length and tokens are a function of (prompt, prefix, sample, seed); its reward is
``reward_of(row, response tokens)``. Old logprobs equal the rollout logprobs; reference logprobs are
``ref_shift`` lower on every token (k1 KL = ``ref_shift``). ``train_step`` runs the real loss function on
the batch and records every batch it received; ``nonfinite_calls`` lists the train_step calls (0-based)
that report a skipped non-finite update.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf

from rltrain.learner.base import LossNorm
from rltrain.prepare import Prepared
from rltrain.types import FinishReason, GenRequest, GenResult, RolloutBatch, SamplingParams, TokenStats

REWARD_NAME = "fake"


class FakeTokenizer:
    """Token ids -> their decimal numbers separated by spaces."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)


def tokens_of(completion: str) -> list[int]:
    return [int(t) for t in completion.split()]


def parity_reward(row: dict, tokens: list[int]) -> float:
    """Row kind 0: always 1; kind 1: always 0; kind 2: 1 iff the response has an even number of tokens."""
    return {0: 1.0, 1: 0.0}.get(row["kind"], float(len(tokens) % 2 == 0))


@dataclass
class FakeGradeResult:
    rewards: torch.Tensor
    parts: dict[str, torch.Tensor]
    metrics: dict[str, float]


@dataclass
class FakeRollout:
    block: int | None = None

    def kv_block_size(self) -> int | None:
        return self.block


@dataclass
class FakeRuntime:
    max_len: int = 12  # a response wants 1..max_len tokens; above rollout.max_tokens it is truncated
    reward_of: Callable[[dict, list[int]], float] = parity_reward
    ref_shift: float = 0.0
    nonfinite_calls: tuple[int, ...] = ()
    rollout: FakeRollout = field(default_factory=FakeRollout)
    requests: list[list[GenRequest]] = field(default_factory=list)
    grade_calls: int = 0
    train_batches: list[RolloutBatch] = field(default_factory=list)
    synced: list[int] = field(default_factory=list)
    version: int = 0  # the engine's weights version, stamped on every result
    published: list[int] = field(default_factory=list)
    awake_calls: list[bool] = field(default_factory=list)  # set_rollout_awake calls, in order
    generate_delay_s: Callable[[int], float] | None = None  # seconds a generate call takes, by call number
    train_delay_s: Callable[[int], float] | None = None  # seconds a train_step takes, by call number

    def wanted_length(self, request: GenRequest, sample: int, seed: int | None) -> int:
        key = f"{request.prompt_ids}|{request.prefix_ids}|{sample}|{seed}"
        return len(request.prefix_ids) + random.Random(key).randint(1, self.max_len)

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[GenResult]]:
        version = self.version
        if self.generate_delay_s is not None:
            time.sleep(self.generate_delay_s(len(self.requests)))
        self.requests.append(list(requests))
        outputs = []
        for request in requests:
            budget = request.token_budget(params.max_tokens)
            results = []
            for sample in range(request.n):
                remaining = self.wanted_length(request, sample, params.seed) - len(request.prefix_ids)
                count = min(remaining, budget)
                tokens = tuple(3 + (len(request.prefix_ids) + i) % 5 for i in range(count))
                reason = FinishReason.STOP if remaining <= budget else FinishReason.LENGTH
                stats = TokenStats(prefill_computed=len(request.context_ids), decoded=count)
                results.append(GenResult(tokens, tuple([-1.0] * count), reason, stats, policy_version=version))
            outputs.append(results)
        return outputs

    def grade(self, completions: list[str], rows: list[dict]) -> FakeGradeResult:
        """Scores of ``reward_of``; one counted error and a slowest call of ``call number`` seconds per call."""
        self.grade_calls += 1
        scores = torch.tensor([self.reward_of(row, tokens_of(c)) for c, row in zip(completions, rows)])
        lengths = torch.tensor([float(len(tokens_of(c))) for c in completions])
        metrics = {
            f"reward/{REWARD_NAME}/mean": float(scores.mean()),
            f"reward/{REWARD_NAME}/tokens": float(lengths.mean()),
            "reward/errors/exception": 1.0,
            "perf/grading_s": 0.5,
            "perf/grading_call_max_s": float(self.grade_calls),
        }
        parts = {REWARD_NAME: scores, f"{REWARD_NAME}/tokens": lengths}
        return FakeGradeResult(rewards=scores.clone(), parts=parts, metrics=metrics)

    def logprobs(self, batch: RolloutBatch, reference: bool = False) -> torch.Tensor:
        shift = self.ref_shift if reference else 0.0
        return (batch.rollout_logprobs - shift) * batch.response_mask

    def train_step(self, batch: RolloutBatch, loss_fn) -> dict[str, float]:
        call = len(self.train_batches)
        if self.train_delay_s is not None:
            time.sleep(self.train_delay_s(call))
        self.train_batches.append(batch)
        norm = LossNorm(global_tokens=max(1, batch.num_tokens), global_seqs=batch.batch_size)
        logprobs = batch.old_logprobs if batch.old_logprobs is not None else batch.rollout_logprobs
        loss, metrics = loss_fn(logprobs, None, batch, norm)
        skipped = float(call in self.nonfinite_calls)
        return {**metrics, "loss/total": float(loss), "perf/lr": 1.0 / (call + 1), "loss/nonfinite_skipped": skipped}

    def forward_extras(self, batch: RolloutBatch, extras_fn) -> dict:
        raise NotImplementedError("the fake runtime has no model; THR needs a real learner")

    def sync_weights(self, version: int) -> dict[str, float]:
        self.synced.append(version)
        self.version = version
        return {"perf/weight_sync_s": 0.0}

    def set_rollout_awake(self, awake: bool) -> None:
        self.awake_calls.append(awake)

    def publish_weights(self, version: int) -> None:
        self.published.append(version)

    def load_latest_weights(self) -> dict[str, float]:
        if not self.published or self.published[-1] <= self.version:
            return {}
        self.version = self.published[-1]
        return {"perf/weight_sync_s": 0.0}


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The quickstart config with ``overrides``, shrunk to a handful of prompts."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from rltrain.config import register_configs

    register_configs()
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        cfg = hydra_compose(
            config_name="quickstart",
            overrides=["trainer.prompts_per_step=4", "rollout.n=4", "rollout.max_tokens=8", *overrides],
        )
    OmegaConf.set_readonly(cfg, True)
    return cfg


def prepared(num_rows: int = 12, kinds: Sequence[int] = (0, 1, 2)) -> Prepared:
    """``num_rows`` training prompts [1, 2, i] whose rows cycle through ``kinds`` (see ``parity_reward``)."""
    rows = [{"answer": str(i), "kind": kinds[i % len(kinds)]} for i in range(num_rows)]
    return Prepared(
        model_path="",
        base_model_path="",
        tokenizer=FakeTokenizer(),
        train_rows=rows,
        eval_rows=[],
        train_prompts=[[1, 2, 10 + i] for i in range(num_rows)],
        eval_prompts=[],
        primary_reward=REWARD_NAME,
        stop_token_ids=(),
    )
