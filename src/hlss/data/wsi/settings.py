"""How ``hlss-tile`` cuts slides: the settings and their defaults, in one place.

:class:`TileSettings` is what :func:`hlss.data.wsi.tiler.tile_slide` receives; its field
defaults, :data:`WORKERS` and :data:`VAL_FRACTION` are the defaults of ``hlss-tile`` (the
schema :class:`hlss.schemas.tile.TileConfig` reads them; ``conf/tile.yaml`` repeats them for
``--help`` and a test keeps it equal). Only the standard library is imported, so the command
reads these defaults at start-up without loading NumPy or a slide reader.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["VAL_FRACTION", "WORKERS", "TileSettings"]

WORKERS = 2
"""Processes tiling slides at once by default (``workers``; 0: in the calling process)."""
VAL_FRACTION = 0.25
"""Share of each label's patients put in val when no split file is given (``val_fraction``)."""


@dataclass(frozen=True)
class TileSettings:
    """How slides are cut (the keys of ``hlss-tile`` that change the patches).

    ``compression`` is an HDF5 filter name (``"lzf"``, ``"gzip"``) or ``None`` for none; the
    command spells ``None`` as ``compression=none``.
    """

    patch_size: int = 300
    mpp: float = 0.5
    magnification: float | None = None
    slide_mpp: float | None = None
    tissue_threshold: float = 0.5
    max_patches_per_slide: int = 0
    seed: int = 0
    backend: str = "tiffslide"
    compression: str | None = "lzf"
    thumbnail_size: int = 1024

    def identity(self) -> dict:
        """The settings a finished slide file must share with a rerun to be reused."""
        keys = (
            "patch_size",
            "mpp",
            "magnification",
            "slide_mpp",
            "tissue_threshold",
            "max_patches_per_slide",
            "seed",
        )
        values = asdict(self)
        return {k: values[k] for k in keys if k != "mpp" or self.magnification is None}
