"""Text encoders, prompt ensembles, the embedding cache and attribute banks (no network)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F
import yaml

from hlss.errors import ConfigError
from hlss.models.attributes import LEVELS, embed_banks, load_bank, load_banks, packaged_bank_names
from hlss.models.text import (
    MiniLMTextEncoder,
    OpenCLIPTextEncoder,
    TinyTextEncoder,
    default_cache_dir,
    embed_prompts,
)


class CountingEncoder:
    """Wraps an encoder and counts encode calls."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        return self.inner.encode(texts)


# ---------------------------------------------------------------------------------------------
# TinyTextEncoder


def test_tiny_deterministic_and_normalised():
    a = TinyTextEncoder(dim=32, seed=3)
    b = TinyTextEncoder(dim=32, seed=3)
    texts = ["dense tumour cells", "a blue car", "dense tumour cells", ""]
    ea, eb = a.encode(texts), b.encode(texts)
    assert ea.shape == (4, 32) and ea.dtype == torch.float32
    torch.testing.assert_close(ea.norm(dim=-1), torch.ones(4))
    assert torch.equal(ea, eb)
    assert torch.equal(ea[0], ea[2])
    assert not torch.allclose(ea[0], ea[1])
    assert not torch.allclose(TinyTextEncoder(dim=32, seed=4).encode(texts[:1]), ea[:1])
    assert a.name != TinyTextEncoder(dim=32, seed=4).name


# ---------------------------------------------------------------------------------------------
# MiniLM (one load)


def test_minilm_offline_semantics(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    enc = MiniLMTextEncoder()
    assert enc.dim == 384
    emb = enc.encode(["dense tumour cells", "many packed tumour cells", "a blue car"])
    assert "HF_HUB_OFFLINE" not in os.environ  # restored after the load
    assert emb.shape == (3, 384) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2]
    assert not enc.model.training
    assert all(not p.requires_grad for p in enc.model.parameters())


# ---------------------------------------------------------------------------------------------
# OpenCLIP text tower (random weights: no network)


def test_open_clip_text_random_seeded():
    enc = OpenCLIPTextEncoder(model="RN50", pretrained=None, seed=1)
    assert enc.dim == 1024
    emb = enc.encode(["a smear of tumour cells", "necrosis"])
    assert emb.shape == (2, 1024)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert "random-seed1" in enc.name
    with pytest.raises(ConfigError, match="not found"):
        OpenCLIPTextEncoder(model="RN50", pretrained="/no/such/clip.pt")


# ---------------------------------------------------------------------------------------------
# embed_prompts + cache


def test_embed_prompts_is_normalised_mean(tmp_path):
    enc = TinyTextEncoder(dim=16)
    prompts = [["dense cells", "packed nuclei", "crowded field"], ["necrosis"]]
    got = embed_prompts(enc, prompts, tmp_path)
    s0 = F.normalize(enc.encode(prompts[0]), dim=-1).mean(0)
    s1 = F.normalize(enc.encode(prompts[1]), dim=-1).mean(0)
    want = F.normalize(torch.stack([s0, s1]), dim=-1)
    torch.testing.assert_close(got, want)
    assert got.shape == (2, 16)


def test_embed_prompts_cache_hit_avoids_encode(tmp_path):
    enc = CountingEncoder(TinyTextEncoder(dim=16))
    prompts = [["a", "b"], ["c"]]
    first = embed_prompts(enc, prompts, tmp_path)
    assert enc.calls == 1
    files = list(tmp_path.glob("text-*.pt"))
    assert len(files) == 1 and len(files[0].stem) == len("text-") + 64
    assert not list(tmp_path.glob(".text-*"))  # no temp file left behind
    second = embed_prompts(enc, prompts, tmp_path)
    assert enc.calls == 1
    assert torch.equal(first, second)
    # other prompts or another encoder -> another key
    embed_prompts(enc, [["a"], ["b", "c"]], tmp_path)
    assert enc.calls == 2
    assert len(list(tmp_path.glob("text-*.pt"))) == 2


def test_embed_prompts_recovers_from_damaged_cache(tmp_path):
    enc = CountingEncoder(TinyTextEncoder(dim=8))
    embed_prompts(enc, [["x"]], tmp_path)
    (path,) = tmp_path.glob("text-*.pt")
    path.write_bytes(b"broken")
    out = embed_prompts(enc, [["x"]], tmp_path)
    assert enc.calls == 2 and out.shape == (1, 8)
    assert torch.load(path, weights_only=True).shape == (1, 8)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HLSS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "text"
    enc = CountingEncoder(TinyTextEncoder(dim=8))
    embed_prompts(enc, [["x"]], None)
    assert len(list((tmp_path / "text").glob("text-*.pt"))) == 1
    monkeypatch.delenv("HLSS_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "hlss", "text")


def test_embed_prompts_rejects_empty_attribute(tmp_path):
    with pytest.raises(ConfigError, match="no descriptions"):
        embed_prompts(TinyTextEncoder(), [["a"], []], tmp_path)


# ---------------------------------------------------------------------------------------------
# attribute banks


def test_packaged_banks(tmp_path):
    assert packaged_bank_names() == ["patch", "patient", "slide"]
    sizes = {}
    for level in LEVELS:
        bank = load_bank(level)
        assert bank.level == level
        assert len(set(bank.names)) == len(bank.names)
        assert all(len(d) >= 3 for d in bank.descriptions)
        sizes[level] = len(bank)
    assert sizes["patch"] >= 20 and sizes["slide"] >= 12 and sizes["patient"] >= 10
    assert len(load_bank("patch", level="patch", size=5)) == 5
    banks = load_banks()
    assert list(banks) == list(LEVELS)
    embs = embed_banks(TinyTextEncoder(dim=16), banks, cache_dir=tmp_path)
    assert {lv: tuple(e.shape) for lv, e in embs.items()} == {lv: (sizes[lv], 16) for lv in LEVELS}


def _write(tmp_path, doc, name="bank.yaml"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


GOOD = {
    "level": "slide",
    "attributes": [
        {"name": "a", "descriptions": ["first a", "second a"]},
        {"name": "b", "descriptions": ["only b"]},
    ],
}


def test_user_bank_and_truncation(tmp_path):
    path = _write(tmp_path, GOOD)
    bank = load_bank(path)
    assert bank.level == "slide" and bank.names == ["a", "b"]
    assert bank.descriptions == [["first a", "second a"], ["only b"]]
    assert load_bank(path, size=1).names == ["a"]
    with pytest.raises(ConfigError, match="requested 3 attributes but the bank has 2"):
        load_bank(path, size=3)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("level: patch\nattributes: [\n", "malformed YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        ({"level": "patch"}, "non-empty list"),
        ({"level": "patch", "attributes": []}, "non-empty list"),
        ({"level": "patch", "attributes": [{"name": "x"}]}, "'x' has no descriptions"),
        (
            {"level": "patch", "attributes": [{"name": "x", "descriptions": []}]},
            "has no descriptions",
        ),
        (
            {"level": "patch", "attributes": [{"descriptions": ["d"]}]},
            r"attributes\[0\] has no name",
        ),
        (
            {"level": "patch", "attributes": [{"name": "x", "descriptions": ["d"]}] * 2},
            "duplicate attribute name 'x'",
        ),
        ({"level": "organ", "attributes": [{"name": "x", "descriptions": ["d"]}]}, "is not one of"),
        ({"attributes": [{"name": "x", "descriptions": ["d"]}]}, "missing key 'level'"),
    ],
)
def test_bank_validation_errors(tmp_path, doc, match):
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError, match=match) as err:
        load_bank(path)
    assert path in str(err.value)
    assert "\n" not in str(err.value)


def test_bank_wrong_level_and_missing_file(tmp_path):
    path = _write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="bank is for level 'slide', expected 'patch'"):
        load_bank(path, level="patch")
    with pytest.raises(ConfigError, match="not found"):
        load_bank(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="none packaged by that name"):
        load_bank("organ")
    with pytest.raises(ConfigError, match="unknown level"):
        load_banks({"organ": "patch"})
