"""Multi-turn episodes: model turns and environment turns alternate until the environment says done,
``env.max_turns`` model turns or ``env.max_tokens`` response tokens (docs/environments.md).

Token bookkeeping is exact: a model turn's ids and logprobs are the engine's, kept verbatim (never decoded and
re-tokenized); an observation is tokenized once, here, and appended with loss mask 0. The next turn is
generated with ``prompt_ids`` = the prompt and ``prefix_ids`` = every id so far, so the engine's context, the
learner's sequence and the trained tokens are the same ids. An episode is one trajectory: its response is the
whole interleaving, its reward the sum of its turns' rewards.

Environment calls go through ``env_calls`` (the reward actor's grader processes, rltrain/env/runner.py). A
failed call (raised, hung, crashed) ends its episode with ``reward.on_error`` and counts in
``env/errors/<kind>``; when more than ``reward.max_error_frac`` of a batch's episodes fail, or the environment
times out on every call, ``sample`` raises RewardFunctionError (a RunError) quoting the first error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rltrain.algo.advantages import EPISODE_KEY
from rltrain.grading.grader import GradeResult
from rltrain.grading.limits import ErrorBudget, consecutive_timeout_limit
from rltrain.grading.pool import SKIPPED, Outcome
from rltrain.grading.worker import ERROR_KINDS
from rltrain.metrics import MEAN, SUM, Metric
from rltrain.sampling.flat import GenerateFn, Trajectories
from rltrain.types import FinishReason, GenRequest, GenResult, RolloutBatch, SamplingParams, TokenStats

EnvCallsFn = Callable[[list[tuple[dict, list[tuple[str, tuple[int, ...]]]]]], list[Outcome]]
EPISODE_REWARD = "env"  # reward part of the episode return; "env/<metric>" parts hold the summed env metrics


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int  # model turns
    max_tokens: int  # response tokens, model and observation together
    on_error: float  # reward of an episode whose environment call failed
    max_error_frac: float  # failed episodes of a batch above which the run stops


@dataclass
class Episode:
    """One episode in progress: the response so far (model and observation ids), which ids the model sampled
    (``mask`` 1) and their logprobs (0 for observations), the actions sent to the environment."""

    prompt_index: int
    row: dict
    prompt: tuple[int, ...]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # policy version of each id (an observation: its turn's)
    actions: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    reward: float = 0.0
    metrics: Counter = field(default_factory=Counter)
    turns: int = 0
    done: bool = False
    truncated: bool = False
    error: str | None = None

    def add_model_turn(self, result: GenResult, text: str) -> None:
        self.ids += result.token_ids
        self.mask += [1] * len(result.token_ids)
        self.logprobs += result.logprobs
        self.versions += result.versions()
        self.actions.append((text, tuple(result.token_ids)))
        self.turns += 1

    def add_observation(self, ids: Sequence[int]) -> None:
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [self.versions[-1] if self.versions else -1] * len(ids)  # -1: before the first turn

    def token_versions(self) -> tuple[int, ...]:
        """Each id's policy version; observations before the first model turn get that turn's."""
        first = next((v for v in self.versions if v >= 0), 0)
        return tuple(first if v < 0 else v for v in self.versions)

    def end(self, truncated: bool = False, error: str | None = None) -> None:
        self.done, self.truncated, self.error = True, truncated, error


@dataclass
class Episodes(Trajectories):
    """Trajectories whose responses interleave model and observation tokens (``results[i].token_ids`` is the
    whole response), with the loss mask and the rewards the environment gave."""

    loss_masks: list[tuple[int, ...]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    reward_parts: dict[str, list[float]] = field(default_factory=dict)
    episode_index: list[int] = field(default_factory=list)  # row -> its episode when rows are chunks (Delethink)

    def shape_batch(self, batch: RolloutBatch) -> RolloutBatch:
        """``batch`` (built from these trajectories) with the loss mask and, when rows are chunks of episodes,
        ``extras[EPISODE_KEY]`` (the advantage estimator's sample of each row)."""
        batch = batch.replace(response_mask=self.loss_mask(batch.response_mask.shape[1]))
        if not self.episode_index:
            return batch
        return batch.replace(extras={**batch.extras, EPISODE_KEY: torch.tensor(self.episode_index, dtype=torch.long)})

    def episode_rows(self) -> list[list[int]]:
        """The rows of each episode, in episode order (one row each unless rows are chunks)."""
        if not self.episode_index:
            return [[row] for row in range(len(self.results))]
        rows: dict[int, list[int]] = {}
        for row, episode in enumerate(self.episode_index):
            rows.setdefault(episode, []).append(row)
        return list(rows.values())

    def loss_mask(self, width: int) -> Tensor:
        """[B, width] float: 1 on model-sampled tokens, 0 on observations and padding."""
        mask = torch.zeros(len(self.loss_masks), width)
        for row, values in enumerate(self.loss_masks):
            mask[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
        return mask

    def graded(self) -> GradeResult:
        """The episodes' rewards as a GradeResult (parts ``env`` and ``env/<metric>``, [B] each)."""
        parts = {key: torch.tensor(values, dtype=torch.float32) for key, values in self.reward_parts.items()}
        return GradeResult(rewards=torch.tensor(self.rewards, dtype=torch.float32), parts=parts, metrics={})


class EpisodeSampler:
    """``n`` episodes per prompt, all advanced together: one generate call and one batch of environment calls
    per turn. ``decode(ids)`` gives the action text (special tokens kept), ``encode(text)`` observation ids."""

    def __init__(
        self,
        generate: GenerateFn,
        env_calls: EnvCallsFn,
        encode: Callable[[str], list[int]],
        decode: Callable[[Sequence[int]], str],
        n: int,
        limits: EpisodeLimits,
        env_name: str,
        num_env_workers: int,
    ):
        self.generate, self.env_calls, self.encode, self.decode = generate, env_calls, encode, decode
        self.n, self.limits, self.env_name = n, limits, env_name
        self.timeouts_in_row = consecutive_timeout_limit(num_env_workers)

    def sample(self, prompts: Sequence[Sequence[int]], params: SamplingParams, rows: Sequence[dict]) -> Episodes:
        """Episodes for every (prompt, row), ``n`` each, in prompt order."""
        episodes = [Episode(i, rows[i], tuple(p)) for i, p in enumerate(prompts) for _ in range(self.n)]
        budget = ErrorBudget(
            [self.env_name], [len(episodes)], self.limits.max_error_frac, self.timeouts_in_row, what="environment"
        )
        counts: Counter = Counter()
        stats = TokenStats()
        self._env_turn(episodes, budget, counts)
        calls = 0
        while active := [e for e in episodes if not e.done]:
            outputs = self.generate([GenRequest(e.prompt, tuple(e.ids)) for e in active], params)
            calls += 1
            stepping = []
            for episode, (result,) in zip(active, outputs):
                stats += result.stats
                episode.add_model_turn(result, self.decode(result.token_ids))
                if result.finish_reason == FinishReason.LENGTH or len(episode.ids) >= self.limits.max_tokens:
                    episode.end(truncated=True)
                else:
                    stepping.append(episode)
            self._env_turn(stepping, budget, counts)
        return self._collect(episodes, stats, calls, counts)

    def _env_turn(self, episodes: list[Episode], budget: ErrorBudget, counts: Counter) -> None:
        """One environment call per episode (its reset when it has no action yet); apply what came back."""
        if not episodes:
            return
        outcomes = self.env_calls([(e.row, list(e.actions)) for e in episodes])
        for episode, outcome in zip(episodes, outcomes):
            if outcome.kind == SKIPPED:
                raise budget.error(skipped=sum(o.kind == SKIPPED for o in outcomes))
            if outcome.kind != "ok":
                counts[f"errors/{outcome.kind}"] += 1
                budget.record(0, outcome.kind, outcome.message)
                episode.reward = self.limits.on_error
                episode.end(error=outcome.kind)
                continue
            self._apply(episode, outcome.values, counts)
        if budget.tripped is not None:
            raise budget.error(skipped=0)

    def _apply(self, episode: Episode, values: dict, counts: Counter) -> None:
        counts["observations_cut"] += values["cut"]
        counts["observations_non_utf8"] += values["non_utf8"]
        episode.reward += values["reward"]
        episode.metrics.update(values["metrics"])
        if values["done"]:
            episode.end()
            return
        if episode.turns >= self.limits.max_turns:
            episode.end(truncated=True)
            return
        ids = self.encode(values["observation"]) if values["observation"] else []
        if len(episode.ids) + len(ids) >= self.limits.max_tokens:
            episode.end(truncated=True)
            return
        episode.add_observation(ids)

    def _collect(self, episodes: list[Episode], stats: TokenStats, calls: int, counts: Counter) -> Episodes:
        reasons = [FinishReason.LENGTH if e.truncated else FinishReason.STOP for e in episodes]
        results = [
            GenResult(tuple(e.ids), tuple(e.logprobs), reason, token_versions=e.token_versions())
            for e, reason in zip(episodes, reasons)
        ]
        keys = sorted({key for e in episodes for key in e.metrics})
        parts = {EPISODE_REWARD: [e.reward for e in episodes]}
        parts.update({f"{EPISODE_REWARD}/{key}": [float(e.metrics[key]) for e in episodes] for key in keys})
        return Episodes(
            prompt_index=[e.prompt_index for e in episodes],
            results=results,
            stats=stats,
            generate_calls=calls,
            metrics=episode_metrics(episodes, keys, counts),
            loss_masks=[tuple(e.mask) for e in episodes],
            rewards=[e.reward for e in episodes],
            reward_parts=parts,
        )


def episode_metrics(episodes: list[Episode], keys: list[str], counts: Counter) -> dict[str, Metric]:
    """``env/turns_mean``, ``env/episode_tokens_mean``, ``env/truncated_frac``, ``env/<metric>_mean`` per episode
    (``env/tool_calls_mean`` ...), ``env/tool_errors`` (total), ``env/errors/<kind>`` and observation counters."""
    count = max(1, len(episodes))
    metrics = {
        "env/turns_mean": Metric(sum(e.turns for e in episodes) / count, MEAN),
        "env/episode_tokens_mean": Metric(sum(len(e.ids) for e in episodes) / count, MEAN),
        "env/truncated_frac": Metric(sum(e.truncated for e in episodes) / count, MEAN),
        **{f"env/{key}_mean": Metric(sum(e.metrics[key] for e in episodes) / count, MEAN) for key in keys},
        "env/tool_errors": Metric(float(sum(e.metrics["tool_errors"] for e in episodes)), SUM),
        "env/observations_cut": Metric(float(counts["observations_cut"]), SUM),
        "env/observations_non_utf8": Metric(float(counts["observations_non_utf8"]), SUM),
    }
    metrics.update({f"env/errors/{kind}": Metric(float(counts[f"errors/{kind}"]), SUM) for kind in ERROR_KINDS})
    return metrics
