"""Tests of the synthetic OpenSRH-layout generator, its cache and the ``hlss-synth`` script."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import tifffile

from hlss import CLASSES_OPENSRH
from hlss.cli.synth import main as synth_main
from hlss.data import synthetic
from hlss.data.io import load_patch
from hlss.data.opensrh import read_opensrh
from hlss.data.synthetic import ensure_synthetic, generate_opensrh
from hlss.errors import HLSSError

SMALL = dict(
    seed=0,
    patients_per_class=2,
    slides_per_patient=2,
    patches_per_slide=3,
    nondiagnostic_per_slide=1,
    size=32,
)
NAME_RE = re.compile(
    r"^studies/(?P<patient>NIO_(?:UM_)?\d{3})/(?P<slide>\d{7})/patches/"
    r"(?P=patient)-(?P=slide)-(?P<ix>\d+)_(?P<jx>\d+)_(?P<iy>0|300|600)_(?P<jy>0|300|600)\.tif$"
)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> str:
    return generate_opensrh(str(tmp_path_factory.mktemp("synth") / "ds"), **SMALL)


def _meta(root: str) -> tuple[dict, dict]:
    with open(os.path.join(root, "meta", "opensrh.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    with open(os.path.join(root, "meta", "train_val_split.json"), encoding="utf-8") as handle:
        split = json.load(handle)
    return meta, split


def test_round_trip_through_reader(small_root):
    table = read_opensrh(small_root)
    frame = table.frame
    n_patients = len(CLASSES_OPENSRH) * SMALL["patients_per_class"]
    n_slides = n_patients * SMALL["slides_per_patient"]
    assert len(table) == n_slides * SMALL["patches_per_slide"]
    assert frame["patient"].nunique() == n_patients
    assert table.slide_keys.nunique() == n_slides
    for part in ("train", "val"):
        assert set(frame.loc[frame["split"] == part, "label"]) == set(CLASSES_OPENSRH)

    with_nd = read_opensrh(small_root, include_nondiagnostic=True)
    assert len(with_nd) == n_slides * (
        SMALL["patches_per_slide"] + SMALL["nondiagnostic_per_slide"]
    )


def test_metadata_structure(small_root):
    meta, split = _meta(small_root)
    assert set(split) == {"train", "val"}
    assert not set(split["train"]) & set(split["val"])
    assert set(split["train"]) | set(split["val"]) == set(meta)
    for patient, entry in meta.items():
        assert re.fullmatch(r"NIO_(UM_)?\d{3}", patient)
        assert len(entry["slides"]) == SMALL["slides_per_patient"]
        for lists in entry["slides"].values():
            assert set(lists) == {"tumor_patches", "normal_patches", "nondiagnostic_patches"}
            used, unused = "tumor_patches", "normal_patches"
            if entry["class"] == "normal":
                used, unused = unused, used
            assert len(lists[used]) == SMALL["patches_per_slide"]
            assert lists[unused] == []
            assert len(lists["nondiagnostic_patches"]) == SMALL["nondiagnostic_per_slide"]


def test_every_patch_is_a_channel_first_uint16_tiff(small_root):
    meta, _ = _meta(small_root)
    size = SMALL["size"]
    seen = set()
    for patient, entry in meta.items():
        for slide, lists in entry["slides"].items():
            for rel in (p for key in sorted(lists) for p in lists[key]):
                match = NAME_RE.match(rel)
                assert match, rel
                assert (match["patient"], match["slide"]) == (patient, slide)
                assert int(match["ix"]) % 1000 == 0 and int(match["jx"]) % 1000 == 0
                path = os.path.join(small_root, *rel.split("/"))
                assert os.path.isfile(path)
                arr = load_patch(path, "srh")
                assert arr.shape == (2, size, size) and arr.dtype == np.uint16
                seen.add(rel)
    on_disk = {
        os.path.relpath(os.path.join(d, f), small_root).replace(os.sep, "/")
        for d, _, files in os.walk(os.path.join(small_root, "studies"))
        for f in files
    }
    assert on_disk == seen


def test_intensities_look_like_srh(small_root):
    table = read_opensrh(small_root)
    means = np.array([load_patch(p, "srh").reshape(2, -1).mean(1) for p in table.frame["path"]])
    assert means.min() > 1000 and means.max() < 40000
    # CH3 (protein + lipid) is on average brighter than CH2 (lipid)
    assert (means[:, 1] > means[:, 0]).mean() > 0.9


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small_root):
    again = generate_opensrh(str(tmp_path / "again"), **SMALL)
    assert _meta(again) == _meta(small_root)
    meta, _ = _meta(small_root)
    rels = [p for e in meta.values() for s in e["slides"].values() for k in s for p in s[k]]
    for rel in rels[:: max(1, len(rels) // 12)]:
        with (
            open(os.path.join(small_root, rel), "rb") as a,
            open(os.path.join(again, rel), "rb") as b,
        ):
            assert a.read() == b.read(), rel

    other = generate_opensrh(str(tmp_path / "other"), **{**SMALL, "seed": 1})
    assert _meta(other) != _meta(small_root)
    first = tifffile.imread(os.path.join(small_root, rels[0]))
    other_meta, _ = _meta(other)
    other_rels = [
        p for e in other_meta.values() for s in e["slides"].values() for k in s for p in s[k]
    ]
    assert not np.array_equal(first, tifffile.imread(os.path.join(other, other_rels[0])))


def test_refuses_non_empty_out_and_leaves_it_alone(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HLSSError, match="not empty"):
        generate_opensrh(str(out), **SMALL)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["busy"]  # no temporary leftovers

    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate_opensrh(str(empty), **SMALL) == str(empty)
    assert os.path.isfile(empty / "meta" / "opensrh.json")


@pytest.mark.parametrize(
    "bad",
    [
        {"patients_per_class": 1},
        {"val_fraction": 1.0},
        {"size": 4},
        {"seed": -1},
        {"patches_per_slide": 0},
    ],
)
def test_bad_parameters_raise_one_line(tmp_path, bad):
    with pytest.raises(HLSSError) as info:
        generate_opensrh(str(tmp_path / "ds"), **{**SMALL, **bad})
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    def boom(path, patch):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "_write_tiff", boom)
    with pytest.raises(OSError):
        generate_opensrh(str(tmp_path / "ds"), **SMALL)
    assert os.listdir(tmp_path) == []


def test_val_count_per_class(tmp_path):
    root = generate_opensrh(
        str(tmp_path / "ds"), **{**SMALL, "patients_per_class": 4, "patches_per_slide": 1}
    )
    meta, split = _meta(root)
    for label in CLASSES_OPENSRH:
        val = [p for p in split["val"] if meta[p]["class"] == label]
        assert len(val) == 1  # max(1, round(0.25 * 4))


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synth_main([f"out={out}", "size=16", "patients_per_class=2", "patches_per_slide=1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out}") and "14 patients" in line and "\n" not in line
    assert os.path.isfile(out / "meta" / "opensrh.json")

    for argv in (["size=16"], [f"out={tmp_path / 'x'}", "colour=red"], [f"out={out}", "size=16"]):
        with pytest.raises(SystemExit) as info:
            synth_main(argv)
        assert info.value.code == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_ensure_synthetic_caches(tmp_path, monkeypatch):
    params = {**SMALL, "size": 16, "patches_per_slide": 1}
    first = ensure_synthetic(cache_dir=str(tmp_path), **params)
    assert os.path.basename(first).startswith("opensrh-synthetic-")
    marker = os.path.join(first, "meta", "opensrh.json")
    stamp = os.stat(marker).st_mtime_ns

    def no_regeneration(*args, **kwargs):
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(synthetic, "_write_dataset", no_regeneration)
    assert ensure_synthetic(cache_dir=str(tmp_path), **params) == first
    assert os.stat(marker).st_mtime_ns == stamp
    monkeypatch.setenv("HLSS_CACHE", str(tmp_path))
    assert ensure_synthetic(**params) == first
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(first)]


def test_ensure_synthetic_key_and_unknown_parameter(tmp_path):
    assert synthetic.synthetic_key() == synthetic.synthetic_key(seed=0, size=300)
    assert synthetic.synthetic_key(seed=0) != synthetic.synthetic_key(seed=1)
    with pytest.raises(HLSSError, match="colour"):
        ensure_synthetic(cache_dir=str(tmp_path), colour="red")


def test_ensure_synthetic_losing_the_race(tmp_path, monkeypatch):
    """Another process publishes the dataset while this one generates: use theirs, drop ours."""
    params = {**SMALL, "size": 16, "patches_per_slide": 1}
    target = os.path.join(str(tmp_path), "opensrh-synthetic-" + synthetic.synthetic_key(**params))
    real_write = synthetic._write_dataset

    def competitor_wins(root, *args, **kwargs):
        real_write(root, *args, **kwargs)
        other = tmp_path / "other-rank"  # the other rank finishes first and publishes
        other.mkdir()
        real_write(str(other), *args, **kwargs)
        os.rename(other, target)

    monkeypatch.setattr(synthetic, "_write_dataset", competitor_wins)
    assert ensure_synthetic(cache_dir=str(tmp_path), **params) == target
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(target)]
    assert len(read_opensrh(target)) == 7 * 2 * 2


def _features(patch: np.ndarray) -> list[float]:
    """Gain-invariant hand-crafted statistics of one ``(2, H, W)`` patch."""
    ch2, ch3 = patch.astype(np.float64)
    diff = ch3 - ch2
    m2, m3 = ch2.mean(), ch3.mean()
    grad2 = np.diff(ch2, axis=0)[:, :-1] ** 2 + np.diff(ch2, axis=1)[:-1] ** 2
    gradd = np.diff(diff, axis=0)[:, :-1] ** 2 + np.diff(diff, axis=1)[:-1] ** 2
    return [
        diff.mean() / m3,  # nuclear/protein content
        (diff > 0.5 * m3).mean(),  # nuclear area fraction
        grad2.mean() / m2**2,  # fibre/edge energy
        (ch2 > 1.5 * np.median(ch2)).mean(),  # bright lipid structures
        gradd.mean() / m3**2,  # nuclear edge energy
        ch2.std() / m2,
        diff.std() / m3,
    ]


def test_class_signal_is_learnable(tmp_path):
    """Leave-one-patient-out nearest-centroid on simple features beats chance (1/7) clearly."""
    root = generate_opensrh(
        str(tmp_path / "ds"),
        seed=0,
        patients_per_class=3,
        slides_per_patient=2,
        patches_per_slide=6,
        nondiagnostic_per_slide=0,
        size=64,
    )
    table = read_opensrh(root)
    feats = np.array([_features(load_patch(p, "srh")) for p in table.frame["path"]])
    z = (feats - feats.mean(0)) / (feats.std(0) + 1e-12)
    labels = table.label_index
    patients = table.frame["patient"].to_numpy()
    correct = 0
    for patient in np.unique(patients):
        held = patients == patient
        centroids = np.stack([z[~held & (labels == k)].mean(0) for k in range(7)])
        dist = ((z[held][:, None, :] - centroids[None]) ** 2).sum(-1)
        correct += int((dist.argmin(1) == labels[held]).sum())
    accuracy = correct / len(labels)
    assert accuracy > 0.4, accuracy

    # the patient gain hides the class in the mean intensity alone
    mean = np.array([load_patch(p, "srh").mean() for p in table.frame["path"]])
    centres = np.array([mean[labels == k].mean() for k in range(7)])
    by_mean = np.abs(mean[:, None] - centres[None]).argmin(1)
    assert (by_mean == labels).mean() < accuracy
