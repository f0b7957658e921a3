"""Hierarchical visual contrast (HVC): one multi-positive SupCon loss per hierarchy level.

Every function and module here works on the *whole* batch it is given. In multi-process
training the caller must all-gather the embeddings (with gradients) and the ids first, so that
the images of every process are negatives for the anchors of every other process; nothing here
talks to ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hlss.levels import LEVELS

DEFAULT_WEIGHTS: Mapping[str, float] = MappingProxyType(dict.fromkeys(LEVELS, 1.0))


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that switches autocast off on ``device`` so loss maths runs in fp32 or better."""
    return torch.autocast(device_type=device.type, enabled=False)


def upcast(x: Tensor) -> Tensor:
    """Return ``x`` as float32 when it is a half-precision tensor, unchanged otherwise."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_temperature(name: str, value: float) -> float:
    """Return ``value`` as a float; raise ``ValueError`` unless it is a finite number > 0."""
    value = float(value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def level_weights(weights: Mapping[str, float], what: str = "weights") -> dict[str, float]:
    """Normalise a ``{level: weight}`` mapping (a dict or an omegaconf ``DictConfig``).

    Levels missing from ``weights`` get weight 0.

    Raises:
        ValueError: a key is not one of :data:`LEVELS`, or a weight is negative or not finite.
    """
    if not isinstance(weights, Mapping):
        raise ValueError(
            f"{what} must be a mapping {{level: weight}}, got {type(weights).__name__}"
        )
    out = dict.fromkeys(LEVELS, 0.0)
    for key, value in weights.items():
        if key not in LEVELS:
            raise ValueError(f"{what}: unknown level {key!r}; expected one of {list(LEVELS)}")
        value = float(value)
        if not (value >= 0 and value != float("inf")):
            raise ValueError(f"{what}[{key!r}] must be a finite number >= 0, got {value}")
        out[str(key)] = value
    return out


def supcon(
    z: Tensor,
    groups: Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> Tensor:
    """Supervised-contrastive loss with several positives per anchor.

    The embeddings are L2-normalised, ``s_ij`` is the cosine similarity of images ``i`` and
    ``j``, ``P(i) = {p != i : groups[p] == groups[i]}`` and ``A(i) = {a != i}``. For an anchor
    with at least one positive::

        l_i = -(temperature / base_temperature)
              * mean_{p in P(i)} [ s_ip / temperature - logsumexp_{a in A(i)} s_ia / temperature ]

    and the loss is the mean of ``l_i`` over anchors with at least one positive. Every other
    image of the batch is a negative, so pass the all-gathered batch in multi-process training.

    Args:
        z: embeddings, shape ``[B, D]`` (any scale; normalised here).
        groups: integer ids, shape ``[B]``; equal ids mark positives.
        temperature: softmax temperature ``tau`` (> 0).
        base_temperature: ``tau_base`` (> 0); the loss is scaled by ``tau / tau_base``.

    Returns:
        A scalar tensor. When no anchor has a positive it is ``0`` but still attached to the
        graph of ``z`` (so ``backward`` works and gives zero gradients).

    Raises:
        ValueError: ``z`` is not 2-D, ``groups`` is not of shape ``[B]``, or a temperature is not
            a finite number > 0.
    """
    temperature = check_temperature("temperature", temperature)
    base_temperature = check_temperature("base_temperature", base_temperature)
    if z.dim() != 2:
        raise ValueError(f"z must have shape [B, D], got {tuple(z.shape)}")
    if groups.dim() != 1 or groups.shape[0] != z.shape[0]:
        raise ValueError(
            f"groups must have shape [B] = [{z.shape[0]}] to match z {tuple(z.shape)}, "
            f"got {tuple(groups.shape)}"
        )
    if z.shape[0] < 2:  # no a != i: no anchor, and a logsumexp over nothing would be -inf
        return z.sum() * 0.0
    with full_precision(z.device):
        x = F.normalize(upcast(z), dim=1)
        groups = groups.to(x.device)
        logits = x @ x.t() / temperature
        eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        positives = (groups[:, None] == groups[None, :]) & ~eye
        n_pos = positives.sum(dim=1)
        # log-denominator over all a != i; the diagonal is removed with -inf, so logsumexp is
        # stable (it subtracts the row maximum internally).
        log_denominator = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)
        log_prob = logits - log_denominator[:, None]
        pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
        # The mean over anchors (rows with a positive) without selecting them: a row without
        # positives has pos_log_prob 0, so it adds 0. No host-device sync (a GPU never waits).
        mean_pos = pos_log_prob / n_pos.clamp(min=1)
        anchors = (n_pos > 0).sum().clamp(min=1)
        return -(temperature / base_temperature) * mean_pos.sum() / anchors


class HierarchicalVisualContrast(nn.Module):
    """HiDisc's hierarchical discrimination loss: a weighted sum of :func:`supcon` per level.

    Args:
        temperature: SupCon temperature (> 0), shared by the levels.
        base_temperature: SupCon base temperature (> 0).
        weights: ``{level: weight}`` over :data:`LEVELS`; a missing level has weight 0, a level
            with weight 0 is not computed (reported as 0). Any mapping works, including an
            omegaconf ``DictConfig``.

    Raises:
        ValueError: a temperature is not > 0, or ``weights`` has an unknown level key (the
            message names it) or a negative weight.

    Call ``forward(embeddings, ids)``:

    - ``embeddings``: ``[B, D]`` (the same embedding at every level, as in HiDisc) or a mapping
      ``{level: [B, D_level]}`` (one head per level); it must hold every level with weight > 0.
    - ``ids``: ``{level: LongTensor[B]}`` with global ids, at least for every level with
      weight > 0.

    Both must be the all-gathered batch in multi-process training.

    Returns ``{"hvc_patch", "hvc_slide", "hvc_patient", "hvc"}`` scalar tensors, ``"hvc"`` being
    the weighted sum. Skipped levels are a constant 0 without gradient.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        base_temperature: float = 0.07,
        weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    ):
        super().__init__()
        self.temperature = check_temperature("temperature", temperature)
        self.base_temperature = check_temperature("base_temperature", base_temperature)
        self.weights = level_weights(weights, "hvc weights")

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
            f"weights={self.weights}"
        )

    def forward(
        self, embeddings: Tensor | Mapping[str, Tensor], ids: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Per-level and weighted-total HVC losses (see the class docstring).

        Raises:
            ValueError: a level with weight > 0 is missing from ``ids`` or ``embeddings``, or a
                shape does not match (see :func:`supcon`).
        """
        reference = _any_tensor(embeddings)
        zero = reference.new_zeros((), dtype=upcast(reference).dtype)
        out: dict[str, Tensor] = {}
        total = zero
        for level in LEVELS:
            weight = self.weights[level]
            if weight == 0:
                out[f"hvc_{level}"] = zero
                continue
            z = level_tensor(embeddings, level, "embeddings")
            groups = level_tensor(ids, level, "ids")
            term = supcon(z, groups, self.temperature, self.base_temperature)
            out[f"hvc_{level}"] = term
            total = total + weight * term
        out["hvc"] = total
        return out


def _any_tensor(x: Tensor | Mapping[str, Tensor]) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if hasattr(x, "values"):  # a Mapping, or a ParameterDict-like container
        for value in x.values():
            if isinstance(value, Tensor):
                return value
        raise ValueError("embeddings mapping holds no tensor")
    raise ValueError(f"embeddings must be a tensor or a mapping of tensors, got {type(x).__name__}")


def level_tensor(x: Tensor | Mapping[str, Tensor], level: str, what: str) -> Tensor:
    """``x`` itself when it is a tensor, else ``x[level]``; ValueError naming a missing level.

    ``x`` may be any mapping-like container (dict, ``DictConfig``, ``nn.ParameterDict``, ...).
    """
    if isinstance(x, Tensor):
        return x
    if not hasattr(x, "__getitem__") or not hasattr(x, "__contains__"):
        raise ValueError(f"{what} must be a tensor or a mapping {{level: tensor}}")
    if level not in x:
        raise ValueError(f"{what} has no entry for level {level!r} (has {sorted(map(str, x))})")
    value = x[level]
    if not isinstance(value, Tensor):
        raise ValueError(f"{what}[{level!r}] must be a tensor, got {type(value).__name__}")
    return value
