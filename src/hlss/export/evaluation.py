"""The kNN metrics of an ``hlss-eval`` run of the exported checkpoint, when one exists.

``hlss-eval`` writes ``<eval>/metrics.json`` (its final checkpoint) and, for several
checkpoints, ``<eval>/steps/step-NNNNNNN/metrics.json``, each with the ``checkpoint`` and
``step`` it evaluated; by default ``<eval>`` is ``<run>/eval-<date>-<time>``.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hlss.errors import HLSSError
from hlss.levels import LEVELS

KNN_KEYS = ("acc", "top2", "top3", "mca", "map")
#: the evaluation settings the card names (from ``<eval>/config.yaml`` where it exists)
SETTINGS = ("knn.k", "knn.temperature", "aggregate", "dataset.name")


def _read_json(path: str) -> Any:
    """A JSON file's content, ``None`` when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _read_settings(path: str) -> DictConfig:
    """An evaluation's ``config.yaml`` (its k, temperature, features...), empty when missing."""
    try:
        loaded = OmegaConf.load(path)
    except Exception:  # a missing or unreadable evaluation config only loses the settings
        return OmegaConf.create({})
    return loaded if isinstance(loaded, DictConfig) else OmegaConf.create({})


def _eval_folder(metrics_file: str) -> str:
    """The evaluation folder of a ``metrics.json`` (``<eval>/`` or ``<eval>/steps/step-N/``)."""
    folder = os.path.dirname(metrics_file)
    parent = os.path.dirname(folder)
    return os.path.dirname(parent) if os.path.basename(parent) == "steps" else folder


def _evaluation(metrics_file: str, step: int, any_features: bool) -> dict | None:
    """The kNN metrics in ``metrics_file`` if they are of a trained model at ``step`` (and of its
    backbone features, unless ``any_features``), else ``None``."""
    metrics = _read_json(metrics_file)
    if not isinstance(metrics, dict) or not all(isinstance(metrics.get(lv), dict) for lv in LEVELS):
        return None
    folder = _eval_folder(metrics_file)
    summary = _read_json(os.path.join(folder, "summary.json"))
    untrained = isinstance(summary, dict) and summary.get("untrained")
    settings = _read_settings(os.path.join(folder, "config.yaml"))
    features = settings.get("features", "backbone")
    if metrics.get("step") != step or untrained or (features != "backbone" and not any_features):
        return None
    found = {
        "file": metrics_file,
        "checkpoint": metrics.get("checkpoint"),
        "step": step,
        "features": features,
        "knn": {lv: {k: metrics[lv][k] for k in KNN_KEYS if k in metrics[lv]} for lv in LEVELS},
        "patient_acc_ci95": metrics["patient"].get("acc_ci95"),
        "settings": {key: OmegaConf.select(settings, key, default=None) for key in SETTINGS},
    }
    probe = _read_json(os.path.join(folder, "probe", "metrics.json"))
    if os.path.dirname(metrics_file) == folder and isinstance(probe, dict):  # final checkpoint
        found["probe"] = {
            lv: probe[lv].get("acc") for lv in LEVELS if isinstance(probe.get(lv), dict)
        }
    return found


def find_evaluation(ckpt_path: str, step: int, given: str | None = None) -> dict | None:
    """The kNN metrics of an ``hlss-eval`` run of this checkpoint's step, if there is one.

    Args:
        ckpt_path: the exported checkpoint.
        step: its training step.
        given: an evaluation folder or ``metrics.json`` (any features); ``None`` -> the newest
            ``<run>/eval-*/[steps/step-N/]metrics.json`` at ``step`` on backbone features, not an
            ``untrained=true`` baseline.

    Returns:
        ``{"file", "checkpoint", "step", "features", "knn": {level: {acc, top2, top3, mca,
        map}}, "patient_acc_ci95", "settings", ["probe": {level: acc}]}`` or ``None``.

    Raises:
        HLSSError: ``given`` holds no metrics of this step.
    """
    from hlss.eval.writers import run_folder

    step_file = os.path.join("steps", f"step-{step:07d}", "metrics.json")
    if given:
        path = os.path.abspath(os.path.expanduser(given))
        candidates = [path]
        if not os.path.isfile(path):
            candidates = [os.path.join(path, "metrics.json"), os.path.join(path, step_file)]
    else:
        run = run_folder(ckpt_path)
        candidates = glob.glob(os.path.join(run, "eval-*", "metrics.json"))
        candidates += glob.glob(os.path.join(run, "eval-*", step_file))
    found = [e for e in (_evaluation(c, step, bool(given)) for c in candidates) if e]
    if given and not found:
        raise HLSSError(f"metrics={given}: no kNN metrics of step {step} (the exported checkpoint)")
    return max(found, key=lambda e: os.path.getmtime(e["file"])) if found else None
