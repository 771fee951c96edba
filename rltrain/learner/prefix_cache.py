"""Prefix-shared training of flat prompt groups through the KV cache (``learner.share_prefixes``, no trees).

The rows of a flat group share their prompt and nothing else by construction. Each distinct prompt of a
micro-batch runs once with ``use_cache=True``; its keys and values are repeated for the rows that continue it
(``index_select``, whose backward sums those rows' gradients into the shared prompt, as the unshared backward
does) and the responses run as one padded [b,T] forward on that cache. Attention costs b x T x (P + T), not a
lane's dense (P + n T)^2 mask (rltrain/learner/tree_packing.py), and no mask is built beyond the padding one.

Each row sees what it sees alone (its prompt at the same positions, then its own tokens), so logprobs, losses and
gradients equal the unshared path's up to float summation order. Micro-batches whose rows also share tree segments
(``batch.ancestors``) keep the token trie, as does a model with gradient checkpointing (which turns the cache off)
and a token budget (``learner.max_tokens_per_micro_batch`` bins groups by their trie size; rltrain/learner/
micro_batches.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rltrain.learner.logprobs import token_logprobs
from rltrain.learner.packing import sequence_lengths
from rltrain.types import RolloutBatch


def prefix_cache_applies(model: torch.nn.Module, batch: RolloutBatch) -> bool:
    """Whether the rows of ``batch`` share nothing beyond their prompts (no two start with the same tree segment,
    ``ancestors[:, 0]``; flat groups have no segments) and ``model`` (or the module a DeepSpeed engine runs) keeps
    a cache."""
    if getattr(getattr(model, "module", model), "is_gradient_checkpointing", False):
        return False
    if batch.ancestors is None or batch.ancestors.shape[1] == 0:
        return True
    first = batch.ancestors[:, 0]
    first = first[first >= 0]
    return first.unique().numel() == first.numel()


def distinct_prompts(batch: RolloutBatch, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """(prompt_ids [G,width], prompt_mask [G,width] long, row_prompt [B]): the distinct last-``width`` prompt
    columns of the rows (ids and padding both compared) and, per row, the index of its prompt."""
    ids = batch.prompt_ids[:, batch.prompt_ids.shape[1] - width :]
    mask = batch.prompt_mask[:, batch.prompt_mask.shape[1] - width :].long()
    keys, row_prompt = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)
    return keys[:, :width], keys[:, width:], row_prompt


def prefix_cached_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None, int, int]:
    """``sequence_logprobs`` of the rows of ``batch`` with each distinct prompt computed once.

    Returns (logprobs [b,T], entropy [b,T] | None, tokens computed, tokens the rows hold unshared): zero where
    response_mask is 0, as in the padded path. Prompt columns that are padding in every row and response columns
    past every row's last trained token are not computed, nor the last response position (it predicts nothing).
    """
    from rltrain.models import select_cache_rows

    prompt_lengths, response_lengths = sequence_lengths(batch)
    prompt_width, response_width = int(prompt_lengths.max()), max(1, int(response_lengths.max()))
    prompt_ids, prompt_mask, row_prompt = distinct_prompts(batch, prompt_width)
    prompt_out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    response_ids = batch.response_ids[:, :response_width]
    # Response token 0 is predicted by its prompt's last position, token t by the response's position t - 1; the
    # last position predicts nothing and is not fed, except for one-token responses: every micro-batch makes the
    # same two forward calls, which ZeRO-3 ranks need to stay in step (a rank's filler micro-batch has one token).
    inputs = response_ids[:, : max(1, response_width - 1)]
    offsets = torch.arange(inputs.shape[1], device=inputs.device)
    response_out = model(
        input_ids=inputs,
        attention_mask=torch.cat([prompt_mask[row_prompt], torch.ones_like(inputs)], dim=1),
        position_ids=prompt_lengths[:, None] + offsets,
        past_key_values=select_cache_rows(prompt_out.past_key_values, row_prompt),
        use_cache=True,
    )
    logits = torch.cat([prompt_out.logits[row_prompt], response_out.logits[:, : response_width - 1]], dim=1)
    logprobs, entropy = token_logprobs(logits, response_ids, temperature, with_entropy)
    mask = batch.response_mask
    pad = (0, mask.shape[1] - response_width)
    logprobs = torch.nn.functional.pad(logprobs, pad) * mask
    if entropy is not None:
        entropy = torch.nn.functional.pad(entropy, pad) * mask
    tokens = prompt_ids.numel() + inputs.numel()
    return logprobs, entropy, tokens, int((prompt_lengths + response_lengths).sum())
