"""Reader for TCGA-style H&E patch datasets (8-bit RGB tiles cut from ``.svs`` slides).

Two storage forms are accepted under ``root``::

    layout "h5":      ROOT/<slide>.h5            dataset "tiles": uint8 (n, H, W, 3) or (n, 3, H, W)
    layout "folders": ROOT/<slide>/<tile>.png    (also .jpg, .jpeg, .tif, .tiff)

plus two small metadata files (paths relative to ``root`` unless absolute)::

    ROOT/labels.csv               patient,label   (or slide,label)
    ROOT/train_val_split.json     {"train": [patients], "val": [patients]}

The slide id is the file (or folder) name without its extension, e.g.
``TCGA-02-0001-01Z-00-DX1.83fa2c9e-...``; the patient is its first three barcode fields,
``TCGA-02-0001``. HDF5 tiles are referenced as ``<file>::<row>`` (see :mod:`hlss.data.io`); only
the dataset's shape is read here, never its pixels.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from hlss.data.io import H5_EXT, H5_SEP, IMAGE_EXT, TIFF_EXT, load_json
from hlss.data.manifest import read_string_csv
from hlss.data.table import SPLITS, PatchTable
from hlss.errors import DataError

LAYOUTS = ("auto", "h5", "folders")
TILE_EXT = IMAGE_EXT + TIFF_EXT
# file name suffixes stripped when matching slide names given in a labels file
SLIDE_EXT = (*H5_EXT, ".svs", ".tif", ".tiff", ".ndpi", ".mrxs")

_BARCODE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(?=$|[-._])", re.IGNORECASE)


def tcga_patient(barcode: str) -> str:
    """The patient id ``TCGA-XX-XXXX`` (upper case) of a TCGA barcode, slide name or path.

    ``"TCGA-02-0001-01Z-00-DX1.83fa.h5"`` and ``"/data/TCGA-02-0001-01Z-00-DX1"`` both give
    ``"TCGA-02-0001"``.

    Raises:
        DataError: the (base)name does not start with a TCGA barcode (``TCGA-`` + a 2-character
            tissue source site + a 4-character participant code).
    """
    name = os.path.basename(os.path.normpath(str(barcode))) if barcode else ""
    match = _BARCODE.match(name)
    if match is None:
        raise DataError(f"{barcode}: not a TCGA barcode (expected a name starting 'TCGA-XX-XXXX')")
    return match.group(1).upper()


def _strip_slide_ext(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in SLIDE_EXT else name


def _resolve(root: str, path: str) -> str:
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.join(root, path)


def read_labels(path: str) -> tuple[str, dict[str, str]]:
    """Read a labels CSV with columns ``patient,label`` or ``slide,label``.

    Returns:
        ``(key, mapping)``: ``key`` is ``"patient"`` or ``"slide"`` (``slide`` wins when both
        columns exist); ``mapping`` maps upper-case patient ids, or slide names without a slide
        file extension, to labels.

    Raises:
        DataError: the file is missing, unreadable or malformed, lacks the columns, has an empty
            value, or gives one patient/slide two different labels.
    """
    frame = read_string_csv(path, "labels file")
    key = "slide" if "slide" in frame.columns else "patient"
    if key not in frame.columns or "label" not in frame.columns:
        raise DataError(
            f"{path}: labels file needs columns patient,label or slide,label; "
            f"header has: {', '.join(frame.columns) or 'nothing'}"
        )
    keys = frame[key].str.strip()
    labels = frame["label"].str.strip()
    empty = (keys == "") | (labels == "")
    if empty.any():
        raise DataError(
            f"{path}: data row {int(empty.to_numpy().argmax()) + 1}: empty {key} or label"
        )
    keys = keys.str.upper() if key == "patient" else keys.map(_strip_slide_ext)
    mapping: dict[str, str] = {}
    for k, label in zip(keys, labels, strict=True):
        if mapping.setdefault(k, label) != label:
            raise DataError(f"{path}: {key} {k} has two labels, {mapping[k]!r} and {label!r}")
    return key, mapping


def read_split(path: str) -> dict[str, str]:
    """Read a split JSON ``{"train": [patients], "val": [patients]}``.

    Returns:
        Upper-case patient id -> ``"train"`` or ``"val"``.

    Raises:
        DataError: the file is missing or not valid JSON, lacks a ``train``/``val`` list, lists a
            non-string id, or lists a patient in both splits.
    """
    split = load_json(path)
    if not isinstance(split, dict) or not all(k in split for k in SPLITS):
        raise DataError(f"{path}: expected an object with 'train' and 'val' patient lists")
    split_of: dict[str, str] = {}
    for name in SPLITS:
        if not isinstance(split[name], list):
            raise DataError(f"{path}: '{name}' must be a list of patient ids")
        for patient in split[name]:
            if not isinstance(patient, str):
                raise DataError(f"{path}: '{name}' holds {patient!r}, not a patient id string")
            patient = patient.strip().upper()
            if split_of.get(patient, name) != name:
                raise DataError(f"{path}: patient {patient} is in both train and val")
            split_of[patient] = name
    return split_of


def _find_slides(root: str, layout: str) -> tuple[str, list[tuple[str, str]]]:
    """``(layout, [(slide name, path)])`` for the slides under ``root``, sorted by name."""
    h5_files, folders = [], []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_file() and entry.name.lower().endswith(H5_EXT):
                h5_files.append((os.path.splitext(entry.name)[0], entry.path))
            elif entry.is_dir():
                folders.append((entry.name, entry.path))
    if layout == "auto":  # folders beside .h5 files (meta/, thumbnails/) are not slides
        layout = "h5" if h5_files else "folders"
    slides = sorted(h5_files if layout == "h5" else folders)
    if not slides:
        want = "per-slide .h5 files" if layout == "h5" else "per-slide folders of tiles"
        raise DataError(f"{root}: no slides found (expected {want})")
    return layout, slides


def _h5_tile_count(path: str) -> int:
    """Number of tiles in a slide's HDF5 file, from the ``tiles`` dataset's shape only."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            tiles = handle.get("tiles")
            if not isinstance(tiles, h5py.Dataset):
                raise DataError(f"{path}: HDF5 file has no 'tiles' dataset")
            shape, dtype = tiles.shape, tiles.dtype
    except DataError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: unreadable HDF5 file ({err})") from None
    rgb = len(shape) == 4 and (shape[-1] in (3, 4) or shape[1] == 3)
    if not rgb or dtype != "uint8":
        raise DataError(
            f"{path}: 'tiles' must be uint8 RGB tiles (n, H, W, 3) or (n, 3, H, W); "
            f"got {dtype} {shape}"
        )
    return int(shape[0])


def _folder_tiles(path: str) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.path for e in entries if e.name.lower().endswith(TILE_EXT) and e.is_file())


def read_tcga(
    root: str,
    labels: str = "labels.csv",
    split: str = "train_val_split.json",
    classes: Sequence[str] | None = None,
    layout: str = "auto",
) -> PatchTable:
    """Index a TCGA-style H&E dataset into a :class:`PatchTable` (modality ``"he"``).

    One row per tile: ``path`` is ``"<slide.h5>::<row>"`` (layout ``"h5"``) or the tile image
    (layout ``"folders"``); ``slide`` is the file/folder name without extension; ``patient`` is
    :func:`tcga_patient` of it. Slides are visited in sorted order, tiles in row / file-name order.

    Args:
        root: folder of per-slide ``.h5`` files or of per-slide tile folders.
        labels: labels CSV (``patient,label`` or ``slide,label``), relative to ``root`` unless
            absolute. Slide names may be given with or without their file extension.
        split: split JSON ``{"train": [...], "val": [...]}`` of patient ids, relative to ``root``
            unless absolute.
        classes: class names, index = position; ``None``: the sorted labels of the indexed rows.
        layout: ``"h5"``, ``"folders"`` or ``"auto"`` (``"h5"`` if ``root`` holds any ``.h5``
            file, else ``"folders"``).

    Returns:
        The table; ``table.extra["skipped"]`` counts the *slides* left out per reason:
        ``"no_label"`` (no label for the slide or its patient), ``"not_in_split"`` (patient in
        neither split) and ``"no_tiles"`` (empty HDF5 dataset or tile folder).

    Raises:
        DataError: ``root`` is missing; no slides are found; a slide name is not a TCGA
            barcode (a tile-free, non-barcode folder such as ``meta/`` is ignored); the labels or split file is
            missing or malformed; a patient is in both splits; a label is not in ``classes``; an
            HDF5 file lacks a uint8 RGB ``tiles`` dataset or cannot be read; an unknown
            ``layout``; or nothing is left to index.
    """
    root = os.path.abspath(os.path.expanduser(str(root)))
    if layout not in LAYOUTS:
        raise DataError(f"{root}: unknown TCGA layout {layout!r}; expected one of {list(LAYOUTS)}")
    if not os.path.isdir(root):
        raise DataError(f"{root}: dataset root not found")
    labels_path, split_path = _resolve(root, labels), _resolve(root, split)
    layout, slides = _find_slides(root, layout)
    key, label_of = read_labels(labels_path)
    split_of = read_split(split_path)
    known = None if classes is None else {str(c) for c in classes}

    skipped = {"no_label": 0, "not_in_split": 0, "no_tiles": 0}
    patients, slide_ids, paths, labels_col, splits = [], [], [], [], []
    non_slides = 0
    for slide, path in slides:
        try:
            patient = tcga_patient(slide)
        except DataError:
            if layout == "folders" and not _folder_tiles(path):
                non_slides += 1  # a folder without tiles (e.g. meta/) is not a slide
                continue
            raise DataError(
                f"{path}: slide name is not a TCGA barcode (TCGA-XX-XXXX-...)"
            ) from None
        if key == "patient":
            label = label_of.get(patient)
        else:
            label = label_of.get(slide, label_of.get(slide.split(".")[0]))
        if label is None:
            skipped["no_label"] += 1
            continue
        part = split_of.get(patient)
        if part is None:
            skipped["not_in_split"] += 1
            continue
        if known is not None and label not in known:
            raise DataError(
                f"{labels_path}: {key} {patient if key == 'patient' else slide} has label "
                f"{label!r}, not one of {list(classes)}"
            )
        if layout == "h5":
            n = _h5_tile_count(path)
            tiles = [f"{path}{H5_SEP}{i}" for i in range(n)]
        else:
            tiles = _folder_tiles(path)
            n = len(tiles)
        if n == 0:
            skipped["no_tiles"] += 1
            continue
        paths.extend(tiles)
        patients.extend([patient] * n)
        slide_ids.extend([slide] * n)
        labels_col.extend([label] * n)
        splits.extend([part] * n)

    if non_slides == len(slides):
        raise DataError(f"{root}: no slides found (expected TCGA-named folders of tile images)")
    if not paths:
        detail = ", ".join(f"{k}={v}" for k, v in skipped.items() if v)
        raise DataError(f"{root}: no usable tiles (slides skipped: {detail or 'none'})")
    table = PatchTable.from_records(
        patients,
        slide_ids,
        paths,
        labels_col,
        splits,
        classes=classes,
        modality="he",
        name=f"tcga:{root}",
    )
    table.extra["skipped"] = skipped
    table.extra["layout"] = layout
    return table
