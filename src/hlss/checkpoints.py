"""Checkpoint files: atomic writes, safe loads, and finding the checkpoint to resume from."""

from __future__ import annotations

import glob
import os
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from hlss.atomic import atomic_file
from hlss.errors import HLSSError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the target folder and renames it into place,
    so a kill during a save never leaves a truncated checkpoint; loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = str(path)
        protocol = get_filesystem(path).protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        if "file" not in protocols:  # remote storage: no rename semantics, use Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as handle:
            torch.save(checkpoint, handle)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_checkpoint_file(str(path), map_location=map_location)


def load_checkpoint_file(path: str, map_location=None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; one clear line when it is missing or broken."""
    if not os.path.isfile(path):
        raise HLSSError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as err:  # torch.load fails in many ways on a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HLSSError(f"{path}: not a readable checkpoint ({first})") from None


def find_checkpoint(resume: str, search_root: str) -> str:
    """Resolve ``resume=PATH|auto`` to a checkpoint file.

    ``auto`` takes the most recently written ``last.ckpt`` below ``search_root``; a folder means
    its ``checkpoints/last.ckpt`` (or ``last.ckpt``); a file is used as it is.

    Raises:
        HLSSError: nothing to resume from.
    """
    if resume == "auto":
        found = glob.glob(os.path.join(search_root, "**", "last.ckpt"), recursive=True)
        if not found:
            raise HLSSError(f"resume=auto: no last.ckpt found under {search_root}")
        return max(found, key=os.path.getmtime)
    path = os.path.abspath(os.path.expanduser(resume))
    if os.path.isdir(path):
        for candidate in (
            os.path.join(path, "checkpoints", "last.ckpt"),
            os.path.join(path, "last.ckpt"),
        ):
            if os.path.isfile(candidate):
                return candidate
        raise HLSSError(f"resume={resume}: folder has no checkpoints/last.ckpt")
    if not os.path.isfile(path):
        raise HLSSError(f"resume={resume}: checkpoint not found")
    return path
