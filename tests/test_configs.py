"""Every packaged config composes, passes its schema and instantiates (lightning-hydra-template
style); the schemas refuse wrong types and unknown keys in one line."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import hlss
from hlss.config import (
    build,
    build_callbacks,
    build_datamodule,
    build_model,
    build_objective,
    check_config,
    register_resolvers,
)
from hlss.errors import ConfigError
from hlss.levels import LEVELS
from hlss.schemas import register_schemas
from hlss.schemas.eval import EvalConfig
from hlss.schemas.train import TrainConfig

CONF = os.path.join(os.path.dirname(hlss.__file__), "conf")
REQUIRED = {
    "opensrh": ["dataset.root=/x"],
    "tcga": ["dataset.root=/x"],
    "manifest": ["dataset.path=/x.csv"],
}


def options(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


def composed(config: str, overrides: list[str], resolve: bool = True):
    register_resolvers()
    register_schemas()
    with initialize_config_module("hlss.conf", version_base="1.3"):
        cfg = compose(config, overrides=overrides)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    # everything but the `hydra` node (which needs a running Hydra app) must resolve on its own
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if resolve else cfg


def train_cfg(tmp_path, *overrides: str, resolve: bool = True):
    base = [f"paths.root={tmp_path}", f"paths.output_dir={tmp_path}/run"]
    return composed("train", [*base, *overrides], resolve=resolve)


GROUPS = [
    "dataset",
    "augment",
    "backbone",
    "text_encoder",
    "model",
    "loss",
    "loss_levels",
    "optimizer",
    "trainer",
    "callbacks",
    "logger",
]


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), group


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_builds(group, option, tmp_path):
    extra = REQUIRED.get(option, []) if group == "dataset" else []
    if group != "text_encoder":
        extra.append("text_encoder=tiny")  # the model's text side, built fast
    if group == "text_encoder" and option == "open_clip":
        extra.append("text_encoder.pretrained=null")  # no hub at test time
    cfg = train_cfg(tmp_path, f"{group}={option}", *extra)
    check_config(cfg, TrainConfig)
    assert cfg.paths.root == str(tmp_path)
    node = cfg.get(group)
    if group == "dataset":
        assert callable(build(cfg.dataset.transform))
        if option == "synthetic":
            datamodule = build_datamodule(cfg)
            assert datamodule.patients == cfg.loader.patients
    elif group == "augment":
        images = torch.rand(4, 3, 16, 16)
        out = build(node)(images)
        assert out.shape == images.shape and 0.0 <= float(out.min()) <= float(out.max()) <= 1.0
    elif group in ("backbone", "text_encoder"):
        assert build(node).__class__.__name__
    elif group == "model":
        model = build_model(cfg)
        out = model(torch.rand(2, 3, 32, 32))
        if option == "hidisc":
            assert model.attribute_banks is None and out["heads"].shape == (2, node.mlp_dim)
        else:
            assert set(model.attribute_banks) == set(LEVELS)
            sizes = {lv: len(b) for lv, b in model.attribute_banks.items()}
            if node.head_per_level:
                assert {lv: h.shape[1] for lv, h in out["heads"].items()} == sizes
            else:  # one joint head shared by the levels: all attributes side by side
                assert out["heads"].shape == (2, sum(sizes.values()))
    elif group in ("loss", "loss_levels"):
        objective = build_objective(cfg)
        assert objective.name == cfg.loss.name
        assert objective.hvc.weights == dict(cfg.loss.weights)
        assert (objective.align is None) == (cfg.loss.align is None)
    elif group == "optimizer":
        params = [torch.nn.Parameter(torch.zeros(2))]
        opt, sched = build(node)(params, total_steps=10)
        assert opt.param_groups[0]["params"] == params and sched is not None
    elif group == "trainer":
        trainer = build(node, logger=False, enable_checkpointing=False)
        assert trainer.max_steps == cfg.trainer.max_steps
    elif group == "callbacks":
        callbacks = build_callbacks(cfg)
        assert len(callbacks) == len([k for k, v in (node or {}).items() if v is not None])
    elif group == "logger" and node:
        from lightning.pytorch.loggers import MLFlowLogger

        logger = build(node)
        assert isinstance(logger, MLFlowLogger) and logger.flush_every_n_steps >= 1


def test_loss_hidisc_selects_the_hidisc_model(tmp_path):
    cfg = train_cfg(tmp_path, "loss=hidisc")
    assert cfg.model.head == "mlp" and cfg.loss.align is None
    cfg = train_cfg(tmp_path, "loss=hvc3")
    assert cfg.model.head == "text"


@pytest.mark.parametrize("preset", options("loss_levels"))
def test_loss_levels_set_both_terms(preset, tmp_path):
    cfg = train_cfg(tmp_path, f"loss_levels={preset}", "text_encoder=tiny")
    doc = OmegaConf.load(os.path.join(CONF, "loss_levels", f"{preset}.yaml"))
    objective = build_objective(cfg)
    assert objective.hvc.weights == {lv: float(doc.weights[lv]) for lv in LEVELS}
    assert objective.align_weights == {lv: float(doc.align_weights[lv]) for lv in LEVELS}


def test_exact_weights_override_a_preset(tmp_path):
    cfg = train_cfg(tmp_path, "loss_levels=no_patient", "loss.weights.patient=0.5")
    objective = build_objective(cfg)
    assert objective.hvc.weights == {"patch": 1.0, "slide": 1.0, "patient": 0.5}
    assert objective.align_weights["patient"] == 0.0


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose(experiment, tmp_path):
    overrides = [f"experiment={experiment}"]
    if experiment.startswith("opensrh"):
        overrides.append("dataset.root=/data/opensrh")
    cfg = train_cfg(tmp_path, *overrides)
    check_config(cfg, TrainConfig)
    build_objective(cfg)
    if experiment == "opensrh_hlss":
        assert cfg.backbone.name == "clip_rn50" and cfg.loader.patients == 32
        assert cfg.loss.name == "attr3levels" and cfg.optimizer.warmup_fraction == 0.1
    if experiment == "opensrh_hidisc":
        assert cfg.model.head == "mlp" and cfg.loss.name == "hidisc"
    if experiment == "demo_cpu":
        assert cfg.dataset.name == "synthetic" and cfg.augment.p == 0.5


def test_default_precision_follows_the_machine(tmp_path):
    cfg = train_cfg(tmp_path)
    gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert cfg.trainer.precision == ("bf16-mixed" if gpu else "32-true")


def test_relative_paths_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = composed("train", ["paths.output_dir=run"])
    assert cfg.paths.root == str(tmp_path / "outputs")
    assert cfg.logger.tracking_uri == f"sqlite:///{tmp_path / 'outputs'}/mlruns.db"


def test_eval_config_composes(tmp_path):
    cfg = composed("eval", ["ckpt=/x.ckpt"])
    check_config(cfg, EvalConfig)
    assert cfg.knn.k == 200 and cfg.knn.temperature == 0.07 and cfg.aggregate == "softmax_sum"
    cfg = composed("eval", ["ckpt=/x.ckpt", "dataset=opensrh", "dataset.root=/d"])
    assert cfg.dataset.table.root == "/d"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.temperature=abc", "loss.temperature: expected a number, got 'abc'"),
        ("trainer.max_steps=abc", "trainer.max_steps: expected an integer, got 'abc'"),
        ("loader.patients=1.5", "loader.patients: expected an integer"),
        ("+loss.temprature=0.1", "loss.temprature: unknown key for hlss.losses"),
        ("+model.projecton=linear", "model.projecton: unknown key"),
        ("+paths.rot=/x", "paths.rot: unknown key"),
        ("+sed=1", "sed: unknown key"),
    ],
)
def test_train_schema_refuses(override, message, tmp_path):
    cfg = train_cfg(tmp_path, override, resolve=False)
    with pytest.raises(ConfigError) as err:
        check_config(cfg, TrainConfig)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["knn.k=abc", "bootstrap.n=1.5", "probe.enabled=maybe"])
def test_eval_schema_refuses_at_compose(override):
    with pytest.raises(Exception, match=override.split("=")[0].split(".")[-1]):
        composed("eval", ["ckpt=/x.ckpt", override])


def test_eval_schema_refuses_unknown_key():
    cfg = composed("eval", ["ckpt=/x.ckpt", "+knn.kk=5"])
    with pytest.raises(ConfigError, match=r"knn\.kk: unknown key"):
        check_config(cfg, EvalConfig)


def test_callbacks_added_and_dropped_from_the_command_line(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from hlss.train.callbacks import BatchRecord
    from hlss.train.progress import StepProgressBar

    def kinds(*overrides):
        return [type(c) for c in build_callbacks(train_cfg(tmp_path, *overrides))]

    assert kinds() == [ModelCheckpoint, LearningRateMonitor, StepProgressBar]
    assert kinds("~callbacks.lr_monitor") == [ModelCheckpoint, StepProgressBar]
    assert kinds("callbacks=[default,batch_record]") == [
        ModelCheckpoint,
        LearningRateMonitor,
        StepProgressBar,
        BatchRecord,
    ]
    assert kinds("callbacks=none") == []
    dirpath = build_callbacks(train_cfg(tmp_path))[0].dirpath
    assert dirpath == str(tmp_path / "run" / "checkpoints")
