"""The synthetic generator's acquisition-nuisance knob and the base transform's intensity
standardisation, which removes what the knob adds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hlss.data.io import load_patch
from hlss.data.opensrh import read_opensrh
from hlss.data.synthetic import generate_opensrh
from hlss.data.transforms import BaseTransform, standardize_intensity
from hlss.errors import HLSSError

SMALL = dict(seed=0, patients_per_class=2, slides_per_patient=2, patches_per_slide=3, size=32)


def _patient_brightness(root: str) -> np.ndarray:
    """Mean raw intensity of every patient (one value per patient)."""
    frame = read_opensrh(root).frame
    means = frame["path"].map(lambda p: float(load_patch(p, "srh").mean()))
    return frame.assign(m=means).groupby("patient")["m"].mean().to_numpy()


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("nuisance")
    return {n: generate_opensrh(str(base / f"n{n}"), nuisance=n, **SMALL) for n in (0.0, 1.0, 3.0)}


def test_nuisance_one_is_the_default_dataset(roots, tmp_path):
    default = generate_opensrh(str(tmp_path / "default"), **SMALL)
    frame = read_opensrh(default).frame
    for rel in frame["path"].head(5):
        twin = rel.replace(default, roots[1.0])
        assert np.array_equal(load_patch(rel, "srh"), load_patch(twin, "srh"))


def test_stronger_nuisance_spreads_the_patients_apart(roots):
    spread = {n: np.std(np.log(_patient_brightness(r))) for n, r in roots.items()}
    assert spread[0.0] < spread[1.0] < spread[3.0]
    assert spread[3.0] > 2 * spread[1.0]


def test_bad_nuisance_is_refused(tmp_path):
    for bad in (-1.0, 11.0, "strong"):
        with pytest.raises(HLSSError, match="nuisance must be a number in"):
            generate_opensrh(str(tmp_path / "x"), nuisance=bad, **SMALL)


def test_standardize_removes_gain_offset_and_channel_balance():
    rng = np.random.default_rng(0)
    raw = rng.integers(2000, 30000, size=(2, 24, 24)).astype(np.float64)
    acquired = raw * np.array([1.7, 1.9])[:, None, None] + 3000  # gain, balance, offset
    a = BaseTransform("srh", standardize=True)(acquired.astype(np.uint16))
    b = BaseTransform("srh", standardize=True)(raw.astype(np.uint16))
    torch.testing.assert_close(a[1:], b[1:], atol=2e-3, rtol=0)  # CH2 and CH3 exactly
    # without it, the acquisition shows
    plain = BaseTransform("srh")(acquired.astype(np.uint16)) - BaseTransform("srh")(
        raw.astype(np.uint16)
    )
    assert plain.abs().max() > 0.05


def test_standardize_against_its_formula():
    x = torch.stack([torch.linspace(0.1, 0.3, 100), torch.linspace(0.2, 0.5, 100)]).view(2, 10, 10)
    out = standardize_intensity(x)
    for c in range(2):
        lo, hi = torch.quantile(x[c].reshape(-1), torch.tensor([0.01, 0.99]))
        torch.testing.assert_close(out[c], ((x[c] - lo) / (hi - lo)).clamp(0, 1))
    flat = standardize_intensity(torch.full((3, 4, 4), 0.7))
    assert torch.equal(flat, torch.zeros(3, 4, 4))
    he = BaseTransform("he", standardize=True)(np.full((3, 4, 4), 9, np.uint8))
    assert he.shape == (3, 4, 4) and he.max() == 0
    assert "standardize=True" in repr(BaseTransform("he", standardize=True))
