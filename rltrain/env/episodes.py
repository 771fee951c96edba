"""The trainer's side of environments: the episode sampler of a run, and held-out evaluation by episodes.

Evaluation runs one greedy (``rollout.eval_temperature``) episode per held-out row and reports what training
logs: ``eval/accuracy`` (the environment's ``acc`` metric, else reward >= 0.5), ``eval/reward_mean``,
``eval/response_len_mean`` (model tokens), ``eval/num_prompts``, ``eval/env/turns_mean``,
``eval/env/truncated_frac``, ``eval/env/<metric>_mean`` for each metric the environment reports, and
``eval/env/tool_use_frac`` (episodes with at least one tool call).
"""

from __future__ import annotations

from typing import Any

import torch

from rltrain.env.delethink import DELETHINK
from rltrain.env.delethink import chunking as delethink_chunking
from rltrain.env.resolve import env_name
from rltrain.sampling.episodes import EPISODE_REWARD, EpisodeLimits, Episodes, EpisodeSampler

EVAL_CHUNK_PROMPTS = 64


def episode_sampler(cfg: Any, runtime: Any, tokenizer: Any, n: int | None = None) -> EpisodeSampler:
    """The EpisodeSampler of a run: ``runtime.generate`` for model turns, ``runtime.env_calls`` for environment
    turns, observations tokenized by ``tokenizer`` (no special tokens added), ``n`` (default ``rollout.n``)
    episodes per prompt. ``env.fn=delethink``: the DelethinkSampler (chunked episodes, env.params the chunking)."""
    limits = EpisodeLimits(
        max_turns=cfg.env.max_turns,
        max_tokens=cfg.env.max_tokens,
        on_error=cfg.reward.on_error,
        max_error_frac=cfg.reward.max_error_frac,
    )
    sampler, chunking = EpisodeSampler, {}
    if cfg.env.fn == DELETHINK:
        from rltrain.env.delethink_sampler import DelethinkSampler

        sampler, chunking = DelethinkSampler, delethink_chunking(cfg.env.params)
    return sampler(
        runtime.generate,
        runtime.env_calls,
        encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
        decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False),
        n=cfg.rollout.n if n is None else n,
        limits=limits,
        env_name=env_name(cfg.env.fn),
        num_env_workers=cfg.reward.num_workers,
        **chunking,
    )


def evaluate_episodes(cfg: Any, prep: Any, runtime: Any) -> dict[str, float]:
    """One episode per held-out row with the current policy; the metrics in the module docstring."""
    from rltrain.components import sampling_params

    sampler = episode_sampler(cfg, runtime, prep.tokenizer, n=1)
    params = sampling_params(cfg.rollout, prep.stop_token_ids, evaluation=True)
    chunks = []
    for start in range(0, len(prep.eval_prompts), EVAL_CHUNK_PROMPTS):
        end = start + EVAL_CHUNK_PROMPTS
        chunks.append(sampler.sample(prep.eval_prompts[start:end], params, prep.eval_rows[start:end]))
    return episode_summary(chunks, "eval/")


def episode_summary(chunks: list[Episodes], prefix: str) -> dict[str, float]:
    """Accuracy, reward, model-token length and environment metrics over every episode of ``chunks``."""
    from rltrain.eval.run import correctness

    episodes = [chunk.episode_rows() for chunk in chunks]  # rows of each episode (Delethink: one per chunk)
    firsts = [torch.tensor([rows[0] for rows in chunk_rows], dtype=torch.long) for chunk_rows in episodes]
    graded = [chunk.graded() for chunk in chunks]
    rewards = torch.cat([result.rewards[first] for result, first in zip(graded, firsts)])
    keys = set.intersection(*(set(result.parts) for result in graded))
    parts = {key: torch.cat([result.parts[key][first] for result, first in zip(graded, firsts)]) for key in keys}
    model_tokens = torch.tensor(
        [
            float(sum(sum(chunk.loss_masks[row]) for row in rows))
            for chunk, rows_of in zip(chunks, episodes)
            for rows in rows_of
        ]
    )
    turns = torch.tensor([float(m.value) for chunk in chunks for m in [chunk.metrics["env/turns_mean"]]])
    sizes = torch.tensor([float(len(rows_of)) for rows_of in episodes])
    truncated = torch.tensor([chunk.metrics["env/truncated_frac"].value for chunk in chunks])
    metrics = {
        f"{prefix}accuracy": float(correctness(parts, rewards, EPISODE_REWARD).float().mean()),
        f"{prefix}reward_mean": float(rewards.mean()),
        f"{prefix}response_len_mean": float(model_tokens.mean()),
        f"{prefix}num_prompts": float(len(rewards)),
        f"{prefix}env/turns_mean": float((turns * sizes).sum() / sizes.sum()),
        f"{prefix}env/truncated_frac": float((truncated * sizes).sum() / sizes.sum()),
    }
    for key, values in parts.items():
        if key.startswith(f"{EPISODE_REWARD}/"):
            metrics[f"{prefix}env/{key.split('/', 1)[1]}_mean"] = float(values.mean())
    if f"{EPISODE_REWARD}/tool_calls" in parts:
        metrics[f"{prefix}env/tool_use_frac"] = float((parts[f"{EPISODE_REWARD}/tool_calls"] > 0).float().mean())
    return metrics
