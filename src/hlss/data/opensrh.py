"""The OpenSRH layout, defined once, and its reader (see DESIGN.md, "Data facts").

::

    ROOT/meta/opensrh.json          {patient: {"class": c, "slides": {slide: {"tumor_patches": [...],
                                     "normal_patches": [...], "nondiagnostic_patches": [...]}}}}
    ROOT/meta/train_val_split.json  {"train": [patient ids], "val": [patient ids]}
    ROOT/studies/<patient>/<slide>/patches/<patient>-<slide>-<ix>_<jx>_<iy>_<jy>.tif

A patient of class ``normal`` contributes its ``normal_patches``, any other class its
``tumor_patches``; ``nondiagnostic_patches`` are left out unless asked for.

The names of this layout (metadata files, patch lists, patch paths) are defined here and nowhere
else: the synthetic generator writes with them, the validator and the reader read with them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from hlss import CLASSES_OPENSRH
from hlss.data.io import load_json
from hlss.data.table import SPLITS, PatchTable
from hlss.errors import DataError

META_DIR = "meta"
META_NAME = "opensrh.json"
SPLIT_NAME = "train_val_split.json"
META_FILE = os.path.join(META_DIR, META_NAME)
SPLIT_FILE = os.path.join(META_DIR, SPLIT_NAME)
STUDIES_DIR = "studies"

TUMOR_PATCHES = "tumor_patches"
NORMAL_PATCHES = "normal_patches"
NONDIAGNOSTIC_PATCHES = "nondiagnostic_patches"
PATCH_KEYS = (TUMOR_PATCHES, NORMAL_PATCHES, NONDIAGNOSTIC_PATCHES)
NORMAL_CLASS = "normal"

PATCH_PATH_RE = re.compile(
    rf"^{STUDIES_DIR}/(?P<patient>[^/]+)/(?P<slide>[^/]+)/patches/"
    r"(?P=patient)-(?P=slide)-(?P<ix>\d+)_(?P<jx>\d+)_(?P<iy>\d+)_(?P<jy>\d+)\.tif$"
)
"""A patch path relative to the root; groups ``patient``, ``slide``, ``ix``, ``jx``, ``iy``, ``jy``."""

__all__ = [
    "META_DIR",
    "META_FILE",
    "META_NAME",
    "NONDIAGNOSTIC_PATCHES",
    "NORMAL_CLASS",
    "NORMAL_PATCHES",
    "PATCH_KEYS",
    "PATCH_PATH_RE",
    "SPLIT_FILE",
    "SPLIT_NAME",
    "STUDIES_DIR",
    "TUMOR_PATCHES",
    "check_meta",
    "diagnostic_key",
    "empty_patch_lists",
    "load_json",
    "metadata_paths",
    "parse_patch_path",
    "patch_dir",
    "patch_keys_for",
    "patch_path",
    "read_opensrh",
]


def diagnostic_key(label: str) -> str:
    """The patch list holding a patient's diagnostic patches: ``normal_patches`` for class
    ``normal``, ``tumor_patches`` for every other class."""
    return NORMAL_PATCHES if label == NORMAL_CLASS else TUMOR_PATCHES


def patch_keys_for(label: str, include_nondiagnostic: bool = False) -> tuple[str, ...]:
    """Which patch lists of a slide a patient of class ``label`` uses."""
    key = diagnostic_key(label)
    return (key, NONDIAGNOSTIC_PATCHES) if include_nondiagnostic else (key,)


def empty_patch_lists() -> dict[str, list[str]]:
    """A slide entry with the three patch lists, all empty, in :data:`PATCH_KEYS` order."""
    return {key: [] for key in PATCH_KEYS}


def patch_dir(patient: str, slide: str) -> str:
    """``studies/<patient>/<slide>/patches``: a slide's patch folder, relative, ``/``-separated."""
    return f"{STUDIES_DIR}/{patient}/{slide}/patches"


def patch_path(patient: str, slide: str, ix: int, jx: int, iy: int, jy: int) -> str:
    """Relative path of one patch: ``<patch_dir>/<patient>-<slide>-<ix>_<jx>_<iy>_<jy>.tif``.

    ``ix``/``jx`` place the 1000-px field on the slide, ``iy``/``jy`` the patch inside it.
    Metadata lists hold these ``/``-separated paths; join them to the root to open a file.
    """
    return f"{patch_dir(patient, slide)}/{patient}-{slide}-{ix}_{jx}_{iy}_{jy}.tif"


def parse_patch_path(rel: str) -> tuple[str, str, int, int, int, int] | None:
    """Inverse of :func:`patch_path`: ``(patient, slide, ix, jx, iy, jy)``, or None when ``rel``
    does not follow the naming rule (wrong folder, name not matching its folders, not ``.tif``)."""
    match = PATCH_PATH_RE.match(str(rel))
    if match is None:
        return None
    ix, jx, iy, jy = (int(match[k]) for k in ("ix", "jx", "iy", "jy"))
    return match["patient"], match["slide"], ix, jx, iy, jy


def metadata_paths(
    root: str, meta_file: str | None = None, split_file: str | None = None
) -> tuple[str, str, str]:
    """Absolute ``(root, metadata path, split path)`` of a dataset.

    ``meta_file``/``split_file`` default to :data:`META_FILE`/:data:`SPLIT_FILE`; relative paths
    are joined to ``root``, absolute ones stay absolute.

    Raises:
        DataError: ``root`` is not a folder.
    """
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DataError(f"{root}: dataset root not found")
    meta_path = os.path.join(root, meta_file or META_FILE)
    split_path = os.path.join(root, split_file or SPLIT_FILE)
    return root, meta_path, split_path


def check_meta(meta: object, split: object, meta_path: str, split_path: str) -> None:
    """Structural checks of the two metadata files; raises on the first problem.

    Raises:
        DataError: ``meta`` is not an object, ``split`` lacks a ``train`` or ``val`` list.
    """
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected an object of patients, got {type(meta).__name__}")
    if not isinstance(split, dict) or not all(k in split for k in SPLITS):
        raise DataError(f"{split_path}: expected an object with 'train' and 'val' patient lists")
    for key in SPLITS:
        if not isinstance(split[key], list):
            raise DataError(f"{split_path}: '{key}' must be a list of patient ids")


def read_opensrh(
    root: str,
    include_nondiagnostic: bool = False,
    classes: Sequence[str] = CLASSES_OPENSRH,
    meta_file: str | None = None,
    split_file: str | None = None,
) -> PatchTable:
    """Index an OpenSRH-layout dataset into a :class:`PatchTable` (no image is opened).

    Args:
        root: dataset root holding ``meta/`` and ``studies/``.
        include_nondiagnostic: also index ``nondiagnostic_patches`` (labelled with the patient's class).
        classes: class names; index = position. Defaults to the 7 OpenSRH classes.
        meta_file / split_file: alternative metadata files (e.g. a cleaned copy from
            ``hlss-validate``); relative paths are taken relative to ``root``.

    Raises:
        DataError: missing root or metadata, malformed JSON, a patient without class or slides,
            an unknown class, or a patient listed in both splits.
    """
    root, meta_path, split_path = metadata_paths(root, meta_file, split_file)
    meta = load_json(meta_path)
    split = load_json(split_path)
    check_meta(meta, split, meta_path, split_path)

    split_of: dict[str, str] = {}
    for name in SPLITS:
        for patient in split[name]:
            if split_of.get(patient, name) != name:
                raise DataError(f"{split_path}: patient {patient} is in both train and val")
            split_of[patient] = name

    known = set(classes)
    patients, slides, paths, labels, splits = [], [], [], [], []
    join = os.path.join
    for patient, entry in meta.items():
        if patient not in split_of:
            continue  # in neither split: not used (hlss-validate reports it)
        if not isinstance(entry, dict) or "class" not in entry or "slides" not in entry:
            raise DataError(f"{meta_path}: patient {patient} lacks 'class' or 'slides'")
        label = entry["class"]
        if label not in known:
            raise DataError(
                f"{meta_path}: patient {patient} has unknown class {label!r}; known: {sorted(known)}"
            )
        part = split_of[patient]
        keys = patch_keys_for(label, include_nondiagnostic)
        for slide, lists in entry["slides"].items():
            if not isinstance(lists, dict):
                raise DataError(
                    f"{meta_path}: patient {patient} slide {slide} is not an object of patch lists"
                )
            for key in keys:
                rel = lists.get(key, [])
                if not isinstance(rel, list):
                    raise DataError(
                        f"{meta_path}: patient {patient} slide {slide} '{key}' is not a list"
                    )
                n = len(rel)
                if not n:
                    continue
                paths.extend(join(root, p) for p in rel)
                patients.extend([patient] * n)
                slides.extend([str(slide)] * n)
                labels.extend([label] * n)
                splits.extend([part] * n)
    if not paths:
        raise DataError(
            f"{meta_path}: no usable patches (check the class/patch-list rule and the split file)"
        )
    return PatchTable.from_records(
        patients,
        slides,
        paths,
        labels,
        splits,
        classes=classes,
        modality="srh",
        name=f"opensrh:{root}",
    )
