"""Patient-disjoint linear probe on frozen embeddings (Gaussian blobs, CPU)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from hlss.errors import HLSSError
from hlss.eval.probe import check_patient_disjoint, linear_probe, probe_split


def _blobs(n_per_class: int, seed: int, num_classes: int = 3, dim: int = 16):
    """Linearly separable Gaussian blobs: class means 6 standard deviations apart."""
    rng = np.random.default_rng(seed)
    means = 6.0 * np.eye(num_classes, dim)
    x = np.concatenate(
        [rng.normal(means[c], 1.0, size=(n_per_class, dim)) for c in range(num_classes)]
    )
    y = np.repeat(np.arange(num_classes), n_per_class)
    # shift and scale the features so standardisation has something to do
    x = x * np.linspace(0.5, 20.0, dim) + 3.0
    return x.astype(np.float32), y


def test_probe_separates_blobs():
    train_x, train_y = _blobs(100, seed=0)
    val_x, val_y = _blobs(50, seed=1)
    probs = linear_probe(train_x, train_y, val_x, num_classes=3, device="cpu")
    assert probs.shape == (150, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert (probs.argmax(1) == val_y).mean() > 0.95
    # without standardisation it still works on these blobs
    raw = linear_probe(train_x, train_y, val_x, 3, standardize=False, device="cpu")
    assert (raw.argmax(1) == val_y).mean() > 0.95
    # a class absent from training gets a low probability
    probs4 = linear_probe(train_x, train_y, val_x, num_classes=4, device="cpu")
    assert probs4.shape == (150, 4) and probs4[:, 3].max() < 0.05


def test_probe_deterministic_and_float16():
    train_x, train_y = _blobs(60, seed=2)
    val_x, val_y = _blobs(30, seed=3)
    a = linear_probe(train_x, train_y, val_x, 3, seed=7, max_iter=50, device="cpu")
    b = linear_probe(train_x, train_y, val_x, 3, seed=7, max_iter=50, device="cpu")
    assert np.array_equal(a, b)
    rng_state = torch.random.get_rng_state()
    half = linear_probe(
        train_x.astype(np.float16),
        torch.from_numpy(train_y),
        val_x.astype(np.float16),
        3,
        max_iter=50,
        device="cpu",
    )
    assert torch.equal(rng_state, torch.random.get_rng_state())  # global RNG untouched
    assert half.dtype == np.float32
    assert (half.argmax(1) == val_y).mean() > 0.95
    tensor_in = linear_probe(
        torch.from_numpy(train_x).half(), train_y, torch.from_numpy(val_x), 3, device="cpu"
    )
    assert (tensor_in.argmax(1) == val_y).mean() > 0.95


def test_probe_input_errors():
    x, y = _blobs(10, seed=0)
    with pytest.raises(HLSSError, match="label 3 outside"):
        linear_probe(x, np.where(y == 2, 3, y), x, 3, device="cpu")
    with pytest.raises(HLSSError, match="29 labels for 30"):
        linear_probe(x, y[:-1], x, 3, device="cpu")
    with pytest.raises(HLSSError, match="width 16 but val 8"):
        linear_probe(x, y, x[:, :8], 3, device="cpu")
    with pytest.raises(HLSSError, match="no train embeddings"):
        linear_probe(x[:0], y[:0], x, 3, device="cpu")
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(HLSSError, match="NaN"):
        linear_probe(bad, y, x, 3, device="cpu")
    with pytest.raises(HLSSError, match="integer class indices"):
        linear_probe(x, y + 0.5, x, 3, device="cpu")
    assert linear_probe(x, y, x[:0], 3, device="cpu").shape == (0, 3)


def test_patient_disjoint_check():
    check_patient_disjoint(["NIO_001", "NIO_001", "NIO_002"], ["NIO_003"])
    with pytest.raises(HLSSError, match=r"1 patient\(s\) in both train and val \(NIO_002\)"):
        check_patient_disjoint(["NIO_001", "NIO_002"], ["NIO_002", "NIO_003"])
    many = [f"P{i:02d}" for i in range(8)]
    with pytest.raises(HLSSError, match="and 3 more"):
        check_patient_disjoint(many, many)


def _index(train_x, train_y, val_x, val_y, overlap: bool):
    n, m = len(train_x), len(val_x)
    train_patients = [f"T{i % 6}" for i in range(n)]
    val_patients = [f"V{i % 3}" for i in range(m)]
    if overlap:
        val_patients[0] = "T0"
    return pd.DataFrame(
        {
            "patient": train_patients + val_patients,
            "slide": ["1"] * (n + m),
            "path": [f"p{i}.tif" for i in range(n + m)],
            "label_index": np.concatenate([train_y, val_y]),
            "split": ["train"] * n + ["val"] * m,
        }
    )


def test_probe_split_patient_disjoint():
    train_x, train_y = _blobs(40, seed=4)
    val_x, val_y = _blobs(20, seed=5)
    emb = np.concatenate([train_x, val_x]).astype(np.float16)
    index = _index(train_x, train_y, val_x, val_y, overlap=False)
    rows, probs = probe_split(emb, index, 3, device="cpu")
    assert rows.tolist() == list(range(120, 180))
    assert (probs.argmax(1) == val_y).mean() > 0.95
    with pytest.raises(HLSSError, match="patient-disjoint"):
        probe_split(emb, _index(train_x, train_y, val_x, val_y, overlap=True), 3, device="cpu")
    with pytest.raises(HLSSError, match="no rows in split 'test'"):
        probe_split(emb, index, 3, val_split="test", device="cpu")


@pytest.mark.parametrize("weight_decay", [0.05, 0.5])
def test_probe_minimises_the_documented_objective(weight_decay):
    """At the returned fit, the gradient of mean cross-entropy + weight_decay/2 ||W||^2 is zero
    (checks the weight_decay -> C mapping; W is recovered from the log-probabilities)."""
    x, y = _blobs(30, seed=0, dim=4)
    x = (x - x.mean(0)) / x.std(0)
    probs = linear_probe(
        x, y, x, 3, weight_decay=weight_decay, standardize=False, max_iter=1000, device="cpu"
    ).astype(np.float64)
    logp = np.log(probs)
    design = np.c_[x, np.ones(len(x))]
    diff = np.linalg.lstsq(design, logp - logp[:, :1], rcond=None)[0][:-1]  # W up to a shift
    weight = diff - diff.mean(1, keepdims=True)  # the L2 optimum has columns summing to zero
    grad = x.T @ (probs - np.eye(3)[y]) / len(x) + weight_decay * weight
    assert np.abs(grad).max() < 0.01 * np.abs(weight_decay * weight).max()
    # a ten times weaker penalty gives more confident predictions
    weaker = linear_probe(x, y, x, 3, weight_decay=weight_decay / 10, standardize=False)
    assert weaker.max(1).mean() > probs.max(1).mean()


def test_probe_single_train_class_and_few_iterations():
    x, y = _blobs(10, seed=0)
    probs = linear_probe(x, np.full(len(x), 2), x[:4], 3, device="cpu")
    assert probs.tolist() == [[0.0, 0.0, 1.0]] * 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stopping at max_iter is not a warning
        few = linear_probe(x, y, x, 3, max_iter=1, device="cpu")
    np.testing.assert_allclose(few.sum(1), 1.0, rtol=1e-5)
