"""The package's layers: who may import whom (read from the source, no imports executed)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import hlss

ROOT = pathlib.Path(hlss.__file__).parent


def hlss_imports(path: pathlib.Path) -> set[str]:
    """Every ``hlss.*`` module a file imports, at top level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("hlss"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hlss"):
            out.add(node.module)
    return out


def modules(package: str) -> list[pathlib.Path]:
    return sorted((ROOT / package).glob("*.py"))


FORBIDDEN = {
    "data": ("hlss.train", "hlss.eval", "hlss.cli", "hlss.models", "hlss.losses"),
    "losses": ("hlss.train", "hlss.eval", "hlss.cli", "hlss.data", "hlss.models"),
    "models": ("hlss.train", "hlss.eval", "hlss.cli", "hlss.data", "hlss.losses"),
    "eval": ("hlss.train", "hlss.cli"),
    "train": ("hlss.eval", "hlss.cli"),
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_does_not_reach_up(package):
    for path in modules(package):
        bad = {m for m in hlss_imports(path) if m.startswith(FORBIDDEN[package])}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_neutral_modules_import_no_command_or_stage():
    for name in (
        "config.py",
        "checkpoints.py",
        "tracking.py",
        "levels.py",
        "paths.py",
        "cache_admin.py",
    ):
        bad = {
            m
            for m in hlss_imports(ROOT / name)
            if m.startswith(("hlss.train", "hlss.eval", "hlss.cli"))
        }
        assert not bad, f"{name} imports {sorted(bad)}"


def test_no_cli_imports_another_cli():
    for path in modules("cli"):
        others = {
            m for m in hlss_imports(path) if m.startswith("hlss.cli") and m != "hlss.cli.common"
        }
        assert not others, f"cli/{path.name} imports {sorted(others)}"
