"""One training run from a composed config: output folder, MLflow, checkpoints, resume.

Everything is built from the config's ``_target_`` nodes by :mod:`hlss.config`; this module only
orders the steps: find what to resume, build, record the config, fit, summarise.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf, open_dict

from hlss.checkpoints import AtomicCheckpointIO, find_checkpoint, load_checkpoint_file
from hlss.config import (
    build,
    build_callbacks,
    build_datamodule,
    build_model,
    build_objective,
    resolved_container,
)
from hlss.errors import ConfigError
from hlss.tracking import prepare_tracking_uri
from hlss.train.callbacks import SamplerResume
from hlss.train.module import HLSSModule

log = logging.getLogger(__name__)


def git_commit() -> str:
    """The commit of the source checkout hlss runs from, or ``unknown`` (e.g. an installed wheel)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _mlflow_logger(cfg: DictConfig, run_id: str | None, tags: Mapping[str, str]):
    if not cfg.get("logger"):  # logger=none
        return None
    if cfg.logger.get("tracking_uri"):
        prepare_tracking_uri(str(cfg.logger.tracking_uri))
    return build(cfg.logger, run_id=run_id, tags=dict(tags))


def _callbacks(cfg: DictConfig, has_logger: bool) -> list:
    callbacks = build_callbacks(cfg)
    if not has_logger:  # LearningRateMonitor refuses a Trainer without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return [*callbacks, SamplerResume()]


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
    """Train as configured; returns a summary (output folder, checkpoint, last losses, run id)."""
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.paths.output_dir = output_dir
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    resume_path = None
    resumed_run_id = None
    if cfg.get("resume"):
        resume_path = find_checkpoint(str(cfg.resume), str(cfg.paths.root))
        state = load_checkpoint_file(resume_path)
        resumed_run_id = (state.get("hlss") or {}).get("mlflow_run_id")
        del state
        log.info("resuming from %s", resume_path)

    every = int(cfg.checkpoint.every_n_steps)
    if every < 1:
        raise ConfigError(f"checkpoint.every_n_steps must be >= 1, got {every}")
    run_config = resolved_container(cfg)
    datamodule = build_datamodule(cfg)
    model = build_model(cfg)
    objective = build_objective(cfg)
    module = HLSSModule(
        model,
        objective,
        optimizer=build(cfg.optimizer),
        gather=bool(cfg.get("gather", True)),
        run_config=run_config,
    )

    config_path = os.path.join(output_dir, "config.yaml")
    OmegaConf.save(OmegaConf.create(run_config), config_path)
    banks_path = _write_banks(model, output_dir)

    ckpt_dir = os.path.join(output_dir, "checkpoints")
    tags = {
        "git_commit": git_commit(),
        "output_dir": output_dir,
        "loss": str(cfg.loss.get("name", "")),
        "dataset": str(cfg.dataset.name),
    }
    logger = _mlflow_logger(cfg, resumed_run_id, tags)
    trainer = build(
        cfg.trainer,
        logger=logger if logger is not None else False,
        callbacks=_callbacks(cfg, logger is not None),
        plugins=[AtomicCheckpointIO()],
        default_root_dir=output_dir,
    )
    if logger is not None and trainer.is_global_zero:
        logger.log_hyperparams(run_config)
        logger.experiment.log_artifact(logger.run_id, config_path)
        if banks_path:
            logger.experiment.log_artifact(logger.run_id, banks_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)

    last = os.path.join(ckpt_dir, "last.ckpt")
    summary = {
        "output_dir": output_dir,
        "last_checkpoint": last if os.path.isfile(last) else None,
        "global_step": int(trainer.global_step),
        "mlflow_run_id": getattr(logger, "run_id", None),
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
