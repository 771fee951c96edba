"""The single-controller training loop, readable top to bottom.

One step:
    prompts ──► sampler ──► rollout workers ──► RolloutBatch ──► reward worker ──► rewards [B]
            ──► filters (DAPO dynamic sampling, overlong) ──► refill from the prompt stream if short
            ──► learner: old / ref logprobs ──► advantages ──► train_step(batch, loss_fn)
            ──► weight sync (versioned) ──► metrics, checkpoint, periodic eval
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from rltrain import algo
from rltrain.algo.kl import kl_token_penalty
from rltrain.algo.losses import LOGPROB_DIFF
from rltrain.components import build_loss_fn, sampling_params, tree_sampler_settings
from rltrain.config import ConfigError
from rltrain.errors import RunError
from rltrain.eval.run import correctness, evaluate_policy
from rltrain.metrics import LAST, MAX, MEAN, SUM, Metric, reduce_metrics, tagged
from rltrain.pipeline import RolloutPipeline, staleness_filter
from rltrain.prepare import Prepared
from rltrain.rollout.partial import generate_in_chunks
from rltrain.runtime import Runtime
from rltrain.sampling.episodes import EPISODE_REWARD
from rltrain.sampling.flat import FlatSampler
from rltrain.types import FinishReason, RolloutBatch, build_rollout_batch

log = logging.getLogger(__name__)

NONFINITE_SKIPPED = "loss/nonfinite_skipped"  # optimizer steps the learner skipped for a non-finite loss/gradient
# Reductions of the plain-float metrics of the grader (per generation batch) and the learner (per optimizer
# step); unlisted keys average. The grader's per-row means are measured again on the trained batch.
_GRADER_REDUCTIONS = {"reward/errors/": SUM, "perf/": SUM, "perf/grading_call_max_s": MAX}
_LEARNER_REDUCTIONS = {NONFINITE_SKIPPED: SUM, "perf/lr": LAST}


def rollout_seed(run_seed: int, stream_state: dict[str, int]) -> int:
    """Sampling seed of the generation batch drawn at ``stream_state``.

    A function of the run seed and the (checkpointed) prompt-stream position, so a resumed run samples
    exactly what the uninterrupted run would have, and a re-run request (replaced worker) repeats itself.
    """
    draw = stream_state["epoch"] * stream_state["num_rows"] + stream_state["position"]
    return random.Random(f"{run_seed}:rollout:{draw}").getrandbits(31)


def build_sampler(cfg: DictConfig, runtime: Runtime, decode, tokenizer=None):
    if cfg.rollout.sampler == "tree":
        from rltrain.sampling.tree_sampler import TreeSampler

        tree = tree_sampler_settings(cfg.rollout.tree)
        block = runtime.rollout.kv_block_size() if cfg.rollout.tree.align_to_kv_blocks else None
        if block is not None and tree["segment_len"] < block:
            log.warning(
                "rollout.tree.segment_len=%d is below the engine's %d-token KV block: tree paths share no cached "
                "blocks across segments; lower rollout.vllm_block_size (CPU: multiples of 32) or lengthen segments",
                tree["segment_len"],
                block,
            )
        return TreeSampler(runtime.generate, seed=cfg.run.seed, decode=decode, kv_block_size=block, **tree)
    if cfg.env.fn is not None:
        from rltrain.env.episodes import episode_sampler

        return episode_sampler(cfg, runtime, tokenizer)
    return FlatSampler(rollout_generate(cfg.rollout, runtime), cfg.rollout.n)


def rollout_generate(rc: DictConfig, runtime: Runtime):
    """The sampler's generate function: ``runtime.generate``, or with ``rollout.partial`` the same in chunks with
    the newest published weights loaded between them (rltrain/rollout/partial.py)."""
    if not rc.partial:
        return runtime.generate
    return functools.partial(
        generate_in_chunks,
        runtime.generate,
        chunk_tokens=rc.partial_chunk_tokens,
        between_chunks=runtime.load_latest_weights,
    )


def batch_metrics(batch: RolloutBatch) -> dict[str, float]:
    """What the trained batch looks like, measured on it: response lengths, truncation, the reward and each
    reward part (``reward/<function>/mean``, ``reward/<function>/<metric>``); computed before the overlong
    filter masks truncated responses."""
    lengths = batch.response_mask.sum(-1)
    parts = {key: value for key, value in batch.reward_parts.items() if key != "acc"}
    return {
        "rollout/response_len_mean": float(lengths.mean()),
        "rollout/response_len_max": float(lengths.max()),
        "rollout/truncated_frac": float((batch.finish_reason == FinishReason.LENGTH).float().mean()),
        "reward/mean": float(batch.rewards.mean()),
        "reward/std": float(batch.rewards.std()) if batch.batch_size > 1 else 0.0,
        "reward/accuracy": float(batch.reward_parts["acc"].mean()),
        # grader parts: a function's score is named "<function>", its extra metrics "<function>/<metric>"
        **{f"reward/{key}{'' if '/' in key else '/mean'}": float(value.mean()) for key, value in parts.items()},
    }


def minibatch_rows(group: Tensor, epochs: int, mini_batches: int, generator: torch.Generator) -> list[Tensor]:
    """Row indices of each optimizer step: ``epochs`` passes of ``mini_batches`` chunks of whole groups.

    group [B] long (rows with one id form a group) -> epochs * mini_batches index tensors. Each pass splits
    the groups into ``mini_batches`` near-equal runs of groups (never cutting one); with ``epochs > 1`` the
    group order is shuffled each pass (``generator``); a group's rows keep their order.
    """
    index = torch.unique(group, return_inverse=True)[1]
    num_groups = int(index.max()) + 1 if index.numel() else 0
    if epochs < 1:
        raise ConfigError(f"algorithm.epochs={epochs}: at least 1")
    if not 1 <= mini_batches <= num_groups:
        raise ConfigError(
            f"algorithm.mini_batches={mini_batches}: 1 to the batch's {num_groups} groups "
            "(trainer.prompts_per_step; a mini-batch holds whole groups)"
        )
    rows_of_group = [torch.nonzero(index == g).flatten() for g in range(num_groups)]
    passes = []
    for _ in range(epochs):
        order = torch.randperm(num_groups, generator=generator) if epochs > 1 else torch.arange(num_groups)
        passes += [torch.cat([rows_of_group[g] for g in chunk.tolist()]) for chunk in order.tensor_split(mini_batches)]
    return passes


class Trainer:
    def __init__(self, cfg: DictConfig, prep: Prepared, runtime: Runtime):
        from rltrain.data.stream import PromptStream

        self.cfg, self.prep, self.runtime = cfg, prep, runtime
        self.sampler = build_sampler(cfg, runtime, prep.tokenizer.decode, prep.tokenizer)
        self.loss_fn = build_loss_fn(cfg)
        self.params = sampling_params(cfg.rollout, prep.stop_token_ids)
        self.stream = PromptStream(
            [{"index": i} for i in range(len(prep.train_rows))], cfg.trainer.prompts_per_step, cfg.data.seed
        )
        self.next_group_id = 0
        self.consumed_state: dict | None = None  # the loop state after the last trained batch (pipeline only)
        self._pipeline: RolloutPipeline | None = None
        self.version = 0  # the learner's policy version: optimizer steps' batches trained (the last step)

    # ---- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The loop's resumable position, plain types only: the prompt stream and the next group id after the last
        trained batch (batches the rollout pipeline drew ahead are drawn again after a resume)."""
        return dict(self.consumed_state) if self.consumed_state is not None else self._live_state()

    def _live_state(self) -> dict:
        return {"stream": self.stream.state_dict(), "next_group_id": self.next_group_id}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict()`` (also accepts a whole checkpoint state holding those keys)."""
        self.stream.load_state_dict(state["stream"])
        self.next_group_id = int(state["next_group_id"])
        self.consumed_state = None
        self.version = int(state.get("step", self.version))

    # ---- rollout ----------------------------------------------------------------------------
    def rollout(self, step: int) -> tuple[RolloutBatch, dict[str, Metric]]:
        """One generation batch from the prompt stream: sampled, graded, overlong-shaped; its counters, times
        and sampler statistics, each tagged with its reduction over generation batches."""
        prep = self.prep
        params = dataclasses.replace(self.params, seed=rollout_seed(self.cfg.run.seed, self.stream.state_dict()))
        indices = [row["index"] for row in self.stream.next_batch()]
        start = time.time()
        prompts = [prep.train_prompts[i] for i in indices]
        episodic = self.cfg.env.fn is not None
        if episodic:  # episodes: the environment needs each prompt's row
            traj = self.sampler.sample(prompts, params, [prep.train_rows[i] for i in indices])
        else:
            traj = self.sampler.sample(prompts, params)
        rollout_s = time.time() - start
        rows = [prep.train_rows[indices[i]] for i in traj.prompt_index]
        groups = [self.next_group_id + i for i in traj.prompt_index]
        self.next_group_id += len(indices)
        batch = build_rollout_batch(
            [prep.train_prompts[indices[i]] for i in traj.prompt_index],
            traj.results,
            groups,
            prefixes=traj.prefixes or None,
            prefix_logprobs=traj.prefix_logprobs or None,
            ancestors=traj.ancestors,
        )
        if episodic:  # the environment rewarded the episodes; observation tokens leave the loss
            batch = traj.shape_batch(batch)
            graded, primary = traj.graded(), EPISODE_REWARD
        else:
            completions = [
                prep.tokenizer.decode(ids[m > 0].tolist(), skip_special_tokens=True)
                for ids, m in zip(batch.response_ids, batch.response_mask)
            ]
            graded, primary = self.runtime.grade(completions, rows), prep.primary_reward
        rewards = graded.rewards.float()
        ac = self.cfg.algorithm
        if ac.overlong_buffer > 0:
            rewards = rewards + algo.overlong_penalty(
                batch.response_mask.sum(-1), self.cfg.rollout.max_tokens, ac.overlong_buffer, ac.overlong_penalty
            )
        parts = {**graded.parts, "acc": correctness(graded.parts, graded.rewards, primary).float()}
        metrics = {
            **tagged(graded.metrics, MEAN, _GRADER_REDUCTIONS),
            **traj.metrics,
            "rollout/prefill_computed": Metric(float(traj.stats.prefill_computed), SUM),
            "rollout/prefill_reused": Metric(float(traj.stats.prefill_reused), SUM),
            "rollout/decoded": Metric(float(traj.stats.decoded), SUM),
            "perf/rollout_s": Metric(rollout_s, SUM),
        }
        return batch.replace(rewards=rewards, reward_parts=parts), metrics

    def collect(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """A full training batch; with dynamic sampling, keep pulling generation batches until it is full.

        The generation batches' metrics are combined by their reductions; what describes the trained batch
        itself (lengths, rewards) is measured on it afterwards (``batch_metrics``).
        """
        ac = self.cfg.algorithm
        if not ac.dynamic_sampling:
            batch, metrics = self.rollout(step)
            return batch, {**reduce_metrics([metrics]), "rollout/gen_batches": 1.0}
        group_filter = algo.GroupFilter(
            self.cfg.trainer.prompts_per_step, metric=ac.filter_metric, max_gen_batches=ac.max_gen_batches
        )
        records = []
        while not group_filter.is_full:
            batch, metrics = self.rollout(step)
            group_filter.add(batch)
            records.append(metrics)
        return group_filter.take(), {
            **reduce_metrics(records),
            **group_filter.metrics(),
            "rollout/gen_batches": float(group_filter.gen_batches),
        }

    # ---- one step ---------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        """Collect (or, with ``trainer.max_staleness`` >= 1, take from the rollout pipeline) a batch, train on it,
        and hand the new weights to the rollout workers as policy version ``step``."""
        start = time.time()
        if self.cfg.trainer.max_staleness == 0:
            self.runtime.set_rollout_awake(True)
            batch, metrics = self.collect(step)
            # Colocated GPU engines sleep (weights to CPU, KV cache freed) while the learner has their device.
            self.runtime.set_rollout_awake(False)
            metrics.update(self.learn(batch, step))
            self.runtime.set_rollout_awake(True)
            metrics.update(self.runtime.sync_weights(step))
        else:
            pipeline = self.pipeline(step)
            produced = pipeline.next_batch(step)
            self.consumed_state = produced.state
            metrics = {**produced.metrics, **self.learn(produced.batch, step)}
            self.runtime.publish_weights(step)
            pipeline.published(step)
        self.version = step
        metrics["perf/step_time_s"] = time.time() - start
        return metrics

    def learn(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """Old / reference logprobs, advantages and the optimizer steps on ``batch`` at learner version ``step - 1``.

        The separate old-logprob forward is skipped where it would equal the training forward (one optimizer step,
        no KL in the reward): the loss then takes the old logprobs from its own forward (the ratio is 1) and
        measures ``rollout/logprob_diff`` there. The diff is checked against the limits on on-policy batches (every
        step of the synchronous loop); a batch sampled by older weights reports ``rollout/offpolicy_logprob_diff``.
        """
        version, metrics = step - 1, {}
        if self.cfg.trainer.max_staleness:
            batch, metrics = staleness_filter(batch, version, self.cfg.trainer.max_staleness)
            if batch is None:
                log.warning("step %d: every group was sampled more than max_staleness versions ago; not trained", step)
                return metrics
        metrics.update(batch_metrics(batch))
        on_policy = self.cfg.trainer.max_staleness == 0 or bool(
            (batch.token_version[batch.response_mask > 0] == version).all()
        )
        t0 = time.time()
        old = None
        if not self.reuses_train_forward:
            old = self.runtime.logprobs(batch)
            mask = batch.response_mask
            diff = float(((old - batch.rollout_logprobs).abs() * mask).sum() / mask.sum().clamp(min=1))
            self.record_logprob_diff(metrics, diff, on_policy)
        ref = self.runtime.logprobs(batch, reference=True) if self.cfg.learner.use_reference else None
        batch, advantage_metrics = self.advantages(batch.replace(old_logprobs=old, ref_logprobs=ref))
        metrics.update(advantage_metrics)
        metrics["perf/logprobs_s"] = time.time() - t0
        t0 = time.time()
        trained = self.train(batch, step)
        metrics["perf/train_s"] = time.time() - t0
        if self.reuses_train_forward:
            self.record_logprob_diff(metrics, trained.pop(LOGPROB_DIFF), on_policy)
        metrics.update(trained)
        return metrics

    @property
    def reuses_train_forward(self) -> bool:
        """Whether the training forward gives the old logprobs: one optimizer step per batch (its weights are the
        old policy) and nothing needs them before training (KL in the reward)."""
        ac = self.cfg.algorithm
        return ac.epochs == 1 and ac.mini_batches == 1 and not (ac.kl_in_reward and ac.kl_coef > 0)

    # ---- the asynchronous pipeline ------------------------------------------------------------
    def pipeline(self, step: int) -> RolloutPipeline:
        """The rollout pipeline, started at the first asynchronous step (after a resume: at the resumed step)."""
        if self._pipeline is None:
            if getattr(self.runtime, "sleeps", False):
                raise ConfigError(
                    f"trainer.max_staleness={self.cfg.trainer.max_staleness}: the rollout engines share the "
                    "learner's GPUs and sleep while it trains; use cluster.placement=disaggregated"
                )
            self._pipeline = RolloutPipeline(
                self._produce,
                self.runtime.load_latest_weights,
                start_step=step - 1,
                last_step=self.cfg.trainer.steps,
                max_staleness=self.cfg.trainer.max_staleness,
            )
        return self._pipeline

    def _produce(self, step: int) -> tuple[RolloutBatch, dict[str, float], dict]:
        """The rollout thread's work for ``step``: its batch, metrics and the loop state right after it."""
        start = time.time()
        batch, metrics = self.collect(step)
        metrics["perf/generation_batch_s"] = time.time() - start
        return batch, metrics, self._live_state()

    def close(self) -> None:
        """Stop the rollout pipeline's thread (after the batch it is on)."""
        if self._pipeline is not None:
            self._pipeline.close()

    def advantages(self, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, float]]:
        """KL in the reward, advantages, the overlong filter, THR extras.

        The overlong filter comes after the advantages: truncated rows keep their place in the group
        statistics, only their tokens leave the loss (algo/filters.py).
        """
        ac = self.cfg.algorithm
        metrics: dict[str, float] = {}
        kl_penalty = None
        if ac.kl_in_reward and ac.kl_coef > 0:
            kl_penalty = kl_token_penalty(batch, ac.kl_coef, ac.kl_estimator)
            metrics["reward/kl_penalty"] = float(kl_penalty.sum(dim=1).mean())
        params = OmegaConf.to_container(ac.advantage_params)
        batch = batch.replace(advantages=algo.advantages_for_batch(batch, ac.advantage, params, kl_penalty))
        if ac.overlong_filter:
            batch = algo.apply_overlong_filter(batch)
        if ac.thr:
            batch = batch.replace(
                extras={**batch.extras, **self.runtime.forward_extras(batch, algo.thr_extras_from_forward)}
            )
        adv = batch.advantages[batch.response_mask > 0]
        if adv.numel():
            metrics.update(
                {"adv/mean": float(adv.mean()), "adv/std": float(adv.std()), "adv/abs_mean": float(adv.abs().mean())}
            )
        return batch, metrics

    def train(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """``epochs`` passes of ``mini_batches`` optimizer steps, each over whole groups (``minibatch_rows``)."""
        ac = self.cfg.algorithm
        seed = random.Random(f"{self.cfg.run.seed}:minibatch:{step}").getrandbits(63)
        records = []
        for rows in minibatch_rows(batch.group, ac.epochs, ac.mini_batches, torch.Generator().manual_seed(seed)):
            record = tagged(self.runtime.train_step(batch.select(rows), self.loss_fn), MEAN, _LEARNER_REDUCTIONS)
            records.append(record)
            self.check_nonfinite(step, record)
        return reduce_metrics(records)

    def check_nonfinite(self, step: int, record: dict[str, Metric]) -> None:
        """With ``trainer.on_nonfinite=stop``, an optimizer step the learner skipped stops the run."""
        skipped = record.get(NONFINITE_SKIPPED)
        if self.cfg.trainer.on_nonfinite == "stop" and skipped is not None and skipped.value > 0:
            raise RunError(
                f"step {step}: the loss or gradient was not finite, so the learner skipped the update "
                "(trainer.on_nonfinite=stop); lower learner.lr, set learner.grad_clip, or set "
                "trainer.on_nonfinite=skip to skip such updates and go on"
            )

    def record_logprob_diff(self, metrics: dict[str, float], diff: float, on_policy: bool) -> None:
        """An on-policy batch's diff is ``rollout/logprob_diff``, checked against the limits; a batch with older
        tokens logs ``rollout/offpolicy_logprob_diff`` (expected > 0, not checked)."""
        if on_policy:
            metrics[LOGPROB_DIFF] = diff
            self.check_logprob_diff(diff)
        else:
            metrics["rollout/offpolicy_logprob_diff"] = diff

    def check_logprob_diff(self, diff: float) -> None:
        rc = self.cfg.rollout
        if diff > rc.logprob_diff_error:
            raise RunError(
                f"rollout/logprob_diff={diff:.4f} > rollout.logprob_diff_error={rc.logprob_diff_error}: the rollout "
                "engine is not sampling from the learner's weights (weight sync skipped or failed, a different "
                "model/dtype, or mismatched sampling temperature)"
            )
        if diff > rc.logprob_diff_warn:
            log.warning("rollout/logprob_diff=%.4f exceeds rollout.logprob_diff_warn=%.3f", diff, rc.logprob_diff_warn)

    def evaluate(self) -> dict[str, float]:
        """The current policy on the eval sets (``trainer.eval_sets``; docs/evaluation.md), via the rollout and
        reward workers; with the rollout pipeline, its thread parks meanwhile and the workers get the learner's
        weights."""
        if self._pipeline is None:
            return self._evaluate()
        with self._pipeline.paused():
            self.runtime.sync_weights(self.version)
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        if self.cfg.env.fn is not None:
            from rltrain.env.episodes import evaluate_episodes

            return evaluate_episodes(self.cfg, self.prep, self.runtime)
        return evaluate_policy(self.cfg, self.prep, self.runtime.generate, self.runtime.grade)
