"""Base (deterministic) transforms that turn a raw patch into a float image tensor.

Raw patches come from :mod:`hlss.data.io`:

* SRH: ``numpy`` array ``(2, H, W)`` of ``uint16``; channel 0 = CH2 (2845 cm^-1),
  channel 1 = CH3 (2930 cm^-1).
* H&E: ``numpy`` array ``(3, H, W)`` of ``uint8`` (RGB).

Both base transforms return a ``float32`` tensor ``(3, H, W)`` with values in ``[0, 1]``. The
random (strong) augmentation is applied later, batched and on the training device, by
:class:`hlss.data.augment.BatchAugment`; evaluation uses the base transform only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hlss.errors import ConfigError, DataError

__all__ = [
    "MODALITIES",
    "BaseTransform",
    "he_base",
    "srh_base",
    "standardize_intensity",
    "standardize_intensity_",
]

SRH_SCALE = 65536.0
SRH_OFFSET = 5000.0 / SRH_SCALE
HE_SCALE = 255.0


def _as_numpy(raw: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(raw, torch.Tensor):
        return raw.detach().cpu().numpy()
    return np.asarray(raw)


def _check_raw(arr: np.ndarray, channels: int, dtype: np.dtype, what: str) -> None:
    if arr.ndim != 3 or arr.shape[0] != channels or arr.dtype != dtype:
        raise DataError(
            f"{what} patch must be {dtype.name} with shape ({channels}, H, W); "
            f"got {arr.dtype.name} with shape {tuple(arr.shape)}"
        )


def _output_array(out: torch.Tensor | None, shape: tuple[int, ...]) -> np.ndarray:
    """``out`` as a numpy array to write into (it must be a contiguous float32 CPU tensor of
    ``shape``), or a new array."""
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous float32 tensor of shape {shape}; "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    return out.numpy()


def srh_base(raw: np.ndarray | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Map a raw SRH patch to a 3-channel float image.

    Args:
        raw: ``uint16`` array ``(2, H, W)``; channel 0 = CH2, channel 1 = CH3.
        out: optional contiguous ``float32`` CPU tensor ``(3, H, W)`` to write the image into
            (and return); ``ValueError`` if it is not one.

    Returns:
        ``float32`` tensor ``(3, H, W)``: ``[CH3 - CH2 + 5000/65536, CH2, CH3]`` after dividing
        the raw counts by 65536, clamped to ``[0, 1]``. The difference is taken in float32, so
        ``CH3 < CH2`` gives a negative value (then clamped to 0), never a uint16 wraparound.

    Raises:
        DataError: ``raw`` is not ``uint16`` with shape ``(2, H, W)``.
    """
    arr = _as_numpy(raw)
    _check_raw(arr, 2, np.dtype(np.uint16), "SRH")
    # numpy, single-threaded, one output buffer: CH2 and CH3 scaled straight into channels 1-2
    # (uint16 -> float32 and the division by 2^16 are exact; both stay in [0, 1)), then
    # channel 0 from them; only channel 0 can leave [0, 1]. Same values as the plain formula.
    dst = _output_array(out, (3, *arr.shape[1:]))
    np.multiply(arr, np.float32(1.0 / SRH_SCALE), out=dst[1:], dtype=np.float32)
    diff = dst[0]
    np.subtract(dst[2], dst[1], out=diff)
    diff += np.float32(SRH_OFFSET)
    torch.from_numpy(diff).clamp_(0.0, 1.0)  # in place; a third of np.clip's time here
    return torch.from_numpy(dst) if out is None else out


def he_base(raw: np.ndarray | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Map a raw 8-bit H&E patch to a float image.

    Args:
        raw: ``uint8`` array ``(3, H, W)`` (RGB).
        out: optional contiguous ``float32`` CPU tensor ``(3, H, W)`` to write into (and return).

    Returns:
        ``float32`` tensor ``(3, H, W)`` equal to ``raw / 255`` (values in ``[0, 1]``).

    Raises:
        DataError: ``raw`` is not ``uint8`` with shape ``(3, H, W)``.
    """
    arr = _as_numpy(raw)
    _check_raw(arr, 3, np.dtype(np.uint8), "H&E")
    dst = _output_array(out, arr.shape)
    np.divide(arr, np.float32(HE_SCALE), out=dst, dtype=np.float32)  # float32 division
    return torch.from_numpy(dst) if out is None else out


MODALITIES = {"srh": srh_base, "he": he_base}


def _center_crop_or_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop ``x`` ``(C, H, W)`` to ``(C, size, size)``.

    If a side is shorter than ``size``, the image is first resized (bilinear, aspect ratio kept)
    so that its shorter side equals ``size``; then the centre crop is taken.
    """
    _, h, w = x.shape
    if min(h, w) < size:
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        x = x.clamp_(0.0, 1.0)
        _, h, w = x.shape
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top : top + size, left : left + size].contiguous()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the whole of ``x`` ``(C, H, W)`` to ``(C, size, size)`` (bicubic, antialiased)."""
    if x.shape[-2:] == (size, size):
        return x
    out = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True)[0]
    return out.clamp_(0.0, 1.0)


def standardize_intensity(x: torch.Tensor, low: float = 0.01, high: float = 0.99) -> torch.Tensor:
    """Stretch each channel of ``x`` ``(C, H, W)`` from its ``low``..``high`` quantiles to [0, 1].

    A per-image gain, offset or channel balance (laser power, detector gain, background level:
    what differs between acquisitions) maps onto the same output, so a model cannot tell
    acquisitions apart by brightness; the price is that absolute intensities and the balance of
    the channels are no longer seen. A constant channel becomes 0.
    """
    return standardize_intensity_(x.clone(), low, high)


def standardize_intensity_(x: torch.Tensor, low: float = 0.01, high: float = 0.99) -> torch.Tensor:
    """:func:`standardize_intensity` in place (the same values); returns ``x``."""
    flat = x.reshape(x.shape[0], -1)
    q = torch.quantile(flat, torch.tensor([low, high], dtype=x.dtype), dim=1)  # [2, C]
    lo, span = q[0][:, None, None], (q[1] - q[0])[:, None, None]
    x.sub_(lo).div_(span.clamp_min(1e-6))
    x[(span <= 1e-6).flatten()] = 0.0  # a constant channel
    return x.clamp_(0.0, 1.0)


class BaseTransform:
    """Deterministic per-patch transform: modality base function, then optional crop or resize.

    Plain picklable object (safe to send to DataLoader worker processes).

    Args:
        modality: ``"srh"`` (uses :func:`srh_base`) or ``"he"`` (uses :func:`he_base`).
        size: if given, the output is ``size x size``: centre-cropped, where an image with a
            side shorter than ``size`` is resized up first (shorter side = ``size``).
        resize: with ``size``, resize the whole patch to ``size x size`` instead of cropping
            (bicubic, antialiased; the HLSS paper fed 300-px OpenSRH patches to CLIP's RN50
            this way at 224 px).
        standardize: stretch each channel of each patch from its 1st to its 99th percentile to
            ``[0, 1]`` (:func:`standardize_intensity`), removing per-acquisition gain, offset and
            channel balance. Not part of the papers' base transform: an idea of this project.

    Call:
        ``transform(raw) -> torch.Tensor`` of shape ``(3, H, W)`` or ``(3, size, size)``,
        ``float32`` in ``[0, 1]``.

    Raises:
        ConfigError: unknown ``modality`` or ``size`` that is not a positive integer
            (at construction).
        DataError: a raw patch with the wrong dtype/shape for the modality (at call time).
    """

    def __init__(
        self,
        modality: str = "srh",
        size: int | None = None,
        resize: bool = False,
        standardize: bool = False,
    ):
        if modality not in MODALITIES:
            raise ConfigError(
                f"unknown modality {modality!r}; expected one of {sorted(MODALITIES)}"
            )
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(
                f"base transform size must be a positive integer or null; got {size!r}"
            )
        self.modality = modality
        self.size = size
        self.resize = bool(resize)
        self.standardize = bool(standardize)

    def __call__(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = MODALITIES[self.modality](raw)
        if self.standardize:
            x = standardize_intensity(x)
        if self.size is not None:
            x = _resize(x, self.size) if self.resize else _center_crop_or_resize(x, self.size)
        return x

    def output_shape(self, raw: np.ndarray | torch.Tensor) -> tuple[int, int, int]:
        """The shape of ``self(raw)`` for a channel-first raw patch, without computing it."""
        if self.size is not None:
            return (3, self.size, self.size)
        return (3, int(raw.shape[-2]), int(raw.shape[-1]))

    def into(self, raw: np.ndarray | torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``self(raw)`` written into ``out`` (a contiguous ``float32`` CPU tensor of
        :meth:`output_shape`), which is returned: the same values. Where no crop or resize is
        needed the image is made in ``out`` itself (a data loader then copies each patch once).

        Raises:
            DataError: as a call; ValueError: ``out`` of another shape or dtype.
        """
        if self.size is None or tuple(raw.shape[-2:]) == (self.size, self.size):
            MODALITIES[self.modality](raw, out=out)
            return standardize_intensity_(out) if self.standardize else out
        image = self(raw)
        _output_array(out, tuple(image.shape))  # checks out
        return out.copy_(image)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(modality={self.modality!r}, size={self.size!r}, "
            f"resize={self.resize!r}, standardize={self.standardize!r})"
        )
