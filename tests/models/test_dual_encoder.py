"""DualEncoder: heads initialised from text, shapes, projections, gradients."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from hlss.errors import ConfigError
from hlss.models.attributes import LEVELS, load_bank
from hlss.models.backbones import build_backbone
from hlss.models.dual_encoder import DualEncoder, build_dual_encoder
from hlss.models.text import TinyTextEncoder, embed_prompts


class TinyBackbone(nn.Module):
    """A very small conv net [B,3,H,W] -> [B,F] with the backbone attributes."""

    def __init__(self, features: int = 12, joint_space_dim: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, features, 3, stride=2, padding=1)
        self.num_features = features
        self.joint_space_dim = joint_space_dim

    def forward(self, x):
        return self.conv(x).relu().mean(dim=(2, 3))


def tiny_banks(dim=16, sizes=(5, 4, 3)):
    gen = torch.Generator().manual_seed(0)
    return {
        lv: torch.nn.functional.normalize(torch.randn(a, dim, generator=gen), dim=-1)
        for lv, a in zip(LEVELS, sizes, strict=True)
    }


X = torch.randn(2, 3, 32, 32)


def test_text_heads_hold_text_embeddings_at_step_0():
    banks = tiny_banks()
    model = DualEncoder(TinyBackbone(), 16, banks)
    for lv in LEVELS:
        assert torch.equal(model.heads[lv].weight, getattr(model, f"text_{lv}"))
        assert torch.equal(model.text_embeddings[lv], banks[lv])
        assert model.heads[lv].bias is None
    state = model.state_dict()
    assert {f"text_{lv}" for lv in LEVELS} <= set(state)
    assert not any(b.requires_grad for b in model.text_embeddings.values())


def test_forward_shapes_and_cosine_outputs():
    model = DualEncoder(TinyBackbone(), 16, tiny_banks())
    assert model.projection_type == "linear"
    out = model(X)
    assert out["features"].shape == (2, 12)
    assert out["text_space"].shape == (2, 16)
    torch.testing.assert_close(out["text_space"].norm(dim=-1), torch.ones(2))
    assert {lv: tuple(h.shape) for lv, h in out["heads"].items()} == {
        "patch": (2, 5),
        "slide": (2, 4),
        "patient": (2, 3),
    }
    # head output j = cosine similarity to attribute j
    cos = out["text_space"] @ model.text_patch.T
    torch.testing.assert_close(out["heads"]["patch"], cos)
    assert model.embed(X, "backbone").shape == (2, 12)
    assert model.embed(X, "text_space").shape == (2, 16)
    assert model.embed(X, "slide").shape == (2, 4)
    with pytest.raises(ConfigError, match="not one of"):
        model.embed(X, "organ")


def test_auto_identity_projection_for_joint_space_backbone():
    model = DualEncoder(TinyBackbone(features=16, joint_space_dim=16), 16, tiny_banks())
    assert model.projection_type == "identity"
    assert isinstance(model.projection, nn.Identity)
    out = model(X)
    torch.testing.assert_close(
        out["text_space"], torch.nn.functional.normalize(out["features"], dim=-1)
    )


def test_clip_backbone_identity_projection():
    backbone = build_backbone("clip_rn50")
    banks = {"patch": torch.nn.functional.normalize(torch.randn(4, 1024), dim=-1)}
    model = DualEncoder(backbone, 1024, banks).eval()
    assert model.projection_type == "identity"
    assert model.levels == ("patch",)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["heads"]["patch"].shape == (1, 4)


def test_projection_options():
    assert DualEncoder(TinyBackbone(), 16, tiny_banks(), projection="mlp", proj_hidden=7)(X)[
        "text_space"
    ].shape == (2, 16)
    # auto with a joint space of another width -> linear
    model = DualEncoder(TinyBackbone(joint_space_dim=12), 16, tiny_banks())
    assert model.projection_type == "linear"
    with pytest.raises(ConfigError, match="identity"):
        DualEncoder(TinyBackbone(), 16, tiny_banks(), projection="identity")
    with pytest.raises(ConfigError, match="projection"):
        DualEncoder(TinyBackbone(), 16, tiny_banks(), projection="bogus")
    with pytest.raises(ConfigError, match="text_dim"):
        DualEncoder(TinyBackbone(), 8, tiny_banks())
    with pytest.raises(ConfigError, match="needs at least one level"):
        DualEncoder(TinyBackbone(), 16, None)
    with pytest.raises(ConfigError, match="unknown level"):
        DualEncoder(TinyBackbone(), 16, {"organ": torch.randn(2, 16)})


def test_mlp_head():
    model = DualEncoder(TinyBackbone(), None, None, head="mlp", mlp_dim=10)
    out = model(X)
    assert set(out) == {"features", "heads"}
    assert out["heads"].shape == (2, 10)
    assert model.text_embeddings == {}
    assert model.embed(X, "head").shape == (2, 10)
    out["heads"].sum().backward()
    assert model.backbone.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("level", LEVELS)
def test_gradients_reach_backbone_from_each_head(level):
    model = DualEncoder(TinyBackbone(), 16, tiny_banks())
    out = model(X)
    out["heads"][level].pow(2).sum().backward()
    assert model.backbone.conv.weight.grad is not None
    assert model.backbone.conv.weight.grad.abs().sum() > 0
    assert model.heads[level].weight.grad.abs().sum() > 0


def test_large_user_bank_builds_heads(tmp_path):
    doc = {
        "level": "patch",
        "attributes": [
            {
                "name": f"attribute {i}",
                "descriptions": [f"cells of kind {i}", f"tissue looks like {i}"],
            }
            for i in range(128)
        ],
    }
    path = tmp_path / "attr128.yaml"
    path.write_text(yaml.safe_dump(doc))
    bank = load_bank(str(path), level="patch")
    assert len(bank) == 128
    enc = TinyTextEncoder(dim=32)
    emb = embed_prompts(enc, bank.descriptions, tmp_path / "cache")
    model = DualEncoder(TinyBackbone(), enc.dim, {"patch": emb})
    assert model(X)["heads"]["patch"].shape == (2, 128)
    assert torch.equal(model.heads["patch"].weight, emb)


def test_build_dual_encoder_from_packaged_banks(tmp_path):
    enc = TinyTextEncoder(dim=32)
    model = build_dual_encoder(
        TinyBackbone(), enc, text_cache_dir=str(tmp_path), bank_sizes={"patch": 6}
    )
    assert model.num_attributes == {
        "patch": 6,
        "slide": len(load_bank("srh_slide")),
        "patient": len(load_bank("srh_patient")),
    }
    assert len(list(tmp_path.glob("text-*.pt"))) == 3
    mlp = build_dual_encoder(TinyBackbone(), None, head="mlp", mlp_dim=8)
    assert mlp(X)["heads"].shape == (2, 8)


def test_hidisc_head_is_one_linear_layer_by_default():
    """HiDisc's published head (`mlp_hidden: []`): one linear map from the features to 128."""
    model = DualEncoder(TinyBackbone(), None, None, head="mlp")
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1
    assert (linears[0].in_features, linears[0].out_features) == (model.num_features, 128)
    deep = DualEncoder(TinyBackbone(), None, None, head="mlp", mlp_dim=8, mlp_hidden=[6, 5])
    widths = [(m.in_features, m.out_features) for m in deep.head if isinstance(m, nn.Linear)]
    assert widths == [(deep.num_features, 6), (6, 5), (5, 8)]
    assert sum(isinstance(m, nn.ReLU) for m in deep.head) == 2
    assert deep(X)["heads"].shape == (2, 8)


def test_orthogonal_head_init_is_the_nearest_orthonormal_matrix():
    banks = tiny_banks(dim=16, sizes=(5, 4, 3))
    model = DualEncoder(TinyBackbone(), 16, banks, head_init="orthogonal")
    for lv in LEVELS:
        w = model.heads[lv].weight.detach().double()
        emb = banks[lv].double()
        torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0], dtype=torch.float64))
        # nearest in Frobenius norm: no random orthonormal-row matrix comes closer
        gen = torch.Generator().manual_seed(1)
        best = (w - emb).norm()
        for _ in range(50):
            q, _ = torch.linalg.qr(torch.randn(16, w.shape[0], generator=gen, dtype=torch.float64))
            assert best <= (q.T - emb).norm() + 1e-9
        # the alignment losses still see the attribute embeddings themselves
        assert torch.equal(model.text_embeddings[lv], banks[lv])


def test_random_head_init_ignores_the_text():
    banks = tiny_banks()
    torch.manual_seed(0)
    model = DualEncoder(TinyBackbone(), 16, banks, head_init="random")
    for lv in LEVELS:
        assert not torch.allclose(model.heads[lv].weight, banks[lv])
        assert torch.equal(model.text_embeddings[lv], banks[lv])


def test_unknown_head_init_is_refused():
    with pytest.raises(ConfigError, match=r"model\.head_init"):
        DualEncoder(TinyBackbone(), 16, tiny_banks(), head_init="whitened")


def test_mlp_head_per_level():
    model = DualEncoder(TinyBackbone(), None, None, head="mlp", mlp_dim=8, head_per_level=True)
    out = model(X)
    assert set(out["heads"]) == set(LEVELS)
    assert all(tuple(h.shape) == (2, 8) for h in out["heads"].values())
    # separate parameters: the levels' heads start (and train) independently
    weights = [model.heads[lv][0].weight for lv in LEVELS]
    assert not torch.equal(weights[0], weights[1])
    assert model.text_embeddings == {}
    torch.testing.assert_close(model.embed(X, "slide"), out["heads"]["slide"])
    out["heads"]["patient"].sum().backward()
    assert model.heads["patient"][0].weight.grad is not None
    assert model.heads["patch"][0].weight.grad is None
    with pytest.raises(ConfigError, match="embed source 'head'"):
        model.embed(X, "head")


def test_text_heads_shared_across_levels():
    banks = tiny_banks(sizes=(5, 4, 3))
    torch.manual_seed(0)
    model = DualEncoder(TinyBackbone(), 16, banks, head_per_level=False)
    assert not model.head_per_level
    out = model(X)
    joint = out["heads"]  # one tensor: every level's term uses it, like HiDisc's shared head
    assert isinstance(joint, torch.Tensor)
    assert tuple(joint.shape) == (2, 5 + 4 + 3)
    # the joint embedding is the level heads side by side; embed() of a level is its own slice
    torch.testing.assert_close(joint[:, 5:9], model.embed(X, "slide"))
    # one level's contrastive term now trains every level's head
    joint.sum().backward()
    assert all(model.heads[lv].weight.grad.abs().sum() > 0 for lv in LEVELS)


def test_head_layouts_default_to_the_papers():
    assert DualEncoder(TinyBackbone(), 16, tiny_banks()).head_per_level
    assert not DualEncoder(TinyBackbone(), None, None, head="mlp").head_per_level
