"""Slide- and patient-level aggregation of patch results (the HiDisc/HLSS protocol).

Protocol: a slide's (patient's) prediction is the argmax of the sum, over its patches, of the
softmax of each patch's kNN score vector. The kNN scores are L1-normalised and lie in [0, 1], so
this softmax is soft (it flattens the patch distribution); it is implemented exactly as stated
because that is what the published numbers use.

Group order: every function here returns groups in **sorted key order** (keys must be mutually
comparable, e.g. all strings; if they are not, first-appearance order is used). The same
``groups`` therefore give the same order in :func:`aggregate_scores`, :func:`group_labels` and
:func:`mean_embeddings`, so their outputs line up row by row.

Groups are any hashable keys (``str`` slide ids, ``(patient, slide)`` tuples, ints); all work is
vectorised over patches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from hlss.errors import ConfigError

AGGREGATIONS = ("softmax_sum", "sum", "mean")


def _as_key_array(groups: Any) -> np.ndarray:
    """1-D object/str/int array of group keys (tuples are kept as single keys)."""
    if isinstance(groups, torch.Tensor):
        groups = groups.detach().cpu().numpy()
    if isinstance(groups, (pd.Series, pd.Index)):
        groups = groups.to_numpy()
    if isinstance(groups, np.ndarray):
        if groups.ndim != 1:
            raise ValueError(f"groups must be 1-D, got shape {groups.shape}")
        return groups
    keys = list(groups)
    if any(isinstance(g, tuple) for g in keys):
        return pd.Series(keys, dtype=object).to_numpy()
    arr = np.asarray(keys)
    if arr.ndim != 1:
        arr = pd.Series(keys, dtype=object).to_numpy()
    return arr


def factorize_groups(groups: Any) -> tuple[np.ndarray, np.ndarray]:
    """Integer code of each item's group and the group keys.

    Args:
        groups: ``[m]`` array-like of hashable keys.

    Returns:
        ``(codes [m] int64 in [0, g), keys [g])``, keys sorted (first-appearance order when the
        keys cannot be compared with each other).

    Raises:
        ValueError: ``groups`` is not 1-D or holds missing values (None/NaN).
    """
    arr = _as_key_array(groups)
    try:
        codes, keys = pd.factorize(arr, sort=True)
    except TypeError:
        codes, keys = pd.factorize(arr, sort=False)
    if len(codes) and codes.min() < 0:
        bad = int(np.flatnonzero(codes < 0)[0])
        raise ValueError(f"groups hold a missing key (None/NaN) at position {bad}")
    return codes.astype(np.int64), np.asarray(keys)


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def patch_probabilities(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """Row-wise softmax of patch scores, ``[m, C]`` -> ``[m, C]`` float64.

    This is the per-patch quantity the protocol sums into slides/patients; the reference
    evaluation also computes its patch-level metrics (notably mAP) on it. Argmax and top-k are
    unchanged by it, average precision is not.

    Raises:
        ValueError: ``scores`` is not 2-D.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    x = np.array(scores, dtype=np.float64, copy=True)
    if x.ndim != 2:
        raise ValueError(f"scores must have shape [patches, classes], got {x.shape}")
    return _softmax_rows(x) if len(x) else x


def aggregate_scores(
    scores: np.ndarray | torch.Tensor,
    groups: Any,
    how: str = "softmax_sum",
    normalize: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Combine patch score vectors into one score vector per group (slide or patient).

    Args:
        scores: ``[m, C]`` patch scores (e.g. :func:`hlss.eval.knn.knn_scores`).
        groups: ``[m]`` group key of every patch.
        how: ``"softmax_sum"`` (protocol: softmax of each patch's scores, summed over the group),
            ``"sum"`` (plain sum) or ``"mean"`` (mean over the group's patches).
        normalize: L1-normalise each group's row afterwards (for ``"softmax_sum"`` this is the
            mean patch probability). The argmax does not change, but ranking metrics across
            groups of different sizes (average precision) do: the reference evaluation computes
            slide/patient mAP on the normalised rows, so pass ``normalize=True`` for metrics.

    Returns:
        ``(keys [g], group_scores [g, C] float64)``, keys in sorted order (see module doc);
        ``group_scores.argmax(1)`` is the group prediction.

    Raises:
        ConfigError: unknown ``how``.
        ValueError: ``scores`` is not 2-D, lengths differ, or a group key is missing.
    """
    if how not in AGGREGATIONS:
        raise ConfigError(
            f"aggregation {how!r} is unknown; choose one of {', '.join(AGGREGATIONS)}"
        )
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    x = np.array(scores, dtype=np.float64, copy=True)
    if x.ndim != 2:
        raise ValueError(f"scores must have shape [patches, classes], got {x.shape}")
    codes, keys = factorize_groups(groups)
    if len(codes) != x.shape[0]:
        raise ValueError(f"scores have {x.shape[0]} rows but groups have {len(codes)} entries")
    if how == "softmax_sum" and len(x):
        x = _softmax_rows(x)
    out = np.zeros((len(keys), x.shape[1]), np.float64)
    np.add.at(out, codes, x)
    if how == "mean":
        out /= np.bincount(codes, minlength=len(keys))[:, None]
    if normalize and len(out):
        total = np.abs(out).sum(axis=1, keepdims=True)
        np.divide(out, total, out=out, where=total > 0)
    return keys, out


def group_labels(labels: Any, groups: Any, return_keys: bool = False) -> Any:
    """The single label of each group, in the same (sorted) order as :func:`aggregate_scores`.

    Args:
        labels: ``[m]`` label of every patch (ints or any hashable).
        groups: ``[m]`` group key of every patch.
        return_keys: also return the keys, as ``(keys, labels)``.

    Returns:
        ``[g]`` array of labels (or ``(keys [g], labels [g])``).

    Raises:
        ValueError: lengths differ, a group key is missing, or a group mixes labels (names the
            first such group).
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    lab = _as_key_array(labels)
    codes, keys = factorize_groups(groups)
    if len(lab) != len(codes):
        raise ValueError(f"labels have {len(lab)} entries but groups have {len(codes)}")
    lab_codes, lab_values = pd.factorize(lab)
    if len(lab_codes) and lab_codes.min() < 0:
        raise ValueError("labels hold a missing value (None/NaN)")
    lo = np.full(len(keys), np.iinfo(np.int64).max, np.int64)
    hi = np.full(len(keys), -1, np.int64)
    np.minimum.at(lo, codes, lab_codes)
    np.maximum.at(hi, codes, lab_codes)
    mixed = np.flatnonzero(lo != hi)
    if len(mixed):
        g = int(mixed[0])
        found = sorted({str(v) for v in lab[codes == g]})
        key = keys[g].item() if isinstance(keys[g], np.generic) else keys[g]
        raise ValueError(
            f"group {key!r} has patches with different labels ({', '.join(found)}); "
            f"{len(mixed)} group(s) affected"
        )
    out = np.asarray(lab_values)[lo] if len(keys) else np.asarray(lab_values)[:0]
    if isinstance(labels, np.ndarray) and labels.dtype != object:
        out = out.astype(labels.dtype)
    return (keys, out) if return_keys else out


def mean_embeddings(
    embeddings: np.ndarray | torch.Tensor, groups: Any, chunk_size: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Mean patch embedding of every group (the mean-embedding aggregation option).

    This option builds one embedding per slide (patient) as the plain mean of its patch
    embeddings, as stored (not normalised first), and classifies it by kNN against the **train
    patch bank** (not against train slide means), so it is directly comparable to the patch-level
    kNN; :func:`hlss.eval.knn.knn_scores` L2-normalises the means. Accumulation is float64,
    ``chunk_size`` rows at a time, so float16 inputs of any length are fine.

    Args:
        embeddings: ``[m, d]`` float array or tensor.
        groups: ``[m]`` group key of every row.
        chunk_size: rows converted to float64 at once (bounds memory).

    Returns:
        ``(keys [g], means [g, d] float32)``, keys in sorted order (see module doc).

    Raises:
        ValueError: ``embeddings`` is not 2-D floating point, lengths differ, or a key is missing.
    """
    if isinstance(embeddings, torch.Tensor):
        emb = embeddings.detach()
        if not torch.is_floating_point(emb):
            raise ValueError(f"embeddings must be floating point, got {emb.dtype}")
    else:  # converted chunk by chunk: a read-only memory map is never handed to torch
        emb = np.asarray(embeddings)
        if not np.issubdtype(emb.dtype, np.floating):
            raise ValueError(f"embeddings must be floating point, got {emb.dtype}")
    if emb.ndim != 2:
        raise ValueError(f"embeddings must have shape [rows, dim], got {tuple(emb.shape)}")
    codes, keys = factorize_groups(groups)
    if len(codes) != emb.shape[0]:
        raise ValueError(f"embeddings have {emb.shape[0]} rows but groups have {len(codes)}")
    codes_t = torch.from_numpy(codes)
    acc = torch.zeros((len(keys), emb.shape[1]), dtype=torch.float64)
    for start in range(0, emb.shape[0], chunk_size):
        part = emb[start : start + chunk_size]
        part = (
            part.cpu().to(torch.float64)
            if isinstance(part, torch.Tensor)
            else torch.from_numpy(np.array(part, dtype=np.float64))
        )
        acc.index_add_(0, codes_t[start : start + chunk_size], part)
    counts = torch.bincount(codes_t, minlength=len(keys)).to(torch.float64)
    means = (acc / counts[:, None]).to(torch.float32).numpy()
    return keys, means
