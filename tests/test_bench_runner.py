"""``make bench``'s runner: the JSON layout of a quick run, and stages that are not available."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "benchmarks", "bench.py")
SECTIONS = ["machine", "data", "train", "extract", "knn", "eval_scale", "gpu"]
KNN_KEYS = {"n_ref", "n_query", "dim", "seconds", "matmul_bound_seconds", "ratio", "backend"}
EVAL_SCALE_KEYS = {"n_ref", "n_query", "dim", "seconds", "peak_rss_mb"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("hlss_bench_runner", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_the_issue_layout(tmp_path):
    out = tmp_path / "latest.json"
    proc = subprocess.run(
        [sys.executable, RUNNER, "--quick", "--stages", "knn,eval_scale", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert list(report) == SECTIONS
    assert report["data"] is None and report["train"] is None and report["extract"] is None
    assert report["gpu"] is None
    assert set(report["knn"]) == KNN_KEYS
    assert set(report["eval_scale"]) == EVAL_SCALE_KEYS
    assert report["knn"]["backend"] in ("torch", "torch_bf16", "faiss", "faiss_gpu")
    assert report["knn"]["seconds"] > 0 and report["eval_scale"]["peak_rss_mb"] > 0
    for key in ("cpu", "cores", "torch", "device", "bf16_fast", "cuda"):
        assert key in report["machine"]
    assert "ratio" in proc.stdout and "met?" in proc.stdout  # the table was printed


def test_stage_without_measure_is_not_available(bench, tmp_path, monkeypatch):
    (tmp_path / "bench_data.py").write_text("def main():\n    pass\n")
    (tmp_path / "bench_train.py").write_text("import no_such_module_here\n")
    (tmp_path / "bench_extract.py").write_text(
        "def measure(quick=False):\n    raise RuntimeError('boom')\n"
    )
    (tmp_path / "bench_knn.py").write_text(
        "def measure(quick=False, extra=None):\n"
        "    extra['agreement_with_fp32'] = 1.0\n"
        "    return {'ratio': 1.1, 'quick': quick}\n"
    )
    monkeypatch.setattr(bench, "HERE", str(tmp_path))
    section, _, reason = bench.run_stage("data", quick=True)
    assert section is None and "no measure()" in reason
    section, _, reason = bench.run_stage("train", quick=True)
    assert section is None and "cannot be imported" in reason
    section, _, reason = bench.run_stage("extract", quick=True)
    assert section is None and "boom" in reason
    section, details, reason = bench.run_stage("knn", quick=True)
    assert reason is None and section == {"ratio": 1.1, "quick": True}
    assert details == {"agreement_with_fp32": 1.0}


def test_table_marks_targets(bench):
    report = {
        "knn": {"ratio": 1.2, "seconds": 3.0},
        "eval_scale": {"peak_rss_mb": 5000.0},
        "data": None,
    }
    text = bench.table(report, {"knn": {"seconds_over_reference": 0.6}})
    lines = {tuple(line.split()[:2]): line.split()[-1] for line in text.splitlines()[2:]}
    assert lines[("knn", "ratio")] == "yes"
    assert lines[("knn", "seconds_over_reference")] == "no"
    assert lines[("eval_scale", "peak_rss_mb")] == "no"
    assert lines[("knn", "seconds")] == "-"
    assert bench.met(float("nan"), "<=", 1.0) == "-"


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the answer without a GPU"
)
def test_gpu_stage_is_not_available_without_cuda(tmp_path):
    out = tmp_path / "latest.json"
    proc = subprocess.run(
        [sys.executable, RUNNER, "--stages", "gpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage gpu: not available (no CUDA device)" in proc.stdout
    assert json.loads(out.read_text())["gpu"] is None


def test_gpu_bench_replicates_patients_not_files():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from bench_gpu import replicated
    finally:
        sys.path.pop(0)
    from hlss.data.table import PatchTable

    table = PatchTable.from_records(
        ["p1", "p1", "p2"],
        ["1", "1", "1"],
        ["a.tif", "b.tif", "c.tif"],
        ["x", "x", "y"],
        ["train"] * 3,
    )
    copies = replicated(table, 3)
    assert len(copies) == 9 and copies.classes == table.classes
    assert sorted(set(copies.frame["path"])) == ["a.tif", "b.tif", "c.tif"]
    assert len(set(copies.frame["patient"])) == 6
    per_patient = copies.frame.groupby("patient")["label"].nunique()
    assert (per_patient == 1).all()
