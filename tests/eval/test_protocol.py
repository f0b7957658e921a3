"""The evaluation protocol on hand-made embedding sets (no model, no files)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hlss.errors import ConfigError, HLSSError
from hlss.eval.embed import EmbeddingSet
from hlss.eval.protocol import (
    SCALARS,
    knn_evaluate,
    metrics_row,
    nested_metrics,
    score_levels,
    slide_and_patient_groups,
    summed_groups,
)
from hlss.levels import LEVELS

CLASSES = ("a", "b", "c")


def _set(seed: int, patients: list[str], classes=CLASSES, flip: int | None = None) -> EmbeddingSet:
    """Per patient one class (patient i -> class i % C), 2 slides x 4 patches, features near the
    class's unit vector; ``flip`` gives that patient's patches the next class's direction."""
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    for i, patient in enumerate(patients):
        label = i % len(classes)
        direction = (label + 1) % len(classes) if i == flip else label
        for slide in ("1", "2"):
            for j in range(4):
                rows.append((patient, slide, f"{patient}/{slide}/{j}.tif", classes[label], label))
                feats.append(np.eye(8)[direction] + 0.05 * rng.normal(size=8))
    index = pd.DataFrame(rows, columns=["patient", "slide", "path", "label", "label_index"])
    return EmbeddingSet(np.asarray(feats, np.float16), index, tuple(classes))


TRAIN = _set(0, [f"T{i}" for i in range(6)])
VAL = _set(1, [f"V{i}" for i in range(6)])
BOOT = {"n_boot": 100, "ci_level": 0.9, "seed": 0}


@pytest.mark.parametrize("aggregate", ["softmax_sum", "mean_embedding"])
def test_knn_protocol_on_separable_sets(aggregate):
    result = knn_evaluate(
        TRAIN, VAL, k=5, aggregate=aggregate, backend="torch", device="cpu", **BOOT
    )
    metrics = result["metrics"]
    for level in LEVELS:
        assert metrics[level]["acc"] == 1.0 and metrics[level]["mca"] == 1.0
        assert set(SCALARS) <= set(metrics[level])
    assert metrics["patient"]["acc_ci95"] == [1.0, 1.0]
    n_groups = {"patch": len(VAL), "slide": 12, "patient": 6}
    for level in LEVELS:
        confusion = np.asarray(result["confusion"][level])
        assert confusion.shape == (3, 3) and confusion.sum() == n_groups[level]
    preds = result["predictions"]
    assert list(preds.columns) == [
        "path", "patient", "slide", "label", "predicted", "score_a", "score_b", "score_c"
    ]  # fmt: skip
    assert (preds["predicted"] == preds["label"]).all()
    assert result["classes"] == list(CLASSES)


def test_one_wrong_patient_shows_at_every_level():
    val = _set(1, [f"V{i}" for i in range(6)], flip=0)
    metrics = knn_evaluate(TRAIN, val, k=5, backend="torch", device="cpu", **BOOT)["metrics"]
    assert metrics["patch"]["acc"] == pytest.approx(40 / 48)
    assert metrics["slide"]["acc"] == pytest.approx(10 / 12)
    assert metrics["patient"]["acc"] == pytest.approx(5 / 6)
    lo, hi = metrics["patient"]["acc_ci95"]
    assert 0.0 <= lo <= 5 / 6 <= hi <= 1.0


def test_knn_protocol_errors():
    with pytest.raises(ConfigError, match="aggregate must be one of"):
        knn_evaluate(TRAIN, VAL, aggregate="vote")
    with pytest.raises(HLSSError, match="class list"):
        knn_evaluate(TRAIN, _set(1, ["V0", "V1"], classes=("a", "b", "x")), backend="torch")
    empty = EmbeddingSet(VAL.features[:0], VAL.index.iloc[:0], CLASSES)
    with pytest.raises(HLSSError, match="no val patches"):
        knn_evaluate(TRAIN, empty, backend="torch")


def test_summed_groups_and_groups():
    keys = slide_and_patient_groups(VAL.index)
    assert keys["slide"][:5] == [("V0", "1")] * 4 + [("V0", "2")]
    assert keys["patient"][8] == "V1"
    scores = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.5, 0.5, 0.0]], np.float32)
    summed = summed_groups(scores)(["y", "x", "y"])  # rows in sorted key order: x, y
    np.testing.assert_allclose(summed, [[0.1, 0.9, 0.0], [0.7, 0.3, 0.0]], rtol=1e-6)


def test_score_levels_with_given_scores_and_row_round_trip():
    onehot = np.eye(3, dtype=np.float32)[VAL.labels]
    result = score_levels(VAL, onehot, summed_groups(onehot), **BOOT)
    info = {"step": 7, "epoch": 1, "checkpoint": "/runs/r/checkpoints/step-0000007.ckpt"}
    row = metrics_row(info, result["metrics"])
    assert row["checkpoint"] == "step-0000007.ckpt" and row["step"] == 7
    assert row["patient_acc_ci_lo"] == row["patient_acc_ci_hi"] == 1.0
    assert nested_metrics(row) == {
        level: {key: result["metrics"][level][key] for key in SCALARS} for level in LEVELS
    }
