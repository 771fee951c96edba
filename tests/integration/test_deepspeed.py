"""DeepSpeed learner group (real DeepSpeed ZeRO 1/2/3 on gloo, Ray actors) against the single-process torch learner."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")
ray = pytest.importorskip("ray")

from omegaconf import OmegaConf  # noqa: E402

from rltrain.bench.export import RssPeak, build_export_model, rank_pids  # noqa: E402
from rltrain.config import LearnerConfig  # noqa: E402
from rltrain.dist.deepspeed_group import (  # noqa: E402
    DeepSpeedLearnerGroup,
    micro_batch_count,
    plan_step,
    shard_rows_by_tokens,
)
from rltrain.learner.deepspeed_learner import (  # noqa: E402
    bucket_by_bytes,
    check_checkpoint,
    deepspeed_config,
    padding_bounds,
)
from rltrain.learner.torch_learner import TorchLearner  # noqa: E402
from rltrain.sft import CrossEntropyLoss, sft_batch  # noqa: E402
from rltrain.types import FinishReason, GenResult, RolloutBatch, build_rollout_batch  # noqa: E402

pytestmark = pytest.mark.integration

PARAM_TOL = 1e-5  # fp32, one optimizer step (the acceptance bound)
RESUME_TOL = 1e-6
# micro_batch_size 3 with 7 rows: the torch learner runs 3+3+1 rows; at world size 2 one rank runs 2 micro-batches
# and the other 1 real + 1 filler, so the filler path is exercised.
OPTIONS = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "lr_schedule": "constant",
    "total_steps": 4,
    "grad_clip": 1.0,
    "micro_batch_size": 3,
    "temperature": 1.0,
    "use_reference": False,
    "dtype": "float32",
    "gradient_checkpointing": False,
    "seed": 0,
}


def learner_cfg(world_size: int, zero_stage: int, export_bucket_mb: int = 64):
    return OmegaConf.structured(
        LearnerConfig(
            backend="deepspeed", world_size=world_size, zero_stage=zero_stage, export_bucket_mb=export_bucket_mb
        )
    )


def uneven_batch(seed: int, rows: int = 7, vocab: int = 512) -> RolloutBatch:
    """Prompts of 2-12 and responses of 1-16 tokens, one response with an untrained token in the middle."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [
        (int(p), int(r))
        for p, r in zip(torch.randint(2, 13, (rows,), generator=gen), torch.randint(1, 17, (rows,), generator=gen))
    ]
    prompts = [torch.randint(3, vocab, (p,), generator=gen).tolist() for p, _ in lengths]
    targets = [torch.randint(3, vocab, (r,), generator=gen).tolist() for _, r in lengths]
    batch = sft_batch(prompts, targets)
    longest = int(batch.response_mask.sum(1).argmax())
    mask = batch.response_mask.clone()
    mask[longest, 1] = 0.0
    return batch.replace(response_mask=mask)


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        # Large allocations always get their own mmap, so RSS follows live memory instead of glibc's retained
        # free chunks (the export memory test measures what is held, not what malloc keeps for reuse).
        env.setenv("MALLOC_MMAP_THRESHOLD_", str(2**20))
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def torch_reference(tiny_model_dir):
    """The single-process learner: logprobs before, metrics of and parameters after one step on the batch."""
    learner = TorchLearner(tiny_model_dir, **OPTIONS)
    initial = learner.state_dict_cpu()
    batch = uneven_batch(seed=1)
    logprobs = learner.logprobs(batch)
    metrics = learner.train_step(batch, CrossEntropyLoss())
    return {
        "batch": batch,
        "logprobs": logprobs,
        "metrics": metrics,
        "initial": initial,
        "params": learner.state_dict_cpu(),
    }


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[name] - b[name]).abs().max()) for name in a)


# ---- pure pieces ---------------------------------------------------------------------------------------


def test_shards_are_token_balanced_whole_rows_and_deterministic():
    tokens = [30, 5, 5, 5, 5, 5, 5, 12]
    shards = shard_rows_by_tokens(tokens, 2)
    assert sorted(i for shard in shards for i in shard) == list(range(len(tokens)))
    loads = [sum(tokens[i] for i in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(tokens[i] for i in range(len(tokens)) if tokens[i] < 30)
    assert shards == shard_rows_by_tokens(tokens, 2)
    assert all([tokens[i] for i in shard] == sorted((tokens[i] for i in shard), reverse=True) for shard in shards)
    assert shard_rows_by_tokens([4], 3) == [[0], [], []]
    assert micro_batch_count([[[0]], [], []]) == 1
    assert micro_batch_count([[[0, 1], [2]], [[3]]]) == 2


def test_buckets_respect_the_byte_bound_and_keep_order():
    sizes = [3, 3, 9, 1, 1, 1, 4]
    buckets = bucket_by_bytes(sizes, 4)
    assert [i for bucket in buckets for i in bucket] == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= 4 or len(b) == 1 for b in buckets)
    assert buckets == [[0], [1], [2], [3, 4, 5], [6]]


def test_padding_bounds_drop_only_all_padding_columns():
    prompt_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1.0]])
    response_mask = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 0, 0, 0.0]])
    assert padding_bounds(prompt_mask, response_mask) == (1, 3)
    assert padding_bounds(prompt_mask, torch.zeros(2, 5)) == (1, 1)


def test_bad_settings_fail_before_any_actor_starts():
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(zero_stage=4, micro_batch_size=1, world_size=1, grad_clip=1.0, dtype="float32")
    with pytest.raises(ValueError, match="offload_params needs learner.zero_stage=3"):
        deepspeed_config(
            zero_stage=2, micro_batch_size=1, world_size=1, grad_clip=1.0, dtype="float32", offload_params=True
        )
    with pytest.raises(ValueError, match="zero_stage"):
        DeepSpeedLearnerGroup(learner_cfg(1, 0), "unused", OPTIONS)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        DeepSpeedLearnerGroup(learner_cfg(0, 2), "unused", OPTIONS)


def test_only_the_learner_module_imports_deepspeed():
    import ast
    import pathlib

    import rltrain

    importers = []
    for path in pathlib.Path(rltrain.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] == "deepspeed" for name in names):
                importers.append(path.name)
    assert set(importers) == {"deepspeed_learner.py"}


def test_resume_refuses_a_foreign_or_mismatched_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not saved by learner.backend=deepspeed"):
        check_checkpoint(str(tmp_path), world_size=2, zero_stage=3)
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "rltrain_deepspeed.json").write_text('{"world_size": 1, "zero_stage": 3}')
    with pytest.raises(ValueError, match="world_size=1"):
        check_checkpoint(str(tmp_path), world_size=2, zero_stage=3)


# ---- equivalence with the torch learner ------------------------------------------------------------------


# Every ZeRO stage on two ranks; one rank only for stage 3 (stages 1 and 2 on one rank partition nothing). ZeRO-2 packs
# its micro-batches under a token budget instead (packed rows, against the torch reference's padded ones): the ranks
# hold 40 and 38 tokens, so at 38 rank 0 packs two micro-batches and rank 1 one and a filler.
@pytest.mark.parametrize("zero_stage,world_size,budget", [(1, 2, None), (2, 2, 38), (3, 2, None), (3, 1, None)])
def test_one_step_equals_the_torch_learner(tiny_model_dir, torch_reference, zero_stage, world_size, budget):
    options = {**OPTIONS, "max_tokens_per_micro_batch": budget} if budget else OPTIONS
    group = DeepSpeedLearnerGroup(learner_cfg(world_size, zero_stage), tiny_model_dir, options)
    try:
        batch = torch_reference["batch"]
        if budget:
            assert [len(rows) for rows in plan_step(batch, world_size, group.batching).micro_rows] == [2, 1]
        torch.testing.assert_close(group.logprobs(batch), torch_reference["logprobs"], atol=PARAM_TOL, rtol=0)
        metrics = group.train_step(batch, CrossEntropyLoss())
        expected = torch_reference["metrics"]
        assert sorted(metrics) == sorted(expected)
        for key in ("loss/nll", "loss/total", "perf/grad_norm", "perf/lr"):
            assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
        params = ray.get(group.export_weights_ref())
        diff = max_param_diff(params, torch_reference["params"])
        assert diff <= PARAM_TOL
        # The step moved the parameters by about lr: a wrong gradient direction would show far above the bound.
        assert max_param_diff(params, torch_reference["initial"]) > 50 * PARAM_TOL
    finally:
        group.shutdown()


def ppo_batch(batch: RolloutBatch, old: torch.Tensor, ref: torch.Tensor, seed: int) -> RolloutBatch:
    gen = torch.Generator().manual_seed(seed)
    advantages = torch.randn(batch.batch_size, 1, generator=gen) * batch.response_mask
    return batch.replace(old_logprobs=old, ref_logprobs=ref, advantages=advantages)


def tree_batch(seed: int, vocab: int = 512) -> RolloutBatch:
    """Three prompt groups: a 5-leaf tree over shared 3-token segments (one leaf a prefix of another, an untrained
    token mid-response), a group of 3 where two rows share a first segment, and a pair that shares only its prompt
    (``ancestors[:, 0]``: each row's first segment; a micro-batch of the pair goes through the prompt's KV cache,
    the others through the token trie)."""
    gen = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (6, 4, 9))
    s = [torch.randint(3, vocab, (3,), generator=gen).tolist() for _ in range(10)]
    responses = [s[0] + s[1], s[0] + s[1] + s[2], s[0] + s[3], s[4] + s[5], s[4], s[6], s[7], s[6] + s[5], s[8], s[9]]
    results = [GenResult(tuple(r), (0.0,) * len(r), FinishReason.STOP) for r in responses]
    batch = build_rollout_batch(
        [a] * 5 + [b] * 3 + [c] * 2, results, group=[0] * 5 + [1] * 3 + [2] * 2, policy_version=0
    )
    mask = batch.response_mask.clone()
    mask[1, 4] = 0.0
    first_segments = torch.tensor([0, 0, 0, 4, 4, 6, 7, 6, 8, 9])[:, None]
    return batch.replace(response_mask=mask, ancestors=first_segments)


def test_prefix_shared_policy_loss_with_reference_kl_and_entropy_at_zero3_equals_the_padded_torch_learner(
    tiny_model_dir,
):
    """``share_prefixes`` on 2 ZeRO-3 ranks against the padded torch learner: sequence-mean aggregation (global sequence
    count), KL to the sharded reference model (its forward prefix-shared too), entropy bonus. The tree is alone on rank
    0 (one micro-batch and a filler), the other two groups on rank 1 (two micro-batches of at most 3 rows)."""
    from rltrain.algo import make_loss_fn

    options = {**OPTIONS, "use_reference": True}
    loss_fn = make_loss_fn(loss_agg="seq_mean_token_mean", kl_coef=0.1, entropy_coef=0.01)
    batch = tree_batch(seed=2)
    torch_learner = TorchLearner(tiny_model_dir, **options)
    group = DeepSpeedLearnerGroup(learner_cfg(2, 3), tiny_model_dir, {**options, "share_prefixes": True})
    try:
        plan = plan_step(batch, 2, group.batching)
        assert plan.shards[0] == [0, 1, 2, 3, 4] and [len(rows) for rows in plan.micro_rows] == [1, 2]
        old, ref = group.logprobs(batch), group.logprobs(batch, reference=True)
        torch.testing.assert_close(old, torch_learner.logprobs(batch), atol=PARAM_TOL, rtol=0)
        torch.testing.assert_close(ref, torch_learner.logprobs(batch, reference=True), atol=PARAM_TOL, rtol=0)
        train = ppo_batch(batch, old, ref, seed=3)
        metrics = group.train_step(train, loss_fn)
        expected = torch_learner.train_step(train, loss_fn)
        for key in ("loss/policy", "loss/kl", "loss/entropy", "loss/total", "perf/grad_norm"):
            assert metrics[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
        assert metrics["perf/learner_tokens_saved"] > 0
        assert max_param_diff(ray.get(group.export_weights_ref()), torch_learner.state_dict_cpu()) <= PARAM_TOL
        # The reference model stays the initial policy after the step.
        torch.testing.assert_close(group.logprobs(batch, reference=True), ref, atol=0, rtol=0)
    finally:
        group.shutdown()


# ---- non-finite steps ----------------------------------------------------------------------------------


class NanLossOnRowZero:
    """CrossEntropyLoss, plus a constant NaN on the micro-batch holding row 0: the loss is NaN on one rank while
    every gradient stays finite (the case DeepSpeed's own grad-norm check cannot see)."""

    needs_entropy = False

    def __call__(self, logprobs, entropy, micro, norm):
        loss, metrics = CrossEntropyLoss()(logprobs, entropy, micro, norm)
        return loss + (float("nan") if bool((micro.group == 0).any()) else 0.0), metrics


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_non_finite_step_is_skipped_on_every_rank_and_changes_nothing(tiny_model_dir, zero_stage):
    """A NaN loss on one rank, then inf advantages (inf/NaN gradients): weights stay as they were, each step counts
    1 in loss/nonfinite_skipped, and the LR schedule does not advance (the next step has warm-up step 0's lr)."""
    import sys

    from ray import cloudpickle

    from rltrain.algo import make_loss_fn

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the rank actors cannot import this test module
    options = {**OPTIONS, "warmup_steps": 2, "total_steps": 4}
    batch = uneven_batch(seed=4)
    group = DeepSpeedLearnerGroup(learner_cfg(2, zero_stage), tiny_model_dir, options)
    try:
        initial = ray.get(group.export_weights_ref())
        inf_advantages = batch.replace(
            old_logprobs=group.logprobs(batch), advantages=torch.full_like(batch.response_mask, float("inf"))
        )
        for bad_step in (group.train_step(batch, NanLossOnRowZero()), group.train_step(inf_advantages, make_loss_fn())):
            assert bad_step["loss/nonfinite_skipped"] == 1.0
            assert bad_step["perf/lr"] == pytest.approx(options["lr"] / 2)
        assert max_param_diff(ray.get(group.export_weights_ref()), initial) == 0.0
        good = group.train_step(batch, CrossEntropyLoss())
        assert good["loss/nonfinite_skipped"] == 0.0 and good["perf/lr"] == pytest.approx(options["lr"] / 2)
        assert max_param_diff(ray.get(group.export_weights_ref()), initial) > 50 * PARAM_TOL
    finally:
        group.shutdown()


# ---- checkpoint / resume -------------------------------------------------------------------------------


# ZeRO-2 (the optimizer class ZeRO-1 shares) and ZeRO-3; ZeRO-3 also resumes through the CLI (test_deepspeed_e2e.py).
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_resume_reproduces_an_uninterrupted_run(tiny_model_dir, tmp_path, zero_stage):
    """Save after step 2 of 4; a fresh group loaded from the save reproduces steps 3-4 (losses, lr, weights)."""
    options = {**OPTIONS, "warmup_steps": 2, "lr_schedule": "cosine", "total_steps": 4}
    batches = [uneven_batch(seed=10 + step) for step in range(4)]
    loss_fn = CrossEntropyLoss()
    save_dir = str(tmp_path / "step_2")
    group = DeepSpeedLearnerGroup(learner_cfg(2, zero_stage), tiny_model_dir, options)
    try:
        uninterrupted = [group.train_step(batches[0], loss_fn), group.train_step(batches[1], loss_fn)]
        saved_weights = ray.get(group.export_weights_ref())
        group.save(save_dir)
        uninterrupted += [group.train_step(batches[2], loss_fn), group.train_step(batches[3], loss_fn)]
        final_weights = ray.get(group.export_weights_ref())
    finally:
        group.shutdown()

    from transformers import AutoModelForCausalLM

    exported = dict(AutoModelForCausalLM.from_pretrained(save_dir).named_parameters())
    assert max_param_diff({k: v.detach() for k, v in exported.items()}, saved_weights) == 0.0

    resumed_group = DeepSpeedLearnerGroup(learner_cfg(2, zero_stage), tiny_model_dir, options)
    try:
        resumed_group.load(save_dir)
        resumed = [resumed_group.train_step(batches[2], loss_fn), resumed_group.train_step(batches[3], loss_fn)]
        resumed_weights = ray.get(resumed_group.export_weights_ref())
    finally:
        resumed_group.shutdown()
    for before, after in zip(uninterrupted[2:], resumed):
        assert abs(before["loss/total"] - after["loss/total"]) <= RESUME_TOL
        assert before["perf/lr"] == pytest.approx(after["perf/lr"], rel=1e-12)
    assert uninterrupted[2]["perf/lr"] != uninterrupted[3]["perf/lr"]  # the schedule state mattered
    assert max_param_diff(resumed_weights, final_weights) <= RESUME_TOL


# ---- bucketed ZeRO-3 export and its peak memory --------------------------------------------------------


@pytest.fixture(scope="module")
def larger_model_dir(tmp_path_factory) -> str:
    """~24M parameters (~91 MiB fp32): large against an 8 MiB export bucket and against RSS noise."""
    return build_export_model(str(tmp_path_factory.mktemp("ds_larger") / "model"))


def test_zero3_bucketed_export_streams_without_a_full_model_copy(larger_model_dir):
    bucket_mb = 8
    group = DeepSpeedLearnerGroup(learner_cfg(2, 3, export_bucket_mb=bucket_mb), larger_model_dir, OPTIONS)
    try:
        pids = rank_pids(group)
        bucketed_rss, single_rss = RssPeak(pids), RssPeak(pids)
        bucket_refs = bucketed_rss.measure(group.export_weight_bucket_refs)
        buckets = [ray.get(ref) for ref in bucket_refs]
        whole = ray.get(single_rss.measure(group.export_weights_ref))
    finally:
        group.shutdown()
    model_bytes = sum(t.numel() * t.element_size() for t in whole.values())
    streamed = {name: tensor for bucket in buckets for name, tensor in bucket.items()}
    assert list(streamed) == list(whole)
    assert all(torch.equal(streamed[name], whole[name]) for name in whole)
    bound = bucket_mb * 2**20
    assert all(sum(t.numel() * t.element_size() for t in b.values()) <= bound or len(b) == 1 for b in buckets)
    # Bucketed: no rank holds more than a bucket or two outside the object store.
    assert max(bucketed_rss.growth) < model_bytes / 2
    # Single dict: rank 0 holds the model once (zero-copy put: no pickled second copy).
    assert max(single_rss.growth) < 1.5 * model_bytes
