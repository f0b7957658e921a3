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
from hlss.eval.embed import (
    PatchDataset,
    cache_key,
    cached_embeddings,
    embed_table,
    load_embedding_set,
)
from hlss.eval.restore import (
    load_trained_model,
    untrained_model,
)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text.strip(), text
    return text


# ---------------------------------------------------------------------------------------------
# loading trained models


@pytest.fixture(scope="module")
def trained(tiny_run):
    return load_trained_model(tiny_run["checkpoints"][-1])


def _run_copy(tiny_run, dst, with_config=True) -> str:
    ck = dst / "checkpoints"
    ck.mkdir(parents=True)
    if with_config:
        shutil.copy(tiny_run["config"], dst / "config.yaml")
    return str(ck)


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


def test_embedding_reports_progress_lines_when_not_a_terminal(
    trained, data, tmp_path, monkeypatch, capsys, caplog
):
    import logging

    caplog.set_level(logging.INFO, logger="hlss.progress")  # as under hlss-eval's logging
    model, info = trained
    table, transform = data
    monkeypatch.delenv("HLSS_PROGRESS", raising=False)  # auto: captured output is no terminal
    monkeypatch.setenv("HLSS_PROGRESS_EVERY", "0")
    n = len(table)
    embed_table(
        model,
        table,
        transform,
        str(tmp_path / "emb"),
        batch_size=4,
        device="cpu",
        checkpoint=info["checkpoint"],
        extra={"split": "val"},
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "hlss.progress"]
    name = os.path.basename(info["checkpoint"])
    assert lines[0].startswith(f"embedding val ({name}) 4/{n} patches")
    assert lines[-1].startswith(f"embedding val ({name}) {n}/{n} patches (100%) done in")
    assert "Predicting" not in capsys.readouterr().err  # Lightning's bar: terminals only
    # progress_bar=False: nothing at all
    caplog.clear()
    embed_table(model, table, transform, str(tmp_path / "quiet"), device="cpu", progress_bar=False)
    assert not [r for r in caplog.records if r.name == "hlss.progress"]
