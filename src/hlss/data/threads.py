"""A pool of Python threads kept for an object's life, for the data path's CPU work.

:class:`KeptThreads` starts its ``ThreadPoolExecutor`` on first use and keeps it (starting
threads for every batch costs ~0.1 ms each); a copy or a pickled object (e.g. a dataset sent to
a loader worker) starts its own pool, and a process forked from the owner does too.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

__all__ = ["KeptThreads"]


class KeptThreads:
    """Python threads started on first use and kept (not per call); never pickled or copied.

    Args:
        name: the threads' name prefix (shown by profilers and ``py-spy``).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0
        self._pid = os.getpid()

    def pool(self, workers: int) -> ThreadPoolExecutor:
        """A pool of at least ``workers`` threads (a larger one replaces a smaller one)."""
        if self._pid != os.getpid():  # forked: the parent's threads do not exist here
            self._pool, self._size, self._pid = None, 0, os.getpid()
        if self._pool is None or self._size < workers:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix=self.name)
            self._size = workers
        return self._pool

    def __getstate__(self) -> dict:
        return {"name": self.name, "_pool": None, "_size": 0, "_pid": os.getpid()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()
