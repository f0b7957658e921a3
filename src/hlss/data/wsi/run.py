"""Tiling many slides: worker processes, progress, the split and the manifest, a summary.

:func:`tile_slides` is what ``hlss-tile`` runs. Slides are independent jobs: ``workers``
processes each tile one slide at a time (``0``: all in this process). A slide that cannot be
used is reported by name and left out; the others go on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from hlss.data.wsi.catalog import (
    LABELS,
    MANIFEST,
    SPLIT,
    SlideEntry,
    catalog,
    find_slides,
    patient_id,
    random_split,
    read_slide_table,
    read_split_file,
    write_outputs,
)
from hlss.data.wsi.settings import VAL_FRACTION
from hlss.data.wsi.slide import BACKENDS
from hlss.data.wsi.tiler import SlideResult, TileSettings, read_finished, slide_file, tile_slide
from hlss.errors import ConfigError
from hlss.progress import Progress

COMPRESSIONS = ("lzf", "gzip", "none")


@dataclass
class TileRun:
    """What :func:`tile_slides` did: one :class:`SlideResult` per slide tiled, the slides left
    out before tiling (no label, not in the split file), the patients per split and the
    manifest written (None when no slide is finished)."""

    results: list[SlideResult]
    unlabelled: list[str] = field(default_factory=list)
    not_in_split: list[str] = field(default_factory=list)
    split_counts: dict[str, int] = field(default_factory=dict)
    patients_from_slide: int = 0
    manifest: str | None = None
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def tiles(self) -> int:
        return sum(r.tiles for r in self.results if r.status != "failed")

    @property
    def new_tiles(self) -> int:
        return sum(r.tiles for r in self.results if r.status == "done")

    def summary(self, out: str) -> str:
        """One line: slides done / kept / failed / left out, patches, patients per split, rate."""
        parts = [f"{self.count('done')} tiled", f"{self.count('kept')} kept from an earlier run"]
        parts.append(f"{self.count('failed')} failed")
        if self.unlabelled:
            parts.append(f"{len(self.unlabelled)} without a label left out")
        if self.not_in_split:
            parts.append(f"{len(self.not_in_split)} not in the split file left out")
        rate = self.new_tiles / self.seconds if self.seconds > 0 else 0.0
        line = (
            f"{out}: {len(self.results)} slides ({', '.join(parts)}); {self.tiles} patches"
            f" ({self.new_tiles} new, {rate:.1f} patches/s over {self.seconds:.1f} s)"
        )
        if self.split_counts:
            line += (
                f"; patients {self.split_counts.get('train', 0)} train / "
                f"{self.split_counts.get('val', 0)} val"
            )
        if self.patients_from_slide:
            line += (
                f"; {self.patients_from_slide} slide(s) without a TCGA barcode or a patient in "
                "the labels file: each taken as its own patient"
            )
        if self.manifest:
            line += f"; manifest {self.manifest}"
        return line


def check_settings(settings: TileSettings, workers: int, val_fraction: float) -> None:
    """Refuse values the schema's types let through.

    Raises:
        ConfigError: one line naming the key.
    """
    checks = [
        ("patch_size", settings.patch_size >= 8, ">= 8"),
        ("mpp", settings.mpp > 0, "> 0"),
        ("magnification", settings.magnification is None or settings.magnification > 0, "> 0"),
        ("slide_mpp", settings.slide_mpp is None or settings.slide_mpp > 0, "> 0"),
        ("tissue_threshold", 0 <= settings.tissue_threshold <= 1, "in [0, 1]"),
        ("max_patches_per_slide", settings.max_patches_per_slide >= 0, ">= 0 (0: all)"),
        ("thumbnail_size", settings.thumbnail_size >= 16, ">= 16"),
        ("workers", workers >= 0, ">= 0"),
        ("val_fraction", 0 <= val_fraction < 1, "in [0, 1)"),
    ]
    for key, ok, want in checks:
        if not ok:
            value = (
                workers
                if key == "workers"
                else val_fraction
                if key == "val_fraction"
                else (getattr(settings, key))
            )
            raise ConfigError(f"{key}: must be {want}, got {value}")
    if settings.backend not in BACKENDS:
        raise ConfigError(
            f"backend: expected one of {', '.join(BACKENDS)}, got {settings.backend!r}"
        )
    if (settings.compression or "none") not in COMPRESSIONS:
        raise ConfigError(
            f"compression: expected one of {', '.join(COMPRESSIONS)}, got {settings.compression!r}"
        )
    module = "tiffslide" if settings.backend == "tiffslide" else "openslide"
    try:
        __import__(module)
    except ImportError:
        extra = (
            "tiffslide imagecodecs" if module == "tiffslide" else "openslide-python openslide-bin"
        )
        raise ConfigError(
            f"backend={settings.backend}: not installed (pip install {extra})"
        ) from None
    except OSError as err:  # openslide-python without the shared library
        raise ConfigError(f"backend={settings.backend}: cannot load ({err})") from None


def _run_jobs(
    entries: list[SlideEntry],
    out: str,
    settings: TileSettings,
    workers: int,
    on_result: Callable[[SlideResult], None],
) -> None:
    """Tile each slide of ``entries``, in ``workers`` processes (0: here); ``on_result`` gets
    each result as it comes."""
    if workers == 0 or len(entries) == 1:
        for entry in entries:
            on_result(tile_slide(entry.path, entry.name, out, settings))
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork of a process with reader threads
    with ProcessPoolExecutor(min(workers, len(entries)), mp_context=context) as pool:
        jobs = {pool.submit(tile_slide, e.path, e.name, out, settings): e for e in entries}
        pending = set(jobs)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    try:
                        on_result(future.result())
                    except BrokenProcessPool:  # a worker was killed (out of memory?)
                        entry = jobs[future]
                        message = (
                            f"{entry.path}: a worker process died while tiling it or another "
                            "slide (out of memory? try fewer workers); rerun to resume"
                        )
                        on_result(SlideResult(entry.name, entry.path, "failed", message=message))
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def tile_slides(
    slides: str,
    out: str,
    settings: TileSettings,
    workers: int = 0,
    labels: str | None = None,
    split: str | None = None,
    val_fraction: float = VAL_FRACTION,
    split_seed: int = 0,
) -> TileRun:
    """Tile the slides named by ``slides`` into ``out`` and write its manifest.

    Args:
        slides: a folder (searched recursively), a glob pattern or one slide file.
        out: the output folder (created; finished slides in it are kept, never rewritten).
        settings: how patches are cut.
        workers: processes tiling slides at once (0: this process).
        labels: CSV of labels and/or patients per slide or patient (see
            :func:`~hlss.data.wsi.catalog.read_slide_table`), or None.
        split: split file (JSON or CSV, see :func:`~hlss.data.wsi.catalog.read_split_file`), or
            None for a random patient-disjoint split with ``val_fraction`` and ``split_seed``.

    Returns:
        A :class:`TileRun`; its ``failed`` slides are those that could not be used.

    Raises:
        ConfigError / DataError: a bad setting, no slides, two slides with one id, a bad labels
            or split file, or ``out`` being one of the inputs; before any slide is read.
    """
    start = time.perf_counter()
    check_settings(settings, workers, val_fraction)
    out = os.path.abspath(os.path.expanduser(str(out)))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"out={out}: exists and is not a folder")
    table = read_slide_table(labels) if labels else None
    split_of = read_split_file(split) if split else None
    for given, written in ((labels, LABELS), (split, SPLIT)):
        if given and os.path.abspath(given) == os.path.join(out, written):
            raise ConfigError(f"{given}: hlss-tile writes this file; keep your input elsewhere")
    paths = find_slides(slides)
    entries, unlabelled = catalog(paths, table)
    not_in_split: list[str] = []
    if split_of is not None:
        known = [e for e in entries if _split_of(split_of, e.patient) is not None]
        not_in_split = sorted(e.name for e in entries if e not in known)
        entries = known
    run = TileRun([], unlabelled, not_in_split)
    run.patients_from_slide = sum(e.patient_from == "slide" for e in entries)
    os.makedirs(out, exist_ok=True)

    by_name = {e.name: e for e in entries}
    with Progress(len(entries), "tiling", "slides", show_rate=False) as progress:

        def record(result: SlideResult) -> None:
            run.results.append(result)
            progress.update(1, postfix=lambda: f"{run.tiles} patches, {len(run.failed)} failed")

        _run_jobs(entries, out, settings, workers, record)

    finished = []
    for result in sorted(run.results, key=lambda r: r.slide):
        if result.status == "failed":
            continue
        attrs, coords = read_finished(slide_file(out, result.slide))
        finished.append((by_name[result.slide], coords, float(attrs.get("mpp", float("nan")))))
    if finished:
        patients = {entry.patient: entry.label for entry, _, _ in finished}
        if split_of is None:
            by_label: dict[str, list[str]] = {}
            for patient, label in patients.items():
                by_label.setdefault(label, []).append(patient)
            assigned = random_split(by_label, val_fraction, split_seed)
        else:
            assigned = {p: _split_of(split_of, p) for p in patients}
        run.split_counts = {
            part: sum(v == part for v in assigned.values()) for part in ("train", "val")
        }
        run.manifest = write_outputs(out, finished, assigned)
    run.seconds = time.perf_counter() - start
    return run


def _split_of(split_of: dict[str, str], patient: str) -> str | None:
    """The split of ``patient`` in a split file (JSON files are read upper-cased)."""
    return split_of.get(patient, split_of.get(patient_id(patient).upper()))


__all__ = ["MANIFEST", "TileRun", "check_settings", "tile_slides"]
