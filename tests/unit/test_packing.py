"""Token-budget micro-batches (``learner.max_tokens_per_micro_batch``): first-fit-decreasing bins, packed rows, and
packed logprobs, losses and gradients equal to the padded path's within 1e-5 on the tiny model."""

import pytest
import torch
from hydra import compose, initialize_config_module
from hypothesis import given, settings
from hypothesis import strategies as st

from rltrain import algo
from rltrain.config import ConfigError, register_configs
from rltrain.config_rules import validate
from rltrain.learner.base import LossNorm
from rltrain.learner.logprobs import sequence_logprobs
from rltrain.learner.packing import (
    block_causal_mask,
    first_fit_decreasing,
    pack_rows,
    packed_attention_mask,
    packed_micro_batches,
    packed_sequence_logprobs,
    token_counts,
)
from rltrain.learner.torch_learner import TorchLearner
from rltrain.models import load_causal_lm
from rltrain.runtime import learner_options
from rltrain.types import FinishReason, GenResult, build_rollout_batch

register_configs()
TOLERANCE = 1e-5
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


# ---- first-fit decreasing ------------------------------------------------------------------------------------------
def test_first_fit_decreasing_places_longest_first_into_the_first_bin_with_room():
    assert first_fit_decreasing([5, 4, 3, 3, 2, 1], budget=8) == [[0, 2], [1, 3, 5], [4]]
    assert first_fit_decreasing([2, 9, 2], budget=4) == [[1], [0, 2]]  # 9 > budget: a bin of its own
    assert first_fit_decreasing([], budget=4) == []
    with pytest.raises(ValueError, match="budget"):
        first_fit_decreasing([1], budget=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=30), st.integers(1, 60))
def test_first_fit_decreasing_properties(lengths, budget):
    bins = first_fit_decreasing(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every index exactly once
    for b in bins:
        assert sum(lengths[i] for i in b) <= budget or len(b) == 1
    # Placement order is longest first (ties by index), and an index went to the first bin that had room then.
    rank = {index: r for r, index in enumerate(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)))}
    for k, b in enumerate(bins):
        assert [rank[i] for i in b] == sorted(rank[i] for i in b)
        for i in b:
            for earlier in bins[:k]:
                load_then = sum(lengths[j] for j in earlier if rank[j] < rank[i])
                assert load_then + lengths[i] > budget
    assert first_fit_decreasing(list(lengths), budget) == bins


# ---- packed rows ---------------------------------------------------------------------------------------------------
def _rows(prompts, responses, mask_edits=()):
    results = [GenResult(tuple(r), tuple([-1.0] * len(r)), FinishReason.STOP) for r in responses]
    batch = build_rollout_batch(prompts, results, group=list(range(len(prompts))), policy_version=0)
    mask = batch.response_mask.clone()
    for row, column in mask_edits:
        mask[row, column] = 0
    return batch.replace(response_mask=mask)


def test_pack_rows_concatenates_real_tokens_and_restarts_positions():
    # Row 1's response has its last token masked: it is not packed (nothing predicts with it, nothing sees it).
    batch = _rows([[11, 12, 13], [21]], [[31, 32], [41, 42, 43]], mask_edits=[(1, 2)])
    packed = pack_rows(batch)
    assert packed.input_ids.tolist() == [[11, 12, 13, 31, 32, 21, 41, 42]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert packed.lengths == (5, 3)
    assert packed.predictors.tolist() == [2, 3, 5, 6]  # the token before each response token
    assert packed.rows.tolist() == [0, 0, 1, 1] and packed.columns.tolist() == [0, 1, 0, 1]
    assert token_counts(batch) == [5, 3]
    assert packed_micro_batches(batch, budget=7) == [[0], [1]]
    assert packed_micro_batches(batch, budget=8) == [[0, 1]]


def test_block_causal_mask_keeps_each_sequence_to_itself():
    expected = [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 1, 1],
    ]
    assert block_causal_mask([2, 2]).int().tolist() == [[expected]]
    additive = packed_attention_mask([2, 2], "eager", torch.float32)
    assert additive.dtype == torch.float32 and ((additive == 0) == block_causal_mask([2, 2])).all()
    assert (additive[block_causal_mask([2, 2]).logical_not()] == torch.finfo(torch.float32).min).all()
    assert packed_attention_mask([2, 2], "sdpa", torch.float32).dtype == torch.bool
    assert packed_attention_mask([2, 2], "flash_attention_2", torch.bfloat16) is None


# ---- equal to the padded path on the tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch():
    """7 rows: uneven prompts and responses, a masked token mid-response, a row whose tail is masked, an all-masked
    row, advantages of both signs, rollout logprobs as old logprobs and shifted ones as reference logprobs."""
    g = torch.Generator().manual_seed(0)
    prompt_lengths, response_lengths = (3, 7, 5, 2, 9, 4, 6), (6, 1, 9, 4, 3, 8, 5)
    prompts = [torch.randint(5, 250, (n,), generator=g).tolist() for n in prompt_lengths]
    responses = [torch.randint(5, 250, (n,), generator=g).tolist() for n in response_lengths]
    rows = _rows(prompts, responses, mask_edits=[(2, 3), (3, 2), (3, 3), (6, 0), (6, 1), (6, 2), (6, 3), (6, 4)])
    rollout = -torch.rand(rows.response_ids.shape, generator=g) * rows.response_mask
    advantages = torch.randn(rows.batch_size, 1, generator=g) * rows.response_mask
    reference = (rollout - 0.1) * rows.response_mask
    return rows.replace(rollout_logprobs=rollout, old_logprobs=rollout, ref_logprobs=reference, advantages=advantages)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir).eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logprobs_and_entropy_equal_the_padded_path(model, batch, attention):
    model.set_attn_implementation(attention)
    try:
        with torch.no_grad():
            padded, padded_entropy = sequence_logprobs(model, batch, 0.7, with_entropy=True)
            packed, packed_entropy, tokens = packed_sequence_logprobs(model, batch, 0.7, with_entropy=True)
    finally:
        model.set_attn_implementation("sdpa")
    assert packed.shape == padded.shape and padded.abs().sum() > 0
    assert (packed - padded).abs().max() <= TOLERANCE
    assert (packed_entropy - padded_entropy).abs().max() <= TOLERANCE
    assert tokens == sum(token_counts(batch)) < batch.prompt_ids.numel() + batch.response_ids.numel()


def test_packing_without_the_block_mask_would_differ(model, batch):
    """The equality above depends on the mask: a plain causal mask over the packed row lets sequences see each other."""
    packed = pack_rows(batch)
    width = packed.input_ids.shape[1]
    masks = {"leaky": torch.ones(width, width, dtype=torch.bool).tril()[None, None]}
    masks["sealed"] = block_causal_mask(packed.lengths)
    with torch.no_grad():
        logits = {
            name: model(
                input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids, use_cache=False
            ).logits
            for name, mask in masks.items()
        }
    assert (logits["leaky"] - logits["sealed"]).abs().max() > 1e-3


def _learner(tiny_model_dir, budget):
    return TorchLearner(
        tiny_model_dir, lr=1e-3, grad_clip=0.0, micro_batch_size=2, max_tokens_per_micro_batch=budget, temperature=0.7
    )


@pytest.mark.parametrize("budget", [17, 40])  # 17: the longest row alone; 40: several rows per micro-batch
def test_learner_logprobs_packed_equal_padded_in_row_order(tiny_model_dir, batch, budget):
    padded = _learner(tiny_model_dir, None).logprobs(batch)
    packed = _learner(tiny_model_dir, budget).logprobs(batch)
    assert len(packed_micro_batches(batch, budget)) > 1
    assert (packed - padded).abs().max() <= TOLERANCE


def _step_with_gradients(learner, batch, loss_fn):
    """One train_step_normalised; (metrics, {name: gradient} as the optimizer saw it)."""
    grads = {}

    def capture(optimizer, args, kwargs):
        grads.update({name: p.grad.clone() for name, p in learner.model.named_parameters() if p.grad is not None})

    learner.optimizer.register_step_pre_hook(capture)
    norm = LossNorm(global_tokens=batch.num_tokens, global_seqs=batch.batch_size)
    return learner.train_step_normalised(batch, loss_fn, norm), grads


@pytest.mark.parametrize("loss_agg", AGG_MODES)
def test_packed_train_step_equals_padded_for_every_loss_agg(tiny_model_dir, batch, loss_agg):
    loss_fn = algo.make_loss_fn(loss_agg=loss_agg, loss_agg_constant=10.0, entropy_coef=0.01, kl_coef=0.1)
    padded_metrics, padded_grads = _step_with_gradients(_learner(tiny_model_dir, None), batch, loss_fn)
    packed_metrics, packed_grads = _step_with_gradients(_learner(tiny_model_dir, 40), batch, loss_fn)
    assert padded_metrics["loss/total"] != 0 and padded_metrics["perf/grad_norm"] > 0
    for key, value in padded_metrics.items():
        if key != "perf/learner_tokens":
            assert packed_metrics[key] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), key
    assert padded_grads.keys() == packed_grads.keys()
    # The tiny model's gradients are ~1e-4, so 1e-5 is taken relative to the largest gradient entry.
    scale = max(float(grad.abs().max()) for grad in padded_grads.values())
    for name, grad in padded_grads.items():
        assert (packed_grads[name] - grad).abs().max() <= TOLERANCE * scale, name


def test_learner_tokens_counts_the_tokens_computed(tiny_model_dir, batch):
    loss_fn = algo.make_loss_fn()
    padded = _learner(tiny_model_dir, None).train_step(batch, loss_fn)["perf/learner_tokens"]
    packed = _learner(tiny_model_dir, 40).train_step(batch, loss_fn)["perf/learner_tokens"]
    assert padded == batch.batch_size * (batch.prompt_ids.shape[1] + batch.response_ids.shape[1])
    assert packed == sum(token_counts(batch)) < padded


# ---- configuration -------------------------------------------------------------------------------------------------
def _config(overrides):
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        return compose(config_name="quickstart", overrides=overrides)


def test_the_budget_must_hold_the_longest_sequence():
    cfg = _config(["data.max_prompt_tokens=30", "rollout.max_tokens=10", "learner.max_tokens_per_micro_batch=39"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert message.startswith("learner.max_tokens_per_micro_batch=39:")
    assert "data.max_prompt_tokens=30" in message and "rollout.max_tokens=10" in message
    validate(_config(["data.max_prompt_tokens=30", "rollout.max_tokens=10", "learner.max_tokens_per_micro_batch=40"]))


def test_deepspeed_takes_the_budget_and_checks_it_alike():
    validate(_config(["learner=deepspeed", "learner.max_tokens_per_micro_batch=512"]))
    with pytest.raises(ConfigError, match="learner.max_tokens_per_micro_batch=39: must hold the longest sequence"):
        validate(
            _config(
                ["learner=deepspeed", "data.max_prompt_tokens=30", "rollout.max_tokens=10"]
                + ["learner.max_tokens_per_micro_batch=39"]
            )
        )


def test_learner_options_pass_the_budget_only_when_set():
    assert "max_tokens_per_micro_batch" not in learner_options(_config([]), 1)
    options = learner_options(_config(["learner.max_tokens_per_micro_batch=512"]), 1)
    assert options["max_tokens_per_micro_batch"] == 512
