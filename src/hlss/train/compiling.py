"""The ``compile`` setting of a training run: ``torch.compile`` for the training step's network.

``compile: false`` (default) trains eagerly; ``true`` compiles the model's forward and the
objective with torch's defaults when training starts (:class:`hlss.train.module.HLSSModule`); a
mapping passes ``torch.compile``'s keyword arguments. Checked here, in the preflight, so a
misspelt mode is one line before anything is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hlss.errors import HLSSError

COMPILE_ARGUMENTS = ("mode", "backend", "fullgraph", "dynamic", "options")


def compile_arguments(value: Any) -> dict | None:
    """The ``compile`` setting of :class:`hlss.train.module.HLSSModule` as ``torch.compile``
    keyword arguments (``None``: do not compile).

    Raises:
        HLSSError: ``value`` is not a bool or a mapping of :data:`COMPILE_ARGUMENTS`, or torch
            refuses its mode, backend or options.
    """
    if value is False or value is None:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise HLSSError(
            f"compile must be true, false or a mapping of torch.compile arguments, got {value!r}"
        )
    kwargs = dict(value)
    unknown = sorted(set(kwargs) - set(COMPILE_ARGUMENTS))
    if unknown:
        raise HLSSError(
            f"compile: unknown torch.compile argument(s) {', '.join(unknown)} "
            f"(known: {', '.join(COMPILE_ARGUMENTS)})"
        )
    if isinstance(kwargs.get("options"), Mapping):
        kwargs["options"] = dict(kwargs["options"])
    try:  # torch checks the mode, the backend and the options here; it compiles only when called
        torch.compile(_identity, **kwargs)
    except Exception as err:  # torch raises several kinds; each means a bad setting
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = reason.split(", known options are")[0]  # torch lists every inductor option
        raise HLSSError(f"compile: torch.compile refuses {kwargs}: {reason}") from None
    return kwargs


def _identity(x):
    return x
