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
    """Store every command's schema in Hydra's ConfigStore (idempotent; call before composing)."""
    from hlss.schemas.eval import EvalConfig
    from hlss.schemas.train import TrainConfig

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    try:  # the smaller commands' schemas (hlss-synth, hlss-validate, hlss-demo)
        from hlss.schemas.tools import register_tool_schemas
    except ImportError:
        return
    register_tool_schemas(store)
