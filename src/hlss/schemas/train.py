"""Schema of ``hlss-train``'s primary config (``conf/train.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PathsConfig:
    root: str = "outputs"
    output_dir: str = "outputs/run"


@dataclass
class CheckpointConfig:
    every_n_steps: int = 50


@dataclass
class TrainConfig:
    """Fixed keys are typed; the ``_target_`` nodes are open (checked against their targets)."""

    seed: int = 0
    resume: str | None = None
    gather: bool = True
    channels_last: Any = "auto"
    compile: Any = False
    paths: PathsConfig = field(default_factory=PathsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dataset: Any = None
    augment: Any = None
    backbone: Any = None
    text_encoder: Any = None
    attributes: Any = None
    model: Any = None
    loss: Any = None
    optimizer: Any = None
    trainer: Any = None
    callbacks: Any = None
    logger: Any = None
    loader: Any = None


def register(store) -> None:
    """Store :class:`TrainConfig` as ``train_schema``."""
    store.store(name="train_schema", node=TrainConfig)
