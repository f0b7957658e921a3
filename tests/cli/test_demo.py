"""`hlss-demo` end to end at toy size: the real console commands chained, and the table."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_prints_table(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hlss.cli.demo",
            f"out={out}",
            "steps=2",
            "patients=4",
            "patients_per_class=2",
            "patches_per_slide=4",
            "size=32",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for name in ("untrained (ResNet-18)", "HiDisc (trained)", "HLSS (trained)"):
        row = next(line for line in text.splitlines() if line.startswith(name))
        values = [float(v) for v in re.findall(r"\d\.\d{3}", row)]
        assert len(values) == 6 and all(0.0 <= v <= 1.0 for v in values)
    assert "mlflow ui --backend-store-uri sqlite:///" in text
    assert "confusion_patient.png" in text
    # the dataset is reused by a second demo in the same folder
    data_dirs = [d for d in os.listdir(out) if d.startswith("data-")]
    assert len(data_dirs) == 1


def test_demo_rejects_bad_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hlss.cli.demo", f"out={tmp_path}", "stepz=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown key 'stepz'; known keys: out, steps, patients, patients_per_class, slides_per_patient, patches_per_slide, size, seed"
    ]
