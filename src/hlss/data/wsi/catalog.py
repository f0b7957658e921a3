"""Slides, their patients, labels and splits, and the ``manifest.csv`` of a tiled folder.

* Slides: a folder (searched recursively, as the GDC client downloads one folder per file), a
  glob pattern or one file; the slide id is the file name without its extension.
* Patient: from a labels/mapping CSV when it has ``slide`` and ``patient`` columns, else the
  TCGA barcode of the slide name (``TCGA-XX-XXXX``), else the slide id itself (one patient per
  slide; counted in the summary, so a missing mapping is not silent).
* Label: from the labels CSV by slide, else by patient; without a labels CSV every slide is
  ``unlabelled``.
* Split: a given file (OpenSRH/TCGA JSON ``{"train": [patients], "val": [patients]}`` or a CSV
  ``patient,split``), else a random patient-disjoint split with a seed, stratified by label.

The output folder then holds ``manifest.csv`` (``patient,slide,path,label,split,x,y,mpp``, paths
relative to the folder: ``<slide>.h5::<row>``) for ``dataset=manifest``, and ``labels.csv`` +
``train_val_split.json`` so that ``dataset=tcga dataset.root=OUT`` reads TCGA-named slides too.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from hlss.atomic import atomic_file
from hlss.data.io import H5_SEP
from hlss.data.manifest import read_string_csv
from hlss.data.table import SPLITS
from hlss.data.tcga import read_split, tcga_patient
from hlss.data.wsi.slide import SLIDE_EXT
from hlss.errors import ConfigError, DataError

UNLABELLED = "unlabelled"
MANIFEST = "manifest.csv"
LABELS = "labels.csv"
SPLIT = "train_val_split.json"
MANIFEST_COLUMNS = ("patient", "slide", "path", "label", "split", "x", "y", "mpp")


@dataclass
class SlideEntry:
    """One slide to tile: ``name`` (the slide id and output file stem), ``path`` (source file),
    ``patient``, ``label``, and ``patient_from``: ``"table"``, ``"barcode"`` or ``"slide"``."""

    name: str
    path: str
    patient: str
    label: str
    patient_from: str


def slide_name(path: str) -> str:
    """The slide id of a slide file: its name without the extension."""
    return os.path.splitext(os.path.basename(path))[0]


def find_slides(spec: str) -> list[str]:
    """The slide files named by ``spec``, sorted: a folder (searched recursively for
    :data:`SLIDE_EXT` files), a glob pattern (``**`` allowed) or one file.

    Raises:
        ConfigError: nothing matches (one line naming ``slides``).
    """
    spec = os.path.expanduser(str(spec))
    if os.path.isdir(spec):
        found = []
        for folder, dirs, files in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(
                os.path.join(folder, f)
                for f in files
                if f.lower().endswith(SLIDE_EXT) and not f.startswith(".")
            )
        if not found:
            raise ConfigError(
                f"slides={spec}: no slide files in the folder (looked for {', '.join(SLIDE_EXT)})"
            )
        return sorted(os.path.abspath(p) for p in found)
    if os.path.isfile(spec):
        return [os.path.abspath(spec)]
    matches = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    if not matches:
        raise ConfigError(f"slides={spec}: no such file or folder, and no file matches it")
    return sorted(os.path.abspath(p) for p in matches)


def patient_id(text: str) -> str:
    """A patient id as given, stripped; TCGA ids upper-cased (as :mod:`hlss.data.tcga` does)."""
    text = text.strip()
    return text.upper() if text.upper().startswith("TCGA-") else text


def _key(name: str) -> str:
    """A slide name as written in a table: the extension of a slide file stripped."""
    stem, ext = os.path.splitext(name.strip())
    return stem if ext.lower() in (*SLIDE_EXT, ".h5") else name.strip()


@dataclass
class SlideTable:
    """A user's CSV about slides: label and/or patient per slide, or label per patient."""

    path: str
    by_slide: dict[str, dict[str, str]]
    by_patient: dict[str, str]
    has_labels: bool

    def lookup(self, slide: str) -> dict[str, str]:
        """The row of ``slide`` (its full id, or the part before the first dot: a TCGA slide
        file ``TCGA-..-DX1.<uuid>`` is often listed without the uuid)."""
        row = self.by_slide.get(slide)
        if row is None:
            row = self.by_slide.get(slide.split(".")[0], {})
        return row


def read_slide_table(path: str) -> SlideTable:
    """Read a labels / mapping CSV: columns ``slide,label``, ``patient,label``,
    ``slide,patient,label`` or ``slide,patient`` (case and spaces in the header ignored).

    Raises:
        DataError: the file is missing or malformed, lacks the columns, has an empty key, or
            gives one slide/patient two different labels or one slide two patients.
    """
    frame = read_string_csv(path, "labels file")
    cols = set(frame.columns)
    if not (
        {"slide", "label"} <= cols or {"patient", "label"} <= cols or {"slide", "patient"} <= cols
    ):
        raise DataError(
            f"{path}: needs columns slide,label or patient,label or slide,patient[,label]; "
            f"header has: {', '.join(frame.columns) or 'nothing'}"
        )
    has_labels = "label" in cols
    by_slide: dict[str, dict[str, str]] = {}
    by_patient: dict[str, str] = {}
    for index, record in enumerate(frame.to_dict("records"), start=1):
        row = {
            k: str(record.get(k, "")).strip() for k in ("slide", "patient", "label") if k in cols
        }
        empty = [k for k, v in row.items() if not v]
        if empty:
            raise DataError(f"{path}: data row {index}: empty {', '.join(empty)}")
        if "slide" in row:
            slide = _key(row.pop("slide"))
            if "patient" in row:
                row["patient"] = patient_id(row["patient"])
            before = by_slide.setdefault(slide, row)
            for key, value in row.items():
                if before.get(key, value) != value:
                    raise DataError(
                        f"{path}: slide {slide} has two {key}s, {before[key]!r} and {value!r}"
                    )
        else:
            patient = patient_id(row["patient"])
            if by_patient.setdefault(patient, row["label"]) != row["label"]:
                raise DataError(
                    f"{path}: patient {patient} has two labels, "
                    f"{by_patient[patient]!r} and {row['label']!r}"
                )
    return SlideTable(os.path.abspath(path), by_slide, by_patient, has_labels)


def catalog(paths: Sequence[str], table: SlideTable | None) -> tuple[list[SlideEntry], list[str]]:
    """Name, patient and label of each slide file.

    Returns:
        ``(entries, unlabelled)``: the slides to tile, sorted by name, and the names of slides
        left out because the labels CSV gives no label for them or their patient.

    Raises:
        ConfigError: two slide files have the same name (both named).
    """
    seen: dict[str, str] = {}
    for path in paths:
        name = slide_name(path)
        if name in seen:
            raise ConfigError(
                f"slides: two files give the slide id {name!r}: {seen[name]} and {path}"
            )
        seen[name] = path
    entries, unlabelled = [], []
    for name in sorted(seen):
        row = table.lookup(name) if table is not None else {}
        if "patient" in row:
            patient, source = row["patient"], "table"
        else:
            try:
                patient, source = tcga_patient(name), "barcode"
            except DataError:
                patient, source = name, "slide"
        label = row.get("label") or (table.by_patient.get(patient) if table is not None else None)
        if label is None:
            if table is not None and table.has_labels:
                unlabelled.append(name)
                continue
            label = UNLABELLED
        entries.append(SlideEntry(name, seen[name], patient, label, source))
    return entries, unlabelled


def read_split_file(path: str) -> dict[str, str]:
    """Patient -> ``train``/``val`` from a JSON ``{"train": [...], "val": [...]}`` (OpenSRH /
    TCGA layout) or a CSV with columns ``patient,split``. TCGA ids are upper-cased.

    Raises:
        DataError: missing or malformed file, a split other than train/val, a patient twice.
    """
    if not path.lower().endswith(".csv"):
        return read_split(path)
    frame = read_string_csv(path, "split file")
    if not {"patient", "split"} <= set(frame.columns):
        raise DataError(
            f"{path}: split CSV needs columns patient,split; header has: {', '.join(frame.columns)}"
        )
    split_of: dict[str, str] = {}
    for index, (patient, part) in enumerate(zip(frame["patient"], frame["split"], strict=True), 1):
        patient, part = patient.strip(), part.strip().lower()
        patient = patient_id(patient)
        if part not in SPLITS:
            raise DataError(
                f"{path}: data row {index}: split {part!r} is not one of {list(SPLITS)}"
            )
        if split_of.setdefault(patient, part) != part:
            raise DataError(f"{path}: patient {patient} is in both train and val")
    return split_of


def random_split(
    patients_by_label: dict[str, Iterable[str]], val_fraction: float, seed: int
) -> dict[str, str]:
    """A patient-disjoint split: per label, ``round(val_fraction * n)`` random patients in
    ``val`` (at least one and never all when the label has two or more patients, none when it
    has one), the rest in ``train``. The same seed and patients give the same split."""
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    for label in sorted(patients_by_label):
        patients = sorted(set(patients_by_label[label]) - set(split_of))
        n = len(patients)
        n_val = min(max(round(val_fraction * n), 1), n - 1) if n >= 2 and val_fraction > 0 else 0
        order = rng.permutation(n)
        for rank, index in enumerate(order):
            split_of[patients[index]] = "val" if rank < n_val else "train"
    return split_of


def _mpp_text(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.6g}"


def write_outputs(
    out: str, finished: Sequence[tuple[SlideEntry, np.ndarray, float]], split_of: dict[str, str]
) -> str:
    """Write ``manifest.csv``, ``labels.csv`` and ``train_val_split.json`` into ``out``.

    Args:
        finished: ``(entry, coords [n, 2] level-0 (x, y), mpp)`` per finished slide.
        split_of: patient -> ``train``/``val`` for every patient of ``finished``.

    Returns:
        The manifest's path. Each file is written to a temporary name and renamed.
    """
    manifest = os.path.join(out, MANIFEST)
    with atomic_file(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for entry, coords, mpp in sorted(finished, key=lambda f: f[0].name):
            part, mpp_text = split_of[entry.patient], _mpp_text(mpp)
            for row, (x, y) in enumerate(coords.tolist()):
                writer.writerow(
                    (
                        entry.patient,
                        entry.name,
                        f"{entry.name}.h5{H5_SEP}{row}",
                        entry.label,
                        part,
                        x,
                        y,
                        mpp_text,
                    )
                )
    with atomic_file(os.path.join(out, LABELS), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("slide", "patient", "label"))
        for entry, _, _ in sorted(finished, key=lambda f: f[0].name):
            writer.writerow((entry.name, entry.patient, entry.label))
    patients = {entry.patient for entry, _, _ in finished}
    split = {part: sorted(p for p in patients if split_of[p] == part) for part in SPLITS}
    with atomic_file(os.path.join(out, SPLIT), "w", encoding="utf-8") as handle:
        json.dump(split, handle, indent=1)
        handle.write("\n")
    return manifest
