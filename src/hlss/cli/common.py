"""Shared plumbing of the console scripts: ``key=value`` arguments and one-line errors."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hlss.errors import HLSSError

EXIT_USER_ERROR = 2


def _coerce(text: str, default: Any) -> Any:
    """Convert ``text`` to the type of ``default`` (bool/int/float/str; None keeps str)."""
    if isinstance(default, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise HLSSError(f"expected true/false, got {text!r}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise HLSSError(f"expected an integer, got {text!r}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise HLSSError(f"expected a number, got {text!r}") from None
    if text.lower() in ("null", "none") and default is None:
        return None
    return text


def parse_key_values(argv: Sequence[str], defaults: dict[str, Any], prog: str) -> dict[str, Any]:
    """Parse ``key=value`` arguments against ``defaults`` (which fixes the keys and types).

    A default of ``...`` (Ellipsis) marks a required key. ``--help`` prints the keys and exits 0.

    Raises:
        HLSSError: an unknown key, a malformed argument, a bad value or a missing required key.
    """
    if any(a in ("-h", "--help") for a in argv):
        print(
            f"usage: {prog} "
            + " ".join(f"{k}=..." if v is ... else f"[{k}={v}]" for k, v in defaults.items())
        )
        raise SystemExit(0)
    values = {k: v for k, v in defaults.items()}
    for arg in argv:
        key, sep, text = arg.partition("=")
        if not sep or not key:
            raise HLSSError(f"argument {arg!r} is not of the form key=value")
        if key not in defaults:
            raise HLSSError(f"unknown key {key!r}; known keys: {', '.join(defaults)}")
        try:
            values[key] = _coerce(text, defaults[key])
        except HLSSError as err:
            raise HLSSError(f"{key}: {err}") from None
    missing = [k for k, v in values.items() if v is ...]
    if missing:
        raise HLSSError(f"missing required argument(s): {', '.join(k + '=...' for k in missing)}")
    return values


def _last_line(err: Exception) -> str:
    """The last non-empty line: errors from data-loader workers arrive with the worker's traceback."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def report_errors(func: Callable, *args, **kwargs):
    """Run ``func``; a user error (:class:`HLSSError` or a config problem) becomes one stderr line
    and exit status 2. For Hydra task functions, where Hydra would print its own multi-line report."""
    from omegaconf.errors import OmegaConfBaseException

    from hlss.config import config_message

    try:
        return func(*args, **kwargs)
    except OmegaConfBaseException as err:
        print(f"error: {config_message(err)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except HLSSError as err:
        print(f"error: {_last_line(err)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


def quiet_libraries() -> None:
    """Silence start-up chatter of libraries (FAISS's loader, sentence-transformers) below WARNING."""
    import logging

    for name in ("faiss.loader", "sentence_transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


def user_errors_exit(func: Callable[..., int | None]) -> Callable[..., int | None]:
    """Decorator for console-script mains: an :class:`HLSSError` becomes one stderr line + exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except HLSSError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
