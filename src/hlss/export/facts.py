"""What an export says about the model besides its weights: the input transform of the
modality, the training data, loss and batch, and the exporting hlss (version, git commit)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hlss.errors import HLSSError
from hlss.export.weights import backbone_node


def input_transform(cfg: DictConfig) -> dict:
    """The modality's input transform of a run config (what the backbone was fed)."""
    from hlss.data.transforms import HE_SCALE, SRH_OFFSET, SRH_SCALE

    dataset = cfg.get("dataset") or {}
    modality = str(dataset.get("modality", "srh"))
    size = OmegaConf.select(cfg, "dataset.transform.size", default=None)
    common = {
        "modality": modality,
        "channels": 3,
        "range": [0.0, 1.0],
        "normalization": None,
        "center_crop": size,
        "note": "no mean/std normalisation: do not apply ImageNet or CLIP statistics",
    }
    if modality == "he":
        return {**common, "raw": "uint8 RGB (3, H, W)", "transform": f"image = raw / {HE_SCALE:g}"}
    scale, offset = f"{SRH_SCALE:g}", f"{SRH_OFFSET * SRH_SCALE:g} / {SRH_SCALE:g}"
    return {
        **common,
        "raw": "uint16 (2, H, W): channel 0 = CH2 (2845 cm^-1), channel 1 = CH3 (2930 cm^-1)",
        "transform": (
            f"ch2, ch3 = raw[0] / {scale}, raw[1] / {scale}; "
            f"image = clamp(stack([ch3 - ch2 + {offset}, ch2, ch3]), 0, 1)"
        ),
    }


def training_data(cfg: DictConfig, count: bool) -> dict:
    """Name, modality and location of the run's dataset, with per-split counts when ``count``
    (the table is read from the dataset's metadata; a failure is noted, not raised)."""
    from hlss.config import build

    dataset = cfg.get("dataset") or {}
    info: dict[str, Any] = {
        "name": dataset.get("name"),
        "modality": dataset.get("modality"),
        "location": dataset.get("root") or dataset.get("path"),
    }
    if count and isinstance(dataset.get("table"), DictConfig):
        try:
            info["splits"] = build(dataset.table).summary()
        except HLSSError as err:
            info["not_counted"] = str(err).splitlines()[0]
    return info


def training_summary(cfg: DictConfig, info: Mapping) -> dict:
    """Loss, hierarchy batch, step and run ids of a checkpoint for ``export.json``."""
    loss = cfg.get("loss") or {}
    loader = cfg.get("loader") or {}
    batch = {key: loader.get(key) for key in ("patients", "slides", "patches", "views")}
    backbone = backbone_node(cfg)
    return {
        "checkpoint": info["checkpoint"],
        "step": info["step"],
        "epoch": info["epoch"],
        "max_steps": OmegaConf.select(cfg, "trainer.max_steps", default=None),
        "loss": loss.get("name"),
        "loss_weights": _plain(loss.get("weights")),
        "align_weights": _plain(loss.get("align_weights")),
        "batch": batch,
        "backbone": backbone.get("name"),
        "backbone_init": _plain(backbone.get("pretrained")),
        "seed": cfg.get("seed"),
        "mlflow_run_id": info.get("mlflow_run_id"),
    }


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
