"""Run a console script the way a user does: the installed script of this environment, from a
working directory of the test's choosing, output captured (not a terminal)."""

from __future__ import annotations

import os
import subprocess
import sys

# What Hydra would leave in the working directory if a command let it write its own files.
HYDRA_LEFTOVERS = ("outputs", "multirun", ".hydra")


def console(name: str, *args: str, cwd: str | os.PathLike, timeout: float = 180):
    """Run ``.venv/bin/<name> args...`` in ``cwd``; returns the ``CompletedProcess`` (text)."""
    script = os.path.join(os.path.dirname(sys.executable), name)
    assert os.path.isfile(script), f"{script}: console script not installed"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [script, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def one_error_line(proc) -> str:
    """The single ``error:`` line of a refused command (exit 2, no traceback, nothing else)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def hydra_leftovers(cwd: str | os.PathLike) -> list[str]:
    """Names in ``cwd`` that Hydra writes (run folders, ``.hydra/``, ``<job>.log``)."""
    return sorted(n for n in os.listdir(cwd) if n in HYDRA_LEFTOVERS or n.endswith(".log"))
