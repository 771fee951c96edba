"""Prefix-shared packing (``learner.share_prefixes``): every distinct token prefix of a micro-batch computed once.

The rows of a prompt group share their prompt, and the rows of a TreePO tree (docs/tree.md) also share the
segments before they fork. A causal model's hidden state at a token depends only on the tokens before it and
their positions, so rows with equal leading tokens have equal hidden states there: each prompt group is packed as
one padding-free sequence holding each distinct prefix once (a token trie, found by sorting the rows), with an
attention mask that lets each token see itself and its ancestors only (the tokens of its own path) and position
ids equal to the token's depth in its path. Each row's logprob of its response token t is gathered from the
logits at the packed position of its token t-1, so every row sees exactly what it sees alone, its logprobs
are the unshared path's up to float summation order, and a shared token's gradient is the sum over the rows
that use it, as in the unshared backward.

The sharing is by tokens, so it needs no tree ids: prompts are shared across a flat group, forked segments
across a tree, and rows of different prompts share nothing. A micro-batch's groups are laid side by side in
lanes as wide as its widest group (``pack_lanes``), so attention costs lanes x width^2, not the square of the
micro-batch's tokens.
A sequence is what ``packing.sequence_lengths`` keeps: the real prompt tokens and the response up to its last
trained-on token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rltrain.learner.packing import attention_settings, first_fit_decreasing, scatter_rows, sequence_lengths
from rltrain.types import RolloutBatch

# Attention implementations that take an arbitrary [L,L] mask; varlen kernels (flash, flex via position ids)
# only know block-diagonal packing and cannot express a tree.
TREE_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class TreePackedRow:
    """The rows of a micro-batch as one prefix-shared row of L distinct tokens holding N predicted response tokens.

    input_ids [1,L], position_ids [1,L] (depth of the token in its path), ancestors [L,L] bool (query i may attend
    key j: j is i or an ancestor of i); predictors [U] sorted distinct positions whose logits predict a response
    token; predictor_index [N] (into ``predictors``), rows [N], columns [N]: for each response token, the logits
    that predict it and where it sits in the micro-batch's [b,T] response tensors. ``unshared_tokens``: the tokens
    the rows hold without sharing (sum of their sequence lengths).
    """

    input_ids: Tensor
    position_ids: Tensor
    ancestors: Tensor
    predictors: Tensor
    predictor_index: Tensor
    rows: Tensor
    columns: Tensor
    unshared_tokens: int

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


def row_sequences(batch: RolloutBatch) -> tuple[list[list[int]], list[int]]:
    """(each row's real prompt ⊕ trained response tokens, each row's prompt length) as Python lists."""
    prompt_lengths, response_lengths = sequence_lengths(batch)
    width = batch.prompt_ids.shape[1]
    prompts, responses = batch.prompt_ids.tolist(), batch.response_ids.tolist()
    sequences = [
        prompt[width - p :] + response[:r]
        for prompt, response, p, r in zip(prompts, responses, prompt_lengths.tolist(), response_lengths.tolist())
    ]
    return sequences, prompt_lengths.tolist()


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of equal leading elements of ``a`` and ``b``."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def trie_paths(sequences: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int], list[int], list[int]]:
    """Each sequence as a path of positions in a token trie: (paths, token ids and depths per position, shared).

    Sequences are visited in lexicographic order, where a sequence's longest common prefix with any other is
    its common prefix with its predecessor, so it reuses the predecessor's positions for that prefix (``shared[r]``
    of them) and gets consecutive new positions for the rest. paths[r][t]: position of token t of sequence r.
    """
    paths: list[list[int]] = [[] for _ in sequences]
    ids: list[int] = []
    depths: list[int] = []
    shared = [0] * len(sequences)
    previous: int | None = None
    for row in sorted(range(len(sequences)), key=lambda i: sequences[i]):
        sequence = sequences[row]
        if previous is not None:
            shared[row] = common_prefix_length(sequence, sequences[previous])
        start = len(ids)
        paths[row] = paths[previous][: shared[row]] if shared[row] else []
        paths[row] += range(start, start + len(sequence) - shared[row])
        ids += sequence[shared[row] :]
        depths += range(shared[row], len(sequence))
        previous = row
    return paths, ids, depths, shared


def ancestor_mask(paths: Sequence[Sequence[int]], shared: Sequence[int], device: torch.device | None = None) -> Tensor:
    """[L,L] bool: key j is query i or an ancestor of i in the trie (``trie_paths``' paths and shared counts).

    The new positions of a row are a chain: each sees the row's shared positions and the chain up to itself.
    Writes sum(new x path length) entries, one block pair per row, instead of comparing all L x L pairs.
    """
    width = 1 + max((max(path) for path in paths if path), default=-1)
    mask = torch.zeros(width, width, dtype=torch.bool, device=device)
    for path, reused in zip(paths, shared, strict=True):
        fresh = len(path) - reused
        if fresh == 0:
            continue
        start = path[reused]
        chain = slice(start, start + fresh)
        mask[chain, torch.tensor(path[:reused], dtype=torch.long, device=device)] = True
        mask[chain, chain] = torch.ones(fresh, fresh, dtype=torch.bool, device=device).tril()
    return mask


def pack_tree(batch: RolloutBatch) -> TreePackedRow:
    """All rows of ``batch`` (left-padded prompts, right-padded responses) as one ``TreePackedRow``."""
    sequences, prompt_lengths = row_sequences(batch)
    paths, ids, depths, shared = trie_paths(sequences)
    device = batch.response_ids.device
    predicted, rows, columns = [], [], []
    for row, (path, p) in enumerate(zip(paths, prompt_lengths)):
        # The logits at token j's position predict token j+1: response token c is predicted at token p+c-1.
        predicted += path[p - 1 : len(path) - 1]
        rows += [row] * (len(path) - p)
        columns += range(len(path) - p)
    predictors, predictor_index = torch.unique(torch.tensor(predicted, dtype=torch.long), return_inverse=True)
    return TreePackedRow(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device)[None],
        position_ids=torch.tensor(depths, dtype=torch.long, device=device)[None],
        ancestors=ancestor_mask(paths, shared, device),
        predictors=predictors.to(device),
        predictor_index=predictor_index.to(device),
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        columns=torch.tensor(columns, dtype=torch.long, device=device),
        unshared_tokens=sum(len(sequence) for sequence in sequences),
    )


def shared_token_count(batch: RolloutBatch) -> int:
    """Distinct-prefix tokens the rows of ``batch`` occupy when packed together (L of ``pack_tree``)."""
    return len(trie_paths(row_sequences(batch)[0])[1])


def tree_attention_mask(ancestors: Tensor, attn_implementation: str, dtype: torch.dtype) -> Tensor:
    """The ``attention_mask`` argument [R,1,L,L] of a prefix-shared forward from ``ancestors`` [R,L,L]: bool for
    SDPA, 0 / dtype-min for eager."""
    if attn_implementation not in TREE_ATTENTION:
        raise ValueError(
            f"prefix-shared packing needs attention that takes a mask ({' or '.join(TREE_ATTENTION)}), "
            f"the model uses {attn_implementation}"
        )
    mask = ancestors[:, None]
    if attn_implementation == "sdpa":
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def gathered_logprobs(
    logits: Tensor, index: Tensor, targets: Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Logprobs [N] of ``targets`` [N] under the rows ``index`` [N] of ``logits`` [U,V] (entropy [N] | None).

    Log-softmax(logits / temperature) as ``logprobs.token_logprobs`` (temperature 0: unscaled), computed once per
    distinct logits row and gathered per token.
    """
    logits = logits.float()
    if temperature and temperature != 1.0:
        logits = logits / temperature
    log_z = torch.logsumexp(logits, dim=-1)
    logprobs = logits[index, targets] - log_z[index]
    entropy = None
    if with_entropy:
        entropy = (log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1))[index]
    return logprobs, entropy


@dataclass(frozen=True)
class TreePackedLanes:
    """A micro-batch's prompt groups, each packed once (``pack_tree``), laid side by side in R lanes of width W.

    A lane holds whole groups (first-fit decreasing into the widest group's size), so attention costs
    R x W^2 instead of (R x W)^2 for one packed row of every group; a lane's unused tail is padding that attends
    only to itself. input_ids, position_ids [R,W]; ancestors [R,W,W] bool; kept [U] the sorted positions whose
    logits are computed in every lane; token_index [N] (into the [R*U] lane-major kept logits), rows [N], columns
    [N]: for each response token, the logits that predict it and where it sits in the micro-batch's [b,T]
    response tensors. ``tokens``: the distinct prefix tokens of all groups (padding not counted);
    ``unshared_tokens``: the tokens the rows hold without sharing.
    """

    input_ids: Tensor
    position_ids: Tensor
    ancestors: Tensor
    kept: Tensor
    token_index: Tensor
    rows: Tensor
    columns: Tensor
    tokens: int
    unshared_tokens: int


def pack_lanes(batch: RolloutBatch) -> TreePackedLanes:
    """The prompt groups (``batch.group``) of ``batch`` as ``TreePackedLanes``."""
    members = group_rows(batch)
    groups = [pack_tree(batch.select(rows)) for rows in members]
    sizes = [group.tokens for group in groups]
    lanes = first_fit_decreasing(sizes, max(sizes))
    width = max(sum(sizes[g] for g in lane) for lane in lanes)
    device = batch.response_ids.device
    ids = torch.zeros(len(lanes), width, dtype=torch.long, device=device)
    positions = torch.zeros_like(ids)
    # Padding sees itself only: a query with no key would make the softmax NaN, which the backward spreads.
    ancestors = torch.eye(width, dtype=torch.bool, device=device).repeat(len(lanes), 1, 1)
    lane_of, predictor, rows, columns = [], [], [], []
    for lane, members_of_lane in enumerate(lanes):
        offset = 0
        for g in members_of_lane:
            group, span = groups[g], slice(offset, offset + sizes[g])
            ids[lane, span] = group.input_ids[0]
            positions[lane, span] = group.position_ids[0]
            ancestors[lane, span, span] = group.ancestors
            predictor.append(group.predictors[group.predictor_index] + offset)
            lane_of.append(torch.full_like(group.rows, lane))
            rows.append(torch.tensor(members[g], dtype=torch.long, device=device)[group.rows])
            columns.append(group.columns)
            offset += sizes[g]
    kept, kept_index = torch.unique(torch.cat(predictor), return_inverse=True)
    return TreePackedLanes(
        input_ids=ids,
        position_ids=positions,
        ancestors=ancestors,
        kept=kept,
        token_index=torch.cat(lane_of) * len(kept) + kept_index,
        rows=torch.cat(rows),
        columns=torch.cat(columns),
        tokens=sum(sizes),
        unshared_tokens=sum(group.unshared_tokens for group in groups),
    )


def shared_sequence_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None, TreePackedLanes]:
    """``sequence_logprobs`` of the rows of ``batch`` in one prefix-shared forward of its groups' lanes.

    Returns (logprobs [b,T], entropy [b,T] | None, the lanes): zero where response_mask is 0, as in the padded
    path. Only the positions that predict a response token in some lane go through the LM head.
    """
    lanes = pack_lanes(batch)
    attention = tree_attention_mask(lanes.ancestors, *attention_settings(model))
    out = model(
        input_ids=lanes.input_ids,
        attention_mask=attention,
        position_ids=lanes.position_ids,
        logits_to_keep=lanes.kept,
        use_cache=False,
    )
    targets = batch.response_ids[lanes.rows, lanes.columns]
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    logprobs, entropy = gathered_logprobs(logits, lanes.token_index, targets, temperature, with_entropy)
    mask = batch.response_mask
    logprobs = scatter_rows(logprobs, lanes.rows, lanes.columns, mask.shape) * mask
    if entropy is not None:
        entropy = scatter_rows(entropy, lanes.rows, lanes.columns, mask.shape) * mask
    return logprobs, entropy, lanes


def group_rows(batch: RolloutBatch) -> list[list[int]]:
    """Row indices of each prompt group (``batch.group``), groups in order of their first row."""
    groups: dict[int, list[int]] = {}
    for row, group in enumerate(batch.group.tolist()):
        groups.setdefault(group, []).append(row)
    return list(groups.values())


def group_micro_batches(batch: RolloutBatch, max_rows: int, max_tokens: int | None) -> list[list[int]]:
    """Row indices of each prefix-shared micro-batch: whole prompt groups (``batch.group``), first-fit decreasing.

    A group is never split, so its shared prompt and tree are computed once. Bins hold at most ``max_tokens``
    shared tokens when given, else at most ``max_rows`` rows; a group above the bound gets a bin of its own.
    """
    members = group_rows(batch)
    if max_tokens is None:
        sizes, budget = [len(rows) for rows in members], max_rows
    else:
        sizes, budget = [shared_token_count(batch.select(rows)) for rows in members], max_tokens
    return [[row for g in bin_ for row in members[g]] for bin_ in first_fit_decreasing(sizes, budget)]
