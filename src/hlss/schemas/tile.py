"""Schema of ``hlss-tile``'s primary config (``conf/tile.yaml``).

The defaults and comments users see live in the YAML file; this dataclass fixes the keys and
their types, so Hydra refuses ``patch_size=abc`` when it composes and
:func:`hlss.config.check_schema` refuses a key it does not have. ``slides`` and ``out`` are
required on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TileConfig:
    """``hlss-tile``: the slides, the output folder, how patches are cut and split."""

    slides: str = MISSING
    out: str = MISSING
    patch_size: int = 300
    mpp: float = 0.5
    magnification: float | None = None
    slide_mpp: float | None = None
    tissue_threshold: float = 0.5
    max_patches_per_slide: int = 0
    workers: int = 2
    labels: str | None = None
    split: str | None = None
    val_fraction: float = 0.25
    seed: int = 0
    backend: str = "tiffslide"
    compression: str = "lzf"
    thumbnail_size: int = 1024


def register(store: ConfigStore) -> None:
    """Store the schema as ``tile_schema``."""
    store.store(name="tile_schema", node=TileConfig)
