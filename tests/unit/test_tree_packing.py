"""Prefix-shared packing (``learner.share_prefixes``): the token trie, the ancestor mask, and per-row logprobs,
losses and gradients equal to the unshared (padded) path within 1e-5 on the tiny model, for a tree (token trie) and
flat groups (a prompt's KV cache shared by its rows, rltrain/learner/prefix_cache.py)."""

import pytest
import torch
from hydra import compose, initialize_config_module
from hypothesis import given, settings
from hypothesis import strategies as st

from rltrain import algo
from rltrain.config import register_configs
from rltrain.config_rules import validate
from rltrain.learner.base import LossNorm
from rltrain.learner.logprobs import sequence_logprobs
from rltrain.learner.packing import token_counts
from rltrain.learner.prefix_cache import prefix_cache_applies, prefix_cached_logprobs
from rltrain.learner.torch_learner import TorchLearner
from rltrain.learner.tree_packing import (
    ancestor_mask,
    group_micro_batches,
    pack_lanes,
    pack_tree,
    shared_sequence_logprobs,
    shared_token_count,
    tree_attention_mask,
    trie_paths,
)
from rltrain.models import load_causal_lm
from rltrain.runtime import learner_options
from rltrain.types import FinishReason, GenResult, build_rollout_batch

register_configs()
TOLERANCE = 1e-5
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def _rows(prompts, responses, group, mask_edits=()):
    results = [GenResult(tuple(r), tuple([-1.0] * len(r)), FinishReason.STOP) for r in responses]
    batch = build_rollout_batch(prompts, results, group=group, policy_version=0)
    mask = batch.response_mask.clone()
    for row, column in mask_edits:
        mask[row, column] = 0
    return batch.replace(response_mask=mask)


# ---- the trie and its mask -----------------------------------------------------------------------------------------
def test_a_tree_is_packed_with_each_prefix_once():
    # One prompt [1, 2]; three leaves: segments (5, 6) shared by rows 0 and 2, then forks; row 1 forks at once.
    batch = _rows([[1, 2]] * 3, [[5, 6, 7], [8, 9], [5, 6, 4, 3]], group=[0, 0, 0])
    packed = pack_tree(batch)
    ids = packed.input_ids[0].tolist()
    assert packed.tokens == 2 + 3 + 2 + 2 == len(ids) and packed.unshared_tokens == 5 + 4 + 6
    assert sorted(ids) == sorted([1, 2, 5, 6, 7, 8, 9, 4, 3])
    # Each row's path spells its tokens at its depths, and sees exactly its own path.
    for tokens in [[1, 2, 5, 6, 7], [1, 2, 8, 9], [1, 2, 5, 6, 4, 3]]:
        path = [ids.index(tokens[0])]
        for depth, token in enumerate(tokens[1:], start=1):
            children = [q for q in range(len(ids)) if packed.ancestors[q, path[-1]] and q != path[-1]]
            path.append(next(q for q in children if ids[q] == token and packed.position_ids[0, q] == depth))
        leaf = path[-1]
        assert packed.ancestors[leaf].nonzero().flatten().tolist() == sorted(path)
    # Row 1's first response token (8) is predicted by the last prompt token, like rows 0 and 2's (5): one predictor.
    assert packed.predictors.numel() == 5  # the positions of 2, 5, 6, 8 and 4: a shared token predicts once
    assert packed.rows.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_rows_of_different_prompts_share_nothing():
    batch = _rows([[1, 2], [3, 2]], [[5], [5]], group=[0, 1])
    packed = pack_tree(batch)
    assert packed.tokens == 6 and (packed.ancestors.sum() == 2 * (1 + 2 + 3))  # two separate causal blocks
    assert shared_token_count(batch) == 6


def test_groups_are_laid_in_lanes_as_wide_as_the_widest_group():
    # Group sizes 9 (a tree), 4 and 3 (flat): lane 0 holds the tree, lane 1 both flat groups and 2 padding positions.
    batch = _rows(
        [[1, 2]] * 3 + [[3]] * 2 + [[4]] * 2,
        [[5, 6, 7], [8, 9], [5, 6, 4, 3], [5, 6], [5, 7], [8], [9]],
        group=[0, 0, 0, 1, 1, 2, 2],
    )
    lanes = pack_lanes(batch)
    assert lanes.input_ids.shape == (2, 9) and lanes.tokens == 9 + 4 + 3 and lanes.unshared_tokens == 15 + 6 + 4
    assert lanes.input_ids[1, :7].tolist() == [3, 5, 6, 7, 4, 8, 9]
    assert lanes.ancestors[1, 8].nonzero().flatten().tolist() == [8]  # padding sees itself only
    assert not lanes.ancestors[1, :4, 4:].any() and not lanes.ancestors[1, 4:, :4].any()  # groups apart
    # Every response token is read from the lane and position of its own row's previous token.
    for row, column, flat in zip(lanes.rows.tolist(), lanes.columns.tolist(), lanes.token_index.tolist()):
        lane, position = divmod(flat, len(lanes.kept))
        previous = batch.response_ids[row, column - 1] if column else batch.prompt_ids[row, -1]
        assert lanes.input_ids[lane, lanes.kept[position]] == previous
        assert lanes.position_ids[lane, lanes.kept[position]] == int(batch.prompt_mask[row].sum()) + column - 1


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=8))
def test_trie_paths_spell_every_sequence_and_share_every_common_prefix(sequences):
    paths, ids, depths, shared = trie_paths(sequences)
    prefixes = {tuple(s[: t + 1]) for s in sequences for t in range(len(s))}
    assert len(ids) == len(prefixes)  # one position per distinct prefix
    for sequence, path, reused in zip(sequences, paths, shared, strict=True):
        assert [ids[q] for q in path] == sequence and [depths[q] for q in path] == list(range(len(sequence)))
        fresh = path[reused:]  # the new positions are consecutive
        assert not fresh or fresh == list(range(fresh[0], fresh[0] + len(fresh)))
    # The mask: q sees exactly the positions of the prefixes of its own prefix.
    mask = ancestor_mask(paths, shared)
    for path in paths:
        for t, q in enumerate(path):
            assert mask[q].nonzero().flatten().tolist() == sorted(path[: t + 1])


def test_tree_attention_mask_formats():
    ancestors = torch.tensor([[[1, 0], [1, 1]]], dtype=torch.bool)  # one lane
    assert tree_attention_mask(ancestors, "sdpa", torch.float32).dtype == torch.bool
    additive = tree_attention_mask(ancestors, "eager", torch.float32)
    assert additive.shape == (1, 1, 2, 2) and additive[0, 0, 0, 1] == torch.finfo(torch.float32).min
    with pytest.raises(ValueError, match="flash_attention_2"):
        tree_attention_mask(ancestors, "flash_attention_2", torch.float32)


# ---- equal to the unshared path on the tiny model -----------------------------------------------------------------
def _tree_batch(generator):
    """Two prompt groups: a tree of 5 leaves over shared segments (one leaf a prefix of another, a masked token
    mid-response, an all-masked leaf) and a flat group of 3 that shares only its prompt; random advantages."""
    a, b = (torch.randint(5, 250, (n,), generator=generator).tolist() for n in (6, 4))
    s = [torch.randint(5, 250, (3,), generator=generator).tolist() for _ in range(8)]
    responses = [s[0] + s[1], s[0] + s[1] + s[2], s[0] + s[3], s[4] + s[5], s[4], s[6], s[7], s[6] + s[5]]
    rows = _rows([a] * 5 + [b] * 3, responses, group=[0] * 5 + [1] * 3, mask_edits=[(1, 4), (4, 0), (4, 1), (4, 2)])
    # Each row's first segment, as the tree sampler records it: rows that share one are packed in a token trie.
    first_segments = torch.tensor([0, 0, 0, 4, 4, 6, 7, 6])[:, None]
    return _with_training_fields(rows, generator).replace(ancestors=first_segments)


def _flat_batch(generator):
    """Three flat groups (prompts of 6, 4 and 9 tokens, left-padded; 3, 2 and 4 samples of 1-7 tokens, a masked
    token mid-response, an all-masked row): rows share their prompt only, through the KV cache."""
    prompts = [torch.randint(5, 250, (n,), generator=generator).tolist() for n in (6, 4, 9)]
    sizes = (3, 2, 4)
    lengths = torch.randint(1, 8, (sum(sizes),), generator=generator).tolist()
    responses = [torch.randint(5, 250, (n,), generator=generator).tolist() for n in lengths]
    group = [g for g, size in enumerate(sizes) for _ in range(size)]
    rows = _rows([prompts[g] for g in group], responses, group, mask_edits=[(1, 0)])
    rows = rows.replace(response_mask=rows.response_mask * (torch.arange(rows.batch_size) != 4)[:, None])
    return _with_training_fields(rows, generator)


def _with_training_fields(rows, generator):
    rollout = -torch.rand(rows.response_ids.shape, generator=generator) * rows.response_mask
    advantages = torch.randn(rows.batch_size, 1, generator=generator) * rows.response_mask
    return rows.replace(
        rollout_logprobs=rollout,
        old_logprobs=rollout,
        ref_logprobs=(rollout - 0.1) * rows.response_mask,
        advantages=advantages,
    )


@pytest.fixture(scope="module")
def batch():
    return _tree_batch(torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def flat_batch():
    return _flat_batch(torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir).eval()


def _padded_and(model, batch, attention, shared_forward):
    """(padded logprobs, padded entropy, ``shared_forward``'s result) with ``attention``, temperature 0.7, no grad."""
    model.set_attn_implementation(attention)
    try:
        with torch.no_grad():
            padded = sequence_logprobs(model, batch, 0.7, with_entropy=True)
            return (*padded, shared_forward(model, batch, 0.7, with_entropy=True))
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_logprobs_and_entropy_equal_the_unshared_path(model, batch, attention):
    padded, padded_entropy, (shared, shared_entropy, packed) = _padded_and(
        model, batch, attention, shared_sequence_logprobs
    )
    assert shared.shape == padded.shape and padded.abs().sum() > 0
    assert (shared - padded).abs().max() <= TOLERANCE
    assert (shared_entropy - padded_entropy).abs().max() <= TOLERANCE
    assert packed.unshared_tokens == sum(token_counts(batch)) and packed.tokens < packed.unshared_tokens - 30


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefix_cached_logprobs_and_entropy_equal_the_unshared_path(model, flat_batch, attention):
    padded, padded_entropy, (shared, shared_entropy, tokens, unshared) = _padded_and(
        model, flat_batch, attention, prefix_cached_logprobs
    )
    assert shared.shape == padded.shape and padded.abs().sum() > 0 and shared[4].abs().sum() == 0
    assert (shared - padded).abs().max() <= TOLERANCE
    assert (shared_entropy - padded_entropy).abs().max() <= TOLERANCE
    widest_response = int(flat_batch.response_mask.nonzero()[:, 1].max()) + 1
    # 3 prompts once, as wide as the widest; the responses as wide as the widest but for the last position
    assert tokens == 3 * 9 + flat_batch.batch_size * (widest_response - 1)
    assert unshared == sum(token_counts(flat_batch))


def test_one_token_responses_still_make_the_response_forward(model):
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 250, (n,), generator=generator).tolist() for n in (5, 3)]
    rows = _rows([prompts[0], prompts[0], prompts[1]], [[7], [9], [11]], [0, 0, 1], mask_edits=[])
    padded, _, (shared, _, tokens, _) = _padded_and(model, rows, "sdpa", prefix_cached_logprobs)
    assert (shared - padded).abs().max() <= TOLERANCE and padded.abs().sum() > 0
    assert tokens == 2 * 5 + 3  # the two prompts, as wide as the widest, and the one response position (ZeRO-3)


def test_the_prefix_cache_serves_rows_that_share_only_their_prompt(model, batch, flat_batch):
    assert prefix_cache_applies(model, flat_batch) and not prefix_cache_applies(model, batch)  # a tree: the trie
    assert prefix_cache_applies(model, batch.replace(ancestors=torch.arange(8)[:, None]))  # every root apart
    model.gradient_checkpointing_enable()
    try:
        assert not prefix_cache_applies(model, flat_batch)  # checkpointing turns the cache off: the trie
    finally:
        model.gradient_checkpointing_disable()


def test_sharing_without_the_ancestor_mask_would_differ(model, batch):
    """The equality depends on the mask: a causal mask over the packed row lets branches see each other."""
    packed = pack_tree(batch)
    width = packed.tokens
    masks = {
        "leaky": torch.ones(width, width, dtype=torch.bool).tril()[None, None],
        "tree": packed.ancestors[None, None],
    }
    with torch.no_grad():
        logits = {
            name: model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids).logits
            for name, mask in masks.items()
        }
    assert (logits["leaky"] - logits["tree"]).abs().max() > 1e-3


def _learner(tiny_model_dir, share_prefixes, budget=None):
    return TorchLearner(
        tiny_model_dir,
        lr=1e-3,
        grad_clip=0.0,
        micro_batch_size=5,
        max_tokens_per_micro_batch=budget,
        temperature=0.7,
        share_prefixes=share_prefixes,
    )


def _step_with_gradients(learner, batch, loss_fn):
    """One train_step_normalised; (metrics, {name: gradient} as the optimizer saw it)."""
    grads = {}

    def capture(optimizer, args, kwargs):
        grads.update({name: p.grad.clone() for name, p in learner.model.named_parameters() if p.grad is not None})

    learner.optimizer.register_step_pre_hook(capture)
    norm = LossNorm(global_tokens=batch.num_tokens, global_seqs=batch.batch_size)
    return learner.train_step_normalised(batch, loss_fn, norm), grads


@pytest.mark.parametrize("kind", ["batch", "flat_batch"])  # a tree (the trie) and flat groups (the KV cache)
@pytest.mark.parametrize("loss_agg", AGG_MODES)
def test_shared_train_step_equals_unshared_for_every_loss_agg(tiny_model_dir, request, kind, loss_agg):
    batch = request.getfixturevalue(kind)
    loss_fn = algo.make_loss_fn(loss_agg=loss_agg, loss_agg_constant=10.0, entropy_coef=0.01, kl_coef=0.1)
    padded_metrics, padded_grads = _step_with_gradients(_learner(tiny_model_dir, False), batch, loss_fn)
    shared_metrics, shared_grads = _step_with_gradients(_learner(tiny_model_dir, True), batch, loss_fn)
    assert padded_metrics["loss/total"] != 0 and padded_metrics["perf/grad_norm"] > 0
    for key, value in padded_metrics.items():
        if not key.startswith("perf/learner_tokens"):
            assert shared_metrics[key] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), key
    assert padded_grads.keys() == shared_grads.keys()
    # The tiny model's gradients are ~1e-4, so 1e-5 is taken relative to the largest gradient entry.
    scale = max(float(grad.abs().max()) for grad in padded_grads.values())
    for name, grad in padded_grads.items():
        assert (shared_grads[name] - grad).abs().max() <= TOLERANCE * scale, name


@pytest.mark.parametrize("kind", ["batch", "flat_batch"])
@pytest.mark.parametrize("budget", [None, 40])  # None: whole groups up to micro_batch_size rows; 40: shared tokens
def test_learner_logprobs_shared_equal_unshared_in_row_order(tiny_model_dir, request, kind, budget):
    batch = request.getfixturevalue(kind)
    padded = _learner(tiny_model_dir, False).logprobs(batch)
    shared = _learner(tiny_model_dir, True, budget).logprobs(batch)
    assert (shared - padded).abs().max() <= TOLERANCE


def test_learner_tokens_and_tokens_saved(tiny_model_dir, batch):
    loss_fn = algo.make_loss_fn()
    metrics = _learner(tiny_model_dir, True).train_step(batch, loss_fn)
    unshared = sum(token_counts(batch))
    computed = sum(shared_token_count(batch.select(rows)) for rows in group_micro_batches(batch, 5, None))
    assert metrics["perf/learner_tokens"] == computed and metrics["perf/learner_tokens_saved"] == unshared - computed
    assert "perf/learner_tokens_saved" not in _learner(tiny_model_dir, False).train_step(batch, loss_fn)


def test_a_token_budget_keeps_flat_groups_in_the_trie_it_bins_by(tiny_model_dir, flat_batch):
    """The budget bins groups by trie size; the KV-cache path pads to the widest prompt and response, so under a
    budget each micro-batch computes exactly its trie (at most the budget, or one group alone)."""
    learner = _learner(tiny_model_dir, True, budget=24)
    metrics = learner.train_step(flat_batch, algo.make_loss_fn())
    bins = [shared_token_count(flat_batch.select(rows)) for rows in learner.batching.rows(flat_batch)]
    assert len(bins) > 1 and metrics["perf/learner_tokens"] == sum(bins)


def test_micro_batches_keep_groups_whole(batch):
    assert group_micro_batches(batch, max_rows=5, max_tokens=None) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert group_micro_batches(batch, max_rows=8, max_tokens=None) == [[0, 1, 2, 3, 4, 5, 6, 7]]
    tree_tokens = shared_token_count(batch.select([0, 1, 2, 3, 4]))
    assert group_micro_batches(batch, max_rows=1, max_tokens=tree_tokens) == [[0, 1, 2, 3, 4], [5, 6, 7]]


# ---- configuration -------------------------------------------------------------------------------------------------
def _config(overrides):
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        return compose(config_name="treepo", overrides=overrides)


def test_deepspeed_takes_shared_prefixes():
    validate(_config(["learner=deepspeed", "learner.share_prefixes=true"]))


def test_learner_options_pass_share_prefixes_only_when_set():
    assert "share_prefixes" not in learner_options(_config([]), 1)
    assert learner_options(_config(["learner.share_prefixes=true"]), 1)["share_prefixes"] is True
