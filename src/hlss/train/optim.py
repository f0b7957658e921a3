"""AdamW with a per-step schedule: linear warm-up, then cosine decay (the papers' schedule).

The schedule is torch's ``LambdaLR`` over :func:`warmup_cosine_factor`, a plain function of the
step and the run's length. torch's ``SequentialLR(LinearLR, CosineAnnealingLR)`` computes the same
rates, but its state (``T_max``, milestones) is saved in checkpoints and restored on resume, so a
run extended with a larger ``trainer.max_steps`` would keep the old length and its cosine would
end and rise again; ``LambdaLR`` saves only the step, and the resumed run follows the schedule of
its new length (tested).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from hlss.errors import ConfigError


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0
) -> float:
    """Learning-rate multiplier at ``step`` (0-based): ``(step + 1) / warmup_steps`` during the
    warm-up, then ``min_ratio + (1 - min_ratio) * (1 + cos(pi * t)) / 2`` with
    ``t = (step - warmup_steps) / (total_steps - warmup_steps)`` (held at 1 after the end)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_warmup_cosine(
    params: Iterable[torch.nn.Parameter],
    total_steps: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_fraction: float = 0.1,
    min_lr_ratio: float = 0.0,
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """Build AdamW and its per-step warm-up + cosine scheduler.

    With ``W = round(warmup_fraction * total_steps)`` warm-up steps the learning rate at step
    ``t`` is ``lr * warmup_cosine_factor(t, total_steps, W, min_lr_ratio)``, reaching
    ``min_lr_ratio * lr`` at ``total_steps``.

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
    factor = functools.partial(
        warmup_cosine_factor,
        total_steps=total_steps,
        warmup_steps=round(warmup_fraction * total_steps),
        min_ratio=min_lr_ratio,
    )
    return optimizer, LambdaLR(optimizer, factor)
