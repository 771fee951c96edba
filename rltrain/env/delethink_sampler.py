"""The Delethink sampler: chunked episodes (rltrain/env/delethink.py has the chunking rule and the grader).

All episodes of a batch advance together: one generate call per chunk index (``GenRequest(prompt_ids=query,
prefix_ids=carried-over ids)`` with ``max_tokens`` = that chunk's budget), then one environment call per episode,
the grade, through the episode sampler's machinery (grader processes, error budget, ``env/*`` metrics).

Training rows: every chunk is a row of the batch. Its prompt is the query; its response is the carried-over ids
(loss mask 0, logprob 0) followed by the chunk's ids (loss mask 1, the engine's logprobs), so the learner's
sequence is exactly the context the engine sampled the chunk from. Every row of an episode carries the episode's
reward; ``Episodes.episode_index`` tells the trainer which rows form one episode, and the advantage estimator
sees one sample per episode (``rltrain.algo.advantages``: GRPO's group mean and std are over the group's
episodes, not weighted by their chunk counts), each chunk getting its episode's advantage.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rltrain.env.delethink import attention_cost, check_chunking, chunk_budget
from rltrain.grading.limits import ErrorBudget
from rltrain.sampling.episodes import EPISODE_REWARD, Episode, Episodes, EpisodeSampler, episode_metrics
from rltrain.types import FinishReason, GenRequest, GenResult, SamplingParams, TokenStats


@dataclass
class Chunk:
    """One chunk: the carried-over ids it was generated after (the query precedes them) and the engine's result."""

    carry: tuple[int, ...]
    result: GenResult

    def row(self, reason: FinishReason) -> GenResult:
        """The chunk's training row: carried-over ids (logprob 0, the chunk's first version), then its own ids."""
        versions = self.result.versions()
        first = versions[0] if versions else self.result.policy_version
        return GenResult(
            self.carry + tuple(self.result.token_ids),
            (0.0,) * len(self.carry) + tuple(self.result.logprobs),
            reason,
            policy_version=self.result.policy_version,
            token_versions=(first,) * len(self.carry) + tuple(versions),
        )


@dataclass
class Chunks:
    """An episode's chunks so far; ``stopped``: the last one ended with EOS or a stop string."""

    items: list[Chunk] = field(default_factory=list)
    stopped: bool = False

    def carryover(self, carryover_tokens: int) -> tuple[int, ...]:
        """The next chunk's carried-over ids: the last ``carryover_tokens`` of the last chunk's context after the
        query (its carried-over ids and its output)."""
        if not self.items or carryover_tokens == 0:
            return ()
        last = self.items[-1]
        return (last.carry + tuple(last.result.token_ids))[-carryover_tokens:]


def context_metrics(query_tokens: int, chunks: Sequence[Chunk]) -> dict[str, float]:
    """``peak_context`` (max over chunks of query + carried-over + generated ids: KV tokens held) and
    ``attention_cost`` (sum over generated tokens of the ids each attends to) of one episode."""
    peak, cost = 0, 0
    for chunk in chunks:
        context, generated = query_tokens + len(chunk.carry), len(chunk.result.token_ids)
        peak = max(peak, context + generated)
        cost += attention_cost(context, generated)
    return {"peak_context": float(peak), "attention_cost": float(cost)}


class DelethinkSampler(EpisodeSampler):
    """``n`` chunked episodes per prompt; the episode sampler's arguments plus the chunking."""

    def __init__(self, *args: Any, chunk_tokens: int, carryover_tokens: int, max_chunks: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        check_chunking(chunk_tokens, carryover_tokens, max_chunks)
        self.chunk_tokens, self.carryover_tokens, self.max_chunks = chunk_tokens, carryover_tokens, max_chunks

    def sample(self, prompts: Sequence[Sequence[int]], params: SamplingParams, rows: Sequence[dict]) -> Episodes:
        """Chunked episodes for every (prompt, row), ``n`` each, in prompt order; one row per chunk."""
        episodes = [Episode(i, rows[i], tuple(p)) for i, p in enumerate(prompts) for _ in range(self.n)]
        chunks = [Chunks() for _ in episodes]
        stats, calls = TokenStats(), 0
        for index in range(self.max_chunks):
            active = [k for k, c in enumerate(chunks) if not c.stopped and len(c.items) == index]
            if not active:
                break
            budget = chunk_budget(index, self.chunk_tokens, self.carryover_tokens)
            carries = [chunks[k].carryover(self.carryover_tokens) for k in active]
            requests = [GenRequest(episodes[k].prompt, carry) for k, carry in zip(active, carries)]
            outputs = self.generate(requests, dataclasses.replace(params, max_tokens=budget))
            calls += 1
            for k, carry, (result,) in zip(active, carries, outputs):
                stats += result.stats
                chunks[k].items.append(Chunk(carry, result))
                chunks[k].stopped = result.finish_reason != FinishReason.LENGTH
                episodes[k].add_model_turn(result, "")
        for episode, episode_chunks in zip(episodes, chunks):
            final = episode_chunks.items[-1]
            ids = final.carry + tuple(final.result.token_ids)
            episode.actions = [(self.decode(ids), ids)]  # graded once, on the final chunk's context
            episode.metrics.update(context_metrics(len(episode.prompt), episode_chunks.items))
        counts: Counter = Counter()
        error_budget = ErrorBudget(
            [self.env_name], [len(episodes)], self.limits.max_error_frac, self.timeouts_in_row, what="environment"
        )
        self._env_turn(episodes, error_budget, counts)
        for episode, episode_chunks in zip(episodes, chunks):
            episode.truncated = not episode_chunks.stopped
        return self._collect_chunks(episodes, chunks, stats, calls, counts)

    def _collect_chunks(
        self, episodes: list[Episode], chunks: list[Chunks], stats: TokenStats, calls: int, counts: Counter
    ) -> Episodes:
        keys = sorted({key for e in episodes for key in e.metrics})
        results, masks, prompt_index, episode_index, rewards = [], [], [], [], []
        parts: dict[str, list[float]] = {EPISODE_REWARD: [], **{f"{EPISODE_REWARD}/{key}": [] for key in keys}}
        for number, (episode, episode_chunks) in enumerate(zip(episodes, chunks)):
            for position, chunk in enumerate(episode_chunks.items):
                truncated = episode.truncated and position == len(episode_chunks.items) - 1
                results.append(chunk.row(FinishReason.LENGTH if truncated else FinishReason.STOP))
                masks.append((0,) * len(chunk.carry) + (1,) * len(chunk.result.token_ids))
                prompt_index.append(episode.prompt_index)
                episode_index.append(number)
                rewards.append(episode.reward)
                parts[EPISODE_REWARD].append(episode.reward)
                for key in keys:
                    parts[f"{EPISODE_REWARD}/{key}"].append(float(episode.metrics[key]))
        return Episodes(
            prompt_index=prompt_index,
            results=results,
            stats=stats,
            generate_calls=calls,
            metrics=episode_metrics(episodes, keys, counts),
            loss_masks=masks,
            rewards=rewards,
            reward_parts=parts,
            episode_index=episode_index,
        )
