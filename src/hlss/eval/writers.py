"""The files of an evaluation folder.

::

    <out>/config.yaml   the evaluation's settings (k, temperature, backend, aggregate, ...)
    <out>/metrics.json  predictions.csv  confusion_{patch,slide,patient}.png   (final checkpoint)
    <out>/metrics.csv   accuracy_vs_step.png (several checkpoints)   summary.json
    <out>/steps/step-NNNNNNN/metrics.json                              (several checkpoints)
    <out>/zero_shot/ , <out>/probe/   (metrics.json, predictions.csv, confusion PNGs)

Every JSON, CSV and YAML file is written atomically (:func:`hlss.atomic.atomic_file`);
``summary.json`` lists every file written under ``files``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence

import pandas as pd

from hlss.atomic import atomic_file
from hlss.errors import HLSSError
from hlss.levels import LEVELS


def run_folder(ckpt_path: str) -> str:
    """The training run folder of a checkpoint (``<run>/checkpoints/x.ckpt`` -> ``<run>``; a
    checkpoint elsewhere -> its own folder)."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def prepare_out(out: str | None, ckpt_path: str) -> str:
    """Create the output folder and return its absolute path.

    Args:
        out: the folder; ``None``/empty -> ``<run folder of ckpt_path>/eval-<date>-<time>``.
        ckpt_path: the evaluated checkpoint.

    Raises:
        HLSSError: ``out`` exists and is a file or a non-empty folder (nothing is overwritten).
    """
    if not out:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        out = os.path.join(run_folder(ckpt_path), f"eval-{stamp}")
    out = os.path.abspath(os.path.expanduser(str(out)))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise HLSSError(f"out={out}: exists and is not empty; choose a new folder")
    os.makedirs(out, exist_ok=True)
    return out


def write_json(path: str, payload: Mapping) -> str:
    """``payload`` as indented JSON at ``path``; returns ``path``."""
    with atomic_file(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
    return path


def write_config(out: str, config: Mapping) -> str:
    """``<out>/config.yaml``: the evaluation's resolved settings; returns its path."""
    from omegaconf import OmegaConf

    path = os.path.join(out, "config.yaml")
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(OmegaConf.to_yaml(OmegaConf.create(dict(config))))
    return path


def _ids(info: Mapping) -> dict:
    return {"checkpoint": info["checkpoint"], "step": info["step"], "epoch": info["epoch"]}


def write_level_outputs(folder: str, result: Mapping, info: Mapping, title: str) -> dict[str, str]:
    """``metrics.json``, ``predictions.csv`` and ``confusion_<level>.png`` into ``folder``.

    Args:
        folder: created when missing.
        result: what :func:`hlss.eval.protocol.score_levels` returns.
        info: ``checkpoint``, ``step`` and ``epoch`` (added to ``metrics.json``).
        title: plot title prefix (`` - <level> level`` is appended).

    Returns:
        ``{"metrics": path, "predictions": path, "confusion_<level>": path, ...}``.
    """
    from hlss.eval.plots import plot_confusion

    os.makedirs(folder, exist_ok=True)
    files = {
        "metrics": write_json(
            os.path.join(folder, "metrics.json"), {**result["metrics"], **_ids(info)}
        )
    }
    files["predictions"] = os.path.join(folder, "predictions.csv")
    with atomic_file(files["predictions"], "w", encoding="utf-8", newline="") as handle:
        result["predictions"].to_csv(handle, index=False)
    for level in LEVELS:
        png = os.path.join(folder, f"confusion_{level}.png")
        plot_confusion(
            result["confusion"][level], result["classes"], png, title=f"{title} - {level} level"
        )
        files[f"confusion_{level}"] = png
    return files


def write_step_metrics(out: str, metrics: Mapping, info: Mapping) -> str:
    """``<out>/steps/step-NNNNNNN/metrics.json`` of one checkpoint; returns its path."""
    folder = os.path.join(out, "steps", f"step-{int(info['step']):07d}")
    os.makedirs(folder, exist_ok=True)
    return write_json(os.path.join(folder, "metrics.json"), {**metrics, **_ids(info)})


def write_metrics_table(out: str, rows: Sequence[Mapping]) -> dict[str, str]:
    """``<out>/metrics.csv`` (one row per checkpoint, see
    :func:`hlss.eval.protocol.metrics_row`) and, for two rows or more, ``accuracy_vs_step.png``.

    Returns:
        ``{"metrics_table": path}``, plus ``"accuracy_curve"`` when the plot was drawn.
    """
    from hlss.eval.plots import plot_accuracy_curve

    files = {"metrics_table": os.path.join(out, "metrics.csv")}
    with atomic_file(files["metrics_table"], "w", encoding="utf-8", newline="") as handle:
        pd.DataFrame(list(rows)).to_csv(handle, index=False)
    if len(rows) >= 2:
        png = os.path.join(out, "accuracy_vs_step.png")
        files["accuracy_curve"] = str(plot_accuracy_curve(list(rows), png, title="kNN accuracy"))
    return files


def write_summary(out: str, summary: Mapping) -> str:
    """``<out>/summary.json``: ``summary`` without its console-only ``attribute_examples``; a
    ``files`` listing gets ``"summary"`` (this file) added. Returns the path."""
    path = os.path.join(out, "summary.json")
    payload = {k: v for k, v in summary.items() if k != "attribute_examples"}
    if "files" in payload:
        payload["files"] = {**payload["files"], "summary": path}
    return write_json(path, payload)
