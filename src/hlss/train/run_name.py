"""MLflow run names that say what a run trains: experiment, loss, backbone, dataset, overrides.

E.g. ``opensrh_hlss attr3levels clip_rn50 opensrh`` or, for a sweep member,
``hidisc resnet18 synthetic loss.temperature=0.05``. Set ``logger.run_name`` to choose one.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

# overrides about where and how a run executes, not what it trains: left out of names
UNNAMED = (
    "resume",
    "paths.",
    "logger",
    "hydra.",
    "checkpoint.",
    "callbacks",
    "trainer.enable_",
    "loader.num_workers",
    "loader.pin_memory",
    "experiment",
)
NAMED_GROUPS = ("loss", "backbone", "dataset")  # their choice is in the name already
MAX_LENGTH = 250  # MLflow's SQL stores keep run names in 250 characters


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _named(override: str) -> bool:
    key = _key(override)
    if key in NAMED_GROUPS and "=" in override:
        return False
    return not any(key == u.rstrip(".") or key.startswith(u) for u in UNNAMED)


def run_name(cfg: DictConfig, overrides: Sequence[str] = (), experiment: str | None = None) -> str:
    """``[experiment] loss backbone dataset [overrides]``, at most :data:`MAX_LENGTH` characters.

    Args:
        cfg: the composed train config (``loss.name``, ``backbone.name``, ``dataset.name``).
        overrides: the command-line overrides of this run (of this sweep member); those in
            :data:`UNNAMED` and the choices of ``loss``/``backbone``/``dataset`` are left out.
        experiment: the chosen ``experiment`` option, if any.
    """
    parts = [
        experiment or "",
        str(cfg.loss.get("name") or ""),
        str(cfg.backbone.get("name") or ""),
        str(cfg.dataset.get("name") or ""),
    ]
    parts += [o.lstrip("+") for o in overrides if _named(o)]
    return " ".join(p for p in parts if p)[:MAX_LENGTH]


def hydra_run_name(cfg: DictConfig) -> str:
    """:func:`run_name` with this Hydra job's overrides and experiment choice (none outside
    Hydra, e.g. when :func:`hlss.train.fit.run_training` is called directly)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return run_name(cfg)
    hydra_cfg = HydraConfig.get()
    experiment = hydra_cfg.runtime.choices.get("experiment")
    return run_name(cfg, list(hydra_cfg.overrides.task), experiment)
