"""Optimizer and learning-rate schedule shared by learner backends."""

from __future__ import annotations

import math

import torch


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
