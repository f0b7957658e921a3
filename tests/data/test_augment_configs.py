"""Every ``conf/augment/*.yaml`` instantiates through Hydra and runs, standalone and nested."""

from __future__ import annotations

from pathlib import Path

import kornia.augmentation as K
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import hlss
from hlss.config import build
from hlss.data.augment import BatchAugment

CONF_DIR = Path(hlss.__file__).parent / "conf" / "augment"
OPTIONS = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))

# each option's meaning: its ops (class names) and its default per-op probability
EXPECTED = {
    "hidisc": (
        [
            "RandomHorizontalFlip",
            "RandomVerticalFlip",
            "RandomGaussianNoiseStd",
            "RandomAutoContrast",
            "RandomSolarize",
            "RandomSharpness",
            "RandomGaussianBlur",
            "RandomAffine",
            "RandomResizedCropKeepSize",
            "RandomErasing",
        ],
        0.3,
    ),
    "light": (
        [
            "RandomHorizontalFlip",
            "RandomVerticalFlip",
            "RandomGaussianNoiseStd",
            "ColorJitter",
            "RandomGaussianBlur",
        ],
        0.5,
    ),
    "none": ([], 0.0),
}


def test_options_are_the_documented_three():
    assert OPTIONS == ["hidisc", "light", "none"]


@pytest.mark.parametrize("option", OPTIONS)
def test_option_instantiates_and_augments_a_batch(option):
    aug = instantiate(OmegaConf.load(CONF_DIR / f"{option}.yaml"))
    assert isinstance(aug, BatchAugment)
    ops, p = EXPECTED[option]
    assert aug.op_names == ops
    assert aug.p == p
    for op in aug.sequence.children():
        assert isinstance(op, K.AugmentationBase2D) and op.p == p
    torch.manual_seed(0)
    x = torch.rand(2, 2, 1, 2, 3, 24, 24) * 0.6 + 0.2  # [P, S, N, T, C, H, W]
    y = aug(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(y, x) == (option == "none")


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("p", [0.0, 1.0, 0.7])
def test_augment_p_from_the_parent_config_sets_every_op(option, p):
    """As in ``hlss-train augment.p=...``: the node sits under ``augment`` in the run config."""
    cfg = OmegaConf.create({"augment": OmegaConf.load(CONF_DIR / f"{option}.yaml")})
    cfg.augment.p = p
    aug = build(cfg.augment)
    assert aug.p == p
    assert all(op.p == p for op in aug.sequence.children())
    x = torch.rand(6, 3, 16, 16) * 0.6 + 0.2
    if p == 0.0:
        assert torch.equal(aug(x), x)
    if p == 1.0 and option != "none":
        assert (aug(x) != x).flatten(1).any(1).all()
