"""Training callbacks of hlss (the ``callbacks`` config group names them by ``_target_``)."""

from __future__ import annotations

import json
import os

import lightning as L
from lightning.pytorch.callbacks import Callback


class SamplerResume(Callback):
    """Makes a mid-epoch resume continue the interrupted epoch where it stopped.

    Batches depend only on ``(seed, epoch, position)``, so skipping the batches already done in
    the resumed epoch gives the same sequence as an uninterrupted run. Always on: exact
    resumption is part of training, not an option.
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


class BatchRecord(Callback):
    """Writes ``batches-rank<r>.jsonl`` into ``output_dir``: per step, the patient and patch ids
    this process trained on (for checking sampling, resumption and distributed splits).

    Add it with ``hlss-train callbacks=[default,batch_record]``.
    """

    def __init__(self, output_dir: str):
        self.output_dir = str(output_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, f"batches-rank{trainer.global_rank}.jsonl")
        row = {
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "patients": batch["patient"].tolist(),
            "patches": batch["patch"].flatten().tolist(),
        }
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
