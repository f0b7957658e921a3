"""``hlss-cache``: list or clear the hlss cache (``$HLSS_CACHE`` or ``~/.cache/hlss``).

The keys, their defaults and comments are in ``conf/cache.yaml`` (``hlss-cache --help``)::

    hlss-cache                                        # every entry and the totals per kind
    hlss-cache clear=embeddings older_than_days=30 dry_run=true
"""

from __future__ import annotations

import datetime as _dt
import os

from hlss.cache_admin import KINDS, CacheEntry, Inventory, clear, scan, totals
from hlss.cli.common import run_config_command
from hlss.schemas.cache import CacheConfig

PROG = "hlss-cache"


def human_size(n: int) -> str:
    """``1536`` -> ``"1.5 KB"`` (powers of 1024)."""
    units, size, i = ("B", "KB", "MB", "GB", "TB"), float(n), 0
    while size >= 1024 and i < len(units) - 1:
        size, i = size / 1024, i + 1
    return f"{int(n)} B" if i == 0 else f"{size:.1f} {units[i]}"


def _row(e: CacheEntry) -> str:
    when = _dt.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
    what = e.checkpoint or e.name
    if e.partial:
        what += " (unfinished write)"
    rows = "-" if e.rows is None else str(e.rows)
    return (
        f"{e.kind:<10} {rows:>8} {human_size(e.size):>9}  {when}  "
        f"{e.split or '-':<5} {e.source or '-':<10} {what}"
    )


def _totals(entries) -> str:
    sums = totals(entries)
    parts = [f"{kind} {n} ({human_size(b)})" for kind, (n, b) in sums.items()]
    all_n = sum(n for n, _ in sums.values())
    all_b = sum(b for _, b in sums.values())
    return f"total {all_n} entries, {human_size(all_b)}: " + ", ".join(parts)


def format_listing(inventory: Inventory) -> str:
    """The table ``hlss-cache`` prints: one line per entry, then the totals per kind."""
    lines = [f"cache {inventory.root}"]
    if inventory.entries:
        lines.append(
            f"{'kind':<10} {'rows':>8} {'size':>9}  {'last used':<16}  "
            f"{'split':<5} {'source':<10} checkpoint / entry"
        )
        lines += [_row(e) for e in inventory.entries]
    lines.append(_totals(inventory.entries))
    if inventory.foreign:
        lines.append(f"not hlss's, left alone: {', '.join(inventory.foreign)}")
    lines.append(f"clear: {PROG} clear={'|'.join(KINDS)}|all [older_than_days=N] [dry_run=true]")
    return "\n".join(lines)


def format_cleared(inventory: Inventory, removed: list[CacheEntry], dry_run: bool) -> str:
    """What ``clear=...`` removed (or would remove), one line per entry and a total line."""
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {os.path.relpath(e.path, inventory.root)}" for e in removed]
    size = human_size(sum(e.size for e in removed))
    kept = len(inventory.entries) - len(removed)
    lines.append(f"{verb} {len(removed)} entries ({size}) from {inventory.root}; {kept} kept")
    return "\n".join(lines)


def cache(args: CacheConfig) -> None:
    """List the cache, or clear what ``args.clear`` selects; prints the result.

    Raises:
        HLSSError: an unknown ``clear`` value or a refused root.
    """
    if args.clear is None:  # typed: on the DictConfig, cfg.clear would be DictConfig.clear
        print(format_listing(scan(args.root)))
        return
    inventory, removed = clear(args.clear, args.root, args.older_than_days, args.dry_run)
    print(format_cleared(inventory, removed, args.dry_run))


def main(argv: list[str] | None = None) -> int:
    """Run ``hlss-cache`` with ``argv`` (default: the process's arguments); returns 0.

    Raises:
        SystemExit: status 2 with one ``error:`` line for bad input; status 0 after ``--help``.
    """
    return run_config_command(PROG, "cache", CacheConfig, cache, argv)


if __name__ == "__main__":
    raise SystemExit(main())
