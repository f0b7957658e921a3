"""Judging many patch files, in order, with bounded memory and optional worker processes.

The dataset validator checks up to ~300k files (the real OpenSRH); each is read, judged by
:func:`hlss.data.io.inspect_patch` and only its verdict is kept. Progress (files checked, rate,
ETA) is shown per chunk through :class:`hlss.progress.Progress`: a bar on a terminal, periodic
log lines otherwise.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

from hlss.data.io import PatchVerdict, inspect_patch
from hlss.progress import Progress

CHUNK_SIZE = 64
"""Paths per task handed to a worker."""

IN_FLIGHT_PER_WORKER = 4
"""Chunks queued per worker at most: memory stays bounded for any number of files."""


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _inspect_chunk(chunk: Sequence[str]) -> list[PatchVerdict]:
    """Verdicts of a chunk of paths (module level, so worker processes can run it)."""
    return [inspect_patch(p) for p in chunk]


def inspect_many(
    paths: Sequence[str],
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    inspect: Callable[[str], tuple] = inspect_patch,
) -> Iterator[tuple]:
    """Yield the verdict of every path, in the order of ``paths``, showing progress
    (``checking patch files``) as :class:`hlss.progress.Progress` does.

    Args:
        paths: absolute file paths.
        workers: 0 judges in the calling process; ``> 0`` in that many worker processes (TIFF
            parsing holds the GIL, so threads would not help).
        progress: optional ``callback(done, total)`` called after each chunk as well.
        inspect: the judge (default :func:`hlss.data.io.inspect_patch`); another one (tests) runs
            in threads when ``workers > 0``, as it need not be picklable.
    """
    total = len(paths)
    with Progress(total, "checking patch files", "files") as shown:
        for n, verdicts in _chunk_verdicts(paths, workers, inspect):
            yield from verdicts
            shown.update(n)
            if progress:
                progress(shown.n, total)


def _chunk_verdicts(
    paths: Sequence[str], workers: int, inspect: Callable[[str], tuple]
) -> Iterator[tuple[int, list]]:
    """``(chunk length, verdicts)`` of every chunk of ``paths``, in order."""

    def run_chunk(chunk: Sequence[str]) -> list:
        return [inspect(p) for p in chunk]

    if workers <= 0:
        for chunk in _chunks(paths, CHUNK_SIZE):
            yield len(chunk), run_chunk(chunk)
        return
    pool: Executor
    if inspect is inspect_patch:
        pool, task = ProcessPoolExecutor(max_workers=workers), _inspect_chunk
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hlss-validate")
        task = run_chunk
    with pool:
        pending: deque = deque()
        chunks = iter(_chunks(paths, CHUNK_SIZE))
        for chunk in chunks:
            pending.append((len(chunk), pool.submit(task, chunk)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                break
        while pending:
            n, future = pending.popleft()
            yield n, future.result()
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append((len(nxt), pool.submit(task, nxt)))
