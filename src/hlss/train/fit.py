"""One training run from a composed config: output folder, MLflow, checkpoints, resume.

Everything is built from the config's ``_target_`` nodes by :mod:`hlss.config`; this module only
orders the steps: find what to resume, build, record the config, fit, summarise. Where a resumed
run continues (folder, MLflow run) and which configs may resume a checkpoint:
:mod:`hlss.train.resume`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf, open_dict

from hlss.checkpoints import AtomicCheckpointIO, resume_requested
from hlss.config import (
    build,
    build_callbacks,
    build_datamodule,
    build_model,
    build_objective,
    resolved_container,
)
from hlss.errors import ConfigError
from hlss.provenance import provenance
from hlss.tracking import prepare_tracking_uri
from hlss.train.module import HLSSModule
from hlss.train.resume import (
    ResumePoint,
    check_compatible,
    check_weights_fit,
    differing_keys,
    next_resume_number,
    resume_point,
)
from hlss.train.run_name import hydra_run_name

log = logging.getLogger(__name__)


def _continued_run_id(cfg: DictConfig, point: ResumePoint | None) -> str | None:
    """The MLflow run a resume continues: the checkpoint's, when the run continues in its
    original folder and the configured store has that run; else ``None`` (a new run)."""
    if point is None or point.run_dir is None or not point.mlflow_run_id:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = cfg.logger.get("tracking_uri")
    try:
        MlflowClient(tracking_uri=str(uri) if uri else None).get_run(point.mlflow_run_id)
    except MlflowException:
        log.warning(
            "MLflow run %s of %s is not in %s; logging to a new run",
            point.mlflow_run_id,
            point.checkpoint,
            uri,
        )
        return None
    return point.mlflow_run_id


def _mlflow_logger(cfg: DictConfig, point: ResumePoint | None, tags: Mapping[str, str]):
    """The configured MLflow logger (``None`` for ``logger=none``): continuing the checkpoint's
    run on a resume in place, else a new run named by :func:`hydra_run_name`."""
    if not cfg.get("logger"):  # logger=none
        return None
    if cfg.logger.get("tracking_uri"):
        prepare_tracking_uri(str(cfg.logger.tracking_uri))
    run_id = _continued_run_id(cfg, point)
    name = cfg.logger.get("run_name") or hydra_run_name(cfg)
    return build(cfg.logger, run_id=run_id, run_name=name, tags=dict(tags))


def _record_run(
    logger, run_config: dict, files: list[str], point: ResumePoint | None, resume_n: int | None
) -> None:
    """Log the run config: as params for a new MLflow run; for a continued run (whose params
    stay those of its first start) as tags naming the resume's changed keys and its checkpoint.
    ``files`` (the config file, the attribute banks) become artifacts either way."""
    client, run_id = logger.experiment, logger.run_id
    if point is not None and run_id == point.mlflow_run_id:
        changed = ", ".join(differing_keys(point.config, run_config)) or "(none)"
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, f"resume.{resume_n}.changed_keys", changed[:8000])
        client.set_tag(run_id, f"resume.{resume_n}.from", f"{point.checkpoint} (step {point.step})")
    else:
        logger.log_hyperparams(run_config)
    for path in files:
        client.log_artifact(run_id, path)


def _callbacks(cfg: DictConfig, has_logger: bool) -> list:
    from hlss.train.preemption import Preemption, launch_overrides

    callbacks = build_callbacks(cfg)
    if not has_logger:  # LearningRateMonitor refuses a Trainer without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    # always on: a signal stops the run with last.ckpt and a non-zero exit status
    return [*callbacks, Preemption(overrides=launch_overrides())]


def _write_banks(model, output_dir: str) -> str | None:
    banks = getattr(model, "attribute_banks", None)
    if not banks:
        return None
    path = os.path.join(output_dir, "attributes.json")
    with open(path, "w", encoding="utf-8") as handle:
        payload = {
            lvl: {"names": b.names, "descriptions": b.descriptions} for lvl, b in banks.items()
        }
        json.dump(payload, handle, indent=1)
    return path


def run_training(cfg: DictConfig, output_dir: str) -> dict:
    """Train as configured; returns a summary (output folder, checkpoint, last losses, run id).

    ``output_dir`` is the run folder, except on a resume that continues in the original run
    folder (:func:`hlss.train.resume.continue_folder`): that folder is used instead.

    Raises:
        HLSSError: bad settings, a checkpoint that cannot be resumed, or one whose config or
            weights do not fit this config (:func:`hlss.train.resume.check_compatible`).
    """
    cfg = cfg.copy()
    resuming = resume_requested(cfg.get("resume"), str(cfg.paths.root))
    point = resume_point(str(cfg.resume), str(cfg.paths.root)) if resuming else None
    if point is not None and point.run_dir is not None:
        output_dir = point.run_dir
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    with open_dict(cfg):
        cfg.paths.output_dir = output_dir
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    every = int(cfg.checkpoint.every_n_steps)
    if every < 1:
        raise ConfigError(f"checkpoint.every_n_steps must be >= 1, got {every}")
    run_config = resolved_container(cfg)
    if point is not None:
        check_compatible(point, run_config)
    datamodule = build_datamodule(cfg)
    model = build_model(cfg)
    objective = build_objective(cfg)
    module = HLSSModule(
        model,
        objective,
        optimizer=build(cfg.optimizer),
        gather=bool(cfg.get("gather", True)),
        run_config=run_config,
        channels_last=cfg.get("channels_last", "auto"),
        compile=run_config.get("compile", False),
    )
    if point is not None:
        check_weights_fit(point, module.state_dict())
        log.info(
            "resuming %s (step %d) in %s; changed: %s",
            point.checkpoint,
            point.step,
            output_dir,
            ", ".join(differing_keys(point.config, run_config)) or "nothing",
        )

    ckpt_dir = os.path.join(output_dir, "checkpoints")
    tags = {
        "git_commit": provenance()["git_commit"] or "unknown",
        "output_dir": output_dir,
        "loss": str(cfg.loss.get("name", "")),
        "dataset": str(cfg.dataset.name),
    }
    if point is not None:  # tags of a new MLflow run only (a continued run keeps its own)
        tags["resumed_from"] = point.checkpoint
        if point.mlflow_run_id:
            tags["parent_run_id"] = point.mlflow_run_id
    logger = _mlflow_logger(cfg, point, tags)
    trainer = build(
        cfg.trainer,
        logger=logger if logger is not None else False,
        callbacks=_callbacks(cfg, logger is not None),
        plugins=[AtomicCheckpointIO()],
        default_root_dir=output_dir,
    )
    if trainer.is_global_zero:
        resume_n = next_resume_number(output_dir) if point and point.run_dir else None
        name = f"config-resume-{resume_n}.yaml" if resume_n else "config.yaml"
        files = [os.path.join(output_dir, name)]
        OmegaConf.save(OmegaConf.create(run_config), files[0])
        files += [path for path in [_write_banks(model, output_dir)] if path]
        if logger is not None:
            _record_run(logger, run_config, files, point, resume_n)
    with warnings.catch_warnings():
        if point is not None and point.run_dir is not None:  # continuing there is the point
            warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
        trainer.fit(module, datamodule=datamodule, ckpt_path=point.checkpoint if point else None)

    last = os.path.join(ckpt_dir, "last.ckpt")
    summary = {
        "output_dir": output_dir,
        "last_checkpoint": last if os.path.isfile(last) else None,
        "global_step": int(trainer.global_step),
        "mlflow_run_id": getattr(logger, "run_id", None),
        "resumed_from": point.checkpoint if point is not None else None,
        "tracking_uri": str(cfg.logger.get("tracking_uri")) if logger is not None else None,
        "metrics": {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if torch.is_tensor(v) and v.numel() == 1
        },
    }
    if trainer.is_global_zero:
        with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=1)
    if logger is not None and trainer.is_global_zero:
        logger.experiment.set_tag(logger.run_id, "checkpoint_dir", ckpt_dir)
        logger.experiment.set_tag(logger.run_id, "last_checkpoint", str(summary["last_checkpoint"]))
    return summary
