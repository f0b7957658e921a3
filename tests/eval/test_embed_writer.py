"""Embedding extraction through Lightning: the predict module, the streaming writer, the part
merge, device settings, quiet output, interrupts and the precision part of the cache key."""

from __future__ import annotations

import logging
import os
import signal
import warnings

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from hlss.data.table import PatchTable
from hlss.data.transforms import BaseTransform
from hlss.errors import ConfigError, HLSSError
from hlss.eval.embed import PatchDataset, cached_embeddings, embed_table
from hlss.eval.embed_cache import cache_key
from hlss.eval.embed_writer import merge_parts

N = 11  # patches; not a multiple of the batch sizes used below
DIM = 6


class Toy(nn.Module):
    """Embeds a patch as a linear map of its channel means; ``source`` scales the result."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, DIM)
        self.calls = 0

    def embed(self, x: torch.Tensor, source: str = "backbone") -> torch.Tensor:
        self.calls += 1
        out = self.lin(x.mean(dim=(2, 3)))
        return out * 2 if source == "double" else out


class Interrupted(Toy):
    def embed(self, x, source="backbone"):
        raise KeyboardInterrupt


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> PatchTable:
    folder = tmp_path_factory.mktemp("patches")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N):
        path = str(folder / f"p{i:02d}.tif")
        tifffile.imwrite(path, rng.integers(0, 60000, (2, 16, 16), dtype=np.uint16))
        paths.append(path)
    return PatchTable.from_records(
        [f"pt{i % 3}" for i in range(N)],
        ["1"] * N,
        paths,
        ["a", "b"] * (N // 2) + ["a"],
        ["val"] * N,
        name="toy",
    )


def _direct(model: Toy, table: PatchTable, rows=None, source="backbone") -> np.ndarray:
    dataset = PatchDataset(table, BaseTransform("srh"))
    rows = range(len(table)) if rows is None else rows
    with torch.inference_mode():
        return model.embed(torch.stack([dataset[i][0] for i in rows]), source).numpy()


def test_lightning_embedding_matches_direct_and_is_quiet(table, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # Lightning must leave nothing in the working folder
    model = Toy().train()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    before = rank_zero.level
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        result = embed_table(
            model, table, BaseTransform("srh"), "emb", source="double", batch_size=4, device="cpu"
        )
    assert [str(w.message) for w in caught] == []
    lightning_lines = [r.getMessage() for r in caplog.records if r.name.startswith("lightning")]
    assert lightning_lines == []
    assert rank_zero.level == before  # the muting ends with the call
    assert os.listdir(tmp_path) == ["emb"]
    assert result.features.dtype == np.float16 and result.features.shape == (N, DIM)
    expected = _direct(model, table, source="double")
    np.testing.assert_allclose(result.features.astype(np.float32), expected, atol=2e-3)
    assert result.index["row"].tolist() == list(range(N))
    manifest = result.manifest
    assert manifest["device"] == "cpu" and manifest["devices"] == 1
    assert manifest["precision"] == "32-true" and manifest["source"] == "double"
    assert sorted(os.listdir(tmp_path / "emb")) == ["features.npy", "index.csv", "manifest.json"]
    assert model.training  # the model's mode is restored
    assert next(model.parameters()).device.type == "cpu"


def test_model_without_embed_offers_backbone_only(table, tmp_path):
    plain = nn.Sequential(nn.Flatten(), nn.LazyLinear(4))
    result = embed_table(plain, table, BaseTransform("srh"), str(tmp_path / "e"), device="cpu")
    assert result.features.shape == (N, 4)
    with pytest.raises(ConfigError, match="offers 'backbone'"):
        embed_table(plain, table, BaseTransform("srh"), str(tmp_path / "f"), source="head")
    assert sorted(os.listdir(tmp_path)) == ["e"]


@pytest.mark.parametrize(
    "settings",
    [
        {"device": "nodevice"},
        {"device": "cpu", "precision": "bogus"},
        {"device": "cpu", "devices": "x"},
        pytest.param(
            {"device": "cuda"},
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present"),
        ),
    ],
)
def test_bad_device_settings_are_one_line_and_leave_nothing(table, tmp_path, settings):
    with pytest.raises(ConfigError) as err:
        embed_table(Toy(), table, BaseTransform("srh"), str(tmp_path / "e"), **settings)
    text = str(err.value)
    assert "\n" not in text and text.startswith("embed device=")
    assert os.listdir(tmp_path) == []


def test_wrong_output_shape_is_an_error(table, tmp_path):
    class Flat(Toy):
        def embed(self, x, source="backbone"):
            return super().embed(x, source).flatten()

    with pytest.raises(HLSSError, match=r"expected \[batch, dim\]"):
        embed_table(Flat(), table, BaseTransform("srh"), str(tmp_path / "e"), device="cpu")
    assert os.listdir(tmp_path) == []


def test_mixed_sizes_name_the_file(table, tmp_path):
    frame = table.frame.copy()
    odd = str(tmp_path / "odd.tif")
    tifffile.imwrite(odd, np.ones((2, 20, 20), dtype=np.uint16))
    frame.loc[5, "path"] = odd
    mixed = PatchTable(frame, table.classes, table.modality, "mixed")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(HLSSError) as err:
        embed_table(Toy(), mixed, BaseTransform("srh"), str(out / "e"), batch_size=4)
    assert "different sizes" in str(err.value) and "dataset.transform.size" in str(err.value)
    assert os.listdir(out) == []


def test_ctrl_c_is_a_keyboard_interrupt_and_leaves_nothing(table, tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        embed_table(Interrupted(), table, BaseTransform("srh"), str(tmp_path / "e"), device="cpu")
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning's SIG_IGN is undone


def _part(folder, rank: int, rows: list[int], feats: np.ndarray, bad=(), capacity=None) -> None:
    capacity = capacity or len(rows)
    arr = np.lib.format.open_memmap(
        os.path.join(folder, f".part-{rank}.npy"), "w+", np.float16, (capacity, feats.shape[1])
    )
    arr[: len(rows)] = feats
    arr.flush()
    del arr
    np.save(os.path.join(folder, f".part-{rank}.rows.npy"), np.asarray(rows, dtype=np.int64))
    import json

    info = {"count": len(rows), "dim": feats.shape[1], "nonfinite": 1, "bad": list(bad)}
    with open(os.path.join(folder, f".part-{rank}.json"), "w") as handle:
        json.dump(info, handle)


def test_merge_parts_orders_rows_and_drops_duplicates(tmp_path):
    full = np.arange(8 * 3, dtype=np.float16).reshape(8, 3)
    # rank 0 took rows 0, 2, 4, 6 (and row 6 again), rank 1 rows 1, 3, 7; row 5 was unreadable
    _part(tmp_path, 0, [0, 2, 4, 6, 6], full[[0, 2, 4, 6, 6]], capacity=6)
    _part(tmp_path, 1, [1, 3, 7], full[[1, 3, 7]], bad=[[5, "broken"]], capacity=6)
    merged = merge_parts(str(tmp_path))
    assert merged["rows"].tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert merged["dim"] == 3 and merged["nonfinite"] == 2 and merged["bad"] == [(5, "broken")]
    features = np.load(tmp_path / "features.npy")
    assert np.array_equal(features, full[[0, 1, 2, 3, 4, 6, 7]])
    assert os.listdir(tmp_path) == ["features.npy"]  # parts removed


def test_merge_parts_single_rank_compacts_or_renames(tmp_path):
    full = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float16)
    whole, short = tmp_path / "whole", tmp_path / "short"
    whole.mkdir()
    short.mkdir()
    _part(whole, 0, [0, 1, 2, 3, 4], full)
    _part(short, 0, [0, 2, 4], full[[0, 2, 4]], capacity=5)
    assert merge_parts(str(whole))["rows"].tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(np.load(whole / "features.npy"), full)
    assert merge_parts(str(short))["rows"].tolist() == [0, 2, 4]
    assert np.array_equal(np.load(short / "features.npy"), full[[0, 2, 4]])


def test_merge_parts_without_features(tmp_path):
    _part(tmp_path, 0, [], np.zeros((0, 2), np.float16), bad=[[0, "x"]], capacity=1)
    merged = merge_parts(str(tmp_path))
    assert merged["dim"] is None and merged["bad"] == [(0, "x")]
    assert not os.path.exists(tmp_path / "features.npy")


def test_two_processes_write_one_set_in_table_order(table, tmp_path):
    """``devices=2`` on CPU (``ddp_fork``, gloo): each rank streams its share, rank 0's
    folder gets one ``features.npy`` in table order, equal to one process's result."""
    frame = table.frame.copy()
    frame.loc[4, "path"] = str(tmp_path / "missing.tif")
    broken = PatchTable(frame, table.classes, table.modality, "broken")
    model = Toy()
    kw = {"batch_size": 2, "device": "cpu"}
    one = embed_table(model, broken, BaseTransform("srh"), str(tmp_path / "one"), **kw)
    two = embed_table(
        model,
        broken,
        BaseTransform("srh"),
        str(tmp_path / "two"),
        devices=2,
        strategy="ddp_fork",
        **kw,
    )
    good = [i for i in range(N) if i != 4]
    assert two.index["row"].tolist() == good == one.index["row"].tolist()
    # other batch make-up and thread counts: equal up to BLAS rounding (float16 storage)
    np.testing.assert_allclose(
        two.features.astype(np.float32), one.features.astype(np.float32), rtol=1e-3, atol=1e-3
    )
    assert two.manifest["devices"] == 2 and two.manifest["bad_count"] == 1
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]


def test_precision_is_keyed_only_when_not_full(table):
    transform = BaseTransform("srh")
    cfg = {"seed": 0, "backbone": {"name": "toy"}}
    plain, parts = cache_key(None, table, transform, None, "backbone", cfg=cfg)
    same, _ = cache_key(None, table, transform, None, "backbone", cfg=cfg, precision="32-true")
    bf16, bf_parts = cache_key(
        None, table, transform, None, "backbone", cfg=cfg, precision="bf16-mixed"
    )
    assert plain == same and "precision" not in parts
    assert bf16 != plain and bf_parts["precision"] == "bf16-mixed"


def test_cache_reuses_files_and_keys_precision(table, tmp_path):
    model = Toy()
    kw = {"cfg": {"seed": 0}, "device": "cpu", "batch_size": 4}
    transform = BaseTransform("srh")
    first = cached_embeddings(model, None, table, transform, None, cache_dir=str(tmp_path), **kw)
    calls = model.calls
    again = cached_embeddings(model, None, table, transform, None, cache_dir=str(tmp_path), **kw)
    assert model.calls == calls and again.path == first.path  # not embedded again
    other = cached_embeddings(
        model, None, table, transform, None, cache_dir=str(tmp_path), precision="bf16-mixed", **kw
    )
    assert other.path != first.path and other.manifest["precision"] == "bf16-mixed"
    assert other.manifest["cache_parts"]["precision"] == "bf16-mixed"
    np.testing.assert_allclose(
        other.features.astype(np.float32), first.features.astype(np.float32), atol=0.05
    )


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch):
    from hlss.eval.embed import _trainer
    from hlss.eval.embed_writer import EmbeddingWriter

    class Terminal:
        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            pass

    def bar(progress):
        writer = EmbeddingWriter(str(tmp_path), 1)
        return _trainer("cpu", 1, "32-true", "auto", progress, writer).progress_bar_callback

    assert bar(None) is None  # pytest captures stderr: not a terminal
    assert bar(True) is not None
    monkeypatch.setattr("sys.stderr", Terminal())
    assert bar(None) is not None
    assert bar(False) is None
