"""Classification metrics of the HiDisc/HLSS protocol, and a patient bootstrap CI.

:func:`classification_metrics` reports, for one level (patch, slide or patient):

* ``acc`` -- top-1 accuracy (prediction = argmax; ties go to the lowest class index);
* ``top2``, ``top3`` -- top-k accuracy; with fewer than k classes every label is in the top k,
  so the value is 1.0;
* ``mca`` -- mean class accuracy: the recall of each class **present in** ``labels``, averaged
  with equal weight. Classes absent from ``labels`` have no defined recall and are left out
  (torchmetrics' macro average would count a class that is absent but predicted as 0, and
  silently change with the ``num_classes`` you pass);
* ``map`` -- macro average precision (one-vs-rest, ranking all samples by that class's score)
  over the classes present in ``labels``, for the same reason;
* ``confusion`` -- ``C x C`` counts as a list of lists of int, rows = true, columns = predicted;
* ``n`` -- number of samples.

Average precision depends on how the scores rank samples *across* rows. The reference evaluation
computes patch mAP on the softmax of the kNN scores and slide/patient mAP on L1-normalised summed
softmaxes; see :func:`hlss.eval.aggregate.patch_probabilities` and
``aggregate_scores(..., normalize=True)``. The scores given here are used as they are: they are
mapped into [0, 1] by one global increasing affine map (which changes no ranking) so that
torchmetrics never re-applies its own softmax to them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_average_precision,
    multiclass_confusion_matrix,
)

from hlss.errors import HLSSError


def _scores_tensor(scores: Any) -> torch.Tensor:
    if isinstance(scores, torch.Tensor):
        t = scores.detach().cpu().to(torch.float64)
    else:
        t = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    return t


def _labels_tensor(labels: Any) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().cpu().numpy()
    else:
        arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if len(arr) and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"labels must be integer class indices, got {arr.dtype}")
    return torch.as_tensor(arr.astype(np.int64))


def _rescale_01(x: torch.Tensor) -> torch.Tensor:
    """One global increasing affine map into [0, 1]; keeps every ordering of the entries."""
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0.0 and hi <= 1.0:
        return x
    span = hi - lo
    return (x - lo) / span if span > 0 else torch.zeros_like(x)


def classification_metrics(scores: Any, labels: Any, num_classes: int) -> dict[str, Any]:
    """Accuracy, top-2/3, mean class accuracy, macro AP and confusion matrix.

    Args:
        scores: ``[n, C]`` class scores (higher = more likely), array or tensor.
        labels: ``[n]`` integer true classes in ``[0, C)``.
        num_classes: ``C``.

    Returns:
        dict with ``acc``, ``top2``, ``top3``, ``mca``, ``map`` (python floats in [0, 1]),
        ``confusion`` (``C x C`` list of lists of int, rows true, columns predicted) and
        ``n`` (int). See the module docstring for the exact definitions.

    Raises:
        HLSSError: there are no samples (``n == 0``), e.g. an empty validation split.
        ValueError: shapes disagree, labels out of range, non-finite scores.
    """
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    x = _scores_tensor(scores)
    y = _labels_tensor(labels)
    if x.ndim != 2 or x.shape[1] != num_classes:
        raise ValueError(f"scores must have shape [n, {num_classes}], got {tuple(x.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"scores have {x.shape[0]} rows but labels have {y.shape[0]} entries")
    n = int(y.shape[0])
    if n == 0:
        raise HLSSError("cannot compute classification metrics: there are no samples")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("scores contain NaN or infinite values")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]"
        )

    x = _rescale_01(x)
    present = torch.bincount(y, minlength=num_classes) > 0

    def topk(k: int) -> float:
        if k >= num_classes:
            return 1.0
        return float(multiclass_accuracy(x, y, num_classes, average="micro", top_k=k))

    if num_classes == 1:  # torchmetrics needs at least two classes; everything is right
        confusion = torch.tensor([[n]], dtype=torch.int64)
        ap = torch.ones(1, dtype=torch.float64)
    else:
        confusion = multiclass_confusion_matrix(x, y, num_classes)
        ap = multiclass_average_precision(x, y, num_classes, average="none")
    support = confusion.sum(dim=1).to(torch.float64)
    recall = confusion.diagonal().to(torch.float64) / support.clamp_min(1)
    return {
        "acc": float(confusion.diagonal().sum()) / n,
        "top2": topk(2),
        "top3": topk(3),
        "mca": float(recall[present].mean()),
        "map": float(ap[present].to(torch.float64).mean()),
        "confusion": confusion.to(torch.int64).tolist(),
        "n": n,
    }


def bootstrap_ci(
    correct: Any, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of an accuracy over independent units (patients).

    Resampling ``n`` 0/1 outcomes with replacement and averaging is the same as drawing
    ``Binomial(n, mean) / n``, so the ``n_boot`` replicates are drawn that way: exact, vectorised
    and O(n_boot) memory however many units there are.

    Args:
        correct: ``[n]`` 0/1 (or bool) outcome per unit.
        n_boot: number of bootstrap replicates.
        level: coverage, in (0, 1).
        seed: seed of the numpy generator (same seed, same interval).

    Returns:
        ``(lo, hi)`` python floats in [0, 1], ``lo <= hi``.

    Raises:
        ValueError: empty input, values other than 0/1, ``n_boot < 1``, ``level`` outside (0, 1).
    """
    if isinstance(correct, torch.Tensor):
        correct = correct.detach().cpu().numpy()
    c = np.asarray(correct)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"correct must be a non-empty 1-D array of 0/1, got shape {c.shape}")
    c = c.astype(np.float64)
    if not np.all((c == 0) | (c == 1)):
        raise ValueError("correct must hold only 0/1 (or bool) values")
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    n = c.size
    rng = np.random.default_rng(seed)
    replicates = rng.binomial(n, c.mean(), size=int(n_boot)) / n
    alpha = (1.0 - float(level)) / 2.0
    lo, hi = np.quantile(replicates, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
