"""The result of ``hlss-validate``: findings, summary counts and their text report.

A :class:`ValidationReport` holds a list of :class:`Finding` s (each with a code from
:data:`CODES` that fixes its severity), listed vs usable :class:`Counts` per split and class,
the trainability verdict and the cleaned metadata (:meth:`ValidationReport.write_clean_meta`).
It is produced by :func:`hlss.data.validate.validate_opensrh`.

Severity
    ``error``: something listed cannot be used (a bad file, a patient entry without class, an
    unknown class, a patient in both splits, ...). The cleaned metadata drops it.
    ``warning``: suspicious but harmless for training (a patient in neither split, a patch size
    that differs from the majority, a slide with no usable patch, a duplicate entry, ...).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from hlss.data import clean_out
from hlss.data.table import SPLITS
from hlss.errors import HLSSError

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

    @classmethod
    def of(cls, code: str, message: str, patient="", slide="", path="") -> Finding:
        """A finding with the severity :data:`CODES` gives ``code``; ids are turned to strings.

        Raises:
            KeyError: ``code`` is not in :data:`CODES`.
        """
        return cls(CODES[code][0], code, message, str(patient), str(slide), str(path))

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
    """Result of :func:`hlss.data.validate.validate_opensrh`.

    Attributes:
        root: absolute dataset root.
        meta_path / split_path: the metadata files that were checked.
        classes: the class names checked against.
        findings: every finding, in metadata order.
        trainable: see :mod:`hlss.data.validate` for the rule.
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
        lines = self._source_lines()
        if self.counts:
            lines += ["", "counts (usable/listed):", *self._count_lines()]
        lines += ["", *self._finding_lines(max_examples), "", self.verdict()]
        return "\n".join(lines)

    def _source_lines(self) -> list[str]:
        lines = [
            f"OpenSRH dataset: {self.root}",
            f"metadata: {self.meta_path}",
            f"split:    {self.split_path}",
        ]
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
        return lines

    def _count_lines(self) -> list[str]:
        lines = [
            f"  {'split':<6}{'class':<10}{'patients':>10}{'slides':>12}{'patches':>16}{'bad':>8}"
        ]
        for (part, label), c in self.counts.items():
            lines.append(_count_row(part, label, c))
        for part in SPLITS:
            lines.append(_count_row(part, "(all)", self.total(part)))
        if self.unassigned.patients:
            lines.append(_count_row("none", "(all)", self.unassigned))
        return lines

    def _finding_lines(self, max_examples: int) -> list[str]:
        """Findings grouped by code (errors first, then :data:`CODES` order), a few examples each."""
        lines = [f"findings: {len(self.errors)} error(s), {len(self.warnings)} warning(s)"]
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
        return lines

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

    def exit_status(self, strict: bool = False) -> int:
        """The command's exit status: 1 when the report has an error (training refuses the
        dataset as given, or would drop data from it) or, with ``strict``, a warning; else 0."""
        failed = not self.trainable or self.errors or (strict and self.warnings)
        return 1 if failed else 0

    # ------------------------------------------------------------------ cleaned metadata
    def check_clean_out(self, out_dir: str) -> tuple[str, str]:
        """See :func:`hlss.data.clean_out.check_clean_out`; uses this report's root and metadata
        paths."""
        return clean_out.check_clean_out(out_dir, self.root, self.meta_path, self.split_path)

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
        return clean_out.write_clean_meta(
            out_dir, self.root, self.meta_path, self.split_path, self.clean_meta, self.clean_split
        )


def _count_row(part: str, label: str, c: Counts) -> str:
    return (
        f"  {part:<6}{label:<10}{f'{c.usable_patients}/{c.patients}':>10}"
        f"{f'{c.usable_slides}/{c.slides}':>12}{f'{c.usable_patches}/{c.patches}':>16}"
        f"{c.bad_patches:>8}"
    )
