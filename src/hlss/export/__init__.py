"""Carry a trained model out of hlss: the backbone as plain safetensors weights and a model card.

:func:`export_model` writes a new folder::

    backbone.safetensors  the backbone under the key names of the plain library model
                          (timm.create_model(name, num_classes=0), open_clip's model.visual)
    heads.safetensors     (optional) projection, text-initialised heads, frozen text prototypes
    export.json           machine-readable: library, architecture, the exact load call, feature
                          width, the modality's input transform, sha256 of each weight file, ...
    model_card.md         the same for people, with the kNN accuracies of an evaluation if found
    config.yaml           the run's resolved training config

The package: :mod:`~hlss.export.weights` (the plain library model and the weights),
:mod:`~hlss.export.facts` (input transform, training, provenance),
:mod:`~hlss.export.evaluation` (kNN metrics of an ``hlss-eval`` run), :mod:`~hlss.export.card`.

Only the checkpoint and timm / open_clip are needed: the hlss model is not rebuilt (no text
encoder, no pretrained weights fetched). Before anything is written, the weights are loaded
strictly into the plain library model built by the very call that ``export.json`` documents.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from hlss.errors import ConfigError, HLSSError
from hlss.export.card import model_card
from hlss.export.evaluation import find_evaluation
from hlss.export.facts import input_transform, training_data, training_summary
from hlss.export.weights import (
    BACKBONE_FILE,
    attribute_names,
    backbone_node,
    backbone_weights,
    cast,
    check_strict,
    describe_heads,
    feature_dim,
    head_weights,
    library_model,
    native_input,
)
from hlss.provenance import provenance

__all__ = ["BACKBONE_FILE", "DTYPES", "FORMAT", "HEADS_FILE", "check_request", "export_model"]

FORMAT = "hlss-export/1"
HEADS_FILE = "heads.safetensors"
DTYPES = ("float32", "float16", "bfloat16")


def _write(folder: str, name: str, data: bytes) -> str:
    """Write ``data`` to ``folder/name`` (:func:`hlss.atomic.atomic_file`); returns its sha256."""
    from hlss.atomic import atomic_file

    with atomic_file(os.path.join(folder, name), "wb") as handle:
        handle.write(data)
    return hashlib.sha256(data).hexdigest()


def check_request(out: str, dtype: str) -> str:
    """Refuse an unknown ``dtype`` or an ``out`` that holds something; returns ``out`` absolute.

    Raises:
        ConfigError: ``dtype`` is not one of :data:`DTYPES`.
        HLSSError: ``out`` is a file or a non-empty folder.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype}: not one of {', '.join(DTYPES)}")
    path = os.path.abspath(os.path.expanduser(str(out)))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise HLSSError(f"out={out}: already exists and is not empty; choose a new folder")
    return path


def export_model(
    ckpt: str,
    out: str,
    dtype: str = "float32",
    heads: bool = True,
    metrics: str | None = None,
    count_data: bool = True,
) -> dict:
    """Export the backbone of a trained checkpoint (see the module docstring for the files).

    Args:
        ckpt: a checkpoint file, or a run folder / ``checkpoints/`` folder (its newest
            step checkpoint).
        out: a new (or empty) folder; written beside itself and renamed into place.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for the weight files.
        heads: also write ``heads.safetensors`` when the model has weights besides the backbone.
        metrics: an ``hlss-eval`` folder of this checkpoint; ``None`` -> searched in the run.
        count_data: count the training data's patients/slides/patches for the card.

    Returns:
        The ``export.json`` payload plus ``"out"`` (the folder written).

    Raises:
        HLSSError: (one line) a bad ``dtype`` or non-empty ``out``; a missing or unreadable
            checkpoint or run config; weights that do not fit the plain library model; a
            ``metrics`` folder without this step.
    """
    from safetensors.torch import save

    from hlss.atomic import publish_dir, temp_dir_beside
    from hlss.checkpoints import load_checkpoint_file
    from hlss.eval.restore import checkpoint_info, list_checkpoints, run_config_for
    from hlss.eval.writers import run_folder

    target = check_request(out, dtype)
    path = list_checkpoints(ckpt)[-1]
    state = load_checkpoint_file(path)
    state_dict = state.get("state_dict") if isinstance(state, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise HLSSError(f"{path}: not a training checkpoint (no state_dict)")
    cfg = run_config_for(path, state)
    plain = library_model(backbone_node(cfg))
    weights = cast(backbone_weights(state_dict, plain, path), dtype)
    model = plain.create()
    check_strict(model, weights, plain, path)
    info = checkpoint_info(path)
    extra = cast(head_weights(state_dict), dtype) if heads else {}
    payload: dict[str, Any] = {
        "format": FORMAT,
        "library": plain.library,
        "architecture": plain.architecture,
        "create": {"call": plain.create_call, "kwargs": plain.kwargs},
        "load": plain.load_code(),
        "feature_dim": feature_dim(model),
        "input": input_transform(cfg),
        "weights": {"file": BACKBONE_FILE, "dtype": dtype, "tensors": len(weights)},
        "training": training_summary(cfg, info),
        "data": training_data(cfg, count_data),
        "evaluation": find_evaluation(path, info["step"], metrics),
        "hlss": provenance(),
        "exported": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    payload["input"].update(native_input(plain, model))
    if extra:
        names = attribute_names(run_folder(path), cfg)
        payload["heads"] = {"file": HEADS_FILE, **describe_heads(extra, names)}
    tmp = temp_dir_beside(target)
    try:
        payload["weights"]["sha256"] = _write(tmp, BACKBONE_FILE, save(weights, {"format": "pt"}))
        if extra:
            payload["heads"]["sha256"] = _write(tmp, HEADS_FILE, save(extra, {"format": "pt"}))
        _write(tmp, "config.yaml", OmegaConf.to_yaml(cfg).encode())
        _write(tmp, "export.json", json.dumps(payload, indent=1).encode())
        _write(tmp, "model_card.md", model_card(payload).encode())
        if not publish_dir(tmp, target):
            raise HLSSError(f"out={out}: was filled by someone else meanwhile; nothing written")
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return {**payload, "out": target}
