"""Token-budget micro-batches: sequences packed padding-free into one row (``learner.max_tokens_per_micro_batch``).

Rows of a batch are grouped by first-fit decreasing under a token budget; each group is one packed row
``prompt_1 ⊕ response_1 ⊕ prompt_2 ⊕ response_2 ...`` with positions restarting at 0 per sequence and an
attention mask that keeps each sequence to itself (block-diagonal causal). A sequence then sees exactly the
tokens and positions it sees in the padded path, so its logprobs are the padded path's up to float summation
order, and the loss, normalised over the whole step (``LossNorm``), does not depend on how rows are grouped.

A sequence is its real prompt tokens (``prompt_mask``) and its response up to the last trained-on token
(``response_mask``): later positions are padding or untrained, contribute nothing, and a causal model's
earlier positions never see them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rltrain.learner.logprobs import token_logprobs
from rltrain.types import RolloutBatch

# Attention implementations that find packed sequences from position_ids themselves (varlen kernels): they get no
# explicit mask. Every other implementation gets the 4-D block-diagonal mask.
_VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total length at most ``budget`` (first-fit decreasing).

    Indices are placed longest first (ties: lower index first), each into the first bin with room, else
    into a new bin; a length above ``budget`` gets a bin of its own. Bins come in creation order, each listing
    its indices in placement order, so the result is a function of ``lengths`` and ``budget`` only.
    """
    if budget < 1:
        raise ValueError(f"token budget must be >= 1, got {budget}")
    bins: list[list[int]] = []
    loads: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        slot = next((b for b, load in enumerate(loads) if load + length <= budget), None)
        if slot is None:
            bins.append([index])
            loads.append(length)
        else:
            bins[slot].append(index)
            loads[slot] += length
    return bins


def sequence_lengths(batch: RolloutBatch) -> tuple[Tensor, Tensor]:
    """(prompt_lengths [B], response_lengths [B]) long: real prompt tokens, response up to its last trained token."""
    prompt_lengths = batch.prompt_mask.sum(dim=1).long()
    columns = torch.arange(1, batch.response_mask.shape[1] + 1, device=batch.response_mask.device)
    response_lengths = ((batch.response_mask > 0) * columns).amax(dim=1).long()
    return prompt_lengths, response_lengths


def token_counts(batch: RolloutBatch) -> list[int]:
    """Tokens each row occupies in a packed row [B] (prompt + response as ``sequence_lengths``)."""
    prompt_lengths, response_lengths = sequence_lengths(batch)
    return (prompt_lengths + response_lengths).tolist()


def packed_micro_batches(batch: RolloutBatch, budget: int) -> list[list[int]]:
    """Row indices of each packed micro-batch of ``batch`` under ``budget`` tokens (``first_fit_decreasing``)."""
    return first_fit_decreasing(token_counts(batch), budget)


@dataclass(frozen=True)
class PackedRow:
    """The rows of a micro-batch as one padding-free row of S tokens holding N predicted response tokens.

    input_ids [1,S], position_ids [1,S] (0.. per sequence), lengths: tokens of each sequence (sum S);
    predictors [N]: positions whose logits predict a response token; rows [N], columns [N]: where that
    token sits in the micro-batch's [b,T] response tensors.
    """

    input_ids: Tensor
    position_ids: Tensor
    lengths: tuple[int, ...]
    predictors: Tensor
    rows: Tensor
    columns: Tensor


def pack_rows(batch: RolloutBatch) -> PackedRow:
    """All rows of ``batch`` (left-padded prompts, right-padded responses) as one ``PackedRow``."""
    prompt_lengths, response_lengths = sequence_lengths(batch)
    width = batch.prompt_ids.shape[1]
    ids, positions, predictors, rows, columns, lengths = [], [], [], [], [], []
    offset = 0
    for row, (p, r) in enumerate(zip(prompt_lengths.tolist(), response_lengths.tolist(), strict=True)):
        ids += [batch.prompt_ids[row, width - p :], batch.response_ids[row, :r]]
        positions.append(torch.arange(p + r))
        # Logits at position j predict token j+1: the response's predictors start at the last prompt token.
        predictors.append(torch.arange(offset + p - 1, offset + p - 1 + r))
        rows.append(torch.full((r,), row))
        columns.append(torch.arange(r))
        lengths.append(p + r)
        offset += p + r
    device = batch.response_ids.device
    return PackedRow(
        input_ids=torch.cat(ids)[None],
        position_ids=torch.cat(positions)[None].to(device),
        lengths=tuple(lengths),
        predictors=torch.cat(predictors).to(device),
        rows=torch.cat(rows).to(device),
        columns=torch.cat(columns).to(device),
    )


def block_causal_mask(lengths: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """[1,1,S,S] bool, True where query i may attend key j: j <= i within the same sequence (S = sum(lengths))."""
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    same = sequence[:, None] == sequence[None, :]
    return torch.tril(same)[None, None]


def packed_attention_mask(
    lengths: Sequence[int], attn_implementation: str, dtype: torch.dtype, device: torch.device | str | None = None
) -> Tensor | None:
    """The ``attention_mask`` argument of a packed forward for an HF attention implementation.

    Varlen kernels (flash attention, flex) get None and find sequences from position_ids; SDPA gets the bool
    ``block_causal_mask``; eager attention adds its mask to the scores, so it gets 0 / dtype-min [1,1,S,S].
    """
    if attn_implementation in _VARLEN_ATTENTION:
        return None
    mask = block_causal_mask(lengths, device)
    if attn_implementation == "sdpa":
        return mask
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def attention_settings(model: torch.nn.Module) -> tuple[str, torch.dtype]:
    """(attention implementation, dtype) of the HF model that ``model`` runs: the model itself, or the ``module`` of
    a wrapper that runs it (a DeepSpeed engine, whose own ``config`` is DeepSpeed's)."""
    hf_model = getattr(model, "module", model)
    return hf_model.config._attn_implementation, hf_model.dtype


def scatter_rows(values: Tensor, rows: Tensor, columns: Tensor, shape: tuple[int, int]) -> Tensor:
    """Per-token ``values`` [N] at (``rows`` [N], ``columns`` [N]) -> [b,T] in the micro-batch's response layout,
    0 elsewhere."""
    return values.new_zeros(shape).index_put((rows, columns), values)


def packed_sequence_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None, int]:
    """``sequence_logprobs`` of the rows of ``batch`` in one packed forward.

    Returns (logprobs [b,T], entropy [b,T] | None, S): zero where response_mask is 0, as in the padded path,
    and S the tokens computed. Only the N predictor positions go through the LM head.
    """
    packed = pack_rows(batch)
    attention = packed_attention_mask(packed.lengths, *attention_settings(model), packed.input_ids.device)
    out = model(
        input_ids=packed.input_ids,
        attention_mask=attention,
        position_ids=packed.position_ids,
        logits_to_keep=packed.predictors,
        use_cache=False,
    )
    targets = batch.response_ids[packed.rows, packed.columns]
    logprobs, entropy = token_logprobs(out.logits, targets[None], temperature, with_entropy)
    shape = tuple(batch.response_ids.shape)
    mask = batch.response_mask
    logprobs = scatter_rows(logprobs[0], packed.rows, packed.columns, shape) * mask
    if entropy is not None:
        entropy = scatter_rows(entropy[0], packed.rows, packed.columns, shape) * mask
    return logprobs, entropy, sum(packed.lengths)
