"""Checkpoint files: atomic writes, safe loads, and finding the checkpoint to resume from."""

from __future__ import annotations

import glob
import os
from typing import Any

from hlss.atomic import atomic_file
from hlss.errors import HLSSError


def _atomic_checkpoint_io() -> type:
    """Build :class:`AtomicCheckpointIO` on first use, so reading and finding checkpoints (the
    pre-flight checks of ``hlss-train``) never import Lightning."""
    import torch
    from lightning.fabric.utilities.cloud_io import get_filesystem
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Writes each checkpoint to a temporary file in the target folder and renames it into
        place, so a kill during a save never leaves a truncated checkpoint; loads with
        ``weights_only=True``."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
            path = str(path)
            protocol = get_filesystem(path).protocol
            protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
            if "file" not in protocols:  # remote storage: no rename semantics, Lightning's writer
                return super().save_checkpoint(checkpoint, path, storage_options)
            with atomic_file(path) as handle:
                torch.save(checkpoint, handle)

        def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
            return load_checkpoint_file(str(path), map_location=map_location)

    AtomicCheckpointIO.__module__ = __name__
    return AtomicCheckpointIO


def __getattr__(name: str) -> Any:
    if name == "AtomicCheckpointIO":
        cls = _atomic_checkpoint_io()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_checkpoint_file(path: str, map_location=None, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; one clear line when it is missing or broken.

    ``mmap=True`` maps the tensors from the file instead of reading them (cheap, for reading a
    checkpoint's step and metadata); a file in torch's legacy format is then read normally.
    """
    import torch

    if not os.path.isfile(path):
        raise HLSSError(f"{path}: checkpoint not found")
    try:
        try:
            return torch.load(
                path, map_location=map_location or "cpu", weights_only=True, mmap=mmap
            )
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as err:  # torch.load fails in many ways on a damaged file
        raise HLSSError(f"{path}: not a readable checkpoint ({_load_failure(err)})") from None


def _load_failure(err: Exception) -> str:
    """The reason in one line. torch's safe loader opens its message with advice to load with
    ``weights_only=False`` (which runs any code the file holds): its own error is kept instead."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if not lines[0].startswith("Weights only load failed"):
        return lines[0]
    reason = "it holds more than tensors and plain values, or is not a torch file"
    after = str(err).strip().partition("\n")[2].rpartition("WeightsUnpickler error:")[2]
    details = [line.strip() for line in after.splitlines() if line.strip()]
    detail = next((d for d in details if not d.startswith("Check the documentation")), "")
    return f"{reason}: {detail}" if detail else reason


def resume_requested(resume: str | None, search_root: str) -> bool:
    """Whether ``resume`` asks to continue a checkpoint. ``resume=auto`` with no ``last.ckpt``
    below ``search_root`` yet is a first start (a SLURM job that is later requeued runs the same
    command): it starts a new run and says so in the log."""
    if not resume:
        return False
    if str(resume) == "auto" and not glob.glob(
        os.path.join(search_root, "**", "last.ckpt"), recursive=True
    ):
        import logging

        logging.getLogger("hlss").info(
            "resume=auto: no last.ckpt under %s yet; starting a new run", search_root
        )
        return False
    return True


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
