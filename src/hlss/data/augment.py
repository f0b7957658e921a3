"""Batched random ("strong") augmentation, applied on the training device.

:class:`BatchAugment` applies HiDisc's strong augmentation list to a whole batch of images at
once, drawing the random decision (apply or not) and the random parameters independently for every
image. It works on any device (CPU or GPU) because every op is a tensor op (kornia or plain torch).

Ops and the classes that implement them (each kornia op is built with ``p=1`` and gated by
:class:`BatchAugment` itself, so the configured probability is always the one used):

================  ===============================================  ==========================
name              implementation                                   parameters (defaults)
================  ===============================================  ==========================
hflip             ``kornia.augmentation.RandomHorizontalFlip``     --
vflip             ``kornia.augmentation.RandomVerticalFlip``       --
gaussian_noise    hand-written (per-sample std)                    std=[0.01, 0.05], mean=0
color_jitter      ``kornia.augmentation.ColorJitter``              brightness=0.2, contrast=0.2,
                                                                   saturation=0.2, hue=0.1
autocontrast      ``kornia.augmentation.RandomAutoContrast``       --
solarize          ``kornia.augmentation.RandomSolarize``           threshold=0.2
sharpness         ``kornia.augmentation.RandomSharpness``          factor=10
gaussian_blur     ``kornia.augmentation.RandomGaussianBlur``       kernel_size=5, sigma=[0.1, 2]
affine            ``kornia.augmentation.RandomAffine``             degrees=10, translate=[0.1, 0.1]
resized_crop      ``kornia.augmentation.RandomResizedCrop``        scale=[0.3, 1], ratio=[0.75, 1.333]
erasing           ``kornia.augmentation.RandomErasing``            scale=[0.02, 0.33], ratio=[0.3, 3.3]
================  ===============================================  ==========================

Randomness comes from torch's global generators (the CPU generator for CPU tensors, the CUDA
generator of the input's device for CUDA tensors, as kornia does); seed with
``torch.manual_seed`` for reproducible draws.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import kornia.augmentation as K
import torch
from torch import nn

from hlss.errors import ConfigError

__all__ = ["OP_NAMES", "BatchAugment"]


def _pair(value: Any, what: str) -> tuple[float, float]:
    """``x`` -> ``(x, x)``; ``[a, b]`` -> ``(a, b)`` (lists arrive from YAML)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value), float(value))
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        lo, hi = float(value[0]), float(value[1])
        if lo > hi:
            raise ValueError(f"{what} range [{lo}, {hi}] has min > max")
        return (lo, hi)
    raise ValueError(f"{what} must be a number or a [min, max] pair; got {value!r}")


def _jitter_range(value: Any, what: str, centre: float) -> tuple[float, float]:
    """ColorJitter convention: scalar ``x`` -> ``(centre - x, centre + x)``; pair kept."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{what} must be >= 0; got {value}")
        return (centre - float(value), centre + float(value))
    return _pair(value, what)


class _GaussianNoise(nn.Module):
    """Add ``N(mean, std^2)`` noise, ``std ~ U(std_lo, std_hi)`` drawn per image.

    Input/output: float ``(B, C, H, W)``; output is not clamped here (BatchAugment clamps).
    """

    def __init__(self, std: tuple[float, float], mean: float):
        super().__init__()
        if std[0] < 0:
            raise ValueError(f"std must be >= 0; got {list(std)}")
        self.std = std
        self.mean = mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.std
        std = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) * (hi - lo) + lo
        return x + (torch.randn_like(x) * std + self.mean)

    def extra_repr(self) -> str:
        return f"std={list(self.std)}, mean={self.mean}"


class _ResizedCrop(nn.Module):
    """Random crop (area ``scale``, aspect ``ratio``) resized back to the input's own H x W.

    Wraps ``kornia.augmentation.RandomResizedCrop``, which needs the output size at construction;
    one kornia module is built (and cached) per input size seen.
    """

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float]):
        super().__init__()
        self.scale = scale
        self.ratio = ratio
        self._by_size: dict[tuple[int, int], nn.Module] = {}
        self._make((8, 8))  # validate the parameters now, not at the first training step

    def _make(self, size: tuple[int, int]) -> nn.Module:
        return K.RandomResizedCrop(size=size, scale=self.scale, ratio=self.ratio, p=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        op = self._by_size.get(size)
        if op is None:
            op = self._by_size[size] = self._make(size)
        return op(x)

    def extra_repr(self) -> str:
        return f"scale={list(self.scale)}, ratio={list(self.ratio)}"


# --- builders: one per op name; their keyword arguments are the op's accepted parameters -------


def _hflip() -> nn.Module:
    return K.RandomHorizontalFlip(p=1.0)


def _vflip() -> nn.Module:
    return K.RandomVerticalFlip(p=1.0)


def _gaussian_noise(std: Any = (0.01, 0.05), mean: float = 0.0) -> nn.Module:
    return _GaussianNoise(_pair(std, "std"), float(mean))


def _color_jitter(
    brightness: Any = 0.2, contrast: Any = 0.2, saturation: Any = 0.2, hue: Any = 0.1
) -> nn.Module:
    return K.ColorJitter(
        brightness=_jitter_range(brightness, "brightness", 1.0),
        contrast=_jitter_range(contrast, "contrast", 1.0),
        saturation=_jitter_range(saturation, "saturation", 1.0),
        hue=_jitter_range(hue, "hue", 0.0),
        p=1.0,
    )


def _autocontrast() -> nn.Module:
    return K.RandomAutoContrast(p=1.0)


def _solarize(threshold: Any = 0.2) -> nn.Module:
    # torchvision semantics: pixels >= threshold become 1 - pixel; no additive shift.
    return K.RandomSolarize(thresholds=_pair(threshold, "threshold"), additions=(0.0, 0.0), p=1.0)


def _sharpness(factor: Any = 10.0) -> nn.Module:
    # torchvision/PIL semantics: 1 = identity, 0 = 3x3-smoothed, > 1 sharpens. A scalar is a fixed
    # factor (NOT kornia's "[0, x]" range), a pair is a range drawn per image.
    return K.RandomSharpness(sharpness=_pair(factor, "factor"), p=1.0)


def _gaussian_blur(kernel_size: int = 5, sigma: Any = (0.1, 2.0)) -> nn.Module:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd integer; got {kernel_size!r}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd; got {kernel_size}")
    return K.RandomGaussianBlur(
        kernel_size=(kernel_size, kernel_size), sigma=_pair(sigma, "sigma"), p=1.0
    )


def _affine(
    degrees: float = 10.0,
    translate: Any = (0.1, 0.1),
    scale: Any = None,
    shear: Any = None,
    padding_mode: str = "zeros",
) -> nn.Module:
    return K.RandomAffine(
        degrees=float(degrees),
        translate=None if translate is None else _pair(translate, "translate"),
        scale=None if scale is None else _pair(scale, "scale"),
        shear=None if shear is None else _jitter_range(shear, "shear", 0.0),
        padding_mode=padding_mode,
        p=1.0,
    )


def _resized_crop(scale: Any = (0.3, 1.0), ratio: Any = (0.75, 4.0 / 3.0)) -> nn.Module:
    return _ResizedCrop(_pair(scale, "scale"), _pair(ratio, "ratio"))


def _erasing(scale: Any = (0.02, 0.33), ratio: Any = (0.3, 3.3), value: float = 0.0) -> nn.Module:
    return K.RandomErasing(
        scale=_pair(scale, "scale"), ratio=_pair(ratio, "ratio"), value=float(value), p=1.0
    )


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "hflip": _hflip,
    "vflip": _vflip,
    "gaussian_noise": _gaussian_noise,
    "color_jitter": _color_jitter,
    "autocontrast": _autocontrast,
    "solarize": _solarize,
    "sharpness": _sharpness,
    "gaussian_blur": _gaussian_blur,
    "affine": _affine,
    "resized_crop": _resized_crop,
    "erasing": _erasing,
}

#: The op names :class:`BatchAugment` understands (HiDisc's strong augmentation list).
OP_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def _check_prob(p: Any, where: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ConfigError(f"{where}: probability p must be a number in [0, 1]; got {p!r}")
    return float(p)


def _to_plain(obj: Any) -> Any:
    """OmegaConf containers (from Hydra) -> plain Python lists/dicts; others unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return obj
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


class _Gated(nn.Module):
    """Apply ``op`` to a random subset of the batch: each image independently with probability p.

    ``p == 0`` returns the input untouched; ``p == 1`` applies ``op`` to every image. Only the
    selected images are passed through ``op`` (the others are not computed), and their results are
    written back INTO ``x`` in place (no batch-sized copy per op): callers pass a tensor they own.
    """

    def __init__(self, name: str, op: nn.Module, p: float):
        super().__init__()
        self.name = name
        self.op = op
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p <= 0.0 or x.shape[0] == 0:
            return x
        if self.p >= 1.0:
            return self.op(x)
        idx = torch.nonzero(torch.rand(x.shape[0], device=x.device) < self.p).squeeze(1)
        if idx.numel() == 0:
            return x
        x[idx] = self.op(x[idx]).to(x.dtype)
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}, p={self.p}"


def _build_op(index: int, spec: Any, default_p: float) -> _Gated:
    if isinstance(spec, str):
        name, params, p = spec, {}, default_p
    elif isinstance(spec, Mapping):
        params = dict(spec)
        if "name" not in params:
            raise ConfigError(f"augment op #{index} has no 'name' key: {spec!r}")
        name = params.pop("name")
        p = _check_prob(params.pop("p"), f"augment op {name!r}") if "p" in params else default_p
    else:
        raise ConfigError(
            f"augment op #{index} must be a name or a mapping with 'name'; got {spec!r}"
        )
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ConfigError(f"unknown augment op {name!r}; expected one of {list(OP_NAMES)}")
    accepted = list(inspect.signature(builder).parameters)
    unknown = [key for key in params if key not in accepted]
    if unknown:
        raise ConfigError(
            f"augment op {name!r}: unknown parameter {unknown[0]!r}; accepted: {accepted or 'none'}"
        )
    try:
        op = builder(**params)
    except (ValueError, TypeError, AssertionError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"augment op {name!r}: invalid parameters {params} ({first})") from None
    return _Gated(name, op, p)


class BatchAugment(nn.Module):
    """Random strong augmentation of image batches, per-image random decisions and parameters.

    Args:
        ops: the ops, applied in order. Each is an op name (see :data:`OP_NAMES`) or a mapping
            ``{"name": ..., "p": <optional override>, **params}``; see the module docstring for
            each op's parameters. OmegaConf ``ListConfig``/``DictConfig`` are accepted (Hydra).
            An empty list gives the identity (plus clamping to ``[0, 1]``).
        p: default probability with which each op is applied to each image, independently.

    Raises:
        ConfigError: unknown op name, unknown parameter, invalid parameter value, or a
            probability outside ``[0, 1]`` (one line naming the op).

    Forward:
        ``x``: floating tensor ``[..., C, H, W]`` with values in ``[0, 1]`` (e.g. a hierarchy
        batch ``[P, S, N, T, C, H, W]``). All leading dimensions are flattened into one batch,
        every image is augmented independently, and the shape is restored. Returns a new tensor
        of the same shape, dtype and device, clamped to ``[0, 1]``; runs under ``torch.no_grad``.
        ``color_jitter`` (saturation/hue) needs ``C == 3``.

        Raises ``ValueError`` when ``x`` has fewer than 3 dimensions or is not floating point.
    """

    def __init__(self, ops: Sequence[str | Mapping[str, Any]] | None = (), p: float = 0.3):
        super().__init__()
        self.p = _check_prob(_to_plain(p), "augment")
        ops = _to_plain(ops)
        if ops is None:
            ops = []
        if isinstance(ops, (str, Mapping)) or not isinstance(ops, Sequence):
            raise ConfigError(f"augment ops must be a list of op specs; got {ops!r}")
        self.ops = nn.ModuleList(_build_op(i, spec, self.p) for i, spec in enumerate(ops))

    @property
    def op_names(self) -> list[str]:
        """Names of the configured ops, in application order."""
        return [op.name for op in self.ops]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:
            raise ValueError(f"BatchAugment expects [..., C, H, W]; got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise ValueError(f"BatchAugment expects a floating-point tensor; got {x.dtype}")
        shape, dtype = x.shape, x.dtype
        work_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        # a private copy: the gated ops write their results into it in place
        imgs = x.reshape(-1, *shape[-3:]).to(work_dtype, copy=True)
        for op in self.ops:
            imgs = op(imgs)
        return imgs.clamp_(0.0, 1.0).to(dtype).reshape(shape)

    def extra_repr(self) -> str:
        return f"p={self.p}"
