"""TorchTreeGenerator: continuing from kept KV rows matches a from-scratch recompute; prefill accounting is exact."""

from __future__ import annotations

import pytest
import torch

from rltrain.rollout.torch_engine import TorchGenerator
from rltrain.rollout.torch_tree_engine import TorchTreeGenerator
from rltrain.sampling.tree_sampler import TreeSampler
from rltrain.types import FinishReason, GenRequest, SamplingParams

pytestmark = pytest.mark.integration

PARAMS = SamplingParams(temperature=0.8, max_tokens=5)  # no stop tokens: every continuation reaches max_tokens


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> TorchTreeGenerator:
    torch.manual_seed(0)
    return TorchTreeGenerator.from_pretrained(tiny_model_dir, seed=0)


def recomputed_logprobs(model, context: tuple[int, ...], new: tuple[int, ...], temperature: float) -> torch.Tensor:
    """log-softmax(logits / T) of ``new`` after ``context``, from one uncached forward pass."""
    ids = torch.tensor([list(context) + list(new)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    steps = torch.arange(len(context) - 1, len(context) + len(new) - 1)
    return torch.log_softmax(logits[steps], dim=-1)[torch.arange(len(new)), torch.tensor(new)]


def assert_matches_recompute(model, request: GenRequest, results, temperature: float) -> None:
    for result in results:
        expected = recomputed_logprobs(model, request.context_ids, result.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-4, rtol=0)


def test_forked_branches_match_recompute_and_the_shared_prefix_is_prefilled_once(engine):
    engine.clear_cache()
    prompt = (5, 17, 42, 8, 99, 23, 61)
    first = engine.generate([GenRequest(prompt, n=3)], PARAMS)[0]
    assert [r.finish_reason for r in first] == [FinishReason.LENGTH] * 3
    assert [r.stats.prefill_computed for r in first] == [len(prompt), 0, 0]
    assert engine.cached_rows == 3
    assert_matches_recompute(engine.model, GenRequest(prompt), first, PARAMS.temperature)

    # each branch forked two ways from its kept row, batched with a fresh prompt of another length
    branches = [GenRequest(prompt, r.token_ids, n=2) for r in first]
    other = GenRequest((7, 7, 300, 12), n=2)
    second = engine.generate([*branches, other], PARAMS)
    for request, results in zip([*branches, other], second):
        assert_matches_recompute(engine.model, request, results, PARAMS.temperature)
    for request, results in zip(branches, second):
        assert (results[0].stats.prefill_computed, results[0].stats.prefill_reused) == (1, len(request.context_ids) - 1)
        assert (results[1].stats.prefill_computed, results[1].stats.prefill_reused) == (0, 0)
    assert second[-1][0].stats.prefill_computed == len(other.context_ids)
    assert engine.cached_rows == 8  # the 3 used rows are gone; the 8 new continuations are kept

    # one level deeper, from rows kept by the previous call
    deeper = [GenRequest(prompt, branches[0].prefix_ids + second[0][1].token_ids, n=1)]
    third = engine.generate(deeper, PARAMS)
    assert third[0][0].stats.prefill_computed == 1
    assert_matches_recompute(engine.model, deeper[0], third[0], PARAMS.temperature)


def test_new_weights_drop_kept_rows(engine):
    engine.clear_cache()
    prompt = (3, 4, 5)
    first = engine.generate([GenRequest(prompt)], PARAMS)[0][0]
    named = [(name, p.detach().clone()) for name, p in engine.model.named_parameters()]
    engine.load_weights(named, version=1)
    again = engine.generate([GenRequest(prompt, first.token_ids)], PARAMS)[0][0]
    assert again.stats.prefill_computed == len(prompt) + len(first.token_ids)


def test_tree_sampler_greedy_matches_the_plain_engine_with_less_prefill(tiny_model_dir):
    prompts = [[5, 17, 42, 8], [99, 23, 61, 7, 7, 300]]
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    outputs = {}
    for cls in (TorchGenerator, TorchTreeGenerator):
        sampler = TreeSampler(cls.from_pretrained(tiny_model_dir).generate, segment_len=3, max_depth=4, width=4, seed=0)
        outputs[cls] = sampler.sample(prompts, greedy)
    plain, tree = outputs[TorchGenerator], outputs[TorchTreeGenerator]
    assert [p + r.token_ids for p, r in zip(plain.prefixes, plain.results)] == [
        p + r.token_ids for p, r in zip(tree.prefixes, tree.results)
    ]
    assert torch.equal(plain.ancestors, tree.ancestors)
    assert tree.stats.decoded == plain.stats.decoded
    # every continuation after the first round feeds exactly one token: its parent's last sampled token
    requests_after_first_round = 2 + 4 + 4  # rounds 2..4 of two width-4 binary trees
    assert tree.stats.prefill_computed == sum(map(len, prompts)) + 2 * requests_after_first_round
    assert plain.stats.prefill_computed > tree.stats.prefill_computed
