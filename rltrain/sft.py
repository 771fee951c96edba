"""Supervised warm start: the same learner with a cross-entropy loss function.

Each row's ``solution`` (the reference completion) followed by EOS is the response; the loss is the
mean negative log-likelihood over all response tokens of the optimizer step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence

from torch import Tensor

from rltrain.fsutil import fsync_tree, replace_dir
from rltrain.learner.base import LossNorm
from rltrain.types import FinishReason, GenResult, RolloutBatch, build_rollout_batch

log = logging.getLogger(__name__)


class CrossEntropyLoss:
    """LossFn: sum of token NLL / global token count (so micro-batching does not change the step)."""

    needs_entropy = False

    def __call__(
        self, logprobs: Tensor, entropy: Tensor | None, micro: RolloutBatch, norm: LossNorm
    ) -> tuple[Tensor, dict[str, float]]:
        loss = -(logprobs * micro.response_mask).sum() / norm.global_tokens
        return loss, {"loss/nll": float(loss.detach())}


def sft_batch(prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]]) -> RolloutBatch:
    """RolloutBatch whose responses are the targets (no logprobs: SFT needs none)."""
    results = [GenResult(tuple(t), (0.0,) * len(t), FinishReason.STOP) for t in target_ids]
    return build_rollout_batch(prompt_ids, results, group=range(len(results)), policy_version=0)


def encode_sft_rows(rows: Sequence[dict], tokenizer, template: str, system_prompt: str | None):
    """(prompt ids, target ids) for rows with a ``solution``: the target is the solution plus the end marker
    the template uses (EOS for plain, ``<|im_end|>`` for ChatML); rows without one are skipped."""
    from rltrain.data.prompts import render_completion, render_prompt

    prompts, targets = [], []
    for row in rows:
        if not row.get("solution"):
            continue
        prompts.append(tokenizer.encode(render_prompt(row, tokenizer, template, system_prompt)))
        completion = render_completion(row, tokenizer, template, system_prompt)
        targets.append(tokenizer.encode(completion, add_special_tokens=False))
    if not prompts:
        raise ValueError("SFT needs rows with a 'solution' field; the dataset has none")
    return prompts, targets


def sft_cache_key(base_model: str, settings: dict) -> str:
    payload = json.dumps({"base": os.path.abspath(base_model), **settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_sft(
    base_model: str,
    rows: Sequence[dict],
    out_dir: str,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    template: str = "plain",
    system_prompt: str | None = None,
    seed: int = 0,
    on_step=None,
    chunking: tuple[int, int] | None = None,
) -> str:
    """Train ``steps`` optimizer steps of SFT from ``base_model``; save an HF dir at ``out_dir`` atomically.
    ``chunking`` (chunk_tokens, carryover_tokens): targets cut into Delethink chunks (rltrain/env/delethink.py)."""
    from rltrain.data.stream import PromptStream
    from rltrain.learner.torch_learner import TorchLearner

    learner = TorchLearner(
        base_model,
        lr=lr,
        warmup_steps=warmup_steps,
        lr_schedule="cosine",
        total_steps=steps,
        micro_batch_size=batch_size,
        seed=seed,
    )
    prompts, targets = encode_sft_rows(rows, learner.tokenizer, template, system_prompt)
    if chunking is not None:
        from rltrain.env.delethink import chunk_sft_pairs

        prompts, targets = chunk_sft_pairs(prompts, targets, *chunking)
    stream = PromptStream([{"index": i} for i in range(len(prompts))], batch_size, seed)
    loss_fn = CrossEntropyLoss()
    start = time.time()
    for step in range(steps):
        index = [row["index"] for row in stream.next_batch()]
        metrics = learner.train_step(sft_batch([prompts[i] for i in index], [targets[i] for i in index]), loss_fn)
        if on_step is not None:
            on_step(step, metrics)
    log.info("SFT: %d steps in %.1fs, final nll %.4f", steps, time.time() - start, metrics["loss/nll"])
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        learner.model.save_pretrained(tmp)
        learner.tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
