"""A tiny writer of OpenSRH-layout datasets for tests, with knobs to inject faults.

:func:`write_opensrh` writes ``meta/opensrh.json``, ``meta/train_val_split.json`` and random
``(2, size, size)`` uint16 TIFF patches under ``studies/`` (see DESIGN.md, "Data facts"). The
returned :class:`OpenSRHFixture` can then break single patches (:meth:`OpenSRHFixture.break_patch`)
or rewrite the metadata (:meth:`OpenSRHFixture.write_meta`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tifffile

from hlss import CLASSES_OPENSRH
from hlss.data.opensrh import (
    META_FILE,
    NONDIAGNOSTIC_PATCHES,
    SPLIT_FILE,
    diagnostic_key,
    empty_patch_lists,
    patch_path,
)

# fault name -> what break_patch writes in place of a good patch
FAULTS = (
    "missing",  # file deleted
    "garbage",  # random bytes, not a TIFF
    "truncated",  # a valid TIFF cut to 60% of its bytes
    "three_channels",  # (3, H, W) uint16
    "channel_last",  # (H, W, 2) uint16
    "uint8",  # (2, H, W) uint8
    "float32",  # (2, H, W) float32
    "size",  # (2, H + 4, W + 4) uint16: a different patch size
)


@dataclass
class OpenSRHFixture:
    """A written dataset: its root, the metadata as written, and helpers to damage it."""

    root: str
    meta: dict
    split: dict
    size: int
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed + 1)

    @property
    def meta_path(self) -> str:
        return os.path.join(self.root, META_FILE)

    @property
    def split_path(self) -> str:
        return os.path.join(self.root, SPLIT_FILE)

    def patients(self, label: str | None = None, split: str | None = None) -> list[str]:
        """Patient ids, optionally of one class and/or one split."""
        out = []
        for pid, entry in self.meta.items():
            if label is not None and entry["class"] != label:
                continue
            if split is not None and pid not in self.split[split]:
                continue
            out.append(pid)
        return out

    def used_patches(self, patient: str | None = None) -> list[str]:
        """Relative paths of the patches a patient uses for training (tumor or normal list)."""
        out = []
        for pid, entry in self.meta.items():
            if patient is not None and pid != patient:
                continue
            key = diagnostic_key(entry["class"])
            for lists in entry["slides"].values():
                out.extend(lists[key])
        return out

    def abspath(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def break_patch(self, rel: str, fault: str) -> str:
        """Replace the patch at relative path ``rel`` by one with ``fault`` (see FAULTS); returns it."""
        path = self.abspath(rel)
        s = self.size
        if fault == "missing":
            os.remove(path)
        elif fault == "garbage":
            with open(path, "wb") as handle:
                handle.write(self._rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
        elif fault == "truncated":
            with open(path, "rb") as handle:
                data = handle.read()
            with open(path, "wb") as handle:
                handle.write(data[: int(len(data) * 0.6)])
        elif fault == "three_channels":
            tifffile.imwrite(path, self._rand((3, s, s), np.uint16))
        elif fault == "channel_last":
            tifffile.imwrite(path, self._rand((s, s, 2), np.uint16))
        elif fault == "uint8":
            tifffile.imwrite(path, self._rand((2, s, s), np.uint8))
        elif fault == "float32":
            tifffile.imwrite(path, self._rand((2, s, s), np.uint16).astype(np.float32))
        elif fault == "size":
            tifffile.imwrite(path, self._rand((2, s + 4, s + 4), np.uint16))
        else:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        return path

    def write_meta(self, meta: dict | None = None, split: dict | None = None) -> None:
        """Rewrite the metadata files (default: the current ``meta``/``split``, e.g. after editing)."""
        if meta is not None:
            self.meta = meta
        if split is not None:
            self.split = split
        _dump(self.meta_path, self.meta)
        _dump(self.split_path, self.split)

    def write_raw_meta(self, text: str) -> None:
        """Overwrite ``opensrh.json`` with arbitrary text (e.g. malformed JSON)."""
        with open(self.meta_path, "w", encoding="utf-8") as handle:
            handle.write(text)

    def edited(self) -> tuple[dict, dict]:
        """Deep copies of ``meta`` and ``split`` to edit and pass to :meth:`write_meta`."""
        return copy.deepcopy(self.meta), copy.deepcopy(self.split)

    def _rand(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        high = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 65535
        return self._rng.integers(0, high, shape, endpoint=True).astype(dtype)


def _dump(path: str, obj: object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1)


def write_opensrh(
    root: str | os.PathLike,
    classes: Sequence[str] = CLASSES_OPENSRH,
    patients_per_class: dict[str, int] | None = None,
    slides_per_patient: int = 2,
    patches_per_slide: int = 2,
    nondiagnostic_per_slide: int = 1,
    size: int = 16,
    seed: int = 0,
) -> OpenSRHFixture:
    """Write a small clean OpenSRH-layout dataset under ``root`` and describe it.

    Args:
        root: folder to write into (created if missing).
        classes: classes to give patients; each gets ``patients_per_class[split]`` patients.
        patients_per_class: patients per class in each split, default ``{"train": 1, "val": 1}``.
        slides_per_patient / patches_per_slide: hierarchy size; the patches go into the list the
            patient uses (``normal_patches`` for class ``normal``, else ``tumor_patches``).
        nondiagnostic_per_slide: extra good patches in ``nondiagnostic_patches``.
        size: patch height and width.
        seed: random seed of the pixel values.

    Returns:
        An :class:`OpenSRHFixture`.
    """
    root = os.fspath(root)
    per = patients_per_class or {"train": 1, "val": 1}
    rng = np.random.default_rng(seed)
    meta: dict = {}
    split: dict = {"train": [], "val": []}
    number = 0
    for part in ("train", "val"):
        for label in classes:
            for _ in range(per.get(part, 0)):
                number += 1
                pid = f"NIO_{number:03d}" if number % 2 else f"NIO_UM_{number:03d}"
                slides = {}
                for s in range(slides_per_patient):
                    slide = str(1000 + 7 * s + number)
                    lists = empty_patch_lists()
                    counts = (
                        (diagnostic_key(label), patches_per_slide),
                        (NONDIAGNOSTIC_PATCHES, nondiagnostic_per_slide),
                    )
                    ix = 0
                    for list_key, n in counts:
                        for _ in range(n):
                            iy, jy = (ix % 3) * 300, (ix // 3 % 3) * 300
                            rel = patch_path(pid, slide, 0, ix // 9 * 1000, iy, jy)
                            path = os.path.join(root, rel)
                            os.makedirs(os.path.dirname(path), exist_ok=True)
                            arr = rng.integers(0, 65535, (2, size, size), endpoint=True).astype(
                                np.uint16
                            )
                            tifffile.imwrite(path, arr)
                            lists[list_key].append(rel)
                            ix += 1
                    slides[slide] = lists
                meta[pid] = {"class": label, "slides": slides}
                split[part].append(pid)
    fixture = OpenSRHFixture(root=root, meta=meta, split=split, size=size, seed=seed)
    fixture.write_meta()
    return fixture
