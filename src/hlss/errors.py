"""User-facing errors.

Anything the user can fix (a file, a config key, a checkpoint) raises :class:`HLSSError` with one
line that names the offending object and the problem. Console scripts catch it, print the line to
stderr and exit with status 2, so users never see a traceback wall for bad input.
"""

from __future__ import annotations


class HLSSError(Exception):
    """An error caused by user input, reported as one clear line."""


class DataError(HLSSError):
    """A dataset, metadata file or patch file is missing or malformed."""


class BadPatchError(DataError):
    """One patch file cannot be read or has the wrong shape/dtype.

    ``BadPatchError(path, problem)``; ``BadPatchError(message)`` alone is the whole message
    (``path`` then empty), which is how a data-loader worker's error is raised again in the main
    process, so that it stays a user error there and is reported as one line.
    """

    def __init__(self, path: str, problem: str | None = None):
        if problem is None:
            self.path, self.problem = "", str(path)
            super().__init__(self.problem)
            return
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(HLSSError):
    """A configuration key has a value that cannot work."""
