"""Wiring: a composed config -> data module, model, objective, trainer pieces.

This is the one place that reads config keys; the library classes it calls take plain arguments.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from hlss.config import build
from hlss.errors import ConfigError

LEVELS = ("patch", "slide", "patient")
LOSS_HEADS = ("mlp", "text")


def build_datamodule(cfg: DictConfig):
    """The training data module; the patch table is indexed lazily in ``setup``."""
    table_cfg = cfg.dataset.table

    def make_table():
        return build(table_cfg)

    return build(
        cfg.data,
        table=make_table,
        transform=build(cfg.dataset.transform),
        augment=build(cfg.augment),
        _convert_="object",
    )


def attribute_banks(cfg: DictConfig) -> dict:
    """``{level: AttributeBank}`` named by ``cfg.attributes`` (packaged names or YAML paths)."""
    from hlss.models.attributes import load_banks

    size = cfg.attributes.get("size")
    return load_banks({lv: str(cfg.attributes[lv]) for lv in LEVELS}, {lv: size for lv in LEVELS})


def build_model(cfg: DictConfig):
    """Backbone + (projection and text-initialised heads | the HiDisc MLP head), as the loss asks.

    Returns the model and the attribute banks it was built from (``None`` for the MLP head).
    """
    from hlss.models.dual_encoder import build_dual_encoder

    head = cfg.loss.head
    if head not in LOSS_HEADS:
        raise ConfigError(f"loss.head must be one of {LOSS_HEADS}, got {head!r}")
    backbone = build(cfg.backbone)
    if head == "mlp":
        return build_dual_encoder(backbone, head="mlp", mlp_dim=cfg.model.mlp_dim), None
    size = cfg.attributes.get("size")
    model = build_dual_encoder(
        backbone,
        build(cfg.text_encoder),
        banks={lv: str(cfg.attributes[lv]) for lv in LEVELS},
        bank_sizes={lv: size for lv in LEVELS},
        cache_dir=cfg.attributes.get("cache_dir"),
        head=head,
        projection=cfg.model.projection,
        mlp_dim=cfg.model.mlp_dim,
        center_text=bool(cfg.model.get("center_text", False)),
    )
    return model, attribute_banks(cfg)


def _weights(node: Mapping | None, what: str) -> dict[str, float]:
    values = {level: 1.0 for level in LEVELS}
    if node is None:
        return values
    for key, value in dict(node).items():
        if key not in LEVELS:
            raise ConfigError(f"{what}: unknown level {key!r}; levels are {', '.join(LEVELS)}")
        values[key] = float(value)
    return values


def build_objective(cfg: DictConfig):
    """The multi-level objective of ``cfg.loss`` (HVC + optional language tie)."""
    from hlss.losses import HierarchicalVisualContrast, HLSSObjective

    loss = cfg.loss
    hvc = HierarchicalVisualContrast(
        temperature=float(loss.temperature),
        base_temperature=float(loss.base_temperature),
        weights=_weights(loss.get("weights"), "loss.weights"),
    )
    align = None
    if loss.get("align") is not None:
        align = build(loss.align)
    return HLSSObjective(
        hvc, align=align, align_weights=_weights(loss.get("align_weights"), "loss.align_weights")
    )


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config flattened to ``a.b.c -> value`` (what MLflow shows as params)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, str] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(node)[:500]

    walk("", container)
    return out
