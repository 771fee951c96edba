"""Torch Generator: an HF causal LM with a KV-cache sampling loop (CPU or GPU).

The reference engine: every other engine's logprobs are checked against it. Each request's context
is prefilled once and its KV cache is forked ``n`` ways (``batch_repeat_interleave``), so the ``n``
samples of a group share the prompt prefill. Finished rows are dropped from the cache so that the
decode cost follows the live rows only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from rltrain.rollout.base import with_version
from rltrain.rollout.lean_decode import lean_decoder
from rltrain.rollout.sampling_ops import left_pad, sample_next_tokens
from rltrain.types import FinishReason, GenRequest, GenResult, SamplingParams, TokenStats


class TorchGenerator:
    """Generator over a transformers model. ``max_batch_rows`` bounds the rows decoded together. ``lean_decode``:
    decode steps of Llama-family models through rltrain/rollout/lean_decode.py (same logits, less overhead)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        seed: int = 0,
        max_batch_rows: int = 256,
        device: str = "cpu",
        lean_decode: bool = True,
    ):
        self.model = model.to(device).eval()
        self.lean = lean_decoder(self.model) if lean_decode else None
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_rows = max_batch_rows
        self._rng = torch.Generator(device="cpu").manual_seed(seed)
        self._version = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", seed: int = 0, device: str = "cpu"):
        from rltrain.models import load_causal_lm, load_tokenizer

        return cls(load_causal_lm(path, dtype), load_tokenizer(path), seed=seed, device=device)

    @property
    def policy_version(self) -> int:
        return self._version

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        """Copy HF-named tensors into the model in place; unknown names raise."""
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = params.get(name, buffers.get(name))
                if target is None:
                    raise KeyError(f"load_weights: model has no parameter {name!r}")
                target.copy_(tensor.to(target.device, target.dtype))
        self._version = version

    def generate(self, requests: Sequence[GenRequest], params: SamplingParams) -> list[list[GenResult]]:
        if any(request.token_budget(params.max_tokens) != params.max_tokens for request in requests):
            raise ValueError(
                "the torch engine decodes every row of a call to params.max_tokens; a per-request max_tokens "
                "below it (tree segments aligned to KV blocks) needs the vLLM engine"
            )
        generator = self._rng if params.seed is None else torch.Generator().manual_seed(params.seed)
        results: list[list[GenResult]] = []
        chunk: list[GenRequest] = []
        rows = 0
        for request in requests:
            if chunk and rows + request.n > self.max_batch_rows:
                results.extend(self._generate_chunk(chunk, params, generator))
                chunk, rows = [], 0
            chunk.append(request)
            rows += request.n
        if chunk:
            results.extend(self._generate_chunk(chunk, params, generator))
        return results

    @torch.no_grad()
    def _generate_chunk(
        self, requests: Sequence[GenRequest], params: SamplingParams, generator: torch.Generator
    ) -> list[list[GenResult]]:
        contexts = [list(r.context_ids) for r in requests]
        ids, mask = left_pad(contexts, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        repeats = torch.tensor([r.n for r in requests], device=self.device)
        cache = out.past_key_values
        if int(repeats.max()) > 1 or int(repeats.min()) != 1:
            cache = _fork_cache(cache, repeats)
        logits = out.logits[:, -1].repeat_interleave(repeats, dim=0)
        mask = mask.repeat_interleave(repeats, dim=0)
        next_pos = positions[:, -1].repeat_interleave(repeats, dim=0) + 1
        tokens, logprobs, reasons, *_ = self._decode(cache, logits, mask, next_pos, params, generator)
        return with_version(self._package(requests, contexts, tokens, logprobs, reasons), self._version)

    def _decode(self, cache, logits, mask, next_pos, params, generator):
        """Sample until every row stops.

        Returns per-row token lists, logprob lists and finish reasons, then the final cache, the original
        row number of each of its rows and its mask (as wide as the cache), which the KV-fork tree engine
        keeps for the next segment.
        """
        total = logits.shape[0]
        tokens: list[list[int]] = [[] for _ in range(total)]
        logprobs: list[list[float]] = [[] for _ in range(total)]
        reasons = [FinishReason.LENGTH] * total
        live = torch.arange(total)  # original row of each cache row
        stop_ids = set(params.stop_token_ids)
        for step in range(params.max_tokens):
            new_tokens, new_logprobs = sample_next_tokens(
                logits, params.temperature, params.top_k, params.top_p, generator
            )
            keep = []
            # One tensor-to-list conversion per step, not one per row and value.
            for i, (row, token, logprob) in enumerate(zip(live.tolist(), new_tokens.tolist(), new_logprobs.tolist())):
                tokens[row].append(token)
                logprobs[row].append(logprob)
                if token in stop_ids or self._hits_stop_string(tokens[row], params.stop_strings):
                    reasons[row] = FinishReason.STOP
                else:
                    keep.append(i)
            if not keep or step == params.max_tokens - 1:
                break
            if len(keep) < len(live):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                live, mask, next_pos, new_tokens = live[keep], mask[index], next_pos[index], new_tokens[index]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits, next_pos = self._next_logits(new_tokens.to(self.device), mask, next_pos, cache), next_pos + 1
        return tokens, logprobs, reasons, cache, live, mask

    def _next_logits(self, tokens: Tensor, mask: Tensor, positions: Tensor, cache) -> Tensor:
        """[N,V] logits after feeding ``tokens`` [N] at ``positions`` [N]; ``cache`` (a DynamicCache) grows in place."""
        if self.lean is not None:
            return self.lean.step(tokens, mask, positions, cache)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def _hits_stop_string(self, token_ids: list[int], stop_strings: tuple[str, ...]) -> bool:
        if not stop_strings:
            return False
        # Decode only a tail long enough to contain any stop string that the last token completed.
        tail = self.tokenizer.decode(token_ids[-(max(len(s) for s in stop_strings) + 4) :])
        return any(s in tail for s in stop_strings)

    @staticmethod
    def _package(requests, contexts, tokens, logprobs, reasons) -> list[list[GenResult]]:
        results: list[list[GenResult]] = []
        row = 0
        for request, context in zip(requests, contexts):
            group = []
            for k in range(request.n):
                stats = TokenStats(prefill_computed=len(context) if k == 0 else 0, decoded=len(tokens[row]))
                group.append(GenResult(tuple(tokens[row]), tuple(logprobs[row]), reasons[row], stats))
                row += 1
            results.append(group)
        return results


def _fork_cache(cache, repeats: Tensor):
    """Repeat each row of a DynamicCache ``repeats[i]`` times (rows stay contiguous per request)."""
    from rltrain.models import select_cache_rows

    return select_cache_rows(cache, torch.arange(len(repeats), device=repeats.device).repeat_interleave(repeats))
