"""The files of an evaluation folder."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from hlss.errors import HLSSError
from hlss.eval.writers import (
    prepare_out,
    run_folder,
    write_config,
    write_level_outputs,
    write_metrics_table,
    write_step_metrics,
    write_summary,
)
from hlss.levels import LEVELS

PNG = b"\x89PNG\r\n\x1a\n"


def _result() -> dict:
    metrics = {lv: {"acc": 0.5, "mca": 0.5} for lv in LEVELS}
    predictions = pd.DataFrame({"path": ["p.tif"], "predicted": ["a"], "score_a": [0.75]})
    confusion = {lv: [[1, 0], [1, 0]] for lv in LEVELS}
    return {
        "metrics": metrics,
        "confusion": confusion,
        "predictions": predictions,
        "classes": ["a", "b"],
    }


INFO = {"checkpoint": "/r/checkpoints/step-0000003.ckpt", "step": 3, "epoch": 1, "other": "x"}


def test_prepare_out_never_reuses_a_folder(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert run_folder(str(ckpt)) == str(tmp_path / "run")
    assert run_folder(str(tmp_path / "lone.ckpt")) == str(tmp_path)
    default = prepare_out(None, str(ckpt))
    assert os.path.dirname(default) == str(tmp_path / "run") and os.path.isdir(default)
    assert os.path.basename(default).startswith("eval-")
    assert prepare_out(str(tmp_path / "new"), str(ckpt)) == str(tmp_path / "new")
    assert prepare_out(str(tmp_path / "new"), str(ckpt)) == str(tmp_path / "new")  # still empty
    (tmp_path / "new" / "keep.txt").write_text("mine")
    with pytest.raises(HLSSError, match="not empty"):
        prepare_out(str(tmp_path / "new"), str(ckpt))
    assert (tmp_path / "new" / "keep.txt").read_text() == "mine"


def test_level_outputs(tmp_path):
    files = write_level_outputs(str(tmp_path / "probe"), _result(), INFO, "linear probe")
    assert set(files) == {"metrics", "predictions"} | {f"confusion_{lv}" for lv in LEVELS}
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert metrics["patch"]["acc"] == 0.5 and metrics["step"] == 3 and metrics["epoch"] == 1
    assert metrics["checkpoint"] == INFO["checkpoint"] and "other" not in metrics
    assert pd.read_csv(files["predictions"])["score_a"].tolist() == [0.75]
    for level in LEVELS:
        assert (tmp_path / "probe" / f"confusion_{level}.png").read_bytes()[:8] == PNG
    assert not [n for n in os.listdir(tmp_path / "probe") if n.startswith(".")]  # no temp files


def test_metrics_table_step_metrics_and_summary(tmp_path):
    row = {"step": 1, "epoch": 0, "patch_acc": 0.5, "slide_acc": 0.6, "patient_acc": 0.7}
    assert write_metrics_table(str(tmp_path), [row]) == {
        "metrics_table": str(tmp_path / "metrics.csv")
    }  # no curve for one checkpoint
    assert not (tmp_path / "accuracy_vs_step.png").exists()
    files = write_metrics_table(str(tmp_path), [row, {**row, "step": 2}])
    assert files["accuracy_curve"] == str(tmp_path / "accuracy_vs_step.png")
    assert (tmp_path / "accuracy_vs_step.png").read_bytes()[:8] == PNG
    assert pd.read_csv(tmp_path / "metrics.csv")["step"].tolist() == [1, 2]

    path = write_step_metrics(str(tmp_path), {"patch": {"acc": 0.5}}, INFO)
    assert path == str(tmp_path / "steps" / "step-0000003" / "metrics.json")
    assert json.loads((tmp_path / "steps" / "step-0000003" / "metrics.json").read_text()) == {
        "patch": {"acc": 0.5},
        "checkpoint": INFO["checkpoint"],
        "step": 3,
        "epoch": 1,
    }

    write_summary(str(tmp_path), {"out": str(tmp_path), "attribute_examples": "text"})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"out": str(tmp_path)}

    files = {"metrics_table": str(tmp_path / "metrics.csv")}
    path = write_summary(str(tmp_path), {"out": str(tmp_path), "files": files})
    assert json.loads((tmp_path / "summary.json").read_text())["files"] == {
        **files,
        "summary": path,  # the summary lists itself
    }
    assert files == {"metrics_table": str(tmp_path / "metrics.csv")}  # the caller's is untouched


def test_config_yaml_round_trips(tmp_path):
    from omegaconf import OmegaConf

    settings = {"ckpt": "/r/last.ckpt", "knn": {"k": 20, "temperature": 0.07}, "dataset": None}
    path = write_config(str(tmp_path), settings)
    assert path == str(tmp_path / "config.yaml")
    assert OmegaConf.to_container(OmegaConf.load(path)) == settings
