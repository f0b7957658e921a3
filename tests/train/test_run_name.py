"""MLflow run names: what a run trains (loss, backbone, dataset, experiment, sweep overrides)."""

from __future__ import annotations

import sqlite3

from omegaconf import OmegaConf

from hlss.train.run_name import MAX_LENGTH, hydra_run_name, run_name
from tests.train.helpers import TINY, run_train, summaries


def _cfg(loss: str, backbone: str = "resnet18", dataset: str = "synthetic"):
    return OmegaConf.create(
        {"loss": {"name": loss}, "backbone": {"name": backbone}, "dataset": {"name": dataset}}
    )


def test_run_name_says_what_is_trained():
    assert run_name(_cfg("hidisc")) == "hidisc resnet18 synthetic"
    assert run_name(_cfg("hidisc")) != run_name(_cfg("attr3levels"))
    name = run_name(
        _cfg("hidisc", "resnet50", "opensrh"),
        ["loss=hidisc", "dataset.root=/d", "loader.num_workers=8", "+loss.temperature=0.05"],
        experiment="opensrh_hidisc",
    )
    assert name == "opensrh_hidisc hidisc resnet50 opensrh dataset.root=/d loss.temperature=0.05"
    assert len(run_name(_cfg("x"), [f"k{i}=v" for i in range(200)])) == MAX_LENGTH
    assert hydra_run_name(_cfg("hvc3")) == "hvc3 resnet18 synthetic"  # outside Hydra


def test_sweep_members_and_losses_get_their_own_names(tmp_path, monkeypatch):
    """As a user sweeps, MLflow on: every run is told apart by its name."""
    monkeypatch.chdir(tmp_path)
    run_train("-m", *TINY, "trainer.max_steps=1", "loss=hidisc,hvc3", "loss.temperature=0.05,0.1")
    runs = summaries(str(tmp_path / "outputs" / "multirun"))
    assert len(runs) == 4
    with sqlite3.connect(tmp_path / "outputs" / "mlruns.db") as con:
        names = dict(con.execute("select run_uuid, name from runs"))
    assert len(names) == 4 and len(set(names.values())) == 4, names
    for run in runs:
        name = names[run["mlflow_run_id"]]
        loss = OmegaConf.load(f"{run['output_dir']}/config.yaml").loss
        assert name.startswith(f"{loss.name} resnet18 synthetic "), name
        assert f"loss.temperature={loss.temperature}" in name
        assert "num_workers" not in name and "enable_progress_bar" not in name
