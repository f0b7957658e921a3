"""CLIP weights trained with QuickGELU are built with QuickGELU (no network)."""

from __future__ import annotations

import open_clip
import pytest
import torch

from hlss.models.backbones import activation_matched_name, build_backbone, open_clip_source
from hlss.models.text import OpenCLIPTextEncoder


def _text_activations(clip) -> set[type]:
    return {type(block.mlp.gelu) for block in clip.transformer.resblocks}


def _quick_gelu_tags(model: str) -> list[str]:
    return [
        t
        for t in open_clip.list_pretrained_tags_by_model(model)
        if (open_clip.get_pretrained_cfg(model, t) or {}).get("quick_gelu")
    ]


@pytest.mark.parametrize("tag", _quick_gelu_tags("RN50"))
def test_quickgelu_weights_get_a_quickgelu_model(tag):
    name, arg, kind = open_clip_source("RN50", tag)
    assert (name, arg, kind) == ("RN50-quickgelu", tag, "hub")
    # the model open_clip builds under that name has the activation the weights were trained with
    clip = open_clip.create_model(name, pretrained=None)
    assert _text_activations(clip) == {open_clip.transformer.QuickGELU}
    # ... and the plain name would not have had it
    plain = open_clip.create_model("RN50", pretrained=None)
    assert open_clip.transformer.QuickGELU not in _text_activations(plain)


def test_the_paper_weights_are_quickgelu_weights():
    assert "cc12m" in _quick_gelu_tags("RN50")


def test_gelu_weights_and_explicit_names_are_left_alone():
    gelu_tags = [
        t
        for t in open_clip.list_pretrained_tags_by_model("ViT-B-32")
        if not (open_clip.get_pretrained_cfg("ViT-B-32", t) or {}).get("quick_gelu")
    ]
    assert gelu_tags, "open_clip lists GELU-trained ViT-B-32 weights"
    assert activation_matched_name("ViT-B-32", gelu_tags[0]) == "ViT-B-32"
    assert activation_matched_name("RN50-quickgelu", "cc12m") == "RN50-quickgelu"
    assert activation_matched_name("RN50", None) == "RN50"  # random weights: as named


def test_text_encoder_and_backbone_share_the_joint_space():
    enc = OpenCLIPTextEncoder(model="RN50", pretrained="cc12m")  # nothing is loaded yet
    assert enc.model_name == "RN50-quickgelu"
    named = OpenCLIPTextEncoder(model="RN50-quickgelu", pretrained="cc12m")
    assert enc.joint_space == named.joint_space


def test_quickgelu_checkpoint_file_round_trips(tmp_path):
    torch.manual_seed(0)
    clip = open_clip.create_model("RN50-quickgelu", pretrained=None)
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": clip.state_dict()}, path)
    enc = OpenCLIPTextEncoder(model="RN50-quickgelu", pretrained=str(path))
    out = enc.encode(["a dense sheet of tumour cells"])
    tok = open_clip.get_tokenizer("RN50-quickgelu")
    with torch.no_grad():
        ref = torch.nn.functional.normalize(
            clip.encode_text(tok(["a dense sheet of tumour cells"])), dim=-1
        )
    assert torch.allclose(out, ref, atol=1e-5)
    assert _text_activations(enc._clip) == {open_clip.transformer.QuickGELU}
    visual = build_backbone("clip_rn50", pretrained=str(path), model="RN50-quickgelu")
    assert visual.joint_space.startswith("open_clip:RN50-quickgelu:")
