"""``model_card.md``: the facts of ``export.json`` for people."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from hlss.export.evaluation import KNN_KEYS
from hlss.levels import LEVELS


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _data_line(data: Mapping) -> str:
    where = f" at `{data['location']}`" if data.get("location") else ""
    train = (data.get("splits") or {}).get("train")
    if train:
        size = f"{train['patients']} patients, {train['slides']} slides, {train['patches']} patches"
        return f"{data['name']} ({data['modality']}){where}: train split {size}"
    reason = data.get("not_counted", "not counted (count_data=false)")
    return f"{data['name']} ({data['modality']}){where}; size: {reason}"


def _evaluation_section(evaluation: Mapping | None, checkpoint: str) -> str:
    if not evaluation:
        return (
            "No evaluation of this checkpoint was found. Measure it with\n"
            f"`hlss-eval ckpt={checkpoint}` and export again.\n"
        )
    settings = ", ".join(f"{k}={v}" for k, v in evaluation["settings"].items() if v is not None)
    evaluated = os.path.basename(str(evaluation.get("checkpoint") or "?"))
    rows = [
        [lv, *(f"{evaluation['knn'][lv].get(k, float('nan')):.3f}" for k in KNN_KEYS)]
        for lv in LEVELS
    ]
    text = (
        f"kNN on the validation split ({evaluation['features']} features"
        f"{'; ' + settings if settings else ''}) of `{evaluated}` at step {evaluation['step']}, "
        f"from `{evaluation['file']}`:\n\n" + _table(["level", *KNN_KEYS], rows) + "\n"
    )
    if evaluation.get("patient_acc_ci95"):
        lo, hi = evaluation["patient_acc_ci95"]
        text += f"\nPatient accuracy 95% CI (bootstrap over patients): [{lo:.3f}, {hi:.3f}]\n"
    if evaluation.get("probe"):
        probe = ", ".join(f"{lv} {acc:.3f}" for lv, acc in evaluation["probe"].items())
        text += f"\nLinear probe accuracy: {probe}\n"
    return text


def _loss_line(train: Mapping) -> str:
    parts = [str(train["loss"])]
    for key, what in (("loss_weights", "level weights"), ("align_weights", "language-tie weights")):
        if isinstance(train.get(key), Mapping):
            parts.append(f"{what} " + ", ".join(f"{k} {v:g}" for k, v in train[key].items()))
    return "; ".join(parts)


def _training_rows(train: Mapping, data: Mapping) -> list[list[Any]]:
    batch = train["batch"]
    images = 1
    for key in ("patients", "slides", "patches", "views"):
        images *= int(batch.get(key) or 1)
    return [
        ["data", _data_line(data)],
        ["loss", _loss_line(train)],
        ["step", f"{train['step']} (epoch {train['epoch']}) of max_steps {train['max_steps']}"],
        [
            "hierarchy batch",
            f"{batch['patients']} patients x {batch['slides']} slides x {batch['patches']} "
            f"patches x {batch['views']} views = {images} images per step and process",
        ],
        ["backbone init", f"pretrained: {train['backbone_init']}"],
        ["seed", train["seed"]],
        ["checkpoint", f"`{train['checkpoint']}`"],
        ["MLflow run", train["mlflow_run_id"] or "not tracked"],
    ]


def _files_section(payload: Mapping) -> str:
    weights, heads = payload["weights"], payload.get("heads")
    lines = [
        f"- `{weights['file']}`: {weights['tensors']} tensors, {weights['dtype']}, "
        f"sha256 `{weights['sha256']}`"
    ]
    if heads and heads["kind"] == "mlp":
        lines.append(f"- `{heads['file']}`: the HiDisc projection MLP, sha256 `{heads['sha256']}`")
    elif heads:
        levels = ", ".join(heads["levels"]) or "-"
        lines.append(
            f"- `{heads['file']}`: {heads['projection']} projection into the text space and the "
            f"text-initialised heads of levels {levels}, sha256 `{heads['sha256']}` "
            "(how to use them: export.json)"
        )
    lines.append("- `export.json`: these facts, machine-readable; `config.yaml`: the run's config")
    return "\n".join(lines) + "\n"


def model_card(payload: Mapping) -> str:
    """``model_card.md``: what the export is, how to load it, its training and evaluation."""
    train, inp, source = payload["training"], payload["input"], payload["hlss"]
    size = (
        f"\n- input size {inp['size'][0]}x{inp['size'][1]}: {inp['size_note']}"
        if "size" in inp
        else ""
    )
    commit = (source["git_commit"] or "unknown") + (
        " (with uncommitted changes)" if source.get("git_dirty") else ""
    )
    sections = [
        f"# HLSS backbone: {payload['architecture']} ({payload['library']}), step {train['step']}",
        "An image backbone trained with hlss (hierarchical language-tied self-supervised learning "
        f"for histopathology): images `[B, 3, H, W]` -> features `[B, {payload['feature_dim']}]`, "
        "the representation hlss evaluates with kNN. Only the backbone is here, no classifier.",
        f"## Load it (no hlss needed)\n\n```python\n{payload['load']}\n```",
        f"## Input\n\n- raw patch: {inp['raw']}\n- transform: `{inp['transform']}`\n"
        f"- 3 channels, values in [0, 1]; {inp['note']}{size}",
        "## Training\n\n"
        + _table(["", ""], _training_rows(train, payload["data"]))
        + "\n\nThe run's full resolved config is `config.yaml`.",
        "## Evaluation\n\n" + _evaluation_section(payload.get("evaluation"), train["checkpoint"]),
        "## Files\n\n" + _files_section(payload),
        f"Exported with hlss {source['version']} (git commit {commit}) on {payload['exported']}.",
    ]
    return "\n\n".join(section.rstrip("\n") for section in sections) + "\n"
