"""Schemas of the console scripts' primary configs (Hydra structured configs).

Each primary YAML (``conf/train.yaml``, ``conf/eval.yaml``, ...) starts its defaults list with
``<command>_schema``: the dataclass registered here under that name. Its typed fields make
Hydra refuse a wrong type (``knn.k=abc``) or an unknown top-level key when it composes the
config, before anything is built. The open nodes (dataset, backbone, loss, trainer, ...) are
``_target_`` nodes; :func:`hlss.config.check_targets` holds them against the signatures of their
targets right after composition.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore


def register_schemas() -> None:
    """Store every command's schema in Hydra's ConfigStore (idempotent; call before composing).

    Each module of this package that defines ``register(store)`` adds its own schemas, so a new
    command brings its schema module and nothing else changes here.
    """
    import importlib
    import pkgutil

    store = ConfigStore.instance()
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if callable(register):
            register(store)
