"""Checkpoint discovery, model rebuilding and cached, streamed embedding extraction."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hlss.data.table import PatchTable
from hlss.errors import HLSSError
from hlss.eval.checkpoints import (
    list_checkpoints,
    load_trained_model,
    run_config_for,
    untrained_model,
)
from hlss.eval.embed import (
    PatchDataset,
    cache_key,
    cached_embeddings,
    embed_table,
    load_embedding_set,
)
from hlss.train.checkpoint import load_checkpoint_file


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text.strip(), text
    return text


# ---------------------------------------------------------------------------------------------
# list_checkpoints


def _touch(path, data: bytes = b"x") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


def test_list_checkpoints_orders_by_step_and_skips_last(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    s10 = _touch(ck / "step-0000010.ckpt")
    s2 = _touch(ck / "step-0000002.ckpt")
    _touch(ck / "last.ckpt")
    _touch(ck / ".tmp-abc.ckpt")  # an interrupted atomic write
    _touch(ck / "notes.txt")
    odd = str(ck / "epoch=0.ckpt")  # no step in the name: its global_step decides
    torch.save({"global_step": 5}, odd)
    expected = [s2, odd, s10]
    assert list_checkpoints(str(tmp_path / "run")) == expected
    assert list_checkpoints(str(ck)) == expected


def test_list_checkpoints_last_only_and_single_file(tmp_path):
    last = _touch(tmp_path / "checkpoints" / "last.ckpt")
    assert list_checkpoints(str(tmp_path)) == [last]
    assert list_checkpoints(last) == [last]


def test_list_checkpoints_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HLSSError) as err:
        list_checkpoints(str(tmp_path / "empty"))
    assert "no checkpoint" in _one_line(err)
    with pytest.raises(HLSSError) as err:
        list_checkpoints(str(tmp_path / "missing"))
    assert "missing" in _one_line(err)


def test_tiny_run_fixture(tiny_run):
    assert list_checkpoints(tiny_run["run_dir"]) == tiny_run["checkpoints"]
    assert [os.path.basename(p) for p in tiny_run["checkpoints"]] == [
        "step-0000001.ckpt",
        "step-0000002.ckpt",
    ]
    assert os.path.isfile(tiny_run["config"])


# ---------------------------------------------------------------------------------------------
# loading trained models


@pytest.fixture(scope="module")
def trained(tiny_run):
    return load_trained_model(tiny_run["checkpoints"][-1])


def test_loaded_model_equals_checkpoint(tiny_run, trained):
    model, info = trained
    ckpt = tiny_run["checkpoints"][-1]
    state = load_checkpoint_file(ckpt)["state_dict"]
    weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    own = model.state_dict()
    assert set(own) == set(weights)
    assert "text_patch" in own  # the frozen text buffers come from the checkpoint too
    for key, value in weights.items():
        assert torch.equal(own[key], value), key
    assert not model.training
    assert info["step"] == 2 and info["checkpoint"] == ckpt
    assert info["mlflow_run_id"] is None and info["tracking_uri"] is None  # logger=none

    first, info1 = load_trained_model(tiny_run["checkpoints"][0])
    assert info1["step"] == 1
    changed = [
        k
        for k, v in first.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, own[k])
    ]
    assert changed  # a training step moved the weights


def test_untrained_model_is_seeded_and_side_effect_free(tiny_run, trained):
    cfg = run_config_for(tiny_run["checkpoints"][0])
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = untrained_model(cfg)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's generator is untouched
    b = untrained_model(cfg)
    sa, sb, st = a.state_dict(), b.state_dict(), trained[0].state_dict()
    assert set(sa) == set(st)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], st[k]) for k in sa if sa[k].is_floating_point())


def _run_copy(tiny_run, dst, with_config=True) -> str:
    ck = dst / "checkpoints"
    ck.mkdir(parents=True)
    if with_config:
        shutil.copy(tiny_run["config"], dst / "config.yaml")
    return str(ck)


def test_corrupt_checkpoint_is_one_line(tiny_run, tmp_path):
    ck = _run_copy(tiny_run, tmp_path / "run")
    bad = _touch(os.path.join(ck, "step-0000001.ckpt"), b"\x00not a checkpoint")
    with pytest.raises(HLSSError) as err:
        load_trained_model(bad)
    assert bad in _one_line(err)


def test_missing_run_config(tiny_run, tmp_path):
    ck = _run_copy(tiny_run, tmp_path / "run", with_config=False)
    path = shutil.copy(tiny_run["checkpoints"][0], ck)
    with pytest.raises(HLSSError) as err:
        load_trained_model(path)
    assert "config.yaml" in _one_line(err)
    # a config next to the checkpoint is found too
    shutil.copy(tiny_run["config"], os.path.join(ck, "config.yaml"))
    assert run_config_for(path).loss.name == "attr3levels"


def test_mismatching_weights_name_checkpoint_and_keys(tiny_run):
    cfg = OmegaConf.load(tiny_run["config"])
    cfg.loss.head = "mlp"  # another architecture than the one trained
    ckpt = tiny_run["checkpoints"][0]
    with pytest.raises(HLSSError) as err:
        load_trained_model(ckpt, cfg=cfg)
    text = _one_line(err)
    assert ckpt in text and "missing" in text and "unexpected" in text


# ---------------------------------------------------------------------------------------------
# embedding


@pytest.fixture(scope="module")
def data(tiny_run):
    cfg = OmegaConf.load(tiny_run["config"])
    table = instantiate(cfg.dataset.table).subset("val")
    transform = instantiate(cfg.dataset.transform)
    return table, transform


def _direct(model, table, transform, source="backbone"):
    images = torch.stack([PatchDataset(table, transform)[i][0] for i in range(len(table))])
    with torch.inference_mode():
        return model.embed(images, source).numpy()


def test_embed_table_matches_direct_embedding(trained, data, tmp_path):
    model, info = trained
    table, transform = data
    out = tmp_path / "emb"
    result = embed_table(
        model, table, transform, str(out), batch_size=5, device="cpu", checkpoint=info["checkpoint"]
    )
    n = len(table)
    assert result.features.dtype == np.float16 and result.features.shape == (n, 512)
    assert isinstance(result.features, np.memmap)
    assert len(result) == n and result.dim == 512 and result.classes == table.classes
    idx = result.index
    assert list(idx.columns) == ["row", "patient", "slide", "path", "label", "label_index", "split"]
    assert idx["row"].tolist() == list(range(n))
    for col in ("patient", "slide", "path", "label", "split"):
        assert idx[col].tolist() == table.frame[col].tolist(), col
    assert np.array_equal(result.labels, table.label_index)
    expected = _direct(model, table, transform)
    np.testing.assert_allclose(
        result.features.astype(np.float32), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max()
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "backbone" and manifest["dim"] == 512
    assert manifest["count"] == n and manifest["dtype"] == "float16"
    assert manifest["classes"] == list(table.classes)
    assert manifest["checkpoint"] == info["checkpoint"] and manifest["bad_count"] == 0
    assert manifest["created"]
    # reloading gives the same set; the folder is never written over
    again = load_embedding_set(str(out))
    assert np.array_equal(again.features, result.features)
    pd.testing.assert_frame_equal(again.index, result.index)
    with pytest.raises(HLSSError):
        embed_table(model, table, transform, str(out))
    assert not model.training


def test_embed_text_space(trained, data, tmp_path):
    model, _ = trained
    table, transform = data
    result = embed_table(
        model, table, transform, str(tmp_path / "t"), source="text_space", device="cpu"
    )
    expected = _direct(model, table, transform, "text_space")
    assert result.features.shape == (len(table), model.text_dim)
    np.testing.assert_allclose(result.features.astype(np.float32), expected, atol=2e-3)


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_files_are_skipped_and_counted(trained, data, tmp_path, workers):
    model, _ = trained
    table, transform = data
    frame = table.frame.copy()
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"this is not a tiff")
    frame.loc[3, "path"] = str(garbage)
    frame.loc[len(frame) - 1, "path"] = str(tmp_path / "missing.tif")
    broken = PatchTable(frame, table.classes, table.modality, "broken")
    result = embed_table(
        model,
        broken,
        transform,
        str(tmp_path / "e"),
        batch_size=4,
        num_workers=workers,
        device="cpu",
    )
    good = [i for i in range(len(frame)) if i not in (3, len(frame) - 1)]
    assert result.features.shape == (len(good), 512)
    assert result.index["row"].tolist() == good
    assert result.manifest["bad_count"] == 2 and result.manifest["count"] == len(good)
    assert {b["row"] for b in result.manifest["bad_files"]} == {3, len(frame) - 1}
    assert all("\n" not in b["problem"] for b in result.manifest["bad_files"])
    expected = _direct(model, table.subset("val"), transform)[good]
    np.testing.assert_allclose(
        result.features.astype(np.float32), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max()
    )


def test_no_readable_patch_is_an_error(trained, data, tmp_path):
    model, _ = trained
    table, transform = data
    frame = table.frame.head(3).copy()
    frame["path"] = str(tmp_path / "nope.tif")
    with pytest.raises(HLSSError) as err:
        embed_table(model, PatchTable(frame, table.classes), transform, str(tmp_path / "e"))
    assert "could be read" in _one_line(err)
    assert os.listdir(tmp_path) == []


class _Boom(torch.nn.Module):
    """Embeds like ``inner`` until its ``fail_at``-th call, then raises."""

    def __init__(self, inner, fail_at: int):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.fail_at = fail_at

    def embed(self, x, source="backbone"):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("device lost")
        return self.inner.embed(x, source)


def test_failure_midway_leaves_no_partial_folder(trained, data, tmp_path):
    table, transform = data
    model = _Boom(trained[0], fail_at=2)
    with pytest.raises(RuntimeError, match="device lost"):
        embed_table(model, table, transform, str(tmp_path / "emb"), batch_size=4)
    assert model.calls == 2
    assert os.listdir(tmp_path) == []


def test_cache_hit_does_not_build_model(tiny_run, data, tmp_path):
    table, transform = data
    ckpt = tiny_run["checkpoints"][-1]
    full = instantiate(OmegaConf.load(tiny_run["config"]).dataset.table)
    built = []

    def factory():
        built.append(1)
        return load_trained_model(ckpt)  # (model, info) is accepted

    cache = tmp_path / "cache"
    first = cached_embeddings(factory, ckpt, full, transform, "val", "backbone", str(cache))
    assert len(built) == 1
    assert first.path.startswith(str(cache / "embeddings"))
    assert first.manifest["split"] == "val" and len(first) == len(table)
    second = cached_embeddings(factory, ckpt, full, transform, "val", "backbone", str(cache))
    assert len(built) == 1 and second.path == first.path
    assert np.array_equal(second.features, first.features)

    # a copy of the same checkpoint content hits the same entry
    copy = shutil.copy(ckpt, tmp_path / "copy.ckpt")
    third = cached_embeddings(factory, str(copy), full, transform, "val", "backbone", str(cache))
    assert len(built) == 1 and third.path == first.path

    # another source, split or checkpoint is another entry
    other = cached_embeddings(factory, ckpt, full, transform, "val", "text_space", str(cache))
    assert len(built) == 2 and other.path != first.path and other.dim == 64
    train = cached_embeddings(factory, ckpt, full, transform, "train", "backbone", str(cache))
    assert len(built) == 3 and train.path not in (first.path, other.path)
    key_other_ckpt, _ = cache_key(tiny_run["checkpoints"][0], table, transform, "val", "backbone")
    assert key_other_ckpt != first.manifest["cache_key"]
    assert sorted(os.listdir(cache / "embeddings")) == sorted(
        os.path.basename(p) for p in (first.path, other.path, train.path)
    )


def test_cache_default_root_and_untrained_key(tiny_run, data, tmp_path, monkeypatch):
    table, transform = data
    monkeypatch.setenv("HLSS_CACHE", str(tmp_path / "env-cache"))
    cfg = OmegaConf.load(tiny_run["config"])
    small = PatchTable(table.frame.head(6).copy(), table.classes, table.modality, "small")
    built = []

    def factory():
        built.append(1)
        return untrained_model(cfg)

    a = cached_embeddings(factory, None, small, transform, None, cfg=cfg)
    b = cached_embeddings(factory, None, small, transform, None, cfg=cfg)
    assert len(built) == 1 and a.path == b.path
    assert a.path.startswith(str(tmp_path / "env-cache" / "embeddings"))
    assert a.manifest["cache_parts"]["model"]["untrained"] is True
    reseeded = cfg.copy()
    reseeded.seed = 1
    key_seed, _ = cache_key(None, small, transform, None, "backbone", cfg=reseeded)
    assert key_seed != a.manifest["cache_key"]
    with pytest.raises(HLSSError):
        cached_embeddings(factory, None, small, transform, None)


def test_load_embedding_set_rejects_other_folders(tmp_path):
    with pytest.raises(HLSSError) as err:
        load_embedding_set(str(tmp_path))
    assert "not an embedding set" in _one_line(err)
