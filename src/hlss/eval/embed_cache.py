"""Content-addressed keys of embedding sets: what an extraction's result depends on.

A set is keyed by the model (the checkpoint file's content, or the config of an untrained
model), the embedding source, the split, the table's rows and the transform. The folder
``<cache>/embeddings/<key>/`` then holds the set (see :mod:`hlss.eval.embed`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from hlss.data.table import PatchTable
from hlss.errors import HLSSError

__all__ = ["FORMAT_VERSION", "cache_key", "describe_transform", "file_sha256", "table_fingerprint"]

FORMAT_VERSION = 1  # of the embedding set folder; part of every key
DEFAULT_PRECISION = "32-true"  # keys of sets computed at another precision name theirs

_DIGESTS: dict[tuple[str, int, int], str] = {}
_MODEL_KEYS = ("backbone", "text_encoder", "model", "attributes")


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


def describe_transform(transform: Any) -> str:
    """``repr`` without memory addresses (a default ``repr`` would defeat the cache)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def _untrained_identity(cfg: Any) -> dict:
    """What the initial weights of the model of a training config depend on."""
    from omegaconf import Container, DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    node = {}
    for k in _MODEL_KEYS:
        v = cfg.get(k)
        node[k] = OmegaConf.to_container(v, resolve=True) if isinstance(v, Container) else v
    if isinstance(node.get("model"), dict):
        node["model"].pop("text_cache_dir", None)  # where text embeddings are cached, not what
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
    *,
    precision: str = DEFAULT_PRECISION,
) -> tuple[str, dict]:
    """The cache key of an embedding set and the parts it is made of.

    The model is identified by the SHA-256 of the checkpoint file's content (so a copied or
    moved checkpoint still hits, and an overwritten ``last.ckpt`` does not), or, without a
    checkpoint, by ``"untrained"`` + a hash of the model-defining config nodes (``backbone,
    text_encoder, model, attributes, loss.head``) + ``seed``. Also keyed: ``source``, ``split``,
    :func:`table_fingerprint`, the transform's ``repr``, modality and size, and the Lightning
    ``precision`` when it is not ``"32-true"`` (so full-precision keys stay what they were).

    Returns:
        ``(key, parts)``: a 32-hex-digit key and the dict it hashes.

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
            "repr": describe_transform(transform),
            "modality": getattr(transform, "modality", table.modality),
            "size": getattr(transform, "size", None),
        },
    }
    if str(precision) != DEFAULT_PRECISION:
        parts["precision"] = str(precision)
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32], parts
