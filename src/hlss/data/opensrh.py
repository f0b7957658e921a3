"""Reader for the OpenSRH layout (see DESIGN.md, "Data facts").

::

    ROOT/meta/opensrh.json          {patient: {"class": c, "slides": {slide: {"tumor_patches": [...],
                                     "normal_patches": [...], "nondiagnostic_patches": [...]}}}}
    ROOT/meta/train_val_split.json  {"train": [patient ids], "val": [patient ids]}
    ROOT/studies/<patient>/<slide>/patches/<patient>-<slide>-<ix>_<jx>_<iy>_<jy>.tif

A patient of class ``normal`` contributes its ``normal_patches``, any other class its
``tumor_patches``; ``nondiagnostic_patches`` are left out unless asked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from hlss import CLASSES_OPENSRH
from hlss.data.table import PatchTable
from hlss.errors import DataError

META_FILE = os.path.join("meta", "opensrh.json")
SPLIT_FILE = os.path.join("meta", "train_val_split.json")
PATCH_KEYS = ("tumor_patches", "normal_patches", "nondiagnostic_patches")


def load_json(path: str) -> object:
    """Load a JSON file, turning every failure into one clear :class:`DataError` line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None


def patch_keys_for(label: str, include_nondiagnostic: bool = False) -> tuple[str, ...]:
    """Which patch lists of a slide a patient of class ``label`` uses."""
    keys = ("normal_patches",) if label == "normal" else ("tumor_patches",)
    return (*keys, "nondiagnostic_patches") if include_nondiagnostic else keys


def check_meta(meta: object, split: object, meta_path: str, split_path: str) -> None:
    """Structural checks of the two metadata files; raises on the first problem."""
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected an object of patients, got {type(meta).__name__}")
    if not isinstance(split, dict) or not all(k in split for k in ("train", "val")):
        raise DataError(f"{split_path}: expected an object with 'train' and 'val' patient lists")
    for key in ("train", "val"):
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
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DataError(f"{root}: dataset root not found")
    meta_path = os.path.join(root, meta_file or META_FILE)
    split_path = os.path.join(root, split_file or SPLIT_FILE)
    meta = load_json(meta_path)
    split = load_json(split_path)
    check_meta(meta, split, meta_path, split_path)

    split_of: dict[str, str] = {}
    for name in ("train", "val"):
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
