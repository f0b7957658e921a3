"""Schema of ``hlss-cache``'s primary config (``conf/cache.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CacheConfig:
    """``hlss-cache``: list the cache, or clear a kind of entry (see :mod:`hlss.cache_admin`)."""

    root: str | None = None
    clear: str | None = None
    older_than_days: float | None = None
    dry_run: bool = False


def register(store) -> None:
    """Store :class:`CacheConfig` as ``cache_schema``."""
    store.store(name="cache_schema", node=CacheConfig)
