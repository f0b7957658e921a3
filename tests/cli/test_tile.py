"""``hlss-tile`` end to end: slides to a manifest that the readers load and training runs on;
bad slides reported and skipped; a rerun keeps finished slides; usage errors in one line."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys

import pytest

from hlss.cli import tile as tile_cli
from hlss.data.io import read_patch
from hlss.data.manifest import read_manifest, read_string_csv
from hlss.data.tcga import read_tcga
from hlss.data.wsi.settings import VAL_FRACTION, WORKERS, TileSettings
from hlss.schemas.tile import TileConfig
from tests.data.wsi_slides import slide_levels, truncate, write_generic, write_svs
from tests.train.helpers import run_train, summaries

PATIENTS = {"TCGA-AA-0001": "luad", "TCGA-AA-0002": "lusc", "TCGA-AA-0003": "luad"}
PATIENTS["TCGA-AA-0004"] = "lusc"
GOOD = [f"{p}-01Z-00-DX1" for p in PATIENTS]
BAD = {"TCGA-AA-0008-01Z-00-DX1": "truncated", "TCGA-AA-0009-01Z-00-DX1": "no tissue"}


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """Four good slides (two formats) and two bad ones tiled once; returns (root, status,
    stdout, stderr)."""
    root = tmp_path_factory.mktemp("tile")
    slides = root / "slides"
    for i, name in enumerate(GOOD):
        (slides / f"uuid{i}").mkdir(parents=True)
        write = write_svs if i % 2 == 0 else write_generic
        write(slides / f"uuid{i}" / f"{name}.{'svs' if i % 2 == 0 else 'tif'}", slide_levels(i))
    truncate(write_svs(slides / "TCGA-AA-0008-01Z-00-DX1.svs", slide_levels(8)))
    write_svs(slides / "TCGA-AA-0009-01Z-00-DX1.svs", slide_levels(9, tissue=None))
    labels = root / "labels.csv"
    rows = [*PATIENTS.items(), ("TCGA-AA-0008", "luad"), ("TCGA-AA-0009", "lusc")]
    labels.write_text("patient,label\n" + "".join(f"{p},{v}\n" for p, v in rows))
    return root, *_run(root)


def _run(root, *extra):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = tile_cli.main(
            [
                f"slides={root / 'slides'}",
                f"out={root / 'out'}",
                f"labels={root / 'labels.csv'}",
                "patch_size=32",
                "workers=0",
                *extra,
            ]
        )
    return status, out.getvalue(), err.getvalue()


def test_bad_slides_are_named_and_skipped_with_exit_1(tiled):
    root, status, stdout, stderr = tiled
    assert status == 1
    assert "6 slides (4 tiled, 0 kept from an earlier run, 2 failed)" in stdout
    failed = [line for line in stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2
    for (name, words), line in zip(sorted(BAD.items()), failed, strict=True):
        assert name in line and words in line, line
    # nothing written outside out; one file and one thumbnail per good slide
    assert sorted(os.listdir(root)) == ["labels.csv", "out", "slides"]
    names = sorted(os.listdir(root / "out"))
    assert names == sorted(
        [f"{g}.h5" for g in GOOD]
        + ["labels.csv", "manifest.csv", "thumbnails", "train_val_split.json"]
    )
    assert sorted(os.listdir(root / "out" / "thumbnails")) == [f"{g}.png" for g in GOOD]


def test_manifest_loads_through_both_readers(tiled):
    root = tiled[0]
    csv_path = root / "out" / "manifest.csv"
    frame = read_string_csv(str(csv_path))
    assert list(frame.columns) == ["patient", "slide", "path", "label", "split", "x", "y", "mpp"]
    assert set(frame["mpp"]) == {"0.5"} and frame["x"].astype(int).min() >= 256
    table = read_manifest(str(csv_path))
    assert len(table) == len(frame) > 0 and table.classes == ("luad", "lusc")
    assert set(table.frame["patient"]) == set(PATIENTS)
    for part in ("train", "val"):  # one patient per label in each split: patient-disjoint
        sub = table.subset(part).frame
        assert sub["patient"].nunique() == 2 and set(sub["label"]) == {"luad", "lusc"}
    patch = read_patch(table.frame["path"].iloc[0])
    assert patch.shape == (3, 32, 32) and str(patch.dtype) == "uint8"
    tcga = read_tcga(str(root / "out"))
    assert len(tcga) == len(table) and set(tcga.frame["patient"]) == set(PATIENTS)


def test_rerun_with_workers_keeps_finished_slides(tiled):
    root = tiled[0]
    files = [root / "out" / f"{g}.h5" for g in GOOD]
    before = [os.stat(f).st_mtime_ns for f in files]
    manifest = (root / "out" / "manifest.csv").read_text()
    status, stdout, stderr = _run(root, "workers=2")
    assert status == 1 and "(0 tiled, 4 kept from an earlier run, 2 failed)" in stdout
    assert [os.stat(f).st_mtime_ns for f in files] == before
    assert (root / "out" / "manifest.csv").read_text() == manifest
    assert stderr.count("failed: ") == 2


def test_two_training_steps_on_the_manifest(tiled, tmp_path):
    root = tiled[0]
    run_train(
        "dataset=manifest",
        f"dataset.path={root / 'out' / 'manifest.csv'}",
        "text_encoder=tiny",
        "backbone=resnet18",
        "logger=none",
        "loader.patients=2",
        "loader.num_workers=0",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"paths.root={tmp_path}",
    )
    assert summaries(str(tmp_path))[-1]["global_step"] == 2


def test_usage_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for args, words in [
        (["out=o"], "slides"),
        ([f"slides={tmp_path / 'empty'}", "out=o"], "no slide files"),
        ([f"slides={tmp_path}", "out=o", "patch_size=abc"], "patch_size"),
        ([f"slides={tmp_path}", "out=o", "tissue_threshold=2"], "tissue_threshold"),
        ([f"slides={tmp_path}", "out=o", "backend=pillow"], "backend"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            tile_cli.main(args)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_help_as_a_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hlss.cli.tile", "patch_size=224", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hlss-tile: cut whole-slide images")
    for field in dataclasses.fields(TileConfig):
        assert f"\n  {field.name} " in proc.stdout, field.name
    assert "[224]" in proc.stdout and "Powered by Hydra" not in proc.stdout
    assert os.listdir(tmp_path) == []


def test_defaults_come_from_the_tile_settings_and_the_yaml_repeats_them():
    from importlib.resources import files

    from omegaconf import OmegaConf

    yaml = OmegaConf.load(str(files("hlss.conf") / "tile.yaml"))
    cut = dataclasses.asdict(TileSettings())
    cut["compression"] = cut["compression"] or "none"  # the command spells None as "none"
    cut.update(workers=WORKERS, val_fraction=VAL_FRACTION)
    for field in dataclasses.fields(TileConfig):
        if field.name in ("slides", "out"):
            continue  # required, no default
        assert yaml[field.name] == field.default, f"conf/tile.yaml {field.name}"
        if field.name in cut:
            assert field.default == cut[field.name], field.name
    assert set(cut) <= {f.name for f in dataclasses.fields(TileConfig)}


def test_schema_loads_no_numpy():
    code = "import sys, hlss.schemas.tile; print('numpy' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
