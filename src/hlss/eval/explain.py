"""Attribute retrieval: which named attributes describe a patch, a slide or a patient.

The dual encoder maps images into the text space of the frozen text encoder, and every level of
the hierarchy has an attribute bank whose prompt-ensemble embeddings live in the same space
(``DualEncoder.text_embeddings``). Ranking a level's attributes against an embedding explains it
in words:

* **patch** -- each patch embedding against the patch bank;
* **slide** -- the mean of the slide's (L2-normalised) patch embeddings, renormalised, against the
  slide bank;
* **patient** -- the mean of all the patient's patch embeddings, renormalised, against the
  patient bank.

**Readouts** (``explain.readout`` of ``hlss-eval``). With ``e`` an entity's L2-normalised
embedding, ``t_a`` attribute ``a``'s, and the *evaluated set* every entity of the level being
explained (all val patches, all slides, all patients):

* ``raw`` -- cosine ``e . t_a``. It reads the absolute direction of ``e``, and image embeddings of
  one dataset share a large common direction (the mean of the unit vectors has norm 0.95-0.97
  for patches, slides and patients of the default demo run, 0.99-1.00 untrained), so the
  ranking mostly reflects that direction: in the default run every one of the 200 patches, 28
  slides and 14 patients got the same top attribute ("cohesive cell clusters" / "cohesive
  epithelial nests"), next to its opposite ("discohesive ...") on every slide and patient.
* ``centered`` (the default of ``hlss-eval``) -- cosine of ``e - mean(e)`` (the mean over the
  evaluated set) and ``t_a - mean(t)`` (the bank's mean attribute embedding), both
  renormalised: what distinguishes this entity from the rest of the set, in terms of what
  distinguishes this attribute from the rest of the bank. An attribute shared by every entity
  is no longer shown; a set of one entity has nothing to show (all scores 0, trust low).
* ``zscore`` -- ``(e - mean(e)) . t_a / sd_a``, ``sd_a`` the standard deviation of ``e . t_a``
  over the evaluated set: how unusually strongly the entity expresses each attribute, in
  standard deviations of the set (the ``score`` column is that z value). Noisy when a level has
  few entities.

Measured on the default run (``hlss-train``, 100 steps, synthetic demo data; val set, k 5;
patch / slide / patient). ``top1_share``: fraction of entities whose top attribute is the
level's most frequent one; AMI: adjusted mutual information between each entity's top attribute
and its class (0 = chance, 1 = the top attribute names the class; ``class_information`` of
:func:`explanation_quality`), for the trained network and the same architecture untrained:

========  ==================  ==================  ==================  ==================
readout   top1_share          contradiction rate  AMI trained         AMI untrained
========  ==================  ==================  ==================  ==================
raw       1.00 / 1.00 / 1.00  0.24 / 1.00 / 1.00  0.00 / 0.00 / 0.00  0.00 / 0.00 / 0.00
centered  0.19 / 0.32 / 0.36  0.53 / 0.29 / 0.36  0.33 / 0.50 / 0.54  0.12 / 0.13 / 0.16
zscore    0.04 / 0.11 / 0.14  0.42 / 0.64 / 0.29  0.14 / 0.34 / 0.24  0.06 / 0.04 / 0.00
========  ==================  ==================  ==================  ==================

``centered`` measures better: its top attributes follow the class (adjusted mutual information
well above the untrained network's) and contradict themselves far less often at slide and
patient level; ``raw`` says the same thing about every entity. A random top 5 of these banks
contains two alternatives of one group 15-16 % of the time; ``centered`` stays above that at
patch level because mutually exclusive alternatives are close in the text space (mean cosine
0.36 within a group, -0.01 across groups), so being near one means being near the other.
``raw``'s mean ``top_z`` is higher (4.0 / 4.1 / 4.5 against 2.4 / 2.7 / 2.5) only because one
shared attribute stands out for every entity: ``top_z`` cannot tell a common direction from an
entity's own, which is why ``explanation_quality`` also reports ``top1_share``.

Not offered: keeping one attribute per exclusive group in the shown top-k would only hide the
ambiguity the contradiction flag reports (the flag and the sharpness figures would not change);
centring each exclusive group on its own mean (contrasting alternatives) made contradictions
impossible by construction for two-member groups without carrying more class information (AMI
0.34 / 0.41 / 0.22).

:func:`explain_levels` returns one long table (one row per entity and rank), which
:func:`write_explanations` saves as CSV and :func:`format_examples` turns into a few readable
lines for a terminal.

**How far to trust an explanation.** A ranking is only worth reading when its top attribute
stands out from the rest of the bank more than it would by chance, and the top attributes do not
contradict one another. Every entity carries

* ``top_z`` -- how many standard deviations the top attribute's score lies above the mean
  score over the whole bank;
* ``top_p`` -- the fraction of the level's null draws (below) whose ``top_z`` is at least the
  entity's: an empirical p-value (0 means below ``1 / NULL_DRAWS``);
* ``contradiction`` -- whether two of its top-``k`` attributes belong to one group of mutually
  exclusive alternatives (e.g. "high cellularity" and "low cellularity"; banks declare groups);
* ``trust`` -- ``high`` (``top_z`` above the null's 99th percentile, no contradiction),
  ``medium`` (above its 95th percentile, no contradiction) or ``low``.

*The null.* Every readout scores ``u(e) . w_a``: ``u`` is the entity's unit embedding (``raw``),
its renormalised deviation from the set mean (``centered``) or its deviation (``zscore``), and
``w`` the level's transformed bank (:func:`readout_parts`). The null keeps ``w`` exactly as the
level uses it and replaces ``u(e)`` by a direction that points nowhere in particular:
:data:`NULL_DRAWS` isotropic Gaussian vectors of the text space (seed :data:`NULL_SEED`;
``top_z`` ignores scale, so these are uniform unit directions). For ``centered`` this is what
:func:`explain_levels` itself would do with entities drawn at random: a set of random unit
directions centred on its own mean has deviations whose directions are again uniform on the
sphere (the set's law is rotation invariant), whatever its size. Pushing random unit vectors
through the *real* set's mean instead is not a null: with a mean of norm 0.95-0.99, ``r - mean``
points mostly along ``-mean``, so the draws share one direction (in the default run 96 % of them
put the same patch attribute first and the 95th percentile drops from 3.17 to 2.49): it
measures the set's mean, not chance. The null is computed once per level (its bank and readout;
~40 ms for 4096 draws against 128 x 384) and its thresholds are reported by
:func:`explanation_quality` as ``z_medium`` and ``z_high``. Against the packaged 128-attribute
banks the null hardly depends on the bank or the readout: median 2.49, ``z_medium`` 3.16-3.17,
``z_high`` 3.50-3.56 for the default run, close to the largest of 128 independent normal
scores; the former fixed thresholds (2.5 and 3.5) let about half of all random directions
reach ``medium``.

The null is isotropic: it does not know that real embeddings occupy a few directions of the
text space, so passing it says "sharper than chance", not "about this entity". ``raw`` shows
the limit: a direction shared by the whole set passes it for every entity (``top1_share``
tells). Measured on the default run (``hlss-train``, 100 steps, synthetic demo data; val set,
k 5, 200 patches / 28 slides / 14 patients) for the trained network and the same architecture
untrained (share of ``high`` / ``medium`` / contradiction / mean ``top_p``):

========  =========  =========================  =========================  =========================
readout   network    patch                     slide                     patient
========  =========  =========================  =========================  =========================
centered  trained    0.00 / 0.01 / 0.53 / 0.56  0.00 / 0.04 / 0.29 / 0.44  0.00 / 0.00 / 0.36 / 0.54
centered  untrained  0.00 / 0.03 / 0.46 / 0.48  0.00 / 0.00 / 0.54 / 0.63  0.00 / 0.00 / 0.57 / 0.70
raw       trained    0.76 / 0.00 / 0.24 / 0.00  0.00 / 0.00 / 1.00 / 0.00  0.00 / 0.00 / 1.00 / 0.00
raw       untrained  0.00 / 0.00 / 0.00 / 0.59  0.00 / 0.00 / 1.00 / 0.51  0.00 / 0.00 / 1.00 / 0.92
========  =========  =========================  =========================  =========================

So the calibrated labels no longer trust chance, but on this run they do not separate the
trained network from the untrained one in a useful way: under ``centered`` the trained
network's top attributes carry class information (AMI above) yet stand out no more than a
random direction's (mean ``top_p`` 0.44-0.56), so almost every explanation is ``low`` -- for
the untrained network too (``trust_low`` 0.97 / 1.00 / 1.00) -- while ``class_information`` is
0.33 / 0.50 / 0.54 trained against 0.12 / 0.13 / 0.16 untrained; under
``raw`` 76 % of the trained patches are ``high`` only because one attribute shared by all of
them stands out (``top1_share`` 1.00), and slides and patients are ``low`` because that
attribute sits next to its opposite. Read a ``low`` label as "no single attribute stands out
more than by chance", not as "wrong".

:func:`explanation_quality` summarises them per level (``summary.json``, ``explain_quality``).

**Does the explanation follow the class?** Trust asks whether one attribute stands out for an
entity; it does not ask whether the attributes that stand out differ between classes. Every row
of the table carries the entity's class (``label``, from the index's ``label`` column), and
:func:`explanation_quality` reports per level ``class_information``: the adjusted mutual
information between the entities' top attributes and their classes. It is the figure that tells
the trained network from the untrained one above; compare it with the untrained network's
(``hlss-eval ... untrained=true``) rather than reading it alone, since the untrained network's is
not 0 either (a random network's embeddings already separate the classes somewhat: on this run
its kNN patient accuracy is 0.50 against 0.64 trained, 7 classes). Entities without a label are
left out, and the key is absent when a level has fewer than 2 classes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from hlss.atomic import atomic_file
from hlss.errors import HLSSError
from hlss.eval.arrays import check_2d, rows_f32
from hlss.levels import LEVELS

COLUMNS = (
    "level",
    "patient",
    "slide",
    "path",
    "label",
    "rank",
    "attribute",
    "score",
    "top_z",
    "contradiction",
    "trust",
    "top_p",
)
"""Columns of the table returned by :func:`explain_levels`."""

TRUST_QUANTILES = {"medium": 0.95, "high": 0.99}
"""Quantiles of the null ``top_z`` distribution an entity must exceed for ``medium`` / ``high``."""

NULL_DRAWS = 4096
"""Random directions drawn per level for the trust null (module docstring)."""

NULL_SEED = 0
"""Seed of the trust null's ``numpy.random.default_rng`` (the same draws for every level)."""

READOUTS = ("raw", "centered", "zscore")
"""How an entity's attribute scores are read out (module docstring)."""

_CHUNK = 65536


def readout_name(readout) -> str:
    """The readout's name (an enum member, as the ``explain.readout`` config key gives it, is
    taken by its value).

    Raises:
        HLSSError: not one of :data:`READOUTS`.
    """
    name = str(getattr(readout, "value", readout))
    if name not in READOUTS:
        raise HLSSError(
            f"explain.readout: unknown readout {name!r} (choose one of {', '.join(READOUTS)})"
        )
    return name


def readout_parts(
    source: np.ndarray | torch.Tensor,
    bank_text: np.ndarray | torch.Tensor,
    readout: str = "raw",
    chunk_size: int = _CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """What a readout ranks: ``score(e, a) = u(e) . w_a`` (see the module docstring).

    Args:
        source: ``[n, D]`` the evaluated set (the level's entity embeddings); only its mean
            direction (``centered``, ``zscore``) and the spread of its similarities
            (``zscore``) are used, accumulated chunk by chunk.
        bank_text: ``[A, D]`` attribute text embeddings of one bank.
        readout: one of :data:`READOUTS`.
        chunk_size: rows processed at a time.

    Returns:
        ``(bank_w, shift, renormalise)``: ``bank_w`` ``[A, D]`` float32 transformed bank,
        ``shift`` ``[D]`` float32 subtracted from every L2-normalised entity embedding, and
        whether the shifted embedding is renormalised (cosine scores) before ``u . w``.

    Raises:
        HLSSError: an unknown readout.
    """
    readout = readout_name(readout)
    bank = F.normalize(rows_f32(bank_text), dim=-1)
    a, d = bank.shape
    if readout == "raw":
        return bank, torch.zeros(d), False
    n, _ = check_2d(source, "explain source")
    total = torch.zeros(d, dtype=torch.float64)
    squares = torch.zeros(a, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            rows = F.normalize(rows_f32(source, start, start + chunk_size), dim=-1)
            total += rows.sum(0, dtype=torch.float64)
            if readout == "zscore":
                squares += ((rows @ bank.T).double() ** 2).sum(0)
    mean = total / max(n, 1)
    if readout == "centered":
        return F.normalize(bank - bank.mean(0), dim=-1), mean.float(), True
    # zscore: (e - mean) . t_a / sd_a, sd_a the spread of e . t_a over the evaluated set
    var = squares / max(n, 1) - (bank.double() @ mean) ** 2
    sd = var.clamp_min(0).sqrt()
    scale = torch.where(sd > 1e-6, 1.0 / sd.clamp_min(1e-6), torch.zeros_like(sd))
    return (bank.double() * scale[:, None]).float(), mean.float(), False


def top_attributes(
    embeddings: np.ndarray | torch.Tensor,
    bank_text: np.ndarray | torch.Tensor,
    names: Sequence[str],
    k: int = 5,
    chunk_size: int = _CHUNK,
    return_z: bool = False,
    readout: str = "raw",
    reference: np.ndarray | torch.Tensor | None = None,
) -> tuple[np.ndarray, ...]:
    """Rank a bank's attributes for every embedding by a readout's score.

    ``raw`` is the cosine similarity. Both inputs are L2-normalised here (float16 is fine). Ties
    are broken by the lower attribute index, so the result is deterministic.

    Args:
        embeddings: ``[n, D]`` embeddings in the text space.
        bank_text: ``[A, D]`` attribute text embeddings of one bank.
        names: the ``A`` attribute names (only checked against ``A`` here; index them with the
            returned ``idx``).
        k: how many attributes to return per row; capped at ``A``.
        chunk_size: rows processed at a time.
        return_z: also return ``top_z`` ``[n]`` float32: the top score's distance from the
            row's mean score over all ``A`` attributes, in row standard deviations (0 when
            every attribute scores the same).
        readout: ``raw``, ``centered`` or ``zscore`` (module docstring).
        reference: ``[N, D]`` the evaluated set whose mean (and spread) ``centered`` and
            ``zscore`` remove; ``None`` = ``embeddings`` themselves. Ignored by ``raw``.

    Returns:
        ``(idx, scores)``: ``idx`` ``[n, min(k, A)]`` int64 attribute indices, best first;
        ``scores`` the matching ``[n, min(k, A)]`` float32 scores (descending);
        ``(idx, scores, top_z)`` with ``return_z``.

    Raises:
        ValueError: an input is not 2-D, ``k < 1`` or ``chunk_size < 1``.
        HLSSError: ``len(names) != A``, embeddings, reference and bank have different widths,
            or an unknown readout.
    """
    if int(k) < 1:
        raise ValueError(f"top_attributes: k must be >= 1, got {k}")
    if int(chunk_size) < 1:
        raise ValueError(f"top_attributes: chunk_size must be >= 1, got {chunk_size}")
    _, d = check_2d(embeddings, "top_attributes embeddings")
    _check_bank(names, bank_text, d, "top_attributes")
    ref = embeddings if reference is None else reference
    if readout != "raw" and check_2d(ref, "top_attributes reference")[1] != d:
        raise HLSSError(f"explain: the reference set has width {ref.shape[1]}, not {d}")
    parts = readout_parts(ref, bank_text, readout, int(chunk_size))
    idx, scores, top_z = _rank(embeddings, parts, int(k), int(chunk_size))
    return (idx, scores, top_z) if return_z else (idx, scores)


def _check_bank(names: Sequence[str], bank_text, width: int, what: str) -> None:
    """Refuse a bank whose names, text embeddings and the embeddings' ``width`` disagree."""
    a, d_bank = check_2d(bank_text, f"{what} bank_text")
    if len(names) != a:
        raise HLSSError(
            f"attribute bank has {len(names)} names but {a} text embeddings; "
            "use the bank the model was trained with"
        )
    if width != d_bank:
        raise HLSSError(
            f"embeddings have width {width} but the attribute text embeddings {d_bank}; "
            "use the text encoder the model was trained with"
        )


def _z_of_scores(sims: np.ndarray) -> np.ndarray:
    """``[n]`` top score's distance from the row mean in row standard deviations (0 if flat)."""
    std = sims.std(axis=1)
    spread = sims.max(axis=1) - sims.mean(axis=1)
    return np.where(std > 1e-12, spread / np.maximum(std, 1e-12), 0.0)


def _rank(
    embeddings, parts: tuple[torch.Tensor, torch.Tensor, bool], k: int, step: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(idx, scores, top_z)`` of :func:`top_attributes` from a readout's ``parts``."""
    bank, shift, renormalise = parts
    n = len(embeddings)
    kk = min(int(k), bank.shape[0])
    idx = np.empty((n, kk), dtype=np.int64)
    scores = np.empty((n, kk), dtype=np.float32)
    top_z = np.zeros(n, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, n, step):
            rows = F.normalize(rows_f32(embeddings, start, start + step), dim=-1)
            rows = rows - shift
            if renormalise:
                rows = F.normalize(rows, dim=-1)
            sims = (rows @ bank.T).numpy()
            order = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
            idx[start : start + step] = order
            scores[start : start + step] = np.take_along_axis(sims, order, axis=1)
            top_z[start : start + step] = _z_of_scores(sims)
    return idx, scores, top_z


def contradictions(idx: np.ndarray, groups: Sequence[str | None]) -> np.ndarray:
    """``[n]`` bool: whether two of a row's ranked attributes share a group.

    Args:
        idx: ``[n, k]`` attribute indices (from :func:`top_attributes`).
        groups: the bank's ``A`` group names; ``None`` = the attribute has no group.
    """
    if idx.size == 0:
        return np.zeros(len(idx), dtype=bool)
    codes = {g: i for i, g in enumerate(dict.fromkeys(g for g in groups if g is not None))}
    # attributes without a group get codes of their own, so they never clash
    code_of = np.array(
        [codes[g] if g is not None else len(codes) + j for j, g in enumerate(groups)],
        dtype=np.int64,
    )
    ranked = np.sort(code_of[idx], axis=1)
    return (np.diff(ranked, axis=1) == 0).any(axis=1)


@dataclass(frozen=True)
class TrustNull:
    """The null distribution of ``top_z`` for one level's bank and readout (module docstring).

    Attributes:
        top_z: ``[draws]`` float64 null ``top_z`` values, sorted ascending.
        z_medium: their :data:`TRUST_QUANTILES` ``medium`` quantile (linear interpolation).
        z_high: their ``high`` quantile.
    """

    top_z: np.ndarray
    z_medium: float
    z_high: float

    def p_values(self, top_z: np.ndarray) -> np.ndarray:
        """``[n]`` float32: the fraction of null draws whose ``top_z`` is at least each value."""
        z = np.asarray(top_z, dtype=np.float64)
        at_least = len(self.top_z) - np.searchsorted(self.top_z, z, side="left")
        return (at_least / max(len(self.top_z), 1)).astype(np.float32)


def null_top_z(
    bank_w: np.ndarray | torch.Tensor, draws: int = NULL_DRAWS, seed: int = NULL_SEED
) -> np.ndarray:
    """``[draws]`` float64 ``top_z`` of random directions scored against a readout's bank.

    The draws are ``numpy.random.default_rng(seed).standard_normal((draws, D))`` (isotropic, so
    their directions are uniform on the unit sphere; ``top_z`` ignores each row's scale), scored
    as ``g . w_a`` against every row of ``bank_w`` in float64.

    Args:
        bank_w: ``[A, D]`` the readout's transformed bank (``readout_parts(...)[0]``).
        draws: how many random directions.
        seed: seed of the generator.

    Raises:
        ValueError: ``bank_w`` is not 2-D or ``draws < 1``.
    """
    if int(draws) < 1:
        raise ValueError(f"null_top_z: draws must be >= 1, got {draws}")
    _, d = check_2d(bank_w, "null_top_z bank_w")
    w = np.asarray(bank_w.detach().cpu() if isinstance(bank_w, torch.Tensor) else bank_w)
    g = np.random.default_rng(int(seed)).standard_normal((int(draws), d))
    return _z_of_scores(g @ w.astype(np.float64).T)


def calibrate_trust(
    bank_w: np.ndarray | torch.Tensor, draws: int = NULL_DRAWS, seed: int = NULL_SEED
) -> TrustNull:
    """The :class:`TrustNull` of a readout's transformed bank (see :func:`null_top_z`)."""
    z = np.sort(null_top_z(bank_w, draws, seed))
    q = np.quantile(z, [TRUST_QUANTILES["medium"], TRUST_QUANTILES["high"]])
    return TrustNull(top_z=z, z_medium=float(q[0]), z_high=float(q[1]))


def trust_labels(
    top_z: np.ndarray, contradiction: np.ndarray, z_medium: float, z_high: float
) -> np.ndarray:
    """``high`` / ``medium`` / ``low`` per entity.

    ``high``: ``top_z > z_high`` and no contradiction; ``medium``: ``top_z > z_medium`` and no
    contradiction; ``low`` otherwise. Strict inequalities, so a null that is all zeros (a bank
    whose attributes the readout cannot tell apart) never labels a flat ranking.

    Args:
        top_z: ``[n]`` per-entity ``top_z``.
        contradiction: ``[n]`` bool (from :func:`contradictions`).
        z_medium: threshold of ``medium`` (the null's 95th percentile, :class:`TrustNull`).
        z_high: threshold of ``high`` (the null's 99th percentile).
    """
    clean = ~np.asarray(contradiction, dtype=bool)
    z = np.asarray(top_z, dtype=np.float64)
    return np.where(
        clean & (z > z_high), "high", np.where(clean & (z > z_medium), "medium", "low")
    ).astype(object)


def _group_means(text_space, codes: np.ndarray, groups: int, chunk_size: int) -> torch.Tensor:
    """``[groups, D]`` renormalised means of the L2-normalised rows of ``text_space`` per code.

    Accumulated chunk by chunk with ``index_add_`` (vectorised, float32), so a float16 array is
    never converted whole.
    """
    _, d = check_2d(text_space, "text_space")
    sums = torch.zeros(groups, d, dtype=torch.float32)
    codes_t = torch.from_numpy(np.array(codes, dtype=np.int64, copy=True))
    for start in range(0, len(codes), chunk_size):
        rows = F.normalize(rows_f32(text_space, start, start + chunk_size), dim=-1)
        sums.index_add_(0, codes_t[start : start + chunk_size], rows)
    # the mean of unit vectors, renormalised, equals the renormalised sum
    return F.normalize(sums, dim=-1)


def _index_labels(index: pd.DataFrame) -> np.ndarray:
    """``[m]`` object array: every row's class (``""`` without a ``label`` column or value)."""
    if "label" not in index.columns:
        return np.full(len(index), "", dtype=object)
    col = index["label"]
    return np.where(col.isna().to_numpy(), "", col.astype(str).to_numpy()).astype(object)


def _group_labels(labels: np.ndarray, codes: np.ndarray, groups: int) -> np.ndarray:
    """``[groups]`` object array: each group's most common non-empty label of ``labels``.

    Ties go to the label that sorts first; a group without any labelled row gets ``""``.
    """
    out = np.full(groups, "", dtype=object)
    frame = pd.DataFrame({"code": codes, "label": labels})
    frame = frame[frame["label"] != ""]
    if frame.empty:
        return out
    counts = frame.groupby(["code", "label"], sort=True).size().reset_index(name="n")
    counts = counts.sort_values(
        ["code", "n", "label"], ascending=[True, False, True], kind="stable"
    ).drop_duplicates("code")
    out[counts["code"].to_numpy()] = counts["label"].to_numpy()
    return out


def _long_table(
    level: str,
    patient: np.ndarray,
    slide: np.ndarray,
    path: np.ndarray,
    label: np.ndarray,
    idx: np.ndarray,
    scores: np.ndarray,
    names: Sequence[str],
    top_z: np.ndarray,
    groups: Sequence[str | None],
    null: TrustNull,
) -> pd.DataFrame:
    """One row per (entity, rank) from per-entity keys and ``[G, k]`` ranking arrays; the
    entity's ``top_z``, ``contradiction``, ``trust`` and ``top_p`` (against the level's
    ``null``) repeat on each of its rows."""
    g, k = idx.shape
    contra = contradictions(idx, groups)
    trust = trust_labels(top_z, contra, null.z_medium, null.z_high)
    return pd.DataFrame(
        {
            "level": np.full(g * k, level, dtype=object),
            "patient": np.repeat(patient.astype(object), k),
            "slide": np.repeat(slide.astype(object), k),
            "path": np.repeat(path.astype(object), k),
            "label": np.repeat(label.astype(object), k),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int64), g),
            "attribute": np.asarray(list(names), dtype=object)[idx.reshape(-1)],
            "score": scores.reshape(-1).astype(np.float32),
            "top_z": np.repeat(top_z.astype(np.float32), k),
            "contradiction": np.repeat(contra, k),
            "trust": np.repeat(trust, k),
            "top_p": np.repeat(null.p_values(top_z), k),
        },
        columns=list(COLUMNS),
    )


def explain_levels(
    text_space: np.ndarray | torch.Tensor,
    index: pd.DataFrame,
    text_embeddings: Mapping[str, torch.Tensor | np.ndarray],
    banks: Mapping[str, object],
    k: int = 5,
    patches: int | None = None,
    chunk_size: int = _CHUNK,
    readout: str = "raw",
    null_draws: int = NULL_DRAWS,
) -> pd.DataFrame:
    """Top-``k`` attributes of every patch, slide and patient, with how far to trust each.

    Levels are those in ``banks`` (in patch, slide, patient order); ``text_embeddings`` may hold
    more levels (e.g. ``DualEncoder.text_embeddings``) -- the extra ones are ignored.

    * patch: each row of ``text_space`` against the patch bank. With ``patches=N`` only the first
      ``N`` rows of ``index`` (in its order) are explained at patch level, which keeps the CSV
      small on real data (~300k patches x k rows otherwise); ``patches=0`` skips the level.
      Slide and patient levels always use every row.
    * slide: mean of the slide's L2-normalised patch embeddings, renormalised, against the slide
      bank. Slides are keyed by ``(patient, slide)`` (slide ids repeat across patients).
    * patient: mean of all the patient's patch embeddings, renormalised, against the patient bank.

    With ``readout`` ``centered`` or ``zscore`` the evaluated set of a level is every entity of
    that level in ``text_space`` (all patches, even with ``patches=N``; every slide; every
    patient): its mean is removed before ranking (module docstring).

    Trust is calibrated per level against the null of :func:`calibrate_trust` for the level's
    bank under the same readout (``null_draws`` random directions, seed :data:`NULL_SEED`). The
    thresholds used are kept in ``df.attrs["trust_thresholds"]``
    (``{level: {"z_medium", "z_high", "null_draws"}}``), where :func:`explanation_quality` finds
    them.

    Args:
        text_space: ``[m, D]`` image embeddings in the text space (float16 allowed), row ``i``
            belonging to row ``i`` of ``index``.
        index: ``m`` rows with at least ``patient`` and ``slide`` (and ``path`` for the patch
            level); an optional ``label`` column gives each entity its class (below); other
            columns (``split``, ...) are ignored.
        text_embeddings: ``{level: [A_level, D]}`` attribute text embeddings.
        banks: ``{level: AttributeBank}`` (anything with ``.names``) matching
            ``text_embeddings``.
        k: attributes per entity (capped at the bank size).
        patches: explain only the first ``patches`` rows at patch level; ``None`` = all.
        chunk_size: rows processed at a time.
        readout: ``raw``, ``centered`` or ``zscore`` (module docstring; an enum member with that
            value is accepted too, as the ``explain.readout`` config key gives it).
        null_draws: random directions of each level's trust null.

    Returns:
        A DataFrame with the :data:`COLUMNS`: one row per (entity, rank), ``rank`` 1..k (best
        first), ``score`` the readout's score (the cosine similarity for ``raw``), and the
        entity's ``top_z``, ``contradiction``, ``trust`` and ``top_p`` (module docstring) on each
        of its rows.
        ``path`` is ``""`` for slide and patient rows and ``slide`` is ``""`` for patient rows.
        ``label`` is the entity's class from ``index["label"]``: a patch's own label; for a
        slide or patient the most common label of its rows (ties: the label that sorts first).
        The datasets we ship have one label per patient, so a slide or patient with mixed
        labels does not occur there; elsewhere the minority labels are not shown. ``""`` when
        ``index`` has no ``label`` column (or the entity no labelled row).
        Patch rows follow ``index`` order; slides and patients are sorted by their keys.

    Raises:
        ValueError: ``text_space`` is not 2-D, ``k < 1``, ``patches < 0`` or
            ``null_draws < 1``.
        HLSSError: ``index`` and ``text_space`` have different lengths; a required column is
            missing; an unknown level; a level of ``banks`` without text embeddings; a bank whose
            size or width does not match its text embeddings; an unknown readout.
    """
    readout = readout_name(readout)
    m, d = check_2d(text_space, "explain_levels text_space")
    if len(index) != m:
        raise HLSSError(f"explain: index has {len(index)} rows but there are {m} embeddings")
    if int(k) < 1:
        raise ValueError(f"explain_levels: k must be >= 1, got {k}")
    if patches is not None and int(patches) < 0:
        raise ValueError(f"explain_levels: patches must be >= 0 or None, got {patches}")
    if int(null_draws) < 1:
        raise ValueError(f"explain_levels: null_draws must be >= 1, got {null_draws}")
    for lv in banks:
        if lv not in LEVELS:
            raise HLSSError(f"explain: unknown level {lv!r} (levels: {', '.join(LEVELS)})")
        if lv not in text_embeddings:
            raise HLSSError(f"explain: no text embeddings for level {lv!r}")
    levels = [lv for lv in LEVELS if lv in banks]
    needed = ["patient", "slide"] + (["path"] if "patch" in levels else [])
    missing = [c for c in needed if c not in index.columns]
    if missing:
        raise HLSSError(f"explain: index lacks column(s) {', '.join(missing)}")
    step = int(chunk_size)

    patient = index["patient"].astype(str).to_numpy()
    slide = index["slide"].astype(str).to_numpy()
    label = _index_labels(index)
    parts: list[pd.DataFrame] = []
    thresholds: dict[str, dict[str, float]] = {}
    for lv in levels:
        names = list(banks[lv].names)
        groups = list(getattr(banks[lv], "groups", None) or [None] * len(names))
        bank_text = text_embeddings[lv]
        _check_bank(names, bank_text, d, f"explain {lv}")
        if lv == "patch":
            rows = m if patches is None else min(int(patches), m)
            if rows == 0:
                continue
            readout_of_level = readout_parts(text_space, bank_text, readout, step)
            null = calibrate_trust(readout_of_level[0], int(null_draws))
            idx, scores, z = _rank(text_space[:rows], readout_of_level, k, step)
            path = index["path"].astype(str).to_numpy()[:rows]
            parts.append(
                _long_table(
                    lv,
                    patient[:rows],
                    slide[:rows],
                    path,
                    label[:rows],
                    idx,
                    scores,
                    names,
                    z,
                    groups,
                    null,
                )
            )
            thresholds[lv] = _thresholds(null)
            continue
        if m == 0:
            continue
        keys = ["patient", "slide"] if lv == "slide" else ["patient"]
        grouped = pd.DataFrame({"patient": patient, "slide": slide}).groupby(keys, sort=True)
        codes = grouped.ngroup().to_numpy()  # group number of every row, in sorted key order
        group_keys = grouped.size().index  # the keys in the same order
        g = len(group_keys)
        means = _group_means(text_space, codes, g, step)
        readout_of_level = readout_parts(means, bank_text, readout, step)
        null = calibrate_trust(readout_of_level[0], int(null_draws))
        idx, scores, z = _rank(means, readout_of_level, k, step)
        empty = np.full(g, "", dtype=object)
        if lv == "slide":
            g_patient = group_keys.get_level_values("patient").to_numpy()
            g_slide = group_keys.get_level_values("slide").to_numpy()
        else:
            g_patient, g_slide = group_keys.to_numpy(), empty
        g_label = _group_labels(label, codes, g)
        parts.append(
            _long_table(lv, g_patient, g_slide, empty, g_label, idx, scores, names, z, groups, null)
        )
        thresholds[lv] = _thresholds(null)
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    df = pd.concat(parts, ignore_index=True)
    df.attrs["trust_thresholds"] = thresholds
    return df


def _thresholds(null: TrustNull) -> dict[str, float]:
    """The figures of a level's null that :func:`explanation_quality` reports."""
    return {"z_medium": null.z_medium, "z_high": null.z_high, "null_draws": len(null.top_z)}


def explanation_quality(
    df: pd.DataFrame, thresholds: Mapping[str, Mapping[str, float]] | None = None
) -> dict[str, dict[str, float]]:
    """Per level: how sharp and how self-consistent the explanations of a table are.

    Args:
        df: an :func:`explain_levels` table.
        thresholds: ``{level: {"z_medium", "z_high", ...}}`` the trust thresholds used; default
            ``df.attrs["trust_thresholds"]`` as :func:`explain_levels` leaves it (a table read
            back from CSV has none, and then they are not reported).

    Returns:
        ``{level: {"entities", "top_z_mean", "top_z_median", "contradiction_rate", "top1_share",
        "trust_high", "trust_medium", "trust_low", "top_p_mean", "z_medium", "z_high",
        "class_information"}}`` (rates are fractions of the level's entities; ``top_p_mean``
        only with a ``top_p`` column, the thresholds only when known). ``top1_share`` is the
        fraction of entities whose top attribute is the level's most frequent top attribute:
        near 1 the ranking describes the whole set, not the entity.

        ``class_information`` is the adjusted mutual information
        (``sklearn.metrics.adjusted_mutual_info_score``, class as the true labelling) between
        each entity's rank-1 attribute and its ``label``, over the level's entities that have a
        label: 1 when the top attribute names the class exactly (one attribute per class, or
        several attributes that each occur in one class only), about 0 when it is unrelated to
        the class (chance-corrected, so many distinct attributes do not inflate it; it can dip
        slightly below 0). The key is *omitted* -- never NaN or null -- when the table has no
        ``label`` column or the labelled entities of the level hold fewer than 2 classes.
    """
    if thresholds is None:
        thresholds = df.attrs.get("trust_thresholds", {})
    out: dict[str, dict[str, float]] = {}
    firsts = df[df["rank"] == 1]
    for lv in [lv for lv in LEVELS if lv in set(firsts["level"])]:
        sub = firsts[firsts["level"] == lv]
        trust = sub["trust"].astype(str)
        out[lv] = {
            "entities": len(sub),
            "top_z_mean": float(sub["top_z"].mean()),
            "top_z_median": float(sub["top_z"].median()),
            "contradiction_rate": float(sub["contradiction"].astype(bool).mean()),
            "top1_share": float(sub["attribute"].value_counts().iloc[0] / len(sub)),
            **{f"trust_{t}": float((trust == t).mean()) for t in ("high", "medium", "low")},
        }
        if "top_p" in sub.columns:
            out[lv]["top_p_mean"] = float(sub["top_p"].mean())
        for key in ("z_medium", "z_high"):
            if key in thresholds.get(lv, {}):
                out[lv][key] = float(thresholds[lv][key])
        information = _class_information(sub)
        if information is not None:
            out[lv]["class_information"] = information
    return out


def _class_information(firsts: pd.DataFrame) -> float | None:
    """AMI between the rank-1 ``attribute`` and ``label`` of one level's entities (one row
    each); ``None`` without a ``label`` column or with fewer than 2 classes among them."""
    if "label" not in firsts.columns:
        return None
    label = firsts["label"]
    labelled = firsts[label.notna() & (label.astype(str) != "")]
    classes = labelled["label"].astype(str)
    if classes.nunique() < 2:
        return None
    from sklearn.metrics import adjusted_mutual_info_score

    return float(adjusted_mutual_info_score(classes, labelled["attribute"].astype(str)))


def write_explanations(df: pd.DataFrame, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save an :func:`explain_levels` table as CSV (atomically: temporary file + rename).

    Args:
        df: the table.
        path: destination file; parent folders are created.
        overwrite: replace an existing file (refused by default, so nothing the user had is
            lost).

    Returns:
        The written path.

    Raises:
        HLSSError: the file exists and ``overwrite`` is false, or it cannot be written.
    """
    dest = Path(path).expanduser()
    if dest.exists() and not overwrite:
        raise HLSSError(f"{dest}: already exists; not overwriting")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(dest, "w", encoding="utf-8", newline="") as fh:
            df.to_csv(fh, index=False, float_format="%.6g")
    except OSError as err:
        raise HLSSError(f"{dest}: cannot write explanations ({err.strerror or err})") from None
    return dest


def format_examples(df: pd.DataFrame, n_per_level: int = 2, decimals: int = 2) -> str:
    """A few readable lines from an :func:`explain_levels` table, ``n_per_level`` entities a level.

    Example::

        patch NIO_012/1/NIO_012-1-0_0_0_0.tif [trust high, z 4.1]: high cellularity (0.71), ...
        slide NIO_012/1 [trust low, z 1.9, contradicts itself]: diffuse infiltration (0.58), ...
        patient NIO_012 [trust medium, z 2.8]: homogeneous tumour (0.49), ...

    Patches are named ``patient/slide/<file name>``, slides ``patient/slide``. Entities are
    taken in table order (the first rows of each level).

    Args:
        df: a table with the :data:`COLUMNS` of :func:`explain_levels`.
        n_per_level: entities shown per level.
        decimals: digits of the scores.

    Returns:
        The lines joined by newlines (``"(no attribute explanations)"`` for an empty table).

    Raises:
        HLSSError: a column is missing (``top_p`` and ``label`` are not needed, so tables
            written before they existed still print).
    """
    missing = [c for c in COLUMNS if c not in df.columns and c not in ("top_p", "label")]
    if missing:
        raise HLSSError(f"explanations table lacks column(s) {', '.join(missing)}")
    lines: list[str] = []
    order = [lv for lv in LEVELS if lv in set(df["level"])]
    for lv in order:
        sub = df[df["level"] == lv]
        entity = (sub["rank"].to_numpy() == sub["rank"].min()).cumsum()
        sub = sub[entity <= int(n_per_level)]
        entity = entity[entity <= int(n_per_level)]
        for _, rows in sub.groupby(entity, sort=True):
            head = rows.iloc[0]
            if lv == "patch":
                name = f"{head['patient']}/{head['slide']}/{Path(str(head['path'])).name}"
            elif lv == "slide":
                name = f"{head['patient']}/{head['slide']}"
            else:
                name = str(head["patient"])
            attrs = ", ".join(
                f"{a} ({s:.{decimals}f})"
                for a, s in zip(rows["attribute"], rows["score"], strict=True)
            )
            note = f"trust {head['trust']}, z {float(head['top_z']):.1f}"
            if str(head["contradiction"]).lower() in ("true", "1"):
                note += ", contradicts itself"
            lines.append(f"{lv} {name} [{note}]: {attrs}")
    return "\n".join(lines) if lines else "(no attribute explanations)"
