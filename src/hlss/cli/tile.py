"""``hlss-tile``: cut whole-slide images into a patch dataset with a manifest.

The keys, their defaults and comments are in ``conf/tile.yaml`` (``hlss-tile --help``)::

    hlss-tile slides=/data/gdc out=/data/tiles labels=labels.csv workers=8
    hlss-train dataset=manifest dataset.path=/data/tiles/manifest.csv

Slides finished are counted on stderr (a bar on a terminal, a line every 10% / 30 s
otherwise; see :mod:`hlss.progress`); the summary line goes to stdout, then one ``failed:`` line
per unusable slide to stderr.

Exit status: 0 when every slide was tiled (or had been by an earlier run), 1 when a slide failed
or no slide was left to write a manifest for, 2 for usage errors (unknown key, bad value, no
slides found, a bad labels or split file).
"""

from __future__ import annotations

import sys

from hlss.cli.common import run_config_command
from hlss.schemas.tile import TileConfig

PROG = "hlss-tile"


def tile(args: TileConfig) -> int:
    """Tile the slides of ``args``, print the summary; return the exit status (1 when a slide
    failed or nothing was finished, else 0).

    Raises:
        HLSSError: a bad argument, no slides, a bad labels or split file (before any slide is
            read).
    """
    from hlss.data.wsi.run import tile_slides
    from hlss.data.wsi.settings import TileSettings

    settings = TileSettings(
        patch_size=args.patch_size,
        mpp=args.mpp,
        magnification=args.magnification,
        slide_mpp=args.slide_mpp,
        tissue_threshold=args.tissue_threshold,
        max_patches_per_slide=args.max_patches_per_slide,
        seed=args.seed,
        backend=args.backend,
        compression=None if args.compression == "none" else args.compression,
        thumbnail_size=args.thumbnail_size,
    )
    run = tile_slides(
        args.slides,
        args.out,
        settings,
        workers=args.workers,
        labels=args.labels,
        split=args.split,
        val_fraction=args.val_fraction,
        split_seed=args.seed,
    )
    print(run.summary(args.out))
    for result in run.failed:
        print(f"failed: {result.message}", file=sys.stderr)
    if run.manifest is None:
        print(f"{PROG}: no slide finished; no manifest written", file=sys.stderr)
    return 1 if run.failed or run.manifest is None else 0


def main(argv: list[str] | None = None) -> int:
    """Run ``hlss-tile`` with ``argv`` (default: the process's arguments).

    Returns:
        0 when every slide is tiled, 1 when a slide failed or nothing was finished.

    Raises:
        SystemExit: status 2 for a usage error or any other :class:`HLSSError` (one line on
            stderr); status 0 after ``--help``.
    """
    return run_config_command(PROG, "tile", TileConfig, tile, argv)


if __name__ == "__main__":
    raise SystemExit(main())
