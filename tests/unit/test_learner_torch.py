"""Torch learner update rules: ``grad_clip`` 0/None means no clipping, a non-finite step is skipped and counted."""

import math

import pytest
import torch
from signed_batches import signed_batch

from rltrain import algo
from rltrain.config import ConfigError
from rltrain.learner.optim import clip_max_norm, update_is_finite
from rltrain.learner.torch_learner import TorchLearner


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    """4 rows of uneven response lengths with advantages +-1 and rollout logprobs as old logprobs."""
    return signed_batch(tiny_model_dir, [f"{10 + i}+{i}=" for i in range(4)], [1 + i for i in range(4)])


def _weights(learner: TorchLearner) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in learner.model.named_parameters()}


def _nan_loss(logprobs, entropy, micro, norm):
    return logprobs.sum() * float("nan"), {}


_nan_loss.needs_entropy = False


def test_clip_max_norm_maps_none_and_zero_to_no_clipping_and_rejects_negative():
    assert clip_max_norm(None) == 0.0
    assert clip_max_norm(0) == 0.0
    assert clip_max_norm(2) == 2.0
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="learner.grad_clip="):
            clip_max_norm(bad)


def test_update_is_finite_needs_a_finite_loss_and_grad_norm():
    assert update_is_finite(0.5, 3.0)
    assert not update_is_finite(math.nan, 3.0)
    assert not update_is_finite(0.5, math.inf)


@pytest.mark.parametrize("grad_clip", [0.0, None])
def test_grad_clip_zero_or_none_does_not_clip(tiny_model_dir, batch, grad_clip):
    """Clipping to norm 0 would zero every gradient; 0 / None must apply the full update instead."""
    learner = TorchLearner(tiny_model_dir, lr=1e3, grad_clip=grad_clip, micro_batch_size=2, seed=0)
    before = _weights(learner)
    metrics = learner.train_step(batch, algo.make_loss_fn())
    moved = max(float((before[name] - param.detach()).abs().max()) for name, param in learner.model.named_parameters())
    assert moved > 1.0  # AdamW's first step moves each weight with a gradient by ~lr
    assert metrics["perf/grad_norm"] > 0 and metrics["loss/nonfinite_skipped"] == 0.0


def test_grad_clip_bounds_the_applied_gradient_and_reports_the_norm_before_clipping(tiny_model_dir, batch):
    norms = {}
    for grad_clip in (0.0, 1e-3):
        learner = TorchLearner(tiny_model_dir, lr=1e-3, grad_clip=grad_clip, micro_batch_size=2, seed=0)
        step = learner.optimizer.step

        def capture(*args, _step=step, _learner=learner, _clip=grad_clip, **kwargs):
            grads = [p.grad for p in _learner.model.parameters() if p.grad is not None]
            norms[_clip] = float(torch.nn.utils.get_total_norm(grads))
            return _step(*args, **kwargs)

        learner.optimizer.step = capture
        reported = learner.train_step(batch, algo.make_loss_fn())["perf/grad_norm"]
        assert reported == pytest.approx(norms[0.0], rel=1e-6)
    assert norms[0.0] > 1e-2 and norms[1e-3] == pytest.approx(1e-3, rel=1e-4)


def test_a_nan_loss_skips_the_step_and_leaves_everything_as_it_was(tiny_model_dir, batch):
    learner = TorchLearner(tiny_model_dir, lr=1e-2, warmup_steps=3, total_steps=10, micro_batch_size=2, seed=0)
    before = _weights(learner)
    metrics = learner.train_step(batch, _nan_loss)
    assert metrics["loss/nonfinite_skipped"] == 1.0
    assert all(torch.equal(before[name], param) for name, param in learner.model.named_parameters())
    assert learner.optimizer_steps == 0 and learner.scheduler.last_epoch == 0 and not learner.optimizer.state
    assert all(param.grad is None for param in learner.model.parameters())
    # the next finite step is the step the skipped one would have been: warm-up lr of step 0
    finite = learner.train_step(batch, algo.make_loss_fn())
    assert finite["loss/nonfinite_skipped"] == 0.0 and finite["perf/lr"] == pytest.approx(1e-2 / 3)
    assert learner.optimizer_steps == 1


def test_inf_advantages_skip_the_step_and_keep_weights_finite(tiny_model_dir, batch):
    learner = TorchLearner(tiny_model_dir, lr=1e-2, micro_batch_size=2, seed=0)
    before = _weights(learner)
    metrics = learner.train_step(batch.replace(advantages=batch.advantages * math.inf), algo.make_loss_fn())
    assert metrics["loss/nonfinite_skipped"] == 1.0 and not math.isfinite(metrics["perf/grad_norm"])
    assert all(torch.equal(before[name], param) for name, param in learner.model.named_parameters())
