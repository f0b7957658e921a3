"""Schema of ``hlss-tile``'s primary config (``conf/tile.yaml``).

This dataclass fixes the keys and their types, so Hydra refuses ``patch_size=abc`` when it
composes and :func:`hlss.config.check_schema` refuses a key it does not have. Its defaults are
read from :mod:`hlss.data.wsi.settings` (their single source); the YAML file repeats them with
the comments users see in ``--help``, and a test holds the two equal. ``slides`` and ``out`` are
required on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from hlss.data.wsi.settings import VAL_FRACTION, WORKERS, TileSettings

_CUT = TileSettings()
"""The default cutting settings."""


@dataclass
class TileConfig:
    """``hlss-tile``: the slides, the output folder, how patches are cut and split."""

    slides: str = MISSING
    out: str = MISSING
    patch_size: int = _CUT.patch_size
    mpp: float = _CUT.mpp
    magnification: float | None = _CUT.magnification
    slide_mpp: float | None = _CUT.slide_mpp
    tissue_threshold: float = _CUT.tissue_threshold
    max_patches_per_slide: int = _CUT.max_patches_per_slide
    workers: int = WORKERS
    labels: str | None = None
    split: str | None = None
    val_fraction: float = VAL_FRACTION
    seed: int = _CUT.seed
    backend: str = _CUT.backend
    compression: str = _CUT.compression or "none"
    thumbnail_size: int = _CUT.thumbnail_size


def register(store: ConfigStore) -> None:
    """Store the schema as ``tile_schema``."""
    store.store(name="tile_schema", node=TileConfig)
