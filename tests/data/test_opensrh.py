"""The OpenSRH reader (metadata only; no image is opened)."""

from __future__ import annotations

import json
import os

import pytest

from hlss import CLASSES_OPENSRH
from hlss.data.opensrh import (
    PATCH_KEYS,
    diagnostic_key,
    empty_patch_lists,
    metadata_paths,
    parse_patch_path,
    patch_keys_for,
    patch_path,
    read_opensrh,
)
from hlss.errors import DataError


def patch(patient: str, slide: str, i: int) -> str:
    return patch_path(patient, slide, 0, 0, i * 300, 0)


def read_json(path: str):
    with open(path) as handle:
        return json.load(handle)


def write_meta(root, meta: dict, split: dict) -> str:
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    with open(os.path.join(root, "meta", "opensrh.json"), "w") as h:
        json.dump(meta, h)
    with open(os.path.join(root, "meta", "train_val_split.json"), "w") as h:
        json.dump(split, h)
    return str(root)


def slide_entry(patient, slide, tumor=0, normal=0, nondiag=0) -> dict:
    count = iter(range(100))
    return {
        "tumor_patches": [patch(patient, slide, next(count)) for _ in range(tumor)],
        "normal_patches": [patch(patient, slide, next(count)) for _ in range(normal)],
        "nondiagnostic_patches": [patch(patient, slide, next(count)) for _ in range(nondiag)],
    }


@pytest.fixture
def root(tmp_path):
    meta = {
        "NIO_001": {
            "class": "hgg",
            "slides": {"1234567": slide_entry("NIO_001", "1234567", tumor=3, normal=2, nondiag=1)},
        },
        "NIO_002": {
            "class": "normal",
            "slides": {"77": slide_entry("NIO_002", "77", tumor=5, normal=2, nondiag=2)},
        },
        "NIO_UM_135": {
            "class": "schwan",
            "slides": {
                "1": slide_entry("NIO_UM_135", "1", tumor=1),
                "2": slide_entry("NIO_UM_135", "2", tumor=2, nondiag=1),
            },
        },
        "NIO_009": {"class": "lgg", "slides": {"5": slide_entry("NIO_009", "5", tumor=4)}},
    }
    split = {"train": ["NIO_001", "NIO_UM_135"], "val": ["NIO_002"]}  # NIO_009 in neither
    return write_meta(tmp_path, meta, split)


def test_reads_table_with_list_rule(root):
    table = read_opensrh(root)
    frame = table.frame
    assert table.classes == CLASSES_OPENSRH and table.modality == "srh"
    assert frame.groupby("patient").size().to_dict() == {
        "NIO_001": 3,
        "NIO_002": 2,
        "NIO_UM_135": 3,
    }
    # the normal patient contributes its normal_patches, the others their tumor_patches
    meta = read_json(os.path.join(root, "meta", "opensrh.json"))
    normal = meta["NIO_002"]["slides"]["77"]["normal_patches"]
    assert sorted(frame[frame.patient == "NIO_002"].path) == sorted(
        os.path.join(root, p) for p in normal
    )
    assert set(frame[frame.patient == "NIO_002"].label) == {"normal"}
    assert set(frame.split[frame.patient == "NIO_002"]) == {"val"}
    assert set(frame.slide[frame.patient == "NIO_UM_135"]) == {"1", "2"}
    assert all(os.path.isabs(p) and p.startswith(str(root)) for p in frame.path)
    assert "NIO_009" not in set(frame.patient)  # in neither split
    assert table.label_index[frame.patient.eq("NIO_001").to_numpy()].tolist() == [0, 0, 0]


def test_nondiagnostic_only_when_asked(root):
    table = read_opensrh(root, include_nondiagnostic=True)
    assert table.frame.groupby("patient").size().to_dict() == {
        "NIO_001": 4,
        "NIO_002": 4,
        "NIO_UM_135": 4,
    }


def test_alternative_meta_files(root, tmp_path):
    other = tmp_path / "clean"
    other.mkdir()
    (other / "split.json").write_text(json.dumps({"train": ["NIO_001"], "val": ["NIO_UM_135"]}))
    table = read_opensrh(root, split_file=str(other / "split.json"))
    assert table.summary()["val"]["patients"] == 1
    assert set(table.frame.patient) == {"NIO_001", "NIO_UM_135"}


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="dataset root not found"):
        read_opensrh(tmp_path / "nope")


def test_missing_meta(tmp_path):
    with pytest.raises(DataError, match=r"opensrh.json: file not found"):
        read_opensrh(tmp_path)


def test_malformed_json(root):
    with open(os.path.join(root, "meta", "opensrh.json"), "w") as h:
        h.write('{"NIO_001": {"class": ')
    with pytest.raises(DataError, match=r"opensrh.json: invalid JSON at line 1"):
        read_opensrh(root)


def test_patient_in_both_splits(root):
    write_meta(
        root,
        read_json(os.path.join(root, "meta", "opensrh.json")),
        {"train": ["NIO_001"], "val": ["NIO_001"]},
    )
    with pytest.raises(DataError, match="patient NIO_001 is in both train and val"):
        read_opensrh(root)


def test_unknown_class(root):
    meta = read_json(os.path.join(root, "meta", "opensrh.json"))
    meta["NIO_001"]["class"] = "glioma"
    write_meta(root, meta, {"train": ["NIO_001"], "val": []})
    with pytest.raises(DataError, match="patient NIO_001 has unknown class 'glioma'"):
        read_opensrh(root)


def test_split_file_shape(root):
    write_meta(root, {}, {"train": "NIO_001"})
    with pytest.raises(DataError, match="'train' and 'val'"):
        read_opensrh(root)


def test_no_usable_patches(root):
    write_meta(
        root,
        {"NIO_001": {"class": "hgg", "slides": {"1": slide_entry("NIO_001", "1", normal=2)}}},
        {"train": ["NIO_001"], "val": []},
    )
    with pytest.raises(DataError, match="no usable patches"):
        read_opensrh(root)


# ---------------------------------------------------------------------------- naming rules
def test_patch_path_follows_the_opensrh_layout_and_parses_back():
    rel = patch_path("NIO_UM_135", "1234567", 2000, 5000, 300, 600)
    assert rel == "studies/NIO_UM_135/1234567/patches/NIO_UM_135-1234567-2000_5000_300_600.tif"
    assert parse_patch_path(rel) == ("NIO_UM_135", "1234567", 2000, 5000, 300, 600)


@pytest.mark.parametrize(
    "rel",
    [
        "studies/NIO_001/1/patches/NIO_002-1-0_0_0_0.tif",  # name of another patient
        "studies/NIO_001/1/patches/NIO_001-2-0_0_0_0.tif",  # name of another slide
        "studies/NIO_001/1/patches/NIO_001-1-0_0_0_0.png",
        "studies/NIO_001/1/NIO_001-1-0_0_0_0.tif",  # not in patches/
        "NIO_001/1/patches/NIO_001-1-0_0_0_0.tif",
        "studies/NIO_001/1/patches/NIO_001-1-0_0_0.tif",  # three offsets
    ],
)
def test_parse_patch_path_rejects_other_names(rel):
    assert parse_patch_path(rel) is None


def test_list_rule():
    assert diagnostic_key("normal") == "normal_patches"
    for label in ("hgg", "lgg", "mening", "metast", "pituita", "schwan"):
        assert diagnostic_key(label) == "tumor_patches"
    assert patch_keys_for("normal") == ("normal_patches",)
    assert patch_keys_for("hgg", include_nondiagnostic=True) == (
        "tumor_patches",
        "nondiagnostic_patches",
    )
    lists = empty_patch_lists()
    assert tuple(lists) == PATCH_KEYS and all(v == [] for v in lists.values())
    lists["tumor_patches"].append("x")
    assert empty_patch_lists()["tumor_patches"] == []  # a fresh copy each call


def test_metadata_paths(root, tmp_path):
    assert metadata_paths(root) == (
        os.path.abspath(root),
        os.path.join(os.path.abspath(root), "meta", "opensrh.json"),
        os.path.join(os.path.abspath(root), "meta", "train_val_split.json"),
    )
    other = str(tmp_path / "elsewhere.json")
    _, meta_path, split_path = metadata_paths(root, "clean/m.json", other)
    assert meta_path == os.path.join(os.path.abspath(root), "clean", "m.json")
    assert split_path == other
    with pytest.raises(DataError, match="dataset root not found"):
        metadata_paths(tmp_path / "nope")
