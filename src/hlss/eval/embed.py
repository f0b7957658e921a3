"""Embedding extraction for evaluation, streamed to disk and cached across runs.

:func:`embed_table` runs a model over every patch of a :class:`~hlss.data.table.PatchTable` (base
transform only) and writes an *embedding set*, a folder with

* ``features.npy``: ``float16 [n, d]``, row ``i`` the embedding of ``index.csv`` row ``i``;
* ``index.csv``: ``row, patient, slide, path, label, label_index, split`` (``row`` = the patch's
  position in the embedded table);
* ``manifest.json``: ``source, dim, count, dtype, classes, checkpoint, created, bad_count,
  bad_files`` and a few more provenance fields.

Features go straight from each batch into a memory-mapped ``.npy`` (never all of them in RAM as
float32), inside a temporary sibling folder that is renamed into place at the end, so an
interrupted run never leaves a half-written set. Unreadable patches are skipped, listed in the
manifest and left out of ``features``/``index``.

:func:`cached_embeddings` keys a set by checkpoint content, embedding source, split, table and
transform under ``<cache>/embeddings/<key>/`` and builds the model only on a cache miss.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
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
from hlss.errors import ConfigError, DataError, HLSSError

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

FORMAT_VERSION = 1
FEATURES_NAME = "features.npy"
INDEX_NAME = "index.csv"
MANIFEST_NAME = "manifest.json"
INDEX_COLUMNS = ("row", "patient", "slide", "path", "label", "label_index", "split")
MAX_LISTED_BAD = 1000  # bad files listed by name in the manifest (all are counted)
_COPY_CHUNK = 65536  # rows per copy step when compacting features
_STR_COLUMNS = {c: str for c in ("patient", "slide", "path", "label", "split")}


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


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _embed(model: nn.Module, x: torch.Tensor, source: str) -> torch.Tensor:
    embed = getattr(model, "embed", None)
    if embed is not None:
        return embed(x, source)
    if source != "backbone":
        raise ConfigError(f"embed source {source!r}: a model without .embed offers 'backbone'")
    return model(x)


def _compact(path: str, count: int) -> None:
    """Shrink the ``.npy`` at ``path`` to its first ``count`` rows, chunk by chunk."""
    src = np.load(path, mmap_mode="r")
    tmp = path + ".compact.npy"
    dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(count, src.shape[1]))
    for start in range(0, count, _COPY_CHUNK):
        dst[start : start + _COPY_CHUNK] = src[start : min(count, start + _COPY_CHUNK)]
    dst.flush()
    del dst, src
    os.replace(tmp, path)


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
) -> EmbeddingSet:
    """Embed every readable patch of ``table`` into a new embedding set folder ``out_dir``.

    The model runs in eval mode under :func:`torch.inference_mode` on ``device`` (``None`` ->
    CUDA when available, else CPU); it is moved there in place and its train/eval mode is
    restored afterwards. Each batch ``[B, 3, H, W]`` gives ``model.embed(x, source)`` ``[B, d]``
    (a model without ``embed`` is called directly, ``source="backbone"`` only), stored as
    float16 in ``features.npy`` in table order.

    Args:
        model: e.g. a :class:`~hlss.models.dual_encoder.DualEncoder`.
        table: the patches to embed (all rows; take ``table.subset(split)`` first).
        transform: the base transform (no augmentation).
        out_dir: the folder to create; it must not exist yet (nothing is overwritten).
        source: ``"backbone"``, ``"text_space"``, ``"head"`` or a level name (see
            ``DualEncoder.embed``).
        batch_size, num_workers: data loading.
        device: where the model runs.
        checkpoint: recorded in the manifest (the checkpoint the model came from).
        extra: further manifest fields (e.g. a cache key).

    Returns:
        The written set (features memory-mapped from ``out_dir``).

    Raises:
        HLSSError: ``table`` is empty, ``out_dir`` exists, no patch is readable, patches differ
            in size (set the transform's ``size``), the model output is not ``[B, d]``, or
            ``source`` is not offered by the model (``ConfigError``). Anything the model raises
            propagates. On any error the temporary folder is removed and ``out_dir`` is not
            created.
    """
    n = len(table)
    if n == 0:
        raise HLSSError(f"{table.name}: no patches to embed")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    target = os.path.abspath(os.path.expanduser(str(out_dir)))
    if os.path.exists(target):
        raise HLSSError(f"{target}: already exists; embeddings are never written over it")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    dev = _resolve_device(device)
    tmp = temp_dir_beside(target)
    features_path = os.path.join(tmp, FEATURES_NAME)
    frame = table.frame
    was_training = model.training
    try:
        model.to(dev)
        model.eval()
        loader = DataLoader(
            PatchDataset(table, transform),
            batch_size=int(batch_size),
            shuffle=False,
            num_workers=int(num_workers),
            collate_fn=collate_patches,
            pin_memory=dev.type == "cuda",
        )
        feats = None
        pos = 0
        kept: list[np.ndarray] = []
        bad: list[tuple[int, str]] = []
        nonfinite = 0
        with torch.inference_mode():
            for batch in loader:
                bad.extend(batch["bad"])
                if batch["error"]:
                    first = int(batch["rows"][0])
                    raise HLSSError(
                        f"{frame['path'].iat[first]}: {batch['error']}; set the base "
                        "transform's size (dataset.transform.size) to crop them to one size"
                    )
                if batch["images"] is None:
                    continue
                x = batch["images"].to(dev, non_blocking=True)
                out = _embed(model, x, source)
                if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(x):
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)
                    raise HLSSError(
                        f"embed source {source!r}: expected [batch, dim] embeddings, got {shape}"
                    )
                half = out.detach().to(torch.float16).cpu().numpy()
                if feats is None:
                    feats = np.lib.format.open_memmap(
                        features_path, mode="w+", dtype=np.float16, shape=(n, half.shape[1])
                    )
                nonfinite += int((~np.isfinite(half).all(axis=1)).sum())
                feats[pos : pos + len(half)] = half
                pos += len(half)
                kept.append(batch["rows"].numpy())
        if feats is None:
            first = f"; first: {bad[0][1]}" if bad else ""
            raise HLSSError(f"{table.name}: none of its {n} patches could be read{first}")
        dim = int(feats.shape[1])
        feats.flush()
        del feats
        if pos < n:
            _compact(features_path, pos)

        rows = np.concatenate(kept)
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
        if nonfinite:
            log.warning("%s: %d embedding(s) are not finite in float16", table.name, nonfinite)
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "dim": dim,
            "count": int(pos),
            "dtype": "float16",
            "classes": list(table.classes),
            "checkpoint": checkpoint,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "table": table.name,
            "table_rows": n,
            "modality": table.modality,
            "transform": _describe(transform),
            "model": type(model).__name__,
            "device": str(dev),
            "bad_count": len(bad),
            "bad_files": [
                {"row": int(r), "path": str(frame["path"].iat[int(r)]), "problem": p}
                for r, p in bad[:MAX_LISTED_BAD]
            ],
            "nonfinite_rows": nonfinite,
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
    return load_embedding_set(target)


# ----------------------------------------------------------------------------------------------
# cache


def default_cache_root() -> str:
    """``$HLSS_CACHE`` if set, else ``~/.cache/hlss`` (read at call time)."""
    return os.path.expanduser(os.environ.get("HLSS_CACHE") or os.path.join("~", ".cache", "hlss"))


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's content, read in chunks.

    Remembered per process by ``(path, size, mtime)``, so evaluating train and val splits of one
    checkpoint reads it once; a rewritten file (new size or mtime) is hashed again.

    Raises:
        HLSSError: the file does not exist.
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    try:
        st = os.stat(path)
    except OSError:
        raise HLSSError(f"{path}: checkpoint not found") from None
    memo = (path, st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def table_fingerprint(table: PatchTable) -> str:
    """SHA-256 of what an embedding set's rows depend on: the classes, the modality and the
    ``patient, slide, path, label`` columns in order (patient and slide are stored in the index,
    so a table that regroups the same files gets a fresh set)."""
    frame = table.frame
    digest = hashlib.sha256()
    digest.update(json.dumps([list(table.classes), table.modality]).encode("utf-8"))
    for col in ("patient", "slide", "path", "label"):
        joined = frame[col].astype(str).str.cat(sep="\n")
        digest.update(f"\x00{col}\x00{len(frame)}\x00".encode())
        digest.update(joined.encode("utf-8"))
    return digest.hexdigest()


def _describe(transform: Any) -> str:
    """``repr`` without memory addresses (a default ``repr`` would defeat the cache)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


_MODEL_KEYS = ("backbone", "text_encoder", "model", "attributes")


def _untrained_identity(cfg: Any) -> dict:
    """What the initial weights of the model of a training config depend on."""
    from omegaconf import Container, DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    node = {}
    for k in _MODEL_KEYS:
        v = cfg.get(k)
        node[k] = OmegaConf.to_container(v, resolve=True) if isinstance(v, Container) else v
    if isinstance(node.get("attributes"), dict):
        node["attributes"].pop("cache_dir", None)  # where text embeddings are cached, not what
    loss = cfg.get("loss")
    node["loss_head"] = loss.get("head") if loss is not None else None
    text = json.dumps(node, sort_keys=True, default=str)
    return {
        "untrained": True,
        "config_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "seed": int(cfg.get("seed", 0) or 0),
    }


def cache_key(
    ckpt_path: str | None,
    table: PatchTable,
    transform: Any,
    split: str | None,
    source: str,
    cfg: Any = None,
) -> tuple[str, dict]:
    """The cache key of an embedding set and the parts it is made of.

    The model is identified by the SHA-256 of the checkpoint file's content (so a copied or
    moved checkpoint still hits, and an overwritten ``last.ckpt`` does not), or, without a
    checkpoint, by ``"untrained"`` + a hash of the model-defining config nodes (``backbone,
    text_encoder, model, attributes, loss.head``) + ``seed``. Also keyed: ``source``, ``split``,
    :func:`table_fingerprint` and the transform's ``repr``, modality and size.

    Raises:
        HLSSError: no checkpoint and no ``cfg``; a missing checkpoint file.
    """
    if ckpt_path is not None:
        model_id: dict = {"checkpoint_sha256": file_sha256(ckpt_path)}
    elif cfg is not None:
        model_id = _untrained_identity(cfg)
    else:
        raise HLSSError("embedding cache: an untrained model needs its config (cfg=) as key")
    parts = {
        "format_version": FORMAT_VERSION,
        "model": model_id,
        "source": source,
        "split": split,
        "table": table_fingerprint(table),
        "transform": {
            "repr": _describe(transform),
            "modality": getattr(transform, "modality", table.modality),
            "size": getattr(transform, "size", None),
        },
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32], parts


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
        cache_dir: cache root; ``None`` -> :func:`default_cache_root`. Sets live in
            ``<cache_dir>/embeddings/<key>/`` (see :func:`cache_key`).
        cfg: the training config (keys the untrained model).
        **kw: ``batch_size``, ``num_workers``, ``device`` for :func:`embed_table`.

    Returns:
        The set (its ``manifest["cache_key"]`` is the folder name).

    Raises:
        HLSSError: see :func:`cache_key` and :func:`embed_table`; a factory that returns no
            module.
    """
    part = table.subset(split) if split is not None else table
    key, parts = cache_key(ckpt_path, part, transform, split, source, cfg=cfg)
    root = os.path.abspath(os.path.expanduser(str(cache_dir or default_cache_root())))
    target = os.path.join(root, "embeddings", key)
    if os.path.exists(target):
        try:
            found = load_embedding_set(target)
        except HLSSError as err:
            log.warning("discarding broken cached embeddings: %s", err)
            shutil.rmtree(target, ignore_errors=True)
        else:
            log.info("embeddings from cache: %s", target)
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
