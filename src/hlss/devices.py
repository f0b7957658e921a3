"""Device and precision choices made once, from what the machine has."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` (or ``"auto"``) -> ``cuda`` when a CUDA GPU is present, else ``cpu``;
    anything else is passed to :class:`torch.device` as it is."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def auto_precision() -> str:
    """``bf16-mixed`` where a CUDA GPU with bfloat16 support is present, else ``32-true``."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"
