"""OpenCV kernels for the strong augmentation on the CPU.

The torch kernels of :mod:`hlss.data.augment` make one pass over an image per tensor operation
(a 5-tap separable blur is a dozen passes; a normal draw runs torch's scalar Mersenne
twister). On the CPU, for ``float32`` images, these functions compute the same ops with OpenCV's
vectorised filters, warp and random-number generator instead (single 300-px image, one thread,
this project's 2-core machine: blur 1.2 -> 0.2-0.4 ms, sharpness 0.7-1.9 -> 0.25 ms as one
3 x 3 filter, noise 1.1-1.8 -> 0.7-1.1 ms, the fused geometric warp 0.9 -> 0.6 ms, a flip into
a given tensor 0.19 -> 0.10 ms).

Each function has the signature of the torch kernel it stands in for, ``(op, x, args)`` with
``x`` ``[n, C, H, W]`` ``float32`` on the CPU (:func:`usable` says when), and returns what it
returns up to float rounding (tests compare both with kornia), except the noise: the same
distribution from OpenCV's generator, seeded per image (see :func:`gaussian_noise`). Each also
takes ``out=``, a tensor to write the result into; the input is then left as it was, even by
the kernels that otherwise work in place (noise, sharpness).

OpenCV is imported on first use; :func:`available` is False where it cannot be imported, and the
torch kernels then run.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "available",
    "exact_warp",
    "flip_horizontal",
    "flip_vertical",
    "gaussian_blur",
    "gaussian_noise",
    "one_thread",
    "sharpness",
    "usable",
    "warp_bilinear",
]


@functools.cache
def _cv2() -> Any | None:
    try:
        import cv2
    except ImportError:  # a broken or minimal install: the torch kernels run
        return None
    return cv2


def available() -> bool:
    """Whether OpenCV can be imported here."""
    return _cv2() is not None


@functools.cache
def exact_warp() -> bool:
    """Whether OpenCV's bilinear ``warpAffine`` samples at the exact positions (OpenCV 5; 4.x
    rounds them to 1/32 pixel, up to ~0.015 off on sharp edges, so the torch warp runs there)."""
    cv2 = _cv2()
    try:
        return cv2 is not None and int(cv2.__version__.split(".")[0]) >= 5
    except ValueError:
        return False


def usable(x: torch.Tensor) -> bool:
    """Whether these kernels can compute on ``x``: ``float32`` on the CPU, not requiring a
    gradient (numpy cannot view it), OpenCV importable."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad and available()
    )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """OpenCV's own thread pool set to one thread for the block (the caller shares images out to
    threads already), and put back as it was afterwards. Does nothing without OpenCV."""
    cv2 = _cv2()
    if cv2 is None:
        yield
        return
    before = cv2.getNumThreads()
    if before != 1:
        cv2.setNumThreads(1)
    try:
        yield
    finally:
        if before != 1:
            cv2.setNumThreads(before)


def _planes(x: torch.Tensor) -> np.ndarray:
    """``x`` ``[n, C, H, W]`` as a numpy array sharing its memory (contiguous planes)."""
    return x.contiguous().numpy()


_BORDERS = {"reflect": "BORDER_REFLECT_101", "replicate": "BORDER_REPLICATE"}


def blur_border(op: nn.Module) -> int | None:
    """OpenCV's border code for a kornia blur's ``border_type`` (None: not one it has here)."""
    cv2 = _cv2()
    name = _BORDERS.get(op.flags["border_type"].name.lower())
    return None if cv2 is None or name is None else getattr(cv2, name)


def _output(x: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, np.ndarray]:
    """A result tensor shaped like ``x`` (``out``, which must be a contiguous ``float32`` CPU
    tensor of that shape and not ``x``, or a new one) and its numpy view.

    Raises:
        ValueError: ``out`` is not such a tensor.
    """
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif (
        out.shape != x.shape
        or out.dtype != torch.float32
        or out.device.type != "cpu"
        or not out.is_contiguous()
        or out.data_ptr() == x.data_ptr()
    ):
        raise ValueError(
            f"out must be a contiguous float32 CPU tensor of shape {tuple(x.shape)}, not the "
            f"input; got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out, out.numpy()


def gaussian_blur(
    op: nn.Module, x: torch.Tensor, args: dict, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Separable Gaussian blur with each image's own taps ``args["x"]`` ``[n, kx]`` and
    ``args["y"]`` ``[n, ky]``; ``reflect`` (mirror without repeating the edge) or ``replicate``
    borders, as kornia's. Returns the result in ``out`` (see :func:`_output`) or a new tensor;
    ``x`` is not written."""
    cv2 = _cv2()
    border = blur_border(op)
    src = _planes(x)
    out, dst = _output(x, out)
    taps_x = args["x"].float().numpy()  # parameters come in the batch's dtype
    taps_y = args["y"].float().numpy()
    for i in range(src.shape[0]):
        kx, ky = taps_x[i], taps_y[i]
        for c in range(src.shape[1]):
            cv2.sepFilter2D(src[i, c], -1, kx, ky, dst=dst[i, c], borderType=border)
    return out


def _flip(x: torch.Tensor, out: torch.Tensor | None, code: int) -> torch.Tensor:
    cv2 = _cv2()
    src = _planes(x)
    out, dst = _output(x, out)
    for i in range(src.shape[0]):
        for c in range(src.shape[1]):
            cv2.flip(src[i, c], code, dst=dst[i, c])
    return out


def flip_horizontal(
    op: nn.Module | None, x: torch.Tensor, args: dict, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` mirrored left to right, in ``out`` (see :func:`_output`) or a new tensor; one pass
    (torch's ``flip`` has no ``out``). ``x`` is not written."""
    return _flip(x, out, 1)


def flip_vertical(
    op: nn.Module | None, x: torch.Tensor, args: dict, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` mirrored top to bottom, in ``out`` or a new tensor (as :func:`flip_horizontal`)."""
    return _flip(x, out, 0)


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float64) / 13.0
_CENTRE = np.zeros((3, 3))
_CENTRE[1, 1] = 1.0


def sharpness(
    op: nn.Module, x: torch.Tensor, args: dict, out: torch.Tensor | None = None
) -> torch.Tensor:
    """PIL's sharpness with each image's factor ``args["sharpness"]`` ``[n]``: the interior blended
    with its ``[[1,1,1],[1,5,1],[1,1,1]] / 13`` smoothing, ``smooth + factor * (x - smooth)``;
    border pixels kept. ``x`` is clamped to ``[0, 1]`` first and changed in place, or, with
    ``out`` (see :func:`_output`), clamped into ``out``, which is then changed and returned.

    The blend is linear in the pixels, so it is one 3 x 3 filter per image,
    ``factor * identity + (1 - factor) * smoothing``, applied in place (kornia clamps the
    smoothing to ``[0, 1]`` first, which a weighted mean of ``[0, 1]`` values is already in).

    Raises:
        ValueError: an image smaller than 3 x 3; an unusable ``out``.
    """
    cv2 = _cv2()
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        raise ValueError(f"RandomSharpness needs images of at least 3 x 3; got {tuple(x.shape)}")
    if out is None:
        x = x.contiguous().clamp_(0.0, 1.0)
    else:
        x = torch.clamp(x, 0.0, 1.0, out=_output(x, out)[0])
    src = x.numpy()
    for i, factor in enumerate(args["sharpness"].tolist()):
        weights = (factor * _CENTRE + (1.0 - factor) * _SMOOTH).astype(np.float32)
        image = src[i]
        rows, cols = image[:, [0, -1]], image[:, :, [0, -1]]  # copies: the border is kept
        for plane in image:
            cv2.filter2D(plane, -1, weights, dst=plane, borderType=cv2.BORDER_REPLICATE)
        image[:, [0, -1]], image[:, :, [0, -1]] = rows, cols
    return x.clamp_(0.0, 1.0)


SEED_LIMIT = 2**31 - 1
"""Per-image noise seeds are drawn below this (OpenCV takes a C ``int``)."""


def gaussian_noise(
    op: nn.Module, x: torch.Tensor, args: dict, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Add ``N(op.mean, std^2)`` noise with each image's ``args["std"]`` ``[n]``, drawn by OpenCV's
    generator seeded with the image's ``args["seed"]`` ``[n]`` (in ``[0, SEED_LIMIT)``), so the
    result does not depend on which thread computes which image. ``x`` is changed in place; with
    ``out`` (see :func:`_output`) the noise is drawn into ``out`` and ``x`` added to it.

    The generator is OpenCV's per-thread one (``cv2.setRNGSeed`` then ``cv2.randn``); a caller's
    own OpenCV draws on the same thread continue from the last image's seed."""
    cv2 = _cv2()
    if out is None:
        x = x.contiguous()
        noise = np.empty(x.shape[1:], dtype=np.float32)
        added = torch.from_numpy(noise)
    else:
        out, planes = _output(x, out)
    std, seeds = args["std"].tolist(), args["seed"].tolist()
    for i in range(x.shape[0]):
        drawn = noise if out is None else planes[i]
        cv2.setRNGSeed(int(seeds[i]))
        cv2.randn(drawn.reshape(-1, x.shape[-1]), float(op.mean), float(std[i]))
        if out is None:
            x[i].add_(added)
        else:
            out[i].add_(x[i])
    return x if out is None else out


def warp_bilinear(
    op: nn.Module | None, x: torch.Tensor, args: dict, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Bilinear resampling with zero padding of each image through its map ``args["pixel"]``
    ``[n, 2, 3]`` (float64), which takes an output pixel's coordinates to the input position it
    reads (pixel centres at integers): what ``grid_sample`` gives with aligned corners for the
    same map in ``[-1, 1]`` units, to ~1e-4 with OpenCV 5 (:func:`exact_warp`). Returns the
    result in ``out`` (see :func:`_output`) or a new tensor; ``x`` is not written."""
    cv2 = _cv2()
    src = _planes(x)
    out, dst = _output(x, out)
    size = (int(x.shape[-1]), int(x.shape[-2]))
    maps = args["pixel"].double().numpy()
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for i in range(src.shape[0]):
        for c in range(src.shape[1]):
            cv2.warpAffine(
                src[i, c],
                maps[i],
                size,
                dst=dst[i, c],
                flags=flags,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0.0,
            )
    return out
