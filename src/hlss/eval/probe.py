"""Linear probe on frozen embeddings (the second standard evaluation protocol besides kNN).

A multinomial logistic regression (scikit-learn :class:`~sklearn.linear_model.LogisticRegression`,
L-BFGS) is fitted on the train split's patch embeddings and applied to the val split's patches.
The two splits must not share a patient (the dataset's split is by patient;
:func:`check_patient_disjoint` verifies it), otherwise the probe would measure how well it
recognises patients it has seen. The returned patch probabilities can be aggregated to slides
and patients exactly like the kNN scores.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch

from hlss.errors import HLSSError
from hlss.eval.arrays import check_2d
from hlss.progress import stage


def check_patient_disjoint(train_patients: Iterable, val_patients: Iterable) -> None:
    """Verify that no patient is in both the train and the val set.

    Args:
        train_patients: patient ids of the train rows (repeats allowed; compared as strings).
        val_patients: patient ids of the val rows.

    Raises:
        HLSSError: (one line naming up to five shared ids) a patient is in both.
    """
    train = {str(p) for p in train_patients}
    shared = sorted(train.intersection(str(p) for p in val_patients))
    if shared:
        more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
        raise HLSSError(
            f"linear probe: {len(shared)} patient(s) in both train and val "
            f"({', '.join(shared[:5])}{more}); the probe must be patient-disjoint"
        )


def _as_f32(x, what: str) -> np.ndarray:
    """``x`` (numpy or torch, any float dtype) as a float32 numpy array; checks finiteness."""
    arr = (
        x.detach().float().cpu().numpy()
        if isinstance(x, torch.Tensor)
        else np.asarray(x, dtype=np.float32)
    )
    if not np.isfinite(arr).all():
        raise HLSSError(f"linear probe: {what} contain NaN or infinite values")
    return arr


def _labels(train_y, n: int, num_classes: int) -> np.ndarray:
    """``train_y`` as ``[n]`` int64 class indices in ``[0, num_classes)``."""
    y = train_y.detach().cpu().numpy() if isinstance(train_y, torch.Tensor) else np.asarray(train_y)
    if y.ndim != 1:
        raise ValueError(f"linear_probe: train_y must be 1-D, got shape {y.shape}")
    if len(y) != n:
        raise HLSSError(f"linear probe: {len(y)} labels for {n} train embeddings")
    if y.dtype.kind not in "iub" and not (
        y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(np.mod(y, 1) == 0)
    ):
        raise HLSSError("linear probe: train labels must be integer class indices")
    y = y.astype(np.int64)
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise HLSSError(
            f"linear probe: label {int(y[bad][0])} outside [0, {num_classes}) "
            f"({int(bad.sum())} train rows)"
        )
    return y


def linear_probe(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    val_x: np.ndarray | torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
    standardize: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Fit a multinomial logistic regression on ``train_x`` and predict ``val_x``.

    Objective: mean cross-entropy + ``weight_decay / 2 * ||W||^2`` (the bias is not penalised).
    scikit-learn minimises ``C * sum(cross-entropy) + ||W||^2 / 2``, which is the same objective
    scaled by ``C * n`` for ``C = 1 / (weight_decay * n)`` (``n`` train rows); ``weight_decay=0``
    gives ``C = inf`` (no penalty). Solved by L-BFGS, at most ``max_iter`` iterations (stopping
    there without a convergence warning), deterministic for given inputs. With ``standardize``
    every feature is shifted and scaled by the train mean and standard deviation (constant
    features are left unscaled) and the same transform is applied to ``val_x``. No global random
    generator is touched. A fit that runs for more than two seconds prints a start line with the
    sizes and an end line with the time (:func:`hlss.progress.stage`; scikit-learn's fit has no
    per-iteration callback).

    Args:
        train_x: ``[n, d]`` train embeddings (numpy or torch, float16 allowed).
        train_y: ``[n]`` integer labels in ``[0, num_classes)``.
        val_x: ``[m, d]`` embeddings to classify.
        num_classes: ``C``; a class missing from the train set gets probability 0 (and when the
            train set has a single class, every val row gets probability 1 for it).
        weight_decay: L2 penalty (>= 0), mapped to ``C`` as above.
        max_iter: L-BFGS iterations (>= 1).
        standardize: standardise features with the train statistics.
        seed: ``random_state`` of the estimator (L-BFGS itself draws nothing).
        device: accepted for compatibility with the other protocols and ignored: scikit-learn
            fits on the CPU.

    Returns:
        ``[m, C]`` float32 numpy array of class probabilities (rows sum to 1).

    Raises:
        ValueError: an input has the wrong rank, ``num_classes < 1``, ``weight_decay < 0`` or
            ``max_iter < 1``.
        HLSSError: no train rows; label count differs from ``n``; a label outside
            ``[0, num_classes)``; train and val widths differ; NaN/inf in the embeddings.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"linear_probe: num_classes must be >= 1, got {num_classes}")
    if weight_decay < 0:
        raise ValueError(f"linear_probe: weight_decay must be >= 0, got {weight_decay}")
    if int(max_iter) < 1:
        raise ValueError(f"linear_probe: max_iter must be >= 1, got {max_iter}")
    n, d = check_2d(train_x, "train embeddings")
    m, d_val = check_2d(val_x, "val embeddings")
    if n == 0:
        raise HLSSError("linear probe: no train embeddings")
    if d != d_val:
        raise HLSSError(f"linear probe: train embeddings have width {d} but val {d_val}")
    y = _labels(train_y, n, num_classes)
    x = _as_f32(train_x, "train embeddings")
    val = _as_f32(val_x, "val embeddings")
    out = np.zeros((m, num_classes), dtype=np.float32)
    present = np.unique(y)
    if m == 0 or len(present) == 1:
        out[:, present[0]] = 1.0
        return out

    C = np.inf if weight_decay == 0 else 1.0 / (float(weight_decay) * n)
    regression = LogisticRegression(C=C, max_iter=int(max_iter), random_state=int(seed))
    model = make_pipeline(StandardScaler(), regression) if standardize else regression
    text = f"linear probe: fitting {n} x {d} train embeddings, {len(present)} classes"
    with stage(text), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    out[:, regression.classes_] = model.predict_proba(val)
    return out


def probe_split(
    embeddings: np.ndarray | torch.Tensor,
    index: pd.DataFrame,
    num_classes: int,
    train_split: str = "train",
    val_split: str = "val",
    **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """Patient-disjoint linear probe from one embedding table: train on one split, predict another.

    Args:
        embeddings: ``[N, d]`` embeddings, row ``i`` belonging to row ``i`` of ``index``.
        index: ``N`` rows with columns ``patient``, ``split`` and ``label_index``.
        num_classes: ``C``.
        train_split: the ``split`` value of the rows to fit on.
        val_split: the ``split`` value of the rows to predict.
        **kwargs: passed to :func:`linear_probe` (``weight_decay``, ``max_iter``, ``seed``, ...).

    Returns:
        ``(val_rows, probs)``: the ``[m]`` int64 positions in ``index`` of the val rows and their
        ``[m, C]`` float32 probabilities.

    Raises:
        HLSSError: lengths differ; a column is missing; a split has no rows; a patient is in both
            splits; anything :func:`linear_probe` raises.
    """
    n, _ = check_2d(embeddings, "embeddings")
    if len(index) != n:
        raise HLSSError(f"linear probe: index has {len(index)} rows but there are {n} embeddings")
    missing = [c for c in ("patient", "split", "label_index") if c not in index.columns]
    if missing:
        raise HLSSError(f"linear probe: index lacks column(s) {', '.join(missing)}")
    split = index["split"].astype(str).to_numpy()
    train_rows = np.flatnonzero(split == train_split)
    val_rows = np.flatnonzero(split == val_split)
    for name, rows in ((train_split, train_rows), (val_split, val_rows)):
        if len(rows) == 0:
            raise HLSSError(f"linear probe: no rows in split {name!r}")
    patients = index["patient"].to_numpy()
    check_patient_disjoint(patients[train_rows], patients[val_rows])
    labels = index["label_index"].to_numpy()[train_rows]
    if isinstance(embeddings, torch.Tensor):
        tr = embeddings[torch.from_numpy(train_rows)]
        va = embeddings[torch.from_numpy(val_rows)]
    else:
        arr = np.asarray(embeddings)
        tr, va = arr[train_rows], arr[val_rows]
    return val_rows, linear_probe(tr, labels, va, num_classes, **kwargs)
