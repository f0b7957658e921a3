"""The combined objective: term bookkeeping, gradients through a backbone, Hydra construction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hlss.losses import (
    LEVELS,
    AttributeConsistency,
    HierarchicalVisualContrast,
    HLSSObjective,
    NearestDescriptionKL,
    supcon,
)

B, D_TEXT = 16, 12
N_ATTRIBUTES = {"patch": 5, "slide": 3, "patient": 2}


def hierarchy_ids() -> dict[str, torch.Tensor]:
    shape = (2, 2, 2, 2)
    return {
        "patch": torch.arange(8).view(2, 2, 2, 1).expand(shape).reshape(-1),
        "slide": torch.arange(4).view(2, 2, 1, 1).expand(shape).reshape(-1),
        "patient": torch.arange(2).view(2, 1, 1, 1).expand(shape).reshape(-1),
    }


def text_bank(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        level: torch.randn(a, D_TEXT, generator=generator, dtype=dtype)
        for level, a in N_ATTRIBUTES.items()
    }


def test_terms_and_weighted_sums():
    ids = hierarchy_ids()
    heads = {level: torch.randn(B, 6, dtype=torch.float64) for level in LEVELS}
    u = torch.randn(B, D_TEXT, dtype=torch.float64)
    text = text_bank(dtype=torch.float64)
    align = AttributeConsistency()
    weights = {"patch": 1.0, "slide": 0.5, "patient": 2.0}
    objective = HLSSObjective(HierarchicalVisualContrast(), align, weights)
    out = objective(heads, ids, text_embeddings=text, text_space=u)
    assert set(out) == {
        "hvc_patch", "hvc_slide", "hvc_patient", "hvc",
        "align_patch", "align_slide", "align_patient", "align", "loss",
    }  # fmt: skip
    expected_align = 0.0
    for level in LEVELS:
        assert torch.allclose(out[f"hvc_{level}"], supcon(heads[level], ids[level]))
        term = align(u, text[level], ids[level])
        assert torch.allclose(out[f"align_{level}"], term)
        expected_align = expected_align + weights[level] * term
    assert torch.allclose(out["align"], expected_align)
    assert torch.allclose(out["loss"], out["hvc"] + out["align"])


def test_without_align_loss_is_hvc():
    ids = hierarchy_ids()
    z = torch.randn(B, 8)
    out = HLSSObjective(HierarchicalVisualContrast())(z, ids)
    assert set(out) == {"hvc_patch", "hvc_slide", "hvc_patient", "hvc", "loss"}
    assert torch.equal(out["loss"], out["hvc"])


def test_align_weight_zero_skips_the_level():
    ids = hierarchy_ids()
    text = text_bank()
    del text["patient"]  # not needed: that level is skipped
    objective = HLSSObjective(
        HierarchicalVisualContrast(),
        AttributeConsistency(),
        {"patch": 1.0, "slide": 1.0, "patient": 0.0},
    )
    out = objective(torch.randn(B, 8), ids, text, torch.randn(B, D_TEXT))
    assert out["align_patient"].item() == 0.0
    assert torch.allclose(out["align"], out["align_patch"] + out["align_slide"])


def test_per_level_text_space_mapping():
    ids = hierarchy_ids()
    text = text_bank()
    spaces = {level: torch.randn(B, D_TEXT) for level in LEVELS}
    align = NearestDescriptionKL()
    out = HLSSObjective(HierarchicalVisualContrast(), align)(torch.randn(B, 8), ids, text, spaces)
    for level in LEVELS:
        assert torch.allclose(out[f"align_{level}"], align(spaces[level], text[level]))


def test_missing_text_inputs_raise():
    objective = HLSSObjective(HierarchicalVisualContrast(), AttributeConsistency())
    with pytest.raises(ValueError, match="text_embeddings and text_space"):
        objective(torch.randn(B, 8), hierarchy_ids())
    text = text_bank()
    del text["slide"]
    with pytest.raises(ValueError, match="'slide'"):
        objective(torch.randn(B, 8), hierarchy_ids(), text, torch.randn(B, D_TEXT))


def test_bad_text_dimension_raises():
    objective = HLSSObjective(HierarchicalVisualContrast(), AttributeConsistency())
    with pytest.raises(ValueError, match="dimension"):
        objective(torch.randn(B, 8), hierarchy_ids(), text_bank(), torch.randn(B, D_TEXT + 1))


def test_unknown_align_weight_key_raises():
    with pytest.raises(ValueError, match="'region'"):
        HLSSObjective(HierarchicalVisualContrast(), AttributeConsistency(), {"region": 1.0})


@pytest.mark.parametrize("make", [AttributeConsistency, NearestDescriptionKL])
def test_alignment_alone_moves_the_backbone(make):
    """hvc weights 0: only the language tie trains, and it reaches the backbone's weights."""
    torch.manual_seed(0)
    backbone = nn.Linear(20, D_TEXT)
    images = torch.randn(B, 20)
    text = {level: t.requires_grad_(True) for level, t in text_bank().items()}
    hvc = HierarchicalVisualContrast(weights=dict.fromkeys(LEVELS, 0.0))
    objective = HLSSObjective(hvc, make())
    u = backbone(images)
    out = objective(u, hierarchy_ids(), text_embeddings=text, text_space=u)
    assert out["hvc"].item() == 0.0
    for key in ("align_patch", "align_slide", "align_patient", "align", "loss"):
        assert isinstance(out[key], torch.Tensor) and out[key].requires_grad, key
    out["loss"].backward()
    assert backbone.weight.grad is not None and backbone.weight.grad.abs().sum() > 0
    assert all(t.grad is None for t in text.values())


@pytest.mark.parametrize("make", [AttributeConsistency, NearestDescriptionKL])
def test_alignment_alone_gives_gradients_on_u(make):
    u = torch.randn(B, D_TEXT, requires_grad=True)
    hvc = HierarchicalVisualContrast(weights=dict.fromkeys(LEVELS, 0.0))
    out = HLSSObjective(hvc, make())(torch.randn(B, 8), hierarchy_ids(), text_bank(), u)
    out["loss"].backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_permuting_the_batch_leaves_the_objective_unchanged():
    ids = hierarchy_ids()
    heads = {level: torch.randn(B, 6, dtype=torch.float64) for level in LEVELS}
    u = torch.randn(B, D_TEXT, dtype=torch.float64)
    text = text_bank(dtype=torch.float64)
    objective = HLSSObjective(HierarchicalVisualContrast(), AttributeConsistency())
    before = objective(heads, ids, text, u)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(5))
    after = objective(
        {k: v[perm] for k, v in heads.items()}, {k: v[perm] for k, v in ids.items()}, text, u[perm]
    )
    for key in before:
        assert before[key].item() == pytest.approx(after[key].item(), abs=1e-10), key


def test_objective_decreases_under_adam():
    torch.manual_seed(0)
    z = torch.randn(B, 8, requires_grad=True)
    u = torch.randn(B, D_TEXT, requires_grad=True)
    text = text_bank()
    objective = HLSSObjective(HierarchicalVisualContrast(), AttributeConsistency())
    optimizer = torch.optim.Adam([z, u], lr=0.05)
    first = None
    for _ in range(30):
        loss = objective(z, hierarchy_ids(), text, u)["loss"]
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert objective(z, hierarchy_ids(), text, u)["loss"].item() < 0.8 * first


CONFIG = """
_target_: hlss.losses.HLSSObjective
hvc:
  _target_: hlss.losses.HierarchicalVisualContrast
  temperature: 0.07
  base_temperature: 0.07
  weights: {patch: 1.0, slide: 1.0, patient: 1.0}
align:
  _target_: hlss.losses.AttributeConsistency
  temperature: 0.1
  balance: 1.0
align_weights: {patch: 1.0, slide: 0.5, patient: 0.25}
"""


def test_hydra_instantiate_from_config():
    hydra_utils = pytest.importorskip("hydra.utils")
    omegaconf = pytest.importorskip("omegaconf")
    objective = hydra_utils.instantiate(omegaconf.OmegaConf.create(CONFIG))
    assert isinstance(objective, HLSSObjective)
    assert isinstance(objective.hvc, HierarchicalVisualContrast)
    assert isinstance(objective.align, AttributeConsistency)
    assert objective.align_weights == {"patch": 1.0, "slide": 0.5, "patient": 0.25}
    assert objective.hvc.weights == dict.fromkeys(LEVELS, 1.0)
    out = objective(torch.randn(B, 8), hierarchy_ids(), text_bank(), torch.randn(B, D_TEXT))
    assert torch.isfinite(out["loss"])


def test_config_factory_builds_the_same_objective():
    """`hierarchical_objective` (the `loss` configs' target) equals the hand-assembled module."""
    from hlss.losses import hierarchical_objective

    ids = hierarchy_ids()
    heads = {level: torch.randn(B, 6, dtype=torch.float64) for level in LEVELS}
    u = torch.randn(B, D_TEXT, dtype=torch.float64)
    text = text_bank(dtype=torch.float64)
    weights = {"patch": 1.0, "slide": 0.5, "patient": 2.0}
    align_weights = {"patch": 0.3, "slide": 1.0, "patient": 0.0}
    made = hierarchical_objective(
        temperature=0.1,
        base_temperature=0.05,
        weights=weights,
        align=AttributeConsistency(temperature=0.2),
        align_weights=align_weights,
        name="attr3levels",
    )
    direct = HLSSObjective(
        HierarchicalVisualContrast(temperature=0.1, base_temperature=0.05, weights=weights),
        AttributeConsistency(temperature=0.2),
        align_weights,
    )
    a, b = made(heads, ids, text, u), direct(heads, ids, text, u)
    assert made.name == "attr3levels"
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_config_factory_level_weight_rule():
    """No mapping: every level weighs 1; a mapping: a level it leaves out weighs 0 (both terms)."""
    from hlss.losses import hierarchical_objective

    plain = hierarchical_objective(align=AttributeConsistency())
    assert plain.hvc.weights == dict.fromkeys(LEVELS, 1.0)
    assert plain.align_weights == dict.fromkeys(LEVELS, 1.0)
    partial = hierarchical_objective(
        weights={"patch": 2.0}, align=AttributeConsistency(), align_weights={"slide": 1.0}
    )
    assert partial.hvc.weights == {"patch": 2.0, "slide": 0.0, "patient": 0.0}
    assert partial.align_weights == {"patch": 0.0, "slide": 1.0, "patient": 0.0}
    with pytest.raises(ValueError, match="temperature"):
        hierarchical_objective(temperature=0.0)


@pytest.mark.parametrize("align", [None, NearestDescriptionKL, AttributeConsistency])
@pytest.mark.parametrize("shared_head", [False, True])
def test_objective_never_waits_for_the_device(align, shared_head):
    """No value goes from the device to the host while the objective runs (no ``.item()``,
    ``bool()`` or shape that depends on values, each a GPU sync): dynamo traces the whole
    objective as one graph."""
    dynamo = pytest.importorskip("torch._dynamo")
    objective = HLSSObjective(HierarchicalVisualContrast(), align() if align else None)
    ids, text = hierarchy_ids(), text_bank() if align else None
    heads = torch.randn(B, 6) if shared_head else {level: torch.randn(B, 6) for level in LEVELS}
    u = torch.randn(B, D_TEXT) if align else None

    def loss(heads, u):
        return objective(heads, ids, text_embeddings=text, text_space=u)["loss"]

    dynamo.reset()
    explained = dynamo.explain(loss)(heads, u)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1
