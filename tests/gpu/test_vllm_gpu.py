"""The vLLM engine checks at GPU scale: vLLM's CUDA engine against HF transformers on the same weights.

Run on a CUDA machine with ``pytest -m gpu tests/gpu``; skipped where CUDA or vllm is absent. The model is a
locally built Qwen2 (no hub needed) wider and deeper than the CPU tests' one; set ``RLTRAIN_GPU_MODEL`` to a
local HF model directory (e.g. Qwen2.5-0.5B) to run the same checks on a real checkpoint.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LOGPROB_TOL = 1e-3  # float32 on both sides
# Greedy is compared only while HF's top-2 logit margin exceeds this: below it, kernel-order rounding
# (cuBLAS vs vLLM's kernels) may legitimately pick the other token.
TIE_MARGIN = 1e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, arithmetic_rows) -> str:
    if os.environ.get("RLTRAIN_GPU_MODEL"):
        return os.environ["RLTRAIN_GPU_MODEL"]
    from rltrain.data.prompts import task_corpus
    from rltrain.models import build_tiny_model

    train, held_out = arithmetic_rows
    out = tmp_path_factory.mktemp("gpu_model") / "model"
    return build_tiny_model(
        str(out),
        task_corpus(train + held_out),
        hidden_size=512,
        intermediate_size=2048,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        seed=0,
    )


@pytest.fixture(scope="module")
def engine(model_dir):
    pytest.importorskip("vllm")
    from rltrain.rollout.vllm_engine import VLLMGenerator

    generator = VLLMGenerator(model_dir, seed=0, dtype="float32", gpu_memory_utilization=0.3)
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from rltrain.models import load_causal_lm

    return load_causal_lm(model_dir).to("cuda", torch.float32).eval()


def random_context(length: int, seed: int, vocab: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(3, vocab) for _ in range(length))


@torch.no_grad()
def hf_logits(model, context: tuple[int, ...], tokens: tuple[int, ...]) -> torch.Tensor:
    """Logits predicting each of ``tokens`` after ``context`` -> [len(tokens), V] float32 on CPU."""
    ids = torch.tensor([list(context) + list(tokens)], device="cuda")
    return model(input_ids=ids).logits[0, len(context) - 1 : -1].float().cpu()


def max_logprob_diff(model, requests, results) -> float:
    worst = 0.0
    for request, group in zip(requests, results):
        for result in group:
            logprobs = torch.log_softmax(hf_logits(model, request.context_ids, result.token_ids), dim=-1)
            expected = logprobs.gather(-1, torch.tensor(result.token_ids)[:, None])[:, 0]
            worst = max(worst, float((expected - torch.tensor(result.logprobs)).abs().max()))
    return worst


def test_greedy_equals_hf_on_cuda(engine, hf_model):
    from rltrain.types import GenRequest, SamplingParams

    vocab = hf_model.config.vocab_size
    requests = [GenRequest(random_context(length, seed, vocab)) for seed, length in enumerate((16, 200, 700))]
    results = engine.generate(requests, SamplingParams(temperature=0.0, max_tokens=48))
    for request, (result,) in zip(requests, results):
        logits = hf_logits(hf_model, request.context_ids, result.token_ids)
        top2 = logits.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > TIE_MARGIN
        decided = int(clear.long().cumprod(0).sum())  # positions before the first near-tie
        assert decided > 0
        assert list(result.token_ids[:decided]) == logits.argmax(-1)[:decided].tolist()
    assert max_logprob_diff(hf_model, requests, results) <= LOGPROB_TOL


def test_sync_then_logprobs_match_and_a_stale_engine_is_detected(engine, hf_model, model_dir):
    from rltrain.models import load_causal_lm
    from rltrain.types import GenRequest, SamplingParams

    vocab = hf_model.config.vocab_size
    updated = load_causal_lm(model_dir).to("cuda", torch.float32).eval()
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for param in updated.parameters():
            param.add_(torch.randn(param.shape, generator=generator, device="cuda") * 0.02)
    requests = [GenRequest(random_context(300, 7, vocab), n=4), GenRequest(random_context(40, 8, vocab), n=2)]
    params = SamplingParams(temperature=1.0, max_tokens=32, seed=3)
    stale = engine.generate(requests, params)
    assert max_logprob_diff(updated, requests, stale) > 100 * LOGPROB_TOL
    version = engine.policy_version
    try:
        engine.load_weights(((name, p.detach().cpu()) for name, p in updated.named_parameters()), version + 1)
        assert engine.policy_version == version + 1
        fresh = engine.generate(requests, params)
        assert max_logprob_diff(updated, requests, fresh) <= LOGPROB_TOL
    finally:
        engine.load_weights(((name, p.detach().cpu()) for name, p in hf_model.named_parameters()), version + 2)
    assert max_logprob_diff(hf_model, requests, engine.generate(requests, params)) <= LOGPROB_TOL


def test_prefix_cache_reuse_is_reported_on_cuda(engine, hf_model):
    from rltrain.rollout.base import total_stats
    from rltrain.types import GenRequest, SamplingParams

    shared = random_context(512, 9, hf_model.config.vocab_size)
    requests = [GenRequest(shared + (5,), n=4), GenRequest(shared, prefix_ids=(6, 7), n=4)]
    stats = total_stats(engine.generate(requests, SamplingParams(temperature=1.0, max_tokens=8, seed=0)))
    assert stats.prefill_reused > 0
    assert stats.prefill_computed + stats.prefill_reused == sum(len(r.context_ids) * r.n for r in requests)
