"""`hlss-eval` end to end on a tiny trained run."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys

import pandas as pd
import pytest
from omegaconf import OmegaConf

from hlss.cli import eval as eval_cli
from hlss.eval.embed import default_cache_root

LEVELS = ("patch", "slide", "patient")
FAST = ["knn.k=20", "bootstrap.n=200", "embed.num_workers=0", "probe.max_iter=20"]


def run_eval(*args: str) -> None:
    argv = sys.argv
    sys.argv = ["hlss-eval", *args]
    try:
        eval_cli.main()
    finally:
        sys.argv = argv


def embedding_sets() -> set[str]:
    root = os.path.join(default_cache_root(), "embeddings")
    return set(os.listdir(root)) if os.path.isdir(root) else set()


def test_eval_run_folder_writes_every_output(tiny_run, tmp_path, capsys):
    out = tmp_path / "ev"
    run_eval(f"ckpt={tiny_run['run_dir']}", f"out={out}", "mlflow.enabled=false", *FAST)
    printed = capsys.readouterr().out
    assert "patient" in printed and f"outputs: {out}" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["checkpoint"].endswith("step-0000002.ckpt")
    for level in LEVELS:
        for key in ("acc", "top2", "top3", "mca", "map"):
            assert 0.0 <= metrics[level][key] <= 1.0
        assert metrics[level]["top3"] >= metrics[level]["top2"] >= metrics[level]["acc"]
    lo, hi = metrics["patient"]["acc_ci95"]
    assert 0.0 <= lo <= metrics["patient"]["acc"] <= hi <= 1.0

    table = pd.read_csv(out / "metrics.csv")
    assert table["step"].tolist() == [1, 2]  # every checkpoint, in step order
    assert {"patch_acc", "slide_mca", "patient_map"} <= set(table.columns)

    preds = pd.read_csv(out / "predictions.csv")
    assert {"path", "patient", "slide", "label", "predicted"} <= set(preds.columns)
    assert len([c for c in preds.columns if c.startswith("score_")]) == 7
    assert preds["label"].nunique() == 7  # the tiny synthetic val split has every class
    for level in LEVELS:
        assert (out / f"confusion_{level}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "accuracy_vs_step.png").is_file()
    assert (out / "steps" / "step-0000001" / "metrics.json").is_file()
    # language-aligned outputs and the linear probe
    zero_shot = json.loads((out / "zero_shot" / "metrics.json").read_text())
    assert set(LEVELS) <= set(zero_shot)
    attributes = pd.read_csv(out / "attributes.csv")
    assert set(attributes["level"]) == set(LEVELS)
    probe = json.loads((out / "probe" / "metrics.json").read_text())
    assert 0.0 <= probe["patient"]["acc"] <= 1.0


def test_second_eval_reuses_embeddings(tiny_run, tmp_path):
    ckpt = tiny_run["checkpoints"][-1]
    run_eval(
        f"ckpt={ckpt}",
        f"out={tmp_path / 'a'}",
        "mlflow.enabled=false",
        "zero_shot.enabled=false",
        "explain.enabled=false",
        "probe.enabled=false",
        *FAST,
    )
    before = embedding_sets()
    run_eval(
        f"ckpt={ckpt}",
        f"out={tmp_path / 'b'}",
        "mlflow.enabled=false",
        "zero_shot.enabled=false",
        "explain.enabled=false",
        "probe.enabled=false",
        *FAST,
        "knn.k=5",
        "aggregate=mean_embedding",
    )
    assert embedding_sets() == before  # other kNN settings, no new embedding pass
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["step"] == b["step"] == 2


def test_lone_checkpoint_copied_anywhere(tiny_run, tmp_path):
    """A checkpoint carries its run config: no config.yaml, no run folder needed."""
    lone = tmp_path / "elsewhere" / "model.ckpt"
    lone.parent.mkdir()
    shutil.copy(tiny_run["checkpoints"][-1], lone)
    run_eval(
        f"ckpt={lone}",
        "mlflow.enabled=false",
        "zero_shot.enabled=false",
        "explain.enabled=false",
        "probe.enabled=false",
        *FAST,
    )
    (out,) = [p for p in (tmp_path / "elsewhere").iterdir() if p.is_dir()]
    assert out.name.startswith("eval-")  # the default out: beside the checkpoint
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["checkpoint"] == str(lone)


def test_untrained_baseline(tiny_run, tmp_path):
    run_eval(
        f"ckpt={tiny_run['run_dir']}",
        f"out={tmp_path / 'u'}",
        "untrained=true",
        "mlflow.enabled=false",
        "zero_shot.enabled=false",
        "explain.enabled=false",
        "probe.enabled=false",
        *FAST,
    )
    metrics = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert metrics["step"] == 0
    assert len(pd.read_csv(tmp_path / "u" / "metrics.csv")) == 1


def test_evals_of_other_settings_log_side_by_side_in_the_training_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tests.train.helpers import TINY, run_train, summaries

    monkeypatch.chdir(tmp_path)
    run_train(*TINY, "trainer.max_steps=1")
    (summary,) = summaries(str(tmp_path / "outputs"))
    common = [
        f"ckpt={summary['last_checkpoint']}",
        "zero_shot.enabled=false",
        "explain.enabled=false",
        *[a for a in FAST if not a.startswith("knn.k")],
    ]
    run_eval(*common, f"out={tmp_path / 'ev'}")  # the default k=200: the short names
    run_eval(*common, f"out={tmp_path / 'k20'}", "knn.k=20", "probe.enabled=false")
    run_eval(*common, f"out={tmp_path / 'k20m'}", "knn.k=20", "aggregate=mean_embedding")
    db = tmp_path / "outputs" / "mlruns.db"
    run_id = summary["mlflow_run_id"]
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "select key, step from metrics where run_uuid=? and key not like 'train%'",
            (run_id,),
        ).fetchall()
        artifacts_uri = con.execute(
            "select artifact_uri from runs where run_uuid=?", (run_id,)
        ).fetchone()[0]
    keys = {k for k, _ in rows}
    assert {"eval/patch_acc", "eval/slide_mca", "eval/patient_map", "eval/patient_acc"} <= keys
    assert {"eval/k20_softmax_sum/patch_acc", "eval/k20_mean_embedding/patient_acc"} <= keys
    assert {"probe/it20/patient_acc"} <= keys  # probe.max_iter=20 is not the default
    assert {s for k, s in rows if k.startswith(("eval", "probe"))} == {1}  # the checkpoint's step
    knn_rows = [k for k, _ in rows if k.startswith("eval")]
    assert len(knn_rows) == len(set(knn_rows))  # three settings, three names: nothing overwritten
    assert artifacts_uri.startswith(str(tmp_path / "outputs" / "mlartifacts"))  # beside the store

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(run_id)
    params, tags = run.data.params, run.data.tags
    assert params["eval.k"] == "200" and params["eval.k20_softmax_sum.k"] == "20"
    assert params["eval.k20_mean_embedding.aggregate"] == "mean_embedding"
    assert params["probe.it20.max_iter"] == "20"
    assert tags["eval.k20_mean_embedding.ckpt"] == os.path.abspath(summary["last_checkpoint"])
    assert tags["eval.k20_mean_embedding.out"] == str(tmp_path / "k20m")
    uploaded = {a.path for a in client.list_artifacts(run_id, "eval/k20")}
    assert {"eval/k20/config.yaml", "eval/k20/summary.json", "eval/k20/metrics.json"} <= uploaded

    written = json.loads((tmp_path / "k20m" / "summary.json").read_text())
    assert written["metric_prefixes"]["knn"] == "eval/k20_mean_embedding"
    assert written["mlflow"]["run_id"] == run_id
    settings = OmegaConf.load(tmp_path / "k20m" / "config.yaml")
    assert settings.knn.k == 20 and settings.aggregate == "mean_embedding"
    assert settings.knn.backend == "auto" and settings.untrained is False
    assert settings.ckpt == os.path.abspath(summary["last_checkpoint"])
    assert settings.dataset.name == "synthetic"  # the training run's dataset, spelled out


def test_summary_lists_every_file_and_every_metric_file_has_its_step(tiny_run, tmp_path):
    out = tmp_path / "ev"
    run_eval(f"ckpt={tiny_run['run_dir']}", f"out={out}", "mlflow.enabled=false", *FAST)
    summary = json.loads((out / "summary.json").read_text())
    on_disk = {str(p) for p in out.rglob("*") if p.is_file()}
    assert set(summary["files"].values()) == on_disk
    assert {"config", "summary", "metrics_table", "zero_shot/metrics", "probe/predictions"} <= set(
        summary["files"]
    )
    assert summary["files"]["attributes"] == str(out / "attributes.csv")
    step = summary["step"]
    assert step == 2
    for name in ("metrics.json", "zero_shot/metrics.json", "probe/metrics.json"):
        assert json.loads((out / name).read_text())["step"] == step, name
    assert pd.read_csv(out / "metrics.csv")["step"].iloc[-1] == step
    assert json.loads((out / "steps" / "step-0000002" / "metrics.json").read_text())["step"] == step
    # zero-shot and attributes embed the val split only (the train split is never read there)
    root = os.path.join(default_cache_root(), "embeddings")
    text_splits = set()
    for key in embedding_sets():
        with open(os.path.join(root, key, "manifest.json"), encoding="utf-8") as handle:
            manifest = json.load(handle)
        if manifest["checkpoint"] == summary["checkpoint"] and manifest["source"] == "text_space":
            text_splits.add(manifest["split"])
    assert text_splits == {"val"}


@pytest.mark.parametrize("problem", ["missing", "corrupt", "not_empty_out"])
def test_bad_input_is_one_line(tiny_run, tmp_path, capsys, problem):
    out = tmp_path / "ev"
    ckpt = tiny_run["last"]
    if problem == "missing":
        ckpt = str(tmp_path / "nope.ckpt")
    elif problem == "corrupt":
        bad_run = tmp_path / "run"
        (bad_run / "checkpoints").mkdir(parents=True)
        shutil.copy(tiny_run["config"], bad_run / "config.yaml")
        (bad_run / "checkpoints" / "step-0000001.ckpt").write_bytes(b"truncated")
        ckpt = str(bad_run / "checkpoints" / "step-0000001.ckpt")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_eval(f"ckpt={ckpt}", f"out={out}", "mlflow.enabled=false", *FAST)
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ")
    expected = {
        "missing": "nope.ckpt",
        "corrupt": "not a readable checkpoint",
        "not_empty_out": "not empty",
    }[problem]
    assert expected in err[0]
    if problem == "not_empty_out":
        assert (out / "keep.txt").read_text() == "mine"
