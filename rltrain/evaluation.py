"""Held-out evaluation: greedy pass@1 (or sampled) accuracy of the current policy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rltrain.types import GenRequest, GenResult, SamplingParams


def correctness(parts: dict[str, Tensor], rewards: Tensor, primary: str) -> Tensor:
    """[B] bool: the primary grader's ``acc`` metric when it reports one, else its score >= 0.5."""
    if f"{primary}/acc" in parts:
        return parts[f"{primary}/acc"] >= 0.5
    if primary in parts:
        return parts[primary] >= 0.5
    return rewards >= 0.5


def evaluate(
    prompt_ids: Sequence[Sequence[int]],
    rows: Sequence[dict],
    generate: Callable[[Sequence[GenRequest], SamplingParams], list[list[GenResult]]],
    grade: Callable[[list[str], list[dict]], object],
    decode: Callable[[Sequence[int]], str],
    params: SamplingParams,
    primary: str,
    samples: int = 1,
) -> dict[str, float]:
    """pass@1 over ``rows``: mean correctness of ``samples`` completions per prompt (greedy: samples=1)."""
    requests = [GenRequest(tuple(p), n=samples) for p in prompt_ids]
    outputs = generate(requests, params)
    completions, graded_rows, lengths = [], [], []
    for row, group in zip(rows, outputs):
        for result in group:
            completions.append(decode(result.token_ids))
            graded_rows.append(row)
            lengths.append(len(result.token_ids))
    graded = grade(completions, graded_rows)
    correct = correctness(graded.parts, graded.rewards, primary).float()
    return {
        "eval/accuracy": float(correct.mean()),
        "eval/reward_mean": float(graded.rewards.mean()),
        "eval/response_len_mean": float(torch.tensor(lengths, dtype=torch.float32).mean()),
        "eval/num_prompts": float(len(rows)),
    }
