"""Linear probe on frozen embeddings (the second standard evaluation protocol besides kNN).

A multinomial logistic regression is fitted on the train split's patch embeddings and applied to
the val split's patches. The two splits must not share a patient (the dataset's split is by
patient; :func:`check_patient_disjoint` verifies it), otherwise the probe would measure how well
it recognises patients it has seen. The returned patch probabilities can be aggregated to slides
and patients exactly like the kNN scores.

The regression is plain torch (full-batch L-BFGS with a strong-Wolfe line search on the
standardised features, L2 penalty on the weights), so there is no scikit-learn dependency; it
runs on the GPU when one is present and is deterministic for a seed on a given device.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from hlss.errors import HLSSError
from hlss.eval.zero_shot import _check_2d, _rows_f32

_CHUNK = 65536


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


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _to_device(x, device: torch.device, what: str) -> torch.Tensor:
    """A float32 tensor of ``x`` on ``device``, converted chunk by chunk; checks finiteness."""
    n, d = _check_2d(x, what)
    out = torch.empty(n, d, dtype=torch.float32, device=device)
    for start in range(0, n, _CHUNK):
        out[start : start + _CHUNK] = _rows_f32(x, start, start + _CHUNK).to(device)
    if not bool(torch.isfinite(out).all()):
        raise HLSSError(f"linear probe: {what} contain NaN or infinite values")
    return out


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

    Objective: mean cross-entropy + ``weight_decay / 2 * ||W||^2`` (the bias is not penalised),
    minimised by full-batch L-BFGS (strong-Wolfe line search, at most ``max_iter`` iterations)
    from a small random initialisation drawn from ``seed``. With ``standardize`` every feature is
    shifted and scaled by the train mean and standard deviation (constant features are left
    unscaled) and the same transform is applied to ``val_x``. The global torch RNG is not touched.

    Args:
        train_x: ``[n, d]`` train embeddings (numpy or torch, float16 allowed).
        train_y: ``[n]`` integer labels in ``[0, num_classes)``.
        val_x: ``[m, d]`` embeddings to classify.
        num_classes: ``C`` (classes missing from the train set simply get low probabilities).
        weight_decay: L2 penalty (>= 0).
        max_iter: L-BFGS iterations (>= 1).
        standardize: standardise features with the train statistics.
        seed: seed of the initialisation.
        device: where to fit; ``None`` -> CUDA when available, else CPU.

    Returns:
        ``[m, C]`` float32 numpy array of class probabilities (rows sum to 1).

    Raises:
        ValueError: an input has the wrong rank, ``num_classes < 1``, ``weight_decay < 0`` or
            ``max_iter < 1``.
        HLSSError: no train rows; label count differs from ``n``; a label outside
            ``[0, num_classes)``; train and val widths differ; NaN/inf in the embeddings; the
            optimisation diverged.
    """
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"linear_probe: num_classes must be >= 1, got {num_classes}")
    if weight_decay < 0:
        raise ValueError(f"linear_probe: weight_decay must be >= 0, got {weight_decay}")
    if int(max_iter) < 1:
        raise ValueError(f"linear_probe: max_iter must be >= 1, got {max_iter}")
    n, d = _check_2d(train_x, "train embeddings")
    m, d_val = _check_2d(val_x, "val embeddings")
    if n == 0:
        raise HLSSError("linear probe: no train embeddings")
    if d != d_val:
        raise HLSSError(f"linear probe: train embeddings have width {d} but val {d_val}")
    y_np = (
        train_y.detach().cpu().numpy() if isinstance(train_y, torch.Tensor) else np.asarray(train_y)
    )
    if y_np.ndim != 1:
        raise ValueError(f"linear_probe: train_y must be 1-D, got shape {y_np.shape}")
    if len(y_np) != n:
        raise HLSSError(f"linear probe: {len(y_np)} labels for {n} train embeddings")
    if y_np.dtype.kind not in "iub" and not (
        y_np.dtype.kind == "f" and np.all(np.isfinite(y_np)) and np.all(np.mod(y_np, 1) == 0)
    ):
        raise HLSSError("linear probe: train labels must be integer class indices")
    y_np = y_np.astype(np.int64)
    bad = (y_np < 0) | (y_np >= num_classes)
    if bad.any():
        raise HLSSError(
            f"linear probe: label {int(y_np[bad][0])} outside [0, {num_classes}) "
            f"({int(bad.sum())} train rows)"
        )

    dev = _resolve_device(device)
    x = _to_device(train_x, dev, "train embeddings")
    y = torch.from_numpy(y_np).to(dev)
    if standardize:
        mean = x.mean(0, keepdim=True)
        std = x.std(0, unbiased=False, keepdim=True)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        x = (x - mean) / std
    else:
        mean = torch.zeros(1, d, device=dev)
        std = torch.ones(1, d, device=dev)

    gen = torch.Generator().manual_seed(int(seed))
    weight = (0.01 * torch.randn(d, num_classes, generator=gen)).to(dev).requires_grad_(True)
    bias = torch.zeros(num_classes, device=dev, requires_grad=True)
    optim = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=int(max_iter),
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )
    wd = float(weight_decay)

    def closure() -> torch.Tensor:
        optim.zero_grad(set_to_none=False)
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * wd * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optim.step(closure)
    if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
        raise HLSSError("linear probe: optimisation diverged (non-finite weights)")

    out = np.empty((m, num_classes), dtype=np.float32)
    with torch.no_grad():
        w, b = weight.detach(), bias.detach()
        for start in range(0, m, _CHUNK):
            chunk = _rows_f32(val_x, start, start + _CHUNK).to(dev)
            if not bool(torch.isfinite(chunk).all()):
                raise HLSSError("linear probe: val embeddings contain NaN or infinite values")
            logits = ((chunk - mean) / std) @ w + b
            out[start : start + _CHUNK] = torch.softmax(logits, dim=-1).cpu().numpy()
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
    n, _ = _check_2d(embeddings, "embeddings")
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
