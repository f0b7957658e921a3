"""Checks of a training config that take seconds: run before the heavy imports and before any
MLflow run exists, so a wrong dataset root, an impossible batch or a missing resume checkpoint
ends in one line at once rather than after Lightning's start-up (and a FAILED run left behind).

Only the patch table is built (readers index metadata, no image is opened); the checks reuse the
rules that training applies later, so nothing is refused here that training would accept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hlss.data.batch import check_batch
from hlss.errors import ConfigError
from hlss.train.compiling import compile_arguments


def process_count(trainer: Mapping[str, Any]) -> int:
    """Processes the trainer config starts: ``devices`` x ``num_nodes``.

    ``devices`` is an integer, a list of device ids, a string of an integer or of ids
    (``"0,1"``), or ``auto``/``-1`` (every visible GPU when the accelerator may use one, else 1).
    Never more than Lightning starts, so a check based on it refuses nothing that trains.
    """
    devices = trainer.get("devices", "auto")
    nodes = max(1, int(trainer.get("num_nodes", 1) or 1))
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, str) and devices.strip() not in ("", "auto"):
        count = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, int) and devices > 0:
        count = devices
    elif not isinstance(devices, (str, int)) and devices is not None:  # a list of ids
        count = len(list(devices))
    else:  # auto or -1
        count = _visible_gpus() if str(trainer.get("accelerator", "auto")) != "cpu" else 1
    return max(1, count) * nodes


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train_patients(table) -> int:
    """Patients in the train split of a :class:`hlss.data.table.PatchTable`."""
    return int(table.subset("train").frame["patient"].nunique())


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint ``cfg.resume`` names (``PATH``, a run folder or ``auto``), checked readable;
    ``None`` when not resuming (also ``resume=auto`` before the first checkpoint exists).

    Raises:
        HLSSError: nothing to resume from, or the file is not a readable checkpoint.
    """
    from hlss.checkpoints import find_checkpoint, load_checkpoint_file, resume_requested

    if not resume_requested(cfg.get("resume"), str(cfg.paths.root)):
        return None
    path = find_checkpoint(str(cfg.resume), str(cfg.paths.root))
    load_checkpoint_file(path, mmap=True)  # maps the tensors: cheap for a large checkpoint
    return path


def build_table(cfg: DictConfig):
    """The patch table of ``cfg.dataset.table``, its node first held against the reader's
    signature (only that node: the others' targets import Lightning and friends).

    Raises:
        HLSSError: an unknown key of the table node, a required value not set (``dataset.root``),
            a missing dataset root or metadata file.
    """
    from hlss.config import build, check_targets, config_message

    view = OmegaConf.masked_copy(cfg, "dataset")
    view.dataset = OmegaConf.masked_copy(view.dataset, "table")
    check_targets(view)
    try:  # resolved here, a missing value is named as the user sets it (dataset.root=...)
        OmegaConf.to_container(cfg.dataset.table, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(config_message(err)) from None
    return build(cfg.dataset.table)


def preflight(cfg: DictConfig) -> str | None:
    """Check ``cfg`` in seconds, in the order the answers come: the dataset (its patch table
    builds), the batch (``cfg.loader.patients`` per process fits the train split), the resume
    checkpoint (found and readable).

    Returns:
        The checkpoint to resume from, or ``None``.

    Raises:
        HLSSError: the first problem found, as one line (a ``compile`` setting torch refuses, a
            missing dataset root, metadata that does not read, a batch the train split cannot
            fill, no checkpoint to resume from).
    """
    setting = cfg.get("compile", False)
    compile_arguments(OmegaConf.to_container(setting) if OmegaConf.is_config(setting) else setting)
    table = build_table(cfg)
    loader = cfg.loader
    check_batch(
        train_patients(table),
        int(loader.patients),
        drop_last=bool(loader.get("drop_last", True)),
        processes=process_count(cfg.trainer),
        name=str(table.name),
    )
    return resume_checkpoint(cfg)
