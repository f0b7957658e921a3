"""Cutting one slide into patches: ``OUT/<slide>.h5`` and ``OUT/thumbnails/<slide>.png``.

The HDF5 file holds what :mod:`hlss.data.tcga` and the manifest reader load::

    tiles    uint8  [n, patch_size, patch_size, 3]   RGB patches, row-major over the slide
    coords   int64  [n, 2]                           (x, y) of each patch's top-left corner,
                                                     level-0 pixels
    attrs    format, slide, source, patch_size, mpp, level, downsample, read_size,
             level0_mpp, tissue_threshold, settings (JSON), complete

It is written under a hidden temporary name (``.<slide>.h5.partial-<pid>``) and renamed when
complete, so an existing ``<slide>.h5`` is always a finished slide: a rerun skips it and never
writes over it. The thumbnail (kept patches outlined) is written before that rename.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import time
import zlib
from dataclasses import dataclass

import numpy as np

from hlss.atomic import atomic_file, file_mode
from hlss.data.wsi.grid import (
    LevelChoice,
    choose_level,
    grid_positions,
    target_resolution,
    tissue_fractions,
)
from hlss.data.wsi.settings import TileSettings
from hlss.data.wsi.slide import Slide, SlideError, open_slide
from hlss.data.wsi.tissue import tissue_mask
from hlss.errors import HLSSError

__all__ = [
    "FORMAT",
    "THUMBNAILS",
    "SlideResult",
    "TileSettings",
    "read_finished",
    "slide_file",
    "thumbnail_file",
    "tile_slide",
]

FORMAT = "hlss-tile/1"
THUMBNAILS = "thumbnails"
MASK_PIXELS_PER_PATCH = 8
"""The tissue mask is read from the coarsest level (and block-averaged) that still has this
many pixels along a patch side."""
MAX_OVERVIEW_PIXELS = 16_000_000
"""Largest low-resolution image the mask is computed on (more: it is averaged further)."""
MAX_READ_WIDTH = 8192
"""Widest region read at once (a run of adjacent patches of one grid row)."""
WRITE_BATCH = 64
OUTLINE = (0, 200, 0)


@dataclass
class SlideResult:
    """What became of one slide: ``status`` is ``"done"`` (tiled now), ``"kept"`` (finished by
    an earlier run) or ``"failed"`` (``message`` says why, starting with the slide's path)."""

    slide: str
    source: str
    status: str
    tiles: int = 0
    message: str = ""
    seconds: float = 0.0


def slide_file(out: str, slide: str) -> str:
    return os.path.join(out, f"{slide}.h5")


def thumbnail_file(out: str, slide: str) -> str:
    return os.path.join(out, THUMBNAILS, f"{slide}.png")


# ------------------------------------------------------------------------------- finished files


def read_finished(path: str) -> tuple[dict, np.ndarray]:
    """The attributes and level-0 coordinates ``[n, 2]`` of a finished slide file.

    Raises:
        SlideError: the file cannot be read, or is not a complete ``hlss-tile`` file.
    """
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            attrs = dict(handle.attrs)
            coords = np.asarray(handle["coords"]) if "coords" in handle else None
            count = handle["tiles"].shape[0] if "tiles" in handle else None
    except OSError as err:
        raise SlideError(
            f"{path}: exists but is not a readable HDF5 file ({err}); not overwritten "
            "(remove it to tile the slide again)"
        ) from None
    if attrs.get("format") != FORMAT or not attrs.get("complete") or coords is None:
        raise SlideError(
            f"{path}: exists but is not a complete hlss-tile file; not overwritten "
            "(remove it to tile the slide again)"
        )
    if count != len(coords):
        raise SlideError(f"{path}: 'tiles' and 'coords' differ in length; not overwritten")
    return attrs, coords


def _check_finished(path: str, settings: TileSettings) -> int:
    """Patch count of a finished file made with the same settings.

    Raises:
        SlideError: incomplete, unreadable, or made with other settings (named).
    """
    attrs, coords = read_finished(path)
    try:
        before = json.loads(str(attrs.get("settings", "{}")))
    except json.JSONDecodeError:
        before = {}
    now = settings.identity()
    differ = [f"{k} {before.get(k)!r} != {v!r}" for k, v in now.items() if before.get(k) != v]
    if differ:
        raise SlideError(
            f"{path}: finished with other settings ({', '.join(differ)}); not overwritten "
            "(use another out, or remove the file)"
        )
    return len(coords)


def _remove_stale_partials(out: str, slide: str) -> None:
    """Delete temporary files of this slide left by runs that are no longer alive."""
    for path in glob.glob(os.path.join(glob.escape(out), f".{glob.escape(slide)}.h5.partial-*")):
        pid = path.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # that run is still writing
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        with contextlib.suppress(OSError):
            os.unlink(path)


# ------------------------------------------------------------------------------ reading a slide


def overview(slide: Slide, level: int, factor: int) -> np.ndarray:
    """Level ``level`` of ``slide`` averaged over ``factor x factor`` blocks, read in bands.

    Returns:
        uint8 RGB ``[height // factor, width // factor, 3]`` of that level.
    """
    width, height = slide.level_dimensions[level]
    out_w, out_h = width // factor, height // factor
    image = np.empty((out_h, out_w, 3), dtype=np.uint8)
    rows = max(1, 2048 // factor)  # output rows per band
    for top in range(0, out_h, rows):
        n = min(rows, out_h - top)
        band = slide.read(level, 0, top * factor, out_w * factor, n * factor)
        if factor > 1:
            band = band.reshape(n, factor, out_w, factor, 3).mean(axis=(1, 3))
        image[top : top + n] = np.round(band).astype(np.uint8) if factor > 1 else band
    return image


def mask_source(slide: Slide, choice: LevelChoice) -> tuple[int, int]:
    """``(level, factor)`` of the image the tissue mask is computed on: the coarsest level
    with :data:`MASK_PIXELS_PER_PATCH` pixels per patch side, averaged by ``factor`` while a
    patch keeps that many and the image is over :data:`MAX_OVERVIEW_PIXELS`."""
    level = 0
    for index, downsample in enumerate(slide.level_downsamples):
        fine_enough = choice.footprint / downsample >= MASK_PIXELS_PER_PATCH
        if fine_enough and downsample >= slide.level_downsamples[level]:
            level = index
    width, height = slide.level_dimensions[level]
    per_patch = choice.footprint / slide.level_downsamples[level]
    factor = max(1, int(per_patch // MASK_PIXELS_PER_PATCH))
    factor = min(factor, max(1, min(width, height) // 16))
    while (width // factor) * (height // factor) > MAX_OVERVIEW_PIXELS:
        factor += 1
    return level, factor


def thumbnail_source(slide: Slide, size: int) -> tuple[int, int]:
    """``(level, factor)`` of the thumbnail's image: the coarsest level at least ``size``
    pixels on its long side (else level 0), averaged by ``factor`` down to about ``size``."""
    level = 0
    for index, (width, height) in enumerate(slide.level_dimensions):
        if max(width, height) >= size and (
            slide.level_downsamples[index] >= slide.level_downsamples[level]
        ):
            level = index
    width, height = slide.level_dimensions[level]
    return level, max(1, max(width, height) // size)


def _runs(columns: np.ndarray, longest: int) -> list[tuple[int, int]]:
    """Runs ``(first, count)`` of consecutive values in sorted ``columns``, at most ``longest``."""
    runs: list[tuple[int, int]] = []
    for col in columns.tolist():
        if runs and runs[-1][0] + runs[-1][1] == col and runs[-1][1] < longest:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((col, 1))
    return runs


def iter_patches(slide: Slide, choice: LevelChoice, positions: np.ndarray):
    """Yield the uint8 RGB patches ``[patch_size, patch_size, 3]`` at ``positions`` (level
    pixels, multiples of ``read_size``, in row-major order), reading each run of adjacent
    patches of a grid row as one region."""
    from PIL import Image

    size = choice.read_size
    longest = max(1, MAX_READ_WIDTH // size)
    grid = positions // size
    for row in np.unique(grid[:, 1]):
        columns = grid[grid[:, 1] == row, 0]
        for first, count in _runs(columns, longest):
            band = slide.read(choice.level, first * size, int(row) * size, count * size, size)
            for k in range(count):
                patch = band[:, k * size : (k + 1) * size]
                if choice.resample:
                    method = (
                        Image.Resampling.BOX
                        if size > choice.patch_size
                        else Image.Resampling.BICUBIC
                    )
                    patch = np.asarray(
                        Image.fromarray(patch).resize(
                            (choice.patch_size, choice.patch_size), method
                        )
                    )
                yield patch


def _thumbnail(image: np.ndarray, scale: float, corners0: np.ndarray, footprint: float, size: int):
    """A PIL image of ``image`` (``scale`` level-0 pixels per pixel), at most ``size`` pixels
    on its long side, with the patches at ``corners0`` outlined."""
    from PIL import Image, ImageDraw

    thumb = Image.fromarray(image)
    shrink = max(1.0, max(thumb.size) / max(1, size))
    if shrink > 1:
        thumb = thumb.resize(
            (max(1, round(thumb.width / shrink)), max(1, round(thumb.height / shrink))),
            Image.Resampling.BOX,
        )
    per_pixel = scale * shrink
    draw = ImageDraw.Draw(thumb)
    side = footprint / per_pixel
    for x, y in (corners0 / per_pixel).tolist():
        draw.rectangle([x, y, x + side - 1, y + side - 1], outline=OUTLINE)
    return thumb


def _select(
    fractions: np.ndarray, threshold: float, limit: int, seed: int, slide: str
) -> np.ndarray:
    """Indices of the patches kept: tissue fraction >= threshold, at most ``limit`` of them (a
    random subset, the same for the same seed and slide), in grid order."""
    keep = np.flatnonzero(fractions >= threshold)
    if limit and len(keep) > limit:
        rng = np.random.default_rng([seed, zlib.crc32(slide.encode("utf-8"))])
        keep = np.sort(rng.choice(keep, size=limit, replace=False))
    return keep


def _write(
    slide: Slide,
    slide_id: str,
    out: str,
    settings: TileSettings,
) -> int:
    """Tile an open slide into ``out``; returns the number of patches written.

    Raises:
        SlideError: no resolution, no tissue, unreadable tile data.
    """
    import h5py

    base_mpp = settings.slide_mpp if settings.slide_mpp is not None else slide.mpp
    resolution = target_resolution(
        base_mpp, slide.objective_power, settings.mpp, settings.magnification
    )
    if isinstance(resolution, str):
        raise SlideError(f"{slide.path}: {resolution}")
    choice = choose_level(slide.level_downsamples, resolution, settings.patch_size, base_mpp)
    positions = grid_positions(slide.level_dimensions[choice.level], choice.read_size)
    if not len(positions):
        raise SlideError(
            f"{slide.path}: smaller than one patch ({choice.read_size} px of level "
            f"{choice.level}, {slide.level_dimensions[choice.level]})"
        )
    mask_level, factor = mask_source(slide, choice)
    image = overview(slide, mask_level, factor)
    mask, threshold = tissue_mask(image)
    if not mask.any():
        raise SlideError(f"{slide.path}: no tissue found (blank slide or background only)")
    scale = slide.level_downsamples[mask_level] * factor
    corners0 = np.round(positions * choice.downsample).astype(np.int64)
    fractions = tissue_fractions(mask, scale, corners0, choice.footprint)
    keep = _select(
        fractions,
        settings.tissue_threshold,
        settings.max_patches_per_slide,
        settings.seed,
        slide_id,
    )
    if not len(keep):
        raise SlideError(
            f"{slide.path}: no patch has tissue_threshold={settings.tissue_threshold} of tissue "
            f"(best {fractions.max():.2f})"
        )

    if max(image.shape[:2]) < settings.thumbnail_size:  # the mask's image is too small to see
        thumb_level, thumb_factor = thumbnail_source(slide, settings.thumbnail_size)
        image = overview(slide, thumb_level, thumb_factor)
        scale = slide.level_downsamples[thumb_level] * thumb_factor
    thumb = _thumbnail(image, scale, corners0[keep], choice.footprint, settings.thumbnail_size)
    with atomic_file(thumbnail_file(out, slide_id)) as handle:
        thumb.save(handle, format="PNG")

    n, size = len(keep), settings.patch_size
    partial = os.path.join(out, f".{slide_id}.h5.partial-{os.getpid()}")
    try:
        with h5py.File(partial, "w") as h5:
            tiles = h5.create_dataset(
                "tiles",
                shape=(n, size, size, 3),
                dtype=np.uint8,
                chunks=(1, size, size, 3),
                compression=settings.compression or None,
            )
            h5.create_dataset("coords", data=corners0[keep])
            buffer = np.empty((min(WRITE_BATCH, n), size, size, 3), dtype=np.uint8)
            done = 0
            for k, patch in enumerate(iter_patches(slide, choice, positions[keep])):
                buffer[k - done] = patch
                if k - done + 1 == len(buffer) or k + 1 == n:
                    tiles[done : k + 1] = buffer[: k + 1 - done]
                    done = k + 1
            h5.attrs.update(
                {
                    "format": FORMAT,
                    "slide": slide_id,
                    "source": os.path.abspath(slide.path),
                    "backend": slide.backend,
                    "patch_size": size,
                    "mpp": math.nan if choice.mpp is None else float(choice.mpp),
                    "level0_mpp": math.nan if base_mpp is None else float(base_mpp),
                    "level": choice.level,
                    "downsample": choice.downsample,
                    "read_size": choice.read_size,
                    "tissue_threshold": settings.tissue_threshold,
                    "saturation_threshold": threshold,
                    "settings": json.dumps(settings.identity(), sort_keys=True),
                    "complete": True,
                }
            )
        os.chmod(partial, file_mode())
        os.replace(partial, slide_file(out, slide_id))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return n


def tile_slide(source: str, slide_id: str, out: str, settings: TileSettings) -> SlideResult:
    """Cut the slide at ``source`` into ``out`` (see the module); never raises for a bad slide.

    Returns:
        A :class:`SlideResult`: ``kept`` when ``out/<slide_id>.h5`` is finished already (with
        the same settings), ``done`` after tiling it, ``failed`` with the reason otherwise (an
        unusable slide, or a file in the way that is not overwritten).
    """
    start = time.perf_counter()
    target = slide_file(out, slide_id)
    try:
        if os.path.exists(target):
            count = _check_finished(target, settings)
            return SlideResult(slide_id, source, "kept", count, seconds=time.perf_counter() - start)
        _remove_stale_partials(out, slide_id)
        with open_slide(source, settings.backend) as slide:
            count = _write(slide, slide_id, out, settings)
    except HLSSError as err:
        return SlideResult(
            slide_id, source, "failed", message=str(err), seconds=time.perf_counter() - start
        )
    except OSError as err:  # disk full, permissions: name the slide, go on with the others
        return SlideResult(
            slide_id,
            source,
            "failed",
            message=f"{source}: {err.strerror or err}",
            seconds=time.perf_counter() - start,
        )
    return SlideResult(slide_id, source, "done", count, seconds=time.perf_counter() - start)
