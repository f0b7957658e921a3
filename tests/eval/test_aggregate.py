"""Slide/patient aggregation on a small hand-made table."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from hlss.errors import ConfigError
from hlss.eval.aggregate import (
    aggregate_scores,
    factorize_groups,
    group_labels,
    mean_embeddings,
    patch_probabilities,
)

# 5 patches, 2 classes; patient P1 has slides s1 (2 patches) and s2 (1 patch); P2 has s3 (2).
SCORES = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.25, 0.75], [1.0, 0.0]])
SLIDES = ["s3", "s1", "s2", "s3", "s1"]  # deliberately unordered
PATIENTS = ["P2", "P1", "P1", "P2", "P1"]
LABELS = [1, 0, 0, 1, 0]


def sm(a, b):
    """Softmax of a 2-vector, by hand."""
    return [math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))]


def add(*vectors):
    return [sum(v[i] for v in vectors) for i in range(2)]


def test_softmax_sum_by_hand():
    keys, got = aggregate_scores(SCORES, SLIDES)
    assert list(keys) == ["s1", "s2", "s3"]  # sorted key order
    s1 = add(sm(0.5, 0.5), sm(1.0, 0.0))
    s2 = sm(0.0, 1.0)
    s3 = add(sm(1.0, 0.0), sm(0.25, 0.75))
    np.testing.assert_allclose(got, [s1, s2, s3], atol=1e-12)
    assert list(got.argmax(1)) == [0, 1, 0]

    keys, got = aggregate_scores(SCORES, PATIENTS)
    assert list(keys) == ["P1", "P2"]
    np.testing.assert_allclose(got, [add(s1, s2), s3], atol=1e-12)
    keys, norm = aggregate_scores(SCORES, PATIENTS, normalize=True)
    np.testing.assert_allclose(norm, [np.array(add(s1, s2)) / 3, np.array(s3) / 2], atol=1e-12)


def test_sum_and_mean():
    _, total = aggregate_scores(SCORES, SLIDES, how="sum")
    np.testing.assert_allclose(total, [[1.5, 0.5], [0.0, 1.0], [1.25, 0.75]])
    _, mean = aggregate_scores(torch.tensor(SCORES), SLIDES, how="mean")
    np.testing.assert_allclose(mean, [[0.75, 0.25], [0.0, 1.0], [0.625, 0.375]])
    with pytest.raises(ConfigError):
        aggregate_scores(SCORES, SLIDES, how="max")
    with pytest.raises(ValueError, match="rows"):
        aggregate_scores(SCORES, SLIDES[:-1])


def test_patch_probabilities():
    probs = patch_probabilities(SCORES)
    np.testing.assert_allclose(probs[3], sm(0.25, 0.75))
    np.testing.assert_allclose(probs.sum(1), 1.0)


def test_tuple_keys_and_order_consistency():
    groups = list(zip(PATIENTS, SLIDES, strict=True))
    codes, keys = factorize_groups(groups)
    assert list(keys) == [("P1", "s1"), ("P1", "s2"), ("P2", "s3")]
    assert list(codes) == [2, 0, 1, 2, 0]
    k1, _ = aggregate_scores(SCORES, groups)
    k2, labs = group_labels(LABELS, groups, return_keys=True)
    k3, _ = mean_embeddings(SCORES.astype(np.float32), groups)
    assert list(k1) == list(k2) == list(k3)
    assert list(labs) == [0, 0, 1]


def test_group_labels():
    assert list(group_labels(LABELS, SLIDES)) == [0, 0, 1]
    assert list(group_labels(LABELS, PATIENTS)) == [0, 1]
    assert list(group_labels(["lgg", "hgg", "lgg"], ["b", "a", "b"])) == ["hgg", "lgg"]
    with pytest.raises(
        ValueError, match=r"group 'b' has patches with different labels \(hgg, lgg\)"
    ):
        group_labels(["lgg", "hgg", "hgg"], ["b", "a", "b"])
    with pytest.raises(ValueError, match=r"'P1'.*different labels"):
        group_labels([0, 0, 1, 1, 1], PATIENTS)


def test_mean_embeddings():
    emb = np.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]], np.float16)
    keys, means = mean_embeddings(emb, SLIDES, chunk_size=2)
    assert list(keys) == ["s1", "s2", "s3"]
    np.testing.assert_allclose(means, [[6, 7], [5, 6], [4, 5]])
    assert means.dtype == np.float32
    keys, means = mean_embeddings(torch.tensor(emb), PATIENTS)
    np.testing.assert_allclose(means, [[(3 + 5 + 9) / 3, (4 + 6 + 10) / 3], [4, 5]], rtol=1e-6)
    with pytest.raises(ValueError):
        mean_embeddings(emb, SLIDES[:3])


def test_mean_embeddings_of_a_read_only_memory_map(tmp_path):
    """Embedding sets are read-only float16 memory maps: no copy warning, same means."""
    emb = np.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]], np.float16)
    path = tmp_path / "emb.f16"
    emb.tofile(path)
    mapped = np.memmap(path, dtype=np.float16, mode="r", shape=emb.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keys, means = mean_embeddings(mapped, SLIDES, chunk_size=2)
    assert list(keys) == ["s1", "s2", "s3"]
    np.testing.assert_allclose(means, [[6, 7], [5, 6], [4, 5]])


def test_missing_key_and_large_vectorised():
    with pytest.raises(ValueError, match="missing"):
        aggregate_scores(SCORES, ["a", None, "b", "a", "b"])
    rng = np.random.default_rng(0)
    scores = rng.random((60000, 7))
    slides = rng.integers(0, 257, 60000)
    _, agg = aggregate_scores(scores, slides)
    assert agg.shape == (257, 7)
    np.testing.assert_allclose(agg.sum(1), np.bincount(slides), rtol=1e-9)
