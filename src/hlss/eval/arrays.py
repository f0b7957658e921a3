"""Shape checks and chunked float32 views of embedding arrays (numpy or torch), shared by the
evaluation modules."""

from __future__ import annotations

import numpy as np
import torch


def check_2d(x, what: str) -> tuple[int, int]:
    """Shape ``(rows, dim)`` of a numpy array or tensor; ``ValueError`` unless it is 2-D."""
    shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
    if len(shape) != 2:
        raise ValueError(f"{what}: expected a 2-D array [rows, dim], got shape {shape}")
    return int(shape[0]), int(shape[1])


def rows_f32(x, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of a numpy array / tensor as a float32 CPU tensor (a copy for numpy).

    Only the requested rows are converted, so a large float16 (or memory-mapped, read-only)
    array is never copied whole.
    """
    if isinstance(x, torch.Tensor):
        return x[start:stop].detach().float().cpu()
    return torch.from_numpy(np.array(np.asarray(x)[start:stop], dtype=np.float32, copy=True))
