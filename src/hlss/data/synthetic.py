"""Synthetic datasets in the exact OpenSRH layout, for tests, demos and CPU smoke runs.

:func:`generate_opensrh` writes::

    OUT/meta/opensrh.json          {patient: {"class": c, "slides": {slide: {"tumor_patches": [...],
                                    "normal_patches": [...], "nondiagnostic_patches": [...]}}}}
    OUT/meta/train_val_split.json  {"train": [patient ids], "val": [patient ids]}
    OUT/studies/<patient>/<slide>/patches/<patient>-<slide>-<ix>_<jx>_<iy>_<jy>.tif

(the names come from :mod:`hlss.data.opensrh`, where the layout is defined). Every patch is a channel-first ``(2, size, size)`` uint16 TIFF (channel 0 = CH2 at 2845 cm^-1,
channel 1 = CH3 at 2930 cm^-1), so the real reader :func:`hlss.data.opensrh.read_opensrh` indexes it.

What the images contain (a cartoon of SRH, not a physical simulation):

* background: smooth low-frequency tissue signal plus a fine neuropil-like texture;
* nuclei: soft ellipses, dark in CH2 and relatively bright in CH3, so ``CH3 - CH2`` highlights them;
  a protein-rich cytoplasm halo around them raises CH3;
* fibres/axons: thin bright curved lines, lipid rich (strong in CH2);
* lipid droplets: small very bright round spots in both channels.

The classes differ in nuclear density, size, pleomorphism, shape and orientation order
(random, fascicles, whorls, clusters, a monotonous sheet), fibre amount and droplet amount
(see :data:`CLASS_LOOKS`). Nuisance factors at the patient level (intensity gain, channel balance,
background offset, composition multipliers) and at the slide level (smaller gain/offset, noise,
blur) make the patient -> slide -> patch hierarchy matter; the patient gain is of the same order
as the class differences in mean intensity, so the mean alone does not give the class away.

Every patient, slide and patch draws from its own :class:`numpy.random.SeedSequence` keyed by its
position, so the output is byte-identical for a seed whatever the order of work.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from hlss import CLASSES_OPENSRH
from hlss.atomic import publish_dir, temp_dir_beside
from hlss.data.opensrh import (
    META_DIR,
    META_NAME,
    NONDIAGNOSTIC_PATCHES,
    SPLIT_NAME,
    diagnostic_key,
    empty_patch_lists,
    patch_dir,
    patch_path,
)
from hlss.errors import HLSSError
from hlss.paths import cache_root
from hlss.progress import Progress

GENERATOR_VERSION = 1
"""Bumped whenever the output for given parameters changes (it is part of the cache key)."""

REF_SIZE = 300
"""Patch size the class parameters are written for; other sizes rescale lengths and counts."""

CACHE_PREFIX = "opensrh-synthetic-"

# Seed-sequence key tags: each kind of object has its own stream, independent of work order.
_KEY_LAYOUT, _KEY_PATIENT, _KEY_SLIDE, _KEY_PATCH = 0, 1, 2, 3


@dataclass(frozen=True)
class ClassLook:
    """Appearance parameters of one class, for a ``REF_SIZE`` patch.

    Lengths are in reference pixels, counts per reference field. ``order`` is one of
    ``random`` (uniform, random orientation), ``aligned`` (fascicles: a shared wavy direction),
    ``whorl`` (nuclei wrapped around a few centres), ``clustered`` (nests of cells in otherwise
    sparse tissue) or ``sheet`` (a jittered grid: dense and monotonous).
    """

    density: float  # nuclei per field
    radius: float  # mean semi-minor axis of a nucleus
    radius_cv: float  # pleomorphism: coefficient of variation of the radius
    aspect: float  # mean major/minor axis ratio
    aspect_sd: float
    order: str
    coherence: float  # orientation noise (radians, sd) around the ordered direction
    fibres: float  # fibres per field
    fibres_aligned: bool
    droplets: float  # lipid droplets per field
    cytoplasm: float  # strength of the protein-rich halo around nuclei
    lipid: float  # lipid share of the background (raises CH2)
    nuclear_contrast: float  # how much darker nuclei are in CH2 (0..1)


CLASS_LOOKS: dict[str, ClassLook] = {
    # high-grade glioma: dense, large, pleomorphic, hyperchromatic nuclei, few fibres
    "hgg": ClassLook(170, 5.5, 0.35, 1.45, 0.35, "random", 3.0, 8, False, 3, 0.6, 0.3, 0.65),
    # low-grade glioma: moderate density of modest nuclei infiltrating fibre-rich tissue
    "lgg": ClassLook(75, 4.3, 0.15, 1.3, 0.2, "random", 3.0, 35, False, 6, 0.3, 0.7, 0.55),
    # meningioma: elongated nuclei wrapped in whorls, syncytial cytoplasm, few fibres
    "mening": ClassLook(140, 3.8, 0.12, 2.3, 0.4, "whorl", 0.25, 4, False, 1, 1.0, 0.2, 0.55),
    # metastasis: nests of large round nuclei with abundant cytoplasm in sparse stroma
    "metast": ClassLook(115, 6.5, 0.2, 1.2, 0.15, "clustered", 3.0, 4, False, 2, 1.2, 0.25, 0.6),
    # normal brain: sparse small nuclei, many axons and lipid droplets (myelin)
    "normal": ClassLook(25, 3.8, 0.12, 1.15, 0.1, "random", 3.0, 70, False, 25, 0.2, 1.0, 0.5),
    # pituitary adenoma: a dense monotonous sheet of small round nuclei
    "pituita": ClassLook(280, 3.6, 0.07, 1.05, 0.05, "sheet", 3.0, 2, False, 2, 1.3, 0.3, 0.55),
    # schwannoma: spindle nuclei in fascicles with aligned wavy fibres
    "schwan": ClassLook(110, 3.0, 0.15, 3.3, 0.6, "aligned", 0.2, 16, True, 1, 0.5, 0.3, 0.55),
}

# intensity model (uint16 units, before nuisance)
_BG2, _BG2_LIPID, _BG3, _BG3_LIPID = 8000.0, 6000.0, 11000.0, 4000.0
_CYTO2, _CYTO3 = 3000.0, 6000.0
_FIBRE2, _FIBRE3 = 12000.0, 7000.0
_DROP2, _DROP3 = 22000.0, 18000.0
_NUC3_ADD, _NUC3_DIM = 5000.0, 0.1


# ----------------------------------------------------------------------------------------------
# parameters


def _check_params(
    seed: int,
    patients_per_class: int,
    slides_per_patient: int,
    patches_per_slide: int,
    nondiagnostic_per_slide: int,
    size: int,
    val_fraction: float,
    nuisance: float = 1.0,
) -> None:
    """Raise :class:`HLSSError` naming the first parameter that cannot work."""

    def integer(name: str, value: object, low: int, high: int | None = None) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise HLSSError(f"{name} must be an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise HLSSError(f"{name} must be {bound}, got {value}")

    integer("seed", seed, 0)
    integer("patients_per_class", patients_per_class, 2)
    integer("slides_per_patient", slides_per_patient, 1, 1000)
    integer("patches_per_slide", patches_per_slide, 1)
    integer("nondiagnostic_per_slide", nondiagnostic_per_slide, 0)
    integer("size", size, 16, 4096)
    if patients_per_class > 900 // len(CLASSES_OPENSRH):
        raise HLSSError(f"patients_per_class must be <= {900 // len(CLASSES_OPENSRH)}")
    if patches_per_slide + nondiagnostic_per_slide > 9 * 100:
        raise HLSSError("patches_per_slide + nondiagnostic_per_slide must be <= 900")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < float(val_fraction) < 1.0:
        raise HLSSError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if (
        isinstance(nuisance, bool)
        or not isinstance(nuisance, (int, float))
        or not 0.0 <= float(nuisance) <= 10.0
    ):
        raise HLSSError(f"nuisance must be a number in [0, 10], got {nuisance!r}")


def _rng(seed: int, *key: int) -> np.random.Generator:
    """A generator for one object, keyed by its position (independent of generation order)."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=key))


def _val_count(patients_per_class: int, val_fraction: float) -> int:
    """Validation patients per class: ``max(1, round(f * n))``, leaving at least one in train."""
    return min(patients_per_class - 1, max(1, round(val_fraction * patients_per_class)))


# ----------------------------------------------------------------------------------------------
# rendering primitives (all vectorised; images are float32 [H, W])


def _stamp_ellipses(
    size: int,
    cy: np.ndarray,
    cx: np.ndarray,
    semi_major: np.ndarray,
    semi_minor: np.ndarray,
    theta: np.ndarray,
    amp: np.ndarray,
    soft: float,
) -> np.ndarray:
    """Sum of soft-edged filled ellipses on a ``(size, size)`` canvas.

    All inputs are 1-D arrays of one length ``n`` (centre row/column in pixels, semi-axes in pixels,
    orientation in radians, peak amplitude); ``soft`` is the edge width in pixels. Each ellipse is
    evaluated on a small window around its centre and accumulated with :func:`numpy.bincount`.
    """
    out = np.zeros(size * size, dtype=np.float64)
    if cy.size == 0:
        return out.reshape(size, size).astype(np.float32)
    half = math.ceil(float(semi_major.max()) + 3.0 * soft) + 1
    off = np.arange(-half, half + 1, dtype=np.float32)
    iy = np.floor(cy).astype(np.int64)
    ix = np.floor(cx).astype(np.int64)
    dy = off[None, :, None] - (cy - iy).astype(np.float32)[:, None, None]  # [n, W, 1]
    dx = off[None, None, :] - (cx - ix).astype(np.float32)[:, None, None]  # [n, 1, W]
    cos = np.cos(theta).astype(np.float32)[:, None, None]
    sin = np.sin(theta).astype(np.float32)[:, None, None]
    u = (dx * cos + dy * sin) / semi_major.astype(np.float32)[:, None, None]
    v = (dy * cos - dx * sin) / semi_minor.astype(np.float32)[:, None, None]
    # approximate signed distance to the boundary in pixels: (r - 1) * semi-minor
    dist = (np.sqrt(u * u + v * v) - 1.0) * semi_minor.astype(np.float32)[:, None, None]
    val = amp.astype(np.float32)[:, None, None] / (1.0 + np.exp(np.clip(dist / soft, -30, 30)))
    rows = iy[:, None, None] + off.astype(np.int64)[None, :, None]
    cols = ix[:, None, None] + off.astype(np.int64)[None, None, :]
    rows, cols = np.broadcast_arrays(rows, cols)
    keep = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size) & (val > 1e-3)
    flat = rows[keep] * size + cols[keep]
    out += np.bincount(flat, weights=val[keep], minlength=size * size)
    return out.reshape(size, size).astype(np.float32)


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random ``(size, size)`` float32 field of unit spread, about ``cells`` bumps a side.

    A ``(cells + 2)^2`` grid of normal values is interpolated with separable Gaussian weights
    (two tiny products, much cheaper than spline zooming).
    """
    coarse = rng.standard_normal((cells + 2, cells + 2)).astype(np.float32)
    pos = (np.arange(size, dtype=np.float32) + 0.5) / size * cells + 0.5  # in grid units
    knots = np.arange(cells + 2, dtype=np.float32)
    weights = np.exp(-0.5 * ((pos[:, None] - knots[None, :]) / 0.7) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    # einsum without BLAS: tiny products, and BLAS thread start-up would dominate them
    rows = np.einsum("ij,jk->ik", weights, coarse)
    field = np.einsum("ik,lk->il", rows, weights)
    return field / (float(field.std()) + 1e-6)


def _fibres(
    rng: np.random.Generator, size: int, count: int, scale: float, direction: float | None
) -> np.ndarray:
    """Thin curved bright lines, peak about 1, as a ``(size, size)`` float32 map.

    Each fibre is a random walk with persistent heading (``direction`` fixes the mean heading,
    else it is random per fibre), deposited point by point and blurred to a line.
    """
    if count <= 0:
        return np.zeros((size, size), dtype=np.float32)
    step = 0.7
    steps = max(8, int(1.2 * size / step))
    start = rng.uniform(-0.1 * size, 1.1 * size, size=(count, 2))
    if direction is None:
        heading = rng.uniform(0, 2 * np.pi, size=count)
        curl = 0.05
    else:
        heading = direction + rng.normal(0, 0.15, size=count)
        curl = 0.03
    turn = np.cumsum(rng.normal(0, curl / math.sqrt(scale), size=(count, steps)), axis=1)
    angle = heading[:, None] + turn
    length = rng.uniform(0.3, 1.0, size=count) * steps
    ys = start[:, :1] - 0.5 * length[:, None] * step * np.sin(heading)[:, None]
    xs = start[:, 1:] - 0.5 * length[:, None] * step * np.cos(heading)[:, None]
    ys = ys + np.cumsum(step * np.sin(angle), axis=1)
    xs = xs + np.cumsum(step * np.cos(angle), axis=1)
    weight = np.broadcast_to(rng.uniform(0.25, 1.0, size=(count, 1)), ys.shape)
    live = np.arange(steps)[None, :] < length[:, None]
    r = np.rint(ys).astype(np.int64)
    c = np.rint(xs).astype(np.int64)
    keep = live & (r >= 0) & (r < size) & (c >= 0) & (c < size)
    acc = np.bincount(r[keep] * size + c[keep], weights=weight[keep], minlength=size * size)
    sigma = 0.8 * max(scale, 0.6)
    acc = ndimage.gaussian_filter(acc.reshape(size, size).astype(np.float32), sigma)
    # a line of unit points every `step` px blurred by sigma peaks at 1 / (step * sqrt(2 pi) sigma)
    return acc * (step * math.sqrt(2 * math.pi) * sigma)


def _nuclei_layout(
    rng: np.random.Generator, look: ClassLook, count: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (row, col) and orientations of ``count`` nuclei following ``look.order``."""
    margin = 0.05 * size
    if look.order == "sheet":
        side = max(1, math.ceil(math.sqrt(count)))
        spacing = (size + 2 * margin) / side
        grid = (np.arange(side) + 0.5) * spacing - margin
        gy, gx = np.meshgrid(grid, grid, indexing="ij")
        cy = gy.ravel() + rng.normal(0, 0.28 * spacing, side * side)
        cx = gx.ravel() + rng.normal(0, 0.28 * spacing, side * side)
        pick = rng.permutation(side * side)[:count]
        cy, cx = cy[pick], cx[pick]
        theta = rng.uniform(0, np.pi, count)
    elif look.order == "clustered":
        nests = int(rng.integers(2, 5))
        centres = rng.uniform(0.1 * size, 0.9 * size, size=(nests, 2))
        which = rng.integers(0, nests, count)
        spread = rng.uniform(0.07, 0.13) * size
        inside = rng.random(count) < 0.85
        cy = np.where(
            inside, centres[which, 0] + rng.normal(0, spread, count), rng.uniform(0, size, count)
        )
        cx = np.where(
            inside, centres[which, 1] + rng.normal(0, spread, count), rng.uniform(0, size, count)
        )
        theta = rng.uniform(0, np.pi, count)
    elif look.order == "whorl":
        whorls = int(rng.integers(1, 4))
        centres = rng.uniform(0.0, size, size=(whorls, 2))
        cy = rng.uniform(-margin, size + margin, count)
        cx = rng.uniform(-margin, size + margin, count)
        d2 = (cy[:, None] - centres[None, :, 0]) ** 2 + (cx[:, None] - centres[None, :, 1]) ** 2
        near = np.argmin(d2, axis=1)
        theta = np.arctan2(cy - centres[near, 0], cx - centres[near, 1]) + np.pi / 2
        theta = theta + rng.normal(0, look.coherence, count)
    elif look.order == "aligned":
        cy = rng.uniform(-margin, size + margin, count)
        cx = rng.uniform(-margin, size + margin, count)
        base = rng.uniform(0, np.pi)
        wave = rng.uniform(0.3, 0.6) * np.sin(
            2 * np.pi * (cx * np.cos(base) - cy * np.sin(base)) / size * rng.uniform(0.7, 1.5)
            + rng.uniform(0, 2 * np.pi)
        )
        theta = -base + wave + rng.normal(0, look.coherence, count)
    else:
        cy = rng.uniform(-margin, size + margin, count)
        cx = rng.uniform(-margin, size + margin, count)
        theta = rng.uniform(0, np.pi, count)
    return cy, cx, theta


@dataclass(frozen=True)
class _Mods:
    """Multipliers of a class look drawn per patient and per slide (biological variation)."""

    density: float = 1.0
    radius: float = 1.0
    fibres: float = 1.0
    droplets: float = 1.0

    def times(self, other: _Mods) -> _Mods:
        return _Mods(
            self.density * other.density,
            self.radius * other.radius,
            self.fibres * other.fibres,
            self.droplets * other.droplets,
        )


@dataclass(frozen=True)
class _Nuisance:
    """Acquisition factors: per-channel gain, additive offset, noise sd, blur sigma (ref px)."""

    gain2: float = 1.0
    gain3: float = 1.0
    offset: float = 0.0
    noise: float = 250.0
    blur: float = 0.0


def _draw_patient_factors(
    rng: np.random.Generator, strength: float = 1.0
) -> tuple[_Mods, _Nuisance]:
    """Tissue modifiers and acquisition factors of one patient; ``strength`` scales the
    acquisition factors (log-gain, channel balance, offset) without changing the draws."""
    mods = _Mods(
        density=float(np.exp(rng.normal(0, 0.15))),
        radius=float(np.exp(rng.normal(0, 0.08))),
        fibres=float(np.exp(rng.normal(0, 0.3))),
        droplets=float(np.exp(rng.normal(0, 0.3))),
    )
    gain = float(np.exp(strength * rng.normal(0, 0.2)))
    balance = float(np.exp(strength * rng.normal(0, 0.06)))
    offset = strength * float(rng.uniform(-800, 1500))
    nuis = _Nuisance(gain2=gain, gain3=gain * balance, offset=offset)
    return mods, nuis


def _draw_slide_factors(
    rng: np.random.Generator, patient: _Nuisance, strength: float = 1.0
) -> tuple[_Mods, _Nuisance]:
    mods = _Mods(
        density=float(np.exp(rng.normal(0, 0.08))),
        fibres=float(np.exp(rng.normal(0, 0.15))),
        droplets=float(np.exp(rng.normal(0, 0.15))),
    )
    gain = float(np.exp(rng.normal(0, 0.07)))
    nuis = _Nuisance(
        gain2=patient.gain2 * gain * float(np.exp(rng.normal(0, 0.02))),
        gain3=patient.gain3 * gain * float(np.exp(rng.normal(0, 0.02))),
        offset=patient.offset + strength * float(rng.normal(0, 300)),
        noise=float(rng.uniform(120, 600)) * max(1.0, strength),
        blur=float(rng.uniform(0.0, 1.2)) * strength,
    )
    return mods, nuis


def _background(
    rng: np.random.Generator, size: int, scale: float, lipid: float
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth tissue background ``(CH2, CH3)``, each ``(size, size)`` float32."""
    cells = max(2, round(size / (60 * scale)))
    low = _smooth_field(rng, size, cells)
    texture = ndimage.gaussian_filter(
        rng.standard_normal((size, size)).astype(np.float32), 1.2 * scale
    )
    texture *= 1.0 / (float(texture.std()) + 1e-6)
    shape = 1.0 + 0.15 * low + 0.05 * texture
    lipid_map = np.clip(lipid * (1.0 + 0.4 * _smooth_field(rng, size, cells)), 0.0, 1.5)
    ch2 = (_BG2 + _BG2_LIPID * lipid_map) * shape
    ch3 = (_BG3 + _BG3_LIPID * lipid_map) * shape
    return ch2.astype(np.float32), ch3.astype(np.float32)


def _droplets(rng: np.random.Generator, size: int, count: int, scale: float) -> np.ndarray:
    """Small very bright round spots, peak about 1."""
    r = rng.uniform(1.0, 2.6, count) * scale
    return _stamp_ellipses(
        size,
        rng.uniform(0, size, count),
        rng.uniform(0, size, count),
        r,
        r,
        np.zeros(count),
        rng.uniform(0.6, 1.0, count),
        soft=0.5 * max(scale, 0.5),
    )


def _render_tissue(
    rng: np.random.Generator, look: ClassLook, mods: _Mods, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Clean (nuisance-free) tissue of one class: ``(CH2, CH3)`` float32 ``(size, size)`` maps."""
    scale = math.sqrt(size / REF_SIZE)  # pixels per reference pixel
    field = (size / scale / REF_SIZE) ** 2  # reference fields covered by this patch
    local = float(np.exp(rng.normal(0, 0.2)))  # patch-level heterogeneity of cellularity
    ch2, ch3 = _background(rng, size, scale, look.lipid)

    n_nuc = int(rng.poisson(look.density * mods.density * local * field))
    cy, cx, theta = _nuclei_layout(rng, look, n_nuc, size)
    n_nuc = cy.size
    minor = look.radius * mods.radius * scale * np.exp(rng.normal(0, look.radius_cv, n_nuc))
    minor = np.clip(minor, 0.6 * scale, 3.0 * look.radius * scale)
    aspect = np.clip(rng.normal(look.aspect, look.aspect_sd, n_nuc), 1.0, 5.0)
    amp = np.clip(rng.normal(1.0, 0.1 + 0.3 * look.radius_cv, n_nuc), 0.5, 1.3)
    nuclei = _stamp_ellipses(
        size, cy, cx, minor * aspect, minor, theta, amp, soft=0.6 * max(scale, 0.5)
    )
    chromatin = ndimage.gaussian_filter(
        rng.standard_normal((size, size)).astype(np.float32), 0.8 * scale
    )
    nuclei = np.minimum(nuclei, 1.3) * (0.85 + 0.15 * chromatin / (float(chromatin.std()) + 1e-6))
    cytoplasm = ndimage.gaussian_filter(nuclei, 1.3 * look.radius * scale)
    cytoplasm = np.minimum(cytoplasm * 2.0, 1.0) * look.cytoplasm

    n_fib = int(rng.poisson(look.fibres * mods.fibres * field))
    direction = None
    if look.fibres_aligned and n_nuc:
        # follow the fascicle direction: circular mean of the axial nuclear orientations
        direction = 0.5 * float(np.arctan2(np.sin(2 * theta).mean(), np.cos(2 * theta).mean()))
    fibres = _fibres(rng, size, n_fib, scale, direction)
    n_drop = int(rng.poisson(look.droplets * mods.droplets * field))
    drops = _droplets(rng, size, n_drop, scale)

    ch2 = ch2 + _CYTO2 * cytoplasm + _FIBRE2 * fibres + _DROP2 * drops
    ch3 = ch3 + _CYTO3 * cytoplasm + _FIBRE3 * fibres + _DROP3 * drops
    dark = np.clip(look.nuclear_contrast * nuclei, 0.0, 0.9)
    ch2 = ch2 * (1.0 - dark)
    ch3 = ch3 * (1.0 - _NUC3_DIM * nuclei) + _NUC3_ADD * nuclei
    return ch2, ch3


def _render_nondiagnostic(
    rng: np.random.Generator, look: ClassLook, mods: _Mods, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A patch with no diagnostic content: blank, out of focus, or debris (random kind)."""
    scale = math.sqrt(size / REF_SIZE)
    field = (size / scale / REF_SIZE) ** 2
    kind = int(rng.integers(0, 3))
    if kind == 1:  # out of focus tissue, washed out
        ch2, ch3 = _render_tissue(rng, look, mods, size)
        sigma = rng.uniform(5.0, 10.0) * scale
        fade = rng.uniform(0.4, 0.7)
        ch2 = ndimage.gaussian_filter(ch2, sigma) * fade
        ch3 = ndimage.gaussian_filter(ch3, sigma) * fade
        return ch2, ch3
    ch2, ch3 = _background(rng, size, scale, float(rng.uniform(0.0, 0.3)))
    level = rng.uniform(0.15, 0.6)
    ch2, ch3 = ch2 * level, ch3 * level
    if kind == 2:  # debris: scattered bright specks and fibre fragments, no cells
        drops = _droplets(rng, size, int(rng.poisson(40 * field)), scale * rng.uniform(0.8, 2.0))
        frags = _fibres(rng, size, int(rng.poisson(5 * field)), scale, None)
        ch2 = ch2 + 30000.0 * drops + 4000.0 * frags
        ch3 = ch3 + 26000.0 * drops + 3000.0 * frags
    return ch2, ch3


def _acquire(
    rng: np.random.Generator, ch2: np.ndarray, ch3: np.ndarray, nuis: _Nuisance, size: int
) -> np.ndarray:
    """Apply gain, offset, blur and noise; returns the ``(2, size, size)`` uint16 patch."""
    scale = math.sqrt(size / REF_SIZE)
    gain = float(np.exp(rng.normal(0, 0.03)))
    img = np.stack([ch2 * nuis.gain2, ch3 * nuis.gain3]) * gain + nuis.offset
    if nuis.blur * scale > 0.3:
        img = ndimage.gaussian_filter(img, (0, nuis.blur * scale, nuis.blur * scale))
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    shot = np.sqrt(np.maximum(img, 0.0) / 10000.0)  # signal-dependent part
    img = img + noise * (nuis.noise * (0.5 + 0.5 * shot))
    return np.clip(np.rint(img), 0, 65535).astype(np.uint16)


# ----------------------------------------------------------------------------------------------
# layout and writing


def _patient_ids(seed: int, count: int) -> list[str]:
    """``count`` distinct OpenSRH-like patient ids (``NIO_003``, some ``NIO_UM_135``)."""
    rng = _rng(seed, _KEY_LAYOUT, 0)
    numbers = rng.choice(999, size=count, replace=False) + 1
    um = rng.random(count) < 0.2
    return [f"NIO_UM_{n:03d}" if u else f"NIO_{n:03d}" for n, u in zip(numbers, um, strict=True)]


def _slide_ids(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct 7-digit slide ids."""
    ids: list[str] = []
    while len(ids) < count:
        candidate = str(int(rng.integers(1_000_000, 10_000_000)))
        if candidate not in ids:
            ids.append(candidate)
    return ids


def _patch_positions(rng: np.random.Generator, count: int) -> list[tuple[int, int, int, int]]:
    """``count`` distinct ``(ix, jx, iy, jy)``: 1000-px field offsets, 300-px offsets inside."""
    fields_needed = -(-count // 9)
    grid = 100  # fields on a 100 x 100 grid of 1000-px fields
    picked = rng.choice(grid * grid, size=fields_needed, replace=False)
    cells = [(iy, jy) for iy in (0, 300, 600) for jy in (0, 300, 600)]
    positions = []
    for f in picked:
        ix, jx = int(f // grid) * 1000, int(f % grid) * 1000
        for k in rng.permutation(9):
            positions.append((ix, jx, *cells[k]))
    return positions[:count]


def _write_tiff(path: str, patch: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, patch, photometric="minisblack")


def _write_dataset(
    root: str,
    seed: int,
    patients_per_class: int,
    slides_per_patient: int,
    patches_per_slide: int,
    nondiagnostic_per_slide: int,
    size: int,
    val_fraction: float,
    nuisance: float = 1.0,
) -> None:
    """Write the whole dataset under ``root`` (an existing empty directory), showing progress."""
    classes = list(CLASSES_OPENSRH)
    ids = _patient_ids(seed, len(classes) * patients_per_class)
    n_val = _val_count(patients_per_class, val_fraction)
    split_rng = _rng(seed, _KEY_LAYOUT, 1)
    meta: dict[str, dict] = {}
    train: list[str] = []
    val: list[str] = []
    os.makedirs(os.path.join(root, META_DIR))
    files = len(ids) * slides_per_patient * (patches_per_slide + nondiagnostic_per_slide)
    with Progress(files, "writing synthetic patches", "files") as progress:
        for ci, label in enumerate(classes):
            look = CLASS_LOOKS[label]
            val_members = set(split_rng.permutation(patients_per_class)[:n_val].tolist())
            for pi in range(patients_per_class):
                patient = ids[ci * patients_per_class + pi]
                (val if pi in val_members else train).append(patient)
                prng = _rng(seed, _KEY_PATIENT, ci, pi)
                p_mods, p_nuis = _draw_patient_factors(prng, float(nuisance))
                slides: dict[str, dict] = {}
                for si, slide in enumerate(_slide_ids(prng, slides_per_patient)):
                    srng = _rng(seed, _KEY_SLIDE, ci, pi, si)
                    s_mods, s_nuis = _draw_slide_factors(srng, p_nuis, float(nuisance))
                    mods = p_mods.times(s_mods)
                    total = patches_per_slide + nondiagnostic_per_slide
                    positions = _patch_positions(srng, total)
                    os.makedirs(os.path.join(root, *patch_dir(patient, slide).split("/")))
                    lists = empty_patch_lists()
                    diag_key = diagnostic_key(label)
                    for k, (ix, jx, iy, jy) in enumerate(positions):
                        rng = _rng(seed, _KEY_PATCH, ci, pi, si, k)
                        diagnostic = k < patches_per_slide
                        render = _render_tissue if diagnostic else _render_nondiagnostic
                        ch2, ch3 = render(rng, look, mods, size)
                        patch = _acquire(rng, ch2, ch3, s_nuis, size)
                        rel = patch_path(patient, slide, ix, jx, iy, jy)
                        _write_tiff(os.path.join(root, *rel.split("/")), patch)
                        lists[diag_key if diagnostic else NONDIAGNOSTIC_PATCHES].append(rel)
                        progress.update(1)
                    slides[slide] = lists
                meta[patient] = {"class": label, "slides": slides}
    with open(os.path.join(root, META_DIR, META_NAME), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=1)
        handle.write("\n")
    with open(os.path.join(root, META_DIR, SPLIT_NAME), "w", encoding="utf-8") as handle:
        json.dump({"train": train, "val": val}, handle, indent=1)
        handle.write("\n")


def generate_opensrh(
    out: str,
    seed: int = 0,
    patients_per_class: int = 4,
    slides_per_patient: int = 2,
    patches_per_slide: int = 8,
    nondiagnostic_per_slide: int = 1,
    size: int = 300,
    val_fraction: float = 0.25,
    nuisance: float = 1.0,
) -> str:
    """Write a synthetic dataset in the OpenSRH layout at ``out`` and return its absolute path.

    Creates ``7 * patients_per_class`` patients (each of the 7 OpenSRH classes), each with
    ``slides_per_patient`` slides of ``patches_per_slide`` diagnostic plus
    ``nondiagnostic_per_slide`` nondiagnostic patches; every patch a ``(2, size, size)`` uint16
    TIFF. Per class ``max(1, round(val_fraction * patients_per_class))`` patients go to ``val``
    (at least one stays in ``train``). Same parameters give byte-identical files.

    ``nuisance`` scales the acquisition differences between patients and slides (log-gain,
    channel balance, background offset, blur; noise grows with it above 1): 0 = every patient
    imaged alike, 1 = the default, 3 = a strong per-patient acquisition signature, the regime in
    which patient-level positives can be matched by brightness alone.

    The dataset is written into a hidden temporary sibling of ``out`` and renamed into place at
    the end, so ``out`` never holds a partial dataset. Progress (files written, rate, ETA) is
    shown as :class:`hlss.progress.Progress` does: a bar on a terminal, log lines otherwise.

    Raises:
        HLSSError: a parameter that cannot work (``patients_per_class`` outside [2, 128],
            ``size`` outside [16, 4096], ``slides_per_patient`` outside [1, 1000],
            ``patches_per_slide < 1``, more than 900 patches per slide, ``seed < 0``,
            ``val_fraction`` outside (0, 1)), or ``out`` exists and is a file or a non-empty
            directory (it is left untouched).
        OSError: writing fails (disk full, permissions); the partial copy is removed.
    """
    _check_params(
        seed,
        patients_per_class,
        slides_per_patient,
        patches_per_slide,
        nondiagnostic_per_slide,
        size,
        val_fraction,
        nuisance,
    )
    out = os.path.abspath(os.path.expanduser(str(out)))
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise HLSSError(f"{out}: already exists and is not empty; choose a new output directory")
    tmp = temp_dir_beside(out)
    try:
        _write_dataset(
            tmp,
            seed,
            patients_per_class,
            slides_per_patient,
            patches_per_slide,
            nondiagnostic_per_slide,
            size,
            float(val_fraction),
            float(nuisance),
        )
        if not publish_dir(tmp, out):
            raise HLSSError(f"{out}: appeared while generating; left it untouched")
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------
# cached dataset for ``dataset=synthetic``


def synthetic_params(**params: object) -> dict:
    """All parameters of :func:`generate_opensrh` (except ``out``), defaults filled in.

    Raises:
        HLSSError: an unknown parameter name.
    """
    signature = inspect.signature(generate_opensrh)
    defaults = {k: p.default for k, p in signature.parameters.items() if k != "out"}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise HLSSError(
            f"unknown synthetic dataset parameter(s) {unknown}; known: {sorted(defaults)}"
        )
    defaults.update(params)
    return defaults


def synthetic_key(**params: object) -> str:
    """Short stable hash of the full parameter set (and :data:`GENERATOR_VERSION`)."""
    full = synthetic_params(**params)
    text = json.dumps({"version": GENERATOR_VERSION, **full}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def ensure_synthetic(cache_dir: str | None = None, **params: object) -> str:
    """Return the cached synthetic dataset for ``params``, generating it on first use.

    The folder is ``<cache_dir>/opensrh-synthetic-<hash>``, ``cache_dir`` defaulting to
    :func:`hlss.paths.cache_root` (``$HLSS_CACHE`` or ``~/.cache/hlss``); ``params`` are those of :func:`generate_opensrh` except ``out``.
    Safe when several processes (e.g. DDP ranks) call it at once: each generates into its own
    temporary folder and renames it into place; a process that loses the race discards its copy.

    Raises:
        HLSSError: a bad parameter, or the target folder exists without ``meta/opensrh.json``
            and is not empty (it is never overwritten).
    """
    full = synthetic_params(**params)
    base = os.path.abspath(os.path.expanduser(str(cache_dir or cache_root())))
    target = os.path.join(base, CACHE_PREFIX + synthetic_key(**full))
    marker = os.path.join(target, META_DIR, META_NAME)
    if os.path.isfile(marker):
        return target
    if os.path.exists(target) and not (os.path.isdir(target) and not os.listdir(target)):
        raise HLSSError(f"{target}: exists but is not a synthetic dataset; remove it to regenerate")
    _check_params(**full)
    tmp = temp_dir_beside(target)
    try:
        _write_dataset(tmp, **full)
        if not publish_dir(tmp, target) and not os.path.isfile(marker):
            raise HLSSError(f"{target}: exists but is not a synthetic dataset")
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def synthetic_table(
    cache_dir: str | None = None, include_nondiagnostic: bool = False, **params: object
):
    """The patch table of the cached synthetic dataset (``dataset=synthetic``), generated on first use.

    ``params`` are those of :func:`generate_opensrh` except ``out``; see :func:`ensure_synthetic`.
    """
    from hlss.data.opensrh import read_opensrh

    root = ensure_synthetic(cache_dir=cache_dir, **params)
    table = read_opensrh(root, include_nondiagnostic=include_nondiagnostic)
    table.name = f"synthetic:{root}"
    return table
