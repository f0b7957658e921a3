"""Training callbacks of hlss (the ``callbacks`` config group names them by ``_target_``)."""

from __future__ import annotations

import json
import os

from lightning.pytorch.callbacks import Callback


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
