"""The checks of ``hlss-train`` that answer in seconds: dataset, batch and resume checkpoint, before
Lightning/MLflow are imported and before any MLflow run exists."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from hlss.config import build, build_datamodule, register_resolvers
from hlss.errors import ConfigError, DataError, HLSSError
from hlss.schemas import register_schemas
from hlss.train.preflight import check_batch, preflight, process_count, train_patients
from tests.cli.console import console, one_error_line

# tiny synthetic data: 7 classes x 2 patients, a third of them in val
DATA = [
    "dataset.table.size=32",
    "dataset.table.patients_per_class=2",
    "dataset.table.patches_per_slide=2",
    "loader.num_workers=0",
    "loader.patients=2",
    "text_encoder=tiny",
]
HEAVY = ("lightning", "pytorch_lightning", "mlflow", "timm", "open_clip", "kornia")


def train_config(root, *overrides: str, data: tuple[str, ...] | list[str] = DATA):
    register_resolvers()
    register_schemas()
    with initialize_config_module("hlss.conf", version_base="1.3"):
        return compose("train", overrides=[f"paths.root={root}", *data, *overrides])


@pytest.fixture(scope="module")
def n_train(tmp_path_factory) -> int:
    """Patients in the train split of the tiny synthetic dataset."""
    cfg = train_config(tmp_path_factory.mktemp("count"))
    return train_patients(build(cfg.dataset.table))


# ------------------------------------------------------------------------------ the batch rule
def test_check_batch_counts_patients_per_process():
    check_batch(8, 8)
    check_batch(3, 8, drop_last=False)  # a smaller last batch is allowed then
    check_batch(16, 8, processes=2)
    with pytest.raises(ConfigError, match=r"7 train patients cannot fill a batch of 8 .* to 7"):
        check_batch(7, 8)
    with pytest.raises(ConfigError, match=r"2 processes share them.* loader.patients to 8"):
        check_batch(15, 9, processes=2)  # ceil(15 / 2) = 8 per process
    with pytest.raises(DataError, match=r"^ds: the train split has no patches"):
        check_batch(0, 1, name="ds")


@pytest.mark.parametrize(
    ("trainer", "processes"),
    [
        ({"devices": 2, "accelerator": "cpu"}, 2),
        ({"devices": "3"}, 3),
        ({"devices": "0,1"}, 2),
        ({"devices": [0, 1, 2]}, 3),
        ({"devices": "auto", "accelerator": "cpu"}, 1),
        ({"devices": -1, "accelerator": "cpu"}, 1),
        ({"devices": 2, "num_nodes": 3}, 6),
    ],
)
def test_process_count(trainer, processes):
    assert process_count(OmegaConf.create(trainer)) == processes


def test_preflight_and_the_datamodule_agree_on_the_largest_batch(tmp_path, n_train):
    for patients, fits in ((n_train, True), (n_train + 1, False)):
        cfg = train_config(tmp_path, f"loader.patients={patients}", "trainer.accelerator=cpu")
        module = build_datamodule(cfg)
        if fits:
            assert preflight(cfg) is None
            module.setup("fit")
            continue
        with pytest.raises(ConfigError, match=r"loader\.patients") as early:
            preflight(cfg)
        with pytest.raises(ConfigError) as late:
            module.setup("fit")
        assert f"{n_train} train patients" in str(early.value)
        assert f"{n_train} train patients" in str(late.value)


def test_unset_dataset_root_is_named_as_the_user_sets_it(tmp_path):
    with pytest.raises(ConfigError, match=r"set it on the command line \(dataset\.root=\.\.\.\)"):
        preflight(train_config(tmp_path, "dataset=opensrh", data=()))
    with pytest.raises(ConfigError, match=r"dataset\.table\.sise: unknown key"):
        preflight(
            train_config(
                tmp_path, "dataset=opensrh", "dataset.root=/x", "+dataset.table.sise=3", data=()
            )
        )


# ------------------------------------------------------------------------------ resume
def test_resume_checkpoint_found_and_readable(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"global_step": 3}, ckpt)
    assert preflight(train_config(tmp_path, f"resume={ckpt}")) == str(ckpt)
    assert preflight(train_config(tmp_path, f"resume={tmp_path / 'run'}")) == str(ckpt)
    assert preflight(train_config(tmp_path, "resume=auto")) == str(ckpt)

    missing = tmp_path / "missing.ckpt"
    with pytest.raises(HLSSError, match=r"checkpoint not found"):
        preflight(train_config(tmp_path, f"resume={missing}"))
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x00garbage")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a copy killed mid-write
    for bad in (broken, cut):
        with pytest.raises(HLSSError, match=r"not a readable checkpoint"):
            preflight(train_config(tmp_path, f"resume={bad}"))
    # resume=auto before any checkpoint exists is a first start (SLURM requeue runs one command)
    assert preflight(train_config(tmp_path / "empty", "resume=auto")) is None


# ------------------------------------------------------------------------------ no heavy imports
PROBE = """
import json, sys
from hydra import compose, initialize_config_module
from hlss.config import register_resolvers
from hlss.schemas import register_schemas
from hlss.train.preflight import preflight
register_resolvers(); register_schemas()
with initialize_config_module("hlss.conf", version_base="1.3"):
    cfg = compose("train", overrides=sys.argv[1:])
error = None
try:
    preflight(cfg)
except Exception as err:
    error = str(err)
print(json.dumps({"error": error, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


@pytest.mark.parametrize("case", ["passes", "wrong_root", "impossible_batch"])
def test_preflight_imports_no_training_library(tmp_path, case):
    args = {
        "passes": DATA,
        "wrong_root": ["dataset=opensrh", f"dataset.root={tmp_path / 'nowhere'}"],
        "impossible_batch": [*DATA, "loader.patients=100"],
    }[case]
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, f"paths.root={tmp_path}", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [m for m in HEAVY if m in out["modules"]] == []
    expected = {"passes": None, "wrong_root": "dataset root not found"}.get(case, "loader.patients")
    assert (out["error"] is None) if expected is None else (expected in out["error"]), out


# ------------------------------------------------------------------------------ the command
@pytest.mark.parametrize("case", ["wrong_root", "impossible_batch", "missing_resume"])
def test_command_refuses_in_one_line_before_any_mlflow_run(tmp_path, case):
    args = {
        "wrong_root": ["dataset=opensrh", "dataset.root=/no/such/root"],
        "impossible_batch": [*DATA, "loader.patients=100"],
        "missing_resume": [*DATA, "resume=missing.ckpt"],
    }[case]
    expected = {
        "wrong_root": "error: /no/such/root: dataset root not found",
        "impossible_batch": "error: synthetic",
        "missing_resume": "error: resume=missing.ckpt: checkpoint not found",
    }[case]
    proc = console("hlss-train", *args, cwd=tmp_path)  # the default MLflow logger is on
    line = one_error_line(proc)
    assert line.startswith(expected), line
    assert "GPU available" not in proc.stdout  # Lightning never started
    outputs = tmp_path / "outputs"
    assert not (outputs / "mlruns.db").exists() and not (outputs / "mlartifacts").exists()
    # Hydra's run folder holds the job log, and the error line is in it
    (log_file,) = glob.glob(str(outputs / "*" / "*" / "*.log"))
    with open(log_file, encoding="utf-8") as handle:
        logged = handle.read()
    assert line in logged and "[hlss][ERROR]" in logged
    written = set(os.listdir(os.path.dirname(log_file)))
    assert not written & {"checkpoints", "config.yaml", "attributes.json", "summary.json"}
