"""align_trains=False: the alignment is computed and reported but adds no gradient -- what the
published HLSS code trained (experiment=opensrh_hlss_reference)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hlss.losses import LEVELS, HLSSObjective, NearestDescriptionKL, hierarchical_objective
from hlss.losses.hvc import HierarchicalVisualContrast
from tests.losses.test_objective import D_TEXT, B, hierarchy_ids, text_bank


def _run(align_trains: bool):
    torch.manual_seed(0)
    backbone = nn.Linear(20, D_TEXT)
    head = nn.Linear(D_TEXT, 8)
    u = backbone(torch.randn(B, 20))
    objective = HLSSObjective(
        HierarchicalVisualContrast(), NearestDescriptionKL(), align_trains=align_trains
    )
    out = objective(head(u), hierarchy_ids(), text_embeddings=text_bank(), text_space=u)
    out["loss"].backward()
    return out, backbone.weight.grad.clone()


def test_the_reported_alignment_is_the_same_and_the_loss_is_the_contrast_alone():
    trained, _ = _run(True)
    logged, _ = _run(False)
    for key in ("hvc", *(f"align_{lv}" for lv in LEVELS), "align"):
        torch.testing.assert_close(logged[key].detach(), trained[key].detach())
    torch.testing.assert_close(logged["loss"], logged["hvc"])
    assert not logged["align"].requires_grad
    assert trained["align"].item() > 0


def test_only_the_contrast_reaches_the_backbone():
    _, grad_logged = _run(False)
    # the same step with the alignment weighted to zero gives the same backbone gradient
    torch.manual_seed(0)
    backbone = nn.Linear(20, D_TEXT)
    head = nn.Linear(D_TEXT, 8)
    u = backbone(torch.randn(B, 20))
    zero = HLSSObjective(
        HierarchicalVisualContrast(), NearestDescriptionKL(), dict.fromkeys(LEVELS, 0.0)
    )
    zero(head(u), hierarchy_ids(), text_embeddings=text_bank(), text_space=u)["loss"].backward()
    torch.testing.assert_close(grad_logged, backbone.weight.grad)
    _, grad_trained = _run(True)
    assert not torch.allclose(grad_trained, grad_logged)


@pytest.mark.parametrize("flag", [True, False])
def test_the_config_factory_passes_the_flag(flag):
    objective = hierarchical_objective(align=NearestDescriptionKL(), align_trains=flag)
    assert objective.align_trains is flag
    assert f"align_trains={flag}" in repr(objective)
