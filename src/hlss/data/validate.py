"""Check an OpenSRH-layout dataset against its metadata (``hlss-validate``).

:func:`validate_opensrh` reads ``meta/opensrh.json`` and ``meta/train_val_split.json`` (see
DESIGN.md, "Data facts"), optionally opens every patch file it would train on, and returns a
:class:`~hlss.data.report.ValidationReport`: a list of findings (their severities are explained in
:mod:`hlss.data.report`), summary counts per split and class, a readable text report and a cleaned
copy of the metadata (:meth:`~hlss.data.report.ValidationReport.write_clean_meta`).

The trainability rule
    The dataset is *trainable* when training could start from the **cleaned** metadata, i.e.
    unless one of these holds:

    * a metadata file is missing, is not valid JSON, or has the wrong top-level structure;
    * nothing usable remains (no patient with at least one good patch in any split);
    * some class has no usable patient in ``train`` or none in ``val`` (the model could not learn
      it, or it could not be evaluated).

    Errors about single files or single patients do *not* make a dataset untrainable on their own:
    they are dropped from the cleaned metadata, and the report says so. Training with the original
    metadata would still meet those files (and drop them); use the cleaned copy. ``hlss-validate``
    exits 1 on any error all the same (:meth:`~hlss.data.report.ValidationReport.exit_status`).

What is checked, one pass each (in this order)
    1. metadata files (:func:`read_metadata`): both JSON files readable, of the right top-level
       structure.
    2. split (:func:`split_membership`): patients in both splits; split patients absent from the
       metadata; duplicates.
    3. patient entries (:func:`patient_lists`): every patient entry has ``class`` and ``slides``;
       every class is known; metadata patients in neither split (warning); every slide is an
       object of patch lists; the patch lists are lists of strings (a missing list is a warning and
       counts as empty); duplicate patch paths.
    4. files (:func:`check_files`, when ``check_images=True``), only of the lists a patient uses
       (:func:`hlss.data.opensrh.patch_keys_for`): missing files, unreadable TIFFs, truncated
       TIFFs, shape other than ``(2, H, W)``, channel-last ``(H, W, 2)``, dtype other than uint16
       (:func:`hlss.data.io.inspect_patch`), a size other than ``expected_size`` (error) or,
       without it, a size different from the majority (warning).
    5. patients (:func:`judge_patients`): the file verdicts per patient and slide, counts, slides
       and patients with no usable patch left (patients dropped), the cleaned metadata.
    6. classes (:func:`class_coverage`): something usable remains, every class present in both
       splits.

Patients that are dropped for a metadata reason (no class, unknown class, both splits) are not
file-checked. Images are read one at a time (in a process pool when ``workers > 0``) and only their
verdict is kept, so the check scales to the ~300k files of the real dataset.
"""

from __future__ import annotations

import os
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hlss import CLASSES_OPENSRH
from hlss.data.clean_out import check_clean_out
from hlss.data.io import inspect_patch, load_json
from hlss.data.opensrh import PATCH_KEYS, metadata_paths, patch_keys_for
from hlss.data.patch_scan import inspect_many
from hlss.data.report import CODES, Counts, Finding, ValidationReport
from hlss.data.table import SPLITS
from hlss.errors import DataError, HLSSError

__all__ = [
    "CODES",
    "Counts",
    "FileVerdicts",
    "Finding",
    "PatientLists",
    "ValidationReport",
    "check_clean_out",
    "check_files",
    "class_coverage",
    "inspect_patch",
    "judge_patients",
    "metadata_paths",
    "patient_lists",
    "read_metadata",
    "split_membership",
    "used_files",
    "validate_opensrh",
]


@dataclass
class PatientLists:
    """What pass 3 keeps of one patient: its class, split (``train``/``val``/``none``) and
    ``{slide: {patch-list key: [relative path, ...]}}`` with every :data:`PATCH_KEYS` key.

    The lists the patient uses hold unique path strings; the others are copied unchecked (a
    non-list becomes ``[]``)."""

    label: str
    part: str
    slides: dict[str, dict[str, list[str]]]


@dataclass
class FileVerdicts:
    """What pass 4 found about the files: ``bad`` maps a relative path to ``(code, message)``,
    ``odd`` a good path to its ``(H, W)`` when that differs from ``majority_size`` (only when no
    ``expected_size`` is enforced)."""

    bad: dict[str, tuple[str, str]] = field(default_factory=dict)
    odd: dict[str, tuple[int, int]] = field(default_factory=dict)
    majority_size: tuple[int, int] | None = None
    files_checked: int = 0


# ---------------------------------------------------------------------- 1. metadata files
def read_metadata(
    meta_path: str, split_path: str, findings: list[Finding]
) -> tuple[dict | None, dict | None]:
    """Load both JSON files; a failure is a ``meta_unreadable``/``meta_structure`` finding.

    Returns:
        ``(meta, split)``; either is None when it could not be read or has the wrong structure
        (``meta``: an object of patients; ``split``: an object with ``train`` and ``val`` lists).
    """
    loaded: list[object] = []
    for path in (meta_path, split_path):
        try:
            loaded.append(load_json(path))
        except DataError as err:
            findings.append(Finding.of("meta_unreadable", str(err), path=path))
            loaded.append(None)
    meta, split = loaded
    if meta is not None and not isinstance(meta, dict):
        message = f"{meta_path}: expected an object of patients, got {type(meta).__name__}"
        findings.append(Finding.of("meta_structure", message, path=meta_path))
        meta = None
    if split is not None:
        ok = isinstance(split, dict) and all(isinstance(split.get(k), list) for k in SPLITS)
        if not ok:
            message = (
                f"{split_path}: expected an object with 'train' and 'val' lists of patient ids"
            )
            findings.append(Finding.of("meta_structure", message, path=split_path))
            split = None
    return meta, split  # type: ignore[return-value]


# ---------------------------------------------------------------------- 2. split
def split_membership(split: dict, meta: dict, findings: list[Finding]) -> dict[str, str]:
    """Map patient -> ``train`` | ``val`` | ``both`` from the split file, reporting its problems
    (non-string entries, duplicates, patients in both splits, patients absent from ``meta``)."""
    member: dict[str, str] = {}
    for part in SPLITS:
        seen: set[str] = set()
        for pid in split[part]:
            if not isinstance(pid, str):
                message = f"{part} holds {pid!r}, not a patient id string"
                findings.append(Finding.of("bad_split_entry", message))
                continue
            if pid in seen:
                findings.append(Finding.of("duplicate_in_split", f"listed twice in {part}", pid))
                continue
            seen.add(pid)
            member[pid] = "both" if member.get(pid, part) != part else part
    for pid, part in member.items():
        if part == "both":
            message = "listed in both train and val; dropped from both"
            findings.append(Finding.of("in_both_splits", message, pid))
        if pid not in meta:
            message = f"in {part} of the split file but not in the metadata"
            findings.append(Finding.of("not_in_metadata", message, pid))
    return member


# ---------------------------------------------------------------------- 3. patient entries
def patient_lists(
    meta: dict,
    member: dict[str, str],
    classes: Sequence[str],
    include_nondiagnostic: bool,
    findings: list[Finding],
) -> dict[str, PatientLists]:
    """Check the structure and class of every patient entry; keep the usable ones.

    Patients in both splits are skipped (already reported); entries without ``class`` or a
    ``slides`` object and unknown classes are dropped with a finding.

    Returns:
        ``{patient: PatientLists}`` in metadata order.
    """
    known = set(classes)
    kept: dict[str, PatientLists] = {}
    for pid, entry in meta.items():
        part = member.get(pid, "none")
        if part == "both":
            continue
        if (
            not isinstance(entry, dict)
            or "class" not in entry
            or not isinstance(entry.get("slides"), dict)
        ):
            message = "entry lacks 'class' or a 'slides' object; dropped"
            findings.append(Finding.of("bad_patient_entry", message, pid))
            continue
        label = entry["class"]
        if not isinstance(label, str) or label not in known:
            message = f"unknown class {label!r}; known: {', '.join(classes)}"
            findings.append(Finding.of("unknown_class", message, pid))
            continue
        if part == "none":
            message = "in the metadata but in neither train nor val; unused"
            findings.append(Finding.of("not_in_split", message, pid))
        used = patch_keys_for(label, include_nondiagnostic)
        slides: dict[str, dict[str, list[str]]] = {}
        for slide, lists in entry["slides"].items():
            if not isinstance(lists, dict):
                message = "slide is not an object of patch lists; dropped"
                findings.append(Finding.of("bad_slide_entry", message, pid, slide))
                continue
            slides[str(slide)] = _slide_lists(pid, slide, lists, used, findings)
        kept[pid] = PatientLists(label, part, slides)
    return kept


def _slide_lists(
    pid: str, slide: str, lists: dict, used: tuple[str, ...], findings: list[Finding]
) -> dict[str, list[str]]:
    """The three patch lists of one slide: non-strings dropped, used lists without duplicates."""
    out: dict[str, list[str]] = {}
    seen: set[str] = set()
    for key in PATCH_KEYS:
        if key not in lists:
            if key in used:
                message = f"no '{key}' list (treated as empty)"
                findings.append(Finding.of("missing_patch_list", message, pid, slide))
            out[key] = []
            continue
        listed = lists[key]
        if not isinstance(listed, list):
            message = f"'{key}' is a {type(listed).__name__}, not a list; emptied"
            findings.append(Finding.of("bad_patch_list", message, pid, slide))
            out[key] = []
            continue
        good = [p for p in listed if isinstance(p, str) and p]
        if len(good) != len(listed):
            message = f"'{key}' holds {len(listed) - len(good)} item(s) that are not path strings; dropped"
            findings.append(Finding.of("bad_patch_list", message, pid, slide))
        if key in used:
            unique = []
            for p in good:
                if p in seen:
                    message = f"listed more than once in {key}"
                    findings.append(Finding.of("duplicate_patch", message, pid, slide, p))
                    continue
                seen.add(p)
                unique.append(p)
            good = unique
        out[key] = good
    return out


def used_files(kept: dict[str, PatientLists], include_nondiagnostic: bool) -> list[str]:
    """The distinct relative paths of the lists the kept patients use, in metadata order."""
    paths: dict[str, None] = {}  # ordered set
    for patient in kept.values():
        used = patch_keys_for(patient.label, include_nondiagnostic)
        for lists in patient.slides.values():
            for key in PATCH_KEYS:
                if key in used:
                    paths.update(dict.fromkeys(lists[key]))
    return list(paths)


# ---------------------------------------------------------------------- 4. files
def check_files(
    root: str,
    paths: Sequence[str],
    expected_size: int | None = None,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> FileVerdicts:
    """Judge every file (relative ``paths`` joined to ``root``) with
    :func:`hlss.data.io.inspect_patch`, in ``workers`` processes when ``workers > 0``.

    With ``expected_size`` (> 0) a good patch of another ``(H, W)`` is bad (``wrong_size``);
    without it, good patches whose size differs from the majority are listed in ``odd``.
    Only the verdicts are kept (sizes as small ids), so memory stays small for ~300k files.
    """
    verdicts = FileVerdicts(files_checked=len(paths))
    if not paths:
        return verdicts
    want = (expected_size, expected_size) if expected_size else None
    size_ids: dict[tuple[int, int], int] = {}
    size_of = array("i")  # per path, in order; -1 = bad
    absolute = [os.path.join(root, p) for p in paths]
    for rel, (code, message, hw) in zip(
        paths, inspect_many(absolute, workers, progress), strict=True
    ):
        if not code and want is not None and hw != want:
            code, message = "wrong_size", f"size {hw[0]}x{hw[1]}, expected {want[0]}x{want[1]}"
        if code:
            verdicts.bad[rel] = (code, message)
            size_of.append(-1)
        else:
            size_of.append(size_ids.setdefault(hw, len(size_ids)))
    if size_ids:
        by_id = {i: hw for hw, i in size_ids.items()}
        tally = Counter(i for i in size_of if i >= 0)
        majority = tally.most_common(1)[0][0]
        verdicts.majority_size = by_id[majority]
        if want is None and len(tally) > 1:
            verdicts.odd = {
                rel: by_id[i]
                for rel, i in zip(paths, size_of, strict=True)
                if i >= 0 and i != majority
            }
    return verdicts


# ---------------------------------------------------------------------- 5. patients
def judge_patients(
    kept: dict[str, PatientLists],
    files: FileVerdicts,
    classes: Sequence[str],
    include_nondiagnostic: bool,
    findings: list[Finding],
) -> tuple[dict[tuple[str, str], Counts], Counts, dict[str, dict]]:
    """Apply the file verdicts to every kept patient: counts, findings and the cleaned metadata.

    Bad files leave the patch lists (an error each), odd sizes stay (a warning each); a slide with
    no usable patch is a warning, a patient with none is dropped (an error).

    Returns:
        ``(counts, unassigned, clean_meta)``: ``{(split, class): Counts}`` for ``train``/``val``,
        the counts of patients in neither split, and ``{patient: {"class", "slides"}}`` of the
        patients with a usable patch.
    """
    counts = {(part, c): Counts() for part in SPLITS for c in classes}
    unassigned = Counts()
    clean_meta: dict[str, dict] = {}
    for pid, patient in kept.items():
        cell = counts[(patient.part, patient.label)] if patient.part in SPLITS else unassigned
        used = patch_keys_for(patient.label, include_nondiagnostic)
        cell.patients += 1
        patient_usable = 0
        for slide, lists in patient.slides.items():
            cell.slides += 1
            slide_usable = _judge_slide(pid, slide, lists, used, files, cell, findings)
            if slide_usable:
                cell.usable_slides += 1
            else:
                message = "no usable patch in the lists this patient uses"
                findings.append(Finding.of("empty_slide", message, pid, slide))
            patient_usable += slide_usable
        if not patient_usable:
            message = f"class {patient.label}: no usable patch; dropped"
            findings.append(Finding.of("no_usable_patches", message, pid))
            continue
        cell.usable_patients += 1
        cell.usable_patches += patient_usable
        clean_meta[pid] = {"class": patient.label, "slides": patient.slides}
    return counts, unassigned, clean_meta


def _judge_slide(
    pid: str,
    slide: str,
    lists: dict[str, list[str]],
    used: tuple[str, ...],
    files: FileVerdicts,
    cell: Counts,
    findings: list[Finding],
) -> int:
    """Drop the bad files from the used lists of one slide (in place); returns the usable count."""
    usable = 0
    for key in used:
        listed = lists[key]
        cell.patches += len(listed)
        good = []
        for rel in listed:
            verdict = files.bad.get(rel)
            if verdict is not None:
                findings.append(Finding.of(verdict[0], verdict[1], pid, slide, rel))
                cell.bad_patches += 1
                continue
            good.append(rel)
            if rel in files.odd:
                (h, w), (mh, mw) = files.odd[rel], files.majority_size  # type: ignore[misc]
                message = f"size {h}x{w}, most patches are {mh}x{mw}"
                findings.append(Finding.of("odd_size", message, pid, slide, rel))
        lists[key] = good
        usable += len(good)
    return usable


# ---------------------------------------------------------------------- 6. classes
def class_coverage(
    counts: dict[tuple[str, str], Counts],
    classes: Sequence[str],
    meta_path: str,
    findings: list[Finding],
) -> list[str]:
    """Check that something usable remains and every class has a usable patient in each split.

    Returns:
        The reasons the dataset is not trainable (empty when it is).
    """
    if not any(counts[(part, c)].usable_patients for part in SPLITS for c in classes):
        message = "no patient of train or val has a usable patch"
        findings.append(Finding.of("nothing_usable", message, path=meta_path))
        return ["nothing usable remains"]
    reasons = []
    for part in SPLITS:
        missing = [c for c in classes if not counts[(part, c)].usable_patients]
        for c in missing:
            message = f"class {c!r} has no usable patient in {part}"
            findings.append(Finding.of("class_missing_in_split", message))
        if missing:
            what = "train on" if part == "train" else "evaluate"
            reasons.append(
                f"no usable {part} patient for class(es) {', '.join(missing)} (cannot {what} them)"
            )
    return reasons


# ---------------------------------------------------------------------- entry point
def validate_opensrh(
    root: str,
    classes: Sequence[str] = CLASSES_OPENSRH,
    check_images: bool = True,
    expected_size: int | None = None,
    workers: int = 0,
    include_nondiagnostic: bool = False,
    meta_file: str | None = None,
    split_file: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ValidationReport:
    """Check an OpenSRH-layout dataset against its metadata; never raises for bad data.

    Args:
        root: dataset root holding ``meta/`` and ``studies/``.
        classes: the class names a patient may have (default: the 7 OpenSRH classes); every one
            of them must have a usable patient in both splits for the dataset to be trainable.
        check_images: open every patch file the metadata lists for training/evaluation.
        expected_size: required patch height and width (e.g. 300); None or 0 = not enforced, and
            sizes differing from the majority are warnings.
        workers: processes reading files; 0 reads in the calling process.
        include_nondiagnostic: also check ``nondiagnostic_patches``.
        meta_file / split_file: alternative metadata files (e.g. a cleaned copy); relative paths
            are joined to ``root`` (absolute ones stay absolute), as in ``read_opensrh``.
        progress: optional ``callback(done, total)`` called while files are checked.

    Returns:
        A :class:`ValidationReport`; metadata that cannot be read is a finding, not an exception.

    Raises:
        HLSSError: ``root`` is not a folder, ``workers`` or ``expected_size`` is negative, or
            ``classes`` is empty.
    """
    start = time.perf_counter()
    root, meta_path, split_path = metadata_paths(root, meta_file, split_file)
    if workers < 0:
        raise HLSSError(f"workers must be >= 0, got {workers}")
    if expected_size is not None and expected_size < 0:
        raise HLSSError(f"expected_size must be >= 0 (0 = not enforced), got {expected_size}")
    classes = tuple(classes)
    if not classes:
        raise HLSSError("classes: at least one class is required")
    report = ValidationReport(
        root=root,
        meta_path=meta_path,
        split_path=split_path,
        classes=classes,
        check_images=check_images,
    )
    findings = report.findings

    meta, split = read_metadata(meta_path, split_path, findings)
    if meta is None or split is None:
        report.reasons.append("metadata could not be read")
        report.seconds = time.perf_counter() - start
        return report
    member = split_membership(split, meta, findings)
    kept = patient_lists(meta, member, classes, include_nondiagnostic, findings)
    files = FileVerdicts()
    if check_images:
        paths = used_files(kept, include_nondiagnostic)
        files = check_files(root, paths, expected_size, workers, progress)
    report.files_checked, report.majority_size = files.files_checked, files.majority_size
    report.counts, report.unassigned, report.clean_meta = judge_patients(
        kept, files, classes, include_nondiagnostic, findings
    )
    report.clean_split = {
        part: [p for p, s in member.items() if s == part and p in report.clean_meta]
        for part in SPLITS
    }
    report.reasons += class_coverage(report.counts, classes, meta_path, findings)
    report.trainable = not report.reasons
    report.seconds = time.perf_counter() - start
    return report
