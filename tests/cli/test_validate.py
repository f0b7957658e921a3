"""``hlss-validate`` as a user runs it: the console script, from another working directory."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from hlss.data.opensrh import META_FILE, META_NAME, SPLIT_NAME
from hlss.data.synthetic import generate_opensrh
from hlss.schemas.tools import ValidateConfig

from .console import console, hydra_leftovers, one_error_line


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("validate") / "ds"
    return generate_opensrh(str(root), size=16, patients_per_class=2, patches_per_slide=1)


def test_trainable_dataset_and_cleaned_copy_relative_to_the_working_directory(dataset, tmp_path):
    proc = console("hlss-validate", f"root={dataset}", "workers=0", "clean_out=clean", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "verdict: TRAINABLE" in proc.stdout
    assert f"cleaned metadata written: {tmp_path / 'clean' / META_NAME}" in proc.stdout
    assert sorted(os.listdir(tmp_path / "clean")) == sorted([META_NAME, SPLIT_NAME])
    # Hydra writes nothing into the working directory: the cleaned copy is all there is
    assert os.listdir(tmp_path) == ["clean"]
    assert hydra_leftovers(tmp_path) == []


def test_untrainable_dataset_exits_1(dataset, tmp_path):
    meta_file = tmp_path / "meta.json"
    with open(os.path.join(dataset, META_FILE), encoding="utf-8") as handle:
        meta = json.load(handle)
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if v["class"] != "schwan"}))
    proc = console("hlss-validate", f"root={dataset}", f"meta_file={meta_file}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "NOT TRAINABLE" in proc.stdout and "schwan" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == ["meta.json"]


def test_help_describes_the_command_and_its_keys(tmp_path):
    proc = console("hlss-validate", "workers=7", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("hlss-validate: check an OpenSRH-layout dataset")
    for field in dataclasses.fields(ValidateConfig):
        assert f"\n  {field.name} " in text, field.name
    assert "[7]" in text and "[4]" not in text  # the workers in effect, not the default
    assert "Exit status: 0 clean or warnings only, 1 an error" in text
    assert "hlss-validate root=" in text
    assert "Config groups" not in text and "Powered by Hydra" not in text
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("workers=abc",), ("workers=abc", "Integer")),
        (("+sise=3",), ("sise", "unknown key")),
        (("sise=3",), ("sise",)),
        (("workers=-1",), ("workers", ">= 0")),
        (("root=missing",), ("missing", "not found")),
    ],
)
def test_bad_input_is_one_line(dataset, tmp_path, args, names):
    args = args if any(a.startswith("root=") for a in args) else (f"root={dataset}", *args)
    line = one_error_line(console("hlss-validate", *args, cwd=tmp_path))
    for name in names:
        assert name in line, line
    assert os.listdir(tmp_path) == []


def test_missing_root_is_one_line(tmp_path):
    line = one_error_line(console("hlss-validate", "workers=0", cwd=tmp_path))
    assert "root" in line and "required" in line and "root=..." in line


def test_dropped_data_exits_1_and_warnings_fail_only_under_strict(dataset, tmp_path):
    with open(os.path.join(dataset, META_FILE), encoding="utf-8") as handle:
        meta = json.load(handle)
    # a patient in neither split: a warning only
    warned = tmp_path / "warned.json"
    warned.write_text(json.dumps({**meta, "NIO_999": next(iter(meta.values()))}))
    args = (f"root={dataset}", "workers=0", f"meta_file={warned}")
    proc = console("hlss-validate", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "verdict: TRAINABLE (1 warning(s))" in proc.stdout
    proc = console("hlss-validate", *args, "strict=true", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "verdict: TRAINABLE (1 warning(s))" in proc.stdout and "strict=true" in proc.stdout

    # a listed file that is not there: training would drop it, so the check fails
    entry = next(iter(meta.values()))
    slide = next(iter(entry["slides"].values()))
    key = next(k for k, v in slide.items() if isinstance(v, list) and v)
    slide[key].append("studies/nowhere/gone.tif")
    dropped = tmp_path / "dropped.json"
    dropped.write_text(json.dumps(meta))
    proc = console(
        "hlss-validate", f"root={dataset}", "workers=0", f"meta_file={dropped}", cwd=tmp_path
    )
    assert proc.returncode == 1, proc.stderr
    assert "missing_file" in proc.stdout and "verdict: TRAINABLE after cleaning" in proc.stdout
    assert "clean_out=DIR" in proc.stdout and "Traceback" not in proc.stderr
