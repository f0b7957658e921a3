"""The fast kernels of ``hlss.data.augment`` give what kornia gives for the same parameters, and
the batched gate applies each op to each image independently with its probability."""

from __future__ import annotations

from pathlib import Path

import kornia.augmentation as K
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import hlss
from hlss.data.augment import (
    _FAST,
    BatchAugment,
    RandomGaussianNoiseStd,
    RandomResizedCropKeepSize,
    apply_op,
)

CONF_DIR = Path(hlss.__file__).parent / "conf" / "augment"

# every op class with a fast kernel, in settings beyond the shipped ones (ranges, odd sizes)
OPS = {
    "hflip": lambda: K.RandomHorizontalFlip(p=1.0),
    "vflip": lambda: K.RandomVerticalFlip(p=1.0),
    "autocontrast": lambda: K.RandomAutoContrast(p=1.0),
    "solarize": lambda: K.RandomSolarize(thresholds=0.2, additions=0.1, p=1.0),
    "solarize_fixed": lambda: K.RandomSolarize(thresholds=[0.2, 0.2], additions=[0, 0], p=1.0),
    "sharpness": lambda: K.RandomSharpness(sharpness=[0.5, 10.0], p=1.0),
    "blur5": lambda: K.RandomGaussianBlur(kernel_size=[5, 5], sigma=[0.1, 2.0], p=1.0),
    "blur3x7": lambda: K.RandomGaussianBlur(kernel_size=[3, 7], sigma=[1.0, 1.0], p=1.0),
    "blur_replicate": lambda: K.RandomGaussianBlur(
        kernel_size=[5, 5], sigma=[0.5, 1.5], border_type="replicate", p=1.0
    ),
    "affine": lambda: K.RandomAffine(degrees=10.0, translate=[0.1, 0.3], p=1.0),
    "affine_full": lambda: K.RandomAffine(
        degrees=30.0, translate=[0.2, 0.2], scale=[0.8, 1.2], shear=10.0, p=1.0
    ),
    "crop": lambda: RandomResizedCropKeepSize(scale=[0.08, 1.0], p=1.0),
    "erasing": lambda: K.RandomErasing(scale=[0.02, 0.33], ratio=[0.3, 3.3], value=0.0, p=1.0),
    "erasing_value": lambda: K.RandomErasing(value=0.7, p=1.0),
    "jitter_neutral": lambda: K.ColorJitter(p=1.0),
}


def _images(n: int = 6, height: int = 23, width: int = 31, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, height, width, generator=gen) * 1.2 - 0.1  # a little outside [0, 1]


# every fast kernel's torch version ("apply"), and its OpenCV version ("cpu") where it has one
KERNELS = [(name, "apply") for name in sorted(OPS)] + [
    (name, "cpu") for name in sorted(OPS) if _FAST[type(OPS[name]())].cpu is not None
]


@pytest.mark.parametrize("into_out", [False, True], ids=["own", "out"])
@pytest.mark.parametrize(("name", "version"), KERNELS)
def test_fast_kernel_equals_kornia_for_the_same_parameters(name, version, into_out):
    """Also with ``out=``: the result is written there and the input is left as it was."""
    op = OPS[name]()
    assert type(op) in _FAST
    torch.manual_seed(0)
    x = _images()
    params = op.forward_parameters(x.shape)
    expected = op(x.clone(), params=params)
    kernel = _FAST[type(op)]
    args = kernel.prepare(op, params, x)
    assert args is not None
    before = x.clone()
    if into_out:
        out = torch.full_like(x, -5.0)
        got = getattr(kernel, version)(op, x, args, out=out)
        assert got is out
    else:
        got = getattr(kernel, version)(op, x, args)
    assert got is not None and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    if into_out or not kernel.in_place:
        assert torch.equal(x, before)


def test_noise_kernel_adds_noise_of_each_image_std():
    op = RandomGaussianNoiseStd(std=[0.01, 0.1], mean=0.02, p=1.0)
    torch.manual_seed(0)
    x = torch.full((16, 3, 64, 64), 0.5)
    params = op.forward_parameters(x.shape)
    y = _FAST[type(op)].apply(op, x.clone(), _FAST[type(op)].prepare(op, params, x))
    delta = (y - x).flatten(1)
    torch.testing.assert_close(delta.std(1), params["std"], rtol=0.05, atol=1e-3)
    torch.testing.assert_close(delta.mean(1), torch.full((16,), 0.02), atol=4e-3, rtol=0)


def test_non_neutral_colour_jitter_runs_kornia_on_the_chosen_images():
    op = K.ColorJitter(brightness=0.3, contrast=0.3, p=1.0)
    torch.manual_seed(0)
    x = _images()
    assert _FAST[type(op)].prepare(op, op.forward_parameters(x.shape), x) is None
    y = apply_op(op, x.clone())
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y != x.clamp(0, 1)).flatten(1).any(1).all()


@pytest.mark.parametrize(
    "name", ["hflip", "autocontrast", "solarize_fixed", "sharpness", "blur5", "affine", "crop"]
)
@pytest.mark.parametrize("p", [0.3, 0.7])
def test_each_image_is_changed_with_probability_p(name, p):
    op = OPS[name]()
    op.p = p
    aug = BatchAugment([op], p=p)
    torch.manual_seed(1)
    x = torch.rand(400, 3, 12, 12) * 0.6 + 0.2
    y = aug(x)
    changed = (y != x).flatten(1).any(1).float().mean().item()
    assert abs(changed - p) < 0.08, f"{name}: {changed:.3f} of the images changed at p={p}"


def test_unchosen_images_are_untouched_and_chosen_ones_get_their_own_parameters():
    torch.manual_seed(0)
    x = (torch.rand(1, 3, 20, 20) * 0.6 + 0.2).expand(200, -1, -1, -1).contiguous()
    y = BatchAugment([K.RandomAffine(degrees=10.0, translate=[0.1, 0.3], p=0.3)], p=0.3)(x)
    changed = (y != x).flatten(1).any(1)
    assert torch.equal(y[~changed], x[~changed])
    distinct = torch.unique(y[changed].flatten(1), dim=0)
    assert len(distinct) == int(changed.sum())


def test_full_hidisc_list_keeps_range_shape_and_input():
    aug = instantiate(OmegaConf.load(CONF_DIR / "hidisc.yaml"))
    torch.manual_seed(0)
    x = torch.rand(3, 2, 2, 2, 3, 40, 40)
    before = x.clone()
    y = aug(x)
    assert torch.equal(x, before)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    assert (y != x).flatten(4).any(-1).float().mean() > 0.5


def test_all_ops_at_p1_on_float64_keep_dtype():
    aug = instantiate(OmegaConf.load(CONF_DIR / "hidisc.yaml"), p=1.0)
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    y = aug(x)
    assert y.dtype == torch.float64 and y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize(
    "op",
    [
        K.RandomAffine(degrees=10.0, translate=[0.1, 0.3], p=1.0),
        K.RandomAffine(degrees=30.0, translate=[0.2, 0.2], scale=[0.8, 1.2], shear=10.0, p=1.0),
        K.RandomAffine(degrees=45.0, scale=[0.7, 1.3, 0.6, 1.4], shear=[-10, 10, -20, 20], p=1.0),
    ],
    ids=["hidisc", "scale_shear", "anisotropic_two_shears"],
)
def test_affine_matrices_on_the_cpu_are_kornias(op):
    """The CPU path composes RandomAffine's matrices in numpy; kornia composes them in torch."""
    from hlss.data.augment import _affine_matrices

    torch.manual_seed(0)
    params = op.forward_parameters(torch.Size((64, 3, 30, 40)))
    expected = op.compute_transformation(torch.empty(0, dtype=torch.float64), params, op.flags)
    got = _affine_matrices(params)
    assert got.shape == (64, 3, 3)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-12, rtol=0)
