"""Losses of the HLSS method: hierarchical visual contrast and the per-level language tie.

All losses take tensors and return scalar tensors that carry gradients. They contain no
distributed code: in multi-process training, all-gather embeddings (with gradients) and ids
before calling them, so every image of the global batch is a negative / group member.
"""

from hlss.levels import LEVELS
from hlss.losses.align import AttributeConsistency, NearestDescriptionKL, check_alignment_inputs
from hlss.losses.hvc import HierarchicalVisualContrast, supcon
from hlss.losses.objective import HLSSObjective, hierarchical_objective

__all__ = [
    "LEVELS",
    "AttributeConsistency",
    "HLSSObjective",
    "HierarchicalVisualContrast",
    "NearestDescriptionKL",
    "check_alignment_inputs",
    "hierarchical_objective",
    "supcon",
]
