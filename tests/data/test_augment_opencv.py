"""The OpenCV kernels of the CPU path (``hlss.data.augment_cpu``) give what kornia gives for the
same parameters, their noise has each image's std, and ``opencv=False`` or a missing OpenCV
leaves the torch kernels in charge."""

from __future__ import annotations

from pathlib import Path

import cv2
import kornia.augmentation as K
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import hlss
from hlss.data import augment_cpu
from hlss.data.augment import _FAST, BatchAugment, RandomGaussianNoiseStd, _compute
from hlss.errors import ConfigError
from tests.data.test_augment_fast import KERNELS, OPS, _images

CONF_DIR = Path(hlss.__file__).parent / "conf" / "augment"


def test_the_ops_with_an_opencv_kernel_are_flips_blur_sharpness_and_noise():
    """``tests/data/test_augment_fast.py`` compares each OpenCV kernel with kornia (``KERNELS``);
    the noise, whose draws differ, is checked below."""
    with_cpu = {cls for cls, kernel in _FAST.items() if kernel.cpu is not None}
    flips = {K.RandomHorizontalFlip, K.RandomVerticalFlip}
    assert with_cpu == {K.RandomSharpness, K.RandomGaussianBlur, RandomGaussianNoiseStd, *flips}
    compared = {type(OPS[name]()) for name, version in KERNELS if version == "cpu"}
    assert compared == with_cpu - {RandomGaussianNoiseStd}


def test_blur_with_a_border_opencv_lacks_here_runs_the_torch_kernel():
    op = K.RandomGaussianBlur(kernel_size=[5, 5], sigma=[1.0, 1.0], border_type="circular", p=1)
    assert augment_cpu.blur_border(op) is None
    _assert_cpu_kernel_gives_kornias(op, _images())


def _assert_cpu_kernel_gives_kornias(op, x: torch.Tensor) -> None:
    """``op``'s OpenCV kernel on ``x`` equals kornia's op for the same drawn parameters."""
    torch.manual_seed(0)
    params = op.forward_parameters(x.shape)
    expected = op(x.clone(), params=params)
    kernel = _FAST[type(op)]
    got = kernel.cpu(op, x.clone(), kernel.prepare(op, params, x))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_opencv_noise_has_each_image_std_and_mean_and_follows_its_seed():
    op = RandomGaussianNoiseStd(std=[0.01, 0.1], mean=0.02, p=1.0)
    torch.manual_seed(0)
    x = torch.full((16, 3, 64, 64), 0.5)
    kernel = _FAST[type(op)]
    args = kernel.prepare(op, op.forward_parameters(x.shape), x)
    assert "seed" in args and int(args["seed"].max()) < augment_cpu.SEED_LIMIT
    y = kernel.cpu(op, x.clone(), args)
    delta = (y - x).flatten(1)
    torch.testing.assert_close(delta.std(1), args["std"], rtol=0.05, atol=1e-3)
    torch.testing.assert_close(delta.mean(1), torch.full((16,), 0.02), atol=4e-3, rtol=0)
    # each image's noise depends on its own seed only: image 3 alone gives the same pixels
    one = {key: value[3:4] for key, value in args.items()}
    assert torch.equal(kernel.cpu(op, x[3:4].clone(), one)[0], y[3])
    # images are not given the same noise field
    assert not torch.equal(delta[0] / args["std"][0], delta[1] / args["std"][1])


def test_opencv_and_torch_kernels_give_the_same_batch_but_for_the_noise():
    ops = [
        K.RandomHorizontalFlip(p=0.5),
        K.RandomSharpness(sharpness=[2.0, 2.0], p=0.5),
        K.RandomGaussianBlur(kernel_size=[5, 5], sigma=[1.0, 1.0], p=0.5),
        K.RandomSolarize(thresholds=[0.2, 0.2], additions=[0.0, 0.0], p=0.5),
        K.RandomAffine(degrees=10.0, translate=[0.1, 0.3], p=0.5),
    ]
    x = torch.rand(24, 3, 40, 40)
    torch.manual_seed(5)
    with_opencv = BatchAugment(ops, p=0.5, opencv=True)(x)
    torch.manual_seed(5)
    with_torch = BatchAugment(ops, p=0.5, opencv=False)(x)
    torch.testing.assert_close(with_opencv, with_torch, atol=3e-5, rtol=0)


def test_opencv_false_never_calls_an_opencv_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an OpenCV kernel ran")

    monkeypatch.setattr(augment_cpu, "gaussian_blur", refuse)
    monkeypatch.setattr(augment_cpu, "sharpness", refuse)
    for cls in (K.RandomSharpness, RandomGaussianNoiseStd):
        monkeypatch.setitem(_FAST, cls, _FAST[cls]._replace(cpu=refuse))
    aug = instantiate(OmegaConf.load(CONF_DIR / "hidisc.yaml"), p=1.0, opencv=False)
    torch.manual_seed(0)
    y = aug(torch.rand(8, 3, 24, 24))
    assert y.shape == (8, 3, 24, 24)


def test_without_opencv_the_torch_kernels_run(monkeypatch):
    monkeypatch.setattr(augment_cpu, "_cv2", lambda: None)
    assert not augment_cpu.available()
    op = K.RandomGaussianBlur(kernel_size=[5, 5], sigma=[1.0, 1.0], p=1.0)
    x = _images()
    torch.manual_seed(0)
    params = op.forward_parameters(x.shape)
    kernel = _FAST[type(op)]
    got = _compute(kernel, op, x.clone(), kernel.prepare(op, params, x), opencv=True)
    torch.testing.assert_close(got, op(x.clone(), params=params), atol=2e-5, rtol=1e-5)
    with augment_cpu.one_thread():  # nothing to set without OpenCV
        pass


def test_float64_and_half_batches_take_the_kernels_their_dtype_allows():
    aug = instantiate(OmegaConf.load(CONF_DIR / "hidisc.yaml"), p=1.0)
    for dtype in (torch.float64, torch.float16):
        torch.manual_seed(0)
        y = aug(torch.rand(4, 3, 32, 32).to(dtype))
        assert y.dtype == dtype and y.min() >= 0 and y.max() <= 1


def test_opencv_thread_count_is_left_as_it_was():
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(3)
        instantiate(OmegaConf.load(CONF_DIR / "hidisc.yaml"), p=0.5)(torch.rand(16, 3, 24, 24))
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)


@pytest.mark.skipif(not augment_cpu.exact_warp(), reason="OpenCV 4 rounds warp positions")
def test_opencv_warp_equals_grid_sample_for_the_same_map():
    from hlss.data.augment import _WARP, _fuse_geometry

    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 41), torch.linspace(0, 1, 57), indexing="ij")
    image = torch.stack([0.5 + 0.4 * torch.sin(9 * xx + 7 * yy), xx * yy, 0.2 + 0.6 * yy])[None]
    ops = [K.RandomHorizontalFlip(p=1.0), K.RandomAffine(degrees=30.0, translate=0.2, p=1.0)]
    for _ in range(5):
        steps = []
        for op in ops:
            kernel = _FAST[type(op)]
            params = op.forward_parameters(torch.Size((1, 3, 41, 57)))
            steps.append((op, kernel, kernel.prepare(op, params, image), 0))
        [(_, kernel, args, _)] = _fuse_geometry(steps, 41, 57)
        assert kernel is _WARP and set(args) == {"pixel"}
        expected = _WARP.apply(None, image, args)
        got = augment_cpu.warp_bilinear(None, image, args)
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
        assert (expected == 0).any()  # the map moves part of the image out: padding is compared


def test_the_fused_warp_takes_opencv_only_where_it_samples_exactly(monkeypatch):
    from hlss.data.augment import _WARP

    theta = torch.tensor([[[0.9, 0.2, 0.1], [-0.2, 0.9, -0.1]]])
    pixel = torch.tensor([[[0.9, 0.2, 3.0], [-0.2, 0.9, 1.0]]], dtype=torch.float64)
    x = torch.rand(1, 3, 12, 12)
    calls = []
    monkeypatch.setattr(augment_cpu, "warp_bilinear", lambda *a, **k: calls.append(1) or x)
    for exact in (False, True):
        monkeypatch.setattr(augment_cpu, "exact_warp", lambda exact=exact: exact)
        _WARP.cpu(None, x, {"theta": theta, "pixel": pixel})
    assert calls == [1]


def test_a_batch_that_requires_grad_is_augmented_by_the_torch_kernels():
    x = torch.rand(4, 3, 24, 24, requires_grad=True)
    assert not augment_cpu.usable(x) and augment_cpu.usable(x.detach())
    torch.manual_seed(0)
    y = instantiate(OmegaConf.load(CONF_DIR / "hidisc.yaml"), p=1.0)(x)
    assert y.shape == x.shape and not y.requires_grad


@pytest.mark.parametrize("value", ["no", 1, None])
def test_opencv_must_be_a_bool(value):
    with pytest.raises(ConfigError, match="opencv must be true or false"):
        BatchAugment([], opencv=value)


OUT_KERNELS = {
    **{name: OPS[name] for name in OPS if _FAST[type(OPS[name]())].cpu is not None},
    "noise": lambda: RandomGaussianNoiseStd(std=[0.01, 0.1], mean=0.02, p=1.0),
}


@pytest.mark.parametrize("name", sorted(OUT_KERNELS))
def test_an_opencv_kernel_writes_into_out_what_it_gives_alone_and_refuses_its_own_input(name):
    """In-place kernels (sharpness, noise) as well: into ``out``, their input left as it was."""
    op = OUT_KERNELS[name]()
    torch.manual_seed(0)
    x = _images()
    kernel = _FAST[type(op)]
    args = kernel.prepare(op, op.forward_parameters(x.shape), x)
    out, before = torch.full_like(x, -5.0), x.clone()
    assert kernel.cpu(op, x, args, out=out) is out
    assert torch.equal(x, before)
    torch.testing.assert_close(out, kernel.cpu(op, x.clone(), args), atol=0, rtol=0)
    with pytest.raises(ValueError, match="out must be"):
        kernel.cpu(op, x, args, out=x)
    with pytest.raises(ValueError, match="out must be"):
        kernel.cpu(op, x, args, out=x[:1].clone())


def test_every_opencv_kernel_is_checked_with_out():
    assert {"blur5", "hflip", "vflip", "sharpness", "noise"} <= set(OUT_KERNELS)


def test_sharpness_filtered_in_place_on_a_full_size_patch_equals_kornia():
    """The OpenCV sharpness filters each plane in place; on a 300-px patch (many filter rows)
    that is kornia's blend."""
    x = torch.rand(2, 3, 300, 300, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    _assert_cpu_kernel_gives_kornias(K.RandomSharpness(sharpness=[0.5, 4.0], p=1.0), x)


def test_the_fused_warp_writes_into_out():
    from hlss.data.augment import _WARP

    theta = torch.tensor([[[0.9, 0.2, 0.1], [-0.2, 0.9, -0.1]]])
    pixel = torch.tensor([[[0.9, 0.2, 3.0], [-0.2, 0.9, 1.0]]], dtype=torch.float64)
    x = torch.rand(1, 3, 12, 12)
    args = {"theta": theta, "pixel": pixel}
    out = torch.full_like(x, -5.0)
    assert _WARP.cpu(None, x, args, out=out) is out
    torch.testing.assert_close(out, _WARP.cpu(None, x, args), atol=0, rtol=0)
