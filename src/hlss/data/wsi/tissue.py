"""Tissue on a low-resolution image of a slide: Otsu's threshold on saturation, pen ink removed.

Stained tissue is coloured, glass is grey-white: a pixel is tissue when its HSV saturation is
above Otsu's threshold of the image's saturation histogram (and at least
:data:`MIN_SATURATION`, so a blank slide, whose histogram is all noise, has no tissue) and it
is not nearly white. Pen marks are dropped as far as simple colour rules allow: H&E has more red
than green, while blue, green and black ink do not (``green > red``, or all channels dark).
Specks of a pixel or two are removed by a morphological opening.
"""

from __future__ import annotations

import numpy as np

MIN_SATURATION = 0.08
"""Lowest saturation threshold: glass with noise stays below it; pale stained tissue is above."""
MAX_BRIGHTNESS = 235
"""Pixels whose darkest channel is above this are background whatever their saturation."""
DARK_INK = 40
"""Pixels whose brightest channel is below this are taken as black ink or dirt."""


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of a uint8 RGB image ``[H, W, 3]``, float32 in [0, 1]."""
    high = rgb.max(axis=-1).astype(np.float32)
    low = rgb.min(axis=-1).astype(np.float32)
    return np.where(high > 0, (high - low) / np.maximum(high, 1), 0).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1]: the cut maximising the between-class variance
    of the histogram (0.0 for an empty or constant input)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 0.0
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(counts)
    weight1 = weight0[-1] - weight0
    mass0 = np.cumsum(counts * centres)
    mean0 = mass0 / np.maximum(weight0, 1)
    mean1 = (mass0[-1] - mass0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    if not between.any():
        return 0.0
    return float(edges[int(np.argmax(between)) + 1])


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that look like pen ink (blue/green: more green than red; black: all dark)."""
    red = rgb[..., 0].astype(np.int16)
    green = rgb[..., 1].astype(np.int16)
    return (green > red + 5) | (rgb.max(axis=-1) < DARK_INK)


def open_2x2(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 2x2 square: keeps the pixels of ``mask`` that belong to a
    2x2 block of set pixels (drops isolated pixels and one-pixel lines)."""
    core = np.zeros_like(mask)
    core[:-1, :-1] = mask[:-1, :-1] & mask[1:, :-1] & mask[:-1, 1:] & mask[1:, 1:]
    opened = core.copy()
    opened[1:, :] |= core[:-1, :]
    opened[:, 1:] |= core[:, :-1]
    opened[1:, 1:] |= core[:-1, :-1]
    return opened


def tissue_mask(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """Tissue pixels of a low-resolution slide image.

    Args:
        rgb: uint8 ``[H, W, 3]``.

    Returns:
        ``(mask, threshold)``: bool ``[H, W]`` and the saturation threshold used.
    """
    sat = saturation(rgb)
    threshold = max(otsu_threshold(sat), MIN_SATURATION)
    mask = (sat > threshold) & (rgb.min(axis=-1) <= MAX_BRIGHTNESS) & ~pen_mask(rgb)
    return open_2x2(mask), threshold
