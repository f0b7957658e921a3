"""AdamW with a per-step schedule: linear warm-up, then cosine decay (the papers' schedule),
built from torch's own schedulers (``SequentialLR`` of ``LinearLR`` and ``CosineAnnealingLR``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from hlss.errors import ConfigError


def adamw_warmup_cosine(
    params: Iterable[torch.nn.Parameter],
    total_steps: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_fraction: float = 0.1,
    min_lr_ratio: float = 0.0,
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """Build AdamW and its per-step warm-up + cosine scheduler.

    With ``W = round(warmup_fraction * total_steps)`` warm-up steps, the learning rate at step
    ``t`` (0-based) is ``lr * (t + 1) / W`` for ``t < W``, then
    ``lr * (m + (1 - m) * (1 + cos(pi * (t - W) / (total_steps - W))) / 2)`` with
    ``m = min_lr_ratio``, reaching ``m * lr`` at ``total_steps``.

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
    cosine = CosineAnnealingLR(
        optimizer, T_max=max(1, total_steps - warmup), eta_min=min_lr_ratio * lr
    )
    if warmup == 0:
        return optimizer, cosine
    ramp = LinearLR(
        optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1)
    )
    return optimizer, SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
