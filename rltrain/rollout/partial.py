"""Partial rollouts: generation in chunks, with weight updates allowed between them (``rollout.partial``).

A long generation would otherwise hold back the newest weights until it ends. Here each request decodes at most
``chunk_tokens`` tokens per call; sequences that filled their chunk without stopping continue in the next call
with the tokens so far as context (``GenRequest.prefix_ids``: the engine re-reads them as prompt, with its prefix
cache where it has one), and ``between_chunks()`` runs before each continuation (the pipeline loads the newest
published weights there). Every token keeps the version of the weights that sampled it
(``GenResult.token_versions``), so a trajectory may carry several versions; its logprobs are each token's
engine logprob under its own version.

A stop string that straddles a chunk boundary is not seen by the engine (it only checks the text it decodes in
one call); stop token ids always are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from rltrain.types import FinishReason, GenRequest, GenResult, SamplingParams, TokenStats

GenerateFn = Callable[[Sequence[GenRequest], SamplingParams], list[list[GenResult]]]


def join_chunks(chunks: Sequence[GenResult]) -> GenResult:
    """One continuation from its chunks in order: tokens, logprobs and per-token versions concatenated, the last
    chunk's finish reason, the first chunk's (oldest) version, token accounting summed."""
    versions = tuple(v for chunk in chunks for v in chunk.versions())
    stats = TokenStats()
    for chunk in chunks:
        stats = stats + chunk.stats
    return GenResult(
        token_ids=tuple(t for chunk in chunks for t in chunk.token_ids),
        logprobs=tuple(lp for chunk in chunks for lp in chunk.logprobs),
        finish_reason=chunks[-1].finish_reason,
        stats=stats,
        policy_version=chunks[0].policy_version,
        token_versions=versions if len(set(versions)) > 1 else (),
    )


def generate_in_chunks(
    generate: GenerateFn,
    requests: Sequence[GenRequest],
    params: SamplingParams,
    chunk_tokens: int,
    between_chunks: Callable[[], object],
) -> list[list[GenResult]]:
    """``generate(requests, params)`` decoded ``chunk_tokens`` at a time; same result shape as ``generate``.

    Requests must not carry their own ``max_tokens`` or prefix (the flat sampler's do not): every sequence still
    running after round r has decoded exactly r * chunk_tokens tokens, so one ``max_tokens`` serves each round.
    Round r > 0 uses seed ``params.seed + r`` (a seeded call stays reproducible; rounds do not repeat a stream).
    """
    if any(r.max_tokens is not None or r.prefix_ids for r in requests):
        raise ValueError("generate_in_chunks: requests with their own max_tokens or prefix are not supported")
    chunks: dict[tuple[int, int], list[GenResult]] = {}  # (request, sample) -> its chunks so far
    running: list[tuple[int, int]] = []
    rounds, decoded = 0, 0
    while True:
        budget = min(chunk_tokens, params.max_tokens - decoded)
        seed = None if params.seed is None else params.seed + rounds
        round_params = dataclasses.replace(params, max_tokens=budget, seed=seed)
        if rounds == 0:
            for index, group in enumerate(generate(requests, round_params)):
                for sample, result in enumerate(group):
                    chunks[(index, sample)] = [result]
            running = list(chunks)
        else:
            between_chunks()
            continued = [
                GenRequest(requests[i].prompt_ids, tuple(t for c in chunks[(i, s)] for t in c.token_ids))
                for i, s in running
            ]
            for key, group in zip(running, generate(continued, round_params)):
                chunks[key].append(group[0])
        rounds, decoded = rounds + 1, decoded + budget
        running = [key for key in running if _continues(chunks[key][-1], budget)]
        if not running or decoded >= params.max_tokens:
            return [[join_chunks(chunks[(i, s)]) for s in range(request.n)] for i, request in enumerate(requests)]


def _continues(last: GenResult, budget: int) -> bool:
    """A sequence goes on when its last chunk filled its budget without stopping."""
    return last.finish_reason == FinishReason.LENGTH and len(last.token_ids) == budget
