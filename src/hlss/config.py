"""Building objects from config nodes with errors the user can act on."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf.errors import OmegaConfBaseException

from hlss.errors import ConfigError, HLSSError


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that reports problems as one line.

    An :class:`HLSSError` raised by the constructor (a missing dataset root, a bad bank file...)
    comes out as itself rather than wrapped in Hydra's multi-line message; any other failure
    becomes a :class:`ConfigError` naming the target and the cause.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, HLSSError):
            raise cause from None
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        detail = (
            f"{type(cause).__name__}: {cause}" if cause is not None else str(err).splitlines()[0]
        )
        raise ConfigError(f"cannot build {target}: {detail}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(config_message(err)) from None


def config_message(err: OmegaConfBaseException) -> str:
    """One line for an OmegaConf error (e.g. a required ``???`` value that was not given)."""
    key = getattr(err, "full_key", None)
    msg = str(getattr(err, "msg", "") or err).splitlines()[0]
    if "Missing mandatory value" in msg:
        return f"{key or 'a key'} is required: set it on the command line ({msg.split(':')[-1].strip()}=...)"
    return f"{key}: {msg}" if key else msg
