"""The CPU per-image path of ``BatchAugment``: fused geometry, image-parallel threads, output
buffers and batches broadcast along the view dimension give what the plain path gives."""

from __future__ import annotations

import itertools
from pathlib import Path

import kornia.augmentation as K
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import hlss
from hlss.data.augment import (
    _FAST,
    _WARP,
    BatchAugment,
    RandomGaussianNoiseStd,
    RandomResizedCropKeepSize,
    _fuse_geometry,
    _move_flips,
)
from hlss.errors import ConfigError

CONF_DIR = Path(hlss.__file__).parent / "conf" / "augment"


def _smooth(n: int, height: int = 48, width: int = 64, ones_channel: bool = False) -> torch.Tensor:
    """Smooth images in [0.1, 0.9]; with ``ones_channel`` channel 2 is 1 everywhere (it marks,
    after a warp, the pixels that were sampled from inside the image)."""
    yy, xx = torch.meshgrid(
        torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij"
    )
    img = torch.stack([0.5 + 0.3 * torch.sin(3 * xx + 2 * yy), 0.2 + 0.6 * xx * yy, 0.1 + 0.8 * yy])
    if ones_channel:
        img[2] = 1.0
    return img[None].expand(n, -1, -1, -1).contiguous()


def _geometric_ops(affine_p: float = 1.0, crop_p: float = 1.0) -> list:
    return [
        K.RandomHorizontalFlip(p=1.0),
        K.RandomVerticalFlip(p=0.5),
        K.RandomGaussianBlur(kernel_size=[5, 5], sigma=[1.0, 1.0], p=1.0),
        K.RandomSharpness(sharpness=[2.0, 2.0], p=1.0),
        K.RandomAffine(degrees=10.0, translate=[0.1, 0.3], p=affine_p),
        RandomResizedCropKeepSize(scale=[0.3, 1.0], p=crop_p),
    ]


def test_fused_geometry_matches_one_pass_per_op_inside_the_image():
    x = _smooth(24, ones_channel=True)
    fused = BatchAugment(_geometric_ops(), p=1.0, fuse_geometry=True)
    plain = BatchAugment(_geometric_ops(), p=1.0, fuse_geometry=False)
    torch.manual_seed(3)
    a = fused(x)
    torch.manual_seed(3)
    b = plain(x)
    inside = ((a[:, 2] > 0.999) & (b[:, 2] > 0.999))[:, None].expand(-1, 2, -1, -1)
    assert inside.float().mean() > 0.5
    diff = (a[:, :2] - b[:, :2]).abs()[inside]
    assert diff.max() < 5e-3, diff.max()  # one bilinear pass instead of two or three
    assert diff.mean() < 2e-4
    assert not torch.equal(a, b)  # the fused path did run


def test_flip_fused_with_an_identity_warp_is_the_exact_flip():
    x = torch.rand(1, 3, 17, 23)
    crop = RandomResizedCropKeepSize(p=1.0)
    identity = {"theta": torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])}
    hflip, vflip = K.RandomHorizontalFlip(p=1.0), K.RandomVerticalFlip(p=1.0)
    steps = [
        (hflip, _FAST[type(hflip)], {}, 0),
        (vflip, _FAST[type(vflip)], {}, 0),
        (crop, _FAST[type(crop)], identity, 0),
    ]
    fused = _fuse_geometry(steps, 17, 23)
    assert len(fused) == 1 and fused[0][1] is _WARP
    got = _WARP.apply(None, x, fused[0][2])
    torch.testing.assert_close(got, x.flip(-1).flip(-2), atol=1e-5, rtol=0)


def test_flips_move_only_over_flip_equivariant_ops_and_only_towards_a_warp():
    def step(op):
        return (op, _FAST.get(type(op)), {}, 0)

    flip = step(K.RandomHorizontalFlip(p=1.0))
    noise = step(RandomGaussianNoiseStd(p=1.0))
    erase = step(K.RandomErasing(p=1.0))
    affine = step(K.RandomAffine(degrees=5.0, p=1.0))
    assert _move_flips([flip, noise, affine]) == [noise, flip, affine]
    assert _move_flips([flip, erase, affine]) == [flip, erase, affine]  # erasing is not
    assert _move_flips([flip, noise]) == [flip, noise]  # no warp to fuse with
    assert _fuse_geometry([flip, noise, erase], 10, 10) == [flip, noise, erase]


def test_ops_not_applied_leave_pixels_bit_identical():
    x = torch.rand(12, 3, 20, 20)
    ops = _geometric_ops(affine_p=0.0, crop_p=0.0)
    for op in ops[1:4]:
        op.p = 0.0
    y = BatchAugment(ops, p=1.0)(x)  # only the horizontal flip is chosen
    assert torch.equal(y, x.flip(-1))
    off = instantiate(OmegaConf.load(CONF_DIR / "hidisc.yaml"), p=0.0)
    assert torch.equal(off(x), x)


def _hidisc(**kwargs) -> BatchAugment:
    return instantiate(OmegaConf.load(CONF_DIR / "hidisc.yaml"), p=0.5, **kwargs)


def test_result_does_not_depend_on_the_number_of_threads():
    x = torch.rand(16, 3, 40, 40)
    results = []
    for threads in (1, 2, 3):
        torch.manual_seed(0)
        results.append(_hidisc(threads=threads)(x))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_image_threads_start_once_and_copies_start_their_own():
    import copy
    import pickle

    aug = _hidisc(threads=2)
    x = torch.rand(16, 3, 24, 24)
    torch.manual_seed(0)
    first = aug(x).clone()
    pool = aug._threads._pool
    assert pool is not None
    aug(x)
    assert aug._threads._pool is pool  # the same threads serve every batch
    for clone in (copy.deepcopy(aug), pickle.loads(pickle.dumps(aug))):
        assert clone._threads._pool is None
        torch.manual_seed(0)
        assert torch.equal(clone(x), first)


def test_the_intra_op_thread_count_is_left_as_it_was():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _hidisc()(torch.rand(16, 3, 24, 24))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_result_still_held_is_never_overwritten_and_a_dropped_one_is_reused():
    aug = _hidisc()
    torch.manual_seed(0)
    first = aug(torch.rand(8, 3, 24, 24))
    kept = first.clone()
    view = first[2:5]
    for _ in range(3):
        aug(torch.rand(8, 3, 24, 24))
    assert torch.equal(first, kept)
    address = first.data_ptr()
    del first, view
    later = [aug(torch.rand(8, 3, 24, 24)) for _ in range(2)]
    assert address in {y.data_ptr() for y in later}


def test_views_broadcast_along_t_give_what_the_copied_batch_gives():
    base = torch.rand(2, 2, 3, 3, 20, 20)
    broadcast = base.unsqueeze(2).expand(-1, -1, 2, -1, -1, -1, -1)  # [P, S, T, N?..] stride 0
    copied = broadcast.contiguous()
    torch.manual_seed(5)
    a = _hidisc()(broadcast)
    torch.manual_seed(5)
    b = _hidisc()(copied)
    assert torch.equal(a, b) and a.shape == broadcast.shape
    assert torch.equal(broadcast, copied)  # the input was not written


def test_solarize_at_the_threshold_inverts_like_kornia():
    op = K.RandomSolarize(thresholds=[0.25, 0.25], additions=[0.0, 0.0], p=1.0)
    x = torch.tensor([0.0, 0.2499999, 0.25, 0.2500001, 0.5, 1.0]).view(1, 1, 1, 6)
    x = x.expand(1, 3, 2, 6).contiguous()
    params = op.forward_parameters(x.shape)
    kernel = _FAST[type(op)]
    got = kernel.apply(op, x.clone(), kernel.prepare(op, params, x))
    assert torch.equal(got, op(x.clone(), params=params))
    assert got[0, 0, 0, 2].item() == 0.75


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_thread_count_is_refused(threads):
    with pytest.raises(ConfigError, match="threads"):
        BatchAugment([], threads=threads)


def test_a_single_image_without_leading_dimensions_is_augmented_like_a_batch_of_one():
    x = torch.rand(3, 24, 24)
    torch.manual_seed(4)
    single = _hidisc()(x)
    torch.manual_seed(4)
    batch = _hidisc()(x[None])
    assert single.shape == x.shape and torch.equal(single, batch[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_image_path_gives_the_per_op_result_wherever_each_step_writes(dtype):
    """The per-image path puts each step's new image into the output or a spare buffer (so that
    the last lands in the output); over many random op lists that is the batched path's result,
    and the input is left as it was."""
    x = torch.rand(40, 3, 24, 28).to(dtype)
    before = x.clone()
    for seed in range(3):
        torch.manual_seed(seed)
        a = _hidisc(fuse_geometry=False)(x)
        torch.manual_seed(seed)
        b = _hidisc(per_image=False)(x)
        assert a.dtype == dtype
        atol = 2e-3 if dtype == torch.float16 else 1e-5
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)
    assert torch.equal(x, before)


@pytest.mark.parametrize("failing", ["first", "last"])
def test_an_error_on_any_image_thread_is_raised_after_every_thread_stopped(monkeypatch, failing):
    """The calling thread takes images as well as the pool's; whichever meets the error, the
    call raises it, and only once no thread is still writing into the output."""
    from hlss.data import augment

    calls, seen, real = itertools.count(1), [], augment._fuse_geometry
    fail_at = 1 if failing == "first" else 16

    def fuse(steps, height, width):
        seen.append(next(calls))  # next() is atomic: one call is the fail_at-th
        if seen[-1] == fail_at:
            raise RuntimeError("kernel failed")
        return real(steps, height, width)

    monkeypatch.setattr(augment, "_fuse_geometry", fuse)
    aug = _hidisc(threads=2)
    with pytest.raises(RuntimeError, match="kernel failed"):
        aug(torch.rand(16, 3, 24, 24))
    assert len(seen) == 16  # the other thread went on to the end of the batch before the raise
