"""Tests of the TCGA-style and manifest-CSV readers on tiny generated datasets."""

from __future__ import annotations

import json
import os
import time

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hlss.data.io import load_patch
from hlss.data.manifest import read_manifest
from hlss.data.tcga import read_tcga, tcga_patient
from hlss.errors import DataError

SLIDE_A1 = "TCGA-02-0001-01Z-00-DX1.83fa2c9e-aaaa"
SLIDE_A2 = "TCGA-02-0001-01Z-00-DX2.11112222-bbbb"
SLIDE_B1 = "TCGA-06-0190-01Z-00-DX1.99990000-cccc"
SLIDE_C1 = "TCGA-AB-12CD-01Z-00-DX1.55556666-dddd"  # patient C: val


def _tiles(n: int, seed: int, channel_first: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)) if channel_first else tiles


def _write_h5(path, tiles: np.ndarray | None, key: str = "tiles") -> None:
    with h5py.File(path, "w") as handle:
        if tiles is not None:
            handle.create_dataset(key, data=tiles)


def _write_meta(root, labels: dict[str, str] | None = None, split: dict | None = None) -> None:
    labels = labels or {"TCGA-02-0001": "gbm", "TCGA-06-0190": "lgg", "TCGA-AB-12CD": "gbm"}
    split = split or {"train": ["TCGA-02-0001", "TCGA-06-0190"], "val": ["TCGA-AB-12CD"]}
    pd.DataFrame({"patient": list(labels), "label": list(labels.values())}).to_csv(
        root / "labels.csv", index=False
    )
    (root / "train_val_split.json").write_text(json.dumps(split))


@pytest.fixture
def h5_root(tmp_path):
    """3 patients, 4 slides: A (2 slides, 3+2 tiles), B (4 tiles, channel-first), C (1 tile)."""
    root = tmp_path / "tcga_h5"
    root.mkdir()
    _write_h5(root / f"{SLIDE_A1}.h5", _tiles(3, 0))
    _write_h5(root / f"{SLIDE_A2}.h5", _tiles(2, 1))
    _write_h5(root / f"{SLIDE_B1}.h5", _tiles(4, 2, channel_first=True))
    _write_h5(root / f"{SLIDE_C1}.h5", _tiles(1, 3))
    _write_meta(root)
    return root


@pytest.fixture
def folder_root(tmp_path):
    """Same patients as ``h5_root`` with png tiles in per-slide folders: A1 3, A2 2, B1 4, C1 1."""
    root = tmp_path / "tcga_png"
    root.mkdir()
    for seed, (slide, n) in enumerate([(SLIDE_A1, 3), (SLIDE_A2, 2), (SLIDE_B1, 4), (SLIDE_C1, 1)]):
        folder = root / slide
        folder.mkdir()
        for i, tile in enumerate(_tiles(n, seed)):
            Image.fromarray(tile).save(folder / f"tile_{i:03d}.png")
    _write_meta(root)
    return root


# --------------------------------------------------------------------------------------- barcodes


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("TCGA-02-0001-01Z-00-DX1.83fa2c9e-aaaa.h5", "TCGA-02-0001"),
        ("TCGA-02-0001-01Z-00-DX1", "TCGA-02-0001"),
        ("TCGA-02-0001", "TCGA-02-0001"),
        ("/data/slides/TCGA-AB-12CD-01A-01-TS1.svs", "TCGA-AB-12CD"),
        ("/data/tiles/TCGA-06-0190-01Z-00-DX1/", "TCGA-06-0190"),
        ("tcga-06-0190-01z", "TCGA-06-0190"),
    ],
)
def test_tcga_patient_parses_barcodes(name, patient):
    assert tcga_patient(name) == patient


@pytest.mark.parametrize(
    "name",
    [
        "",
        "slide_001.h5",
        "TCGA-02-001-01Z",
        "TCGA-02-00011-01Z",
        "XTCGA-02-0001",
        "TCGA-0-0001",
        "TCGA_02_0001",
    ],
)
def test_tcga_patient_rejects_other_names(name):
    with pytest.raises(DataError, match="not a TCGA barcode"):
        tcga_patient(name)


# ----------------------------------------------------------------------------------- TCGA readers


def _check_tcga_table(table, root):
    assert table.modality == "he"
    assert len(table) == 10
    assert table.classes == ("gbm", "lgg")
    assert table.patients() == ["TCGA-02-0001", "TCGA-06-0190", "TCGA-AB-12CD"]
    frame = table.frame
    counts = frame.groupby("slide").size().to_dict()
    assert counts == {SLIDE_A1: 3, SLIDE_A2: 2, SLIDE_B1: 4, SLIDE_C1: 1}
    per_patient = frame.groupby("patient")["slide"].nunique().to_dict()
    assert per_patient == {"TCGA-02-0001": 2, "TCGA-06-0190": 1, "TCGA-AB-12CD": 1}
    assert frame.groupby("patient")["label"].first().to_dict() == {
        "TCGA-02-0001": "gbm",
        "TCGA-06-0190": "lgg",
        "TCGA-AB-12CD": "gbm",
    }
    assert frame.groupby("patient")["split"].first().to_dict() == {
        "TCGA-02-0001": "train",
        "TCGA-06-0190": "train",
        "TCGA-AB-12CD": "val",
    }
    assert all(os.path.isabs(p) and p.startswith(str(root)) for p in frame["path"])
    assert table.extra["skipped"] == {"no_label": 0, "not_in_split": 0, "no_tiles": 0}
    summary = table.summary()
    assert summary["train"]["patches"] == 9 and summary["val"]["slides"] == 1


def test_read_tcga_h5_round_trip(h5_root):
    table = read_tcga(str(h5_root))
    _check_tcga_table(table, h5_root)
    assert table.extra["layout"] == "h5"
    b_paths = table.frame.loc[table.frame["slide"] == SLIDE_B1, "path"].tolist()
    assert b_paths == [f"{h5_root / SLIDE_B1}.h5::{i}" for i in range(4)]
    expected = {
        SLIDE_A1: _tiles(3, 0),
        SLIDE_A2: _tiles(2, 1),
        SLIDE_B1: _tiles(4, 2),
        SLIDE_C1: _tiles(1, 3),
    }
    for slide, path in zip(table.frame["slide"], table.frame["path"], strict=True):
        patch = load_patch(path, "he")
        assert patch.shape == (3, 16, 16) and patch.dtype == np.uint8
        index = int(path.rpartition("::")[2])
        np.testing.assert_array_equal(patch, expected[slide][index].transpose(2, 0, 1))


def test_read_tcga_folder_round_trip(folder_root):
    table = read_tcga(str(folder_root), layout="auto")
    _check_tcga_table(table, folder_root)
    assert table.extra["layout"] == "folders"
    a1 = table.frame.loc[table.frame["slide"] == SLIDE_A1, "path"].tolist()
    assert a1 == [str(folder_root / SLIDE_A1 / f"tile_{i:03d}.png") for i in range(3)]
    expected = _tiles(3, 0)
    for i, path in enumerate(a1):
        patch = load_patch(path, "he")
        assert patch.shape == (3, 16, 16) and patch.dtype == np.uint8
        np.testing.assert_array_equal(patch, expected[i].transpose(2, 0, 1))
    for path in table.frame["path"]:
        assert load_patch(path, "he").shape == (3, 16, 16)


def test_read_tcga_explicit_layout_and_classes(folder_root):
    table = read_tcga(str(folder_root), layout="folders", classes=["lgg", "gbm", "other"])
    assert table.classes == ("lgg", "gbm", "other")
    assert set(table.label_index.tolist()) == {0, 1}


def test_read_tcga_skips_are_counted(h5_root):
    _write_h5(h5_root / "TCGA-99-0001-01Z-00-DX1.h5", _tiles(2, 5))  # patient without label
    _write_h5(h5_root / "TCGA-99-0002-01Z-00-DX1.h5", _tiles(2, 6))  # labelled, in no split
    _write_h5(h5_root / "TCGA-02-0001-01Z-00-DX3.h5", np.zeros((0, 16, 16, 3), np.uint8))
    labels = {
        "TCGA-02-0001": "gbm",
        "TCGA-06-0190": "lgg",
        "TCGA-AB-12CD": "gbm",
        "TCGA-99-0002": "lgg",
    }
    _write_meta(h5_root, labels=labels)
    table = read_tcga(str(h5_root))
    assert len(table) == 10
    assert table.extra["skipped"] == {"no_label": 1, "not_in_split": 1, "no_tiles": 1}
    assert "TCGA-99-0001" not in table.patients() and "TCGA-99-0002" not in table.patients()


def test_read_tcga_empty_tile_folder_is_skipped(folder_root):
    (folder_root / "TCGA-02-0001-01Z-00-DX9").mkdir()
    table = read_tcga(str(folder_root))
    assert len(table) == 10
    assert table.extra["skipped"]["no_tiles"] == 1


def test_read_tcga_slide_labels_and_relative_meta_paths(h5_root):
    meta = h5_root / "meta"
    meta.mkdir()
    pd.DataFrame(
        {
            "slide": [f"{SLIDE_A1}.svs", SLIDE_A2.split(".")[0], SLIDE_B1, SLIDE_C1],
            "label": ["gbm", "lgg", "lgg", "gbm"],
        }
    ).to_csv(meta / "slide_labels.csv", index=False)
    (meta / "split.json").write_text(
        json.dumps({"train": ["TCGA-02-0001"], "val": ["tcga-ab-12cd"]})
    )
    table = read_tcga(str(h5_root), labels="meta/slide_labels.csv", split="meta/split.json")
    by_slide = table.frame.groupby("slide")["label"].first().to_dict()
    assert by_slide == {SLIDE_A1: "gbm", SLIDE_A2: "lgg", SLIDE_C1: "gbm"}
    assert table.extra["skipped"]["not_in_split"] == 1  # patient B
    # absolute metadata paths work too
    table2 = read_tcga(
        str(h5_root), labels=str(meta / "slide_labels.csv"), split=str(meta / "split.json")
    )
    assert len(table2) == len(table) == 6


def _raises(match_file, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(match_file) in message, message
    return message


def test_tcga_error_root_missing(tmp_path):
    msg = _raises(tmp_path / "nope", read_tcga, str(tmp_path / "nope"))
    assert "not found" in msg


def test_tcga_error_no_slides(tmp_path):
    _write_meta(tmp_path)
    msg = _raises(tmp_path, read_tcga, str(tmp_path))
    assert "no slides found" in msg
    msg = _raises(tmp_path, read_tcga, str(tmp_path), layout="h5")
    assert "no slides found" in msg


def test_tcga_error_unknown_layout(h5_root):
    _raises(h5_root, read_tcga, str(h5_root), layout="zarr")


def test_tcga_auto_layout_prefers_h5_and_ignores_meta_folders(h5_root, folder_root):
    (h5_root / "meta").mkdir()
    (h5_root / "thumbnails").mkdir()
    assert len(read_tcga(str(h5_root))) == 10
    (folder_root / "meta").mkdir()
    (folder_root / "meta" / "notes.txt").write_text("not a tile")
    table = read_tcga(str(folder_root))
    assert len(table) == 10 and table.extra["skipped"]["no_tiles"] == 0
    # explicit folders layout on the h5 root: only tile-free folders, so nothing to index
    msg = _raises(h5_root, read_tcga, str(h5_root), layout="folders")
    assert "no slides found" in msg


def test_tcga_error_non_barcode_tile_folder(folder_root):
    bad = folder_root / "slide_007"
    bad.mkdir()
    Image.fromarray(_tiles(1, 0)[0]).save(bad / "t.png")
    msg = _raises(bad, read_tcga, str(folder_root))
    assert "TCGA" in msg


def test_tcga_error_non_barcode_slide(h5_root):
    _write_h5(h5_root / "slide_007.h5", _tiles(1, 0))
    _raises("slide_007", read_tcga, str(h5_root))


def test_tcga_error_h5_without_tiles(h5_root):
    bad = h5_root / f"{SLIDE_B1}.h5"
    _write_h5(bad, _tiles(2, 0), key="images")
    msg = _raises(bad, read_tcga, str(h5_root))
    assert "'tiles'" in msg


def test_tcga_error_h5_bad_tiles_and_broken_file(h5_root):
    bad = h5_root / f"{SLIDE_B1}.h5"
    _write_h5(bad, np.zeros((2, 16, 16), np.uint8))
    _raises(bad, read_tcga, str(h5_root))
    _write_h5(bad, np.zeros((2, 16, 16, 3), np.uint16))
    _raises(bad, read_tcga, str(h5_root))
    bad.write_bytes(b"not an hdf5 file")
    _raises(bad, read_tcga, str(h5_root))


def test_tcga_error_labels_missing(h5_root):
    (h5_root / "labels.csv").unlink()
    _raises(h5_root / "labels.csv", read_tcga, str(h5_root))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "patient,diagnosis\nTCGA-02-0001,gbm\n",
        "patient,label\nTCGA-02-0001,\n",
        "patient,label\nTCGA-02-0001,gbm\nTCGA-02-0001,lgg\n",
        'patient,label\n"TCGA-02-0001,gbm\n',
        "patient,label\nTCGA-02-0001,gbm,x\n",
    ],
    ids=["empty", "no-label-column", "empty-value", "two-labels", "broken-quote", "long-row"],
)
def test_tcga_error_labels_malformed(h5_root, text):
    (h5_root / "labels.csv").write_text(text)
    _raises(h5_root / "labels.csv", read_tcga, str(h5_root))


def test_tcga_error_label_not_in_classes(h5_root):
    msg = _raises(h5_root / "labels.csv", read_tcga, str(h5_root), classes=["gbm"])
    assert "'lgg'" in msg


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"train": ["TCGA-02-0001"]}',
        '{"train": "TCGA-02-0001", "val": []}',
        '{"train": [1], "val": []}',
    ],
    ids=["bad-json", "list", "no-val", "not-a-list", "not-a-string"],
)
def test_tcga_error_split_malformed(h5_root, text):
    (h5_root / "train_val_split.json").write_text(text)
    _raises(h5_root / "train_val_split.json", read_tcga, str(h5_root))


def test_tcga_error_split_missing(h5_root):
    path = h5_root / "train_val_split.json"
    path.unlink()
    _raises(path, read_tcga, str(h5_root))


def test_tcga_error_patient_in_both_splits(h5_root):
    _write_meta(h5_root, split={"train": ["TCGA-02-0001", "TCGA-06-0190"], "val": ["TCGA-02-0001"]})
    msg = _raises(h5_root / "train_val_split.json", read_tcga, str(h5_root))
    assert "TCGA-02-0001" in msg and "both" in msg


def test_tcga_error_nothing_left(h5_root):
    _write_meta(h5_root, split={"train": ["TCGA-77-7777"], "val": []})
    msg = _raises(h5_root, read_tcga, str(h5_root))
    assert "not_in_split=4" in msg


# --------------------------------------------------------------------------------------- manifest


def _write_manifest(path, rows: list[dict], extra: bool = True) -> None:
    frame = pd.DataFrame(rows)
    if extra:
        frame.insert(2, "notes", "ignored")
    frame.to_csv(path, index=False)


@pytest.fixture
def manifest_data(tmp_path):
    """A CSV in ``tmp_path/meta`` naming png patches (relative), an h5 tile and an absolute png."""
    data = tmp_path / "data"
    (data / "P1").mkdir(parents=True)
    tiles = _tiles(3, 11)
    Image.fromarray(tiles[0]).save(data / "P1" / "a.png")
    Image.fromarray(tiles[1]).save(data / "P1" / "b.png")
    _write_h5(data / "slide.h5", tiles[2:])
    abs_png = tmp_path / "elsewhere.png"
    Image.fromarray(tiles[0]).save(abs_png)
    rows = [
        {"patient": "P1", "slide": "S1", "path": "P1/a.png", "label": "tumour", "split": "train"},
        {"patient": "P1", "slide": "S1", "path": "./P1/b.png", "label": "tumour", "split": "train"},
        {"patient": "P2", "slide": "S1", "path": "slide.h5::0", "label": "normal", "split": "val"},
        {"patient": "P2", "slide": "S2", "path": str(abs_png), "label": "normal", "split": "val"},
    ]
    return tmp_path, data, rows, tiles


def test_manifest_round_trip_relative_to_csv_folder(manifest_data):
    tmp_path, data, rows, tiles = manifest_data
    csv_path = data / "manifest.csv"
    _write_manifest(csv_path, rows)
    table = read_manifest(str(csv_path))
    assert len(table) == 4
    assert table.modality == "he"
    assert table.classes == ("normal", "tumour")
    assert table.patients() == ["P1", "P2"]
    assert table.slide_keys.tolist() == ["P1/S1", "P1/S1", "P2/S1", "P2/S2"]
    assert table.frame["split"].tolist() == ["train", "train", "val", "val"]
    assert table.frame["path"].tolist() == [
        str(data / "P1" / "a.png"),
        str(data / "P1" / "b.png"),
        f"{data / 'slide.h5'}::0",
        str(tmp_path / "elsewhere.png"),
    ]
    assert list(table.frame.columns[:5]) == ["patient", "slide", "path", "label", "split"]
    expected = [tiles[0], tiles[1], tiles[2], tiles[0]]
    for path, tile in zip(table.frame["path"], expected, strict=True):
        patch = load_patch(path, "he")
        assert patch.shape == (3, 16, 16) and patch.dtype == np.uint8
        np.testing.assert_array_equal(patch, tile.transpose(2, 0, 1))


def test_manifest_relative_to_root_and_classes(manifest_data):
    tmp_path, data, rows, _ = manifest_data
    csv_path = tmp_path / "meta" / "m.csv"
    csv_path.parent.mkdir()
    _write_manifest(csv_path, rows, extra=False)
    table = read_manifest(str(csv_path), root=str(data), classes=["tumour", "normal", "other"])
    assert table.classes == ("tumour", "normal", "other")
    assert table.label_index.tolist() == [0, 0, 1, 1]
    assert table.frame["path"].iloc[0] == str(data / "P1" / "a.png")
    assert all(load_patch(p, "he").shape == (3, 16, 16) for p in table.frame["path"])
    # without root, relative paths point next to the CSV (not checked to exist here)
    plain = read_manifest(str(csv_path))
    assert plain.frame["path"].iloc[0] == str(csv_path.parent / "P1" / "a.png")


def test_manifest_relative_path_argument(manifest_data, monkeypatch):
    tmp_path, data, rows, _ = manifest_data
    _write_manifest(data / "m.csv", rows)
    monkeypatch.chdir(tmp_path)
    table = read_manifest(os.path.join("data", "m.csv"), modality="srh")
    assert table.modality == "srh"
    assert table.frame["path"].iloc[0] == str(data / "P1" / "a.png")


def test_manifest_header_case_and_spaces(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("Patient, Slide ,PATH,label,split,extra\nP1,S1,x.png, a ,train,1\n")
    table = read_manifest(str(path))
    assert table.frame.iloc[0].to_dict() == {
        "patient": "P1",
        "slide": "S1",
        "path": str(tmp_path / "x.png"),
        "label": "a",
        "split": "train",
    }


HEADER = "patient,slide,path,label,split\n"


@pytest.mark.parametrize(
    ("text", "kwargs", "needle"),
    [
        ("patient,slide,label,split\nP1,S1,a,train\n", {}, "path"),
        ("", {}, "empty"),
        (HEADER, {}, "no data rows"),
        (HEADER + "P1,S1,x.png,a,train\nP1,,x.png,a,train\n", {}, "data row 2"),
        (
            HEADER + "P1,S1,x.png,a,train\nP1,S1,x.png,a,test\nP1,S1,x.png,a,test\n",
            {},
            "data row 2 (and 1 more",
        ),
        (HEADER + "P1,S1,x.png,a,train\nP2,S1,x.png,b,val\n", {"classes": ["a"]}, "data row 2"),
        (HEADER + "P1,S1,x.png,a,train\n", {"modality": "rgb"}, "modality"),
        (HEADER + "P1,S1,x.png,a,train\nP1,S2,y.png,a,val\n", {}, "both"),
        (HEADER + "P1,S1,x.png,a,train,extra\n", {}, "data row 1 has more fields"),
        (HEADER + "P1,S1,x.png,a,train\nP1,S1,y.png,a,train,extra\n", {}, "malformed CSV"),
        (HEADER + "P1,S1,x.png,a\n", {}, "empty value in column(s) split"),
        ("patient,slide,path,label,split,Path\nP1,S1,x,a,train,y\n", {}, "more than once"),
    ],
    ids=[
        "missing-column",
        "empty-file",
        "header-only",
        "empty-value",
        "bad-split",
        "bad-label",
        "bad-modality",
        "leak",
        "long-first-row",
        "long-later-row",
        "short-row",
        "repeated-column",
    ],
)
def test_manifest_errors(tmp_path, text, kwargs, needle):
    path = tmp_path / "m.csv"
    path.write_text(text)
    msg = _raises(path, read_manifest, str(path), **kwargs)
    assert needle in msg, msg


def test_manifest_error_missing_file(tmp_path):
    msg = _raises(tmp_path / "none.csv", read_manifest, str(tmp_path / "none.csv"))
    assert "not found" in msg


def test_manifest_300k_rows_index(tmp_path):
    """Scale check (no timing assertion): a 300k-row manifest indexes completely."""
    n = 300_000
    idx = np.arange(n)
    patient = np.char.add("P", (idx % 300).astype(str))
    frame = pd.DataFrame(
        {
            "patient": patient,
            "slide": np.char.add("S", (idx % 1300).astype(str)),
            "path": np.char.add(np.char.add("patches/", idx.astype(str)), ".png"),
            "label": np.where(idx % 300 < 150, "tumour", "normal"),
            "split": np.where(idx % 300 < 240, "train", "val"),
            "site": "x",
        }
    )
    path = tmp_path / "big.csv"
    frame.to_csv(path, index=False)
    start = time.perf_counter()
    table = read_manifest(str(path), classes=["normal", "tumour"])
    elapsed = time.perf_counter() - start
    print(f"\nread_manifest: {n} rows indexed in {elapsed:.2f} s")
    assert len(table) == n
    assert table.frame["path"].iloc[-1] == str(tmp_path / "patches" / f"{n - 1}.png")
    assert table.summary()["val"]["patients"] == 60


def test_manifest_normalises_relative_paths(tmp_path):
    (tmp_path / "meta").mkdir()
    path = tmp_path / "meta" / "m.csv"
    path.write_text(
        HEADER
        + "P1,S1,../data/a.png,x,train\n"
        + "P1,S1,./b.png,x,train\n"
        + "P1,S1,c//d.png,x,train\n"
        + "P1,S1,e.h5::3,x,train\n"
        + "P1,S1,~/f.png,x,train\n"
    )
    table = read_manifest(str(path))
    assert table.frame["path"].tolist() == [
        str(tmp_path / "data" / "a.png"),
        str(tmp_path / "meta" / "b.png"),
        str(tmp_path / "meta" / "c" / "d.png"),
        str(tmp_path / "meta" / "e.h5") + "::3",
        os.path.expanduser("~/f.png"),
    ]
    assert read_manifest(str(path), root="/").frame["path"].iloc[1] == "/b.png"
