"""Tests for the per-modality base transforms."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from hlss.data.transforms import BaseTransform, he_base, srh_base
from hlss.errors import ConfigError, DataError


def _srh(ch2: list[int], ch3: list[int]) -> np.ndarray:
    """A (2, 1, W) uint16 patch from per-pixel CH2 and CH3 counts."""
    return np.array([[ch2], [ch3]], dtype=np.uint16)


def test_srh_base_matches_hand_computation():
    raw = _srh([10000, 30000, 0, 2000], [20000, 10000, 65535, 2000])
    out = srh_base(raw)
    assert out.dtype == torch.float32 and out.shape == (3, 1, 4)
    d = 65536.0
    expected = np.array(
        [
            # CH3 - CH2 + 5000, clamped; pixel 1 is negative (no uint16 wraparound), pixel 2 > 1
            [(10000 + 5000) / d, 0.0, 1.0, 5000 / d],
            [10000 / d, 30000 / d, 0.0, 2000 / d],
            [20000 / d, 10000 / d, 65535 / d, 2000 / d],
        ],
        dtype=np.float32,
    )[:, None, :]
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-7)
    assert out.min() >= 0 and out.max() <= 1


def test_srh_base_accepts_tensor_and_rejects_bad_dtype_or_shape():
    raw = np.random.default_rng(0).integers(0, 65536, size=(2, 5, 6), dtype=np.uint16)
    torch.testing.assert_close(srh_base(torch.from_numpy(raw)), srh_base(raw))
    with pytest.raises(DataError, match="uint16"):
        srh_base(raw.astype(np.float32))
    with pytest.raises(DataError, match=r"\(2, H, W\)"):
        srh_base(np.zeros((3, 4, 4), np.uint16))


def test_he_base_divides_by_255():
    raw = np.array([0, 51, 128, 255], dtype=np.uint8).reshape(1, 1, 4).repeat(3, axis=0)
    out = he_base(raw)
    assert out.dtype == torch.float32 and out.shape == (3, 1, 4)
    np.testing.assert_allclose(out[0, 0].numpy(), [0.0, 0.2, 128 / 255, 1.0], atol=1e-7)
    with pytest.raises(DataError, match="uint8"):
        he_base(raw.astype(np.uint16))


@pytest.mark.parametrize(
    ("modality", "raw"),
    [
        ("srh", np.full((2, 40, 30), 1000, np.uint16)),
        ("he", np.full((3, 40, 30), 7, np.uint8)),
    ],
)
def test_base_transform_centre_crop(modality, raw):
    raw = raw.copy()
    # mark the centre pixel so the crop position can be checked
    raw[:, 20, 15] = 50000 if modality == "srh" else 250
    full = BaseTransform(modality)(raw)
    assert full.shape == (3, 40, 30)
    out = BaseTransform(modality, size=10)(raw)
    assert out.shape == (3, 10, 10) and out.dtype == torch.float32
    torch.testing.assert_close(out, full[:, 15:25, 10:20])


def test_base_transform_resizes_when_smaller():
    raw = np.random.default_rng(1).integers(0, 256, size=(3, 8, 12), dtype=np.uint8)
    out = BaseTransform("he", size=16)(raw)
    assert out.shape == (3, 16, 16)
    assert out.min() >= 0 and out.max() <= 1


def test_base_transform_unknown_modality_and_bad_size():
    with pytest.raises(ConfigError, match="unknown modality 'ct'"):
        BaseTransform("ct")
    with pytest.raises(ConfigError, match="size"):
        BaseTransform("srh", size=0)


def test_base_transform_is_picklable():
    t = BaseTransform("srh", size=4)
    t2 = pickle.loads(pickle.dumps(t))
    raw = np.random.default_rng(2).integers(0, 65536, size=(2, 6, 6), dtype=np.uint16)
    torch.testing.assert_close(t(raw), t2(raw))
    assert "srh" in repr(t2)


def test_srh_base_equals_the_plain_formula_bit_for_bit():
    """The single-buffer numpy version gives exactly ``[CH3 - CH2 + offset, CH2, CH3] / 2^16``
    clamped, computed the plain way in torch, including the extremes of the uint16 range."""
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 65536, size=(2, 37, 41), dtype=np.uint16)
    raw[:, 0, :4] = [[0, 65535, 0, 65535], [0, 0, 65535, 65535]]
    x = torch.from_numpy(raw.astype(np.float32)) / 65536.0
    expected = torch.stack((x[1] - x[0] + 5000.0 / 65536.0, x[0], x[1])).clamp_(0.0, 1.0)
    out = srh_base(raw)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("modality", ["srh", "he"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"standardize": True},
        {"size": 24},
        {"size": 24, "standardize": True},
        {"size": 16},
        {"size": 16, "resize": True},
        {"size": 40},
    ],
)
def test_into_writes_what_a_call_returns(modality, options):
    rng = np.random.default_rng(3)
    if modality == "srh":
        raw = rng.integers(0, 30000, (2, 24, 24), dtype=np.uint16)
    else:
        raw = rng.integers(0, 256, (3, 24, 24), dtype=np.uint8)
    raw[..., 0] = 0  # a constant column keeps a quantile exact
    transform = BaseTransform(modality, **options)
    expected = transform(raw)
    assert transform.output_shape(raw) == tuple(expected.shape)
    out = torch.full(expected.shape, float("nan"))
    assert transform.into(raw, out) is out
    assert torch.equal(out, expected)


def test_into_refuses_an_output_of_another_shape_or_dtype():
    raw = np.zeros((2, 8, 8), dtype=np.uint16)
    for out in (torch.empty(3, 8, 9), torch.empty(3, 8, 8, dtype=torch.float64)):
        with pytest.raises(ValueError, match="contiguous float32 tensor of shape"):
            BaseTransform("srh").into(raw, out)


def test_standardize_in_place_gives_the_copying_version_and_zeroes_a_constant_channel():
    from hlss.data.transforms import standardize_intensity, standardize_intensity_

    x = torch.rand(3, 20, 20)
    x[1] = 0.25
    expected = standardize_intensity(x)
    assert not torch.equal(expected, x)
    y = x.clone()
    assert standardize_intensity_(y) is y
    assert torch.equal(y, expected) and torch.equal(y[1], torch.zeros(20, 20))
