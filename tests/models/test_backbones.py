"""Backbones: shapes, attributes, local checkpoints and config errors (no network)."""

from __future__ import annotations

import pytest
import torch

from hlss.errors import ConfigError
from hlss.models.backbones import KNOWN_BACKBONES, build_backbone

X64 = torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize(
    ("name", "features", "joint"),
    [
        ("resnet18", 512, None),
        ("resnet50", 2048, None),
        ("vit_small", 384, None),
        ("clip_rn50", 1024, 1024),
    ],
)
def test_backbone_shapes_at_64px(name, features, joint):
    model = build_backbone(name, pretrained=False).eval()
    with torch.no_grad():
        out = model(X64)
    assert out.shape == (2, features)
    assert model.num_features == features
    assert model.joint_space_dim == joint


def test_vit_small_accepts_300px():
    model = build_backbone("vit_small").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 300, 300)).shape == (1, 384)


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError, match="known: ") as err:
        build_backbone("resnet1000")
    for name in KNOWN_BACKBONES:
        assert name in str(err.value)


def test_timm_local_checkpoint_roundtrip(tmp_path):
    src = build_backbone("resnet18")
    state = dict(src.state_dict())
    # a full classifier checkpoint: the fc keys must be ignored
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": state}, path)
    loaded = build_backbone("resnet18", pretrained=str(path))
    assert torch.equal(loaded.conv1.weight, src.conv1.weight)
    assert torch.equal(loaded.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var)


def test_missing_checkpoint_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_backbone("resnet18", pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match="not found"):
        build_backbone("clip_rn50", pretrained=str(tmp_path / "nope.pt"))


def test_mismatched_checkpoint_is_config_error(tmp_path):
    state = dict(build_backbone("resnet18").state_dict())
    del state["conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(
        ConfigError, match=r"missing keys conv1\.weight.*unexpected keys extra\.weight"
    ):
        build_backbone("resnet18", pretrained=str(path))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        build_backbone("resnet18", pretrained=str(garbage))


def test_clip_local_checkpoint_full_clip_format(tmp_path):
    """A full open_clip checkpoint (visual.* plus text keys) loads into the visual tower."""
    src = build_backbone("clip_rn50")
    state = {k: v.clone() for k, v in src.state_dict().items()}  # keys 'visual.*'
    state["token_embedding.weight"] = torch.zeros(3, 4)  # text-tower keys are ignored
    state["logit_scale"] = torch.tensor(1.0)
    path = tmp_path / "clip.pt"
    torch.save(state, path)
    loaded = build_backbone("clip_rn50", pretrained=str(path), model="RN50")
    assert torch.equal(loaded.visual.conv1.weight, src.visual.conv1.weight)
    assert torch.equal(
        loaded.visual.attnpool.positional_embedding, src.visual.attnpool.positional_embedding
    )
    assert loaded.joint_space_dim == 1024
    # a bare visual-tower state dict works too
    bare = tmp_path / "visual.pt"
    torch.save(src.visual.state_dict(), bare)
    again = build_backbone("clip_rn50", pretrained=str(bare))
    assert torch.equal(again.visual.layer1[0].conv1.weight, src.visual.layer1[0].conv1.weight)


def test_clip_forward_matches_open_clip_at_native_size():
    model = build_backbone("clip_rn50").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.visual(x), rtol=1e-4, atol=1e-5)


def test_clip_unknown_tag_is_config_error():
    with pytest.raises(ConfigError, match="neither a local file nor an open_clip tag"):
        build_backbone("clip_rn50", pretrained="no-such-tag")


@pytest.mark.parametrize("group", ["backbone", "text_encoder"])
def test_packaged_configs_instantiate(group):
    """Every config of the group composes; the cheap ones are instantiated."""
    from importlib import resources

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    folder = resources.files("hlss.conf").joinpath(group)
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml"))
    expected = {
        "backbone": ["clip_rn50.yaml", "resnet18.yaml", "resnet50.yaml", "vit_small.yaml"],
        "text_encoder": ["minilm.yaml", "open_clip.yaml", "tiny.yaml"],
    }[group]
    assert names == expected
    for name in names:
        cfg = OmegaConf.create(folder.joinpath(name).read_text())
        assert cfg._target_.startswith("hlss.models.")
    cheap = {"backbone": "resnet18.yaml", "text_encoder": "tiny.yaml"}[group]
    obj = instantiate(OmegaConf.create(folder.joinpath(cheap).read_text()))
    if group == "backbone":
        assert obj.num_features == 512 and obj.joint_space_dim is None
    else:
        assert obj.dim == 64 and obj.encode(["x"]).shape == (1, 64)
