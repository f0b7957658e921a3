"""What an evaluation's results depend on, and the MLflow names that keep them apart.

Several evaluations of one checkpoint (another ``knn.k``, ``aggregate``, ``features``, dataset,
the untrained baseline) log into the same training run at the same step; each result group
(kNN, zero-shot, linear probe) therefore gets a metric prefix that carries the settings its
numbers depend on, when they differ from the defaults of ``conf/eval.yaml``:

=================  ==========================================  ==============================
group              defaults                                    otherwise
=================  ==========================================  ==============================
kNN                ``eval/<level>_<metric>``                   ``eval/k20_mean_embedding/...``
zero-shot          ``zero_shot/<level>_<metric>``              ``zero_shot/t0.05/...``
linear probe       ``probe/<level>_<metric>``                  ``probe/text_space/...``
=================  ==========================================  ==============================

The untrained baseline uses ``eval_untrained``, ``zero_shot_untrained`` and
``probe_untrained``. A non-default kNN id always starts with ``k<k>_<aggregate>``; further tokens
(only when not the default): ``t<temperature>``, the ``features`` source, ``prompts-<name>``,
``wd<weight_decay>``, ``it<max_iter>`` and ``data-<name>-<hash>`` for a dataset other than the
one the checkpoint was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hlss.schemas.eval import EvalConfig

GROUPS = ("knn", "zero_shot", "probe")
_BASE = {"knn": "eval", "zero_shot": "zero_shot", "probe": "probe"}
_DEFAULTS = EvalConfig()


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def dataset_token(cfg: DictConfig, run_cfg: DictConfig) -> str | None:
    """``data-<name>-<sha256[:6]>`` when ``cfg.dataset`` is set and differs from the dataset of
    the training run ``run_cfg``; ``None`` when the evaluation uses the training dataset."""
    given = _plain(cfg.get("dataset"))
    if not given or given == _plain(run_cfg.get("dataset")):
        return None
    digest = hashlib.sha256(json.dumps(given, sort_keys=True, default=str).encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(given.get("name") or "custom"))
    return f"data-{name}-{digest[:6]}"


def group_settings(cfg: DictConfig, run_cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The settings each result group depends on: ``{group: {name: value}}`` (``dataset`` is
    :func:`dataset_token` or ``"training"``). Equal settings give equal metric names."""
    data = dataset_token(cfg, run_cfg) or "training"
    return {
        "knn": {
            "k": int(cfg.knn.k),
            "temperature": float(cfg.knn.temperature),
            "aggregate": str(cfg.aggregate),
            "features": str(cfg.features),
            "dataset": data,
        },
        "zero_shot": {
            "temperature": float(cfg.zero_shot.temperature),
            "prompts": str(cfg.zero_shot.prompts),
            "dataset": data,
        },
        "probe": {
            "features": str(cfg.features),
            "weight_decay": float(cfg.probe.weight_decay),
            "max_iter": int(cfg.probe.max_iter),
            "dataset": data,
        },
    }


def _spell(name: str, value: Any) -> str:
    """One setting as a name token: ``t0.1``, ``wd0.001``, ``it50``, ``prompts-mine``,
    ``text_space``."""
    if name == "prompts":
        stem = os.path.splitext(os.path.basename(str(value)))[0]
        return "prompts-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", stem)
    return {"temperature": "t{:g}", "weight_decay": "wd{:g}", "max_iter": "it{}"}.get(
        name, "{}"
    ).format(value)


def _tokens(group: str, settings: dict[str, Any]) -> list[str]:
    """The settings of one group that differ from ``conf/eval.yaml``'s defaults, as tokens."""
    d = _DEFAULTS
    defaults = {
        "knn": {"temperature": d.knn.temperature, "features": d.features},
        "zero_shot": {"temperature": d.zero_shot.temperature, "prompts": d.zero_shot.prompts},
        "probe": {
            "features": d.features,
            "weight_decay": d.probe.weight_decay,
            "max_iter": d.probe.max_iter,
        },
    }[group]
    tokens = [_spell(k, settings[k]) for k, default in defaults.items() if settings[k] != default]
    if settings["dataset"] != "training":
        tokens.append(settings["dataset"])
    if group == "knn" and (
        tokens or settings["k"] != d.knn.k or settings["aggregate"] != d.aggregate
    ):
        tokens = [f"k{settings['k']}", settings["aggregate"], *tokens]
    return tokens


def metric_prefixes(cfg: DictConfig, run_cfg: DictConfig) -> dict[str, str]:
    """``{group: prefix}``: metrics are logged as ``<prefix>/<level>_<metric>``, e.g.
    ``{"knn": "eval", "zero_shot": "zero_shot", "probe": "probe"}`` for the defaults and
    ``"eval/k20_softmax_sum"`` for ``knn.k=20`` (see the module doc)."""
    suffix = "_untrained" if cfg.untrained else ""
    out = {}
    for group, settings in group_settings(cfg, run_cfg).items():
        tokens = _tokens(group, settings)
        out[group] = _BASE[group] + suffix + ("/" + "_".join(tokens) if tokens else "")
    return out


def tracking_params(cfg: DictConfig, run_cfg: DictConfig) -> dict[str, str]:
    """MLflow params of an evaluation: ``<prefix with . for />.<setting>`` for every setting of
    :func:`group_settings`, e.g. ``eval.k20_softmax_sum.k = 20``.

    Params of a run cannot change once set; these keys carry the settings that define their
    prefix, so two evaluations that log the same key always log the same value."""
    prefixes = metric_prefixes(cfg, run_cfg)
    return {
        f"{prefixes[group].replace('/', '.')}.{name}": str(value)
        for group, settings in group_settings(cfg, run_cfg).items()
        for name, value in settings.items()
    }


def used_config(cfg: DictConfig, dataset: DictConfig, checkpoints: list[str]) -> dict:
    """The evaluation's resolved config as written to ``out/config.yaml``: ``cfg`` with ``ckpt``
    made absolute, ``dataset`` the dataset node actually used (the training run's when
    ``cfg.dataset`` is null) and ``checkpoints`` the evaluated files in step order."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["ckpt"] = os.path.abspath(os.path.expanduser(str(cfg.ckpt)))
    plain["dataset"] = _plain(dataset)
    plain["checkpoints"] = [os.path.abspath(c) for c in checkpoints]
    return plain
