"""``hlss-synth`` as a user runs it: the console script, from another working directory."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from hlss.data.opensrh import META_FILE, SPLIT_FILE
from hlss.schemas.tools import SynthConfig

from .console import console, hydra_leftovers, one_error_line

TINY = ("size=16", "patients_per_class=2", "patches_per_slide=1")


def test_writes_the_dataset_relative_to_the_working_directory(tmp_path):
    proc = console("hlss-synth", "out=ds", "seed=3", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and line.startswith(f"wrote {tmp_path / 'ds'}:")
    # 7 classes x 2 patients x 2 slides (default) x 1 patch
    assert "14 patients" in line and "28 slides, 28 patches" in line
    with open(tmp_path / "ds" / META_FILE, encoding="utf-8") as handle:
        assert len(json.load(handle)) == 14
    with open(tmp_path / "ds" / SPLIT_FILE, encoding="utf-8") as handle:
        split = json.load(handle)
    assert len(split["train"]) + len(split["val"]) == 14
    # Hydra writes nothing into the working directory: the dataset is all there is
    assert sorted(os.listdir(tmp_path)) == ["ds"]
    assert hydra_leftovers(tmp_path) == []


def test_help_describes_the_command_and_its_keys(tmp_path):
    proc = console("hlss-synth", "size=48", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("hlss-synth: write a synthetic dataset")
    for field in dataclasses.fields(SynthConfig):
        assert f"\n  {field.name} " in text, field.name
    assert "[48]" in text and "[300]" not in text  # the size in effect, not the default
    assert "[0.25]" in text  # val_fraction's default
    assert "hlss-synth out=" in text  # examples
    assert "Config groups" not in text and "Powered by Hydra" not in text
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("out=ds", "size=abc"), ("size=abc", "Integer")),
        (("out=ds", "+sise=3"), ("sise", "unknown key")),
        (("out=ds", "sise=3"), ("sise",)),
        (("seed=1",), ("out", "required", "out=...")),
        (("out=ds", "size=8"), ("size", "16")),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, names):
    line = one_error_line(console("hlss-synth", *args, cwd=tmp_path))
    for name in names:
        assert name in line, line
    assert os.listdir(tmp_path) == []


def test_refuses_a_non_empty_out_and_leaves_it_alone(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "mine.txt").write_text("keep")
    line = one_error_line(console("hlss-synth", "out=ds", *TINY, cwd=tmp_path))
    assert "already exists" in line
    assert os.listdir(tmp_path / "ds") == ["mine.txt"]


def test_counts_the_files_written_when_output_is_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.delenv("HLSS_PROGRESS", raising=False)
    monkeypatch.setenv("HLSS_PROGRESS_EVERY", "0")  # a line per file; default: every 10% / 30 s
    proc = console("hlss-synth", "out=ds", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    # 14 patients x 2 slides x (1 + 1 nondiagnostic) patches
    assert lines[0].startswith("writing synthetic patches 1/56 files (2%) |")
    assert "files/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("writing synthetic patches 56/56 files (100%) done in")
    assert "\r" not in proc.stderr  # lines, not a bar
    assert proc.stdout.startswith(f"wrote {tmp_path / 'ds'}:")
