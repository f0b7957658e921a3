"""Opening a whole-slide image: its pyramid levels, microns per pixel and RGB regions.

Two established readers are supported: ``tiffslide`` (default; pure Python on tifffile, reads
Aperio SVS and generic pyramidal TIFF; JPEG / JPEG 2000 tiles need ``imagecodecs``) and
``openslide`` (``openslide-python`` with ``openslide-bin``; more vendor formats). Both are
imported only when a slide is opened.

Coordinates: ``x`` is the column and ``y`` the row; level 0 is the full resolution; a region of
level ``l`` is addressed in that level's own pixels by :meth:`Slide.read`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hlss.errors import ConfigError, DataError

BACKENDS = ("tiffslide", "openslide")
SLIDE_EXT = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".mrxs", ".vms", ".vmu", ".svslide")
"""File name endings taken as slides when a folder is searched."""


class SlideError(DataError):
    """One slide cannot be used (unreadable, truncated, no resolution, no tissue); the message
    starts with the slide's path."""


def _positive(value: Any) -> float | None:
    """``value`` as a finite float > 0, else None (metadata values are often strings)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _mean_or_none(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return a if b is None else b
    return (a + b) / 2


@dataclass
class Slide:
    """An open slide. Use as a context manager, or call :meth:`close`.

    Attributes:
        path: the slide file.
        backend: ``"tiffslide"`` or ``"openslide"``.
        level_dimensions: ``(width, height)`` of each level, level 0 first.
        level_downsamples: level-0 pixels per level pixel, per level (1.0 for level 0).
        mpp: level-0 microns per pixel from the slide's metadata (mean of x and y), or None.
        objective_power: the scanner's objective magnification (e.g. 40), or None.
    """

    path: str
    backend: str
    handle: Any = field(repr=False)
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    objective_power: float | None

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0."""
        return self.level_dimensions[0]

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The region ``[y, y + height) x [x, x + width)`` of ``level`` (in that level's pixels).

        Returns:
            uint8 RGB array ``[height, width, 3]``; transparent pixels (OpenSlide's outside of
            the scanned area) are white.

        Raises:
            SlideError: the slide's data cannot be decoded (truncated file, missing codec).
        """
        downsample = self.level_downsamples[level]
        if self.backend == "tiffslide" and level > 0:
            # tiffslide divides level-0 coordinates by the downsample and rounds down: the middle
            # of level pixel x maps back to x whatever the rounding of the downsample
            location = (int(x * downsample + downsample / 2), int(y * downsample + downsample / 2))
        else:  # OpenSlide renders a fractional level position by interpolation: be exact
            location = (round(x * downsample), round(y * downsample))
        try:
            if self.backend == "tiffslide":
                region = np.asarray(
                    self.handle.read_region(location, level, (width, height), as_array=True)
                )
            else:
                region = np.asarray(self.handle.read_region(location, level, (width, height)))
        except Exception as err:  # readers raise many types for broken tile data
            raise SlideError(
                f"{self.path}: cannot decode level {level} at ({x}, {y}) "
                f"({type(err).__name__}: {' '.join(str(err).split())[:200]})"
            ) from None
        return _to_rgb(region)

    def close(self) -> None:
        close = getattr(self.handle, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_rgb(region: np.ndarray) -> np.ndarray:
    """A reader's region as uint8 RGB ``[H, W, 3]``: alpha = 0 becomes white, gray is stacked."""
    if region.ndim == 2:
        region = region[..., None]
    if region.dtype != np.uint8:
        region = np.clip(region, 0, 255).astype(np.uint8)
    channels = region.shape[-1]
    if channels == 4:
        rgb = region[..., :3].copy()
        rgb[region[..., 3] == 0] = 255
        return rgb
    if channels == 1:
        return np.repeat(region, 3, axis=-1)
    return np.ascontiguousarray(region[..., :3])


def _truncation(path: str, tiff: Any, series_index: int) -> str | None:
    """Where the image data of the slide's pyramid runs past the end of the file, or None."""
    size = os.path.getsize(path)
    for page in tiff.series[series_index].levels:
        for sub in page.pages:
            if sub is None:
                continue
            offsets = getattr(sub, "dataoffsets", ()) or ()
            counts = getattr(sub, "databytecounts", ()) or ()
            ends = [o + n for o, n in zip(offsets, counts, strict=False) if n]
            if ends and max(ends) > size:
                return f"truncated: image data ends at byte {max(ends)}, the file has {size}"
    return None


@contextlib.contextmanager
def _quiet_tifffile():
    """Silence tifffile's log warnings about a broken file while opening it: the slide's
    failure is reported once, in our own words."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _open_tiffslide(path: str) -> Slide:
    try:
        import tiffslide
    except ImportError:
        raise ConfigError(
            "backend=tiffslide: the tiffslide package is not installed (pip install tiffslide "
            "imagecodecs)"
        ) from None
    with _quiet_tifffile():
        try:
            handle = tiffslide.TiffSlide(path)
            props = handle.properties
            dims = tuple(tuple(int(v) for v in d) for d in handle.level_dimensions)
            downs = tuple(float(d) for d in handle.level_downsamples)
            index = int(props.get("tiffslide.series-index", 0))
            short = _truncation(path, handle.ts_tifffile, index)
        except Exception as err:  # tifffile raises many types for files that are not slides
            raise SlideError(
                f"{path}: not a readable slide ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:200]})"
            ) from None
    if short:
        handle.close()
        raise SlideError(f"{path}: {short}")
    mpp = _mean_or_none(
        _positive(props.get("tiffslide.mpp-x")), _positive(props.get("tiffslide.mpp-y"))
    )
    power = _positive(props.get("tiffslide.objective-power"))
    return Slide(path, "tiffslide", handle, dims, downs, mpp, power)


def _open_openslide(path: str) -> Slide:
    try:
        import openslide
    except ImportError:
        raise ConfigError(
            "backend=openslide: openslide is not installed (pip install openslide-python "
            "openslide-bin)"
        ) from None
    try:
        handle = openslide.OpenSlide(path)
        props = handle.properties
        dims = tuple(tuple(int(v) for v in d) for d in handle.level_dimensions)
        downs = tuple(float(d) for d in handle.level_downsamples)
    except Exception as err:  # OpenSlideError, OpenSlideUnsupportedFormatError, OSError
        raise SlideError(
            f"{path}: not a readable slide ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]})"
        ) from None
    mpp = _mean_or_none(
        _positive(props.get("openslide.mpp-x")), _positive(props.get("openslide.mpp-y"))
    )
    power = _positive(props.get("openslide.objective-power"))
    return Slide(path, "openslide", handle, dims, downs, mpp, power)


def open_slide(path: str, backend: str = "tiffslide") -> Slide:
    """Open the slide at ``path`` with ``backend`` (see :data:`BACKENDS`).

    Raises:
        ConfigError: an unknown backend, or its package is not installed.
        SlideError: the file is missing, not a slide the reader knows, or truncated (its
            pyramid's image data runs past the end of the file; tiffslide only, OpenSlide
            reports that itself when reading).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if not os.path.isfile(path):
        raise SlideError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise SlideError(f"{path}: empty file")
    return _open_tiffslide(path) if backend == "tiffslide" else _open_openslide(path)
