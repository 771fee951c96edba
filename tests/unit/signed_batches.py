"""A small training batch for learner tests, built from the tiny model's tokenizer."""

from __future__ import annotations

import torch

from rltrain.models import load_tokenizer
from rltrain.types import FinishReason, GenResult, RolloutBatch, build_rollout_batch


def signed_batch(model_dir: str, prompts: list[str], response_lengths: list[int]) -> RolloutBatch:
    """One row per prompt, its response ``response_lengths[i]`` tokens (5, 6, ...) with rollout logprob -1 each,
    rows paired into prompt groups (0, 0, 1, 1, ...), advantages alternating +1 / -1, rollout logprobs as the old
    logprobs."""
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = [tokenizer.encode(prompt) for prompt in prompts]
    results = [GenResult(tuple(range(5, 5 + n)), tuple([-1.0] * n), FinishReason.STOP) for n in response_lengths]
    rows = build_rollout_batch(prompt_ids, results, group=[i // 2 for i in range(len(prompts))], policy_version=0)
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(len(prompts))])[:, None]
    return rows.replace(advantages=signs * rows.response_mask, old_logprobs=rows.rollout_logprobs)
