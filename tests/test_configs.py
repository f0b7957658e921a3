"""The packaged configs compose and resolve for every option (lightning-hydra-template style)."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import hlss
from hlss.cli.train import register_resolvers

CONF = os.path.join(os.path.dirname(hlss.__file__), "conf")


def options(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


def composed(config: str, overrides: list[str]):
    register_resolvers()
    with initialize_config_module("hlss.conf", version_base="1.3"):
        cfg = compose(config, overrides=overrides)
    # everything but the `hydra` node (which needs a running Hydra app) must resolve on its own
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


@pytest.mark.parametrize(
    "group",
    ["dataset", "augment", "backbone", "text_encoder", "loss", "optimizer", "trainer", "logger"],
)
def test_every_option_composes(group, tmp_path):
    for option in options(group):
        required = {
            "opensrh": ["dataset.root=/x"],
            "tcga": ["dataset.root=/x"],
            "manifest": ["dataset.path=/x.csv"],
        }
        extra = required.get(option, []) if group == "dataset" else []
        cfg = composed("train", [f"{group}={option}", f"paths.root={tmp_path}", *extra])
        assert cfg.paths.root == str(tmp_path)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose(experiment, tmp_path):
    overrides = [f"experiment={experiment}", f"paths.root={tmp_path}"]
    if experiment.startswith("opensrh"):
        overrides.append("dataset.root=/data/opensrh")
    cfg = composed("train", overrides)
    if experiment == "opensrh_hlss":
        assert cfg.backbone.name == "clip_rn50" and cfg.data.patients == 32
        assert cfg.loss.name == "attr3levels" and cfg.optimizer.warmup_fraction == 0.1
    if experiment == "demo_cpu":
        assert cfg.dataset.name == "synthetic" and cfg.augment.p == 0.5


def test_default_precision_follows_the_machine(tmp_path):
    cfg = composed("train", [f"paths.root={tmp_path}"])
    gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert cfg.trainer.precision == ("bf16-mixed" if gpu else "32-true")


def test_relative_paths_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = composed("train", [])
    assert cfg.paths.root == str(tmp_path / "outputs")
    assert cfg.logger.tracking_uri == f"sqlite:///{tmp_path / 'outputs'}/mlruns.db"


def test_eval_config_composes(tmp_path):
    cfg = composed("eval", ["ckpt=/x.ckpt"])
    assert cfg.knn.k == 200 and cfg.knn.temperature == 0.07 and cfg.aggregate == "softmax_sum"
    cfg = composed("eval", ["ckpt=/x.ckpt", "dataset=opensrh", "dataset.root=/d"])
    assert cfg.dataset.table.root == "/d"
