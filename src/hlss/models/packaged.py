"""YAML files shipped inside ``hlss.models`` (attribute banks, class prompts) or given by path."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from hlss.errors import ConfigError


def packaged_names(folder: str) -> list[str]:
    """Names (without ``.yaml``) of the files shipped in ``hlss/models/<folder>/``."""
    root = resources.files("hlss.models").joinpath(folder)
    if not root.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_packaged_or_file(path_or_name: str, folder: str, what: str) -> tuple[str, str]:
    """``(display name, text)`` of a packaged file (a bare name such as ``patch``) or a user path.

    Args:
        folder: the packaged folder under ``hlss/models/``.
        what: what the file is, for messages (e.g. ``"attribute bank"``).

    Raises:
        ConfigError: no packaged file and no file at that path, or the file cannot be read.
    """
    s = str(path_or_name)
    is_bare = os.sep not in s and "/" not in s and not s.endswith((".yaml", ".yml"))
    if is_bare:
        res = resources.files("hlss.models").joinpath(folder, f"{s}.yaml")
        if res.is_file():
            return f"hlss/models/{folder}/{s}.yaml", res.read_text(encoding="utf-8")
        if not Path(s).is_file():
            packaged = ", ".join(packaged_names(folder)) or "none"
            raise ConfigError(
                f"{what} {s!r}: no such file and none packaged by that name (packaged: {packaged})"
            )
    path = Path(s).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        return str(path), path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read {what} ({err})") from None


def load_packaged_or_file(path_or_name: str, folder: str, what: str) -> tuple[str, object]:
    """``(display name, parsed YAML)`` of a packaged file or a user path.

    Raises:
        ConfigError: as :func:`read_packaged_or_file`, or malformed YAML (with its line).
    """
    import yaml

    where, text = read_packaged_or_file(path_or_name, folder, what)
    try:
        return where, yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        loc = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{where}: malformed YAML{loc}: {problem}") from None
