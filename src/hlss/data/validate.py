"""Check an OpenSRH-layout dataset against its metadata (``hlss-validate``).

:func:`validate_opensrh` reads ``meta/opensrh.json`` and ``meta/train_val_split.json`` (see
DESIGN.md, "Data facts"), optionally opens every patch file it would train on, and returns a
:class:`ValidationReport`: a list of :class:`Finding` s, summary counts per split and class, a
readable text report and a cleaned copy of the metadata (:meth:`ValidationReport.write_clean_meta`).

Severity
    ``error``: something listed cannot be used (a bad file, a patient entry without class, an
    unknown class, a patient in both splits, ...). The cleaned metadata drops it.
    ``warning``: suspicious but harmless for training (a patient in neither split, a patch size
    that differs from the majority, a slide with no usable patch, a duplicate entry, ...).

The trainability rule
    The dataset is *trainable* when training could start from the **cleaned** metadata, i.e.
    unless one of these holds:

    * a metadata file is missing, is not valid JSON, or has the wrong top-level structure;
    * nothing usable remains (no patient with at least one good patch in any split);
    * some class has no usable patient in ``train`` or none in ``val`` (the model could not learn
      it, or it could not be evaluated).

    Errors about single files or single patients do *not* make a dataset untrainable on their own:
    they are dropped from the cleaned metadata, and the report says so. Training with the original
    metadata would still meet those files; use the cleaned copy.

What is checked
    * metadata: both JSON files readable; every patient entry has ``class`` and ``slides``; every
      slide is an object of patch lists; the three patch lists are lists of strings (a missing list
      is a warning and counts as empty); every class is known.
    * split: patients in both splits; metadata patients in neither split (warning); split patients
      absent from the metadata; duplicates; every class present in both splits.
    * files (``check_images=True``), only of the lists a patient uses (``normal_patches`` for class
      ``normal``, else ``tumor_patches``; plus ``nondiagnostic_patches`` when
      ``include_nondiagnostic``): missing files, unreadable TIFFs, truncated TIFFs (an IFD or image
      data beyond the end of the file), shape other than ``(2, H, W)``, channel-last ``(H, W, 2)``,
      dtype other than uint16, a size other than ``expected_size`` (error) or, without it, a size
      different from the majority (warning).
    * patients with no usable patch left (error; dropped).

Patients that are dropped for a metadata reason (no class, unknown class, both splits) are not
file-checked. Images are read one at a time (in a process pool when ``workers > 0``) and only their
verdict is kept, so the check scales to the ~300k files of the real dataset.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

from hlss import CLASSES_OPENSRH
from hlss.data.io import check_patch
from hlss.data.opensrh import META_FILE, PATCH_KEYS, SPLIT_FILE, load_json, patch_keys_for
from hlss.errors import BadPatchError, DataError, HLSSError

SPLITS = ("train", "val")
CLEAN_META_NAME = "opensrh.json"
CLEAN_SPLIT_NAME = "train_val_split.json"

# code -> (severity, one-line description used as the group title of the text report)
CODES: dict[str, tuple[str, str]] = {
    "meta_unreadable": ("error", "metadata file missing or not valid JSON"),
    "meta_structure": ("error", "metadata file has the wrong structure"),
    "bad_patient_entry": ("error", "patient entry lacks 'class' or 'slides'"),
    "bad_slide_entry": ("error", "slide entry is not an object of patch lists"),
    "missing_patch_list": ("warning", "slide lacks a patch list (treated as empty)"),
    "bad_patch_list": ("error", "patch list is not a list of path strings"),
    "unknown_class": ("error", "patient has an unknown class"),
    "bad_split_entry": ("error", "split list holds something other than a patient id"),
    "in_both_splits": ("error", "patient listed in both train and val"),
    "duplicate_in_split": ("warning", "patient listed twice in the same split"),
    "not_in_split": ("warning", "patient in the metadata but in neither split (unused)"),
    "not_in_metadata": ("error", "patient in the split file but absent from the metadata"),
    "duplicate_patch": ("warning", "patch path listed more than once"),
    "missing_file": ("error", "listed patch file not found"),
    "unreadable_tiff": ("error", "patch file is not a readable TIFF"),
    "truncated_tiff": ("error", "patch file is a TIFF cut short"),
    "wrong_shape": ("error", "patch is not shaped (2, H, W)"),
    "channel_last": ("error", "patch is channel-last (H, W, 2) instead of (2, H, W)"),
    "wrong_dtype": ("error", "patch dtype is not uint16"),
    "wrong_size": ("error", "patch size differs from expected_size"),
    "odd_size": ("warning", "patch size differs from the majority size"),
    "empty_slide": ("warning", "slide has no usable patch"),
    "no_usable_patches": ("error", "patient has no usable patch (dropped)"),
    "class_missing_in_split": ("error", "class has no usable patient in a split"),
    "nothing_usable": ("error", "no usable patch in the whole dataset"),
}


@dataclass(frozen=True)
class Finding:
    """One problem found by the validator.

    ``patient``/``slide``/``path`` are empty strings where they do not apply; ``path`` is the path
    as listed in the metadata (relative to the root) or a metadata file's path.
    """

    severity: str
    code: str
    message: str
    patient: str = ""
    slide: str = ""
    path: str = ""

    def where(self) -> str:
        """Short location string: ``patient/slide path`` (the parts that apply)."""
        loc = "/".join(p for p in (self.patient, self.slide) if p)
        return " ".join(p for p in (loc, self.path) if p)


@dataclass
class Counts:
    """Listed vs usable counts of one (split, class) cell of the summary."""

    patients: int = 0
    slides: int = 0
    patches: int = 0
    usable_patients: int = 0
    usable_slides: int = 0
    usable_patches: int = 0
    bad_patches: int = 0

    def add(self, other: Counts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class ValidationReport:
    """Result of :func:`validate_opensrh`.

    Attributes:
        root: absolute dataset root.
        meta_path / split_path: the metadata files that were checked.
        classes: the class names checked against.
        findings: every finding, in metadata order.
        trainable: see the module docstring for the rule.
        reasons: why the dataset is not trainable (empty when it is).
        counts: ``{(split, class): Counts}`` for split in ``train``/``val``.
        unassigned: counts of patients in the metadata but in neither split.
        files_checked: number of distinct patch files opened (0 when images were not checked).
        majority_size: most common patch ``(H, W)`` among good files, or None.
        seconds: wall time of the validation.
    """

    root: str
    meta_path: str
    split_path: str
    classes: tuple[str, ...]
    findings: list[Finding] = field(default_factory=list)
    trainable: bool = False
    reasons: list[str] = field(default_factory=list)
    counts: dict[tuple[str, str], Counts] = field(default_factory=dict)
    unassigned: Counts = field(default_factory=Counts)
    check_images: bool = True
    files_checked: int = 0
    majority_size: tuple[int, int] | None = None
    seconds: float = 0.0
    clean_meta: dict | None = field(default=None, repr=False)
    clean_split: dict | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ queries
    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def codes(self) -> Counter:
        """``Counter`` of finding codes."""
        return Counter(f.code for f in self.findings)

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def total(self, split: str | None = None) -> Counts:
        """Counts summed over classes (and over train/val when ``split`` is None)."""
        out = Counts()
        for (part, _), cell in self.counts.items():
            if split is None or part == split:
                out.add(cell)
        return out

    # ------------------------------------------------------------------ text
    def to_text(self, max_examples: int = 5) -> str:
        """A readable report: counts, findings grouped by code with examples, and a verdict line."""
        lines = [f"OpenSRH dataset: {self.root}"]
        lines.append(f"metadata: {self.meta_path}")
        lines.append(f"split:    {self.split_path}")
        if self.check_images:
            size = "x".join(map(str, self.majority_size)) if self.majority_size else "-"
            lines.append(
                f"images:   {self.files_checked} files checked in {self.seconds:.1f} s; "
                f"majority patch size {size}"
            )
        else:
            lines.append(
                "images:   not checked (check_images=false): file problems are not detected"
            )
        if self.counts:
            lines.append("")
            lines.append("counts (usable/listed):")
            header = f"  {'split':<6}{'class':<10}{'patients':>10}{'slides':>12}{'patches':>16}{'bad':>8}"
            lines.append(header)
            for (part, label), c in self.counts.items():
                lines.append(_count_row(part, label, c))
            for part in SPLITS:
                lines.append(_count_row(part, "(all)", self.total(part)))
            if self.unassigned.patients:
                lines.append(_count_row("none", "(all)", self.unassigned))
        lines.append("")
        n_err, n_warn = len(self.errors), len(self.warnings)
        lines.append(f"findings: {n_err} error(s), {n_warn} warning(s)")
        groups: dict[str, list[Finding]] = defaultdict(list)
        for f in self.findings:
            groups[f.code].append(f)
        order = sorted(
            groups, key=lambda c: (groups[c][0].severity != "error", list(CODES).index(c))
        )
        for code in order:
            items = groups[code]
            severity, title = CODES[code]
            lines.append(f"  [{severity}] {code} x{len(items)}: {title}")
            for f in items[: max(0, max_examples)]:
                where = f.where()
                lines.append(f"      {where}: {f.message}" if where else f"      {f.message}")
            if len(items) > max_examples:
                lines.append(f"      ... and {len(items) - max_examples} more")
        lines.append("")
        lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        """One line: trainable or not, and why."""
        if not self.trainable:
            return "verdict: NOT TRAINABLE - " + "; ".join(self.reasons)
        if self.errors:
            return (
                f"verdict: TRAINABLE after cleaning - the cleaned metadata drops what the "
                f"{len(self.errors)} error(s) name; write it with clean_out=DIR and train with "
                "dataset.table.meta_file=DIR/opensrh.json dataset.table.split_file=DIR/train_val_split.json"
            )
        suffix = f" ({len(self.warnings)} warning(s))" if self.warnings else ""
        return "verdict: TRAINABLE" + suffix

    # ------------------------------------------------------------------ cleaned metadata
    def check_clean_out(self, out_dir: str) -> tuple[str, str]:
        """See :func:`check_clean_out`; uses this report's root and metadata paths."""
        return check_clean_out(out_dir, self.root, self.meta_path, self.split_path)

    def write_clean_meta(self, out_dir: str) -> tuple[str, str]:
        """Write ``opensrh.json`` and ``train_val_split.json`` without the bad entries into ``out_dir``.

        Removed: bad files from the patch lists (non-string items too), patients with nothing
        usable, patients in both splits (from both), patients with a missing/unknown class, slides
        that are not objects, split entries absent from the metadata. Lists a patient does not use
        are copied unchecked (a non-list becomes ``[]``). The result reads with
        ``read_opensrh(root, meta_file=<meta>, split_file=<split>)``.

        Returns:
            The absolute paths of the written metadata and split files.

        Raises:
            HLSSError: the metadata could not be read (nothing to clean), ``out_dir`` is the
                dataset's own metadata folder or not a folder, or a target file already exists.
        """
        if self.clean_meta is None or self.clean_split is None:
            raise HLSSError(
                f"{self.meta_path}: metadata could not be read; no cleaned copy to write"
            )
        meta_out, split_out = self.check_clean_out(out_dir)
        os.makedirs(os.path.dirname(meta_out), exist_ok=True)
        # "x": never replace a file, even one created since the check above
        try:
            with open(meta_out, "x", encoding="utf-8") as handle:
                json.dump(self.clean_meta, handle, indent=1)
            with open(split_out, "x", encoding="utf-8") as handle:
                json.dump(self.clean_split, handle, indent=1)
        except FileExistsError as err:
            raise HLSSError(f"{err.filename}: already exists; refusing to overwrite") from None
        except OSError as err:
            raise HLSSError(f"{out_dir}: cannot write cleaned metadata ({err})") from None
        return meta_out, split_out


def _count_row(part: str, label: str, c: Counts) -> str:
    return (
        f"  {part:<6}{label:<10}{f'{c.usable_patients}/{c.patients}':>10}"
        f"{f'{c.usable_slides}/{c.slides}':>12}{f'{c.usable_patches}/{c.patches}':>16}"
        f"{c.bad_patches:>8}"
    )


def check_clean_out(out_dir: str, root: str, meta_path: str, split_path: str) -> tuple[str, str]:
    """Check that a cleaned copy may be written into ``out_dir``; returns the two target paths.

    Raises:
        HLSSError: ``out_dir`` is empty, is the dataset's ``meta`` folder or the folder of the
            metadata files being cleaned, exists but is not a folder, or a target file exists.
    """
    if not str(out_dir).strip():
        raise HLSSError("clean_out: an output folder is required")
    out = os.path.abspath(os.path.expanduser(str(out_dir)))
    protected = {
        os.path.realpath(os.path.join(root, "meta")),
        os.path.realpath(os.path.dirname(meta_path)),
        os.path.realpath(os.path.dirname(split_path)),
    }
    if os.path.realpath(out) in protected:
        raise HLSSError(
            f"{out}: is the dataset's own metadata folder; write the cleaned copy somewhere else"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise HLSSError(f"{out}: exists and is not a folder")
    targets = (os.path.join(out, CLEAN_META_NAME), os.path.join(out, CLEAN_SPLIT_NAME))
    for target in targets:
        if os.path.lexists(target):
            raise HLSSError(f"{target}: already exists; refusing to overwrite")
    return targets


# ---------------------------------------------------------------------- file checks
# bytes per value of each TIFF field type
_TIFF_TYPE_SIZE = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
    16: 8,
    17: 8,
    18: 8,
}


def _tiff_structure_problem(buf: bytes) -> str | None:
    """Walk the IFD chain of an in-memory TIFF; say where it runs past the end of the file.

    Returns None when the chain is intact or the bytes are not a TIFF header at all (tifffile then
    gives the reason).
    """
    size = len(buf)
    if size < 8:
        return (
            f"only {size} bytes; shorter than a TIFF header" if buf[:2] in (b"II", b"MM") else None
        )
    order = {b"II": "<", b"MM": ">"}.get(buf[:2])
    if order is None:
        return None
    magic = struct.unpack(order + "H", buf[2:4])[0]
    if magic == 42:
        offset = struct.unpack(order + "I", buf[4:8])[0]
        count_fmt, count_size, entry_size, next_fmt, next_size = "H", 2, 12, "I", 4
    elif magic == 43:
        if size < 16:
            return f"only {size} bytes; shorter than a BigTIFF header"
        offset = struct.unpack(order + "Q", buf[8:16])[0]
        count_fmt, count_size, entry_size, next_fmt, next_size = "Q", 8, 20, "Q", 8
    else:
        return None
    seen: set[int] = set()
    index = 0
    inline = next_size  # values up to this many bytes sit inside the entry
    while offset and offset not in seen and index < 100_000:
        seen.add(offset)
        if offset + count_size > size:
            return f"image directory {index} at byte {offset} lies beyond the end of the file ({size} bytes)"
        count = struct.unpack(order + count_fmt, buf[offset : offset + count_size])[0]
        end = offset + count_size + count * entry_size + next_size
        if end > size:
            return f"image directory {index} ends at byte {end}, beyond the end of the file ({size} bytes)"
        for k in range(count):
            pos = offset + count_size + k * entry_size
            tag, kind = struct.unpack(order + "HH", buf[pos : pos + 4])
            n_values = struct.unpack(order + next_fmt, buf[pos + 4 : pos + 4 + next_size])[0]
            nbytes = _TIFF_TYPE_SIZE.get(kind, 0) * n_values
            if nbytes > inline:
                value_at = struct.unpack(
                    order + next_fmt, buf[pos + 4 + next_size : pos + 4 + 2 * next_size]
                )[0]
                if value_at + nbytes > size:
                    return (
                        f"tag {tag} of image directory {index} ends at byte {value_at + nbytes}, "
                        f"beyond the end of the file ({size} bytes)"
                    )
        offset = struct.unpack(order + next_fmt, buf[end - next_size : end])[0]
        index += 1
    return None


def inspect_patch(path: str) -> tuple[str, str, tuple[int, int] | None]:
    """Open one SRH patch file and judge it; keeps nothing of the image.

    Returns:
        ``(code, message, size)``: ``code`` is a finding code (``missing_file``,
        ``unreadable_tiff``, ``truncated_tiff``, ``wrong_shape``, ``channel_last``,
        ``wrong_dtype``) or "" for a good patch, ``message`` a one-line reason ("" when good),
        ``size`` the ``(H, W)`` of a good patch, else None.
    """
    import tifffile

    if not os.path.isfile(path):
        what = "not a regular file" if os.path.exists(path) else "file not found"
        return "missing_file", what, None
    try:
        with open(path, "rb") as handle:
            buf = handle.read()
    except OSError as err:
        return "unreadable_tiff", f"cannot read ({err.strerror or err})", None
    short = _tiff_structure_problem(buf)
    if short:
        return "truncated_tiff", f"truncated TIFF: {short}", None
    try:
        with tifffile.TiffFile(io.BytesIO(buf)) as tif:
            if not len(tif.pages):
                return "truncated_tiff", "truncated TIFF: no image in the file", None
            for page in tif.pages:
                offsets = getattr(page, "dataoffsets", ()) or ()
                counts = getattr(page, "databytecounts", ()) or ()
                for off, n in zip(offsets, counts, strict=False):
                    if off + n > len(buf):
                        return (
                            "truncated_tiff",
                            f"truncated TIFF: image data ends at byte {off + n}, file has {len(buf)}",
                            None,
                        )
            arr = tif.asarray()
    except Exception as err:  # tifffile raises many types for broken files
        text = f"{type(err).__name__}: {err}"
        if "failed to read" in str(err):
            return "truncated_tiff", f"truncated TIFF ({text})", None
        return "unreadable_tiff", f"unreadable TIFF ({text})", None
    del buf
    try:
        check_patch(arr, "srh", path)
    except BadPatchError as err:
        if arr.ndim == 3 and arr.shape[0] != 2 and arr.shape[-1] == 2:
            return "channel_last", err.problem, None
        if arr.ndim != 3 or arr.shape[0] != 2:
            return "wrong_shape", err.problem, None
        return "wrong_dtype", err.problem, None
    if arr.size == 0:
        return "wrong_shape", f"empty image, shape {arr.shape}", None
    return "", "", (int(arr.shape[1]), int(arr.shape[2]))


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _inspect_chunk(chunk: Sequence[str]) -> list[tuple[str, str, tuple[int, int] | None]]:
    """Verdicts of a chunk of paths (module level, so worker processes can run it)."""
    return [inspect_patch(p) for p in chunk]


def _inspect_many(
    paths: Sequence[str],
    workers: int,
    progress: Callable[[int, int], None] | None,
    inspect: Callable[[str], tuple[str, str, tuple[int, int] | None]] = inspect_patch,
) -> Iterator[tuple[str, str, tuple[int, int] | None]]:
    """Yield the verdict of every path in order, reading in ``workers`` processes when
    ``workers > 0`` (TIFF parsing holds the GIL, so threads would not help), bounded queue.
    A custom ``inspect`` (tests) runs in threads, as it need not be picklable."""
    total = len(paths)
    done = 0

    def run_chunk(chunk: Sequence[str]) -> list:
        return [inspect(p) for p in chunk]

    chunk_size = 64
    if workers <= 0:
        for chunk in _chunks(paths, chunk_size):
            yield from run_chunk(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
        return
    if inspect is inspect_patch:
        pool_cm, task = ProcessPoolExecutor(max_workers=workers), _inspect_chunk
    else:
        pool_cm, task = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hlss-validate"),
            run_chunk,
        )
    with pool_cm as pool:
        pending = []
        chunks = iter(_chunks(paths, chunk_size))
        # keep at most 4 chunks per worker in flight: bounded memory for any number of files
        for chunk in chunks:
            pending.append((len(chunk), pool.submit(task, chunk)))
            if len(pending) >= 4 * workers:
                break
        while pending:
            n, future = pending.pop(0)
            yield from future.result()
            done += n
            if progress:
                progress(done, total)
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append((len(nxt), pool.submit(task, nxt)))


# ---------------------------------------------------------------------- validation
def _add(findings: list[Finding], code: str, message: str, patient="", slide="", path="") -> None:
    findings.append(Finding(CODES[code][0], code, message, str(patient), str(slide), str(path)))


def _read_meta_files(
    meta_path: str, split_path: str, findings: list[Finding]
) -> tuple[dict | None, dict | None]:
    """Load both JSON files; a failure becomes a ``meta_unreadable``/``meta_structure`` finding."""
    loaded: list[object] = []
    for path in (meta_path, split_path):
        try:
            loaded.append(load_json(path))
        except DataError as err:
            _add(findings, "meta_unreadable", str(err), path=path)
            loaded.append(None)
    meta, split = loaded
    if meta is not None and not isinstance(meta, dict):
        _add(
            findings,
            "meta_structure",
            f"{meta_path}: expected an object of patients, got {type(meta).__name__}",
            path=meta_path,
        )
        meta = None
    if split is not None:
        ok = isinstance(split, dict) and all(isinstance(split.get(k), list) for k in SPLITS)
        if not ok:
            _add(
                findings,
                "meta_structure",
                f"{split_path}: expected an object with 'train' and 'val' lists of patient ids",
                path=split_path,
            )
            split = None
    return meta, split  # type: ignore[return-value]


def _split_membership(split: dict, meta: dict, findings: list[Finding]) -> dict[str, str]:
    """Map patient -> "train" | "val" | "both" from the split file, reporting split-file problems."""
    member: dict[str, str] = {}
    for part in SPLITS:
        seen: set[str] = set()
        for pid in split[part]:
            if not isinstance(pid, str):
                _add(findings, "bad_split_entry", f"{part} holds {pid!r}, not a patient id string")
                continue
            if pid in seen:
                _add(findings, "duplicate_in_split", f"listed twice in {part}", patient=pid)
                continue
            seen.add(pid)
            member[pid] = "both" if member.get(pid, part) != part else part
    for pid, part in member.items():
        if part == "both":
            _add(findings, "in_both_splits", "listed in both train and val; dropped from both", pid)
        if pid not in meta:
            _add(
                findings,
                "not_in_metadata",
                f"in {part} of the split file but not in the metadata",
                pid,
            )
    return member


def metadata_paths(
    root: str, meta_file: str | None = None, split_file: str | None = None
) -> tuple[str, str, str]:
    """Absolute ``(root, metadata path, split path)`` as ``read_opensrh`` resolves them.

    Raises:
        DataError: ``root`` is not a folder.
    """
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DataError(f"{root}: dataset root not found")
    meta_path = os.path.join(root, meta_file or META_FILE)
    split_path = os.path.join(root, split_file or SPLIT_FILE)
    return root, meta_path, split_path


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

    meta, split = _read_meta_files(meta_path, split_path, findings)
    if meta is None or split is None:
        report.trainable = False
        report.reasons.append("metadata could not be read")
        report.seconds = time.perf_counter() - start
        return report

    member = _split_membership(split, meta, findings)
    known = set(classes)

    # --- pass 1: structure of every patient; collect the files to check -----------------------
    # kept[pid] = (label, part, {slide: {key: [rel, ...] | None}}); None = list to copy unchecked
    kept: dict[str, tuple[str, str, dict[str, dict[str, list]]]] = {}
    to_check: dict[str, None] = {}  # ordered set of relative paths
    for pid, entry in meta.items():
        part = member.get(pid, "none")
        if part == "both":
            continue
        if (
            not isinstance(entry, dict)
            or "class" not in entry
            or not isinstance(entry.get("slides"), dict)
        ):
            _add(
                findings,
                "bad_patient_entry",
                "entry lacks 'class' or a 'slides' object; dropped",
                pid,
            )
            continue
        label = entry["class"]
        if not isinstance(label, str) or label not in known:
            _add(
                findings,
                "unknown_class",
                f"unknown class {label!r}; known: {', '.join(classes)}",
                pid,
            )
            continue
        if part == "none":
            _add(
                findings,
                "not_in_split",
                "in the metadata but in neither train nor val; unused",
                pid,
            )
        used = patch_keys_for(label, include_nondiagnostic)
        slides_out: dict[str, dict[str, list]] = {}
        for slide, lists in entry["slides"].items():
            if not isinstance(lists, dict):
                _add(
                    findings,
                    "bad_slide_entry",
                    "slide is not an object of patch lists; dropped",
                    pid,
                    slide,
                )
                continue
            lists_out: dict[str, list] = {}
            seen_here: set[str] = set()
            for key in PATCH_KEYS:
                if key not in lists:
                    if key in used:
                        _add(
                            findings,
                            "missing_patch_list",
                            f"no '{key}' list (treated as empty)",
                            pid,
                            slide,
                        )
                    lists_out[key] = []
                    continue
                rel = lists[key]
                if not isinstance(rel, list):
                    _add(
                        findings,
                        "bad_patch_list",
                        f"'{key}' is a {type(rel).__name__}, not a list; emptied",
                        pid,
                        slide,
                    )
                    lists_out[key] = []
                    continue
                good = [p for p in rel if isinstance(p, str) and p]
                if len(good) != len(rel):
                    _add(
                        findings,
                        "bad_patch_list",
                        f"'{key}' holds {len(rel) - len(good)} item(s) that are not path strings; dropped",
                        pid,
                        slide,
                    )
                if key in used:
                    unique = []
                    for p in good:
                        if p in seen_here:
                            _add(
                                findings,
                                "duplicate_patch",
                                f"listed more than once in {key}",
                                pid,
                                slide,
                                p,
                            )
                            continue
                        seen_here.add(p)
                        unique.append(p)
                        to_check[p] = None
                    good = unique
                lists_out[key] = good
            slides_out[str(slide)] = lists_out
        kept[pid] = (label, part, slides_out)

    # --- pass 2: files --------------------------------------------------------------------------
    bad: dict[str, tuple[str, str]] = {}  # rel path -> (code, message)
    size_ids: dict[tuple[int, int], int] = {}
    size_of = array("i")  # per path in to_check order; -1 = bad
    paths = list(to_check)
    if check_images and expected_size:
        want = (expected_size, expected_size)
    else:
        want = None
    if check_images and paths:
        absolute = (os.path.join(root, p) for p in paths)
        verdicts = _inspect_many(list(absolute), workers, progress)
        for rel, (code, message, hw) in zip(paths, verdicts, strict=True):
            if code:
                bad[rel] = (code, message)
                size_of.append(-1)
                continue
            if want is not None and hw != want:
                bad[rel] = ("wrong_size", f"size {hw[0]}x{hw[1]}, expected {want[0]}x{want[1]}")
                size_of.append(-1)
                continue
            size_of.append(size_ids.setdefault(hw, len(size_ids)))
        report.files_checked = len(paths)
    odd_paths: dict[str, tuple[int, int]] = {}
    if size_ids:
        by_id = {i: hw for hw, i in size_ids.items()}
        tally = Counter(i for i in size_of if i >= 0)
        majority = tally.most_common(1)[0][0]
        report.majority_size = by_id[majority]
        if want is None and len(tally) > 1:
            odd_paths = {
                rel: by_id[i]
                for rel, i in zip(paths, size_of, strict=True)
                if i >= 0 and i != majority
            }
    del size_of, paths

    # --- pass 3: per-patient verdicts, counts, cleaned metadata ----------------------------------
    report.counts = {(part, c): Counts() for part in SPLITS for c in classes}
    clean_meta: dict[str, dict] = {}
    for pid, (label, part, slides_out) in kept.items():
        cell = report.counts[(part, label)] if part in SPLITS else report.unassigned
        used = patch_keys_for(label, include_nondiagnostic)
        cell.patients += 1
        patient_usable = 0
        for slide, lists_out in slides_out.items():
            cell.slides += 1
            slide_usable = 0
            for key in used:
                listed = lists_out[key]
                cell.patches += len(listed)
                good = []
                for rel in listed:
                    verdict = bad.get(rel)
                    if verdict is None:
                        good.append(rel)
                        if rel in odd_paths:
                            h, w = odd_paths[rel]
                            mh, mw = report.majority_size  # type: ignore[misc]
                            _add(
                                findings,
                                "odd_size",
                                f"size {h}x{w}, most patches are {mh}x{mw}",
                                pid,
                                slide,
                                rel,
                            )
                    else:
                        _add(findings, verdict[0], verdict[1], pid, slide, rel)
                        cell.bad_patches += 1
                lists_out[key] = good
                slide_usable += len(good)
            if slide_usable:
                cell.usable_slides += 1
            else:
                _add(
                    findings,
                    "empty_slide",
                    "no usable patch in the lists this patient uses",
                    pid,
                    slide,
                )
            patient_usable += slide_usable
        if not patient_usable:
            _add(findings, "no_usable_patches", f"class {label}: no usable patch; dropped", pid)
            continue
        cell.usable_patients += 1
        cell.usable_patches += patient_usable
        clean_meta[pid] = {"class": label, "slides": slides_out}

    report.clean_meta = clean_meta
    report.clean_split = {
        part: [p for p, s in member.items() if s == part and p in clean_meta] for part in SPLITS
    }

    # --- verdict ----------------------------------------------------------------------------------
    if not any(report.counts[(part, c)].usable_patients for part in SPLITS for c in classes):
        _add(
            findings,
            "nothing_usable",
            "no patient of train or val has a usable patch",
            path=meta_path,
        )
        report.reasons.append("nothing usable remains")
    else:
        for part in SPLITS:
            missing = [c for c in classes if not report.counts[(part, c)].usable_patients]
            for c in missing:
                _add(
                    findings,
                    "class_missing_in_split",
                    f"class {c!r} has no usable patient in {part}",
                )
            if missing:
                what = "train on" if part == "train" else "evaluate"
                report.reasons.append(
                    f"no usable {part} patient for class(es) {', '.join(missing)} (cannot {what} them)"
                )
    report.trainable = not report.reasons
    report.seconds = time.perf_counter() - start
    return report
