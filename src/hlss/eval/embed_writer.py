"""The Lightning side of embedding extraction: a predict module and a streaming writer.

:class:`PatchEmbedder` turns a batch of :func:`~hlss.eval.embed.collate_patches` into
``model.embed(images, source)``; :class:`EmbeddingWriter` streams every batch's embeddings as
float16 into a memory-mapped ``.npy`` part file of its process (rank), so features are never
held in RAM, and records which table rows it wrote and which files were unreadable.
:func:`merge_parts` then joins the parts of all ranks into one ``features.npy`` in table order.
Everything is written inside a folder the caller publishes atomically (see
:func:`hlss.eval.embed.embed_table`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from torch import nn

from hlss.errors import ConfigError, HLSSError
from hlss.progress import Progress

__all__ = ["EmbeddingWriter", "PatchEmbedder", "PredictLogLines", "merge_parts"]

FEATURES_NAME = "features.npy"
_COPY_CHUNK = 65536  # rows per copy step when joining or compacting features


class PatchEmbedder(pl.LightningModule):
    """``predict_step`` around a model's ``embed(x, source)``.

    Args:
        model: a module with ``embed(x [B, 3, H, W], source) -> [B, d]`` (e.g. a
            :class:`~hlss.models.dual_encoder.DualEncoder`); a module without ``embed`` is
            called directly and offers ``source="backbone"`` only.
        source: the embedding source passed to ``embed``.
        paths: the table's patch paths, to name a file in errors.

    Each step returns ``{"features": [k, d] or None, "rows": LongTensor [k]}`` for the ``k``
    readable patches of the batch.
    """

    def __init__(self, model: nn.Module, source: str, paths: Sequence[str] = ()):
        super().__init__()
        if getattr(model, "embed", None) is None and source != "backbone":
            raise ConfigError(f"embed source {source!r}: a model without .embed offers 'backbone'")
        self.model = model
        self.source = source
        self.paths = paths

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Raises:
        HLSSError: patches of different sizes in the batch; an output that is not ``[k, d]``.
        """
        rows = batch["rows"]
        if batch["error"]:
            first = int(rows[0]) if len(rows) else -1
            where = self.paths[first] if 0 <= first < len(self.paths) else f"row {first}"
            raise HLSSError(
                f"{where}: {batch['error']}; set the base transform's size "
                "(dataset.transform.size) to crop them to one size"
            )
        x = batch["images"]
        if x is None:
            return {"features": None, "rows": rows}
        embed = getattr(self.model, "embed", None)
        out = embed(x, self.source) if embed is not None else self.model(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(x):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise HLSSError(
                f"embed source {self.source!r}: expected [batch, dim] embeddings, got {shape}"
            )
        return {"features": out, "rows": rows}


def _part_name(rank: int, suffix: str) -> str:
    return f".part-{rank}{suffix}"


class EmbeddingWriter(BasePredictionWriter):
    """Streams each predicted batch into ``<folder>/.part-<rank>.npy`` (float16, memory-mapped).

    Args:
        folder: where the part files go (all ranks use rank 0's folder).
        n: the number of table rows (a rank writes at most ``ceil(n / world_size)``).

    At the end of prediction each rank flushes its part and writes ``.part-<rank>.json`` with
    ``count, dim, nonfinite, bad`` (``bad``: ``[[row, problem], ...]``) and
    ``.part-<rank>.rows.npy`` (``int64 [count]``, the table row of each feature row).
    :attr:`failure` is the exception that stopped prediction, if any.
    """

    def __init__(self, folder: str, n: int):
        super().__init__(write_interval="batch")
        self.folder = folder
        self.n = int(n)
        self.failure: BaseException | None = None
        self._reset(rank=0, capacity=self.n)

    def _reset(self, rank: int, capacity: int) -> None:
        self._rank, self._capacity = rank, capacity
        self._features: np.memmap | None = None
        self._count = 0
        self._rows: list[np.ndarray] = []
        self._bad: list[tuple[int, str]] = []
        self._nonfinite = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.folder = trainer.strategy.broadcast(self.folder, src=0)
        self._reset(trainer.global_rank, math.ceil(self.n / max(1, trainer.world_size)))

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._bad.extend((int(r), str(p)) for r, p in batch["bad"])
        features = prediction["features"]
        if features is None:
            return
        half = features.detach().to(torch.float16).cpu().numpy()
        if self._features is None:
            self._features = np.lib.format.open_memmap(
                os.path.join(self.folder, _part_name(self._rank, ".npy")),
                mode="w+",
                dtype=np.float16,
                shape=(self._capacity, half.shape[1]),
            )
        end = self._count + len(half)
        if end > self._capacity:
            raise HLSSError(f"embedding writer: rank {self._rank} got more than its share of rows")
        self._features[self._count : end] = half
        self._count = end
        self._nonfinite += int((~np.isfinite(half).all(axis=1)).sum())
        self._rows.append(prediction["rows"].detach().cpu().numpy().astype(np.int64))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dim = None
        if self._features is not None:
            dim = int(self._features.shape[1])
            self._features.flush()
            self._features = None
        rows = np.concatenate(self._rows) if self._rows else np.zeros(0, dtype=np.int64)
        np.save(os.path.join(self.folder, _part_name(self._rank, ".rows.npy")), rows)
        info = {"count": self._count, "dim": dim, "nonfinite": self._nonfinite, "bad": self._bad}
        with open(os.path.join(self.folder, _part_name(self._rank, ".json")), "w") as handle:
            json.dump(info, handle)
        trainer.strategy.barrier("embedding parts written")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.failure = exception
        self._features = None  # drop the memmap; the caller removes the folder


class PredictLogLines(Callback):
    """Periodic log lines of an embedding run whose output is not a terminal (Lightning's bar
    covers terminals): ``<desc> 1200/5000 patches (24%) | 410 patches/s | ETA 0:00:09``.

    Args:
        desc: what is embedded, e.g. ``"embedding val (step-0000100.ckpt)"``.
        n: the table's patches; global rank 0 counts its batches' patches (readable or not)
            times the world size.
        mode: see :func:`hlss.progress.progress_mode` (``None``: ``$HLSS_PROGRESS``/auto).
    """

    def __init__(self, desc: str, n: int, mode: str | None = "log"):
        self.desc, self.n, self.mode = desc, int(n), mode
        self.progress: Progress | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.progress = Progress(self.n, self.desc, "patches", mode=self.mode)

    def on_predict_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.progress is not None:
            done = (len(batch["rows"]) + len(batch["bad"])) * max(1, int(trainer.world_size))
            self.progress.advance_to(min(self.n, self.progress.n + done))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.progress is not None:
            self.progress.close(finished=False)
            self.progress = None


def _copy_rows(src: np.ndarray, dst: np.ndarray, positions: np.ndarray | None) -> None:
    """``dst[positions[i]] = src[i]`` (``positions=None``: ``dst[i] = src[i]``), chunk by chunk."""
    for start in range(0, len(src), _COPY_CHUNK):
        stop = min(len(src), start + _COPY_CHUNK)
        block = np.asarray(src[start:stop])
        if positions is None:
            dst[start:stop] = block
        else:
            dst[positions[start:stop]] = block


def merge_parts(folder: str) -> dict:
    """Join the part files of all ranks in ``folder`` into ``features.npy`` in table-row order.

    A row predicted by two ranks is kept once; part files are removed.

    Returns:
        ``{"rows": int64 [count] ascending table rows, "dim": int or None, "nonfinite": int,
        "bad": [(row, problem), ...] sorted by row}``; ``dim`` is ``None`` (and no features file
        is written) when no rank embedded any patch.
    """
    parts = sorted(f for f in os.listdir(folder) if f.startswith(".part-") and f.endswith(".json"))
    found = []
    for name in parts:
        stem = os.path.join(folder, name[: -len(".json")])
        with open(stem + ".json", encoding="utf-8") as handle:
            info = json.load(handle)
        found.append((stem, info, np.load(stem + ".rows.npy")))
    bad = sorted({(int(r), p) for _, info, _ in found for r, p in info["bad"]})
    nonfinite = sum(int(info["nonfinite"]) for _, info, _ in found)
    written = [(stem, info, rows) for stem, info, rows in found if info["count"]]
    all_rows = [rows for _, _, rows in written]
    rows = np.unique(np.concatenate(all_rows)) if all_rows else np.zeros(0, dtype=np.int64)
    dim = int(written[0][1]["dim"]) if written else None
    target = os.path.join(folder, FEATURES_NAME)
    single = len(written) == 1 and bool(np.all(np.diff(written[0][2]) > 0))  # rows ascending
    if single and written[0][1]["count"] == len(np.load(written[0][0] + ".npy", mmap_mode="r")):
        os.replace(written[0][0] + ".npy", target)  # one rank wrote every row in order
    elif written:
        dst = np.lib.format.open_memmap(target, mode="w+", dtype=np.float16, shape=(len(rows), dim))
        for stem, info, part_rows in written:
            src = np.load(stem + ".npy", mmap_mode="r")[: info["count"]]
            _copy_rows(src, dst, None if single else np.searchsorted(rows, part_rows))
            del src
        dst.flush()
        del dst
    for stem, _, _ in found:
        for suffix in (".npy", ".rows.npy", ".json"):
            if os.path.exists(stem + suffix):
                os.remove(stem + suffix)
    return {"rows": rows, "dim": dim, "nonfinite": nonfinite, "bad": bad}
