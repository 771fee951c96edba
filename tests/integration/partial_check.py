"""Partial rollouts on a real engine: weights switched between chunks, every token's logprob checked against the
learner's forward (``sequence_logprobs``) under the weights version that sampled it."""

from __future__ import annotations

import torch

from rltrain.learner.logprobs import sequence_logprobs
from rltrain.models import load_causal_lm
from rltrain.rollout.partial import generate_in_chunks
from rltrain.types import GenRequest, SamplingParams, build_rollout_batch


def perturbed_copy(model_dir: str, scale: float = 0.05) -> torch.nn.Module:
    model = load_causal_lm(model_dir).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


def check_partial_rollout(engine, model_dir: str, prompts, tolerance: float) -> None:
    """Generate 12-token chunks, loading version 1 (perturbed weights) after the first chunk; each trajectory that
    ran past it carries versions 0 and 1, and each token's engine logprob equals the learner's under its version."""
    base = load_causal_lm(model_dir).eval()
    models = {0: base, 1: perturbed_copy(model_dir)}
    engine.load_weights(base.named_parameters(), version=0)
    switched = []

    def load_version_1():
        if not switched:
            engine.load_weights(models[1].named_parameters(), version=1)
            switched.append(True)

    requests = [GenRequest(tuple(p), n=2) for p in prompts]
    params = SamplingParams(temperature=1.0, max_tokens=36, seed=3)
    try:
        outputs = generate_in_chunks(engine.generate, requests, params, chunk_tokens=12, between_chunks=load_version_1)
    finally:
        engine.load_weights(base.named_parameters(), version=0)
    results = [r for group in outputs for r in group]
    batch = build_rollout_batch([p for p in prompts for _ in range(2)], results, list(range(len(results))))
    two_versions = [row for row in range(batch.batch_size) if set(results[row].versions()) == {0, 1}]
    assert two_versions, "no trajectory ran past the first chunk"
    mask = batch.response_mask > 0
    for version, model in models.items():
        with torch.no_grad():
            learner, _ = sequence_logprobs(model, batch)
        tokens = mask & (batch.token_version == version)
        assert tokens.any()
        gap = float((learner - batch.rollout_logprobs)[tokens].abs().max())
        assert gap <= tolerance, f"version {version}: max |learner - engine| logprob {gap}"
