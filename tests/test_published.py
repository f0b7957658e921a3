"""The paper experiments hold the published settings, key by key.

The tables below are the values of the papers' published configurations, written down once here
(HiDisc: MLNeurosurg/hidisc ``train_hidisc_patient.yaml``; HLSS: Hasindri/HLSS
``train_hlss_attr3levels.yaml``; values a config leaves unset are those of the code that read it,
e.g. torch AdamW's weight decay 0.01). A changed experiment file fails here with the key named.
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from hlss.config import build_objective, check_config
from hlss.models.backbones import activation_matched_name
from hlss.schemas.train import TrainConfig
from tests.test_configs import train_cfg

# HiDisc's strong augmentation as published (torchvision defaults filled in), by op:
# {op class name: {our key: published value}}; `None` = the op must be absent.
HIDISC_AUGMENT = {
    "RandomHorizontalFlip": {},
    "RandomVerticalFlip": {},
    "RandomGaussianNoiseStd": {"std": [0.01, 0.1]},
    "ColorJitter": None,  # published ColorJitter() with no arguments: an identity
    "RandomAutoContrast": {},
    "RandomSolarize": {"thresholds": [0.2, 0.2]},
    "RandomSharpness": {"sharpness": [2.0, 2.0]},
    "RandomGaussianBlur": {"kernel_size": [5, 5], "sigma": [1.0, 1.0]},
    "RandomAffine": {"degrees": 10.0, "translate": [0.1, 0.3]},
    "RandomResizedCropKeepSize": {"scale": [0.08, 1.0], "ratio": [0.75, 1.3333333]},
    "RandomErasing": {"scale": [0.02, 0.33], "ratio": [0.3, 3.3], "value": 0.0},
}
HIDISC_OP_ORDER = [k for k, v in HIDISC_AUGMENT.items() if v is not None]

COMMON = {
    "seed": 1000,
    "gather": True,
    "augment.p": 0.3,
    "loader.slides": 2,
    "loader.patches": 2,
    "loader.views": 2,
    "loader.balance": True,
    "dataset.name": "opensrh",
    "dataset.table.include_nondiagnostic": False,
    "dataset.transform.standardize": False,
    "loss.temperature": 0.07,
    "loss.base_temperature": 0.07,
    "loss.weights.patch": 1.0,
    "loss.weights.slide": 1.0,
    "loss.weights.patient": 1.0,
    "optimizer.lr": 1.0e-3,
    "optimizer.weight_decay": 0.01,
    "optimizer.betas": [0.9, 0.999],
    "optimizer.warmup_fraction": 0.1,
    "optimizer.min_lr_ratio": 0.0,
    "trainer.max_epochs": 40000,
    "trainer.max_steps": -1,
    "trainer.precision": "32-true",
}

PUBLISHED = {
    "opensrh_hidisc": {
        **COMMON,
        "loader.patients": 10,
        "backbone.name": "resnet50",
        "backbone.pretrained": False,
        "model.head": "mlp",
        "model.head_per_level": False,
        "model.mlp_hidden": [],
        "model.mlp_dim": 128,
        "loss.name": "hidisc",
        "loss.align": None,
        "dataset.transform.size": None,
    },
    "opensrh_hlss": {
        **COMMON,
        "loader.patients": 32,
        "backbone.name": "clip_rn50",
        "backbone.pretrained": "cc12m",
        "text_encoder.pretrained": "cc12m",
        "model.head": "text",
        "model.head_per_level": True,
        "model.head_init": "text",
        "attributes.size": 128,
        "loss.name": "attr3levels",
        "loss.align._target_": "hlss.losses.NearestDescriptionKL",
        "loss.align_weights.patch": 1.0,
        "loss.align_weights.slide": 1.0,
        "loss.align_weights.patient": 1.0,
        "dataset.transform.size": 224,
        "dataset.transform.resize": True,
    },
}
PUBLISHED["opensrh_hlss_reference"] = {
    **PUBLISHED["opensrh_hlss"],
    "loss.name": "attr3levels_reference",
    "loss.align_trains": False,
}


_COMPOSED: dict = {}


def _experiment(tmp_path, name):
    """The composed, schema-checked config of experiment ``name`` (composed once per session)."""
    if name not in _COMPOSED:
        cfg = train_cfg(tmp_path, f"experiment={name}", "dataset.root=/data/opensrh")
        check_config(cfg, TrainConfig)
        _COMPOSED[name] = cfg
    return _COMPOSED[name]


def _rows():
    return [(exp, key, value) for exp, table in PUBLISHED.items() for key, value in table.items()]


@pytest.mark.parametrize("experiment,key,published", _rows())
def test_experiment_key_holds_the_published_value(experiment, key, published, tmp_path):
    cfg = _experiment(tmp_path, experiment)
    value = OmegaConf.select(cfg, key, default="<missing>")
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    assert value == published, f"{experiment}: {key} = {value!r}, published {published!r}"


@pytest.mark.parametrize("experiment", sorted(PUBLISHED))
def test_experiment_augmentation_is_hidiscs(experiment, tmp_path):
    ops = _experiment(tmp_path, experiment).augment.ops
    names = [op._target_.rsplit(".", 1)[-1] for op in ops]
    assert names == HIDISC_OP_ORDER
    for op in ops:
        published = HIDISC_AUGMENT[op._target_.rsplit(".", 1)[-1]]
        assert op.p == 0.3
        for key, value in published.items():
            got = OmegaConf.to_container(op)[key]
            assert got == value, f"{op._target_}.{key} = {got!r}, published {value!r}"


@pytest.mark.parametrize("experiment", sorted(PUBLISHED))
def test_experiment_builds_its_objective(experiment, tmp_path):
    cfg = _experiment(tmp_path, experiment)
    objective = build_objective(cfg)
    assert objective.name == cfg.loss.name
    assert objective.align_trains == cfg.loss.get("align_trains", True)


@pytest.mark.parametrize("experiment", ["opensrh_hlss", "opensrh_hlss_reference"])
def test_clip_weights_are_built_with_their_own_activation(experiment, tmp_path):
    cfg = _experiment(tmp_path, experiment)
    for node in (cfg.backbone, cfg.text_encoder):
        assert node.model == activation_matched_name("RN50", node.pretrained) == "RN50-quickgelu"


def test_the_text_encoder_config_names_the_quickgelu_model(tmp_path):
    node = train_cfg(tmp_path, "text_encoder=open_clip").text_encoder
    assert node.model == activation_matched_name(node.model, node.pretrained)


def test_every_departure_is_commented():
    """Each experiment line that sets a value says whether it follows the publication."""
    from importlib import resources

    for name in PUBLISHED:
        text = resources.files("hlss.conf").joinpath(f"experiment/{name}.yaml").read_text()
        for line in text.splitlines():
            body = line.split("#", 1)[0]
            if ":" in body and body.strip() and not body.strip().startswith("-"):
                value = body.partition(":")[2]
                if value.strip():  # a leaf that sets a value
                    assert "#" in line, f"{name}: {line!r} does not say where it comes from"
