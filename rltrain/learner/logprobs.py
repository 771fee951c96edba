"""Per-token logprobs and entropy of response tokens under a causal LM (shared by learner backends)."""

from __future__ import annotations

import torch
from torch import Tensor

from rltrain.types import RolloutBatch


def model_inputs(batch: RolloutBatch) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids [B,P+T], attention_mask [B,P+T], position_ids [B,P+T]) for prompt ⊕ response.

    Prompts are left-padded, so only the prompt mask matters; right padding of responses never
    influences earlier positions of a causal model, so response positions are all attended.
    """
    ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    attention = torch.cat([batch.prompt_mask, torch.ones_like(batch.response_mask)], dim=1).long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return ids, attention, positions


def token_logprobs(
    logits: Tensor, response_ids: Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Logprobs of ``response_ids`` [B,T] from ``logits`` [B,T,V] predicting them.

    Returns (logprobs [B,T] float32, entropy [B,T] float32 | None) of log-softmax(logits / temperature),
    matching the engines' convention (temperature 0 means unscaled).
    """
    logits = logits.float()
    if temperature and temperature != 1.0:
        logits = logits / temperature
    log_z = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, response_ids[..., None])[..., 0]
    logprobs = picked - log_z
    entropy = None
    if with_entropy:
        probs = torch.softmax(logits, dim=-1)
        entropy = log_z - (probs * logits).sum(-1)
    return logprobs, entropy


def sequence_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Forward ``model`` on the batch; (logprobs [B,T], entropy [B,T] | None), zero where response_mask is 0."""
    ids, attention, positions = model_inputs(batch)
    prompt_len = batch.prompt_ids.shape[1]
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False)
    # Logits at position j predict token j+1: the response's predictors start at the last prompt token.
    logits = out.logits[:, prompt_len - 1 : -1]
    logprobs, entropy = token_logprobs(logits, batch.response_ids, temperature, with_entropy)
    mask = batch.response_mask
    return logprobs * mask, (entropy * mask if entropy is not None else None)


def response_hidden_and_probs(
    model: torch.nn.Module, batch: RolloutBatch, token_subset: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Final hidden states and next-token probabilities at the positions predicting each response token.

    Returns (hidden [B,T,H] float32, probs [B,T,S] float32) where ``probs`` keeps only the vocabulary
    columns ``token_subset`` [S] of softmax(logits / temperature); both are zero where response_mask is 0.
    """
    ids, attention, positions = model_inputs(batch)
    prompt_len = batch.prompt_ids.shape[1]
    out = model(
        input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False, output_hidden_states=True
    )
    mask = batch.response_mask[..., None]
    hidden = out.hidden_states[-1][:, prompt_len - 1 : -1].float() * mask
    logits = out.logits[:, prompt_len - 1 : -1].float()
    if temperature and temperature != 1.0:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)[..., token_subset] * mask
    return hidden, probs
