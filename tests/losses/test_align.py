"""The language tie: NearestDescriptionKL and AttributeConsistency."""

from __future__ import annotations

import math

import pytest
import torch

from hlss.losses import AttributeConsistency, NearestDescriptionKL


def unit(row: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in row))
    return [v / norm for v in row]


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def reference_nearest_kl(u: torch.Tensor, text: torch.Tensor, tau: float) -> float:
    """Nearest attribute by cosine, then KL(p||q) + KL(q||p) over dimensions, with loops."""
    images = [unit([float(v) for v in row]) for row in u]
    texts = [unit([float(v) for v in row]) for row in text]
    total = 0.0
    for x in images:
        cosines = [sum(a * b for a, b in zip(x, t, strict=True)) for t in texts]
        target = texts[max(range(len(texts)), key=lambda j: cosines[j])]
        p = softmax([v / tau for v in x])
        q = softmax([v / tau for v in target])
        kl_pq = sum(pd * math.log(pd / qd) for pd, qd in zip(p, q, strict=True))
        kl_qp = sum(qd * math.log(qd / pd) for pd, qd in zip(p, q, strict=True))
        total += kl_pq + kl_qp
    return total / len(images)


def reference_consistency(u, text, groups, tau, balance_weight):
    """AttributeConsistency written with loops: (consistency, balance, total)."""
    images = [unit([float(v) for v in row]) for row in u]
    texts = [unit([float(v) for v in row]) for row in text]
    g = [int(v) for v in groups]
    probs = [
        softmax([sum(a * b for a, b in zip(x, t, strict=True)) / tau for t in texts])
        for x in images
    ]
    n, a = len(images), len(texts)
    kls = []
    for i in range(n):
        members = [j for j in range(n) if g[j] == g[i]]
        if len(members) == 1:
            kls.append(0.0)
            continue
        q = [sum(probs[j][k] for j in members) / len(members) for k in range(a)]
        kls.append(sum(q[k] * math.log(q[k] / probs[i][k]) for k in range(a) if q[k] > 0))
    consistency = sum(kls) / n
    mean = [sum(probs[i][k] for i in range(n)) / n for k in range(a)]
    entropy = -sum(m * math.log(m) for m in mean if m > 0)
    balance = math.log(a) - entropy
    return consistency, balance, consistency + balance_weight * balance


def random_inputs(b=12, d=16, a=5, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, generator=generator, dtype=dtype)
    text = torch.randn(a, d, generator=generator, dtype=dtype)
    groups = torch.arange(b).div(3, rounding_mode="floor")
    return u, text, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.05, 0.1, 1.0])
def test_nearest_kl_matches_direct_implementation(seed, tau):
    u, text, groups = random_inputs(b=10, d=8, a=4, seed=seed)
    got = NearestDescriptionKL(temperature=tau)(u, text, groups)
    assert got.item() == pytest.approx(reference_nearest_kl(u, text, tau), abs=1e-10, rel=1e-8)


def test_nearest_kl_is_zero_when_images_equal_their_nearest_text():
    _, text, _ = random_inputs(a=4)
    u = 3.0 * text[[0, 1, 2, 3, 1, 0]]
    assert NearestDescriptionKL()(u, text).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("balance", [0.0, 1.0, 2.5])
def test_attribute_consistency_matches_direct_implementation(seed, balance):
    u, text, groups = random_inputs(seed=seed)
    groups = groups.clone()
    groups[-1] = 99  # one singleton group
    loss = AttributeConsistency(temperature=0.1, balance=balance)
    terms = loss.terms(u, text, groups)
    consistency, bal, total = reference_consistency(u, text, groups, 0.1, balance)
    assert terms["consistency"].item() == pytest.approx(consistency, abs=1e-10)
    assert terms["balance"].item() == pytest.approx(bal, abs=1e-10)
    assert loss(u, text, groups).item() == pytest.approx(total, abs=1e-10)


def test_identical_distributions_in_a_group_give_zero_consistency():
    _, text, _ = random_inputs()
    base = torch.randn(4, 16, dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    u = base[groups] * torch.rand(8, 1, dtype=torch.float64).add(0.5)  # same direction per group
    assert AttributeConsistency().terms(u, text, groups)["consistency"].item() == pytest.approx(
        0.0, abs=1e-12
    )


def test_singleton_groups_give_zero_consistency():
    u, text, _ = random_inputs()
    terms = AttributeConsistency().terms(u, text, torch.arange(12))
    assert terms["consistency"].item() == 0.0


def test_balance_is_zero_for_uniform_mean_and_log_a_for_collapse():
    text = torch.eye(4, 6, dtype=torch.float64)
    # Orthogonal to every attribute: each p_i is uniform, so the batch mean is uniform.
    u = torch.zeros(5, 6, dtype=torch.float64)
    u[:, 4:] = torch.randn(5, 2, dtype=torch.float64)
    terms = AttributeConsistency().terms(u, text, torch.zeros(5, dtype=torch.long))
    assert terms["balance"].item() == pytest.approx(0.0, abs=1e-12)
    assert terms["consistency"].item() == pytest.approx(0.0, abs=1e-12)
    # Every image on attribute 0 with huge logits: the batch mean is one-hot, H = 0.
    collapsed = text[[0, 0, 0, 0, 0]] * 2.0
    loss = AttributeConsistency(temperature=1e-3)
    terms = loss.terms(collapsed, text, torch.zeros(5, dtype=torch.long))
    assert terms["balance"].item() == pytest.approx(math.log(4), abs=1e-9)
    assert torch.isfinite(loss(collapsed, text, torch.zeros(5, dtype=torch.long)))
    # Half on attribute 0, half on attribute 1 of A = 2 attributes: uniform mean again.
    two = torch.eye(2, 3, dtype=torch.float64)
    split = two[[0, 1, 0, 1]]
    assert loss.terms(split, two, torch.arange(4))["balance"].item() == pytest.approx(
        0.0, abs=1e-12
    )


@pytest.mark.parametrize("make", [NearestDescriptionKL, AttributeConsistency])
def test_loss_decreases_under_adam(make):
    torch.manual_seed(0)
    _, text, groups = random_inputs(dtype=torch.float32)
    u = torch.randn(12, 16, requires_grad=True)
    loss_fn = make()
    optimizer = torch.optim.Adam([u], lr=0.05)
    first = None
    for _ in range(30):
        loss = loss_fn(u, text, groups)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss_fn(u, text, groups).item() < 0.8 * first


@pytest.mark.parametrize("make", [NearestDescriptionKL, AttributeConsistency])
def test_gradients_reach_images_not_text(make):
    u, text, groups = random_inputs(dtype=torch.float32)
    u.requires_grad_(True)
    text.requires_grad_(True)
    loss = make()(u, text, groups)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad
    loss.backward()
    assert u.grad is not None and u.grad.abs().sum() > 0
    assert text.grad is None


@pytest.mark.parametrize("make", [NearestDescriptionKL, AttributeConsistency])
def test_bad_shapes_raise(make):
    loss = make()
    u, text, groups = random_inputs(b=6, d=8, a=3)
    with pytest.raises(ValueError, match="dimension"):
        loss(u, torch.randn(3, 7, dtype=u.dtype), groups)
    with pytest.raises(ValueError, match="groups"):
        loss(u, text, groups[:-1])
    with pytest.raises(ValueError, match="u must"):
        loss(u[0], text, groups)
    with pytest.raises(ValueError, match="text must"):
        loss(u, text[0], groups)
    with pytest.raises(ValueError, match="text must"):
        loss(u, text[:0], groups)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_hyperparameters_raise(bad):
    with pytest.raises(ValueError, match="temperature"):
        NearestDescriptionKL(temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        AttributeConsistency(temperature=bad)
    if bad != 0.0:
        with pytest.raises(ValueError, match="balance"):
            AttributeConsistency(balance=bad)


def test_attribute_consistency_needs_groups():
    u, text, _ = random_inputs()
    with pytest.raises(ValueError, match="groups"):
        AttributeConsistency()(u, text, None)


def test_permutation_invariance():
    u, text, groups = random_inputs()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    for loss in (NearestDescriptionKL(), AttributeConsistency()):
        before = loss(u, text, groups).item()
        assert loss(u[perm], text, groups[perm]).item() == pytest.approx(before, abs=1e-12)
