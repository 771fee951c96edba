"""The one schema that flows through a training step.

Shape letters: B trajectories, P prompt tokens, T response tokens, D tree depth.

``RolloutBatch`` is a frozen dataclass of named tensors. Each stage adds fields with
``batch.replace(...)``; nothing mutates a batch in place. Prompts are left-padded (so that the
prompt and the response meet in the same column for every row) and responses are right-padded.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


class FinishReason(enum.IntEnum):
    """Why a trajectory stopped; stored as integers in ``RolloutBatch.finish_reason``."""

    STOP = 0  # EOS token or a stop string
    LENGTH = 1  # hit max_tokens (truncated)
    ABORT = 2  # engine aborted the request
    REPETITION = 3  # tree sampler: repeated text
    MAX_DEPTH = 4  # tree sampler: reached the depth limit

    @classmethod
    def parse(cls, name: str) -> FinishReason:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown finish reason {name!r}; known: {[m.name.lower() for m in cls]}") from None


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, mapped 1:1 onto every engine.

    ``temperature == 0`` means greedy. ``top_k`` -1 or 0 disables top-k (vLLM refuses below -1); ``top_p == 1``
    disables top-p. Stop strings must not be empty (an empty one would end every response at once).
    Logprobs returned by engines are log-softmax(logits / temperature) of the sampled token, before
    top-k/top-p truncation (for greedy: of the raw logits).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if "" in self.stop_strings:
            raise ValueError(f"stop_strings must not contain an empty string, got {list(self.stop_strings)}")


@dataclass(frozen=True)
class GenRequest:
    """Prompt token ids (+ an optional already-generated prefix) for which to sample ``n`` continuations.

    ``prefix_ids`` are response tokens generated earlier (a parent tree segment); engines treat
    ``prompt_ids + prefix_ids`` as the context but return only the new tokens. Requests that share a
    context prefix let the engine reuse its KV cache (``TokenStats.prefill_reused``). ``max_tokens``
    lowers the call's ``SamplingParams.max_tokens`` for this request only (the tree sampler's block-aligned
    segments); engines that cannot honour it (torch) raise instead of ignoring it.
    """

    prompt_ids: tuple[int, ...]
    prefix_ids: tuple[int, ...] = ()
    n: int = 1
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("GenRequest.prompt_ids is empty")
        if self.n < 1:
            raise ValueError(f"GenRequest.n must be >= 1, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"GenRequest.max_tokens must be >= 1 (or None), got {self.max_tokens}")

    def token_budget(self, call_max_tokens: int) -> int:
        """Tokens this request may decode in a call whose ``SamplingParams.max_tokens`` is ``call_max_tokens``."""
        return call_max_tokens if self.max_tokens is None else min(self.max_tokens, call_max_tokens)

    @property
    def context_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.prefix_ids


@dataclass
class TokenStats:
    """Token accounting of one generate call (or a sum of calls)."""

    prefill_computed: int = 0
    prefill_reused: int = 0
    decoded: int = 0

    def __add__(self, other: TokenStats) -> TokenStats:
        return TokenStats(
            self.prefill_computed + other.prefill_computed,
            self.prefill_reused + other.prefill_reused,
            self.decoded + other.decoded,
        )

    @property
    def computed(self) -> int:
        return self.prefill_computed + self.decoded


@dataclass(frozen=True)
class GenResult:
    """One sampled continuation: new token ids, their logprobs, why it stopped, token accounting, and the
    policy version(s) of the weights that sampled it.

    ``stats`` of the ``n`` results of one request are attributed to the first result only (the others
    carry zeros) so that summing over results never double counts a shared prefill. ``policy_version`` is the
    engine's weights version when it sampled the first token; ``token_versions`` (one per token) is set only when
    the weights changed during the continuation (partial rollouts, rltrain/rollout/partial.py), else empty.
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: FinishReason
    stats: TokenStats = field(default_factory=TokenStats)
    policy_version: int = 0
    token_versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"GenResult has {len(self.token_ids)} tokens but {len(self.logprobs)} logprobs")
        if self.token_versions and len(self.token_versions) != len(self.token_ids):
            raise ValueError(f"GenResult has {len(self.token_ids)} tokens but {len(self.token_versions)} versions")

    def versions(self) -> tuple[int, ...]:
        """The policy version of each token."""
        return self.token_versions or (self.policy_version,) * len(self.token_ids)


# Field roles drive generic pad / concat / select: "prompt" fields are [B,P] left-padded, "token"
# fields are [B,T] right-padded, "seq" fields are [B], "tree" is [B,D] padded with -1.
_FIELD_ROLES: dict[str, str] = {
    "prompt_ids": "prompt",
    "prompt_mask": "prompt",
    "response_ids": "token",
    "response_mask": "token",
    "rollout_logprobs": "token",
    "old_logprobs": "token",
    "token_version": "token",
    "ref_logprobs": "token",
    "advantages": "token",
    "group": "seq",
    "finish_reason": "seq",
    "policy_version": "seq",
    "rewards": "seq",
    "ancestors": "tree",
}
_PAD_VALUE = {"prompt": 0, "token": 0, "seq": 0, "tree": -1}


@dataclass(frozen=True)
class RolloutBatch:
    """Trajectories of one step. See the module docstring for shape letters and padding.

    rollout:      prompt_ids [B,P] long, prompt_mask [B,P] float (1 = real token),
                  response_ids [B,T] long, response_mask [B,T] float (1 = trained-on token),
                  rollout_logprobs [B,T] float, group [B] long (prompt id), ancestors [B,D] long | None
                  (segment id at each depth, -1 past the leaf), finish_reason [B] long (FinishReason),
                  policy_version [B] long (the oldest weights version among the row's tokens),
                  token_version [B,T] long | None (the weights version that sampled each token; 0 past the end)
    reward:       rewards [B] float, reward_parts {name: [B] float}
    learner prep: old_logprobs [B,T], ref_logprobs [B,T] | None
    advantage:    advantages [B,T]
    extras:       namespaced new fields ("<stage>/<name>") before promotion into the schema
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    rollout_logprobs: Tensor
    group: Tensor
    finish_reason: Tensor
    policy_version: Tensor
    ancestors: Tensor | None = None
    token_version: Tensor | None = None
    rewards: Tensor | None = None
    reward_parts: dict[str, Tensor] = field(default_factory=dict)
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    advantages: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- shape checks -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Trained-on response tokens (sum of response_mask)."""
        return int(self.response_mask.sum().item())

    def validate(self) -> None:
        """Raise ValueError naming the first field whose shape or dtype is wrong."""
        b, t = self.response_ids.shape if self.response_ids.dim() == 2 else (-1, -1)
        if b < 0:
            raise ValueError(f"response_ids must be [B,T], got shape {tuple(self.response_ids.shape)}")
        p = self.prompt_ids.shape[1] if self.prompt_ids.dim() == 2 else -1
        expected = {"prompt": (b, p), "token": (b, t), "seq": (b,)}
        for name, role in _FIELD_ROLES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if role == "tree":
                if value.dim() != 2 or value.shape[0] != b:
                    raise ValueError(f"{name} must be [B={b},D], got {tuple(value.shape)}")
            elif tuple(value.shape) != expected[role]:
                raise ValueError(f"{name} must have shape {expected[role]}, got {tuple(value.shape)}")
        for name in (
            "prompt_ids",
            "response_ids",
            "group",
            "finish_reason",
            "policy_version",
            "ancestors",
            "token_version",
        ):
            value = getattr(self, name)
            if value is not None and value.dtype != torch.long:
                raise ValueError(f"{name} must be torch.long, got {value.dtype}")
        for name, value in {**self.reward_parts, **self.extras}.items():
            if value.shape[0] != b:
                raise ValueError(f"reward_parts/extras[{name!r}] has leading dim {value.shape[0]}, expected {b}")

    def replace(self, **changes: object) -> RolloutBatch:
        """A new batch with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    # ---- generic row operations ---------------------------------------------------------------
    def select(self, index: Tensor | Sequence[int]) -> RolloutBatch:
        """Rows ``index`` (a LongTensor or list of row numbers), all fields included."""
        idx = torch.as_tensor(index, dtype=torch.long)
        changes: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value[idx]
            elif isinstance(value, dict):
                changes[f.name] = {k: v[idx] for k, v in value.items()}
        return dataclasses.replace(self, **changes)

    def micro_batches(self, size: int) -> list[RolloutBatch]:
        """Consecutive row chunks of at most ``size`` rows."""
        if size < 1:
            raise ValueError(f"micro batch size must be >= 1, got {size}")
        return [self.select(range(i, min(i + size, self.batch_size))) for i in range(0, self.batch_size, size)]

    @staticmethod
    def concat(batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Stack batches row-wise, padding prompt (left), token (right) and tree (-1) fields."""
        if not batches:
            raise ValueError("concat of no batches")
        first = batches[0]
        merged: dict[str, object] = {}
        for f in dataclasses.fields(first):
            values = [getattr(b, f.name) for b in batches]
            if f.name in _FIELD_ROLES:
                if any(v is None for v in values):
                    if not all(v is None for v in values):
                        raise ValueError(f"concat: field {f.name!r} is set in some batches but not all")
                    merged[f.name] = None
                    continue
                merged[f.name] = _pad_cat(values, _FIELD_ROLES[f.name])
            else:
                keys = set(values[0])
                if any(set(v) != keys for v in values):
                    raise ValueError(f"concat: {f.name} keys differ between batches")
                merged[f.name] = {k: torch.cat([v[k] for v in values]) for k in keys}
        return RolloutBatch(**merged)  # type: ignore[arg-type]

    def to(self, device: torch.device | str) -> RolloutBatch:
        changes: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value.to(device)
            elif isinstance(value, dict):
                changes[f.name] = {k: v.to(device) for k, v in value.items()}
        return dataclasses.replace(self, **changes)


def _pad_cat(values: list[Tensor], role: str) -> Tensor:
    if role == "seq":
        return torch.cat(values)
    width = max(v.shape[1] for v in values)
    padded = []
    for v in values:
        missing = width - v.shape[1]
        if missing:
            pad = torch.full((v.shape[0], missing), _PAD_VALUE[role], dtype=v.dtype)
            v = torch.cat([pad, v], dim=1) if role == "prompt" else torch.cat([v, pad], dim=1)
        padded.append(v)
    return torch.cat(padded)


def build_rollout_batch(
    prompts: Sequence[Sequence[int]],
    results: Sequence[GenResult],
    group: Sequence[int],
    policy_version: int | None = None,
    prefixes: Sequence[Sequence[int]] | None = None,
    prefix_logprobs: Sequence[Sequence[float]] | None = None,
    ancestors: Tensor | None = None,
) -> RolloutBatch:
    """Pad per-trajectory python lists into a RolloutBatch.

    ``prompts[i]`` is the prompt of trajectory i; its response is ``prefixes[i] + results[i].token_ids``
    (a tree path's earlier segments form the prefix, sampled under the same weights as the leaf: the pipeline
    loads new weights only between sampler calls). Token versions come from the results (``GenResult.versions``)
    unless ``policy_version`` gives one for every token (hand-made batches: SFT, checks); a row's
    ``policy_version`` is its oldest token's.
    """
    n = len(results)
    if not (len(prompts) == len(group) == n):
        raise ValueError(f"build_rollout_batch: {len(prompts)} prompts, {len(group)} groups, {n} results")
    prefixes = prefixes or [()] * n
    prefix_logprobs = prefix_logprobs or [()] * n
    responses = [list(prefixes[i]) + list(results[i].token_ids) for i in range(n)]
    logprobs = [list(prefix_logprobs[i]) + list(results[i].logprobs) for i in range(n)]
    p_len = max(len(p) for p in prompts)
    t_len = max(1, max(len(r) for r in responses))
    prompt_ids = torch.zeros(n, p_len, dtype=torch.long)
    prompt_mask = torch.zeros(n, p_len)
    response_ids = torch.zeros(n, t_len, dtype=torch.long)
    response_mask = torch.zeros(n, t_len)
    rollout_logprobs = torch.zeros(n, t_len)
    for i in range(n):
        p = prompts[i]
        prompt_ids[i, p_len - len(p) :] = torch.tensor(p, dtype=torch.long)
        prompt_mask[i, p_len - len(p) :] = 1
        r = responses[i]
        if r:
            response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            response_mask[i, : len(r)] = 1
            rollout_logprobs[i, : len(r)] = torch.tensor(logprobs[i], dtype=torch.float32)
    token_versions = [
        [policy_version] * len(responses[i])
        if policy_version is not None
        else [results[i].policy_version] * len(prefixes[i]) + list(results[i].versions())
        for i in range(n)
    ]
    token_version = torch.zeros(n, t_len, dtype=torch.long)
    for i, row in enumerate(token_versions):
        if row:
            token_version[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    fallback = [results[i].policy_version if policy_version is None else policy_version for i in range(n)]
    versions = [min(row) if row else fallback[i] for i, row in enumerate(token_versions)]
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        rollout_logprobs=rollout_logprobs,
        group=torch.tensor(list(group), dtype=torch.long),
        finish_reason=torch.tensor([int(r.finish_reason) for r in results], dtype=torch.long),
        policy_version=torch.tensor(versions, dtype=torch.long),
        ancestors=ancestors,
        token_version=token_version,
    )
