"""Hierarchical visual contrast: supcon against a plain loop implementation, and the module."""

from __future__ import annotations

import math

import pytest
import torch

from hlss.losses import LEVELS, HierarchicalVisualContrast, supcon


def reference_supcon(z: torch.Tensor, groups: torch.Tensor, tau: float, base: float) -> float:
    """The formula written out with Python loops over anchors, positives and denominators."""
    rows = [[float(v) for v in row] for row in z]
    norms = [math.sqrt(sum(v * v for v in row)) for row in rows]
    x = [[v / n for v in row] for row, n in zip(rows, norms, strict=True)]
    g = [int(v) for v in groups]
    n = len(x)

    def sim(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(x[i], x[j], strict=True))

    losses = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and g[p] == g[i]]
        if not positives:
            continue
        denominator = sum(math.exp(sim(i, a) / tau) for a in range(n) if a != i)
        log_probs = [sim(i, p) / tau - math.log(denominator) for p in positives]
        losses.append(-(tau / base) * sum(log_probs) / len(log_probs))
    return sum(losses) / len(losses) if losses else 0.0


KINDS = ("views", "random", "one_group", "singletons")


def make_groups(kind: str, b: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "views":  # pairs of views of the same patch
        return torch.arange(b).div(2, rounding_mode="floor")
    if kind == "random":
        return torch.randint(0, max(2, b // 3), (b,), generator=generator)
    if kind == "one_group":
        return torch.full((b,), 7)
    if kind == "singletons":
        return torch.arange(b) * 3 + 1
    raise AssertionError(kind)


def hierarchy_ids(p: int = 2, s: int = 2, n: int = 2, t: int = 2) -> dict[str, torch.Tensor]:
    """Global ids of a flattened ``[P, S, N, T]`` batch."""
    shape = (p, s, n, t)
    patch = torch.arange(p * s * n).view(p, s, n, 1).expand(shape).reshape(-1)
    slide = torch.arange(p * s).view(p, s, 1, 1).expand(shape).reshape(-1) + 100
    patient = torch.arange(p).view(p, 1, 1, 1).expand(shape).reshape(-1) + 1000
    return {"patch": patch, "slide": slide, "patient": patient}


@pytest.mark.parametrize("shape", [(4, 2), (8, 16), (12, 5), (32, 64)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.05, 0.07, 0.5])
@pytest.mark.parametrize("base_temperature", [0.07, 0.1])
def test_supcon_matches_loop_reference(shape, kind, temperature, base_temperature):
    seed = 1000 * shape[0] + 10 * shape[1] + KINDS.index(kind)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=generator, dtype=torch.float64) * 3
    groups = make_groups(kind, shape[0], generator)
    got = supcon(z, groups, temperature, base_temperature)
    expected = reference_supcon(z, groups, temperature, base_temperature)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, abs=1e-5, rel=1e-5)


def test_supcon_hand_computed_values():
    # Two tight pairs on orthogonal axes, tau = tau_base = 1: every anchor sees s=1 to its
    # positive and s=0 to both negatives, so l = -(1 - log(e + 1 + 1)).
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    assert supcon(z, groups, 1.0, 1.0).item() == pytest.approx(0.5514447139320509, abs=1e-12)
    assert math.log(math.e + 2) - 1 == pytest.approx(0.5514447139320509, abs=1e-15)
    # Same points at tau = 0.5, tau_base = 1: l = -0.5 * (2 - log(e^2 + 2)).
    assert supcon(z, groups, 0.5, 1.0).item() == pytest.approx(0.1197723831109423, abs=1e-12)
    # Points at 0, 60, 90 and 180 degrees, pairs {0, 60} and {90, 180}, tau = tau_base = 1:
    # mean of -(0.5 - log(e^.5 + 1 + e^-1)), -(0.5 - log(e^.5 + e^(sqrt3/2) + e^-.5)),
    #         log(2 + e^(sqrt3/2)) and log(e^-1 + e^-.5 + 1).
    r = math.sqrt(3) / 2
    z = torch.tensor([[1.0, 0.0], [0.5, r], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    assert supcon(z, groups, 1.0, 1.0).item() == pytest.approx(0.9485009132050569, abs=1e-12)


def test_supcon_no_positive_is_zero_attached_to_graph():
    z = torch.randn(6, 4, requires_grad=True)
    loss = supcon(z, torch.arange(6))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_supcon_is_stable_at_tiny_temperature():
    z = torch.randn(16, 8, dtype=torch.float32)
    loss = supcon(z, torch.arange(16) // 4, temperature=1e-4, base_temperature=1e-4)
    assert torch.isfinite(loss)


def test_supcon_half_precision_input_computed_in_float32():
    z = torch.randn(16, 8)
    groups = torch.arange(16) // 2
    low = supcon(z.bfloat16(), groups)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(supcon(z.bfloat16().float(), groups).item(), abs=1e-5)


@pytest.mark.parametrize(
    ("z", "groups"),
    [
        (torch.randn(8), torch.zeros(8, dtype=torch.long)),
        (torch.randn(2, 4, 3), torch.zeros(2, dtype=torch.long)),
        (torch.randn(8, 3), torch.zeros(7, dtype=torch.long)),
        (torch.randn(8, 3), torch.zeros(8, 1, dtype=torch.long)),
    ],
)
def test_supcon_bad_shapes_raise(z, groups):
    with pytest.raises(ValueError, match="shape"):
        supcon(z, groups)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_temperatures_raise(bad):
    z, groups = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="temperature"):
        supcon(z, groups, temperature=bad)
    with pytest.raises(ValueError, match="base_temperature"):
        supcon(z, groups, base_temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        HierarchicalVisualContrast(temperature=bad)
    with pytest.raises(ValueError, match="base_temperature"):
        HierarchicalVisualContrast(base_temperature=bad)


def test_module_weighted_sum_of_levels():
    ids = hierarchy_ids()
    z = torch.randn(16, 8, dtype=torch.float64)
    weights = {"patch": 0.5, "slide": 2.0, "patient": 1.5}
    out = HierarchicalVisualContrast(0.1, 0.07, weights)(z, ids)
    assert set(out) == {"hvc_patch", "hvc_slide", "hvc_patient", "hvc"}
    expected = 0.0
    for level in LEVELS:
        term = supcon(z, ids[level], 0.1, 0.07)
        assert torch.allclose(out[f"hvc_{level}"], term)
        expected = expected + weights[level] * term
    assert torch.allclose(out["hvc"], expected)
    # Levels really differ (patch / slide / patient positives are different sets).
    assert len({round(out[f"hvc_{level}"].item(), 6) for level in LEVELS}) == 3


def test_module_weight_zero_skips_the_level():
    ids = hierarchy_ids()
    z = torch.randn(16, 8)
    hvc = HierarchicalVisualContrast(weights={"patch": 1.0, "slide": 0.0, "patient": 0.0})
    # The skipped levels need neither ids nor embeddings: they are not computed.
    out = hvc({"patch": z}, {"patch": ids["patch"]})
    assert out["hvc_slide"].item() == 0.0
    assert out["hvc_patient"].item() == 0.0
    assert torch.allclose(out["hvc"], supcon(z, ids["patch"]))
    # A missing level means weight 0.
    assert HierarchicalVisualContrast(weights={"slide": 1.0}).weights == {
        "patch": 0.0,
        "slide": 1.0,
        "patient": 0.0,
    }


def test_module_single_tensor_equals_repeated_mapping():
    ids = hierarchy_ids(3, 2, 2, 2)
    z = torch.randn(24, 16)
    hvc = HierarchicalVisualContrast()
    single = hvc(z, ids)
    mapping = hvc(dict.fromkeys(LEVELS, z), ids)
    for key in single:
        assert torch.allclose(single[key], mapping[key])


def test_module_one_embedding_per_level():
    ids = hierarchy_ids()
    heads = {
        "patch": torch.randn(16, 4),
        "slide": torch.randn(16, 6),
        "patient": torch.randn(16, 5),
    }
    out = HierarchicalVisualContrast()(heads, ids)
    for level in LEVELS:
        assert torch.allclose(out[f"hvc_{level}"], supcon(heads[level], ids[level]))


def test_module_unknown_or_negative_weight_raises():
    with pytest.raises(ValueError, match="'tissue'"):
        HierarchicalVisualContrast(weights={"patch": 1.0, "tissue": 1.0})
    with pytest.raises(ValueError, match="slide"):
        HierarchicalVisualContrast(weights={"slide": -1.0})


def test_module_missing_level_input_raises():
    ids = hierarchy_ids()
    z = torch.randn(16, 8)
    hvc = HierarchicalVisualContrast()
    with pytest.raises(ValueError, match="'patient'"):
        hvc(z, {"patch": ids["patch"], "slide": ids["slide"]})
    with pytest.raises(ValueError, match="'slide'"):
        hvc({"patch": z, "patient": z}, ids)


def test_module_accepts_dictconfig_weights():
    omegaconf = pytest.importorskip("omegaconf")
    weights = omegaconf.OmegaConf.create({"patch": 1, "slide": 0.5, "patient": 0})
    hvc = HierarchicalVisualContrast(weights=weights)
    assert hvc.weights == {"patch": 1.0, "slide": 0.5, "patient": 0.0}


def test_permuting_the_batch_leaves_the_loss_unchanged():
    ids = hierarchy_ids(2, 3, 2, 2)
    z = torch.randn(24, 8, dtype=torch.float64)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(3))
    hvc = HierarchicalVisualContrast()
    before = hvc(z, ids)
    after = hvc(z[perm], {k: v[perm] for k, v in ids.items()})
    for key in before:
        assert before[key].item() == pytest.approx(after[key].item(), abs=1e-10)


def test_wrapped_around_duplicate_patch_is_a_positive():
    # The same patch id twice (wrap-around): both copies are positives of each other.
    z = torch.randn(6, 4, dtype=torch.float64)
    groups = torch.tensor([5, 5, 9, 9, 5, 5])
    assert supcon(z, groups).item() == pytest.approx(reference_supcon(z, groups, 0.07, 0.07))


@pytest.mark.parametrize("level", LEVELS)
def test_each_level_decreases_under_adam(level):
    torch.manual_seed(0)
    ids = hierarchy_ids()
    z = torch.randn(16, 8, requires_grad=True)
    hvc = HierarchicalVisualContrast(weights={level: 1.0})
    optimizer = torch.optim.Adam([z], lr=0.05)
    first = None
    for _ in range(30):
        loss = hvc(z, ids)["hvc"]
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert hvc(z, ids)["hvc"].item() < 0.8 * first


def test_supcon_of_one_image_is_zero_with_zero_gradients():
    z = torch.randn(1, 4, requires_grad=True)
    loss = supcon(z, torch.tensor([3]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
