"""Metrics on a hand-made 3-class, 6-sample case; absent classes; bootstrap CI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hlss.errors import HLSSError
from hlss.eval.metrics import bootstrap_ci, classification_metrics

# Column values are distinct, so average precision has no ties.
SCORES = np.array(
    [
        [0.70, 0.20, 0.10],  # true 0, pred 0
        [0.25, 0.45, 0.30],  # true 0, pred 1; true class ranked 3rd
        [0.15, 0.60, 0.25],  # true 1, pred 1
        [0.41, 0.35, 0.24],  # true 1, pred 0; true class ranked 2nd
        [0.05, 0.15, 0.80],  # true 2, pred 2
        [0.30, 0.22, 0.48],  # true 2, pred 2
    ]
)
LABELS = np.array([0, 0, 1, 1, 2, 2])
# AP by hand (rank samples by the class column, precision at each positive):
# class 0: .70(+) .41 .30 .25(+) -> (1/1 + 2/4) / 2 = 0.75
# class 1: .60(+) .45 .35(+)     -> (1/1 + 2/3) / 2 = 5/6
# class 2: .80(+) .48(+)         -> 1
AP = [0.75, 5 / 6, 1.0]


def test_hand_made_case():
    m = classification_metrics(SCORES, LABELS, 3)
    assert m["n"] == 6
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["top2"] == pytest.approx(5 / 6)
    assert m["top3"] == pytest.approx(1.0)
    assert m["mca"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert m["map"] == pytest.approx(sum(AP) / 3)
    assert m["confusion"] == [[1, 1, 0], [1, 1, 0], [0, 0, 2]]
    for key in ("acc", "top2", "top3", "mca", "map"):
        assert isinstance(m[key], float) and 0.0 <= m[key] <= 1.0
    assert all(isinstance(v, int) for row in m["confusion"] for v in row)


def test_scale_invariance_and_tensors():
    """Unnormalised scores (e.g. softmax sums > 1) rank the same, so the metrics are the same."""
    base = classification_metrics(SCORES, LABELS, 3)
    scaled = classification_metrics(torch.tensor(SCORES * 7.0 + 2.0), torch.tensor(LABELS), 3)
    for key in ("acc", "top2", "top3", "mca", "map"):
        assert scaled[key] == pytest.approx(base[key])
    assert scaled["confusion"] == base["confusion"]


def test_absent_class_is_ignored():
    scores = np.concatenate([SCORES, np.linspace(0.01, 0.02, 6)[:, None]], axis=1)
    m = classification_metrics(scores, LABELS, 4)
    assert m["mca"] == pytest.approx(2 / 3)
    assert m["map"] == pytest.approx(sum(AP) / 3)
    assert m["confusion"][3] == [0, 0, 0, 0]
    assert len(m["confusion"]) == 4
    # a class absent from labels but predicted lowers acc, not mca's denominator
    scores[0] = [0.1, 0.1, 0.1, 0.9]
    m = classification_metrics(scores, LABELS, 4)
    assert m["confusion"][0] == [0, 1, 0, 1]
    assert m["mca"] == pytest.approx((0 + 1 / 2 + 1) / 3)
    assert m["acc"] == pytest.approx(3 / 6)


def test_fewer_classes_than_k():
    m = classification_metrics(np.array([[0.9, 0.1], [0.8, 0.2]]), np.array([0, 1]), 2)
    assert m["acc"] == 0.5 and m["top2"] == 1.0 and m["top3"] == 1.0
    assert m["map"] == pytest.approx(1.0 * 0.5 + 0.5 * 1.0)  # class0 AP 1, class1 AP 1/2


def test_metric_errors():
    with pytest.raises(HLSSError):
        classification_metrics(np.zeros((0, 3)), np.zeros(0, int), 3)
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics(SCORES, LABELS + 1, 3)
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(SCORES, LABELS, 4)
    with pytest.raises(ValueError, match="rows"):
        classification_metrics(SCORES, LABELS[:-1], 3)


def test_bootstrap_ci():
    rng = np.random.default_rng(1)
    correct = (rng.random(60) < 0.85).astype(int)
    lo, hi = bootstrap_ci(correct)
    assert 0.0 <= lo <= correct.mean() <= hi <= 1.0
    assert (lo, hi) == bootstrap_ci(correct)  # deterministic for the seed
    big = np.tile(correct, 20)
    lo_b, hi_b = bootstrap_ci(big)
    assert lo_b <= big.mean() <= hi_b
    assert hi_b - lo_b < (hi - lo) / 2  # ~sqrt(20) narrower
    assert bootstrap_ci(np.ones(10, bool)) == (1.0, 1.0)
    lo90, hi90 = bootstrap_ci(correct, level=0.5)
    assert lo <= lo90 <= hi90 <= hi
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([0, 2, 1])
    with pytest.raises(ValueError):
        bootstrap_ci([0, 1], level=1.0)
