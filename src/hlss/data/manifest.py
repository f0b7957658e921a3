"""Reader for user datasets described by a manifest CSV (one row per patch).

::

    patient,slide,path,label,split[,any other columns]
    P001,S1,patches/P001/S1/0001.png,tumour,train
    P002,S7,/data/h5/S7.h5::12,normal,val

``path`` is a patch file or an HDF5 tile reference ``file.h5::<index>``; relative paths are
resolved against ``root`` (or the CSV's folder). Only the table is checked here, quickly and with
vectorised operations; whether the image files exist and decode is ``hlss-validate``'s job.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from hlss.data.io import MODALITY_FORMAT
from hlss.data.table import COLUMNS, SPLITS, PatchTable
from hlss.errors import DataError

# a path is absolute if it starts with a separator or a Windows drive ("C:\", "C:/")
_ABSOLUTE = r"^(?:[/\\]|[A-Za-z]:[/\\])"
# a "." or ".." path segment, or a doubled separator
_MESSY = r"(?:^|[/\\])\.{1,2}(?:[/\\]|$)|[/\\]{2}"


def _first_bad_row(csv_path: str, mask: np.ndarray, problem: str) -> DataError:
    """One error line naming the first offending (1-based, header excluded) data row."""
    rows = np.flatnonzero(mask)
    more = f" (and {len(rows) - 1} more row(s))" if len(rows) > 1 else ""
    return DataError(f"{csv_path}: data row {rows[0] + 1}{more}: {problem}")


def read_string_csv(path: str, what: str = "CSV") -> pd.DataFrame:
    """Read a CSV with a header into a frame of strings (empty fields stay ``""``).

    Column names are stripped and lower-cased; values are left as written. ``what`` names the
    file's role in messages (``"manifest"``, ``"labels file"``).

    Raises:
        DataError: the file is missing, unreadable, empty, not valid CSV, has a row with more
            fields than the header, or repeats a column name.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} not found")
    try:
        # index_col=False: a first row with one field too many must not silently become the
        # index; pandas warns about it instead (turned into an error here). Later long rows
        # raise a ParserError naming the line.
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                path,
                encoding="utf-8-sig",
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                index_col=False,
            )
    except pd.errors.ParserWarning:
        raise DataError(f"{path}: data row 1 has more fields than the header") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: {what} is empty (expected a header line)") from None
    except (pd.errors.ParserError, csv.Error, ValueError) as err:
        raise DataError(f"{path}: malformed CSV ({' '.join(str(err).split())})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    names = [str(c).strip().lower() for c in frame.columns]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(
            f"{path}: column(s) {', '.join(repeated)} appear more than once in the header"
        )
    frame.columns = names
    return frame


def read_manifest(
    path: str,
    classes: Sequence[str] | None = None,
    modality: str = "he",
    root: str | None = None,
) -> PatchTable:
    """Index the patches listed in a manifest CSV into a :class:`PatchTable` (no image is opened).

    Args:
        path: CSV file whose header contains at least ``patient,slide,path,label,split``
            (case and surrounding spaces are ignored; other columns are ignored).
        classes: class names, index = position. Every label must be one of them. ``None``: the
            sorted distinct labels of the manifest.
        modality: ``"he"`` (3-channel uint8 patches) or ``"srh"`` (2-channel uint16 patches).
        root: folder that relative patch paths are taken relative to; default the CSV's folder.

    Returns:
        A table with one row per CSV data row, in file order, patch paths absolute.

    Raises:
        DataError: (one line naming the CSV, and the first offending 1-based data row where there
            is one) the CSV is missing, unreadable or malformed; a required column is missing; a
            required value is empty; a split is not ``train``/``val``; a label is not in
            ``classes``; a patient appears in both splits; the manifest has no rows; or
            ``modality`` is not ``srh``/``he``.
    """
    csv_path = os.path.abspath(os.path.expanduser(str(path)))
    if modality not in MODALITY_FORMAT:
        raise DataError(
            f"{csv_path}: unknown modality {modality!r}; expected one of {sorted(MODALITY_FORMAT)}"
        )
    frame = read_string_csv(csv_path, "manifest")
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{csv_path}: manifest lacks column(s) {', '.join(missing)} "
            f"(header has: {', '.join(frame.columns)}; required: {', '.join(COLUMNS)})"
        )
    frame = frame[list(COLUMNS)].apply(lambda col: col.str.strip())
    if frame.empty:
        raise DataError(f"{csv_path}: manifest has a header but no data rows")

    empty = frame[list(COLUMNS)].eq("").to_numpy()
    if empty.any():
        first = int(np.flatnonzero(empty.any(axis=1))[0])
        cols = [c for c, bad in zip(COLUMNS, empty[first], strict=True) if bad]
        raise _first_bad_row(
            csv_path, empty.any(axis=1), f"empty value in column(s) {', '.join(cols)}"
        )

    bad_split = ~frame["split"].isin(SPLITS).to_numpy()
    if bad_split.any():
        value = frame["split"].iat[int(np.flatnonzero(bad_split)[0])]
        raise _first_bad_row(csv_path, bad_split, f"split {value!r} is not one of {list(SPLITS)}")

    if classes is not None:
        classes = [str(c) for c in classes]
        bad_label = ~frame["label"].isin(classes).to_numpy()
        if bad_label.any():
            value = frame["label"].iat[int(np.flatnonzero(bad_label)[0])]
            raise _first_bad_row(csv_path, bad_label, f"label {value!r} is not one of {classes}")

    splits_per_patient = frame.groupby("patient", sort=False)["split"].nunique()
    leaked = splits_per_patient.index[splits_per_patient.to_numpy() > 1]
    if len(leaked):
        mask = frame["patient"].isin(leaked).to_numpy()
        patient = frame["patient"].iat[int(np.flatnonzero(mask)[0])]
        raise DataError(
            f"{csv_path}: patient {patient} is in both train and val "
            f"({len(leaked)} such patient(s); splits must be by patient)"
        )

    base = (
        os.path.abspath(os.path.expanduser(str(root)))
        if root is not None
        else os.path.dirname(csv_path)
    )
    paths = frame["path"].to_numpy(dtype=object, copy=True)
    home = frame["path"].str.startswith("~").to_numpy()
    if home.any():
        paths[home] = [os.path.expanduser(p) for p in paths[home]]
    column = pd.Series(paths)
    relative = ~column.str.contains(_ABSOLUTE, regex=True).to_numpy()
    if relative.any():
        joined = base.rstrip("/\\") + os.sep + column[relative]
        # only paths with "." / ".." segments or doubled separators need normalising
        messy = joined.str.contains(_MESSY, regex=True).to_numpy()
        if messy.any():
            joined[messy] = [os.path.normpath(p) for p in joined[messy]]
        paths[relative] = joined.to_numpy(dtype=object)

    return PatchTable.from_records(
        frame["patient"].to_numpy(),
        frame["slide"].to_numpy(),
        paths,
        frame["label"].to_numpy(),
        frame["split"].to_numpy(),
        classes=classes,
        modality=modality,
        name=f"manifest:{csv_path}",
    )
