"""The vectorised slide/patient aggregation against a direct loop over groups (the way the
published evaluation states it), on random patches of many slides and patients."""

from __future__ import annotations

import numpy as np
import pytest

from hlss.eval.aggregate import aggregate_scores, group_labels, mean_embeddings


def loop_aggregate(scores, groups, how, normalize):
    """One group at a time: softmax of each patch (for softmax_sum), then sum or mean."""
    out = {}
    for key in sorted(set(groups)):
        rows = [i for i, g in enumerate(groups) if g == key]
        vectors = []
        for i in rows:
            x = np.asarray(scores[i], np.float64)
            if how == "softmax_sum":
                x = np.exp(x - x.max())
                x = x / x.sum()
            vectors.append(x)
        total = np.sum(vectors, axis=0)
        if how == "mean":
            total = total / len(rows)
        if normalize:
            total = total / np.abs(total).sum()
        out[key] = total
    return out


@pytest.fixture(scope="module")
def patches():
    rng = np.random.default_rng(7)
    m = 3000
    patient = rng.integers(0, 60, m)
    slide = rng.integers(0, 3, m)
    patients = [f"P{p:03d}" for p in patient]
    slides = [f"P{p:03d}/S{s}" for p, s in zip(patient, slide, strict=True)]
    labels = np.array([p % 5 for p in patient])
    scores = rng.random((m, 5)).astype(np.float32)
    scores /= scores.sum(1, keepdims=True)  # like kNN scores: rows sum to 1
    return scores, slides, patients, labels


@pytest.mark.parametrize("level", ["slides", "patients", "tuples"])
@pytest.mark.parametrize(
    ("how", "normalize"),
    [("softmax_sum", True), ("softmax_sum", False), ("sum", False), ("mean", True)],
)
def test_matches_loop(patches, level, how, normalize):
    scores, slides, patients, _ = patches
    groups = {
        "slides": slides,
        "patients": patients,
        "tuples": list(zip(patients, slides, strict=True)),
    }[level]
    keys, got = aggregate_scores(scores, groups, how=how, normalize=normalize)
    want = loop_aggregate(scores, groups, how, normalize)
    assert [k if not isinstance(k, np.ndarray) else tuple(k) for k in keys] == list(want)
    np.testing.assert_allclose(got, np.stack(list(want.values())), rtol=1e-12, atol=1e-12)
    assert np.array_equal(got.argmax(1), np.stack(list(want.values())).argmax(1))


def test_labels_and_means_match_loop(patches):
    _, slides, patients, labels = patches
    keys, got = group_labels(labels, patients, return_keys=True)
    assert list(keys) == sorted(set(patients))
    want = [labels[patients.index(k)] for k in keys]
    np.testing.assert_array_equal(got, want)
    emb = np.random.default_rng(8).standard_normal((len(slides), 16)).astype(np.float16)
    keys, means = mean_embeddings(emb, slides, chunk_size=257)
    for key, mean in zip(keys, means, strict=True):
        rows = [i for i, s in enumerate(slides) if s == key]
        np.testing.assert_allclose(mean, emb[rows].astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
