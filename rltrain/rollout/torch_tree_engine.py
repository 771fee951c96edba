"""Torch Generator that keeps the KV cache of unfinished continuations between calls (tree KV-prefix sharing).

A tree sampler continues a path by sending ``GenRequest(prompt, prefix=path so far, n=children)``. The
plain ``TorchGenerator`` would prefill the whole context again; this one keeps, after each call, the KV
rows of every continuation that stopped on ``max_tokens`` (a segment boundary), keyed by the tokens they
cover: ``context + tokens[:-1]`` (the last sampled token was never fed). A later request whose context
is that key plus one token feeds only that token, then forks the row ``n`` ways with ``index_select``.
Anything else (a new prompt, a fallback restart, an evicted row) is prefilled from scratch. Token
accounting is exact: ``prefill_computed`` counts tokens fed through the model, ``prefill_reused`` the
context tokens served from kept rows.

Kept rows are dropped once a request used them, after ``max_age`` calls without use, when
``max_cache_mb`` is exceeded (oldest first), and on ``load_weights`` (they were computed by old weights).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from rltrain.rollout.base import with_version
from rltrain.rollout.sampling_ops import left_pad
from rltrain.rollout.torch_engine import TorchGenerator
from rltrain.types import FinishReason, GenRequest, GenResult, SamplingParams, TokenStats


@dataclass(eq=False)  # identity semantics: used as a dict key
class KeptRows:
    """KV rows kept from one decode: per layer (keys, values) [R,H,W,Dh], mask [R,W] (1 = real token),
    and the token tuple each row covers -> its row number."""

    layers: list[tuple[Tensor, Tensor]]
    mask: Tensor
    rows: dict[tuple[int, ...], int]
    age: int = 0

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


def left_pad_rows(layers: list[tuple[Tensor, Tensor]], mask: Tensor, width: int):
    """Left-pad KV tensors [R,H,W,Dh] and mask [R,W] with zeros to ``width`` columns."""
    missing = width - mask.shape[1]
    if missing <= 0:
        return layers, mask
    padded = []
    for keys, values in layers:
        pad = keys.new_zeros(keys.shape[0], keys.shape[1], missing, keys.shape[3])
        padded.append((torch.cat([pad, keys], dim=2), torch.cat([pad, values], dim=2)))
    return padded, torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)


def stack_rows(parts: list[tuple[list[tuple[Tensor, Tensor]], Tensor]]):
    """Concatenate row blocks of different widths (left-padded to the widest) -> (layers, mask)."""
    if len(parts) == 1:
        return parts[0]
    width = max(mask.shape[1] for _, mask in parts)
    parts = [left_pad_rows(layers, mask, width) for layers, mask in parts]
    layers = [
        (torch.cat([p[0][i][0] for p in parts]), torch.cat([p[0][i][1] for p in parts]))
        for i in range(len(parts[0][0]))
    ]
    return layers, torch.cat([mask for _, mask in parts])


def cache_layers(cache) -> list[tuple[Tensor, Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def select_rows(layers: list[tuple[Tensor, Tensor]], mask: Tensor, index: Tensor):
    """Rows ``index`` of KV tensors [R,H,W,Dh] and mask [R,W]; no copy when ``index`` is 0..R-1 in order
    (the common case: every kept row continues, in the order it was kept)."""
    if len(index) == mask.shape[0] and torch.equal(index.cpu(), torch.arange(len(index))):
        return layers, mask
    index = index.to(mask.device)
    return [(k.index_select(0, index), v.index_select(0, index)) for k, v in layers], mask.index_select(0, index)


class TorchTreeGenerator(TorchGenerator):
    """``TorchGenerator`` plus a cache of unfinished continuations (see the module docstring)."""

    def __init__(self, model, tokenizer, *, max_cache_mb: float = 1024.0, max_age: int = 4, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.max_cache_bytes = int(max_cache_mb * (1 << 20))
        self.max_age = max_age
        self.kept: list[KeptRows] = []  # newest first
        self._used: set[tuple[int, ...]] = set()  # keys served during the current generate call
        self._new: list[KeptRows] = []  # rows kept during the current generate call

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", seed: int = 0, device: str = "cpu", **kwargs):
        from rltrain.models import load_causal_lm, load_tokenizer

        return cls(load_causal_lm(path, dtype), load_tokenizer(path), seed=seed, device=device, **kwargs)

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        super().load_weights(named_tensors, version)
        self.clear_cache()

    def clear_cache(self) -> None:
        self.kept = []

    @property
    def cached_rows(self) -> int:
        return sum(len(k.rows) for k in self.kept)

    def generate(self, requests: Sequence[GenRequest], params: SamplingParams) -> list[list[GenResult]]:
        previous = self.kept
        self._used, self._new = set(), []
        results = super().generate(requests, params)  # chunks by max_batch_rows -> _generate_chunk
        for entry in previous:
            for key in self._used & entry.rows.keys():
                del entry.rows[key]
            entry.age += 1
        self.kept = self._new + [e for e in previous if e.rows and e.age <= self.max_age]
        self._evict_to_budget()
        return results

    def _evict_to_budget(self) -> None:
        total = 0
        for index, entry in enumerate(self.kept):  # newest first
            total += entry.nbytes
            if total > self.max_cache_bytes:
                self.kept = self.kept[:index]
                return

    def _find(self, context: tuple[int, ...]) -> tuple[KeptRows, int] | None:
        key = context[:-1]
        for entry in self.kept:
            row = entry.rows.get(key)
            if row is not None:
                return entry, row
        return None

    @torch.no_grad()
    def _generate_chunk(
        self, requests: Sequence[GenRequest], params: SamplingParams, generator: torch.Generator
    ) -> list[list[GenResult]]:
        contexts = [tuple(r.context_ids) for r in requests]
        found = [self._find(c) for c in contexts]
        cont = [i for i, f in enumerate(found) if f is not None]
        fresh = [i for i, f in enumerate(found) if f is None]
        parts, logits, next_pos = [], [], []
        if cont:
            layers, mask, last, pos = self._continue([found[i] for i in cont], [contexts[i][-1] for i in cont])
            parts.append((layers, mask))
            logits.append(last)
            next_pos.append(pos)
        if fresh:
            layers, mask, last, pos = self._prefill([contexts[i] for i in fresh])
            parts.append((layers, mask))
            logits.append(last)
            next_pos.append(pos)
        layers, mask = stack_rows(parts)
        # rows are [cont..., fresh...]: reorder to request order and fork each request n ways
        source = torch.tensor(cont + fresh)
        order = torch.empty_like(source)
        order[source] = torch.arange(len(source))
        repeats = torch.tensor([r.n for r in requests])
        index = order.repeat_interleave(repeats)
        layers, mask = select_rows(layers, mask, index)
        index = index.to(self.device)
        tokens, logprobs, reasons, cache, live, mask = self._decode(
            DynamicCache(ddp_cache_data=layers),
            torch.cat(logits)[index],
            mask,
            torch.cat(next_pos)[index],
            params,
            generator,
        )
        row_context = [c for c, r in zip(contexts, requests) for _ in range(r.n)]
        self._keep(cache, live, mask, row_context, tokens, reasons)
        self._used.update(contexts[i][:-1] for i in cont)
        outputs = self._package_stats(requests, [f is not None for f in found], contexts, tokens, logprobs, reasons)
        return with_version(outputs, self.policy_version)

    def _continue(self, sources: list[tuple[KeptRows, int]], last_tokens: list[int]):
        """Feed one token to kept rows -> (layers, mask, last logits [N,V], next positions [N])."""
        entries = list(dict.fromkeys(entry for entry, _ in sources))  # usually one: the previous call's rows
        offset, start = {}, 0
        for entry in entries:
            offset[entry], start = start, start + entry.mask.shape[0]
        layers, mask = stack_rows([(entry.layers, entry.mask) for entry in entries])
        layers, mask = select_rows(layers, mask, torch.tensor([offset[entry] + row for entry, row in sources]))
        positions = mask.sum(-1, keepdim=True)  # real tokens already cached = position of the fed token
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = self.model(
            input_ids=torch.tensor(last_tokens, device=self.device)[:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=DynamicCache(ddp_cache_data=layers),
            use_cache=True,
        )
        return cache_layers(out.past_key_values), mask, out.logits[:, -1], positions[:, 0] + 1

    def _prefill(self, contexts: list[tuple[int, ...]]):
        """Prefill whole contexts -> (layers, mask, last logits [N,V], next positions [N])."""
        ids, mask = left_pad([list(c) for c in contexts], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        return cache_layers(out.past_key_values), mask, out.logits[:, -1], positions[:, -1] + 1

    def _keep(self, cache, live: Tensor, mask: Tensor, row_context, tokens, reasons) -> None:
        """Keep the rows that stopped on max_tokens, keyed by the tokens their KV covers."""
        keep = [i for i, row in enumerate(live.tolist()) if reasons[row] == FinishReason.LENGTH]
        if not keep:
            return
        layers, mask = select_rows(cache_layers(cache), mask, torch.tensor(keep))
        rows = {}
        for position, i in enumerate(keep):
            row = int(live[i])
            rows[row_context[row] + tuple(tokens[row][:-1])] = position
        self._new.insert(0, KeptRows(layers, mask, rows))

    @staticmethod
    def _package_stats(requests, reused, contexts, tokens, logprobs, reasons) -> list[list[GenResult]]:
        results: list[list[GenResult]] = []
        row = 0
        for request, from_cache, context in zip(requests, reused, contexts):
            group = []
            for k in range(request.n):
                stats = TokenStats(decoded=len(tokens[row]))
                if k == 0:
                    computed = 1 if from_cache else len(context)
                    stats = TokenStats(computed, len(context) - computed, len(tokens[row]))
                group.append(GenResult(tuple(tokens[row]), tuple(logprobs[row]), reasons[row], stats))
                row += 1
            results.append(group)
        return results
