"""Optimizer and learning-rate schedule shared by learner backends."""

from __future__ import annotations

import math

import torch

from rltrain.config import ConfigError


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """LR factor at optimizer ``step`` (0-based): linear warm-up, then constant / cosine / linear decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr schedule {schedule!r}; known: constant, cosine, linear")


def build_optimizer(
    params, lr: float, betas: tuple[float, float], weight_decay: float, eps: float = 1e-8
) -> torch.optim.Optimizer:
    """AdamW (torch implementation: no JIT-built fused kernel needed on CPU)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, foreach=False)


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, schedule: str):
    lr_multiplier(0, warmup_steps, total_steps, schedule)  # fail fast on an unknown schedule
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, schedule)
    )


def clip_max_norm(grad_clip: float | None) -> float:
    """``learner.grad_clip`` as the max global gradient norm, on every backend: 0.0 means no clipping.

    None and 0 both mean "no clipping" (DeepSpeed's ``gradient_clipping: 0`` convention); a negative or
    non-finite bound raises ConfigError.
    """
    if grad_clip is None:
        return 0.0
    if not math.isfinite(grad_clip) or grad_clip < 0:
        raise ConfigError(f"learner.grad_clip={grad_clip}: a max gradient norm > 0, or 0 / null for no clipping")
    return float(grad_clip)


def update_is_finite(loss: float, grad_norm: float) -> bool:
    """Whether an optimizer step may be applied: a non-finite loss or global gradient norm skips it.

    A skipped step changes nothing (weights, optimizer state, LR schedule); the learners count it in
    ``loss/nonfinite_skipped``.
    """
    return math.isfinite(loss) and math.isfinite(grad_norm)
