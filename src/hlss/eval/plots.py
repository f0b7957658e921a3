"""Evaluation plots: confusion matrices and accuracy-vs-step curves, written as PNG files.

Matplotlib is imported inside the functions, and figures are drawn on the Agg canvas directly
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``), so importing this module has no side
effects, no GUI backend is ever needed and pyplot's global state (and any backend a notebook
chose) is left alone. Callers choose a fresh output folder; existing files at ``path`` are
replaced. Missing parent folders are created.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hlss.levels import LEVELS


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", bbox_inches="tight")
    return out


def plot_confusion(
    confusion: Any,
    classes: Sequence[str],
    path: str | Path,
    title: str = "",
    normalize: bool = True,
) -> Path:
    """Draw a confusion matrix (rows true, columns predicted) to a PNG file.

    Args:
        confusion: ``C x C`` counts (list of lists or array), rows = true class.
        classes: ``C`` class names.
        path: output PNG path.
        title: figure title.
        normalize: colour by the row-normalised fraction (recall per cell) and print
            ``count`` plus ``percent of the row`` in each cell; otherwise colour and print counts.

    Returns:
        The written path.

    Raises:
        ValueError: ``confusion`` is not square, has negative entries, or does not match
            ``classes``.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be a square matrix, got shape {cm.shape}")
    if cm.shape[0] != len(classes):
        raise ValueError(
            f"confusion is {cm.shape[0]}x{cm.shape[0]} but {len(classes)} classes given"
        )
    if (cm < 0).any():
        raise ValueError("confusion must not hold negative counts")
    c = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    shown = frac if normalize else cm

    side = max(4.0, 0.9 * c + 2.0)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    vmax = 1.0 if normalize else max(1.0, float(cm.max()))
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(
        image,
        ax=ax,
        fraction=0.046,
        pad=0.04,
        label="fraction of true class" if normalize else "count",
    )
    ax.set_xticks(range(c), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(c), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    font = max(5, min(10, int(60 / max(c, 1))))
    for i in range(c):
        for j in range(c):
            count = round(float(cm[i, j]))
            text = f"{count}\n{100.0 * frac[i, j]:.1f}%" if normalize else f"{count}"
            dark = shown[i, j] > 0.55 * vmax
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=font,
                color="white" if dark else "black",
            )
    return _save(fig, path)


def plot_accuracy_curve(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    title: str = "",
    metrics: Sequence[str] | None = None,
) -> Path:
    """Draw accuracy against training step, one line per level, to a PNG file.

    Args:
        rows: dicts with a numeric ``"step"`` and metric values in [0, 1] (e.g. ``patch_acc``,
            ``slide_acc``, ``patient_acc``); a row may lack some metrics (that point is skipped).
            Rows are sorted by step.
        path: output PNG path.
        title: figure title.
        metrics: keys to draw; default every key ending in ``"_acc"`` found in any row, patch,
            slide and patient first.

    Returns:
        The written path.

    Raises:
        ValueError: no rows, a row without ``"step"``, or no metric to draw.
    """
    if not rows:
        raise ValueError("plot_accuracy_curve needs at least one row")
    for i, row in enumerate(rows):
        if "step" not in row:
            raise ValueError(f"row {i} has no 'step' key")
    if metrics is None:
        found = sorted({key for row in rows for key in row if key.endswith("_acc")})
        ranked = [f"{level}_acc" for level in LEVELS if f"{level}_acc" in found]
        metrics = ranked + [key for key in found if key not in ranked]
    if not metrics:
        raise ValueError("plot_accuracy_curve found no metric keys (ending in '_acc') to draw")
    ordered = sorted(rows, key=lambda row: float(row["step"]))

    fig = _new_figure(6.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for key in metrics:
        points = [
            (float(row["step"]), 100.0 * float(row[key]))
            for row in ordered
            if row.get(key) is not None and math.isfinite(float(row[key]))
        ]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o", markersize=3, label=key.removesuffix("_acc"))
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", title="level")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_learning_curves(
    curves: dict[str, dict[int, dict[str, Any]]], path: str | Path, title: str = ""
) -> Path:
    """kNN accuracy against training step for several models, one panel per level.

    Args:
        curves: ``{model: {step: {level: {"mean": a, "min": lo, "max": hi}}}}`` (``min``/``max``
            optional: the band drawn around the mean, e.g. over seeds). A model named
            ``"untrained"`` is drawn as a dashed horizontal line at its first step's mean.
        path: output PNG path.
        title: figure title.

    Returns:
        The written path.

    Raises:
        ValueError: no models, or a model without steps.
    """
    if not curves:
        raise ValueError("plot_learning_curves needs at least one model")
    fig = _new_figure(13, 3.9)
    axes = fig.subplots(1, len(LEVELS), sharey=True)
    for ax, level in zip(axes, LEVELS, strict=True):
        for model, per_step in curves.items():
            if not per_step:
                raise ValueError(f"model {model!r} has no steps")
            steps = sorted(per_step)
            mean = [per_step[s][level]["mean"] for s in steps]
            if model == "untrained":
                ax.axhline(mean[0], color="grey", linestyle="--", label=model)
                continue
            (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=model)
            if all("min" in per_step[s][level] for s in steps):
                low = [per_step[s][level]["min"] for s in steps]
                high = [per_step[s][level]["max"] for s in steps]
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
        ax.set_title(f"{level} kNN accuracy")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
