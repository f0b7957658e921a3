"""Plots write real PNG files."""

from __future__ import annotations

import pytest

from hlss.eval.plots import plot_accuracy_curve, plot_confusion

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion(tmp_path, normalize):
    cm = [[5, 1, 0], [2, 3, 0], [0, 0, 0]]  # last row empty: no division warning/crash
    out = plot_confusion(
        cm,
        ["hgg", "lgg", "normal"],
        tmp_path / "sub" / "cm.png",
        title="patient",
        normalize=normalize,
    )
    data = out.read_bytes()
    assert out == tmp_path / "sub" / "cm.png"
    assert data.startswith(PNG) and len(data) > 1000


def test_plot_confusion_errors(tmp_path):
    with pytest.raises(ValueError):
        plot_confusion([[1, 2]], ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError):
        plot_confusion([[1, 2], [3, 4]], ["a"], tmp_path / "x.png")


def test_plot_accuracy_curve(tmp_path):
    rows = [
        {"step": 200, "patch_acc": 0.6, "slide_acc": 0.7, "patient_acc": 0.75},
        {"step": 100, "patch_acc": 0.5, "slide_acc": 0.55},
        {"step": 300, "patch_acc": 0.7, "slide_acc": 0.8, "patient_acc": 0.9, "loss": 1.0},
    ]
    out = plot_accuracy_curve(rows, tmp_path / "acc.png", title="kNN accuracy")
    assert out.read_bytes().startswith(PNG)
    with pytest.raises(ValueError):
        plot_accuracy_curve([], tmp_path / "y.png")
    with pytest.raises(ValueError):
        plot_accuracy_curve([{"patch_acc": 0.5}], tmp_path / "y.png")
    with pytest.raises(ValueError):
        plot_accuracy_curve([{"step": 1, "loss": 0.5}], tmp_path / "y.png")


def test_learning_curves_png(tmp_path):
    from hlss.eval.plots import plot_learning_curves

    band = {lv: {"mean": 0.5, "min": 0.4, "max": 0.6} for lv in ("patch", "slide", "patient")}
    curves = {
        "hidisc": {50: band, 100: band},
        "attr3levels": {50: band, 100: {lv: {"mean": 0.7} for lv in band}},
        "untrained": {0: {lv: {"mean": 0.3} for lv in band}},
    }
    path = plot_learning_curves(curves, tmp_path / "sub" / "curves.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one model"):
        plot_learning_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="has no steps"):
        plot_learning_curves({"m": {}}, tmp_path / "y.png")
