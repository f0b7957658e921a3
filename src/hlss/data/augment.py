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

Randomness comes from torch's global generators, on the device of the batch (the wrapper moves
kornia's samplers to it); seed with ``torch.manual_seed`` for reproducible draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import kornia.augmentation as K
import torch
from kornia.augmentation import random_generator as rg
from torch import nn

from hlss.errors import ConfigError

__all__ = ["BatchAugment", "RandomGaussianNoiseStd", "RandomResizedCropKeepSize"]


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


def _dry_run(op: nn.Module, where: str) -> None:
    """Apply ``op`` to a small RGB batch, so that parameters kornia checks only when it runs
    (e.g. an even blur kernel) are refused at construction; the global RNG state is kept."""
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            op(torch.full((2, 3, 64, 64), 0.5))
    except Exception as err:  # any failure here is a configuration error
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{where}: invalid parameters ({first})") from None


class BatchAugment(nn.Module):
    """Random strong augmentation of image batches: kornia ops, per-image decisions and parameters.

    Args:
        ops: kornia augmentation modules (``kornia.augmentation.*`` or the two in this module),
            held in a ``kornia.augmentation.AugmentationSequential`` and applied in order. Each
            op's own ``p`` is the probability that it is applied to each image (see
            :func:`apply_gated`). Empty: identity + clamp.
        p: the configured default probability, the one the YAML's ops interpolate
            (``p: ${...p}``); checked and shown, the ops' own ``p`` are the ones used.

    Raises:
        ConfigError: ``p`` or an op's ``p`` is not in ``[0, 1]``, an op is not a kornia
            augmentation, or an op fails on a small 3-channel test batch (e.g. an even blur
            kernel, which kornia checks only when it runs); one line naming the op.

    Forward:
        ``x``: floating tensor ``[..., C, H, W]`` with values in ``[0, 1]`` (e.g. a hierarchy
        batch ``[P, S, N, T, C, H, W]``). All leading dimensions are flattened into one batch,
        every image is augmented independently, and the shape is restored. Returns a new tensor of
        the same shape, dtype and device, clamped to ``[0, 1]``; runs under ``torch.no_grad``.
        ``ColorJitter`` (saturation/hue) needs ``C == 3``.

        Raises ``ValueError`` when ``x`` has fewer than 3 dimensions or is not floating point.
    """

    def __init__(self, ops: Sequence[nn.Module] = (), p: float = 0.3):
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
        self._rng_device = torch.device("cpu")

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
        imgs = x.reshape(-1, *shape[-3:]).to(work_dtype)
        for op in self.sequence.children():  # see the module docstring: chosen images only
            imgs = apply_gated(op, imgs)
        return imgs.clamp(0.0, 1.0).to(dtype).reshape(shape)

    def extra_repr(self) -> str:
        return f"p={self.p}"
