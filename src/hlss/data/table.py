"""The patch table: one row per patch with its place in the patient -> slide -> patch hierarchy.

Every reader (OpenSRH, TCGA-style, manifest CSV, synthetic) produces a :class:`PatchTable`; the
hierarchy dataset, the validator and the evaluator only ever see this table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hlss.errors import DataError

COLUMNS = ("patient", "slide", "path", "label", "split")
SPLITS = ("train", "val")


@dataclass
class PatchTable:
    """Patches with columns ``patient, slide, path, label, split`` (all strings).

    ``slide`` ids need only be unique within a patient (OpenSRH slide ids are short digit strings);
    use :attr:`slide_keys` for a globally unique slide id. ``classes`` fixes the label -> index map
    (sorted class names unless a reader says otherwise), so train and val agree on indices.
    ``modality`` is ``"srh"`` (2-channel uint16) or ``"he"`` (3-channel uint8).
    """

    frame: pd.DataFrame
    classes: tuple[str, ...]
    modality: str = "srh"
    name: str = "dataset"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in COLUMNS if c not in self.frame.columns]
        if missing:
            raise DataError(f"{self.name}: patch table lacks column(s) {', '.join(missing)}")
        self.classes = tuple(self.classes)
        unknown = sorted(set(self.frame["label"].unique()) - set(self.classes))
        if unknown:
            raise DataError(
                f"{self.name}: unknown class label(s) {unknown}; known: {list(self.classes)}"
            )

    @classmethod
    def from_records(
        cls,
        patient: Sequence[str],
        slide: Sequence[str],
        path: Sequence[str],
        label: Sequence[str],
        split: Sequence[str],
        classes: Sequence[str] | None = None,
        **kwargs,
    ) -> PatchTable:
        frame = pd.DataFrame(
            {"patient": patient, "slide": slide, "path": path, "label": label, "split": split}
        )
        for col in COLUMNS:
            frame[col] = frame[col].astype(str)
        if classes is None:
            classes = sorted(frame["label"].unique())
        return cls(frame=frame, classes=tuple(classes), **kwargs)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def slide_keys(self) -> pd.Series:
        """Globally unique slide identifiers ``patient/slide``."""
        return self.frame["patient"] + "/" + self.frame["slide"]

    @property
    def label_index(self) -> np.ndarray:
        """Integer class index of every row (position of its label in :attr:`classes`)."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        return self.frame["label"].map(lookup).to_numpy(dtype=np.int64)

    def subset(self, split: str) -> PatchTable:
        """Rows of one split; keeps the class list so indices stay comparable."""
        if split not in SPLITS:
            raise DataError(f"{self.name}: unknown split {split!r}; expected one of {SPLITS}")
        frame = self.frame[self.frame["split"] == split].reset_index(drop=True)
        return PatchTable(frame, self.classes, self.modality, self.name, dict(self.extra))

    def patients(self) -> list[str]:
        return sorted(self.frame["patient"].unique())

    def summary(self) -> dict:
        """Counts of patients, slides and patches per split and class."""
        out: dict = {}
        for split, part in self.frame.groupby("split", sort=True):
            out[split] = {
                "patients": int(part["patient"].nunique()),
                "slides": int((part["patient"] + "/" + part["slide"]).nunique()),
                "patches": len(part),
                "patients_per_class": {
                    str(k): int(v) for k, v in part.groupby("label")["patient"].nunique().items()
                },
            }
        return out
