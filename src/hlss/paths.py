"""Where hlss keeps what it can recompute: one cache root, read at call time.

``$HLSS_CACHE`` when set, else ``~/.cache/hlss``; below it ``text/`` (attribute text
embeddings), ``embeddings/`` (evaluation embeddings) and the generated synthetic datasets.
"""

from __future__ import annotations

import os


def cache_root() -> str:
    """``$HLSS_CACHE`` if set, else ``~/.cache/hlss`` (user-expanded, not created)."""
    return os.path.expanduser(os.environ.get("HLSS_CACHE") or os.path.join("~", ".cache", "hlss"))


def cache_dir(kind: str | None = None) -> str:
    """A folder below :func:`cache_root`: ``cache_dir("text")`` -> ``<root>/text``."""
    root = cache_root()
    return os.path.join(root, kind) if kind else root
