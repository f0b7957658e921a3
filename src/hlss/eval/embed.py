"""Embedding extraction for evaluation, streamed to disk and cached across runs.

:func:`embed_table` runs a model over every patch of a :class:`~hlss.data.table.PatchTable` (base
transform only) with Lightning's ``Trainer.predict`` and writes an *embedding set*, a folder with

* ``features.npy``: ``float16 [n, d]``, row ``i`` the embedding of ``index.csv`` row ``i``;
* ``index.csv``: ``row, patient, slide, path, label, label_index, split`` (``row`` = the patch's
  position in the embedded table);
* ``manifest.json``: ``source, dim, count, dtype, classes, checkpoint, created, bad_count,
  bad_files`` and a few more provenance fields.

Lightning brings the device (CPU, one or several GPUs), the precision and a progress bar (shown
when stderr is a terminal; otherwise :class:`~hlss.eval.embed_writer.PredictLogLines` prints
periodic log lines); :class:`~hlss.eval.embed_writer.EmbeddingWriter` streams each batch
straight into a memory-mapped ``.npy`` (never all features in RAM as float32), inside a
temporary sibling folder that is renamed into place at the end, so an interrupted run never
leaves a half-written set. Unreadable patches are skipped, listed in the manifest and left out
of ``features``/``index``.

:func:`cached_embeddings` keys a set by checkpoint content, embedding source, split, table and
transform (:func:`~hlss.eval.embed_cache.cache_key`) under ``<cache>/embeddings/<key>/`` and
builds the model only on a cache miss.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hlss.atomic import publish_dir, temp_dir_beside
from hlss.data.io import load_patch
from hlss.data.table import PatchTable
from hlss.devices import resolve_device
from hlss.errors import ConfigError, DataError, HLSSError
from hlss.eval.embed_cache import (
    DEFAULT_PRECISION,
    FORMAT_VERSION,
    cache_key,
    describe_transform,
    file_sha256,
    table_fingerprint,
)
from hlss.eval.embed_writer import (
    FEATURES_NAME,
    EmbeddingWriter,
    PatchEmbedder,
    PredictLogLines,
    merge_parts,
)
from hlss.paths import cache_root
from hlss.progress import progress_mode

__all__ = [
    "EmbeddingSet",
    "PatchDataset",
    "cache_key",
    "cached_embeddings",
    "collate_patches",
    "default_cache_root",
    "embed_table",
    "file_sha256",
    "load_embedding_set",
    "table_fingerprint",
]

log = logging.getLogger(__name__)

INDEX_NAME = "index.csv"
MANIFEST_NAME = "manifest.json"
INDEX_COLUMNS = ("row", "patient", "slide", "path", "label", "label_index", "split")
MAX_LISTED_BAD = 1000  # bad files listed by name in the manifest (all are counted)
_STR_COLUMNS = {c: str for c in ("patient", "slide", "path", "label", "split")}
# Lightning loggers whose INFO lines (GPU/TPU available, LOCAL_RANK ...) are muted while embedding
_LIGHTNING_LOGGERS = (
    "lightning.pytorch",
    "lightning.fabric",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
)


# ----------------------------------------------------------------------------------------------
# dataset


class PatchDataset(Dataset):
    """Every patch of a table as one item, read and base-transformed.

    Args:
        table: the patches (``table.modality`` decides how files are checked).
        transform: raw patch ``[C, H, W]`` -> float image ``[3, H', W']`` (e.g.
            :class:`hlss.data.transforms.BaseTransform`); must be picklable for worker processes.

    Item ``i`` is ``(image, i, problem)``: ``image`` a float tensor ``[3, H', W']`` and
    ``problem`` ``None``, or, for a file that is missing, unreadable or malformed, ``image``
    ``None`` and ``problem`` the one-line reason. A bad file never raises and is never retried,
    so iteration always ends; :func:`collate_patches` separates the bad items from the good.
    """

    def __init__(self, table: PatchTable, transform: Callable[[Any], torch.Tensor]):
        self.paths = table.frame["path"].astype(str).tolist()
        self.modality = table.modality
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str | None]:
        path = self.paths[i]
        try:
            image = self.transform(load_patch(path, self.modality))
        except DataError as err:  # BadPatchError (file) or DataError (transform input check)
            return None, int(i), str(err).strip().splitlines()[0] if str(err).strip() else path
        return image, int(i), None


def collate_patches(items: list[tuple[torch.Tensor | None, int, str | None]]) -> dict:
    """Batch :class:`PatchDataset` items.

    Returns:
        ``{"images": [k, 3, H, W] or None, "rows": LongTensor [k], "bad": [(row, problem)],
        "error": None or str}`` with ``k`` the readable items. ``error`` reports images of
        different sizes (it is raised in the main process, where it reads as one line).
    """
    good = [(x, i) for x, i, _ in items if x is not None]
    bad = [(i, p) for x, i, p in items if x is None]
    rows = torch.tensor([i for _, i in good], dtype=torch.long)
    images, error = None, None
    if good:
        shapes = {tuple(x.shape) for x, _ in good}
        if len(shapes) == 1:
            images = torch.stack([x for x, _ in good])
        else:
            error = f"patches of different sizes in one batch ({sorted(shapes)[:3]})"
    return {"images": images, "rows": rows, "bad": bad, "error": error}


# ----------------------------------------------------------------------------------------------
# embedding sets


@dataclass
class EmbeddingSet:
    """Embeddings of a table's readable patches.

    Attributes:
        features: ``float16 [n, d]`` (a read-only memmap when loaded from disk); row ``i``
            belongs to ``index`` row ``i``.
        index: ``n`` rows with columns ``row, patient, slide, path, label, label_index, split``.
        classes: class names; ``label_index`` indexes into them.
        manifest: the set's ``manifest.json`` content.
        path: the folder the set lives in.
    """

    features: np.ndarray
    index: pd.DataFrame
    classes: tuple[str, ...]
    manifest: dict = field(default_factory=dict)
    path: str | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """Embedding width ``d``."""
        return int(self.features.shape[1])

    @property
    def labels(self) -> np.ndarray:
        """Class index per row, ``int64 [n]``."""
        return self.index["label_index"].to_numpy(dtype=np.int64)


def load_embedding_set(path: str) -> EmbeddingSet:
    """Open an embedding set folder written by :func:`embed_table` (features memory-mapped).

    Raises:
        HLSSError: the folder is not an embedding set, or its files are unreadable or disagree
            (row counts, width, dtype).
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise HLSSError(f"{path}: not an embedding set (no {MANIFEST_NAME})")
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        index = pd.read_csv(
            os.path.join(path, INDEX_NAME), dtype=_STR_COLUMNS, keep_default_na=False
        )
        features = np.load(os.path.join(path, FEATURES_NAME), mmap_mode="r")
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HLSSError(f"{path}: unreadable embedding set ({first})") from None
    count, dim = manifest.get("count"), manifest.get("dim")
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise HLSSError(f"{path}: {INDEX_NAME} lacks column(s) {', '.join(missing)}")
    if features.ndim != 2 or features.shape != (count, dim) or len(index) != count:
        raise HLSSError(
            f"{path}: inconsistent embedding set (features {features.shape}, "
            f"{len(index)} index rows, manifest count={count} dim={dim})"
        )
    if features.dtype != np.float16:
        raise HLSSError(f"{path}: features are {features.dtype}, expected float16")
    return EmbeddingSet(features, index, tuple(manifest.get("classes", ())), manifest, path)


# ----------------------------------------------------------------------------------------------
# extraction


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Mute Lightning's INFO chatter (GPU/TPU banner, tips) and its ``PossibleUserWarning`` (few
    workers, GPU not used) inside the block only; warnings and errors of other kinds still show.

    Also muted: torch's ``FutureWarning`` about ``LeafSpec``, which Lightning's own pytree helper
    triggers (nothing a user can act on)."""
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PossibleUserWarning)
        warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
        try:
            for lg in loggers:
                if lg.getEffectiveLevel() < logging.WARNING:
                    lg.setLevel(logging.WARNING)
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _trainer(
    device: str | torch.device | None,
    devices: int | str | list[int],
    precision: str,
    strategy: str,
    progress_bar: bool | None,
    writer: EmbeddingWriter,
    callbacks: Sequence[Any] = (),
):
    """A predict-only ``Trainer``: ``device`` -> accelerator (``"cuda:1"`` -> ``devices=[1]``);
    Lightning's bar when ``progress_bar`` (``None``: :func:`hlss.progress.progress_mode` is
    ``bar``, i.e. stderr is a terminal); ``callbacks`` run beside ``writer``."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch import Trainer

    try:
        dev = resolve_device(device)
        if dev.type == "cuda" and dev.index is not None:
            devices = [dev.index]
        return Trainer(
            accelerator=dev.type,
            devices=devices,
            strategy=strategy,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress_mode() == "bar" if progress_bar is None else progress_bar,
            callbacks=[writer, *callbacks],
            inference_mode=True,
        )
    except (MisconfigurationException, RuntimeError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"embed device={device!r} devices={devices!r} precision={precision!r}: {first}"
        ) from None


def _predict(trainer, module: PatchEmbedder, loader: DataLoader, writer: EmbeddingWriter) -> None:
    """``trainer.predict`` that lets a Ctrl+C surface as ``KeyboardInterrupt`` (Lightning turns
    it into ``SystemExit(1)`` and ignores SIGINT from then on)."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    except SystemExit:
        if isinstance(writer.failure, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)


def _progress_desc(
    table: PatchTable, checkpoint: str | None, extra: Mapping[str, Any] | None
) -> str:
    """``embedding <split> (<checkpoint file>)``, or the table's name when no split is known."""
    split = (extra or {}).get("split")
    what = f"embedding {split}" if split else f"embedding {table.name}"
    return f"{what} ({os.path.basename(checkpoint)})" if checkpoint else what


def embed_table(
    model: nn.Module,
    table: PatchTable,
    transform: Callable[[Any], torch.Tensor],
    out_dir: str,
    source: str = "backbone",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    *,
    checkpoint: str | None = None,
    extra: Mapping[str, Any] | None = None,
    devices: int | str | list[int] = 1,
    precision: str = DEFAULT_PRECISION,
    strategy: str = "auto",
    progress_bar: bool | None = None,
) -> EmbeddingSet:
    """Embed every readable patch of ``table`` into a new embedding set folder ``out_dir``.

    Runs ``Trainer.predict`` with the model in eval mode under :func:`torch.inference_mode`:
    each batch ``[B, 3, H, W]`` gives ``model.embed(x, source)`` ``[B, d]`` (a model without
    ``embed`` is called directly, ``source="backbone"`` only), stored as float16 in
    ``features.npy`` in table order. The model's device and train/eval mode are restored
    afterwards.

    Args:
        model: e.g. a :class:`~hlss.models.dual_encoder.DualEncoder`.
        table: the patches to embed (all rows; take ``table.subset(split)`` first).
        transform: the base transform (no augmentation).
        out_dir: the folder to create; it must not exist yet (nothing is overwritten).
        source: ``"backbone"``, ``"text_space"``, ``"head"`` or a level name (see
            ``DualEncoder.embed``).
        batch_size, num_workers: data loading.
        device: where the model runs: ``None``/``"auto"`` -> CUDA when available, else CPU;
            the device type is the Lightning accelerator (``"cuda:1"`` selects GPU 1).
        checkpoint: recorded in the manifest (the checkpoint the model came from).
        extra: further manifest fields (e.g. a cache key).
        devices, strategy: Lightning's (e.g. ``devices=4`` embeds on four GPUs).
        precision: Lightning's (e.g. ``"bf16-mixed"``); features are stored as float16 anyway.
        progress_bar: ``True`` shows Lightning's bar, ``False`` nothing; ``None`` follows
            :func:`hlss.progress.progress_mode` (``$HLSS_PROGRESS``; auto: the bar when stderr
            is a terminal, else periodic log lines naming ``split`` of ``extra`` and the
            checkpoint).

    Returns:
        The written set (features memory-mapped from ``out_dir``).

    Raises:
        HLSSError: ``table`` is empty, ``out_dir`` exists, no patch is readable, patches differ
            in size (set the transform's ``size``), the model output is not ``[B, d]``, or
            ``source`` is not offered by the model or the device settings are invalid
            (``ConfigError``). Anything the model raises propagates; a Ctrl+C is a
            ``KeyboardInterrupt``. On any error the temporary folder is removed and ``out_dir``
            is not created.
    """
    n = len(table)
    if n == 0:
        raise HLSSError(f"{table.name}: no patches to embed")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    target = os.path.abspath(os.path.expanduser(str(out_dir)))
    if os.path.exists(target):
        raise HLSSError(f"{target}: already exists; embeddings are never written over it")
    frame = table.frame
    module = PatchEmbedder(model, source, frame["path"].astype(str).tolist())
    tmp = temp_dir_beside(target)
    writer = EmbeddingWriter(tmp, n)
    log_lines = progress_bar is None and progress_mode() == "log"
    lines = [PredictLogLines(_progress_desc(table, checkpoint, extra), n)] if log_lines else []
    was_training = model.training
    param = next(iter(model.parameters()), None)
    home = param.device if param is not None else None
    try:
        with _quiet_lightning():
            trainer = _trainer(device, devices, precision, strategy, progress_bar, writer, lines)
            loader = DataLoader(
                PatchDataset(table, transform),
                batch_size=int(batch_size),
                shuffle=False,
                num_workers=int(num_workers),
                collate_fn=collate_patches,
                pin_memory=trainer.strategy.root_device.type == "cuda",
            )
            _predict(trainer, module, loader, writer)
        if writer.folder != tmp:  # a rank > 0 of a multi-process run wrote into rank 0's folder
            shutil.rmtree(tmp, ignore_errors=True)
            trainer.strategy.barrier("embeddings published")
            return load_embedding_set(target)
        parts = merge_parts(tmp)
        bad, rows = parts["bad"], parts["rows"]
        if parts["dim"] is None:
            first_bad = f"; first: {bad[0][1]}" if bad else ""
            raise HLSSError(f"{table.name}: none of its {n} patches could be read{first_bad}")
        index = frame.iloc[rows][["patient", "slide", "path", "label", "split"]].copy()
        index.insert(0, "row", rows)
        index.insert(5, "label_index", table.label_index[rows])
        index.to_csv(os.path.join(tmp, INDEX_NAME), index=False)
        if bad:
            log.warning(
                "%s: skipped %d unreadable patch(es) of %d; first: %s",
                table.name,
                len(bad),
                n,
                bad[0][1],
            )
        if parts["nonfinite"]:
            log.warning(
                "%s: %d embedding(s) are not finite in float16", table.name, parts["nonfinite"]
            )
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "dim": parts["dim"],
            "count": len(rows),
            "dtype": "float16",
            "classes": list(table.classes),
            "checkpoint": checkpoint,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "table": table.name,
            "table_rows": n,
            "modality": table.modality,
            "transform": describe_transform(transform),
            "model": type(model).__name__,
            "device": str(trainer.strategy.root_device),
            "devices": trainer.num_devices,
            "precision": str(trainer.precision),
            "bad_count": len(bad),
            "bad_files": [
                {"row": int(r), "path": str(frame["path"].iat[int(r)]), "problem": p}
                for r, p in bad[:MAX_LISTED_BAD]
            ],
            "nonfinite_rows": parts["nonfinite"],
            **dict(extra or {}),
        }
        with open(os.path.join(tmp, MANIFEST_NAME), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1, default=str)
        # another process may have published the same folder first: keep theirs if it is whole
        if not publish_dir(tmp, target) and not os.path.isfile(os.path.join(target, MANIFEST_NAME)):
            raise HLSSError(f"{target}: cannot move embeddings into place")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
        if home is not None:
            model.to(home)
    trainer.strategy.barrier("embeddings published")
    return load_embedding_set(target)


# ----------------------------------------------------------------------------------------------
# cache


def default_cache_root() -> str:
    """The cache root, :func:`hlss.paths.cache_root` (``$HLSS_CACHE`` or ``~/.cache/hlss``)."""
    return cache_root()


def cached_embeddings(
    model_or_factory: nn.Module | Callable[[], Any],
    ckpt_path: str | None,
    table: PatchTable,
    transform: Callable[[Any], torch.Tensor],
    split: str | None,
    source: str = "backbone",
    cache_dir: str | None = None,
    *,
    cfg: Any = None,
    **kw: Any,
) -> EmbeddingSet:
    """Embeddings of one split of ``table``, computed once and reused from the cache.

    Args:
        model_or_factory: a model, or a no-argument callable that builds one (called only on a
            cache miss; it may return ``(model, info)`` as :func:`load_trained_model` does).
        ckpt_path: the checkpoint the model comes from; ``None`` for an untrained model (then
            ``cfg`` is required).
        table: the patch table; ``split`` selects its rows (``None``: all rows).
        transform: the base transform.
        split: ``"train"``, ``"val"`` or ``None``.
        source: embedding source, see :func:`embed_table`.
        cache_dir: cache root; ``None`` -> :func:`hlss.paths.cache_root`. Sets live in
            ``<cache_dir>/embeddings/<key>/`` (see :func:`cache_key`).
        cfg: the training config (keys the untrained model).
        **kw: ``batch_size``, ``num_workers``, ``device``, ``devices``, ``precision``,
            ``strategy``, ``progress_bar`` for :func:`embed_table` (``precision`` other than
            ``"32-true"`` is part of the key).

    Returns:
        The set (its ``manifest["cache_key"]`` is the folder name).

    Raises:
        HLSSError: see :func:`cache_key` and :func:`embed_table`; a factory that returns no
            module.
    """
    part = table.subset(split) if split is not None else table
    precision = kw.get("precision", DEFAULT_PRECISION)
    key, parts = cache_key(ckpt_path, part, transform, split, source, cfg=cfg, precision=precision)
    root = os.path.abspath(os.path.expanduser(str(cache_dir or cache_root())))
    target = os.path.join(root, "embeddings", key)
    if os.path.exists(target):
        try:
            found = load_embedding_set(target)
        except HLSSError as err:
            log.warning("discarding broken cached embeddings: %s", err)
            shutil.rmtree(target, ignore_errors=True)
        else:
            log.debug("embeddings from cache: %s", target)
            with contextlib.suppress(OSError):  # "last used" for hlss-cache, also on noatime mounts
                os.utime(os.path.join(target, "features.npy"))
            return found
    model = model_or_factory
    if not isinstance(model, nn.Module):
        model = model_or_factory()
        if isinstance(model, tuple):
            model = model[0]
        if not isinstance(model, nn.Module):
            raise HLSSError(f"embedding cache: model factory returned {type(model).__name__}")
    extra = {"cache_key": key, "cache_parts": parts, "split": split}
    return embed_table(
        model,
        part,
        transform,
        target,
        source=source,
        checkpoint=os.path.abspath(ckpt_path) if ckpt_path else None,
        extra=extra,
        **kw,
    )
