"""The combined HLSS objective: hierarchical visual contrast + per-level language tie."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from hlss.levels import LEVELS
from hlss.losses.hvc import (
    DEFAULT_WEIGHTS,
    HierarchicalVisualContrast,
    level_tensor,
    level_weights,
)


class HLSSObjective(nn.Module):
    """``loss = hvc + sum_l align_weights[l] * align(text_space_l, text_embeddings[l], ids[l])``.

    Built directly or by Hydra, e.g.::

        _target_: hlss.losses.HLSSObjective
        hvc: {_target_: hlss.losses.HierarchicalVisualContrast, temperature: 0.07,
              base_temperature: 0.07, weights: {patch: 1.0, slide: 1.0, patient: 1.0}}
        align: {_target_: hlss.losses.AttributeConsistency, temperature: 0.1, balance: 1.0}
        align_weights: {patch: 1.0, slide: 1.0, patient: 1.0}

    Args:
        hvc: the visual term, :class:`~hlss.losses.HierarchicalVisualContrast`.
        align: a language-tie module called as ``align(u [B, D], text [A, D], groups [B])``
            (:class:`~hlss.losses.AttributeConsistency`,
            :class:`~hlss.losses.NearestDescriptionKL`), or ``None`` for HiDisc (no language
            terms; ``loss = hvc``).
        align_weights: ``{level: weight}`` (any mapping, e.g. a ``DictConfig``); a missing level
            has weight 0, and a level with weight 0 is not computed (reported as 0).
        name: what the objective is called in configs and run names (``attr3levels``...).
        align_trains: ``False`` computes and reports the alignment terms without gradients and
            leaves them out of ``loss`` -- what the published HLSS code trained (it turned the
            term into a Python float), for comparison with the paper's table.

    Raises:
        ValueError: ``hvc`` is not a module, or ``align_weights`` has an unknown level key or a
            negative weight.

    The inputs of :meth:`forward` must be the all-gathered batch in multi-process training; the
    per-level work is batched (the only Python loop is over the three levels).
    """

    def __init__(
        self,
        hvc: HierarchicalVisualContrast,
        align: nn.Module | None = None,
        align_weights: Mapping[str, float] = DEFAULT_WEIGHTS,
        name: str = "",
        align_trains: bool = True,
    ):
        super().__init__()
        self.name = str(name)
        self.align_trains = bool(align_trains)
        if not isinstance(hvc, nn.Module):
            raise ValueError(f"hvc must be an nn.Module, got {type(hvc).__name__}")
        if align is not None and not isinstance(align, nn.Module):
            raise ValueError(f"align must be an nn.Module or None, got {type(align).__name__}")
        self.hvc = hvc
        self.align = align
        self.align_weights = level_weights(align_weights, "align_weights")

    def extra_repr(self) -> str:
        if self.align is None:
            return ""
        return f"align_weights={self.align_weights}, align_trains={self.align_trains}"

    def forward(
        self,
        head_embeddings: Tensor | Mapping[str, Tensor],
        ids: Mapping[str, Tensor],
        text_embeddings: Mapping[str, Tensor] | None = None,
        text_space: Tensor | Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Evaluate every term.

        Args:
            head_embeddings: ``[B, D]`` or ``{level: [B, D_level]}``, the HVC embeddings.
            ids: ``{level: LongTensor[B]}`` global ids per level.
            text_embeddings: ``{level: [A_level, D]}`` frozen attribute embeddings (detached
                inside); needed when ``align`` is set and some align weight is > 0.
            text_space: image embeddings in the text space, ``[B, D]`` shared by the levels or
                ``{level: [B, D]}``; needed like ``text_embeddings``.

        Returns:
            Scalar tensors ``hvc_patch``, ``hvc_slide``, ``hvc_patient``, ``hvc`` and, when
            ``align`` is set, ``align_patch``, ``align_slide``, ``align_patient``, ``align``
            (weighted sum); ``loss = hvc (+ align)`` (``align`` only when ``align_trains``).

        Raises:
            ValueError: a needed input or level entry is missing, or shapes do not match.
        """
        out = self.hvc(head_embeddings, ids)
        loss = out["hvc"]
        if self.align is not None:
            zero = loss.new_zeros(())
            active = [level for level in LEVELS if self.align_weights[level] != 0]
            if active and (text_embeddings is None or text_space is None):
                raise ValueError(
                    "the alignment term needs text_embeddings and text_space "
                    f"(align weights > 0 at {active})"
                )
            total = zero
            for level in LEVELS:
                weight = self.align_weights[level]
                if weight == 0:
                    out[f"align_{level}"] = zero
                    continue
                u = level_tensor(text_space, level, "text_space")
                text = level_tensor(text_embeddings, level, "text_embeddings")
                groups = level_tensor(ids, level, "ids")
                with torch.set_grad_enabled(self.align_trains and torch.is_grad_enabled()):
                    term = self.align(u, text, groups)
                out[f"align_{level}"] = term
                total = total + weight * term
            out["align"] = total
            if self.align_trains:
                loss = loss + total
        out["loss"] = loss
        return out


def hierarchical_objective(
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    weights: Mapping[str, float] | None = None,
    align: nn.Module | None = None,
    align_weights: Mapping[str, float] | None = None,
    name: str = "",
    align_trains: bool = True,
) -> HLSSObjective:
    """The objective of a ``loss`` config: HVC from flat keys, the language tie as a nested node.

    This is the ``_target_`` of every ``conf/loss/*.yaml``, so the paper's knobs sit where users
    look for them (``loss.temperature``, ``loss.weights.slide``, ``loss.align_weights.patient``)
    while the language tie stays a swappable module (``loss.align``)::

        _target_: hlss.losses.hierarchical_objective
        temperature: 0.07
        weights: {patch: 1.0, slide: 1.0, patient: 1.0}
        align: {_target_: hlss.losses.NearestDescriptionKL, temperature: 0.1}
        align_weights: {patch: 1.0, slide: 1.0, patient: 1.0}

    Args:
        temperature, base_temperature: ``tau`` and ``tau_base`` of every HVC term.
        weights: HVC ``{level: weight}``; ``None`` -> 1 at every level; a level missing from a
            mapping has weight 0 (the same rule as ``align_weights``).
        align: the language-tie module, or ``None`` (HiDisc / ``hvc3``: no language terms).
        align_weights: language-tie ``{level: weight}``; ``None`` -> 1 at every level. Ignored
            when ``align`` is ``None``.
        name: the objective's name (``loss.name``), kept on the module.
        align_trains: ``False``: the alignment is computed and logged but not back-propagated
            (``experiment=opensrh_hlss_reference``: what the published code trained).

    Raises:
        ValueError: a temperature that is not a finite number > 0, an unknown level, or a
            negative weight.
    """
    hvc = HierarchicalVisualContrast(
        temperature=temperature,
        base_temperature=base_temperature,
        weights=DEFAULT_WEIGHTS if weights is None else weights,
    )
    return HLSSObjective(
        hvc,
        align=align,
        align_weights=DEFAULT_WEIGHTS if align_weights is None else align_weights,
        name=name,
        align_trains=align_trains,
    )
