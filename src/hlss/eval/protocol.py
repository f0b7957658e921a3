"""The evaluation protocol: patch scores -> patch, slide and patient metrics.

Pure functions on embedding sets and tables (nothing here reads a config, a file or a model):
weighted cosine kNN of val patches against the train bank, aggregation of patch scores to
slides and patients, the metrics of every level and the rows of ``metrics.csv``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hlss.errors import ConfigError, HLSSError
from hlss.eval.aggregate import aggregate_scores, group_labels, mean_embeddings, patch_probabilities
from hlss.eval.knn import KNNIndex
from hlss.eval.metrics import bootstrap_ci, classification_metrics
from hlss.levels import LEVELS

if TYPE_CHECKING:
    from hlss.eval.embed import EmbeddingSet

SCALARS = ("acc", "top2", "top3", "mca", "map")
"""The per-level metrics of ``metrics.csv`` and MLflow."""
AGGREGATIONS = ("softmax_sum", "mean_embedding")
"""How kNN scores slides and patients: sum of patch scores, or kNN of the mean embedding."""

GroupScores = Callable[[list], np.ndarray]


def slide_and_patient_groups(frame: pd.DataFrame) -> dict[str, list]:
    """Group key of every patch at slide level (``(patient, slide)``) and patient level.

    Args:
        frame: ``m`` rows with columns ``patient`` and ``slide``.

    Returns:
        ``{"slide": [(patient, slide)] * m, "patient": [patient] * m}``.
    """
    return {
        "slide": list(zip(frame["patient"], frame["slide"], strict=True)),
        "patient": frame["patient"].tolist(),
    }


def summed_groups(patch_scores: np.ndarray) -> GroupScores:
    """Group scoring by summing the ``[m, C]`` patch probabilities of a group, renormalised
    (zero-shot and linear probe)."""

    def group_scores(keys: list) -> np.ndarray:
        return aggregate_scores(patch_scores, keys, how="sum", normalize=True)[1]

    return group_scores


def score_levels(
    val: EmbeddingSet,
    patch_scores: np.ndarray,
    group_scores: GroupScores,
    n_boot: int = 2000,
    ci_level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Metrics at patch, slide and patient level from patch scores and a group-scoring rule.

    Args:
        val: the evaluated patches (index and labels), ``m`` rows, ``C`` classes.
        patch_scores: ``[m, C]`` patch-level scores (predictions and patch metrics).
        group_scores: maps the per-patch group keys to ``[g, C]`` group scores, rows in sorted
            key order (as :func:`hlss.eval.aggregate.aggregate_scores` returns them).
        n_boot, ci_level, seed: bootstrap (over patients) of the patient-level accuracy interval.

    Returns:
        ``{"metrics": {level: {...}}, "confusion": {level: CxC}, "predictions": DataFrame,
        "classes": [...]}``; patient level carries ``acc_ci95 = [lo, hi]``.
    """
    classes = list(val.classes)
    C = len(classes)
    labels, frame = val.labels, val.index
    metrics, confusion = {}, {}
    m = classification_metrics(patch_scores, labels, C)
    confusion["patch"] = m.pop("confusion")
    metrics["patch"] = m
    correct = None
    for level, keys in slide_and_patient_groups(frame).items():
        level_scores = group_scores(keys)
        level_labels = group_labels(labels, keys)
        m = classification_metrics(level_scores, level_labels, C)
        confusion[level] = m.pop("confusion")
        metrics[level] = m
        correct = (np.asarray(level_scores).argmax(1) == level_labels).astype(np.int64)
    lo, hi = bootstrap_ci(correct, n_boot=int(n_boot), level=float(ci_level), seed=int(seed))
    metrics["patient"]["acc_ci95"] = [float(lo), float(hi)]
    predictions = pd.DataFrame(
        {
            "path": frame["path"].to_numpy(),
            "patient": frame["patient"].to_numpy(),
            "slide": frame["slide"].to_numpy(),
            "label": frame["label"].to_numpy(),
            "predicted": np.asarray(classes, dtype=object)[np.asarray(patch_scores).argmax(1)],
        }
    )
    for j, name in enumerate(classes):
        predictions[f"score_{name}"] = np.round(np.asarray(patch_scores)[:, j], 6)
    return {
        "metrics": metrics,
        "confusion": confusion,
        "predictions": predictions,
        "classes": classes,
    }


def knn_evaluate(
    train: EmbeddingSet,
    val: EmbeddingSet,
    k: int = 200,
    temperature: float = 0.07,
    aggregate: str = "softmax_sum",
    backend: str = "auto",
    device=None,
    **bootstrap,
) -> dict:
    """The kNN protocol: weighted cosine kNN of val patches against the train bank, then slide
    and patient scores by ``aggregate`` (see :data:`AGGREGATIONS`).

    Args:
        train, val: embedding sets with the same class list.
        k, temperature, backend, device: see :class:`hlss.eval.knn.KNNIndex`.
        **bootstrap: ``n_boot``, ``ci_level``, ``seed`` of :func:`score_levels`.

    Returns:
        What :func:`score_levels` returns.

    Raises:
        ConfigError: an unknown ``aggregate``.
        HLSSError: the class lists differ; no val patches.
    """
    if aggregate not in AGGREGATIONS:
        raise ConfigError(f"aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    if tuple(train.classes) != tuple(val.classes):
        raise HLSSError("train and val embeddings disagree on the class list")
    if len(val) == 0:
        raise HLSSError("no val patches to evaluate")
    index = KNNIndex(
        train.features, train.labels, num_classes=len(val.classes), backend=backend, device=device
    )
    k, temperature = int(k), float(temperature)
    scores = index.scores(val.features, k=k, temperature=temperature)

    def group_scores(keys: list) -> np.ndarray:
        if aggregate == "softmax_sum":
            return aggregate_scores(scores, keys, how="softmax_sum", normalize=True)[1]
        _, means = mean_embeddings(val.features, keys)
        return index.scores(means, k=k, temperature=temperature)

    return score_levels(val, patch_probabilities(scores), group_scores, **bootstrap)


def metrics_row(info: Mapping, metrics: Mapping) -> dict:
    """One ``metrics.csv`` row: step, epoch, checkpoint file name, ``<level>_<metric>`` for every
    level and :data:`SCALARS`, and the patient accuracy interval (``patient_acc_ci_lo/hi``)."""
    row = {
        "step": info["step"],
        "epoch": info["epoch"],
        "checkpoint": os.path.basename(info["checkpoint"]),
    }
    for level in LEVELS:
        for key in SCALARS:
            row[f"{level}_{key}"] = metrics[level][key]
    lo, hi = metrics["patient"].get("acc_ci95", metrics["patient"].get("acc_ci", [None, None]))
    row["patient_acc_ci_lo"], row["patient_acc_ci_hi"] = lo, hi
    return row


def nested_metrics(row: Mapping) -> dict:
    """A :func:`metrics_row` back to ``{level: {metric: value}}`` (:data:`SCALARS` only)."""
    return {level: {key: row[f"{level}_{key}"] for key in SCALARS} for level in LEVELS}
