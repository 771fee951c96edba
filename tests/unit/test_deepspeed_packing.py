"""Packed (``learner.max_tokens_per_micro_batch``) and prefix-shared (``learner.share_prefixes``) micro-batches on the
DeepSpeed learner: the group's plan (groups whole on one rank, token-balanced, fillers), and at ZeRO-1, 2 and 3 one
real DeepSpeed rank in this process (world size 1, gloo) whose logprobs, losses, metrics and updated weights equal
the padded path within 1e-5 for every ``algorithm.loss_agg``. Two ranks: tests/integration/test_deepspeed.py."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from rltrain import algo
from rltrain.dist.deepspeed_group import filler_row, plan_step
from rltrain.learner.base import LossNorm
from rltrain.learner.micro_batches import MicroBatching
from rltrain.learner.packing import token_counts
from rltrain.learner.tree_packing import shared_token_count
from rltrain.types import FinishReason, GenResult, build_rollout_batch

# DeepSpeed's ZeRO collectives still call torch.distributed names torch has renamed (as in the rank actors).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.[a-z_]+` is deprecated:FutureWarning")
TOLERANCE = 1e-5
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
BUDGET = 40  # tokens: more than the longest row (18), less than a third of the batch


def tree_batch(seed: int = 0):
    """Three prompt groups: a tree of 5 leaves over shared segments (one leaf a prefix of another, a masked token
    mid-response, an all-masked leaf), a flat group of 3 that shares only its prompt, and a pair; random advantages,
    old and reference logprobs."""
    gen = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randint(5, 250, (n,), generator=gen).tolist() for n in (6, 4, 9))
    s = [torch.randint(5, 250, (3,), generator=gen).tolist() for _ in range(10)]
    responses = [s[0] + s[1], s[0] + s[1] + s[2], s[0] + s[3], s[4] + s[5], s[4], s[6], s[7], s[6] + s[5]]
    responses += [s[8] + s[9] + s[1], s[9]]
    prompts = [a] * 5 + [b] * 3 + [c] * 2
    results = [GenResult(tuple(r), tuple([-1.0] * len(r)), FinishReason.STOP) for r in responses]
    batch = build_rollout_batch(prompts, results, group=[0] * 5 + [1] * 3 + [2] * 2, policy_version=0)
    mask = batch.response_mask.clone()
    for row, column in [(1, 4), (4, 0), (4, 1), (4, 2)]:
        mask[row, column] = 0
    rollout = -torch.rand(mask.shape, generator=gen) * mask
    return batch.replace(
        response_mask=mask,
        rollout_logprobs=rollout,
        old_logprobs=rollout,
        ref_logprobs=(rollout - 0.1) * mask,
        advantages=torch.randn(batch.batch_size, 1, generator=gen) * mask,
    )


# ---- the group's plan ----------------------------------------------------------------------------------------------
def test_sharing_keeps_each_group_on_one_rank_token_balanced():
    batch = tree_batch()
    plan = plan_step(batch, 2, MicroBatching(micro_batch_size=3, share_prefixes=True))
    groups = batch.group.tolist()
    owners = {
        group: {rank for rank, shard in enumerate(plan.shards) if any(groups[r] == group for r in shard)}
        for group in set(groups)
    }
    assert all(len(ranks) == 1 for ranks in owners.values())
    assert sorted(row for shard in plan.shards for row in shard) == list(range(batch.batch_size))
    # Largest group first onto the least-loaded rank: the tree (24 shared tokens), the pair (21), the flat group (13).
    sizes = [shared_token_count(batch.select(rows)) for rows in ([0, 1, 2, 3, 4], [5, 6, 7], [8, 9])]
    assert sizes == [24, 13, 21] and plan.shards == [[0, 1, 2, 3, 4], [8, 9, 5, 6, 7]]
    # Rank 0 runs its tree as one micro-batch, rank 1 two (groups of 3 and 2 rows at 3 rows each): one filler on rank 0.
    assert [len(rows) for rows in plan.micro_rows] == [1, 2] and plan.num_micro == 2
    # One group over two ranks: the other rank gets no rows and runs the filler only.
    lone = plan_step(batch.select([0, 1, 2, 3, 4]), 2, MicroBatching(micro_batch_size=3, share_prefixes=True))
    assert lone.shards == [[0, 1, 2, 3, 4], []] and lone.micro_rows == [[[0, 1, 2, 3, 4]], []] and lone.num_micro == 1


def test_packing_balances_rows_by_packed_tokens_and_plans_each_rank():
    batch = tree_batch()
    plan = plan_step(batch, 2, MicroBatching(micro_batch_size=3, max_tokens=BUDGET))
    tokens = token_counts(batch)
    loads = [sum(tokens[r] for r in shard) for shard in plan.shards]
    assert abs(loads[0] - loads[1]) <= max(tokens)
    for shard, micro_rows in zip(plan.shards, plan.micro_rows):
        assert sorted(r for rows in micro_rows for r in rows) == list(range(len(shard)))
        assert all(sum(tokens[shard[r]] for r in rows) <= BUDGET for rows in micro_rows)
    assert plan.num_micro == max(len(rows) for rows in plan.micro_rows)


def test_the_filler_is_the_shortest_row_with_one_response_token():
    batch = tree_batch()
    tokens = token_counts(batch)
    filler = filler_row(batch)
    # The shortest row is the all-masked leaf: the filler trains its first token, so even it predicts one token.
    assert tokens.index(min(tokens)) == 4 and torch.equal(filler.prompt_ids, batch.select([4]).prompt_ids)
    assert filler.response_mask.sum() == 1 and filler.response_mask[0, 0] == 1


# ---- one real DeepSpeed rank ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank():
    """This process as a 1-rank torch.distributed group (gloo), as a DeepSpeed learner actor joins it; undone after."""
    pytest.importorskip("deepspeed")
    from rltrain.dist.weight_sync import free_address
    from rltrain.learner.deepspeed_learner import init_distributed

    saved, threads = dict(os.environ), torch.get_num_threads()
    # One torch thread, as a rank actor runs: with more, the many tiny ops of ZeRO's hooks spend their time waking
    # thread pools (3.6 s instead of 18-30 s for one stage on this 2-core machine).
    torch.set_num_threads(1)
    init_distributed(0, 1, "127.0.0.1", free_address()[1], "gloo")
    yield
    torch.distributed.destroy_process_group()
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(saved)


def _learner(model_dir: str, zero_stage: int, batching: MicroBatching):
    from rltrain.learner.deepspeed_learner import DeepSpeedLearner

    return DeepSpeedLearner(
        model_dir,
        rank=0,
        world_size=1,
        zero_stage=zero_stage,
        lr=1e-3,
        grad_clip=0.0,
        micro_batch_size=batching.micro_batch_size,
        max_tokens_per_micro_batch=batching.max_tokens,
        share_prefixes=batching.share_prefixes,
        temperature=0.7,
    )


def _weights(learner) -> dict[str, torch.Tensor]:
    return dict(learner.export_weights())


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_packed_and_shared_steps_equal_the_padded_path(tiny_model_dir, one_rank, zero_stage):
    """Padded, packed under a budget and prefix-shared rank learners take one step per ``loss_agg`` (entropy bonus,
    KL) on the same batch: logprobs, losses, metrics and weights agree within 1e-5 after every step. The packed and
    shared ranks also run one filler micro-batch, which must add nothing."""
    batch = tree_batch()
    norm = LossNorm(global_tokens=batch.num_tokens, global_seqs=batch.batch_size)
    modes = {
        "padded": MicroBatching(micro_batch_size=4),
        "packed": MicroBatching(micro_batch_size=4, max_tokens=BUDGET),
        "shared": MicroBatching(micro_batch_size=4, share_prefixes=True),
    }
    learners = {name: _learner(tiny_model_dir, zero_stage, batching) for name, batching in modes.items()}
    try:
        plans = {name: plan_step(batch, 1, batching) for name, batching in modes.items()}
        extra = {"padded": 0, "packed": 1, "shared": 1}  # filler micro-batches after the real ones

        def micro_plan(name):
            plan = plans[name]
            return plan.micro_rows[0], plan.num_micro + extra[name], plan.filler

        def step(name, loss_fn):
            rows, num_micro, filler = micro_plan(name)
            return learners[name].train_step(batch, rows, loss_fn, norm, num_micro, filler)

        logprobs = {name: learners[name].logprobs(batch, False, *micro_plan(name)) for name in modes}
        initial = _weights(learners["padded"])
        for loss_agg in AGG_MODES:
            loss_fn = algo.make_loss_fn(loss_agg=loss_agg, loss_agg_constant=10.0, entropy_coef=0.01, kl_coef=0.1)
            metrics = {name: step(name, loss_fn) for name in modes}
            weights = {name: _weights(learner) for name, learner in learners.items()}
            expected = {**metrics["padded"][0], **metrics["padded"][1]}
            assert expected["loss/total"] != 0 and expected["perf/grad_norm"] > 0
            for name in ("packed", "shared"):
                got = {**metrics[name][0], **metrics[name][1]}
                for key, value in expected.items():
                    if not key.startswith("perf/learner_tokens"):
                        assert got[key] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), (name, loss_agg, key)
                for param, tensor in weights["padded"].items():
                    assert (weights[name][param] - tensor).abs().max() <= TOLERANCE, (name, loss_agg, param)
        for name in ("packed", "shared"):
            assert (logprobs[name] - logprobs["padded"]).abs().max() <= TOLERANCE, name
        assert max(float((weights["padded"][p] - t).abs().max()) for p, t in initial.items()) > 50 * TOLERANCE
        shared = metrics["shared"][0]
        assert shared["perf/learner_tokens_saved"] > 0 and "perf/learner_tokens_saved" not in metrics["packed"][0]
    finally:
        learners.clear()
        gc.collect()  # a ZeRO-3 learner makes from_pretrained partition models while it lives
