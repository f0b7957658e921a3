"""Metric names and params that keep evaluations of different settings apart."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from hlss.eval.settings import dataset_token, metric_prefixes, tracking_params, used_config
from hlss.schemas.eval import EvalConfig

RUN = OmegaConf.create({"dataset": {"name": "synthetic", "table": {"size": 32}}})


def _cfg(*overrides: str):
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.from_dotlist(list(overrides)))
    cfg.ckpt = "run/checkpoints/last.ckpt"
    return cfg


def test_defaults_keep_the_short_names():
    assert metric_prefixes(_cfg(), RUN) == {
        "knn": "eval",
        "zero_shot": "zero_shot",
        "probe": "probe",
    }
    assert metric_prefixes(_cfg("untrained=true"), RUN) == {
        "knn": "eval_untrained",
        "zero_shot": "zero_shot_untrained",
        "probe": "probe_untrained",
    }


@pytest.mark.parametrize(
    ("overrides", "knn", "zero_shot", "probe"),
    [
        (["knn.k=20"], "eval/k20_softmax_sum", "zero_shot", "probe"),
        (["aggregate=mean_embedding"], "eval/k200_mean_embedding", "zero_shot", "probe"),
        (["knn.temperature=0.1"], "eval/k200_softmax_sum_t0.1", "zero_shot", "probe"),
        (
            ["features=text_space"],
            "eval/k200_softmax_sum_text_space",
            "zero_shot",
            "probe/text_space",
        ),
        (["zero_shot.temperature=0.05"], "eval", "zero_shot/t0.05", "probe"),
        (["zero_shot.prompts=/p/mine.yaml"], "eval", "zero_shot/prompts-mine", "probe"),
        (
            ["probe.weight_decay=0.01", "probe.max_iter=50"],
            "eval",
            "zero_shot",
            "probe/wd0.01_it50",
        ),
        (["knn.backend=torch", "bootstrap.n=10", "seed=3"], "eval", "zero_shot", "probe"),
    ],
)
def test_other_settings_get_other_names(overrides, knn, zero_shot, probe):
    assert metric_prefixes(_cfg(*overrides), RUN) == {
        "knn": knn,
        "zero_shot": zero_shot,
        "probe": probe,
    }


def test_another_dataset_is_named_and_the_training_one_is_not():
    same = _cfg()
    same.dataset = {"name": "synthetic", "table": {"size": 32}}
    assert dataset_token(same, RUN) is None
    assert metric_prefixes(same, RUN)["knn"] == "eval"
    other = _cfg()
    other.dataset = {"name": "opensrh", "root": "/data/opensrh"}
    token = dataset_token(other, RUN)
    assert token.startswith("data-opensrh-") and len(token) == len("data-opensrh-") + 6
    assert metric_prefixes(other, RUN) == {
        "knn": f"eval/k200_softmax_sum_{token}",
        "zero_shot": f"zero_shot/{token}",
        "probe": f"probe/{token}",
    }
    moved = _cfg()
    moved.dataset = {"name": "opensrh", "root": "/data/elsewhere"}
    assert dataset_token(moved, RUN) != token


def test_params_name_their_prefix_so_they_never_change():
    params = tracking_params(_cfg("knn.k=20"), RUN)
    assert params["eval.k20_softmax_sum.k"] == "20"
    assert params["eval.k20_softmax_sum.aggregate"] == "softmax_sum"
    assert params["eval.k20_softmax_sum.dataset"] == "training"
    assert params["zero_shot.temperature"] == "0.01"
    assert params["probe.max_iter"] == "200"
    default = tracking_params(_cfg(), RUN)
    assert default["eval.k"] == "200" and default["eval.temperature"] == "0.07"
    # a setting outside the name (backend) is not a param: it may differ between evaluations
    assert tracking_params(_cfg("knn.backend=torch"), RUN) == default


def test_used_config_is_absolute_and_complete(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    used = used_config(_cfg("knn.k=5"), RUN.dataset, ["run/checkpoints/step-1.ckpt"])
    assert used["ckpt"] == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert used["checkpoints"] == [str(tmp_path / "run" / "checkpoints" / "step-1.ckpt")]
    assert used["dataset"] == {"name": "synthetic", "table": {"size": 32}}
    assert used["knn"] == {"k": 5, "temperature": 0.07, "backend": "auto"}
    assert used["aggregate"] == "softmax_sum" and used["untrained"] is False
