"""Which pyramid level to read a patch from, and the grid of patches over a slide.

A patch of ``patch_size`` pixels at ``mpp`` microns per pixel covers ``patch_size * mpp``
microns. It is read from the coarsest level that is at least as fine as the target (so a patch
is shrunk, never enlarged, unless the target is finer than level 0), as a square of
``read_size`` pixels of that level, and resized to ``patch_size`` unless the level already has
the target resolution within :data:`MPP_TOLERANCE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MPP_TOLERANCE = 0.02
"""Relative difference of resolutions taken as equal (a 40x Aperio level 0 of 0.2520 um/px
halved is 0.504 um/px: taken as 0.5 without resampling)."""

MICRONS_AT_1X = 10.0
"""Microns per pixel at magnification 1 by the usual convention (20x ~ 0.5 um/px), used for
``magnification`` when the slide does not record its objective power."""


@dataclass(frozen=True)
class Resolution:
    """What a patch pixel is: ``factor`` level-0 pixels per patch pixel, ``mpp`` microns per
    patch pixel (None when the slide's resolution is unknown, as allowed for
    ``magnification`` with the slide's objective power)."""

    factor: float
    mpp: float | None


def target_resolution(
    base_mpp: float | None,
    objective_power: float | None,
    mpp: float | None,
    magnification: float | None,
) -> Resolution | str:
    """The patch resolution asked for, in level-0 pixels.

    Args:
        base_mpp: the slide's level-0 microns per pixel (metadata or override), or None.
        objective_power: the scanner objective's magnification, or None.
        mpp: target microns per pixel (used when ``magnification`` is None).
        magnification: target magnification; with the slide's objective power the factor is
            ``objective_power / magnification``, else ``mpp = 10 / magnification``.

    Returns:
        The :class:`Resolution`, or a one-line reason why it cannot be known (no mpp).
    """
    if magnification is not None:
        if objective_power is not None:
            factor = objective_power / magnification
            return Resolution(factor, None if base_mpp is None else base_mpp * factor)
        mpp = MICRONS_AT_1X / magnification
        if base_mpp is None:
            return (
                "no microns-per-pixel nor objective power in the slide's metadata; "
                "set slide_mpp=<level-0 um/px>"
            )
        return Resolution(mpp / base_mpp, mpp)
    if base_mpp is None:
        return "no microns-per-pixel in the slide's metadata; set slide_mpp=<level-0 um/px>"
    return Resolution(float(mpp) / base_mpp, float(mpp))


@dataclass(frozen=True)
class LevelChoice:
    """How patches are read: ``read_size`` pixels square from ``level`` (``downsample`` level-0
    pixels per level pixel), resized to ``patch_size`` when ``resample``; ``mpp`` is the
    patches' microns per pixel (None when unknown)."""

    level: int
    downsample: float
    read_size: int
    patch_size: int
    mpp: float | None

    @property
    def resample(self) -> bool:
        return self.read_size != self.patch_size

    @property
    def footprint(self) -> float:
        """Level-0 pixels covered by one patch side."""
        return self.read_size * self.downsample


def choose_level(
    level_downsamples: Sequence[float],
    resolution: Resolution,
    patch_size: int,
    base_mpp: float | None,
    tolerance: float = MPP_TOLERANCE,
) -> LevelChoice:
    """The level and read size for patches of ``patch_size`` pixels at ``resolution``.

    The level is the coarsest whose downsample is at most ``factor * (1 + tolerance)``
    (level 0 when the target is finer than level 0); a level within ``tolerance`` of the target
    is read as is, otherwise ``round(patch_size * factor / downsample)`` pixels are read and
    resized.
    """
    factor = resolution.factor
    level = 0
    for index, downsample in enumerate(level_downsamples):
        if downsample <= factor * (1 + tolerance) and downsample >= level_downsamples[level]:
            level = index
    downsample = float(level_downsamples[level])
    ratio = factor / downsample
    if abs(ratio - 1) <= tolerance:
        ratio = 1.0
    read_size = max(1, round(patch_size * ratio))
    mpp = None if base_mpp is None else base_mpp * downsample * read_size / patch_size
    if mpp is None and resolution.mpp is not None:
        mpp = resolution.mpp
    return LevelChoice(level, downsample, read_size, patch_size, mpp)


def grid_positions(level_size: tuple[int, int], read_size: int) -> np.ndarray:
    """Top-left corners ``[n, 2]`` (x, y; level pixels) of the whole patches of a level, in
    row-major order (y, then x); patches do not overlap and none crosses the level's edge."""
    width, height = level_size
    cols, rows = width // read_size, height // read_size
    ys, xs = np.mgrid[0:rows, 0:cols]
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64) * read_size


def tissue_fractions(
    mask: np.ndarray, mask_downsample: float, corners0: np.ndarray, footprint: float
) -> np.ndarray:
    """Share of tissue pixels of ``mask`` under each patch.

    Args:
        mask: bool ``[h, w]``, one pixel per ``mask_downsample`` level-0 pixels.
        corners0: patch top-left corners ``[n, 2]`` (x, y) in level-0 pixels.
        footprint: level-0 pixels per patch side.

    Returns:
        float ``[n]`` in [0, 1]; a patch covering no mask pixel (past the mask's edge) gets 0.
    """
    height, width = mask.shape
    table = np.zeros((height + 1, width + 1), dtype=np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    x0 = np.clip(np.round(corners0[:, 0] / mask_downsample).astype(np.int64), 0, width)
    y0 = np.clip(np.round(corners0[:, 1] / mask_downsample).astype(np.int64), 0, height)
    side = footprint / mask_downsample
    x1 = np.clip(np.round(corners0[:, 0] / mask_downsample + side).astype(np.int64), 0, width)
    y1 = np.clip(np.round(corners0[:, 1] / mask_downsample + side).astype(np.int64), 0, height)
    x1, y1 = np.maximum(x1, np.minimum(x0 + 1, width)), np.maximum(y1, np.minimum(y0 + 1, height))
    area = (x1 - x0) * (y1 - y0)
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return np.where(area > 0, inside / np.maximum(area, 1), 0.0)
