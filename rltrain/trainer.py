"""The single-controller training loop, readable top to bottom.

One step:
    prompts ──► sampler ──► rollout workers ──► RolloutBatch ──► reward worker ──► rewards [B]
            ──► filters (DAPO dynamic sampling, overlong) ──► refill from the prompt stream if short
            ──► learner: old / ref logprobs ──► advantages ──► train_step(batch, loss_fn)
            ──► weight sync (versioned) ──► metrics, checkpoint, periodic eval
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time

import torch
from omegaconf import DictConfig, OmegaConf

from rltrain import algo
from rltrain.components import build_loss_fn, sampling_params
from rltrain.evaluation import correctness, evaluate
from rltrain.prepare import Prepared
from rltrain.runtime import Runtime
from rltrain.sampling.flat import FlatSampler
from rltrain.types import FinishReason, RolloutBatch, build_rollout_batch

log = logging.getLogger(__name__)


def rollout_seed(run_seed: int, stream_state: dict[str, int]) -> int:
    """Sampling seed of the generation batch drawn at ``stream_state``.

    A function of the run seed and the (checkpointed) prompt-stream position, so a resumed run samples
    exactly what the uninterrupted run would have, and a re-run request (replaced worker) repeats itself.
    """
    draw = stream_state["epoch"] * stream_state["num_rows"] + stream_state["position"]
    return random.Random(f"{run_seed}:rollout:{draw}").getrandbits(31)


def build_sampler(cfg: DictConfig, runtime: Runtime, decode):
    if cfg.rollout.sampler == "tree":
        from rltrain.sampling.tree_sampler import TreeSampler

        tree = OmegaConf.to_container(cfg.rollout.tree, resolve=True)
        block = runtime.rollout.kv_block_size() if tree.pop("align_to_kv_blocks") else None
        if block is not None and tree["segment_len"] < block:
            log.warning(
                "rollout.tree.segment_len=%d is below the engine's %d-token KV block: tree paths share no cached "
                "blocks across segments; lower rollout.vllm_block_size (CPU: multiples of 32) or lengthen segments",
                tree["segment_len"],
                block,
            )
        return TreeSampler(runtime.generate, seed=cfg.run.seed, decode=decode, kv_block_size=block, **tree)
    return FlatSampler(runtime.generate, cfg.rollout.n)


class Trainer:
    def __init__(self, cfg: DictConfig, prep: Prepared, runtime: Runtime):
        from rltrain.data.stream import PromptStream

        self.cfg, self.prep, self.runtime = cfg, prep, runtime
        self.sampler = build_sampler(cfg, runtime, prep.tokenizer.decode)
        self.loss_fn = build_loss_fn(cfg)
        self.params = sampling_params(cfg.rollout, prep.stop_token_ids)
        self.stream = PromptStream(
            [{"index": i} for i in range(len(prep.train_rows))], cfg.trainer.prompts_per_step, cfg.data.seed
        )
        self.next_group_id = 0

    # ---- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The loop's resumable position, plain types only: the prompt stream and the next group id."""
        return {"stream": self.stream.state_dict(), "next_group_id": self.next_group_id}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict()`` (also accepts a whole checkpoint state holding those keys)."""
        self.stream.load_state_dict(state["stream"])
        self.next_group_id = int(state["next_group_id"])

    # ---- rollout ----------------------------------------------------------------------------
    def rollout(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """One generation batch from the prompt stream: sampled, graded, overlong-shaped."""
        prep = self.prep
        params = dataclasses.replace(self.params, seed=rollout_seed(self.cfg.run.seed, self.stream.state_dict()))
        indices = [row["index"] for row in self.stream.next_batch()]
        start = time.time()
        traj = self.sampler.sample([prep.train_prompts[i] for i in indices], params)
        rollout_s = time.time() - start
        rows = [prep.train_rows[indices[i]] for i in traj.prompt_index]
        groups = [self.next_group_id + i for i in traj.prompt_index]
        self.next_group_id += len(indices)
        batch = build_rollout_batch(
            [prep.train_prompts[indices[i]] for i in traj.prompt_index],
            traj.results,
            groups,
            policy_version=step - 1,
            prefixes=traj.prefixes or None,
            prefix_logprobs=traj.prefix_logprobs or None,
            ancestors=traj.ancestors,
        )
        completions = [
            prep.tokenizer.decode(ids[m > 0].tolist(), skip_special_tokens=True)
            for ids, m in zip(batch.response_ids, batch.response_mask)
        ]
        graded = self.runtime.grade(completions, rows)
        rewards = graded.rewards.float()
        ac = self.cfg.algorithm
        lengths = batch.response_mask.sum(-1)
        if ac.overlong_buffer > 0:
            rewards = rewards + algo.overlong_penalty(
                lengths, self.cfg.rollout.max_tokens, ac.overlong_buffer, ac.overlong_penalty
            )
        parts = {**graded.parts, "acc": correctness(graded.parts, graded.rewards, prep.primary_reward).float()}
        batch = batch.replace(rewards=rewards, reward_parts=parts)
        truncated = (batch.finish_reason == FinishReason.LENGTH).float()
        metrics = {
            **graded.metrics,
            "rollout/response_len_mean": float(lengths.mean()),
            "rollout/response_len_max": float(lengths.max()),
            "rollout/truncated_frac": float(truncated.mean()),
            "rollout/prefill_computed": float(traj.stats.prefill_computed),
            "rollout/prefill_reused": float(traj.stats.prefill_reused),
            "rollout/decoded": float(traj.stats.decoded),
            "perf/rollout_s": rollout_s,
        }
        if ac.overlong_filter:
            batch = batch.replace(response_mask=batch.response_mask * (1.0 - truncated)[:, None])
        return batch, metrics

    def collect(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """A full training batch; with dynamic sampling, keep pulling generation batches until it is full."""
        ac = self.cfg.algorithm
        if not ac.dynamic_sampling:
            batch, metrics = self.rollout(step)
            return batch, {**metrics, "rollout/gen_batches": 1.0}
        group_filter = algo.GroupFilter(
            self.cfg.trainer.prompts_per_step, metric=ac.filter_metric, max_gen_batches=ac.max_gen_batches
        )
        perf: dict[str, float] = {}
        while not group_filter.is_full:
            batch, metrics = self.rollout(step)
            group_filter.add(batch)
            # times, error counts and token accounting add up over generation batches
            summed = ("perf/", "reward/errors/", "rollout/prefill_", "rollout/decoded")
            for key in [k for k in metrics if k.startswith(summed)]:
                perf[key] = perf.get(key, 0.0) + metrics[key]
        metrics.update(perf)
        return group_filter.take(), {
            **metrics,
            **group_filter.metrics(),
            "rollout/gen_batches": float(group_filter.gen_batches),
        }

    # ---- one step ---------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        start = time.time()
        batch, metrics = self.collect(step)
        reward_mean = float(batch.rewards.mean())
        metrics.update(
            {
                "reward/mean": reward_mean,
                "reward/std": float(batch.rewards.std()),
                "reward/accuracy": float(batch.reward_parts["acc"].mean()),
            }
        )
        t0 = time.time()
        old = self.runtime.logprobs(batch)
        mask = batch.response_mask
        diff = float(((old - batch.rollout_logprobs).abs() * mask).sum() / mask.sum().clamp(min=1))
        metrics["rollout/logprob_diff"] = diff
        self.check_logprob_diff(diff)
        ref = self.runtime.logprobs(batch, reference=True) if self.cfg.learner.use_reference else None
        batch = batch.replace(old_logprobs=old, ref_logprobs=ref)
        ac = self.cfg.algorithm
        if ac.kl_in_reward and ac.kl_coef > 0:
            batch = batch.replace(rewards=batch.rewards - algo.kl_reward_penalty(batch, ac.kl_coef, ac.kl_estimator))
        advantages = algo.advantages_for_batch(batch, ac.advantage, OmegaConf.to_container(ac.advantage_params))
        batch = batch.replace(advantages=advantages)
        if ac.thr:
            batch = batch.replace(
                extras={**batch.extras, **self.runtime.forward_extras(batch, algo.thr_extras_from_forward)}
            )
        adv = advantages[mask > 0]
        metrics.update(
            {"adv/mean": float(adv.mean()), "adv/std": float(adv.std()), "adv/abs_mean": float(adv.abs().mean())}
        )
        metrics["perf/logprobs_s"] = time.time() - t0
        t0 = time.time()
        metrics.update(self.train(batch))
        metrics["perf/train_s"] = time.time() - t0
        metrics.update(self.runtime.sync_weights(step))
        metrics["perf/step_time_s"] = time.time() - start
        return metrics

    def train(self, batch: RolloutBatch) -> dict[str, float]:
        """``epochs`` passes of ``mini_batches`` optimizer steps (whole groups stay together)."""
        ac = self.cfg.algorithm
        totals: dict[str, float] = {}
        count = 0
        for _ in range(ac.epochs):
            order = torch.randperm(batch.batch_size) if ac.epochs > 1 else torch.arange(batch.batch_size)
            for chunk in torch.tensor_split(order, ac.mini_batches):
                for key, value in self.runtime.train_step(batch.select(chunk), self.loss_fn).items():
                    totals[key] = totals.get(key, 0.0) + value
                count += 1
        return {key: value / count for key, value in totals.items()}

    def check_logprob_diff(self, diff: float) -> None:
        rc = self.cfg.rollout
        if diff > rc.logprob_diff_error:
            raise RuntimeError(
                f"rollout/logprob_diff={diff:.4f} > rollout.logprob_diff_error={rc.logprob_diff_error}: the rollout "
                "engine is not sampling from the learner's weights (weight sync skipped or failed, a different "
                "model/dtype, or mismatched sampling temperature)"
            )
        if diff > rc.logprob_diff_warn:
            log.warning("rollout/logprob_diff=%.4f exceeds rollout.logprob_diff_warn=%.3f", diff, rc.logprob_diff_warn)

    def evaluate(self) -> dict[str, float]:
        prep = self.prep
        return evaluate(
            prep.eval_prompts,
            prep.eval_rows,
            self.runtime.generate,
            self.runtime.grade,
            lambda ids: prep.tokenizer.decode(list(ids), skip_special_tokens=True),
            sampling_params(self.cfg.rollout, prep.stop_token_ids, evaluation=True),
            prep.primary_reward,
        )
