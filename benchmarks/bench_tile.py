"""``hlss-tile`` throughput (issue 11): patches per second on one slide and the speed-up of two
worker processes; prints one JSON object.

The slides are generated first: ``--slides`` Aperio-style SVS files of ``32000 x 24000`` level-0
pixels times ``--scale`` (0.25 um/px, 40x; levels at downsamples 1, 4, 16 and a thumbnail
page; 256-px tiles, JPEG-compressed as scanners store them, so reading costs JPEG decoding). The
image is a synthetic H&E look-alike: pink tissue with purple nuclei and stain variation in a few
elliptic fragments (some 40% of the slide) on grey-white glass with noise. Then ``hlss-tile``
runs through its Python entry (:func:`hlss.cli.tile.main`) with its default cutting settings
(300-px patches at 0.5 um/px, read from level 0 and halved; LZF-compressed HDF5), each time
into a new output folder:

* ``one_slide``: the first slide alone with ``workers=1`` (one slide is tiled in the calling
  process): ``tiles`` (patches written), ``seconds`` (wall time of the command, Hydra start-up
  included) and ``tiles_per_s``;
* ``workers_1_s`` / ``workers_2_s``: every slide with one and two worker processes;
  ``speedup = workers_1_s / workers_2_s``.

``machine`` describes the computer (see ``common.machine_info``) and the slide-reading
libraries' versions; ``setup`` the slides and settings measured. Timings on a busy machine are
not worth keeping: run it when nothing else runs. At ``--scale 1`` a slide (about 130 MB) has
about 2,100 patch positions, some 40% of them on tissue; with 4 slides the run takes about 3 GB
of disk under ``--out`` (a temporary folder, removed at the end unless ``--keep``) and, on 2
cores, roughly 10 minutes (the slides take a minute each to write).

Usage: python benchmarks/bench_tile.py [--slides 4] [--scale 1.0] [--out DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
from common import machine_info

LEVEL0 = (24000, 32000)  # (height, width) at --scale 1: a typical 40x TCGA slide
MPP = 0.25
POWER = 40
DOWNSAMPLES = (1, 4, 16)
TILE = 256
JPEG_QUALITY = 80
ATLAS = 1024  # side of the repeating texture, level-0 pixels (a multiple of every downsample)
GLASS = 240
TISSUE_PINK = (226, 160, 205)
NUCLEUS_PURPLE = (105, 55, 150)
DESCRIPTION = "Aperio Image Library v12.0.15 \r\n"


# --------------------------------------------------------------------------------- the slides


def _atlases(seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{downsample: (tissue, glass)}``: repeating uint8 RGB textures ``[ATLAS/ds, ATLAS/ds, 3]``
    of each level (the level-0 texture block-averaged)."""
    rng = np.random.default_rng(seed)
    side = ATLAS
    # stain variation: smooth noise (blurred with wrap-around, so the texture repeats
    # seamlessly), about +-25 grey levels
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(rng.normal(0.0, 1.0, (side, side, 3)), (24, 24, 0), mode="wrap")
    smooth /= smooth.std()
    tissue = np.asarray(TISSUE_PINK, np.float32) + 12.0 * smooth
    # nuclei: dark purple discs of radius 4-7 px (40x), about 6% of the area
    yy, xx = np.mgrid[-7:8, -7:8]
    for _ in range(side * side // 900):
        radius = rng.uniform(4, 7)
        cy, cx = rng.integers(0, side - 15, 2)
        disc = (yy**2 + xx**2) <= radius**2
        tissue[cy : cy + 15, cx : cx + 15][disc] = NUCLEUS_PURPLE
    tissue += rng.normal(0.0, 6.0, tissue.shape)
    glass = GLASS + rng.normal(0.0, 3.0, (side, side, 1)).repeat(3, axis=2)
    out = {}
    for ds in DOWNSAMPLES:
        n = side // ds
        levels = []
        for image in (tissue, glass):
            block = image.reshape(n, ds, n, ds, 3).mean(axis=(1, 3))
            levels.append(np.clip(np.round(block), 0, 255).astype(np.uint8))
        out[ds] = (levels[0], levels[1])
    return out


def _fragments(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``[k, 5]`` ellipses (cy, cx, ry, rx, angle) in level-0 pixels: the tissue pieces."""
    k = 4
    cy = rng.uniform(0.2, 0.8, k) * height
    cx = (np.arange(k) + rng.uniform(0.3, 0.7, k)) / k * width
    ry = rng.uniform(0.25, 0.4, k) * height
    rx = rng.uniform(0.4, 0.6, k) * width / k
    angle = rng.uniform(0, np.pi, k)
    return np.stack([cy, cx, ry, rx, angle], axis=1)


def _tissue_at(fragments: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bool ``[len(ys), len(xs)]``: which level-0 points ``(ys x xs)`` lie in a fragment."""
    y, x = ys[:, None].astype(np.float32), xs[None, :].astype(np.float32)
    inside = np.zeros((len(ys), len(xs)), bool)
    for cy, cx, ry, rx, angle in fragments:
        dy, dx = y - cy, x - cx
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        inside |= (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    return inside


def _tiles(
    shape: tuple[int, int], ds: int, fragments: np.ndarray, atlas: tuple[np.ndarray, np.ndarray]
) -> Iterator[np.ndarray]:
    """The ``TILE x TILE`` RGB tiles of a level of ``shape`` (height, width) at downsample
    ``ds``, row-major (edge tiles full size, as TIFF stores them)."""
    tissue, glass = atlas
    if tissue.shape[0] < TILE:  # repeat the texture until a tile is a whole number of periods
        reps = (-(-TILE // tissue.shape[0]), -(-TILE // tissue.shape[0]), 1)
        tissue, glass = np.tile(tissue, reps), np.tile(glass, reps)
    period = tissue.shape[0]  # a multiple of TILE: a tile never wraps around the texture
    reach = fragments[:, 2:4].max(axis=1) + TILE * ds * 1.5  # fragment radius + a tile's span
    height, width = shape
    steps = np.arange(TILE)
    for top in range(0, height, TILE):
        for left in range(0, width, TILE):
            r, c = top % period, left % period
            ground = glass[r : r + TILE, c : c + TILE]
            centre = np.array([top + TILE / 2, left + TILE / 2]) * ds
            if (np.hypot(*(fragments[:, :2] - centre).T) > reach).all():
                yield ground  # no tissue near this tile
                continue
            inside = _tissue_at(fragments, (top + steps) * ds, (left + steps) * ds)
            yield np.where(inside[..., None], tissue[r : r + TILE, c : c + TILE], ground)


def write_slide(path: str, shape: tuple[int, int], seed: int, atlases: dict) -> str:
    """One SVS-like slide of level-0 ``shape`` (height, width) at ``path``: level 0, a
    thumbnail page, then the levels at downsamples 4 and 16; JPEG tiles."""
    import tifffile

    rng = np.random.default_rng(seed)
    fragments = _fragments(rng, *shape)
    jpeg = {"compression": "jpeg", "compressionargs": {"level": JPEG_QUALITY}}
    options = {"photometric": "rgb", "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        for index, ds in enumerate(DOWNSAMPLES):
            level_shape = (shape[0] // ds, shape[1] // ds)
            if index == 0:
                description = (
                    f"{DESCRIPTION}{shape[1]}x{shape[0]} [0,0 {shape[1]}x{shape[0]}] "
                    f"({TILE}x{TILE}) JPEG/RGB Q={JPEG_QUALITY}|AppMag = {POWER}|MPP = {MPP}"
                )
            else:
                description = (
                    f"{DESCRIPTION}{shape[1]}x{shape[0]} -> {level_shape[1]}x{level_shape[0]}"
                )
            tiff.write(
                _tiles(level_shape, ds, fragments, atlases[ds]),
                shape=(*level_shape, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                description=description,
                **jpeg,
                **options,
            )
            if index == 0:  # Aperio's second page: a small stripped thumbnail
                small = (shape[0] // 64, shape[1] // 64)
                thumb = np.concatenate(list(_tiles(small, 64, fragments, atlases[16])), axis=0)
                thumb = _stitch(thumb, small)
                tiff.write(thumb, description=f"{DESCRIPTION}thumbnail", **jpeg, **options)
    return path


def _stitch(stacked: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Row-major tiles stacked on axis 0 (``[n*TILE, TILE, 3]``) back into an image of
    ``shape``, cropped."""
    height, width = shape
    rows, cols = -(-height // TILE), -(-width // TILE)
    tiles = stacked.reshape(rows, cols, TILE, TILE, 3)
    return tiles.transpose(0, 2, 1, 3, 4).reshape(rows * TILE, cols * TILE, 3)[:height, :width]


def make_slides(folder: str, count: int, scale: float) -> tuple[list[str], tuple[int, int]]:
    """``count`` slides ``TCGA-BT-000<i>-01Z-00-DX1.svs`` in ``folder``; returns their paths and
    level-0 (height, width)."""
    shape = (
        max(TILE, int(LEVEL0[0] * scale) // 64 * 64),
        max(TILE, int(LEVEL0[1] * scale) // 64 * 64),
    )
    os.makedirs(folder, exist_ok=True)
    atlases = _atlases(0)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"TCGA-BT-{i + 1:04d}-01Z-00-DX1.svs")
        paths.append(write_slide(path, shape, seed=i + 1, atlases=atlases))
    return paths, shape


# ----------------------------------------------------------------------------------- tiling


def _patches(out: str) -> int:
    """Patches written in the slide files of ``out``."""
    import h5py

    total = 0
    for path in glob.glob(os.path.join(out, "*.h5")):
        with h5py.File(path, "r") as handle:
            total += int(handle["tiles"].shape[0])
    return total


def run_tile(slides: str, out: str, workers: int) -> tuple[float, int]:
    """``hlss-tile slides=... out=... workers=...`` in this process (its output to stderr);
    returns (wall seconds, patches written).

    Raises:
        RuntimeError: the command did not finish every slide (its exit status is not 0).
    """
    from hlss.cli import tile as tile_cli

    argv = [f"slides={slides}", f"out={out}", f"workers={workers}"]
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        status = tile_cli.main(argv)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"hlss-tile {' '.join(argv)} exited with {status}")
    return seconds, _patches(out)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("tiffslide", "tifffile", "imagecodecs", "h5py"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:  # pragma: no cover
            found[name] = None
    return found


def _used(out: str | None) -> bool:
    """Whether ``out`` holds something already (a file, or a folder that is not empty)."""
    return (
        out is not None
        and os.path.exists(out)
        and (not os.path.isdir(out) or bool(os.listdir(out)))
    )


def measure(
    slides: int = 4, scale: float = 1.0, out: str | None = None, keep: bool = False
) -> dict:
    """Generate the slides under ``out`` (a temporary folder when None), tile them three times
    and return the JSON object described in the module docstring.

    Raises:
        ValueError: ``out`` exists and is not an empty folder.
        RuntimeError: ``hlss-tile`` did not finish every slide, or the two worker counts wrote
            different patch counts.
    """
    # the readers load before the clock starts: an import is not tiling time
    import h5py  # noqa: F401
    import tiffslide  # noqa: F401

    from hlss.cli import tile as _  # noqa: F401

    if _used(out):
        raise ValueError(f"--out {out}: exists and is not an empty folder; name a new one")
    made = out is None or not os.path.exists(out)
    root = out or tempfile.mkdtemp(prefix="hlss-bench-tile-")
    os.makedirs(root, exist_ok=True)
    try:
        start = time.perf_counter()
        paths, shape = make_slides(os.path.join(root, "slides"), slides, scale)
        generate_s = time.perf_counter() - start
        one_s, one_tiles = run_tile(paths[0], os.path.join(root, "one-slide"), workers=1)
        w1_s, w1_tiles = run_tile(os.path.join(root, "slides"), os.path.join(root, "w1"), 1)
        w2_s, w2_tiles = run_tile(os.path.join(root, "slides"), os.path.join(root, "w2"), 2)
        if w1_tiles != w2_tiles:
            raise RuntimeError(f"workers=1 wrote {w1_tiles} patches, workers=2 {w2_tiles}")
        slide_mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 2**20
    finally:
        if not keep:  # what this run wrote; a folder the caller made empty stays
            for name in ("slides", "one-slide", "w1", "w2"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            if made:
                shutil.rmtree(root, ignore_errors=True)
    return {
        "one_slide": {
            "tiles": one_tiles,
            "seconds": round(one_s, 2),
            "tiles_per_s": round(one_tiles / one_s, 1),
        },
        "workers_1_s": round(w1_s, 2),
        "workers_2_s": round(w2_s, 2),
        "speedup": round(w1_s / w2_s, 3),
        "slides": slides,
        "tiles_all_slides": w1_tiles,
        "setup": {
            "level0_height_width": list(shape),
            "level0_mpp": MPP,
            "downsamples": list(DOWNSAMPLES),
            "tile_compression": f"jpeg q{JPEG_QUALITY}, {TILE} px",
            "slide_mb": round(slide_mb, 1),
            "generate_s": round(generate_s, 1),
            "settings": "hlss-tile defaults (patch_size 300, mpp 0.5, lzf)",
            "out": root if keep else None,
        },
        "machine": {**machine_info(), **_versions()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4, help="slides generated (default 4)")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="slide side relative to 32000 x 24000 px (default 1; 0.1 for a check in seconds)",
    )
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the slides and outputs")
    args = parser.parse_args()
    if args.slides < 1 or args.scale <= 0:
        parser.error("--slides must be >= 1 and --scale > 0")
    if _used(args.out):
        parser.error(f"--out {args.out}: exists and is not an empty folder; name a new one")
    print(json.dumps(measure(args.slides, args.scale, args.out, args.keep), indent=1))


if __name__ == "__main__":
    main()
