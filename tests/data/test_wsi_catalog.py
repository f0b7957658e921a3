"""Slides to tile, their patients, labels and splits (``hlss.data.wsi.catalog``)."""

from __future__ import annotations

import json

import pytest

from hlss.data.wsi.catalog import (
    UNLABELLED,
    catalog,
    find_slides,
    random_split,
    read_slide_table,
    read_split_file,
)
from hlss.errors import ConfigError, DataError

BARCODED = "TCGA-AB-0001-01Z-00-DX1.8f2c"


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


def test_find_slides_in_a_folder_tree_a_glob_or_a_file(tmp_path):
    a = _touch(tmp_path / "gdc" / "uuid1" / f"{BARCODED}.svs")
    b = _touch(tmp_path / "gdc" / "uuid2" / "other.TIF")
    _touch(tmp_path / "gdc" / "uuid2" / "notes.txt")
    _touch(tmp_path / "gdc" / ".hidden" / "x.svs")
    assert find_slides(str(tmp_path / "gdc")) == sorted([a, b])
    assert find_slides(str(tmp_path / "gdc" / "*" / "*.svs")) == [a]
    assert find_slides(b) == [b]
    with pytest.raises(ConfigError, match="no file matches"):
        find_slides(str(tmp_path / "nothing*.svs"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no slide files"):
        find_slides(str(tmp_path / "empty"))


def test_patient_from_table_barcode_or_slide_and_labels(tmp_path):
    labels = tmp_path / "labels.csv"
    # header case and spaces ignored; a TCGA slide listed without its uuid and with extension
    short = BARCODED.split(".")[0]
    labels.write_text(f"Slide , Patient,label\n{short}.svs,tcga-ab-0001,luad\nscan7,P7,lusc\n")
    table = read_slide_table(str(labels))
    paths = [f"/d/{BARCODED}.svs", "/d/scan7.tif", "/d/scan8.tif"]
    entries, unlabelled = catalog(paths, table)
    got = {e.name: (e.patient, e.label, e.patient_from) for e in entries}
    assert got == {BARCODED: ("TCGA-AB-0001", "luad", "table"), "scan7": ("P7", "lusc", "table")}
    assert unlabelled == ["scan8"]
    # no labels file: barcode patients, slides without one are their own patient, unlabelled
    plain, left = catalog(paths, None)
    assert [(e.patient, e.label, e.patient_from) for e in plain] == [
        ("TCGA-AB-0001", UNLABELLED, "barcode"),
        ("scan7", UNLABELLED, "slide"),
        ("scan8", UNLABELLED, "slide"),
    ]
    assert left == []
    with pytest.raises(ConfigError, match="scan7"):
        catalog(["/a/scan7.svs", "/b/scan7.tif"], None)


def test_labels_by_patient_and_bad_tables(tmp_path):
    good = tmp_path / "p.csv"
    good.write_text("patient,label\nTCGA-AB-0001,luad\n")
    entries, _ = catalog([f"/d/{BARCODED}.svs"], read_slide_table(str(good)))
    assert entries[0].label == "luad"
    for text, words in [
        ("slide,stain\na,he\n", "needs columns"),
        ("patient,label\nP1,a\nP1,b\n", "two labels"),
        ("slide,label\ns1,\n", "data row 1: empty label"),
    ]:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(DataError, match=words):
            read_slide_table(str(bad))


def test_split_files_json_and_csv(tmp_path):
    js = tmp_path / "split.json"
    js.write_text(json.dumps({"train": ["tcga-ab-0001"], "val": ["TCGA-AB-0002"]}))
    assert read_split_file(str(js)) == {"TCGA-AB-0001": "train", "TCGA-AB-0002": "val"}
    cs = tmp_path / "split.csv"
    cs.write_text("patient,split\nP1,train\nP2,VAL\n")
    assert read_split_file(str(cs)) == {"P1": "train", "P2": "val"}
    cs.write_text("patient,split\nP1,train\nP1,val\n")
    with pytest.raises(DataError, match="both train and val"):
        read_split_file(str(cs))
    cs.write_text("patient,split\nP1,test\n")
    with pytest.raises(DataError, match="'test'"):
        read_split_file(str(cs))


def test_random_split_is_patient_disjoint_stratified_and_seeded():
    groups = {"a": [f"A{i}" for i in range(8)], "b": ["B0", "B1"], "c": ["C0"]}
    split = random_split(groups, 0.25, seed=3)
    assert set(split) == {p for g in groups.values() for p in g}
    assert [split[p] for p in groups["a"]].count("val") == 2
    assert sorted(split[p] for p in groups["b"]) == ["train", "val"]
    assert split["C0"] == "train"
    assert random_split(groups, 0.25, seed=3) == split
    assert any(random_split(groups, 0.25, seed=s) != split for s in range(4, 10))
