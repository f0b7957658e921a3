"""Which hlss produced a run or an export (version and source commit), found in one place."""

from __future__ import annotations

import os
import subprocess
from typing import Any


def provenance() -> dict:
    """The running hlss: version, git commit of its source tree (when it is a checkout of hlss,
    not an installed copy inside another repository) and whether that tree has uncommitted
    changes under ``src/``."""
    import hlss

    package = os.path.dirname(os.path.abspath(hlss.__file__))
    out: dict[str, Any] = {"version": hlss.__version__, "git_commit": None, "git_dirty": None}

    def git(*args: str, cwd: str = package) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.SubprocessError):
            return None

    found = git("rev-parse", "--show-toplevel")
    if found is None or found.returncode != 0:
        return out
    top = found.stdout.strip()
    if os.path.realpath(os.path.join(top, "src", "hlss")) != os.path.realpath(package):
        return out  # an installed copy inside some other repository
    head = git("rev-parse", "HEAD", cwd=top)
    dirty = git("status", "--porcelain", "--", "src", cwd=top)
    out["git_commit"] = head.stdout.strip() if head and head.returncode == 0 else None
    out["git_dirty"] = bool(dirty.stdout.strip()) if dirty and dirty.returncode == 0 else None
    return out
