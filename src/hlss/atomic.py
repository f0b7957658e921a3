"""Writing files and folders so that a kill never leaves a half-written one in place.

A file is written to a hidden temporary file in the same folder and renamed over the target
(``os.replace`` is atomic on one filesystem); a folder is built as a hidden sibling and renamed
into place. Temporary names start with ``.`` so globs over the real outputs skip them.

Permissions are the user's normal ones: files ``0o666 & ~umask``, folders ``0o777 & ~umask``
(``tempfile.mkstemp`` alone would leave ``0o600``, unreadable by colleagues on shared storage).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO

FILE_MODE = 0o666
DIR_MODE = 0o777


def _umask_from_proc() -> int | None:
    """The process umask from ``/proc/self/status`` (Linux >= 4.7), ``None`` where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


@functools.cache
def _umask_set_and_restore() -> int:
    """The umask read by setting and restoring it, once per process (another thread creating a
    file in that instant would get umask 0, so this is done once and remembered)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc``), else read
    once by set-and-restore and cached."""
    mask = _umask_from_proc()
    return _umask_set_and_restore() if mask is None else mask


def file_mode() -> int:
    """Mode of a new file: ``0o666 & ~umask`` (e.g. ``0o644`` under umask ``0o022``)."""
    return FILE_MODE & ~current_umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit flush, fsync and rename it to ``path``.

    The file gets :func:`file_mode` (the umask's permissions, as ``open`` would give). On any
    exception (including ``KeyboardInterrupt``) the temporary file is removed and ``path`` keeps
    its previous content. The folder of ``path`` is created when missing.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def temp_dir_beside(target: str) -> str:
    """Create and return a fresh hidden folder next to ``target`` (same filesystem), mode
    ``0o777 & ~umask`` (the published folder keeps it)."""
    parent, name = os.path.split(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp, DIR_MODE)  # the kernel applies the umask
    return tmp


def publish_dir(tmp: str, target: str) -> bool:
    """Rename the finished folder ``tmp`` to ``target``.

    Returns False (and removes ``tmp``) when ``target`` already exists with content, e.g. another
    process published the same cache entry first; an empty ``target`` folder is replaced.

    Raises:
        OSError: the rename failed for another reason (``tmp`` is left for the caller to remove).
    """
    try:
        os.rename(tmp, target)
        return True
    except OSError:
        if os.path.isdir(target) and not os.listdir(target):
            with contextlib.suppress(OSError):
                os.rmdir(target)
                os.rename(tmp, target)
                return True
        if os.path.exists(target):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
