"""``hlss-export``: the trained backbone loads into plain timm / open_clip (in a process that never
imports hlss) and gives hlss's features; the card, the metadata and the refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from hlss.checkpoints import load_checkpoint_file
from hlss.cli import export as export_cli
from hlss.config import build
from hlss.eval.restore import load_trained_model, run_config_for
from hlss.export import BACKBONE_FILE, HEADS_FILE, export_model
from hlss.levels import LEVELS
from hlss.schemas.export import ExportConfig
from tests.train.helpers import TINY, run_train, summaries

from .console import console, hydra_leftovers, one_error_line

FILES = {BACKBONE_FILE, HEADS_FILE, "export.json", "model_card.md", "config.yaml"}

# Runs in a fresh interpreter: executes the load call export.json documents (it imports only
# safetensors, torch and the library), embeds the saved input and saves the features.
PLAIN = """
import json, sys
spec = json.load(open('export.json'))
scope = {}
exec(spec['load'], scope)
import safetensors.torch, torch
model = scope['model'].eval()
with torch.no_grad():
    features = model(safetensors.torch.load_file(sys.argv[1])['x'])
safetensors.torch.save_file({'features': features.float().contiguous()}, sys.argv[2])
loaded = sorted(m for m in sys.modules if m == 'hlss' or m.startswith('hlss.'))
assert not loaded, loaded
"""


def read_text(*parts) -> str:
    with open(os.path.join(*map(str, parts)), encoding="utf-8") as handle:
        return handle.read()


def read_json(*parts):
    return json.loads(read_text(*parts))


def train_tiny(root, *overrides: str) -> dict:
    """A tiny training run below ``root`` (logger off); returns its summary."""
    run_train(*TINY, "logger=none", f"paths.root={root}", *overrides)
    (summary,) = summaries(str(root))
    return summary


def plain_features(export_dir, images: torch.Tensor, tmp_path) -> torch.Tensor:
    """The features of ``images`` from the exported weights, computed without hlss."""
    save_file({"x": images.contiguous()}, str(tmp_path / "x.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN, str(tmp_path / "x.safetensors"), str(tmp_path / "f.st")],
        cwd=export_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(tmp_path / "f.st"))["features"]


def hlss_features(ckpt: str, images: torch.Tensor) -> torch.Tensor:
    model, _ = load_trained_model(ckpt)
    with torch.no_grad():
        return model.backbone(images)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return train_tiny(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> dict:
    return export_model(run["output_dir"], str(tmp_path_factory.mktemp("exports") / "rn18"))


def test_plain_timm_gives_the_features_of_hlss(run, exported, tmp_path):
    spec = read_json(exported["out"], "export.json")
    assert spec["library"] == "timm" and spec["architecture"] == "resnet18"
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = plain_features(exported["out"], images, tmp_path)
    ours = hlss_features(spec["training"]["checkpoint"], images)
    assert plain.shape == (3, spec["feature_dim"])
    torch.testing.assert_close(plain, ours, atol=1e-5, rtol=1e-4)


def test_weights_are_the_checkpoints_backbone_under_timm_names(run, exported):
    ckpt = exported["training"]["checkpoint"]
    assert os.path.dirname(ckpt) == os.path.join(run["output_dir"], "checkpoints")
    state = load_checkpoint_file(ckpt)["state_dict"]
    weights = load_file(os.path.join(exported["out"], BACKBONE_FILE))
    prefix = "model.backbone."
    assert set(weights) == {k[len(prefix) :] for k in state if k.startswith(prefix)}
    for key, value in weights.items():
        assert value.dtype == state[prefix + key].dtype
        assert torch.equal(value, state[prefix + key]), key
    heads = load_file(os.path.join(exported["out"], HEADS_FILE))
    others = {k[len("model.") :] for k in state if k.startswith("model.") and prefix not in k}
    assert set(heads) == others and any(k.startswith("heads.") for k in heads)


def test_files_metadata_and_card(run, exported):
    out = exported["out"]
    assert set(os.listdir(out)) == FILES
    spec = read_json(out, "export.json")
    for entry in (spec["weights"], spec["heads"]):
        with open(os.path.join(out, entry["file"]), "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == entry["sha256"]
    run_cfg = run_config_for(spec["training"]["checkpoint"])
    assert OmegaConf.load(os.path.join(out, "config.yaml")) == run_cfg
    assert spec["input"]["modality"] == "srh" and "ch3 - ch2" in spec["input"]["transform"]
    assert spec["training"]["step"] == run["global_step"]
    # the heads' attribute names are the run's banks, one per head row
    heads = load_file(os.path.join(out, HEADS_FILE))
    names = read_json(run["output_dir"], "attributes.json")
    for level in LEVELS:
        assert spec["heads"]["attributes"][level] == names[level]["names"]
        assert len(names[level]["names"]) == heads[f"heads.{level}.weight"].shape[0]
    # the card: what it is, how to load it, the data, loss, step, batch and provenance
    card = read_text(out, "model_card.md")
    train = build(run_cfg.dataset.table).subset("train").frame
    loader = run_cfg.loader
    for text in (
        "resnet18",
        spec["load"],
        f"{train['patient'].nunique()} patients",
        f"{len(train)} patches",
        run_cfg.dataset.name,
        run_cfg.loss.name,
        f"step | {run['global_step']} ",
        f"{loader.patients} patients x {loader.slides} slides x {loader.patches} patches",
        "No evaluation of this checkpoint was found",
        spec["weights"]["sha256"],
        f"hlss {spec['hlss']['version']}",
    ):
        assert text in card, text
    assert "kNN accuracy" not in card


def test_knn_metrics_of_an_evaluation_of_that_step(run, tmp_path):
    from hlss.cli.eval import main as eval_main

    # a copy of the run (hard links), so the evaluation stays out of the other tests' run
    copy = str(tmp_path / "run")
    shutil.copytree(run["output_dir"], copy, copy_function=os.link)
    argv = sys.argv
    sys.argv = [
        "hlss-eval",
        f"ckpt={copy}/checkpoints/last.ckpt",
        f"out={copy}/eval-a",
        "mlflow.enabled=false",
        "bootstrap.n=20",
        "knn.k=5",
        "embed.num_workers=0",
        "zero_shot.enabled=false",
        "explain.enabled=false",
    ]
    try:
        eval_main()
    finally:
        sys.argv = argv
    metrics = read_json(copy, "eval-a", "metrics.json")
    # step-0000002.ckpt holds the step last.ckpt was evaluated at
    result = export_model(f"{copy}/checkpoints/step-0000002.ckpt", str(tmp_path / "e2"))
    found = result["evaluation"]
    assert found["file"] == f"{copy}/eval-a/metrics.json"
    assert found["knn"]["patient"]["acc"] == metrics["patient"]["acc"]
    card = read_text(tmp_path, "e2", "model_card.md")
    for level in LEVELS:
        assert f"| {level} | {metrics[level]['acc']:.3f} | {metrics[level]['top2']:.3f}" in card
    assert "Linear probe accuracy" in card
    # no evaluation of step 1 exists: none is reported
    earlier = export_model(f"{copy}/checkpoints/step-0000001.ckpt", str(tmp_path / "e1"))
    assert earlier["evaluation"] is None
    # an evaluation folder named explicitly must hold the exported step
    with pytest.raises(Exception, match="step 1"):
        export_model(
            f"{copy}/checkpoints/step-0000001.ckpt", str(tmp_path / "e3"), metrics=f"{copy}/eval-a"
        )
    assert not (tmp_path / "e3").exists()


def test_console_script_from_another_directory(run, tmp_path, monkeypatch):
    proc = console(
        "hlss-export",
        f"ckpt={run['output_dir']}",
        "out=rn18",
        "dtype=float16",
        "count_data=false",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'rn18'}: resnet18 (timm, 512 features, float16)")
    assert len(lines) == 2 and proc.stderr == ""
    assert os.listdir(tmp_path) == ["rn18"] and hydra_leftovers(tmp_path) == []
    assert set(os.listdir(tmp_path / "rn18")) == FILES
    weights = load_file(str(tmp_path / "rn18" / BACKBONE_FILE))
    assert weights["conv1.weight"].dtype == torch.float16
    assert weights["bn1.num_batches_tracked"].dtype == torch.int64
    # the float16 weights load into plain timm and give the float32 features up to rounding
    monkeypatch.chdir(tmp_path / "rn18")
    scope: dict = {}
    exec(read_json("export.json")["load"], scope)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = scope["model"].eval()(images)
    ours = hlss_features(run["last_checkpoint"], images)
    torch.testing.assert_close(plain, ours, atol=2e-2, rtol=2e-2)


def test_help_lists_every_key(tmp_path):
    proc = console("hlss-export", "dtype=bfloat16", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hlss-export: write the trained backbone")
    for field in dataclasses.fields(ExportConfig):
        assert f"\n  {field.name} " in proc.stdout, field.name
    assert "[bfloat16]" in proc.stdout and os.listdir(tmp_path) == []


def refused(capsys, *argv: str) -> str:
    """The one ``error:`` line of an in-process ``hlss-export argv`` that exits with status 2."""
    with pytest.raises(SystemExit) as exc:
        export_cli.main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_refused_in_one_line(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = f"ckpt={run['output_dir']}"
    assert "missing.ckpt" in refused(capsys, f"ckpt={tmp_path}/missing.ckpt", "out=x")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in refused(capsys, f"ckpt={tmp_path}/junk.ckpt", "out=x")
    line = refused(capsys, ckpt, "out=x", "dtype=int8")
    assert "dtype=int8" in line and "float16" in line and "bfloat16" in line
    assert "out" in refused(capsys, ckpt)  # out is required
    assert "dtyp" in refused(capsys, ckpt, "out=x", "+dtyp=float16")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("keep")
    assert "already exists" in refused(capsys, ckpt, "out=mine")
    assert os.listdir(tmp_path / "mine") == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["junk.ckpt", "mine"]  # no partial folder left


def test_unknown_dtype_exits_2_from_the_console(run, tmp_path):
    line = one_error_line(
        console("hlss-export", f"ckpt={run['last_checkpoint']}", "out=x", "dtype=fp8", cwd=tmp_path)
    )
    assert "dtype=fp8" in line and os.listdir(tmp_path) == []


def test_open_clip_rn50_round_trips_into_open_clip_visual(tmp_path):
    summary = train_tiny(
        tmp_path / "runs",
        "backbone=clip_rn50",
        "backbone.pretrained=false",
        "trainer.max_steps=1",
        "checkpoint.every_n_steps=1000",  # last.ckpt only: RN50 checkpoints are ~0.5 GB each
        "loader.patients=2",
    )
    out = tmp_path / "rn50"
    result = export_model(summary["last_checkpoint"], str(out), heads=False, count_data=False)
    assert result["library"] == "open_clip" and result["architecture"] == "RN50"
    assert "open_clip.create_model('RN50', pretrained=None).visual" in result["load"]
    assert set(os.listdir(out)) == FILES - {HEADS_FILE}
    assert result["input"]["size"] == [224, 224]
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    plain = plain_features(out, images, tmp_path)
    ours = hlss_features(summary["last_checkpoint"], images)
    assert plain.shape == (2, result["feature_dim"]) == (2, 1024)
    torch.testing.assert_close(plain, ours, atol=1e-4, rtol=1e-3)
