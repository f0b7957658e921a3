"""Tests for the batched strong augmentation (BatchAugment around kornia's AugmentationSequential).

Each op is taken from ``conf/augment/hidisc.yaml`` itself (a kornia ``_target_`` node), so the
tests check the shipped configuration, not a copy of it.
"""

from __future__ import annotations

from pathlib import Path

import kornia.augmentation as K
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import hlss
from hlss.config import build
from hlss.data.augment import BatchAugment, RandomGaussianNoiseStd, RandomResizedCropKeepSize
from hlss.errors import ConfigError

CONF_DIR = Path(hlss.__file__).parent / "conf" / "augment"

# HiDisc's strong augmentation list, as op classes in hidisc.yaml's order
HIDISC_OPS = [
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
]

# parameters that make "p=1 changes every sample" certain rather than almost certain
# (e.g. a blur with sigma 0.1 is the identity in float32; a crop may cover the whole image)
SURE_CHANGE = {
    "RandomGaussianBlur": {"sigma": [1.0, 2.0]},
    "RandomResizedCropKeepSize": {"scale": [0.3, 0.6]},
}


def _batch(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images with values in [0.2, 0.8]: asymmetric, not at the range ends."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen) * 0.6 + 0.2


# ops the shipped configs use besides HiDisc's list (light.yaml's colour jitter), with settings
# that change every image (HiDisc's own ColorJitter() is the identity, so it is left out)
EXTRA_OPS = {
    "ColorJitter": {
        "_target_": "kornia.augmentation.ColorJitter",
        "brightness": 0.2,
        "contrast": 0.2,
        "saturation": 0.2,
        "hue": 0.1,
        "p": "${...p}",
    },
}


def _yaml_op(name: str) -> dict:
    """hidisc.yaml's node for the op class ``name`` (unresolved: ``p`` is ``${...p}``), or the
    node of :data:`EXTRA_OPS`."""
    ops = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "hidisc.yaml").ops, resolve=False)
    nodes = [op for op in ops if op["_target_"].rsplit(".", 1)[-1] == name]
    (node,) = nodes or [EXTRA_OPS[name]]
    return {**node, **SURE_CHANGE.get(name, {})}


def _augment(names: list[str], p: float, op_p: float | None = None) -> BatchAugment:
    """BatchAugment of hidisc.yaml's ops ``names`` under a default ``p``; ``op_p`` overrides."""
    ops = [_yaml_op(n) | ({} if op_p is None else {"p": op_p}) for n in names]
    return instantiate(
        OmegaConf.create(
            {"_target_": BatchAugment.__module__ + ".BatchAugment", "p": p, "ops": ops}
        )
    )


def _changed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bool per image: did anything change?"""
    return (x != y).flatten(1).any(1)


def test_hidisc_config_lists_hidisc_strong_ops_with_its_p():
    aug = instantiate(OmegaConf.load(CONF_DIR / "hidisc.yaml"))
    assert isinstance(aug, BatchAugment)
    assert isinstance(aug.sequence, K.AugmentationSequential)
    assert aug.op_names == HIDISC_OPS
    assert aug.p == 0.3
    assert [op.p for op in aug.sequence.children()] == [0.3] * len(HIDISC_OPS)


ALL_OPS = [*HIDISC_OPS, *EXTRA_OPS]


@pytest.mark.parametrize("name", ALL_OPS)
def test_p0_is_exact_identity(name):
    torch.manual_seed(0)
    x = _batch()
    y = _augment([name], p=1.0, op_p=0.0)(x)
    assert torch.equal(y, x)


@pytest.mark.parametrize("name", ALL_OPS)
def test_p1_changes_every_sample(name):
    torch.manual_seed(0)
    x = _batch()
    x_before = x.clone()
    y = _augment([name], p=0.0, op_p=1.0)(x)
    assert torch.equal(x, x_before), "input must not be modified in place"
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.min() >= 0 and y.max() <= 1
    assert _changed(x, y).all(), f"{name} left some samples unchanged at p=1"


@pytest.mark.parametrize("name", ALL_OPS)
def test_global_p_is_used_when_op_has_no_override(name):
    """``augment.p`` reaches every op through the YAML's ``p: ${...p}`` (HiDisc's rand_aug_prob)."""
    torch.manual_seed(0)
    x = _batch()
    assert torch.equal(_augment([name], p=0.0)(x), x)
    assert _changed(x, _augment([name], p=1.0)(x)).all()


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_probability_is_honoured(p):
    """The configured probability is the one used (the reference always used 0.5)."""
    torch.manual_seed(0)
    x = _batch(n=400, size=8)
    y = _augment(["RandomHorizontalFlip"], p=p)(x)
    frac = _changed(x, y).float().mean().item()
    assert p - 0.1 <= frac <= p + 0.1
    # the changed ones are exactly flipped, the others untouched
    flipped = _changed(x, y)
    assert torch.equal(y[flipped], x[flipped].flip(-1))
    assert torch.equal(y[~flipped], x[~flipped])


@pytest.mark.parametrize("name", ["RandomAffine", "ColorJitter", "RandomGaussianNoiseStd"])
def test_parameters_are_drawn_per_sample(name):
    torch.manual_seed(0)
    x = _batch(n=1).expand(6, -1, -1, -1).contiguous()
    y = _augment([name], p=1.0)(x)
    flat = y.flatten(1)
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert not torch.equal(flat[i], flat[j]), f"samples {i} and {j} got the same {name}"


def test_color_jitter_changes_colour_statistics():
    torch.manual_seed(0)
    x = _batch(n=32)
    y = _augment(["ColorJitter"], p=1.0)(x)
    # brightness/contrast/saturation move most images' channel means, by different amounts
    shift = (y.mean((2, 3)) - x.mean((2, 3))).abs().amax(1)
    assert (shift > 5e-3).float().mean() >= 0.75
    assert shift.std() > 0.01


def test_noise_std_is_drawn_per_image_within_range():
    torch.manual_seed(0)
    x = torch.full((64, 3, 64, 64), 0.5)
    y = BatchAugment([RandomGaussianNoiseStd(std=[0.01, 0.05], p=1.0)])(x)
    std = (y - x).flatten(1).std(1)
    assert std.min() >= 0.009 and std.max() <= 0.051
    assert std.max() - std.min() > 0.02  # spread over the range, not one fixed std
    fixed = BatchAugment([RandomGaussianNoiseStd(std=0.03, p=1.0)])(x)
    assert torch.allclose((fixed - x).flatten(1).std(1), torch.full((64,), 0.03), atol=2e-3)


def test_resized_crop_keeps_each_input_size_and_gates_per_image():
    torch.manual_seed(0)
    crop = BatchAugment([RandomResizedCropKeepSize(scale=[0.3, 0.6], p=0.5)])
    for shape in [(4, 3, 10, 12), (5, 3, 20, 20)]:
        assert crop(torch.rand(shape)).shape == shape
    x = _batch(n=200, size=16)
    frac = _changed(x, crop(x)).float().mean().item()
    assert 0.4 <= frac <= 0.6, "kornia's own crop would crop all or none of the batch"


def test_hierarchy_shaped_input_keeps_shape_and_augments_each_image():
    torch.manual_seed(0)
    x = torch.rand(2, 2, 2, 2, 3, 16, 16) * 0.6 + 0.2
    y = _augment(HIDISC_OPS, p=0.5)(x)
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
    y = _augment(HIDISC_OPS, p=0.5)(x)
    assert y.dtype == torch.float16 and y.shape == x.shape
    w = _batch().requires_grad_(True)
    assert not _augment(["RandomAffine"], p=1.0)(w).requires_grad


def test_deterministic_under_a_seed():
    aug = instantiate(OmegaConf.load(CONF_DIR / "hidisc.yaml"))
    x = _batch(n=16)
    torch.manual_seed(123)
    first = aug(x)
    torch.manual_seed(123)
    assert torch.equal(aug(x), first)
    torch.manual_seed(124)
    assert not torch.equal(aug(x), first)


def test_construction_keeps_the_global_rng_state():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    instantiate(OmegaConf.load(CONF_DIR / "hidisc.yaml"))
    assert torch.equal(torch.rand(3), expected)


def test_bad_input_tensor():
    aug = _augment(["RandomHorizontalFlip"], p=0.3)
    with pytest.raises(ValueError, match="C, H, W"):
        aug(torch.rand(4, 4))
    with pytest.raises(ValueError, match="floating"):
        aug(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("ops", "p", "match"),
    [
        ([{"_target_": "kornia.augmentation.RandomAffine", "degres": 5}], 0.3, "'degres'"),
        (
            [{"_target_": "kornia.augmentation.RandomHorizontalFlip", "p": 1.5}],
            0.3,
            r"op #0 \(RandomHorizontalFlip\): probability",
        ),
        ([{"_target_": "kornia.augmentation.RandomHorizontalFlip"}], -0.1, "probability"),
        ([{"_target_": "torch.nn.Identity"}], 0.3, r"\(Identity\) is not a kornia"),
        (
            [
                {
                    "_target_": "kornia.augmentation.RandomGaussianBlur",
                    "kernel_size": 4,
                    "sigma": [0.1, 2.0],
                }
            ],
            0.3,
            r"\(RandomGaussianBlur\): invalid parameters",
        ),
        (
            [{"_target_": "hlss.data.augment.RandomGaussianNoiseStd", "std": [0.5, 0.1]}],
            0.3,
            "std range",
        ),
        (
            [{"_target_": "hlss.data.augment.RandomGaussianNoiseStd", "std": [-0.1, 0.1]}],
            0.3,
            "std must be >= 0",
        ),
        (
            [{"_target_": "hlss.data.augment.RandomResizedCropKeepSize", "scale": [0.6, 0.3]}],
            0.3,
            "scale range",
        ),
        (
            [{"_target_": "kornia.augmentation.RandomSolarize", "thresholds": "high"}],
            0.3,
            "RandomSolarize|invalid data type",
        ),
    ],
)
def test_bad_config_raises_config_error(ops, p, match):
    node = OmegaConf.create({"_target_": "hlss.data.augment.BatchAugment", "p": p, "ops": ops})
    with pytest.raises(ConfigError, match=match) as info:
        build(node)
    assert "\n" not in str(info.value)


def test_non_kornia_module_is_refused_directly():
    with pytest.raises(ConfigError, match="not a kornia"):
        BatchAugment([nn.ReLU()])


def test_none_config_is_identity():
    aug = instantiate(OmegaConf.load(CONF_DIR / "none.yaml"))
    assert isinstance(aug, BatchAugment) and aug.op_names == []
    x = _batch()
    assert torch.equal(aug(x), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    torch.manual_seed(0)
    x = _batch().cuda()
    y = _augment(HIDISC_OPS, p=0.5)(x)
    assert y.device == x.device and y.shape == x.shape
    assert not torch.equal(y, x)


class _Recorder(torch.nn.Module):
    """A stand-in op: adds 1 to what it is given and records the batch sizes it saw."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.sizes: list[int] = []
        self.p_seen: list[float] = []

    def forward(self, x):
        self.sizes.append(int(x.shape[0]))
        self.p_seen.append(self.p)
        return x + 1.0


def test_gated_op_runs_on_chosen_images_only():
    from hlss.data.augment import apply_gated

    torch.manual_seed(0)
    op = _Recorder(p=0.3)
    images = torch.zeros(2000, 1, 2, 2)
    out = apply_gated(op, images)
    changed = (out != images).flatten(1).any(1)
    assert op.sizes == [int(changed.sum())]  # computed once, on exactly the chosen images
    assert 0.25 < changed.float().mean() < 0.35
    assert op.p_seen == [1.0] and op.p == 0.3  # forced for the call, restored after
    assert torch.equal(images, torch.zeros_like(images))  # the input is not modified
    assert apply_gated(_Recorder(p=0.0), images) is images
