"""``benchmarks/bench_tile.py`` at a tiny size: its slides are the SVS files hlss-tile expects,
and it prints the JSON layout issue 11 asks for (no timing is checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks", "bench_tile.py")


@pytest.fixture(scope="module")
def bench_tile():
    sys.path.insert(0, os.path.dirname(BENCH))
    try:
        import bench_tile as module
    finally:
        sys.path.remove(os.path.dirname(BENCH))
    return module


def test_generated_slide_reads_as_a_40x_svs(bench_tile, tmp_path):
    tiffslide = pytest.importorskip("tiffslide")
    (path,), shape = bench_tile.make_slides(str(tmp_path), 1, scale=0.05)
    assert shape == (1152, 1600)  # 24000 x 32000 scaled, whole multiples of 64
    with tiffslide.TiffSlide(path) as slide:
        assert slide.dimensions == (shape[1], shape[0])
        assert slide.level_downsamples == pytest.approx(bench_tile.DOWNSAMPLES)
        assert float(slide.properties["tiffslide.mpp-x"]) == bench_tile.MPP
        assert float(slide.properties["tiffslide.objective-power"]) == bench_tile.POWER
        level0 = np.asarray(slide.read_region((0, 0), 0, (shape[1], shape[0])).convert("RGB"))
    # tissue (saturated pink / purple) and glass (grey-white) are both there
    high, low = level0.max(axis=2).astype(int), level0.min(axis=2).astype(int)
    tissue = (high - low) > 40
    assert 0.1 < tissue.mean() < 0.9
    assert level0[~tissue].mean() > 220


def test_tiny_run_prints_the_issue_layout(tmp_path):
    out = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, BENCH, "--slides", "2", "--scale", "0.08", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert set(report["one_slide"]) == {"tiles", "seconds", "tiles_per_s"}
    for key in ("workers_1_s", "workers_2_s", "speedup", "slides", "machine"):
        assert key in report, key
    assert report["slides"] == 2 and report["one_slide"]["tiles"] >= 1
    assert report["tiles_all_slides"] > report["one_slide"]["tiles"]
    assert "cpu" in report["machine"] and "tiffslide" in report["machine"]
    assert not out.exists()  # made by the run, removed at its end (no --keep)

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("keep me")
    proc = subprocess.run(
        [sys.executable, BENCH, "--scale", "0.05", "--out", str(tmp_path / "used")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and "not an empty folder" in proc.stderr
    assert (tmp_path / "used" / "mine.txt").read_text() == "keep me"
