"""Schema of ``hlss-export``'s primary config (``conf/export.yaml``).

The defaults and comments users see live in the YAML file; this dataclass fixes the keys and
their types, so Hydra refuses ``heads=maybe`` when it composes and
:func:`hlss.config.check_schema` refuses a key it does not have (``+dtyp=float16``).
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ExportConfig:
    """``hlss-export``: the arguments of :func:`hlss.export.export_model`."""

    ckpt: str = MISSING
    out: str = MISSING
    dtype: str = "float32"
    heads: bool = True
    metrics: str | None = None
    count_data: bool = True


def register(store: ConfigStore) -> None:
    """Store the schema as ``export_schema``."""
    store.store(name="export_schema", node=ExportConfig)
