"""Tests for the batched strong augmentation (BatchAugment)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import hlss
from hlss.data.augment import OP_NAMES, BatchAugment
from hlss.errors import ConfigError

CONF_DIR = Path(hlss.__file__).parent / "conf" / "augment"

# parameters that make "p=1 changes every sample" certain rather than almost certain
# (e.g. a blur with sigma 0.1 is the identity in float32; a crop may cover the whole image)
SURE_CHANGE = {
    "gaussian_blur": {"sigma": [1.0, 2.0]},
    "resized_crop": {"scale": [0.3, 0.6]},
}


def _batch(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images with values in [0.2, 0.8]: asymmetric, not at the range ends."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen) * 0.6 + 0.2


def _spec(name: str, p: float) -> dict:
    return {"name": name, "p": p, **SURE_CHANGE.get(name, {})}


def _changed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bool per image: did anything change?"""
    return (x != y).flatten(1).any(1)


def test_op_names_are_hidisc_strong_list():
    assert set(OP_NAMES) == {
        "hflip",
        "vflip",
        "gaussian_noise",
        "color_jitter",
        "autocontrast",
        "solarize",
        "sharpness",
        "gaussian_blur",
        "affine",
        "resized_crop",
        "erasing",
    }


@pytest.mark.parametrize("name", OP_NAMES)
def test_p0_is_exact_identity(name):
    torch.manual_seed(0)
    x = _batch()
    y = BatchAugment([_spec(name, 0.0)], p=1.0)(x)
    assert torch.equal(y, x)


@pytest.mark.parametrize("name", OP_NAMES)
def test_p1_changes_every_sample(name):
    torch.manual_seed(0)
    x = _batch()
    x_before = x.clone()
    y = BatchAugment([_spec(name, 1.0)], p=0.0)(x)
    assert torch.equal(x, x_before), "input must not be modified in place"
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.min() >= 0 and y.max() <= 1
    assert _changed(x, y).all(), f"{name} left some samples unchanged at p=1"


@pytest.mark.parametrize("name", OP_NAMES)
def test_global_p_is_used_when_op_has_no_override(name):
    torch.manual_seed(0)
    x = _batch()
    spec = {"name": name, **SURE_CHANGE.get(name, {})}
    assert torch.equal(BatchAugment([spec], p=0.0)(x), x)
    assert _changed(x, BatchAugment([spec], p=1.0)(x)).all()


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_probability_is_honoured(p):
    """The configured probability is the one used (the reference always used 0.5)."""
    torch.manual_seed(0)
    x = _batch(n=400, size=8)
    y = BatchAugment(["hflip"], p=p)(x)
    frac = _changed(x, y).float().mean().item()
    assert p - 0.1 <= frac <= p + 0.1
    # the changed ones are exactly flipped, the others untouched
    flipped = _changed(x, y)
    assert torch.equal(y[flipped], x[flipped].flip(-1))
    assert torch.equal(y[~flipped], x[~flipped])


@pytest.mark.parametrize("name", ["affine", "color_jitter"])
def test_parameters_are_drawn_per_sample(name):
    torch.manual_seed(0)
    x = _batch(n=1).expand(6, -1, -1, -1).contiguous()
    y = BatchAugment([name], p=1.0)(x)
    flat = y.flatten(1)
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert not torch.equal(flat[i], flat[j]), f"samples {i} and {j} got the same {name}"


def test_hierarchy_shaped_input_keeps_shape_and_augments_each_image():
    torch.manual_seed(0)
    x = torch.rand(2, 2, 2, 2, 3, 16, 16) * 0.6 + 0.2
    aug = BatchAugment([_spec(n, 0.5) for n in OP_NAMES], p=0.5)
    y = aug(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    assert not torch.equal(y, x)


def test_empty_op_list_is_identity_and_clamps():
    x = _batch()
    assert torch.equal(BatchAugment([])(x), x)
    z = torch.tensor([-0.5, 0.5, 1.5]).reshape(1, 1, 1, 3)
    assert BatchAugment([])(z).flatten().tolist() == [0.0, 0.5, 1.0]


def test_half_precision_and_no_grad():
    torch.manual_seed(0)
    x = _batch().half().requires_grad_(False)
    y = BatchAugment(list(OP_NAMES), p=0.5)(x)
    assert y.dtype == torch.float16 and y.shape == x.shape
    w = _batch().requires_grad_(True)
    assert not BatchAugment(["affine"], p=1.0)(w).requires_grad


def test_bad_input_tensor():
    with pytest.raises(ValueError, match="C, H, W"):
        BatchAugment(["hflip"])(torch.rand(4, 4))
    with pytest.raises(ValueError, match="floating"):
        BatchAugment(["hflip"])(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("ops", "p", "match"),
    [
        (["rotate90"], 0.3, "unknown augment op 'rotate90'"),
        ([{"name": "affine", "degres": 5}], 0.3, "'affine': unknown parameter 'degres'"),
        ([{"name": "hflip", "p": 1.5}], 0.3, "'hflip': probability"),
        (["hflip"], -0.1, "probability"),
        ([{"degrees": 5}], 0.3, "no 'name'"),
        ([{"name": "gaussian_blur", "kernel_size": 4}], 0.3, "'gaussian_blur': invalid"),
        ([{"name": "gaussian_noise", "std": [0.5, 0.1]}], 0.3, "'gaussian_noise': invalid"),
        ([{"name": "solarize", "threshold": "high"}], 0.3, "'solarize': invalid"),
        ("hflip", 0.3, "list"),
    ],
)
def test_bad_config_raises_config_error(ops, p, match):
    with pytest.raises(ConfigError, match=match) as info:
        BatchAugment(ops, p=p)
    assert "\n" not in str(info.value)


def test_hidisc_config_instantiates_and_runs():
    cfg = OmegaConf.load(CONF_DIR / "hidisc.yaml")
    aug = instantiate(cfg)
    assert isinstance(aug, BatchAugment)
    assert aug.op_names == list(OP_NAMES)
    assert aug.p == 0.3
    torch.manual_seed(0)
    x = _batch(n=16)
    y = aug(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.equal(y, x)


def test_none_config_is_identity():
    aug = instantiate(OmegaConf.load(CONF_DIR / "none.yaml"))
    assert isinstance(aug, BatchAugment) and aug.op_names == []
    x = _batch()
    assert torch.equal(aug(x), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    torch.manual_seed(0)
    x = _batch().cuda()
    y = BatchAugment(list(OP_NAMES), p=0.5)(x)
    assert y.device == x.device and y.shape == x.shape
