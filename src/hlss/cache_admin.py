"""What the hlss cache holds, and removing it: the logic of ``hlss-cache``.

The cache root (:func:`hlss.paths.cache_root`: ``$HLSS_CACHE`` or ``~/.cache/hlss``) holds three
kinds of entries, each safe to delete (it is recomputed on next use)::

    <root>/embeddings/<32 hex>/            evaluation embeddings of one checkpoint, split and
                                           source: features.npy (float16 [n, d]), index.csv,
                                           manifest.json (hlss.eval.embed)
    <root>/text/text-<64 hex>.pt           attribute / class-prompt text embeddings (hlss.models.text)
    <root>/opensrh-synthetic-<12 hex>/     a generated synthetic dataset (hlss.data.synthetic)

Hidden ``.<name>.partial-*`` folders and ``.<name>.*.tmp`` files are writes in progress or left
by a killed process; they are counted with their kind and removed only when older than a day.
Nothing else is ever deleted: not a name hlss does not write, not a symbolic link, not a path
that resolves outside the root; and a root that holds names hlss does not write is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hlss.errors import ConfigError, HLSSError
from hlss.paths import cache_root

KINDS = ("embeddings", "text", "synthetic")
CHOICES = (*KINDS, "all")
SYNTHETIC_PREFIX = "opensrh-synthetic-"  # hlss.data.synthetic.CACHE_PREFIX
PARTIAL_GRACE_S = 24 * 3600  # a younger partial write may belong to a running process
DAY_S = 24 * 3600

_EMBEDDING = re.compile(r"[0-9a-f]{32}")
_EMBEDDING_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial-.+")
_TEXT = re.compile(r"text-[0-9a-f]{64}\.pt")
_TEXT_PARTIAL = re.compile(r"\.text-[0-9a-f]{64}\.pt\..+\.tmp")
_SYNTHETIC = re.compile(re.escape(SYNTHETIC_PREFIX) + r"[0-9a-f]{12}")
_SYNTHETIC_PARTIAL = re.compile(r"\." + re.escape(SYNTHETIC_PREFIX) + r"[0-9a-f]{12}\.partial-.+")


@dataclass(frozen=True)
class CacheEntry:
    """One removable item of the cache.

    Attributes:
        kind: one of :data:`KINDS`.
        path: absolute path (a folder, or a file for ``text``).
        size: bytes of its files.
        last_used: seconds since the epoch: the later of access and modification time of the
            file a use reads (embeddings: ``features.npy``; text: the ``.pt``; synthetic:
            ``meta/opensrh.json``), at the filesystem's atime resolution (``relatime``: a day).
        rows: patches embedded (embeddings) or patch files (synthetic); ``None`` for text.
        checkpoint: the checkpoint embedded (``"untrained"`` for the initialisation), or None.
        split, source: of an embedding set, else None.
        partial: an unfinished write (hidden name).
    """

    kind: str
    path: str
    size: int
    last_used: float
    rows: int | None = None
    checkpoint: str | None = None
    split: str | None = None
    source: str | None = None
    partial: bool = False

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass(frozen=True)
class Inventory:
    """The entries under a root and the names there that hlss does not write.

    Attributes:
        root: the absolute cache root.
        entries: hlss's entries, by kind then name.
        foreign: paths (relative to ``root``) that are not hlss's; never touched.
    """

    root: str
    entries: tuple[CacheEntry, ...]
    foreign: tuple[str, ...]


def resolve_root(root: str | None = None) -> str:
    """``root`` (user-expanded, absolute) or :func:`hlss.paths.cache_root`."""
    return os.path.abspath(os.path.expanduser(str(root) if root else cache_root()))


def _size(path: str) -> int:
    """Bytes of a file, or of every file below a folder (links are not followed)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_size
    return sum(
        os.lstat(os.path.join(folder, name)).st_size
        for folder, _, names in os.walk(path)
        for name in names
    )


def _used(path: str, fallback: str) -> float:
    """``max(atime, mtime)`` of ``path``, or ``fallback``'s mtime when ``path`` is missing."""
    try:
        st = os.stat(path)
        return max(st.st_atime, st.st_mtime)
    except OSError:
        return os.lstat(fallback).st_mtime


def _embedding(path: str, partial: bool) -> CacheEntry:
    """An ``embeddings/<key>`` folder; its manifest (when readable) gives rows, split, ..."""
    last_used = _used(os.path.join(path, "features.npy"), path)  # before reading anything
    manifest: dict = {}
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        pass
    model = (manifest.get("cache_parts") or {}).get("model") or {}
    checkpoint = manifest.get("checkpoint") or ("untrained" if model.get("untrained") else None)
    return CacheEntry(
        "embeddings",
        path,
        _size(path),
        last_used,
        rows=manifest.get("count"),
        checkpoint=checkpoint,
        split=manifest.get("split"),
        source=manifest.get("source"),
        partial=partial,
    )


def _synthetic(path: str, partial: bool) -> CacheEntry:
    """An ``opensrh-synthetic-<hash>`` folder; rows count its ``.tif`` patch files."""
    last_used = _used(os.path.join(path, "meta", "opensrh.json"), path)
    rows = sum(name.endswith(".tif") for _, _, names in os.walk(path) for name in names)
    return CacheEntry("synthetic", path, _size(path), last_used, rows=rows, partial=partial)


def _text(path: str, partial: bool) -> CacheEntry:
    return CacheEntry("text", path, _size(path), _used(path, path), partial=partial)


def _scan_folder(
    root: str, sub: str, patterns: Sequence[tuple[re.Pattern, bool, object]]
) -> tuple[list[CacheEntry], list[str]]:
    """Entries of ``<root>/<sub>`` matching ``patterns`` (``(regex, partial, reader)``; a
    ``None`` reader: a known name that is no entry); other names and symbolic links are foreign."""
    folder = os.path.join(root, sub) if sub else root
    entries, foreign = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        found = next((p for p in patterns if p[0].fullmatch(name)), None)
        if found is None or os.path.islink(path):
            foreign.append(os.path.join(sub, name) if sub else name)
            continue
        if found[2] is not None:
            entries.append(found[2](path, found[1]))
    return entries, foreign


def scan(root: str | None = None) -> Inventory:
    """List the cache at ``root`` (default :func:`resolve_root`); a missing root is empty.

    Raises:
        HLSSError: ``root`` exists but is not a folder.
    """
    root = resolve_root(root)
    if not os.path.exists(root):
        return Inventory(root, (), ())
    if not os.path.isdir(root):
        raise HLSSError(f"cache root {root}: not a folder")
    entries, foreign = _scan_folder(
        root,
        "",
        [
            (_SYNTHETIC, False, _synthetic),
            (_SYNTHETIC_PARTIAL, True, _synthetic),
            (re.compile("embeddings|text"), False, None),  # the folders scanned below
        ],
    )
    kinds = {
        "embeddings": [(_EMBEDDING, False, _embedding), (_EMBEDDING_PARTIAL, True, _embedding)],
        "text": [(_TEXT, False, _text), (_TEXT_PARTIAL, True, _text)],
    }
    for sub, patterns in kinds.items():
        path = os.path.join(root, sub)
        if os.path.isdir(path) and not os.path.islink(path):
            found, other = _scan_folder(root, sub, patterns)
            entries += found
            foreign += other
        elif os.path.lexists(path):
            foreign.append(sub)
    entries.sort(key=lambda e: (KINDS.index(e.kind), e.name))
    return Inventory(root, tuple(entries), tuple(sorted(foreign)))


def totals(entries: Iterable[CacheEntry]) -> dict[str, tuple[int, int]]:
    """``{kind: (entries, bytes)}`` for every kind of :data:`KINDS` (zeros included)."""
    out = {kind: (0, 0) for kind in KINDS}
    for e in entries:
        count, size = out[e.kind]
        out[e.kind] = (count + 1, size + e.size)
    return out


def check_root(inventory: Inventory) -> None:
    """Refuse to delete in a folder that is not an hlss cache.

    Raises:
        HLSSError: the root is the filesystem root or the home folder, or holds names that hlss
            does not write (``HLSS_CACHE`` pointing at a folder of other files).
    """
    root = os.path.realpath(inventory.root)
    if root in (os.path.realpath(os.sep), os.path.realpath(os.path.expanduser("~"))):
        raise HLSSError(f"cache root {inventory.root}: not a cache folder; refusing to clear")
    top = sorted({name.split(os.sep)[0] for name in inventory.foreign})
    if top and any(name not in ("embeddings", "text") for name in top):
        shown = ", ".join(top[:5]) + (", ..." if len(top) > 5 else "")
        raise HLSSError(
            f"cache root {inventory.root} does not look like an hlss cache (it holds {shown}); "
            "refusing to clear: set HLSS_CACHE or root= to the cache folder"
        )


def select(
    entries: Iterable[CacheEntry], what: str, older_than_days: float | None, now: float
) -> list[CacheEntry]:
    """The entries ``clear=what`` removes: of kind ``what`` (or all), not used within
    ``older_than_days`` (``None``: any age); partial writes only when older than a day.

    Raises:
        ConfigError: ``what`` is not one of :data:`CHOICES`, or ``older_than_days < 0``.
    """
    if what not in CHOICES:
        raise ConfigError(f"clear={what}: expected one of {', '.join(CHOICES)}")
    if older_than_days is not None and float(older_than_days) < 0:
        raise ConfigError(f"older_than_days={older_than_days}: must be >= 0")
    chosen = []
    for e in entries:
        age = now - e.last_used
        if what != "all" and e.kind != what:
            continue
        if older_than_days is not None and age < float(older_than_days) * DAY_S:
            continue
        if e.partial and age < PARTIAL_GRACE_S:
            continue
        chosen.append(e)
    return chosen


def _inside(root: str, path: str) -> bool:
    """``path`` resolves strictly below ``root``."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return real != real_root and os.path.commonpath([real_root, real]) == real_root


def remove(root: str, entries: Iterable[CacheEntry]) -> list[CacheEntry]:
    """Delete ``entries`` (folders recursively, without following links) below ``root``.

    Returns:
        The entries removed (an entry that vanished meanwhile is skipped).

    Raises:
        HLSSError: an entry is a link or resolves outside ``root`` (nothing of it is touched).
    """
    removed = []
    for e in entries:
        if os.path.islink(e.path) or not _inside(root, e.path):
            raise HLSSError(f"{e.path}: outside the cache root {root}; not removed")
        try:
            if os.path.isdir(e.path):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
        except FileNotFoundError:
            continue
        removed.append(e)
    return removed


def clear(
    what: str,
    root: str | None = None,
    older_than_days: float | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> tuple[Inventory, list[CacheEntry]]:
    """Remove the cache entries ``clear=what`` selects (see :func:`select`).

    Returns:
        ``(inventory before, entries removed or, with dry_run, that would be)``.

    Raises:
        ConfigError: a bad ``what`` or ``older_than_days``.
        HLSSError: see :func:`check_root` and :func:`remove`.
    """
    inventory = scan(root)
    chosen = select(inventory.entries, what, older_than_days, time.time() if now is None else now)
    check_root(inventory)
    if dry_run:
        return inventory, chosen
    return inventory, remove(inventory.root, chosen)
