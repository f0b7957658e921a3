"""Small pyramidal slides written with tifffile for the ``hlss-tile`` tests.

A slide is a white-grey glass background with noise and one rectangle of pink-purple "tissue"
(level-0 pixels ``TISSUE = (x0, y0, x1, y1)``), stored as an Aperio-style SVS (levels as
further pages, ``MPP`` and ``AppMag`` in the description) or as a generic pyramidal TIFF (levels
as SubIFDs, resolution tags in pixels per centimetre), deflate-compressed (lossless, so tests can
compare patches with the pixels written).
"""

from __future__ import annotations

import os

import numpy as np

SIZE = (768, 1024)  # level-0 (height, width)
TISSUE = (256, 128, 768, 640)  # level-0 (x0, y0, x1, y1)
TISSUE_RGB = (190, 90, 160)
GLASS_RGB = (242, 242, 242)


def slide_levels(
    seed: int = 0,
    size: tuple[int, int] = SIZE,
    tissue: tuple[int, int, int, int] | None = TISSUE,
    downsamples: tuple[int, ...] = (1, 2, 4),
    pen: tuple[int, int, int, int] | None = None,
) -> list[np.ndarray]:
    """The levels (uint8 RGB ``[H, W, 3]``, level 0 first) of a slide; each level is the
    block mean of level 0. ``pen``: a green ink rectangle on the glass."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = np.empty((height, width, 3), dtype=np.int16)
    image[:] = GLASS_RGB
    image += rng.integers(-6, 7, size=(height, width, 1), dtype=np.int16)
    if tissue is not None:
        x0, y0, x1, y1 = tissue
        texture = rng.integers(-30, 31, size=(y1 - y0, x1 - x0, 3), dtype=np.int16)
        image[y0:y1, x0:x1] = np.asarray(TISSUE_RGB, dtype=np.int16) + texture
    if pen is not None:
        x0, y0, x1, y1 = pen
        image[y0:y1, x0:x1] = (40, 150, 70)
    base = np.clip(image, 0, 255).astype(np.uint8)
    levels = []
    for ds in downsamples:
        h, w = height // ds, width // ds
        block = base[: h * ds, : w * ds].reshape(h, ds, w, ds, 3).mean(axis=(1, 3))
        levels.append(np.round(block).astype(np.uint8))
    return levels


def write_svs(
    path: str | os.PathLike,
    levels: list[np.ndarray],
    mpp: float | None = 0.25,
    power: int | None = 40,
) -> str:
    """An Aperio-style SVS: level 0, a stripped thumbnail page, then the other levels (tiled).
    ``mpp``/``power`` None leave ``MPP``/``AppMag`` out of the description."""
    import tifffile

    height, width = levels[0].shape[:2]
    fields = [f"{width}x{height} (128x128) deflate"]
    if power is not None:
        fields.append(f"AppMag = {power}")
    if mpp is not None:
        fields.append(f"MPP = {mpp}")
    desc = "Aperio Image Library v12.0.0 \r\n" + "|".join(fields)
    options = {"photometric": "rgb", "compression": "zlib", "metadata": None}
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(levels[0], tile=(128, 128), description=desc, **options)
        tiff.write(
            levels[-1][::2, ::2], description="Aperio Image Library v12.0.0 \r\nthumb", **options
        )
        for level in levels[1:]:
            tiff.write(
                level, tile=(128, 128), description="Aperio Image Library v12.0.0 \r\n", **options
            )
    return str(path)


def write_generic(path: str | os.PathLike, levels: list[np.ndarray], mpp: float = 0.25) -> str:
    """A generic pyramidal TIFF: level 0 with the others as SubIFDs, resolution in px/cm."""
    import tifffile

    options = {"photometric": "rgb", "compression": "zlib", "tile": (128, 128)}
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(
            levels[0],
            subifds=len(levels) - 1,
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
            **options,
        )
        for level in levels[1:]:
            tiff.write(level, subfiletype=1, **options)
    return str(path)


def truncate(path: str | os.PathLike, keep: float = 0.5) -> str:
    """Cut the file at ``path`` to ``keep`` of its length (a download that stopped)."""
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: int(len(data) * keep)])
    return str(path)
