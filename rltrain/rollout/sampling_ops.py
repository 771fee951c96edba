"""Pure tensor ops for token sampling, shared by engines and tests."""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask logits outside top-k / the top-p nucleus with -inf.

    logits [N,V] (already temperature-scaled) -> [N,V]. ``top_k <= 0`` and ``top_p >= 1`` disable the
    respective filter. The most likely token always survives.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_tokens(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Sample one token per row and return (tokens [N] long, logprobs [N] float32).

    logits [N,V] raw model logits. The logprob is log-softmax(logits / temperature) of the sampled
    token before top-k/top-p filtering (raw log-softmax for greedy, temperature == 0).
    """
    logits = logits.float()
    if temperature == 0:
        tokens = torch.argmax(logits, dim=-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / temperature
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    filtered = filter_logits(scaled, top_k, top_p)
    probs = torch.softmax(filtered, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, logprobs_all.gather(-1, tokens[:, None])[:, 0]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists -> (ids [N,L] long, attention mask [N,L] long)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask
