"""Restoring a trained model for evaluation: checkpoint discovery, run config, weights."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from hlss.checkpoints import load_checkpoint_file
from hlss.errors import HLSSError
from hlss.eval.restore import (
    _config_for_loading,
    checkpoint_info,
    list_checkpoints,
    load_trained_model,
    run_config_for,
    untrained_model,
)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text.strip(), text
    return text


def _touch(path, data: bytes = b"x") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


# ---------------------------------------------------------------------------------------------
# list_checkpoints


def test_list_checkpoints_orders_by_step_and_skips_last(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    s10 = _touch(ck / "step-0000010.ckpt")
    s2 = _touch(ck / "step-0000002.ckpt")
    _touch(ck / "last.ckpt")
    _touch(ck / ".tmp-abc.ckpt")  # an interrupted atomic write
    _touch(ck / "notes.txt")
    odd = str(ck / "epoch=0.ckpt")  # no step in the name: its global_step decides
    torch.save({"global_step": 5}, odd)
    expected = [s2, odd, s10]
    assert list_checkpoints(str(tmp_path / "run")) == expected
    assert list_checkpoints(str(ck)) == expected


def test_list_checkpoints_last_only_and_single_file(tmp_path):
    last = _touch(tmp_path / "checkpoints" / "last.ckpt")
    assert list_checkpoints(str(tmp_path)) == [last]
    assert list_checkpoints(last) == [last]


def _saved(path, step: int) -> str:
    """A small real checkpoint file holding only ``global_step``."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    torch.save({"global_step": step, "epoch": 0}, str(path))
    return str(path)


def test_list_checkpoints_adds_last_when_it_is_further_trained(tmp_path):
    # resumed to max_steps=9 with a step checkpoint every 3 steps: the step-9 weights are only
    # in last.ckpt
    ck = tmp_path / "run" / "checkpoints"
    s3 = _saved(ck / "step-0000003.ckpt", 3)
    s6 = _saved(ck / "step-0000006.ckpt", 6)
    last = _saved(ck / "last.ckpt", 9)
    assert list_checkpoints(str(tmp_path / "run")) == [s3, s6, last]
    assert list_checkpoints(str(ck)) == [s3, s6, last]
    assert checkpoint_info(last)["step"] == 9  # what names its metrics row and steps/ folder


def test_list_checkpoints_last_at_the_newest_step_is_not_listed_twice(tmp_path):
    ck = tmp_path / "checkpoints"
    s3 = _saved(ck / "step-0000003.ckpt", 3)
    s6 = _saved(ck / "step-0000006.ckpt", 6)
    _saved(ck / "last.ckpt", 6)
    assert list_checkpoints(str(tmp_path)) == [s3, s6]
    _saved(ck / "last.ckpt", 4)  # older than the newest step checkpoint: not listed either
    assert list_checkpoints(str(tmp_path)) == [s3, s6]


def test_list_checkpoints_takes_the_newest_last_file(tmp_path):
    ck = tmp_path / "checkpoints"
    s3 = _saved(ck / "step-0000003.ckpt", 3)
    old = _saved(ck / "last.ckpt", 4)
    newer = _saved(ck / "last-v1.ckpt", 5)
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(newer, (2_000_000, 2_000_000))
    assert list_checkpoints(str(tmp_path)) == [s3, newer]


def test_list_checkpoints_unreadable_last_is_left_out_with_a_warning(tmp_path, caplog):
    ck = tmp_path / "checkpoints"
    s3 = _saved(ck / "step-0000003.ckpt", 3)
    bad = _touch(ck / "last.ckpt", b"\x00not a checkpoint")
    with caplog.at_level("WARNING", logger="hlss"):
        assert list_checkpoints(str(tmp_path)) == [s3]
    assert any(bad in r.getMessage() for r in caplog.records)


def test_list_checkpoints_real_run_stopped_between_step_checkpoints(tiny_run, tmp_path):
    # the tiny run without its step-2 checkpoint: its final weights (step 2) are in last.ckpt
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    first = shutil.copy(tiny_run["checkpoints"][0], ck / "step-0000001.ckpt")
    last = shutil.copy(tiny_run["last"], ck / "last.ckpt")
    listed = list_checkpoints(str(tmp_path / "run"))
    assert listed == [str(first), str(last)]
    assert [checkpoint_info(p)["step"] for p in listed] == [1, 2]


def test_list_checkpoints_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HLSSError) as err:
        list_checkpoints(str(tmp_path / "empty"))
    assert "no checkpoint" in _one_line(err)
    with pytest.raises(HLSSError) as err:
        list_checkpoints(str(tmp_path / "missing"))
    assert "missing" in _one_line(err)


def test_tiny_run_fixture(tiny_run):
    assert list_checkpoints(tiny_run["run_dir"]) == tiny_run["checkpoints"]
    assert [os.path.basename(p) for p in tiny_run["checkpoints"]] == [
        "step-0000001.ckpt",
        "step-0000002.ckpt",
    ]
    assert os.path.isfile(tiny_run["config"])


def test_checkpoint_info(tiny_run):
    info = checkpoint_info(tiny_run["checkpoints"][0])
    assert info["checkpoint"] == tiny_run["checkpoints"][0]
    assert info["step"] == 1 and info["epoch"] == 0
    assert info["mlflow_run_id"] is None  # logger=none


# ---------------------------------------------------------------------------------------------
# run config


def _without_stored_config(src: str, dst) -> str:
    """A copy of checkpoint ``src`` at ``dst`` as older runs wrote it (no run config inside)."""
    state = load_checkpoint_file(src)
    state["hlss"].pop("config", None)
    os.makedirs(os.path.dirname(str(dst)), exist_ok=True)
    torch.save(state, str(dst))
    return str(dst)


def test_lone_checkpoint_carries_its_run_config(tiny_run, tmp_path):
    lone = shutil.copy(tiny_run["checkpoints"][-1], tmp_path / "anywhere.ckpt")
    cfg = run_config_for(str(lone))
    expected = OmegaConf.load(tiny_run["config"])
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(expected)
    model, info = load_trained_model(str(lone))
    assert info["step"] == 2 and not model.training
    # the stored config wins over a config.yaml that does not belong to the checkpoint
    (tmp_path / "config.yaml").write_text("seed: 12345\n")
    assert run_config_for(str(lone)).seed == expected.seed


def test_older_checkpoint_falls_back_to_config_yaml(tiny_run, tmp_path):
    old = _without_stored_config(
        tiny_run["checkpoints"][0], tmp_path / "run" / "checkpoints" / "step-0000001.ckpt"
    )
    with pytest.raises(HLSSError) as err:
        run_config_for(old)
    assert "config.yaml" in _one_line(err) and "carries no run config" in str(err.value)
    shutil.copy(tiny_run["config"], tmp_path / "run" / "config.yaml")  # two levels up
    assert run_config_for(old).seed == OmegaConf.load(tiny_run["config"]).seed
    os.remove(tmp_path / "run" / "config.yaml")
    shutil.copy(tiny_run["config"], tmp_path / "run" / "checkpoints" / "config.yaml")  # beside
    assert load_trained_model(old)[1]["step"] == 1


def test_stored_config_that_is_not_a_mapping(tiny_run, tmp_path):
    state = load_checkpoint_file(tiny_run["checkpoints"][0])
    state["hlss"]["config"] = ["not", "a", "mapping"]
    path = str(tmp_path / "odd.ckpt")
    torch.save(state, path)
    with pytest.raises(HLSSError) as err:
        run_config_for(path)
    assert path in _one_line(err) and "not a mapping" in str(err.value)


def test_config_for_loading_drops_pretrained_timm_weights():
    node = {"_target_": "hlss.models.backbones.build_backbone", "name": "resnet18"}
    cfg = OmegaConf.create(
        {
            "backbone": {**node, "pretrained": True},
            "model": {"_target_": "x.build_dual_encoder", "backbone": {**node, "pretrained": True}},
        }
    )
    out = _config_for_loading(cfg)
    assert out.backbone.pretrained is False and out.model.backbone.pretrained is False
    assert cfg.backbone.pretrained is True and cfg.model.backbone.pretrained is True  # a copy
    only_model = OmegaConf.create({"model": {"backbone": {**node, "pretrained": "/w.pth"}}})
    assert _config_for_loading(only_model).model.backbone.pretrained is False
    clip = {"_target_": "hlss.models.backbones.build_backbone", "name": "RN50", "pretrained": "x"}
    assert _config_for_loading(OmegaConf.create({"backbone": clip})).backbone.pretrained == "x"


# ---------------------------------------------------------------------------------------------
# loading trained models


@pytest.fixture(scope="module")
def trained(tiny_run):
    return load_trained_model(tiny_run["checkpoints"][-1])


def test_loaded_model_equals_checkpoint(tiny_run, trained):
    model, info = trained
    ckpt = tiny_run["checkpoints"][-1]
    state = load_checkpoint_file(ckpt)["state_dict"]
    weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    own = model.state_dict()
    assert set(own) == set(weights)
    assert "text_patch" in own  # the frozen text buffers come from the checkpoint too
    for key, value in weights.items():
        assert torch.equal(own[key], value), key
    assert not model.training
    assert info["step"] == 2 and info["checkpoint"] == ckpt
    assert info["mlflow_run_id"] is None and info["tracking_uri"] is None  # logger=none

    first, info1 = load_trained_model(tiny_run["checkpoints"][0])
    assert info1["step"] == 1
    changed = [
        k
        for k, v in first.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, own[k])
    ]
    assert changed  # a training step moved the weights


def test_untrained_model_is_seeded_and_side_effect_free(tiny_run, trained):
    cfg = run_config_for(tiny_run["checkpoints"][0])
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = untrained_model(cfg)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's generator is untouched
    b = untrained_model(cfg)
    sa, sb, st = a.state_dict(), b.state_dict(), trained[0].state_dict()
    assert set(sa) == set(st)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], st[k]) for k in sa if sa[k].is_floating_point())


def test_corrupt_checkpoint_is_one_line(tiny_run, tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    shutil.copy(tiny_run["config"], tmp_path / "run" / "config.yaml")
    bad = _touch(os.path.join(ck, "step-0000001.ckpt"), b"\x00not a checkpoint")
    with pytest.raises(HLSSError) as err:
        load_trained_model(bad)
    assert bad in _one_line(err)
    with pytest.raises(HLSSError) as err:
        run_config_for(bad)
    assert "not a readable checkpoint" in _one_line(err)


def test_mismatching_weights_name_checkpoint_and_keys(tiny_run):
    cfg = OmegaConf.load(tiny_run["config"])
    # another architecture than the one trained: the HiDisc MLP head on the same backbone
    cfg.model = {
        "_target_": cfg.model._target_,
        "backbone": OmegaConf.to_container(cfg.model.backbone),
        "head": "mlp",
        "mlp_dim": 128,
    }
    ckpt = tiny_run["checkpoints"][0]
    with pytest.raises(HLSSError) as err:
        load_trained_model(ckpt, cfg=cfg)
    text = _one_line(err)
    assert ckpt in text and "missing" in text and "unexpected" in text


@pytest.mark.parametrize("content", [b"not a checkpoint\n", None], ids=["text", "pickled_object"])
def test_a_file_the_safe_loader_refuses_is_not_met_with_advice_to_load_it_unsafely(
    tmp_path, content
):
    """torch's message opens with "re-run with weights_only=False" (runs the file's code); the
    line says what is wrong with the file instead, with torch's own reason."""
    import pickle

    path = tmp_path / "file.ckpt"
    if content is None:
        path.write_bytes(
            pickle.dumps({"state": os.getcwd}, protocol=2)
        )  # a callable: not plain data
    else:
        path.write_bytes(content)
    with pytest.raises(HLSSError) as err:
        load_checkpoint_file(str(path))
    line = _one_line(err)
    assert line.startswith(f"{path}: not a readable checkpoint (it holds more than tensors")
    assert "weights_only" not in line and "False" not in line
    assert ": " in line.split("torch file", 1)[1]  # torch's own reason follows
