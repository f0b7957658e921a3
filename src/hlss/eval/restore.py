"""Restoring a trained model for evaluation: a run's checkpoints, its config, its weights.

A training run folder (``outputs/<date>/<time>/``) holds ``config.yaml`` (the resolved training
config) and ``checkpoints/{step-NNNNNNN,last}.ckpt``; every checkpoint also carries the resolved
config at ``checkpoint["hlss"]["config"]``, so a lone checkpoint copied anywhere is enough.
Evaluation never needs the trainer: it rebuilds the :class:`~hlss.models.dual_encoder.DualEncoder`
from the run config with :func:`hlss.config.build_model` and loads the ``model.``-prefixed
weights of a checkpoint. (Not to be confused with :mod:`hlss.checkpoints`: writing and loading
checkpoint files.)
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hlss.checkpoints import load_checkpoint_file
from hlss.errors import HLSSError

__all__ = [
    "CONFIG_NAME",
    "checkpoint_info",
    "list_checkpoints",
    "load_trained_model",
    "run_config_for",
    "untrained_model",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
MODEL_PREFIX = "model."

_STEP_NAME = re.compile(r"step[-_=]?(\d+)")
_LAST_NAME = re.compile(r"last(-v\d+)?\.ckpt")


def _is_last(name: str) -> bool:
    return _LAST_NAME.fullmatch(name) is not None


def _stored_step(path: str) -> int:
    """The ``global_step`` a checkpoint file holds (tensors memory-mapped, not read).

    Raises:
        HLSSError: the file is unreadable or holds no integer ``global_step``.
    """
    state = load_checkpoint_file(path, mmap=True)
    step = state.get("global_step") if isinstance(state, Mapping) else None
    if not isinstance(step, int):
        raise HLSSError(f"{path}: checkpoint has no step in its name and no global_step inside")
    return step


def _step_of(path: str) -> int:
    """Training step of a checkpoint: from a ``step-NNNNNNN`` name, else its ``global_step``."""
    match = _STEP_NAME.search(os.path.basename(path))
    if match:
        return int(match.group(1))
    return _stored_step(path)


def _last_if_newer(lasts: list[str], newest_step: int) -> list[str]:
    """``[newest last*.ckpt]`` when it is further trained than ``newest_step``, else ``[]``.

    A run whose final step is not a multiple of ``checkpoint.every_n_steps`` has its final
    weights only in ``last.ckpt``. An unreadable ``last.ckpt`` is left out with a warning (the
    step checkpoints can still be evaluated).
    """
    if not lasts:
        return []
    last = max(lasts, key=os.path.getmtime)
    try:
        step = _stored_step(last)
    except HLSSError as err:
        log.warning("%s; evaluating the step checkpoints only", err)
        return []
    return [last] if step > newest_step else []


def list_checkpoints(ckpt: str) -> list[str]:
    """The checkpoint files ``ckpt`` names, oldest first.

    Args:
        ckpt: a checkpoint file, a run folder (``<run>/checkpoints/*.ckpt``) or a folder of
            ``*.ckpt`` files (e.g. ``<run>/checkpoints``).

    Returns:
        Absolute paths. A file gives ``[file]``. A folder gives every ``*.ckpt`` except
        ``last.ckpt`` (and Lightning's ``last-vN.ckpt``), ordered by training step (parsed from
        ``step-NNNNNNN`` in the name; a checkpoint named otherwise is opened for its
        ``global_step``). The newest ``last*.ckpt`` is added at the end when its ``global_step``
        is greater than the newest step checkpoint's (a run that stopped between two step
        checkpoints), and is the only entry when there is no other checkpoint; a ``last.ckpt``
        at the same step as the newest step checkpoint is not listed twice, and an unreadable
        one beside step checkpoints is left out with a warning. Hidden files (interrupted atomic
        writes ``.tmp-*.ckpt``) are ignored.

    Raises:
        HLSSError: the path does not exist, the folder holds no checkpoint, or a checkpoint
            without a step in its name cannot be read.
    """
    path = os.path.abspath(os.path.expanduser(str(ckpt)))
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise HLSSError(f"{ckpt}: no such checkpoint file or run folder")
    sub = os.path.join(path, "checkpoints")
    folder = sub if os.path.isdir(sub) else path
    names = sorted(
        n
        for n in os.listdir(folder)
        if n.endswith(".ckpt") and not n.startswith(".") and os.path.isfile(os.path.join(folder, n))
    )
    steps = [os.path.join(folder, n) for n in names if not _is_last(n)]
    lasts = [os.path.join(folder, n) for n in names if _is_last(n)]
    if steps:
        keyed = sorted((_step_of(p), os.path.basename(p), p) for p in steps)
        return [p for _, _, p in keyed] + _last_if_newer(lasts, keyed[-1][0])
    if lasts:
        return [max(lasts, key=os.path.getmtime)]
    raise HLSSError(f"{ckpt}: no checkpoint (*.ckpt) found in {folder}")


def checkpoint_info(path: str) -> dict:
    """Step, epoch and MLflow run id of a checkpoint (without building the model).

    Returns:
        ``{"checkpoint": absolute path, "step", "epoch", "mlflow_run_id"}`` (``None`` when the
        run was not tracked).

    Raises:
        HLSSError: the checkpoint is missing or unreadable.
    """
    state = load_checkpoint_file(path)
    extra = state.get("hlss") or {}
    return {
        "checkpoint": os.path.abspath(path),
        "step": int(state.get("global_step", 0) or 0),
        "epoch": int(state.get("epoch", 0) or 0),
        "mlflow_run_id": extra.get("mlflow_run_id"),
    }


def _stored_config(state: Any, path: str) -> DictConfig | None:
    """The resolved run config a checkpoint carries at ``state["hlss"]["config"]``, if any.

    Raises:
        HLSSError: the stored config is not a mapping.
    """
    extra = state.get("hlss") if isinstance(state, Mapping) else None
    stored = extra.get("config") if isinstance(extra, Mapping) else None
    if stored is None:
        return None
    if not isinstance(stored, Mapping):
        raise HLSSError(f"{path}: the run config stored in the checkpoint is not a mapping")
    return OmegaConf.create(dict(stored))


def _config_file_for(ckpt_path: str) -> DictConfig:
    """The run's ``config.yaml``: two levels up (``<run>/checkpoints/x.ckpt`` -> ``<run>``),
    then beside the checkpoint; a run folder given directly is searched itself."""
    path = os.path.abspath(os.path.expanduser(str(ckpt_path)))
    if os.path.isdir(path):
        candidates = [os.path.join(path, CONFIG_NAME)]
    else:
        here = os.path.dirname(path)
        candidates = [
            os.path.join(os.path.dirname(here), CONFIG_NAME),
            os.path.join(here, CONFIG_NAME),
        ]
    for candidate in candidates:
        if os.path.isfile(candidate):
            try:
                cfg = OmegaConf.load(candidate)
            except Exception as err:  # yaml / omegaconf raise many types
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise HLSSError(f"{candidate}: unreadable run config ({first})") from None
            if not isinstance(cfg, DictConfig):
                raise HLSSError(f"{candidate}: run config is not a mapping")
            return cfg
    raise HLSSError(
        f"{ckpt_path}: the checkpoint carries no run config and no {CONFIG_NAME} of its training "
        f"run was found (looked in {', '.join(os.path.dirname(c) for c in candidates)})"
    )


def run_config_for(ckpt_path: str, state: Mapping | None = None) -> DictConfig:
    """The training config of the run a checkpoint belongs to.

    A checkpoint file's own resolved config (``checkpoint["hlss"]["config"]``) comes first; only
    older checkpoints without one fall back to the run's ``config.yaml`` (two levels up, then
    beside the checkpoint). A run folder given directly is searched for ``config.yaml`` only.

    Args:
        ckpt_path: a checkpoint file or a run folder.
        state: the already loaded checkpoint of ``ckpt_path`` (saves loading it again).

    Raises:
        HLSSError: the checkpoint is unreadable; its stored config is not a mapping; it has none
            and no readable ``config.yaml`` mapping is found.
    """
    path = os.path.abspath(os.path.expanduser(str(ckpt_path)))
    if not os.path.isdir(path):
        if state is None:
            state = load_checkpoint_file(path)
        stored = _stored_config(state, path)
        if stored is not None:
            return stored
    return _config_file_for(ckpt_path)


def _config_for_loading(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` whose timm backbone is built without pretrained weights.

    The checkpoint overwrites every backbone weight, so fetching hub weights (network) or reading
    a local pretrained file (which may have moved since training) would only cost time or fail.
    The backbone node is looked for at ``cfg.backbone`` and, in resolved run configs, at
    ``cfg.model.backbone`` (both are changed when both exist). An open_clip backbone keeps its
    ``pretrained`` value: it names the joint space, which decides whether the model has a
    projection layer.
    """
    from hlss.models.backbones import TIMM_MODELS

    cfg = cfg.copy()
    model = cfg.get("model")
    nodes = [cfg.get("backbone"), model.get("backbone") if isinstance(model, DictConfig) else None]
    for backbone in nodes:
        if (
            isinstance(backbone, DictConfig)
            and str(backbone.get("_target_", "")).endswith("build_backbone")
            and backbone.get("name") in TIMM_MODELS
            and "pretrained" in backbone
        ):
            backbone.pretrained = False
    return cfg


def _short_keys(keys: list[str], n: int = 3) -> str:
    head = ", ".join(keys[:n])
    return f"{head}, ... ({len(keys)} in all)" if len(keys) > n else head


def _load_model_weights(model: nn.Module, state_dict: Mapping[str, Any], path: str) -> None:
    """Load the ``model.``-prefixed entries of a Lightning ``state_dict`` strictly."""
    weights = {
        k[len(MODEL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)
    }
    if not weights:
        raise HLSSError(f"{path}: checkpoint holds no model weights (no 'model.*' keys)")
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    problems = []
    if missing:
        problems.append(f"missing {_short_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {_short_keys(unexpected)}")
    shaped = sorted(
        k
        for k in set(own) & set(weights)
        if isinstance(weights[k], torch.Tensor) and tuple(weights[k].shape) != tuple(own[k].shape)
    )
    if shaped:
        k = shaped[0]
        problems.append(
            f"{len(shaped)} shape mismatch(es), first {k}: checkpoint "
            f"{tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
        )
    if problems:
        raise HLSSError(
            f"{path}: weights do not match the model built from the run config: "
            + "; ".join(problems)
        )
    model.load_state_dict(weights, strict=True)


def load_trained_model(
    ckpt_path: str, cfg: DictConfig | None = None, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Rebuild the trained model of a checkpoint.

    Args:
        ckpt_path: a checkpoint file written by ``hlss-train``.
        cfg: the training config; ``None`` -> the one the checkpoint carries (or, for older
            checkpoints, its run's ``config.yaml``: see :func:`run_config_for`).
        map_location: where the checkpoint tensors are loaded (the model stays on the CPU
            unless this is a device; move it yourself for inference).

    Returns:
        ``(model, info)``: the model in eval mode with the checkpoint's weights (including the
        frozen text-embedding buffers), and ``info = {"step", "epoch", "mlflow_run_id",
        "tracking_uri", "checkpoint"}`` (``mlflow_run_id`` / ``tracking_uri`` are ``None`` when
        the run was not tracked).

    Raises:
        HLSSError: the checkpoint is missing or unreadable, the run config is missing, or the
            checkpoint's ``model.*`` weights do not match the rebuilt model (names the checkpoint
            and a few keys).
    """
    from hlss.config import build_model

    path = os.path.abspath(os.path.expanduser(str(ckpt_path)))
    state = load_checkpoint_file(path, map_location=map_location)
    state_dict = state.get("state_dict") if isinstance(state, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise HLSSError(f"{path}: not a training checkpoint (no state_dict)")
    if cfg is None:
        cfg = run_config_for(path, state)
    model = build_model(_config_for_loading(cfg))
    if not isinstance(map_location, str) or map_location != "cpu":
        model = model.to(map_location)
    _load_model_weights(model, state_dict, path)
    model.eval()
    extra = state.get("hlss") or {}
    logger = cfg.get("logger")
    tracking_uri = logger.get("tracking_uri") if isinstance(logger, DictConfig) else None
    info = {
        "step": int(state.get("global_step", 0) or 0),
        "epoch": int(state.get("epoch", 0) or 0),
        "mlflow_run_id": extra.get("mlflow_run_id") if isinstance(extra, Mapping) else None,
        "tracking_uri": str(tracking_uri) if tracking_uri else None,
        "checkpoint": path,
    }
    return model, info


def untrained_model(cfg: DictConfig) -> nn.Module:
    """The model of ``cfg`` at its initialisation: the "untrained" baseline.

    Built exactly as training builds it (pretrained backbone weights included, if configured),
    with the random generators seeded from ``cfg.seed`` as training seeds them, so it matches
    the run's step-0 weights. The caller's random states (Python, NumPy, torch) are restored
    afterwards. Returned in eval mode on the CPU.

    Raises:
        HLSSError: any problem building the model from the config (see :func:`hlss.config.build_model`).
    """
    from hlss.config import build_model

    seed = int(cfg.get("seed", 0) or 0)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)  # CPU only: the model is built there
            model = build_model(cfg)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return model.eval()
