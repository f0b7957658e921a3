"""AdamW with a per-step schedule: linear warm-up, then cosine decay (the paper's schedule)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from hlss.errors import ConfigError


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0
) -> float:
    """Learning-rate multiplier at ``step`` (0-based).

    Rises linearly from ``1/warmup_steps`` to 1 over the warm-up, then follows half a cosine from 1
    down to ``min_ratio`` at ``total_steps``; stays at ``min_ratio`` afterwards.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_warmup_cosine(
    params: Iterable[torch.nn.Parameter],
    total_steps: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_fraction: float = 0.1,
    min_lr_ratio: float = 0.0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Build AdamW and its per-step warm-up + cosine scheduler.

    Args:
        total_steps: optimiser steps of the whole run (the schedule's length).
        warmup_fraction: share of ``total_steps`` spent warming up, in ``[0, 1)``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.

    Raises:
        ConfigError: non-positive ``lr`` or ``total_steps``, or fractions outside their range.
    """
    if lr <= 0:
        raise ConfigError(f"optimizer.lr must be > 0, got {lr}")
    if total_steps < 1:
        raise ConfigError(
            f"the schedule needs total_steps >= 1, got {total_steps} (set trainer.max_steps)"
        )
    if not 0.0 <= warmup_fraction < 1.0:
        raise ConfigError(f"optimizer.warmup_fraction must be in [0, 1), got {warmup_fraction}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"optimizer.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    warmup = round(warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup, min_lr_ratio)
    )
    return optimizer, scheduler
