"""`hlss-demo` end to end at toy size: the real console commands chained, and the table."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest

from hlss.schemas.tools import DemoConfig

from .console import console, hydra_leftovers, one_error_line


def test_demo_prints_table(tmp_path):
    proc = console(
        "hlss-demo",
        "out=demo",  # relative: to the working directory
        "steps=2",
        "patients=4",
        "patients_per_class=2",
        "patches_per_slide=4",
        "size=32",
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for name in ("untrained (ResNet-18)", "HiDisc (trained)", "HLSS (trained)"):
        row = next(line for line in text.splitlines() if line.startswith(name))
        values = [float(v) for v in re.findall(r"\d\.\d{3}", row)]
        # acc and mca per level, then the patient accuracy's bootstrap interval
        assert len(values) == 8 and all(0.0 <= v <= 1.0 for v in values)
        assert values[6] <= values[4] <= values[7]
    assert "mlflow ui --backend-store-uri sqlite:///" in text
    assert "confusion_patient.png" in text
    curves = re.search(r"learning curves: (\S+\.png)", text)
    assert curves and os.path.getsize(curves.group(1)) > 0
    # the dataset is reused by a second demo in the same folder
    out = tmp_path / "demo"
    data_dirs = [d for d in os.listdir(out) if d.startswith("data-")]
    assert len(data_dirs) == 1
    # the training steps use the renamed loader node
    assert "loader.patients=4" in text
    # nothing of Hydra's in the working directory (the commands' runs live under out=)
    assert hydra_leftovers(tmp_path) == []


def test_demo_rejects_bad_key(tmp_path):
    line = one_error_line(console("hlss-demo", f"out={tmp_path}", "stepz=3", cwd=tmp_path))
    assert "'stepz'" in line and "DemoConfig" in line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("steps=abc",), ("steps=abc", "Integer")),
        (("+sise=3",), ("sise", "unknown key", "steps")),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, names):
    line = one_error_line(console("hlss-demo", *args, cwd=tmp_path))
    for name in names:
        assert name in line, line
    assert os.listdir(tmp_path) == []


def test_help_describes_the_command_and_its_keys(tmp_path):
    proc = console("hlss-demo", "steps=12", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("hlss-demo: the whole pipeline on synthetic data")
    for field in dataclasses.fields(DemoConfig):
        assert f"\n  {field.name} " in text, field.name
    assert "[12]" in text and "[300]" not in text  # the steps in effect, not the default
    assert "[demo]" in text and "hlss-demo out=" in text
    assert "Config groups" not in text and "Powered by Hydra" not in text
    assert os.listdir(tmp_path) == []
