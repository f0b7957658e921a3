"""One training run from a composed config: output folder, MLflow, checkpoints, resume."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from hlss.config import build
from hlss.errors import ConfigError
from hlss.train.build import build_datamodule, build_model, build_objective, flat_params
from hlss.train.checkpoint import AtomicCheckpointIO, find_checkpoint, load_checkpoint_file
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


class SamplerResume(Callback):
    """Makes a mid-epoch resume continue the interrupted epoch where it stopped.

    Batches depend only on ``(seed, epoch, position)``, so skipping the batches already done in
    the resumed epoch gives the same sequence as an uninterrupted run.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if sampler is None or not hasattr(sampler, "skip_items"):
            return
        per_epoch = trainer.num_training_batches
        if not isinstance(per_epoch, int) or per_epoch <= 0:
            return
        done = (
            trainer.global_step * trainer.accumulate_grad_batches
            - trainer.current_epoch * per_epoch
        )
        sampler.skip_items = max(0, min(done, per_epoch)) * loader.batch_size


class RunInfo(Callback):
    """Keeps the MLflow run id in every checkpoint so a resumed run continues the same MLflow run,
    and records the checkpoint folder as a run tag."""

    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = checkpoint_dir

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        run_id = getattr(trainer.logger, "run_id", None)
        checkpoint["hlss"] = {"mlflow_run_id": run_id, "checkpoint_dir": self.checkpoint_dir}


class BatchRecord(Callback):
    """Writes ``batches-rank<r>.jsonl``: per step, the patient and patch ids this rank trained on
    (``record_batches=true``; for checking sampling, resumption and distributed splits)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        path = os.path.join(self.output_dir, f"batches-rank{trainer.global_rank}.jsonl")
        row = {
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "patients": batch["patient"].tolist(),
            "patches": batch["patch"].flatten().tolist(),
        }
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def _mlflow_logger(cfg: DictConfig, run_id: str | None, tags: Mapping[str, str]):
    if not cfg.get("logger"):  # logger=none
        return None
    uri = str(cfg.logger.get("tracking_uri", ""))
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///") :]) or ".", exist_ok=True)
    return build(cfg.logger, run_id=run_id, tags=dict(tags))


def run_training(cfg: DictConfig, output_dir: str) -> dict:
    """Train as configured; returns a summary (output folder, checkpoint, last losses, run id)."""
    os.makedirs(output_dir, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    resume_path = None
    resumed_run_id = None
    if cfg.get("resume"):
        resume_path = find_checkpoint(str(cfg.resume), str(cfg.paths.root))
        state = load_checkpoint_file(resume_path)
        resumed_run_id = (state.get("hlss") or {}).get("mlflow_run_id")
        del state
        log.info("resuming from %s", resume_path)

    datamodule = build_datamodule(cfg)
    model, banks = build_model(cfg)
    objective = build_objective(cfg)
    module = HLSSModule(
        model, objective, optimizer=build(cfg.optimizer), gather=bool(cfg.get("gather", True))
    )

    config_path = os.path.join(output_dir, "config.yaml")
    OmegaConf.save(cfg, config_path, resolve=True)
    banks_path = None
    if banks:
        banks_path = os.path.join(output_dir, "attributes.json")
        with open(banks_path, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    lvl: {"names": b.names, "descriptions": b.descriptions}
                    for lvl, b in banks.items()
                },
                handle,
                indent=1,
            )

    ckpt_dir = os.path.join(output_dir, "checkpoints")
    tags = {
        "git_commit": git_commit(),
        "output_dir": output_dir,
        "loss": str(cfg.loss.name),
        "dataset": str(cfg.dataset.name),
    }
    logger = _mlflow_logger(cfg, resumed_run_id, tags)
    every = int(cfg.checkpoint.every_n_steps)
    if every < 1:
        raise ConfigError(f"checkpoint.every_n_steps must be >= 1, got {every}")
    callbacks = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step-{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every,
            save_top_k=-1,
            save_last=True,
        ),
        SamplerResume(),
        RunInfo(ckpt_dir),
    ]
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.get("record_batches"):
        callbacks.append(BatchRecord(output_dir))
    trainer = build(
        cfg.trainer,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=output_dir,
    )
    if logger is not None and trainer.is_global_zero:
        logger.log_hyperparams(flat_params(cfg))
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
