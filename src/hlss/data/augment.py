"""Batched random ("strong") augmentation, applied on the training device.

:class:`BatchAugment` is a thin wrapper around ``kornia.augmentation.AugmentationSequential``:
the ops are kornia augmentation modules, written as ``_target_`` nodes in
``conf/augment/*.yaml``. kornia draws the apply/skip decision (``p``) and the random parameters
independently for every image (``same_on_batch=False``). The wrapper adds what the training loop
needs around it: any number of leading dimensions (the hierarchy batch ``[P, S, N, T, C, H, W]``),
float32 work for half-precision batches, ``no_grad``, clamping to ``[0, 1]``, and one-line
:class:`~hlss.errors.ConfigError` for a probability outside ``[0, 1]``.

Hand-written here, because kornia 0.9 lacks them (both are kornia modules, usable anywhere a kornia
op is):

* :class:`RandomGaussianNoiseStd` -- ``kornia.augmentation.RandomGaussianNoise`` has one fixed
  ``std``; HiDisc draws the noise std per image from a range.
* :class:`RandomResizedCropKeepSize` -- ``kornia.augmentation.RandomResizedCrop`` needs the output
  size at construction (the patch size is a dataset setting, not an augmentation one) and its ``p``
  gates the whole batch at once (``p_batch``); this one keeps each image's own H x W and gates each
  image independently, like every other op.

Each op's per-image decision is drawn by the wrapper, and the op (with its ``p`` set to 1 for the
call) runs on the chosen images only. kornia 0.9 itself computes an op on the whole batch and then
keeps the result for the chosen images (a blend that keeps it exportable to ONNX), which at
HiDisc's ``p = 0.3`` throws away 70% of the work: on 64 images of 300 x 300 px on a 2-core CPU the
HiDisc list ran at ~30 images/s through ``AugmentationSequential.forward`` and ~95 images/s
before the move to kornia. The distribution is the same (each op, each image, independently with
probability ``p``; kornia draws the op's parameters per image).

On the CPU, when every chosen op has a fast kernel (below), each image goes through all its ops in
turn while it is in the cache, the images are shared out to ``torch.get_num_threads()`` threads
(each op on one intra-op thread), an image's flips, affine and crop are sampled in one pass
("fused geometry"), the output batch memory is reused once the caller has dropped it, every
step writes its result straight into the output or into a spare buffer (the first one reading
the batch itself: every kernel takes ``out=``), chosen so that the last one lands in the output
without a copy, and flips, blur,
sharpness, noise and the fused warp run as OpenCV kernels (:mod:`hlss.data.augment_cpu`;
``opencv=False`` keeps torch's).

Randomness comes from torch's global generators, on the device of the batch (the wrapper moves
kornia's samplers to it); seed with ``torch.manual_seed`` for reproducible draws (on the CPU the
result is the same for any number of threads: the noise of each image has its own seed, drawn
from the global generator with the other parameters).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import kornia.augmentation as K
import numpy as np
import torch
import torch.nn.functional as F
from kornia.augmentation import random_generator as rg
from kornia.geometry.conversions import normalize_homography
from torch import nn

from hlss.data import augment_cpu
from hlss.data.threads import KeptThreads
from hlss.errors import ConfigError

__all__ = ["BatchAugment", "RandomGaussianNoiseStd", "RandomResizedCropKeepSize"]

Out = torch.Tensor | None
"""A kernel's ``out=``: where to write its result, leaving its input as it was (None: as the
kernel does by itself, see :class:`_Kernel`)."""


def _pair(value: Any, what: str) -> tuple[float, float]:
    """``x`` -> ``(x, x)``; ``[a, b]`` -> ``(a, b)``. Raises ValueError otherwise or if a > b."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value), float(value))
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        lo, hi = float(value[0]), float(value[1])
        if lo > hi:
            raise ValueError(f"{what} range [{lo}, {hi}] has min > max")
        return (lo, hi)
    raise ValueError(f"{what} must be a number or a [min, max] pair; got {value!r}")


class RandomGaussianNoiseStd(K.IntensityAugmentationBase2D):
    """Add ``N(mean, std^2)`` noise with ``std ~ U(std_min, std_max)`` drawn per image.

    Args:
        std: a fixed std, or a ``[min, max]`` range drawn per image (values in [0, 1] images).
        mean: the noise mean.
        p: probability of adding noise to each image.

    Raises:
        ValueError: ``std`` is not a number or pair, has min > max, or is negative.

    Input/output: float ``(B, C, H, W)``; not clamped (``BatchAugment`` clamps at the end).
    """

    def __init__(
        self,
        std: Any = (0.01, 0.05),
        mean: float = 0.0,
        same_on_batch: bool = False,
        p: float = 0.5,
        keepdim: bool = False,
    ) -> None:
        super().__init__(p=p, same_on_batch=same_on_batch, keepdim=keepdim)
        self.std = _pair(std, "std")
        if self.std[0] < 0:
            raise ValueError(f"std must be >= 0; got {list(self.std)}")
        self.mean = float(mean)
        self._param_generator = rg.PlainUniformGenerator((self.std, "std", None, None))

    def apply_transform(
        self,
        input: torch.Tensor,
        params: dict[str, torch.Tensor],
        flags: dict[str, Any],
        transform: torch.Tensor | None = None,
    ) -> torch.Tensor:
        std = params["std"].to(input.device, input.dtype).view(-1, *([1] * (input.ndim - 1)))
        return input + (torch.randn_like(input) * std + self.mean)


class RandomResizedCropKeepSize(K.RandomResizedCrop):
    """``kornia.augmentation.RandomResizedCrop`` resized back to the input's own H x W, gated per image.

    Args:
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's width / height.
        p: probability of cropping each image (kornia's own crop gates the whole batch).
        resample, align_corners, cropping_mode: as in ``kornia.augmentation.RandomResizedCrop``.

    Raises:
        ValueError: invalid ``scale`` or ``ratio`` (kornia's check, at construction).
    """

    def __init__(
        self,
        scale: Any = (0.08, 1.0),
        ratio: Any = (3.0 / 4.0, 4.0 / 3.0),
        p: float = 0.5,
        resample: str = "bilinear",
        align_corners: bool = True,
        cropping_mode: str = "slice",
    ) -> None:
        self._range = (_pair(scale, "scale"), _pair(ratio, "ratio"))
        super().__init__(
            size=(8, 8),  # replaced by each input's size in generate_parameters
            scale=self._range[0],
            ratio=self._range[1],
            resample=resample,
            align_corners=align_corners,
            cropping_mode=cropping_mode,
        )
        self.p, self.p_batch = p, 1.0  # per-image gate; the output size no longer depends on it

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        size = (int(batch_shape[-2]), int(batch_shape[-1]))
        if self.flags["size"] != size:
            self._param_generator = rg.ResizedCropGenerator(size, *self._range)
            self._param_generator.set_rng_device_and_dtype(self.device, self.dtype)
            self.flags["size"] = size
        return super().generate_parameters(batch_shape)


def _check_prob(p: Any, where: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ConfigError(f"{where}: probability p must be a number in [0, 1]; got {p!r}")
    return float(p)


def apply_gated(op: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Apply a kornia op to each image of ``images`` ``[B, C, H, W]`` with probability ``op.p``,
    computing it on the chosen images only. Returns a new tensor (``images`` is not modified)."""
    p = float(op.p)
    if p <= 0.0 or images.shape[0] == 0:
        return images
    if p >= 1.0:
        return op(images)
    chosen = (torch.rand(images.shape[0], device=images.device) < p).nonzero().flatten()
    if chosen.numel() == 0:
        return images
    op.p = 1.0
    try:
        changed = op(images[chosen])
    finally:
        op.p = p
    return images.index_copy(0, chosen, changed.to(images.dtype))


# ---------------------------------------------------------------------------- fast kernels
# Each op class with a fast kernel has two functions. ``prepare(op, params, like)`` turns the
# per-image parameters kornia draws (``op.forward_parameters``) into per-image tensors whose first
# dimension is the number of chosen images (or returns None: kornia's own code then runs, e.g. a
# colour jitter with non-neutral factors); ``apply(op, x, args)`` computes the op on images ``x``
# ``[n, C, H, W]`` (which it may change in place) with ``args`` sliced to those images, and returns
# what kornia's ``apply_transform`` returns for the same parameters (tests compare the two). They are
# plain tensor ops on the batch's device: in-place arithmetic, shift-and-add stencils instead of
# depthwise ``conv2d`` (slow on CPU), one ``grid_sample`` per geometric op.


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-image parameter ``[n]`` as ``[n, 1, 1, 1]`` on ``x``'s device and dtype."""
    return v.to(x.device, x.dtype).view(-1, 1, 1, 1)


def _no_args(op: nn.Module, params: dict, like: torch.Tensor) -> dict:
    return {}


def _keys(*names: str):
    def prepare(op: nn.Module, params: dict, like: torch.Tensor) -> dict:
        return {k: params[k].to(like.device, like.dtype) for k in names if k in params}

    return prepare


def _hflip(op: nn.Module, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    return _written(x.flip(-1), out)


def _vflip(op: nn.Module, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    return _written(x.flip(-2), out)


def _prepare_noise(op: nn.Module, params: dict, like: torch.Tensor) -> dict:
    """The per-image std and, on the CPU, a per-image seed (drawn from torch's global generator)
    for the noise itself, so that images may be augmented on several threads and still give
    the same result for the same global seed."""
    args = {"std": params["std"].to(like.device, like.dtype)}
    if like.device.type == "cpu":
        count = (args["std"].shape[0],)
        args["seed"] = torch.randint(0, augment_cpu.SEED_LIMIT, count, dtype=torch.int64)
    return args


def _noise(op: nn.Module, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    if "seed" in args and x.device.type == "cpu":
        noise = torch.empty_like(x)
        for i, seed in enumerate(args["seed"].tolist()):
            noise[i].normal_(generator=torch.Generator().manual_seed(seed))
    else:
        noise = torch.randn_like(x)
    noise.mul_(_per_image(args["std"], x))
    if op.mean:
        noise.add_(op.mean)
    return x.add_(noise) if out is None else torch.add(x, noise, out=out)


def _prepare_color_jitter(op: nn.Module, params: dict, like: torch.Tensor) -> dict | None:
    """Neutral factors (torchvision's ``ColorJitter()`` defaults): kornia only clamps to [0, 1].
    Anything else: ``None`` (kornia's own implementation runs on the chosen images)."""
    neutral = {"brightness_factor": 1.0, "contrast_factor": 1.0, "saturation_factor": 1.0}
    for key, value in [*neutral.items(), ("hue_factor", 0.0)]:
        if key in params and bool((params[key] != value).any()):
            return None
    return {}


def _clamped(x: torch.Tensor, out: Out) -> torch.Tensor:
    """``x`` clamped to ``[0, 1]``: in place, or into ``out`` (one pass: the copy that an
    in-place kernel would need anyway, fused with its first clamp)."""
    return x.clamp_(0.0, 1.0) if out is None else torch.clamp(x, 0.0, 1.0, out=out)


def _clamp(op: nn.Module, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    return _clamped(x, out)


def _auto_contrast(op: nn.Module, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    flat = x.flatten(-2)
    low = flat.amin(-1)[..., None, None]  # two passes: faster than aminmax's one on the CPU
    high = flat.amax(-1)[..., None, None]
    x = x.sub_(low) if out is None else torch.sub(x, low, out=out)
    x.div_(high - low + 1e-6)
    return x.clamp_(0.0, 1.0) if op.clip_output else x


def _prepare_solarize(op: nn.Module, params: dict, like: torch.Tensor) -> dict:
    """Each image's threshold and brightness addition; on the CPU the additions are left out
    when every one is zero (adding 0 to a clamped image and clamping again changes nothing)."""
    args = _keys("thresholds", "additions")(op, params, like)
    if "additions" in args and like.device.type == "cpu" and not bool(args["additions"].any()):
        del args["additions"]
    return args


def _solarize(op: nn.Module, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    """``x`` where ``x < threshold``, ``1 - x`` elsewhere (kornia's ``where``), in place, as
    ``x + m * (-2x) + m`` with ``m = [x >= threshold]`` written out as 0/1 floats: below the
    threshold that is ``x`` itself, above it ``-x + 1``, which rounds as ``1 - x`` does, so the
    values are kornia's bit for bit. No temporary but ``m``: twice as fast as a ``lerp`` towards
    ``1 - x`` and six times ``torch.where`` on the CPU."""
    x = _clamped(x, out)
    if "additions" in args:
        x.add_(_per_image(args["additions"], x)).clamp_(0.0, 1.0)
    above = torch.ge(x, _per_image(args["thresholds"], x), out=torch.empty_like(x))
    return x.addcmul_(above, x, value=-2.0).add_(above)


def _box3_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over each interior pixel's 3 x 3 neighbourhood: ``[n, C, H, W] -> [n, C, H-2, W-2]``."""
    rows = x[..., :-2] + x[..., 1:-1]
    rows.add_(x[..., 2:])
    out = rows[..., :-2, :] + rows[..., 1:-1, :]
    return out.add_(rows[..., 2:, :])


def _sharpness(op: nn.Module, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    """PIL's sharpness: blend with the ``[[1,1,1],[1,5,1],[1,1,1]] / 13`` smoothing (interior
    only; border pixels are their own smoothing), ``out = smooth + factor * (x - smooth)``."""
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        raise ValueError(f"RandomSharpness needs images of at least 3 x 3; got {tuple(x.shape)}")
    x = _clamped(x, out)
    inner = x[..., 1:-1, 1:-1]
    smooth = _box3_sum(x).add_(inner, alpha=4.0).div_(13.0).clamp_(0.0, 1.0)
    factor = _per_image(args["sharpness"], x)
    inner.copy_(smooth.lerp_(inner, factor))  # smooth + factor * (x - smooth); border: x
    return x.clamp_(0.0, 1.0)


def _gaussian_taps(sigma: torch.Tensor, size: int, like: torch.Tensor) -> torch.Tensor:
    """Normalised 1-D Gaussian weights ``[n, size]`` (kornia's kernel: centred, odd size)."""
    offsets = torch.arange(size, device=like.device, dtype=like.dtype) - size // 2
    sigma = sigma.to(like.device, like.dtype).view(-1, 1)
    taps = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    return taps / taps.sum(-1, keepdim=True)


def _blur_sizes(op: nn.Module) -> tuple[int, int]:
    size = op.flags["kernel_size"]
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _prepare_blur(op: nn.Module, params: dict, like: torch.Tensor) -> dict | None:
    ky, kx = _blur_sizes(op)
    if ky % 2 == 0 or kx % 2 == 0:
        return None  # kornia's own (which refuses even kernels)
    sigma = params["sigma"]
    return {"x": _gaussian_taps(sigma, kx, like), "y": _gaussian_taps(sigma, ky, like)}


def _shift_filter(x: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-image 1-D filter along ``dim`` (-1 or -2) of a padded ``x``; ``taps`` ``[n, k]``."""
    k = taps.shape[1]
    length = x.shape[dim] - (k - 1)
    out = x.narrow(dim, 0, length) * taps[:, 0].view(-1, 1, 1, 1)
    for i in range(1, k):
        out.addcmul_(x.narrow(dim, i, length), taps[:, i].view(-1, 1, 1, 1))
    return out


def _gaussian_blur(op: nn.Module, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    """Separable Gaussian blur with kornia's border handling (each direction padded in turn)."""
    mode = op.flags["border_type"].name.lower()
    kx, ky = args["x"].shape[1], args["y"].shape[1]
    if kx > 1:
        x = _shift_filter(F.pad(x, (kx // 2, kx // 2, 0, 0), mode=mode), args["x"], -1)
    if ky > 1:
        x = _shift_filter(F.pad(x, (0, 0, ky // 2, ky // 2), mode=mode), args["y"], -2)
    return _written(x, out)


def _affine_grid(theta: torch.Tensor, height: int, width: int, align: bool) -> torch.Tensor:
    """``F.affine_grid(theta, [n, C, H, W], align)`` as two broadcast multiply-adds (cheaper on
    CPU than the batched matrix product); ``theta`` ``[n, 2, 3]`` -> grid ``[n, H, W, 2]``."""

    def axis(size: int) -> torch.Tensor:
        if size == 1:
            return theta.new_zeros(1)
        if align:
            return torch.linspace(-1.0, 1.0, size, device=theta.device, dtype=theta.dtype)
        edge = 1.0 - 1.0 / size
        return torch.linspace(-edge, edge, size, device=theta.device, dtype=theta.dtype)

    xs, ys = axis(width).view(1, 1, width), axis(height).view(1, height, 1)
    grid = theta.new_empty(theta.shape[0], height, width, 2)
    for c in range(2):
        row = theta[:, c].reshape(-1, 3, 1, 1)
        torch.add(xs * row[:, 0], ys * row[:, 1] + row[:, 2], out=grid[..., c])
    return grid


def _grid_sample(x: torch.Tensor, theta: torch.Tensor, flags: dict, align: bool) -> torch.Tensor:
    grid = _affine_grid(theta.to(x.dtype), int(x.shape[-2]), int(x.shape[-1]), align)
    return F.grid_sample(
        x,
        grid,
        mode=flags["resample"].name.lower(),
        padding_mode=str(getattr(flags["padding_mode"], "name", flags["padding_mode"])).lower(),
        align_corners=align,
    )


def _affine_matrices(params: dict) -> np.ndarray:
    """kornia's ``RandomAffine`` matrices ``[n, 3, 3]`` (input pixel -> output pixel, float64)
    from its drawn parameters, as its ``compute_transformation`` composes them: a shear about the
    centre, then scale and rotation by ``angle`` degrees (clockwise as displayed) about the
    centre, then the translation. Numpy on the CPU: kornia's torch version is ~1 ms a batch of
    small ops, all on the thread that then waits to share the images out."""

    def get(key: str) -> np.ndarray:
        return params[key].detach().cpu().double().numpy()

    (cx, cy), (tx, ty), (sx, sy) = get("center").T, get("translations").T, get("scale").T
    angle = np.deg2rad(get("angle"))
    cos, sin = np.cos(angle), np.sin(angle)
    n = angle.shape[0]
    rotate = np.zeros((n, 3, 3))  # centre @ rotation(-angle) @ scale @ -centre, plus translation
    rotate[:, 0, 0], rotate[:, 0, 1] = cos * sx, -sin * sy
    rotate[:, 1, 0], rotate[:, 1, 1] = sin * sx, cos * sy
    rotate[:, 0, 2] = cx - rotate[:, 0, 0] * cx - rotate[:, 0, 1] * cy + tx
    rotate[:, 1, 2] = cy - rotate[:, 1, 0] * cx - rotate[:, 1, 1] * cy + ty
    rotate[:, 2, 2] = 1.0
    hx, hy = np.tan(np.deg2rad(get("shear_x"))), np.tan(np.deg2rad(get("shear_y")))
    shear = np.zeros((n, 3, 3))
    shear[:, 0, 0], shear[:, 0, 1], shear[:, 0, 2] = 1.0, -hx, hx * cy
    shear[:, 1, 0], shear[:, 1, 1], shear[:, 1, 2] = -hy, 1.0 + hx * hy, hy * (cx - hx * cy)
    shear[:, 2, 2] = 1.0
    return rotate @ shear


def _prepare_affine(op: nn.Module, params: dict, like: torch.Tensor) -> dict | None:
    """kornia's pixel-space matrices -> the normalised ``[n, 2, 3]`` output-to-input maps that
    ``grid_sample`` takes (what kornia's ``warp_affine`` computes); on the CPU from
    :func:`_affine_matrices`."""
    flags = op.flags
    if flags.get("fill_value") is not None or flags["padding_mode"].name.lower() == "fill":
        return None
    height, width = int(like.shape[-2]), int(like.shape[-1])
    align = bool(flags["align_corners"])
    if like.device.type == "cpu":
        unit, inverse = _unit_maps(height, width, align)
        theta = unit @ np.linalg.inv(_affine_matrices(params)) @ inverse
        return {"theta": torch.from_numpy(theta[:, :2]).to(like.dtype)}
    empty = like.new_empty(0, dtype=torch.float64)
    matrix = op.compute_transformation(empty, params, flags)
    size = (height, width)
    unit = normalize_homography(matrix, size, size, align_corners=align)
    return {"theta": torch.linalg.inv(unit)[:, :2].to(like.dtype)}


def _affine(op: nn.Module, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    return _written(_grid_sample(x, args["theta"], op.flags, bool(op.flags["align_corners"])), out)


def _prepare_crop(op: nn.Module, params: dict, like: torch.Tensor) -> dict | None:
    """Crop box ``src`` (corners in pixels, inclusive) resized to the input's H x W, bilinear with
    aligned corners, as kornia's crop-then-resize ("slice" mode) computes it: ``[n, 2, 3]`` maps."""
    flags = op.flags
    if flags["cropping_mode"] != "slice" or not flags["align_corners"]:
        return None
    height, width = int(like.shape[-2]), int(like.shape[-1])
    box = params["src"].to(like.device, torch.float64)
    x0, y0, x1, y1 = box[:, 0, 0], box[:, 0, 1], box[:, 2, 0], box[:, 2, 1]
    sx = (x1 - x0) / max(width - 1, 1)
    sy = (y1 - y0) / max(height - 1, 1)
    theta = torch.zeros(box.shape[0], 2, 3, dtype=torch.float64, device=like.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, sx + 2.0 * x0 / max(width - 1, 1) - 1.0
    theta[:, 1, 1], theta[:, 1, 2] = sy, sy + 2.0 * y0 / max(height - 1, 1) - 1.0
    return {"theta": theta.to(like.dtype)}


def _resized_crop(op: nn.Module, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    theta = args["theta"]
    return _written(_grid_sample(x, theta, {**op.flags, "padding_mode": "zeros"}, True), out)


def _prepare_erasing(op: nn.Module, params: dict, like: torch.Tensor) -> dict:
    """Each image's box ``[xs, xs + widths - 1] x [ys, ys + heights - 1]`` (inclusive, clipped
    to the image) as integer ``[n, 4]`` ``(left, top, right, bottom)``, and its fill value."""
    height, width = int(like.shape[-2]), int(like.shape[-1])
    xs, ys = params["xs"].double(), params["ys"].double()
    left = xs.ceil().clamp_min(0)
    top = ys.ceil().clamp_min(0)
    right = (xs + params["widths"].double() - 1).floor().clamp_max(width - 1)
    bottom = (ys + params["heights"].double() - 1).floor().clamp_max(height - 1)
    return {
        "box": torch.stack([left, top, right, bottom], 1).long().cpu(),
        "value": params["values"].double().cpu(),
    }


def _erasing(op: nn.Module, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    if out is not None:
        x = out.copy_(x)
    for i, ((left, top, right, bottom), value) in enumerate(
        zip(args["box"].tolist(), args["value"].tolist(), strict=True)
    ):
        if right >= left and bottom >= top:
            x[i, :, top : bottom + 1, left : right + 1] = value
    return x


def _blur_cpu(op: nn.Module, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    if augment_cpu.blur_border(op) is None:  # a border OpenCV's filters do not have here
        return _gaussian_blur(op, x, args, out=out)
    return augment_cpu.gaussian_blur(op, x, args, out=out)


class _Kernel(NamedTuple):
    """An op's fast version. ``apply`` and ``cpu`` are called as ``(op, x, args)`` or
    ``(op, x, args, out=tensor)``: with ``out`` (shaped like ``x``, not ``x``) the result is
    written there and ``out`` returned, ``x`` left as it was; without, see ``in_place``."""

    prepare: Callable[[nn.Module, dict, torch.Tensor], dict | None]
    apply: Callable[..., torch.Tensor]
    in_place: bool = True
    """Without ``out``: True, ``apply`` (and ``cpu``) change their input and return it; False,
    they never write into their input (it may be the caller's batch) and return a new tensor."""
    cpu: Callable[..., torch.Tensor] | None = None
    """The same op with OpenCV (:mod:`hlss.data.augment_cpu`), for ``float32`` images on the CPU;
    None: ``apply`` runs there too."""


def _compute(
    kernel: _Kernel,
    op: nn.Module,
    x: torch.Tensor,
    args: dict,
    opencv: bool = True,
    out: Out = None,
) -> torch.Tensor:
    """``kernel`` on images ``x`` with ``args``: its OpenCV version where ``opencv`` is set and
    it can run (``float32`` on the CPU), the torch one otherwise. ``out`` (not ``x``): the result
    is written there and ``out`` returned; ``x`` is not written."""
    function = _function(kernel, opencv and kernel.cpu is not None and augment_cpu.usable(x))
    return function(op, x, args) if out is None else function(op, x, args, out=out)


def _function(kernel: _Kernel, cpu: bool) -> Callable[..., torch.Tensor]:
    """``kernel``'s OpenCV version where ``cpu`` is set and it has one, its torch one otherwise."""
    return kernel.cpu if cpu and kernel.cpu is not None else kernel.apply


def _written(result: torch.Tensor, out: Out) -> torch.Tensor:
    """``result``, copied into ``out`` when one is given and it is another tensor."""
    return result if out is None or result is out else out.copy_(result)


_FAST: dict[type, _Kernel] = {
    K.RandomHorizontalFlip: _Kernel(
        _no_args, _hflip, in_place=False, cpu=augment_cpu.flip_horizontal
    ),
    K.RandomVerticalFlip: _Kernel(_no_args, _vflip, in_place=False, cpu=augment_cpu.flip_vertical),
    RandomGaussianNoiseStd: _Kernel(_prepare_noise, _noise, cpu=augment_cpu.gaussian_noise),
    K.ColorJitter: _Kernel(_prepare_color_jitter, _clamp),
    K.RandomAutoContrast: _Kernel(_no_args, _auto_contrast),
    K.RandomSolarize: _Kernel(_prepare_solarize, _solarize),
    K.RandomSharpness: _Kernel(_keys("sharpness"), _sharpness, cpu=augment_cpu.sharpness),
    K.RandomGaussianBlur: _Kernel(_prepare_blur, _gaussian_blur, in_place=False, cpu=_blur_cpu),
    K.RandomAffine: _Kernel(_prepare_affine, _affine, in_place=False),
    RandomResizedCropKeepSize: _Kernel(_prepare_crop, _resized_crop, in_place=False),
    K.RandomErasing: _Kernel(_prepare_erasing, _erasing),
}
"""Fast kernels by exact op class (a subclass may change the maths, so it runs kornia's own)."""


# ---------------------------------------------------------------------------- fused geometry
# On the CPU path each image's chosen flips, affine and resized crop are sampled in ONE
# ``grid_sample``: a flip commutes with the ops between it and the affine/crop (pointwise ops,
# per-channel min-max, symmetric stencils with symmetric borders; the noise field is flipped,
# which leaves its distribution as it was), so it is moved next to them, and consecutive maps
# (output pixel -> input pixel, 3 x 3) are multiplied into one. The parameters drawn are the same;
# the result differs from one-op-at-a-time sampling only by interpolation: bilinear once instead
# of two or three times (less blur), and zero padding decided on the original image's edge.

_FLIPS = (K.RandomHorizontalFlip, K.RandomVerticalFlip)
_WARPS = (K.RandomAffine, RandomResizedCropKeepSize)
_FLIP_EQUIVARIANT = (
    RandomGaussianNoiseStd,
    K.ColorJitter,  # on the fast path only: neutral factors, a clamp
    K.RandomAutoContrast,
    K.RandomSolarize,
    K.RandomSharpness,
    K.RandomGaussianBlur,
)


@functools.lru_cache(maxsize=64)
def _unit_maps(height: int, width: int, align: bool) -> tuple[np.ndarray, np.ndarray]:
    """3 x 3 map from pixel coordinates to ``grid_sample``'s [-1, 1] ones (either convention),
    and its inverse; computed once per image size (read-only arrays)."""
    if align:
        sx, sy = 2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)
        unit = np.array([[sx, 0.0, -1.0], [0.0, sy, -1.0], [0.0, 0.0, 1.0]])
    else:
        unit = np.array(
            [
                [2.0 / width, 0.0, 1.0 / width - 1.0],
                [0.0, 2.0 / height, 1.0 / height - 1.0],
                [0, 0, 1],
            ]
        )
    inverse = np.linalg.inv(unit)
    unit.flags.writeable = inverse.flags.writeable = False
    return unit, inverse


@functools.lru_cache(maxsize=64)
def _flip_maps(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The horizontal and vertical flips' pixel maps (read-only)."""
    maps = (
        np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
        np.array([[1.0, 0.0, 0.0], [0.0, -1.0, height - 1.0], [0.0, 0.0, 1.0]]),
    )
    for m in maps:
        m.flags.writeable = False
    return maps


def _warp_maps(op: nn.Module, args: dict, height: int, width: int) -> np.ndarray | None:
    """The output -> input pixel maps ``[m, 3, 3]`` of an affine/crop draw's images; None: not
    fusable (another resampling or padding)."""
    if op.flags["resample"].name.lower() != "bilinear":
        return None
    if isinstance(op, K.RandomAffine):
        if str(getattr(op.flags["padding_mode"], "name", "")).lower() != "zeros":
            return None
        align = bool(op.flags["align_corners"])
    else:
        align = True
    theta = args["theta"].double().cpu().numpy()
    full = np.zeros((theta.shape[0], 3, 3))
    full[:, :2], full[:, 2, 2] = theta, 1.0
    unit, inverse = _unit_maps(height, width, align)
    return inverse @ full @ unit


def _pixel_map(step: tuple, height: int, width: int) -> np.ndarray | None:
    """A geometric step's output -> input pixel map (3 x 3); None: not fusable. An affine/crop
    step's args may carry its draw's maps already (``"pixel_maps"``, see :meth:`BatchAugment`)."""
    op, _, args, j = step
    if isinstance(op, K.RandomHorizontalFlip):
        return _flip_maps(height, width)[0]
    if isinstance(op, K.RandomVerticalFlip):
        return _flip_maps(height, width)[1]
    maps = args["pixel_maps"] if "pixel_maps" in args else _warp_maps(op, args, height, width)
    return None if maps is None else maps[j]


def _theta(pixel: torch.Tensor | np.ndarray, height: int, width: int) -> torch.Tensor:
    """Output -> input maps in pixels ``[n, 2, 3]`` as ``grid_sample``'s aligned-corner
    ``theta`` (float64)."""
    full = np.zeros((pixel.shape[0], 3, 3))
    full[:, :2], full[:, 2, 2] = np.asarray(pixel, dtype=np.float64), 1.0
    unit, inverse = _unit_maps(height, width, True)
    return torch.from_numpy((unit @ full @ inverse)[:, :2])


def _warp(op: nn.Module | None, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    """Bilinear, zero padding, aligned corners, with ``args["theta"]`` ``[n, 2, 3]`` or, where
    that is absent, the same maps in pixels, ``args["pixel"]``."""
    height, width = int(x.shape[-2]), int(x.shape[-1])
    theta = args["theta"] if "theta" in args else _theta(args["pixel"], height, width)
    grid = _affine_grid(theta.to(x.device, x.dtype), height, width, True)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return _written(warped, out)


def _warp_cpu(op: nn.Module | None, x: torch.Tensor, args: dict, out: Out = None) -> torch.Tensor:
    if "pixel" not in args or not augment_cpu.exact_warp():
        return _warp(op, x, args, out=out)
    return augment_cpu.warp_bilinear(op, x, args, out=out)


_WARP = _Kernel(_no_args, _warp, in_place=False, cpu=_warp_cpu)
"""A fused run of flips/affine/crop: its map in pixels, ``args["pixel"]`` (float64), which
OpenCV's ``warpAffine`` takes on the CPU; ``grid_sample`` elsewhere (or ``args["theta"]``)."""


def _fusable(step: tuple) -> bool:
    return type(step[0]) in _FLIPS or type(step[0]) in _WARPS


def _move_flips(steps: list) -> list:
    """Each flip moved forward over flip-equivariant steps, up to a following affine/crop."""
    steps = list(steps)
    for i in range(len(steps) - 1, -1, -1):
        if type(steps[i][0]) not in _FLIPS:
            continue
        k = i + 1
        while k < len(steps) and type(steps[k][0]) in (*_FLIPS, *_FLIP_EQUIVARIANT):
            k += 1
        if k < len(steps) and type(steps[k][0]) in _WARPS:
            steps.insert(k - 1, steps.pop(i))
    return steps


def _fuse_geometry(steps: list, height: int, width: int) -> list:
    """An image's steps with each run of flips/affine/crop (holding an affine or crop) replaced
    by one warp step ``(None, _WARP, {"pixel": [1, 2, 3]}, 0)``; other steps as they were."""
    if not any(type(step[0]) in _WARPS for step in steps):
        return steps
    steps, fused, run = _move_flips(steps), [], []

    def close_run() -> None:
        if not run:
            return
        maps = [_pixel_map(step, height, width) for step in run]
        if not any(type(s[0]) in _WARPS for s in run) or any(m is None for m in maps):
            fused.extend(run)
        else:  # the first step's map is applied last to an output pixel
            total = functools.reduce(np.matmul, maps)
            pixel = torch.from_numpy(np.array(total[None, :2]))  # float64, for OpenCV
            fused.append((None, _WARP, {"pixel": pixel}, 0))
        run.clear()

    for step in steps:
        if _fusable(step):
            run.append(step)
        else:
            close_run()
            fused.append(step)
    close_run()
    return fused


class _Draw(NamedTuple):
    """One op's draw for a batch: the chosen images (``[m]`` indices, ascending), kornia's
    parameters for them, and the fast kernel's per-image arguments (None: run kornia)."""

    chosen: torch.Tensor
    params: dict | None
    args: dict | None


def _draw(op: nn.Module, chosen: torch.Tensor, like: torch.Tensor) -> _Draw:
    """Draw ``op``'s parameters for the ``chosen`` images of a batch shaped like ``like``."""
    kernel = _FAST.get(type(op))
    if kernel is None or op.same_on_batch:
        return _Draw(chosen, None, None)
    p = op.p
    op.p = 1.0
    try:
        params = op.forward_parameters(torch.Size((int(chosen.numel()), *like.shape[1:])))
    finally:
        op.p = p
    return _Draw(chosen, params, kernel.prepare(op, params, like))


def _run_kornia(op: nn.Module, x: torch.Tensor, params: dict | None) -> torch.Tensor:
    """kornia's own forward on images ``x`` that were all chosen (``p`` forced to 1)."""
    p = op.p
    op.p = 1.0
    try:
        return op(x) if params is None else op(x, params=params)
    finally:
        op.p = p


def apply_op(op: nn.Module, x: torch.Tensor, opencv: bool = True) -> torch.Tensor:
    """Apply ``op`` to every image of ``x`` ``[n, C, H, W]`` (the gate already decided), with
    per-image parameters drawn by kornia: the fast kernel of ``op``'s class where there is one
    that handles its settings (its OpenCV version on ``float32`` CPU images unless ``opencv`` is
    False), kornia's own ``forward`` otherwise. ``x`` may be changed in place; returns the result."""
    draw = _draw(op, torch.arange(x.shape[0], device=x.device), x)
    if draw.args is None:
        return _run_kornia(op, x, draw.params)
    return _compute(_FAST[type(op)], op, x, draw.args, opencv)


def _dry_run(op: nn.Module, where: str) -> None:
    """Apply ``op`` to a small RGB batch, so that parameters kornia checks only when it runs
    (e.g. an even blur kernel) are refused at construction; the global RNG state is kept."""
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            op(torch.full((2, 3, 64, 64), 0.5))
    except Exception as err:  # any failure here is a configuration error
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{where}: invalid parameters ({first})") from None


_MIN_IMAGES_PER_THREAD = 4
"""A batch is shared out to at most ``images // 4`` threads (a thread costs ~0.1 ms to start)."""


def _storage_users(t: torch.Tensor) -> int | None:
    """How many tensors (views, numpy arrays, ...) hold ``t``'s memory; None if unknown."""
    try:
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata)) - 1
    except (AttributeError, RuntimeError, TypeError):  # a private API: may go away
        return None


class _OutputBuffers:
    """Output batches of the CPU path, handed out again once nobody holds them.

    A fresh 64 MB batch comes from the operating system as untouched pages, and on a virtual
    machine the first write to each page costs ~1 us (about as much as the copy itself); two
    buffers per shape let a loop keep the previous batch while the next one is made. A buffer
    is reused only when no tensor or array outside this object refers to its memory.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._held: list[torch.Tensor] = []

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        for buffer in self._held:
            same = (buffer.shape, buffer.dtype, buffer.device) == (shape, dtype, device)
            if same and _storage_users(buffer) == 1:
                return buffer
        buffer = torch.empty(shape, dtype=dtype, device=device)
        if _storage_users(buffer) == 1:
            self._held = [*self._held, buffer][-self.keep :]
        return buffer

    def __getstate__(self) -> dict:  # not worth pickling or copying
        return {"keep": self.keep, "_held": []}


class BatchAugment(nn.Module):
    """Random strong augmentation of image batches: kornia ops, per-image decisions and parameters.

    Args:
        ops: kornia augmentation modules (``kornia.augmentation.*`` or the two in this module),
            held in a ``kornia.augmentation.AugmentationSequential`` and applied in order. Each
            op's own ``p`` is the probability that it is applied to each image (see
            :func:`apply_gated`). Empty: identity + clamp.
        p: the configured default probability, the one the YAML's ops interpolate
            (``p: ${...p}``); checked and shown, the ops' own ``p`` are the ones used.
        per_image: on the CPU, take each image through all its ops in turn (cache-friendly,
            images shared out to ``torch.get_num_threads()`` threads) when every chosen op has a
            fast kernel; False: op by op over the batch (what other devices always do).
        fuse_geometry: on the per-image path, sample each image's flips, affine and resized
            crop in one bilinear pass (see "fused geometry" in the module); False: one pass each.
        threads: how many threads share the images on the per-image path; None: the intra-op
            thread count in effect (``torch.get_num_threads()``, which the call leaves as it was).
        opencv: on the CPU, compute flips, blur, sharpness, noise and the fused warp on
            ``float32`` images with OpenCV (:mod:`hlss.data.augment_cpu`, several times
            faster); False: torch's kernels,
            as on other devices. The noise then comes from OpenCV's generator: the same
            distribution, other draws.

    Output memory: on the per-image path the result is written into one of two batch buffers
    kept for reuse, and a buffer is reused only once nothing else refers to its memory (a
    training step that drops its batch frees it), so a result is never overwritten.

    Raises:
        ConfigError: ``p`` or an op's ``p`` is not in ``[0, 1]``, ``opencv`` is not a bool,
            an op is not a kornia augmentation, or an op fails on a small 3-channel test batch
            (e.g. an even blur kernel, which kornia checks only when it runs); one line naming
            the op.

    Forward:
        ``x``: floating tensor ``[..., C, H, W]`` with values in ``[0, 1]`` (e.g. a hierarchy
        batch ``[P, S, N, T, C, H, W]``). All leading dimensions are flattened into one batch,
        every image is augmented independently, and the shape is restored. Returns a new tensor of
        the same shape, dtype and device, clamped to ``[0, 1]``; runs under ``torch.no_grad``.
        ``ColorJitter`` (saturation/hue) needs ``C == 3``.

        Raises ``ValueError`` when ``x`` has fewer than 3 dimensions or is not floating point.
    """

    def __init__(
        self,
        ops: Sequence[nn.Module] = (),
        p: float = 0.3,
        per_image: bool = True,
        fuse_geometry: bool = True,
        threads: int | None = None,
        opencv: bool = True,
    ):
        super().__init__()
        self.p = _check_prob(p, "augment")
        ops = list(ops or [])
        for i, op in enumerate(ops):
            name = type(op).__name__
            if not isinstance(op, (K.AugmentationBase2D, K.ImageSequential)):
                raise ConfigError(f"augment op #{i} ({name}) is not a kornia 2D augmentation")
            _check_prob(getattr(op, "p", 1.0), f"augment op #{i} ({name})")
            _dry_run(op, f"augment op #{i} ({name})")
        self.sequence = K.AugmentationSequential(*ops)
        self.per_image = bool(per_image)
        self.fuse_geometry = bool(fuse_geometry)
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ConfigError(
                f"augment: threads must be a positive integer or null; got {threads!r}"
            )
        self.threads = threads
        if not isinstance(opencv, bool):
            raise ConfigError(f"augment: opencv must be true or false; got {opencv!r}")
        self.opencv = opencv
        self._rng_device = torch.device("cpu")
        self._outputs = _OutputBuffers()
        self._threads = KeptThreads("hlss-augment")

    @property
    def op_names(self) -> list[str]:
        """Class names of the configured ops, in application order."""
        return [type(op).__name__ for op in self.sequence.children()]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:
            raise ValueError(f"BatchAugment expects [..., C, H, W]; got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise ValueError(f"BatchAugment expects a floating-point tensor; got {x.dtype}")
        if x.device != self._rng_device:  # draw kornia's random numbers where the batch lives
            self.sequence.to(x.device)
            self._rng_device = x.device
        shape, dtype = x.shape, x.dtype
        work_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        n = math.prod(shape[:-3])
        try:  # a view; None for e.g. views broadcast along T (stride 0), which are not copied
            imgs = x.view(n, *shape[-3:])
        except RuntimeError:
            imgs = None
        like = imgs if imgs is not None else x.new_empty((1, 1, 1, 1)).expand(n, *shape[-3:])
        ops = list(self.sequence.children())
        draws = self._draw_all(ops, like)
        if (
            self.per_image
            and x.device.type == "cpu"
            and all(d is None or d.args is not None for d in draws)
        ):
            out = self._per_image(ops, draws, x, like, work_dtype)
        else:
            batch = imgs if imgs is not None else x.reshape(n, *shape[-3:])
            out = self._per_op(ops, draws, batch, work_dtype, self.opencv)
        return out.to(dtype).reshape(shape)

    @staticmethod
    def _draw_all(ops: list[nn.Module], imgs: torch.Tensor) -> list[_Draw | None]:
        """Each op's gate (one uniform draw per op and image) and parameters for the chosen."""
        n = imgs.shape[0]
        probs = [float(op.p) for op in ops]
        gates = torch.rand(len(ops), n, device=imgs.device) if n and ops else None
        draws: list[_Draw | None] = []
        for k, (op, p) in enumerate(zip(ops, probs, strict=True)):
            chosen = None
            if gates is not None and p > 0.0:
                if p >= 1.0:
                    chosen = torch.arange(n, device=imgs.device)
                else:
                    chosen = (gates[k] < p).nonzero().flatten()
            draws.append(_draw(op, chosen, imgs) if chosen is not None and chosen.numel() else None)
        return draws

    @staticmethod
    def _per_op(
        ops, draws, imgs: torch.Tensor, work_dtype: torch.dtype, opencv: bool
    ) -> torch.Tensor:
        """Batched: each op once, on its chosen images (gathered, computed, scattered back)."""
        work = imgs.to(work_dtype)
        owned = work.data_ptr() != imgs.data_ptr()
        for op, draw in zip(ops, draws, strict=True):
            if draw is None:
                continue
            sub = work.index_select(0, draw.chosen)
            if draw.args is None:
                changed = _run_kornia(op, sub, draw.params)
            else:
                changed = _compute(_FAST[type(op)], op, sub, draw.args, opencv)
            if not owned:
                work, owned = work.clone(), True
            work.index_copy_(0, draw.chosen, changed.to(work_dtype))
        return work.clamp_(0.0, 1.0) if owned else work.clamp(0.0, 1.0)

    def _per_image(
        self, ops, draws, x: torch.Tensor, like: torch.Tensor, work_dtype: torch.dtype
    ) -> torch.Tensor:
        """One image at a time through all its chosen ops, so that it stays in the CPU's cache
        (a 300-px image is ~1 MB); the same draws and kernels as :meth:`_per_op`.

        Each op runs on one intra-op thread (~1 MB per op: splitting it costs more than it
        gains, and with a busy CPU an OpenMP team waiting for a descheduled thread costs far
        more); instead the images are shared out to ``torch.get_num_threads()`` Python threads,
        this one included (torch releases the GIL in its kernels), each taking the next image
        as it finishes one (images differ in cost; fixed shares left a core idle at the end of a
        batch). The thread setting is restored afterwards.
        Results do not depend on the number of threads: every random draw was made beforehand.
        ``x`` is the batch as given (``[..., C, H, W]``, any strides), ``like`` ``[n, C, H, W]``
        a tensor of the flattened shape; image ``i`` is read from ``x`` in place.
        """
        n = like.shape[0]
        out = self._outputs.take(like.shape, work_dtype, like.device)
        lead = tuple(x.shape[:-3])
        height, width = int(like.shape[-2]), int(like.shape[-1])
        # image i's position in x's leading dimensions, as plain ints (fast to index with)
        where = (
            [tuple(c) for c in np.stack(np.unravel_index(np.arange(n), lead), 1).tolist()]
            if lead
            else []
        )
        plan: list[list[tuple[nn.Module, _Kernel, dict, int]]] = [[] for _ in range(n)]
        for op, draw in zip(ops, draws, strict=True):
            if draw is None:
                continue
            kernel, args = _FAST[type(op)], draw.args
            if self.fuse_geometry and type(op) in _WARPS:  # every image's map at once
                maps = _warp_maps(op, args, height, width)
                args = args if maps is None else {**args, "pixel_maps": maps}
            for j, i in enumerate(draw.chosen.tolist()):
                plan[i].append((op, kernel, args, j))

        taken = itertools.count()  # the next image to take: next() on it is atomic
        cpu = self.opencv and augment_cpu.usable(out)  # every step computes on images like out

        def run() -> None:
            with torch.no_grad():  # grad mode is per thread
                spare = out.new_empty((1, *out.shape[1:]))  # this thread's second buffer
                while (i := next(taken)) < n:  # fused here: the other threads compute meanwhile
                    steps = (
                        _fuse_geometry(plan[i], height, width) if self.fuse_geometry else plan[i]
                    )
                    source = x[where[i]] if lead else x
                    BatchAugment._one_image(out[i : i + 1], source[None], steps, cpu, spare)

        threads = torch.get_num_threads()
        wanted = threads if self.threads is None else self.threads
        workers = max(1, min(wanted, n // _MIN_IMAGES_PER_THREAD))
        if threads != 1:
            torch.set_num_threads(1)
        opencv_threads = augment_cpu.one_thread() if self.opencv else contextlib.nullcontext()
        try:
            with opencv_threads:
                pool = self._threads.pool(workers - 1) if workers > 1 else None
                jobs = [pool.submit(run) for _ in range(workers - 1)] if pool else []
                try:
                    run()  # this thread takes images too
                finally:  # no thread writes into the output once this returns or raises
                    concurrent.futures.wait(jobs)
                for job in jobs:
                    job.result()  # a thread's error, raised here
        finally:
            if threads != 1:
                torch.set_num_threads(threads)
        return out

    @staticmethod
    def _one_image(
        image: torch.Tensor, source: torch.Tensor, steps: list, cpu: bool, spare: torch.Tensor
    ) -> None:
        """Write ``source`` ``[1, C, H, W]`` with its chosen ``steps`` applied into ``image``.

        ``source`` is read, never written. A step that makes a new image (a warp, a blur) writes
        it straight into ``image`` or into ``spare`` (a tensor like ``image``), chosen from the
        last step back so that the result ends in ``image`` with no copy; the source is copied
        only when no step was chosen: a first step that works in place writes its result into
        the buffer given as its ``out``. ``cpu``: each op's OpenCV kernel where it has one
        (decided once per batch, :func:`augment_cpu.usable`), else its torch one."""
        where, target = [image] * len(steps), image
        for k in range(len(steps) - 1, -1, -1):  # where each step's result must be
            where[k] = target
            if not steps[k][1].in_place:  # its input must then be in the other buffer
                target = spare if target is image else image
        current = source
        if source.dtype != image.dtype:
            target.copy_(source)
            current = target
        for (op, kernel, args, j), into in zip(steps, where, strict=True):
            one = {key: value[j : j + 1] for key, value in args.items()}
            function = _function(kernel, cpu)
            if current is source or not kernel.in_place:
                current = function(op, current, one, out=into)
                continue
            result = function(op, current, one)
            if result is not current:
                current.copy_(result)
        if current is image:
            image.clamp_(0.0, 1.0)
        else:
            torch.clamp(current, 0.0, 1.0, out=image)

    def extra_repr(self) -> str:
        return f"p={self.p}"
