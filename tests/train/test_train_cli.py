"""`hlss-train` end to end on tiny generated data (CPU)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from hlss.checkpoints import load_checkpoint_file
from tests.train.helpers import TINY, read_batches, run_train, summaries

NO_LOGGER = ["logger=none"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("loss", ["hidisc", "hvc3", "attr3levels", "attr3levels_consistency"])
def test_two_steps_each_loss(in_tmp, loss):
    run_train(*TINY, *NO_LOGGER, f"loss={loss}")
    (summary,) = summaries(str(in_tmp / "outputs"))
    assert summary["global_step"] == 2
    out = summary["output_dir"]
    assert out.startswith(str(in_tmp / "outputs"))
    assert os.path.isfile(os.path.join(out, "config.yaml"))
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert "last.ckpt" in ckpts and "step-0000001.ckpt" in ckpts and "step-0000002.ckpt" in ckpts
    metrics = summary["metrics"]
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    for level in ("patch", "slide", "patient"):
        assert f"train/hvc_{level}" in metrics
        assert (f"train/align_{level}" in metrics) == loss.startswith("attr3levels")
    state = load_checkpoint_file(summary["last_checkpoint"])
    assert state["global_step"] == 2
    if loss != "hidisc":
        # the text-initialised heads and the frozen text embeddings travel with the checkpoint
        assert any(k.startswith("model.text_") for k in state["state_dict"])


def test_resume_continues_same_batches(in_tmp):
    common = [
        *TINY,
        *NO_LOGGER,
        "loss=hvc3",
        "callbacks=[default,batch_record]",
        "loader.patients=3",
    ]
    run_train(*common, "trainer.max_steps=4")
    (full,) = summaries(str(in_tmp / "outputs"))
    full_batches = read_batches(full["output_dir"])
    assert [b["step"] for b in full_batches] == [1, 2, 3, 4]

    # resume from the step-2 checkpoint as if the run had been killed there
    step2 = os.path.join(full["output_dir"], "checkpoints", "step-0000002.ckpt")
    run_train(
        *common, "trainer.max_steps=4", "paths.root=" + str(in_tmp / "resumed"), f"resume={step2}"
    )
    (resumed,) = summaries(str(in_tmp / "resumed"))
    assert resumed["global_step"] == 4
    # a branch from an earlier step gets its own folder: the full run's files stay as they were
    assert resumed["output_dir"].startswith(str(in_tmp / "resumed"))
    assert [b["step"] for b in read_batches(full["output_dir"])] == [1, 2, 3, 4]
    resumed_batches = read_batches(resumed["output_dir"])
    assert [b["step"] for b in resumed_batches] == [3, 4]
    # the resumed run draws exactly what the uninterrupted run drew at steps 3 and 4
    assert [b["patches"] for b in resumed_batches] == [b["patches"] for b in full_batches[2:]]
    state = load_checkpoint_file(resumed["last_checkpoint"])
    assert state["global_step"] == 4
    assert state["lr_schedulers"][0]["last_epoch"] == 4  # scheduler state continued


def test_resume_auto_and_bad_resume(in_tmp, capsys):
    run_train(*TINY, *NO_LOGGER, "loss=hidisc")
    (first,) = summaries(str(in_tmp / "outputs"))
    run_train(*TINY, *NO_LOGGER, "loss=hidisc", "trainer.max_steps=3", "resume=auto")
    # the resumed run continues in the original run folder: one run, its summary updated
    runs = summaries(str(in_tmp / "outputs"))
    assert [r["global_step"] for r in runs] == [3]
    assert runs[0]["output_dir"] == first["output_dir"]
    ckpts = os.listdir(os.path.join(first["output_dir"], "checkpoints"))
    assert "step-0000003.ckpt" in ckpts
    # resume=auto must find the continued run's newest state: last.ckpt itself, never last-v1
    assert not [c for c in ckpts if "-v" in c], ckpts
    last = load_checkpoint_file(os.path.join(first["output_dir"], "checkpoints", "last.ckpt"))
    assert last["global_step"] == 3
    assert os.path.isfile(os.path.join(first["output_dir"], "config-resume-1.yaml"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_train(*TINY, *NO_LOGGER, "resume=" + str(in_tmp / "missing.ckpt"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: resume={in_tmp / 'missing.ckpt'}: checkpoint not found"]


def test_resume_auto_before_any_checkpoint_starts_a_new_run(in_tmp):
    """A SLURM job requeued with the same command: the first start has nothing to resume."""
    run_train(*TINY, *NO_LOGGER, "loss=hidisc", "resume=auto")
    (summary,) = summaries(str(in_tmp / "outputs"))
    assert summary["global_step"] == 2


def test_corrupt_resume_checkpoint(in_tmp, capsys):
    bad = in_tmp / "bad.ckpt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(SystemExit) as exc:
        run_train(*TINY, *NO_LOGGER, f"resume={bad}")
    assert exc.value.code == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_sweep_two_values(in_tmp):
    run_train(
        "-m", *TINY, *NO_LOGGER, "loss=hidisc", "trainer.max_steps=1", "loss.temperature=0.05,0.1"
    )
    runs = summaries(str(in_tmp / "outputs" / "multirun"))
    assert len(runs) == 2
    temps = sorted(
        OmegaConf.load(os.path.join(r["output_dir"], "config.yaml")).loss.temperature for r in runs
    )
    assert temps == [0.05, 0.1]


def test_sweep_hierarchy_presets(in_tmp):
    """`-m loss_levels=equal,no_patient` trains one run per preset, each with its weights."""
    run_train("-m", *TINY, *NO_LOGGER, "trainer.max_steps=1", "loss_levels=equal,no_patient")
    runs = summaries(str(in_tmp / "outputs" / "multirun"))
    assert len(runs) == 2
    by_weight = {
        OmegaConf.load(os.path.join(r["output_dir"], "config.yaml")).loss.weights.patient: r
        for r in runs
    }
    assert sorted(by_weight) == [0.0, 1.0]
    # a level of weight 0 is not computed (reported as 0); with weight 1 the term is positive
    assert by_weight[0.0]["metrics"]["train/align_patient"] == 0.0
    assert by_weight[1.0]["metrics"]["train/align_patient"] > 0.0


def test_lone_checkpoint_carries_resolved_config(in_tmp):
    run_train(*TINY, *NO_LOGGER, "loss=hvc3", "loss.temperature=0.05")
    (summary,) = summaries(str(in_tmp / "outputs"))
    stored = load_checkpoint_file(summary["last_checkpoint"])["hlss"]["config"]
    assert stored["loss"]["temperature"] == 0.05 and stored["loss"]["name"] == "hvc3"
    assert stored["paths"]["output_dir"] == summary["output_dir"]
    assert "${" not in repr(stored)  # resolved: no interpolation left


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loss.temperature=abc", "error: loss.temperature: expected a number, got 'abc'"),
        ("trainer.max_steps=abc", "error: trainer.max_steps: expected an integer, got 'abc'"),
        ("+loss.temprature=0.1", "error: loss.temprature: unknown key"),
        ("seed=abc", "error: seed=abc: Value 'abc'"),
        ("loss=nope", "error: In 'train': Could not find 'loss/nope'"),
        ("loader.num_workers=-1", "error: loader.num_workers must be >= 0"),
        ("compile=fast", "error: compile must be true, false or a mapping of torch.compile"),
        ("compile={mode:fastest}", "error: compile: torch.compile refuses {'mode': 'fastest'}"),
    ],
)
def test_console_script_refuses_bad_override_in_one_line(in_tmp, override, expected):
    """As a user runs it: the console script, another directory, output not a terminal."""
    exe = os.path.join(os.path.dirname(sys.executable), "hlss-train")
    proc = subprocess.run([exe, override], capture_output=True, text=True, cwd=in_tmp, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert not (in_tmp / "outputs").exists() or not any((in_tmp / "outputs").rglob("*.ckpt"))


def test_help_describes_the_command(in_tmp):
    exe = os.path.join(os.path.dirname(sys.executable), "hlss-train")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, cwd=in_tmp, timeout=300)
    assert proc.returncode == 0
    assert proc.stdout.startswith("hlss-train: train")
    for group in ("loss_levels: equal", "callbacks: ", "model: hidisc, hlss"):
        assert group in proc.stdout


def test_mlflow_run_has_params_and_metrics(in_tmp):
    run_train(*TINY, "loss=attr3levels")
    (summary,) = summaries(str(in_tmp / "outputs"))
    db = in_tmp / "outputs" / "mlruns.db"
    assert summary["tracking_uri"] == f"sqlite:///{db}"
    with sqlite3.connect(db) as con:
        params = dict(
            con.execute(
                "select key, value from params where run_uuid=?", (summary["mlflow_run_id"],)
            )
        )
        metrics = {
            k
            for (k,) in con.execute(
                "select distinct key from metrics where run_uuid=?", (summary["mlflow_run_id"],)
            )
        }
        tags = dict(
            con.execute("select key, value from tags where run_uuid=?", (summary["mlflow_run_id"],))
        )
    assert params["loss/temperature"] == "0.07" and params["loss/name"] == "attr3levels"
    assert {"train/loss", "train/hvc_patch", "train/align_patient", "lr-AdamW"} <= metrics
    assert "git_commit" in tags and tags["checkpoint_dir"].endswith("checkpoints")
    # artifacts beside the store, never in ./mlruns of the working directory
    assert not (in_tmp / "mlruns").exists()
    assert (in_tmp / "outputs" / "mlartifacts").is_dir()


def test_unknown_override_is_one_line(in_tmp):
    proc = subprocess.run(
        [sys.executable, "-m", "hlss.cli.train", "loss.no_such_key=1"],
        capture_output=True,
        text=True,
        cwd=in_tmp,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr and "Traceback" not in proc.stderr


def test_cfg_job_from_any_directory(in_tmp):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hlss.cli.train",
            "--cfg",
            "job",
            "dataset=opensrh",
            "dataset.root=/x",
        ],
        capture_output=True,
        text=True,
        cwd=in_tmp,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "root: /x" in proc.stdout and "_target_: hlss.data.opensrh.read_opensrh" in proc.stdout
    assert not (in_tmp / "outputs").exists()


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["dataset=opensrh"],
            "error: dataset.table.root is required: set it on the command line (dataset.root=...)",
        ),
        (
            ["dataset=opensrh", "dataset.root=/no/such/root"],
            "error: /no/such/root: dataset root not found",
        ),
        (["backbone.name=resnet999"], "error: backbone.name: unknown backbone 'resnet999'"),
    ],
)
def test_bad_config_is_one_line(in_tmp, capsys, args, expected):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_train("text_encoder=tiny", "loader.num_workers=0", *NO_LOGGER, *args)
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith(expected)
