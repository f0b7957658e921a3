"""Schema of ``hlss-eval``'s primary config (``conf/eval.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING


@dataclass
class KNNConfig:
    k: int = 200
    temperature: float = 0.07
    backend: str = "auto"


@dataclass
class BootstrapConfig:
    n: int = 2000
    level: float = 0.95


@dataclass
class EmbedConfig:
    batch_size: int = 64
    num_workers: int = 2
    device: str | None = None
    cache_dir: str | None = None


@dataclass
class ZeroShotConfig:
    enabled: bool = True
    prompts: str = "auto"
    temperature: float = 0.01


class Readout(Enum):
    """``explain.readout``: how attribute scores are read out (:mod:`hlss.eval.explain`); Hydra
    refuses any other value when it composes, naming the key."""

    raw = "raw"
    centered = "centered"
    zscore = "zscore"


@dataclass
class ExplainConfig:
    enabled: bool = True
    k: int = 5
    patches: int | None = 200
    readout: Readout = Readout.centered


@dataclass
class ProbeConfig:
    enabled: bool = True
    weight_decay: float = 1.0e-4
    max_iter: int = 200


@dataclass
class MLflowConfig:
    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "hlss-eval"


@dataclass
class EvalConfig:
    ckpt: str = MISSING
    out: str | None = None
    untrained: bool = False
    features: str = "backbone"
    seed: int = 0
    aggregate: str = "softmax_sum"
    knn: KNNConfig = field(default_factory=KNNConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    dataset: Any = None


def register(store) -> None:
    """Store :class:`EvalConfig` as ``eval_schema``."""
    store.store(name="eval_schema", node=EvalConfig)
