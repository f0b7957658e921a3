"""Resume: where a resumed run continues, which configs may resume, MLflow continuity, run names."""

from __future__ import annotations

import os
import sqlite3
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from hlss.checkpoints import find_checkpoint, load_checkpoint_file
from hlss.errors import ConfigError, HLSSError
from hlss.train.resume import (
    ResumePoint,
    check_compatible,
    check_weights_fit,
    continue_folder,
    differing_keys,
    incompatible_keys,
    next_resume_number,
    resume_point,
)
from tests.train.helpers import TINY, run_train, summaries

STORED = {
    "seed": 0,
    "resume": None,
    "trainer": {"max_steps": 2},
    "optimizer": {"lr": 0.001},
    "paths": {"output_dir": "/runs/a"},
    "backbone": {"name": "resnet18", "pretrained": False},
    "model": {"head": "text", "backbone": {"name": "resnet18", "pretrained": False}},
    "text_encoder": {"_target_": "hlss.models.text.TinyTextEncoder", "dim": 64, "device": "cpu"},
    "attributes": {"patch": "patch", "size": None},
    "loss": {
        "_target_": "hlss.losses.hierarchical_objective",
        "name": "hvc3",
        "temperature": 0.07,
        "weights": {"patch": 1.0},
        "align": None,
    },
}


def _with(**changes) -> dict:
    """STORED with dotted keys changed (a value of ... deletes the key)."""
    cfg = OmegaConf.create(STORED)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is ...:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            del node[leaf]
        else:
            OmegaConf.update(cfg, key, value, force_add=True)
    return OmegaConf.to_container(cfg)


# --------------------------------------------------------------------------- the rule


def test_differing_keys_names_leaves_and_whole_subtrees():
    current = _with(
        trainer__max_steps=4,
        resume="auto",
        loss__align={"_target_": "hlss.losses.AttributeConsistency", "temperature": 0.1},
    )
    assert differing_keys(STORED, current) == ["loss.align", "trainer.max_steps"]
    assert differing_keys(STORED, _with(model__mlp_dim=128)) == ["model.mlp_dim"]
    assert differing_keys(STORED, STORED) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"trainer__max_steps": 40},
        {"optimizer__lr": 0.01},
        {"paths__output_dir": "/elsewhere"},
        {"loss__temperature": 0.05},
        {"loss__weights__patch": 0.0},
        {"backbone__pretrained": "/weights/r18.pth", "model__backbone__pretrained": "/w/r18.pth"},
        {"text_encoder__device": "cuda"},
        {"seed": 3, "dataset": {"root": "/moved"}},
    ],
)
def test_compatible_changes(changes):
    assert incompatible_keys(STORED, _with(**changes)) == []


@pytest.mark.parametrize(
    ("changes", "keys"),
    [
        ({"loss__name": "hidisc"}, ["loss.name"]),
        ({"loss___target_": "other.objective"}, ["loss._target_"]),
        ({"loss__align": {"_target_": "x.Align", "temperature": 0.1}}, ["loss.align"]),
        ({"backbone__name": "resnet50"}, ["backbone.name"]),
        ({"model__head": "mlp"}, ["model.head"]),
        ({"model__projection": "mlp"}, ["model.projection"]),
        ({"attributes__size": 3}, ["attributes.size"]),
        ({"attributes__patch": "/my/bank.yaml"}, ["attributes.patch"]),
        ({"text_encoder__dim": 32}, ["text_encoder.dim"]),
    ],
)
def test_incompatible_changes(changes, keys):
    assert incompatible_keys(STORED, _with(**changes)) == keys


def test_refusal_is_one_line_with_both_values():
    point = ResumePoint("/runs/a/checkpoints/last.ckpt", 2, STORED, None, "/runs/a")
    with pytest.raises(ConfigError) as err:
        check_compatible(point, _with(loss__name="hidisc", trainer__max_steps=9))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("resume=/runs/a/checkpoints/last.ckpt: ")
    assert "loss.name (hvc3 -> hidisc)" in message and "max_steps" not in message
    check_compatible(point, _with(trainer__max_steps=9))  # allowed: no error


def test_weights_check_names_the_differing_tensor():
    point = ResumePoint("c.ckpt", 1, {}, None, None, shapes={"w": (3, 4), "b": (3,)})
    check_weights_fit(point, {"w": torch.zeros(3, 4), "b": torch.zeros(3)})
    with pytest.raises(HLSSError, match=r"w \[3, 4\] in the checkpoint, \[5, 4\] here"):
        check_weights_fit(point, {"w": torch.zeros(5, 4), "b": torch.zeros(3)})
    with pytest.raises(HLSSError, match="b not in this model"):
        check_weights_fit(point, {"w": torch.zeros(3, 4)})


# --------------------------------------------------------------------------- which folder


def _run_folder(root, steps: list[int], last: int | None) -> str:
    ckpt_dir = root / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (root / "run" / "config.yaml").write_text("seed: 0\n")
    for step in steps:
        torch.save({"global_step": step}, ckpt_dir / f"step-{step:07d}.ckpt")
    if last is not None:
        torch.save({"global_step": last}, ckpt_dir / "last.ckpt")
    return str(root / "run")


def test_continue_in_the_run_folder_unless_it_moved_on(tmp_path):
    run = _run_folder(tmp_path, [1, 2], last=2)
    ckpts = os.path.join(run, "checkpoints")
    assert continue_folder(os.path.join(ckpts, "last.ckpt"), 2) == run
    assert continue_folder(os.path.join(ckpts, "step-0000002.ckpt"), 2) == run
    # an earlier step: continuing there would rewrite the run's later checkpoints
    assert continue_folder(os.path.join(ckpts, "step-0000001.ckpt"), 1) is None
    point = resume_point(run, str(tmp_path))  # a run folder means its checkpoints/last.ckpt
    assert (point.checkpoint, point.step, point.run_dir) == (
        os.path.join(ckpts, "last.ckpt"),
        2,
        run,
    )


def test_new_folder_for_lone_or_read_only_checkpoints(tmp_path):
    lone = tmp_path / "lone.ckpt"
    torch.save({"global_step": 5}, lone)
    assert continue_folder(str(lone), 5) is None
    run = _run_folder(tmp_path, [1], last=1)
    os.chmod(run, 0o555)
    try:
        if os.access(run, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        assert continue_folder(os.path.join(run, "checkpoints", "last.ckpt"), 1) is None
    finally:
        os.chmod(run, 0o755)


def test_next_resume_number(tmp_path):
    assert next_resume_number(str(tmp_path)) == 1
    (tmp_path / "config-resume-1.yaml").write_text("")
    assert next_resume_number(str(tmp_path)) == 2


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _query(db, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return list(con.execute(sql, args))


def test_extend_run_with_mlflow_continues_the_same_run(in_tmp):
    """The common case: train, then extend with a larger trainer.max_steps (MLflow on)."""
    run_train(*TINY, "loss=hvc3")
    (first,) = summaries(str(in_tmp / "outputs"))
    run_dir = first["output_dir"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_train(*TINY, "loss=hvc3", "trainer.max_steps=4", "optimizer.lr=0.002", "resume=auto")
    (resumed,) = summaries(str(in_tmp / "outputs"))  # the same folder, its summary updated
    assert resumed["output_dir"] == run_dir and resumed["global_step"] == 4
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]
    assert resumed["resumed_from"] == os.path.join(run_dir, "checkpoints", "last.ckpt")
    assert "step-0000004.ckpt" in os.listdir(os.path.join(run_dir, "checkpoints"))
    messages = [str(w.message) for w in caught]
    assert not any("dirpath has changed" in m or "is not empty" in m for m in messages), messages

    db, run_id = in_tmp / "outputs" / "mlruns.db", first["mlflow_run_id"]
    assert len(_query(db, "select run_uuid from runs")) == 1
    # Lightning logs optimizer step t+1 at step t: the first start logged 0, 1; the resume 2, 3
    steps = sorted(s for (s,) in _query(db, "select step from metrics where key='train/loss'"))
    assert steps == [0, 1, 2, 3]
    params = dict(_query(db, "select key, value from params where run_uuid=?", run_id))
    assert params["trainer/max_steps"] == "2"  # the first start's params stay
    tags = dict(_query(db, "select key, value from tags where run_uuid=?", run_id))
    assert tags["resume.1.changed_keys"] == "optimizer.lr, trainer.max_steps"
    assert tags["resume.1.from"].endswith("last.ckpt (step 2)")
    assert (_query(db, "select status from runs")[0][0]) == "FINISHED"
    artifacts = in_tmp / "outputs" / "mlartifacts"
    assert len(list(artifacts.rglob("config-resume-1.yaml"))) == 1
    stored = OmegaConf.load(os.path.join(run_dir, "config-resume-1.yaml"))
    assert stored.trainer.max_steps == 4 and stored.paths.output_dir == run_dir
    assert OmegaConf.load(os.path.join(run_dir, "config.yaml")).trainer.max_steps == 2
    # resume=auto still finds this run: its last.ckpt is the newest
    assert find_checkpoint("auto", str(in_tmp / "outputs")) == resumed["last_checkpoint"]
    assert load_checkpoint_file(resumed["last_checkpoint"])["global_step"] == 4


def test_incompatible_resume_is_refused_in_one_line(in_tmp, capsys):
    run_train(*TINY, "logger=none", "loss=hvc3")
    (first,) = summaries(str(in_tmp / "outputs"))
    before = sorted(os.listdir(first["output_dir"]))
    for override, named in [
        ("loss=attr3levels", "loss.name (hvc3 -> attr3levels)"),
        ("backbone=vit_small", "backbone.name (resnet18 -> vit_small)"),
        ("attributes.size=2", "attributes.size (None -> 2)"),
        ("text_encoder.dim=32", "text_encoder.dim (64 -> 32)"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            run_train(*TINY, "logger=none", "loss=hvc3", override, "resume=auto")
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: resume="), err
        assert named in err[0]
    assert sorted(os.listdir(first["output_dir"])) == before  # nothing written
