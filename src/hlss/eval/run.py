"""One evaluation from a composed ``eval`` config: checkpoints -> embeddings -> kNN -> outputs.

For every checkpoint (step order): embed the train and val patches (base transform only, cached
on disk), classify val patches by weighted cosine kNN against the train bank, aggregate to slides
and patients, compute the metrics. The final checkpoint also gets predictions, confusion
matrices, zero-shot classification, attribute retrieval and a linear probe. Everything is
written to ``out`` and logged to the MLflow run that trained the checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from hlss.config import build
from hlss.errors import ConfigError, HLSSError
from hlss.eval.aggregate import aggregate_scores, group_labels, mean_embeddings, patch_probabilities
from hlss.eval.checkpoints import (
    list_checkpoints,
    load_trained_model,
    run_config_for,
    untrained_model,
)
from hlss.eval.embed import EmbeddingSet, cached_embeddings
from hlss.eval.knn import KNNIndex
from hlss.eval.metrics import bootstrap_ci, classification_metrics
from hlss.train.checkpoint import load_checkpoint_file

log = logging.getLogger(__name__)

LEVELS = ("patch", "slide", "patient")
SCALARS = ("acc", "top2", "top3", "mca", "map")
AGGREGATIONS = ("softmax_sum", "mean_embedding")


def checkpoint_info(path: str) -> dict:
    """Step, epoch and MLflow run id of a checkpoint (without building the model)."""
    state = load_checkpoint_file(path)
    extra = state.get("hlss") or {}
    return {
        "checkpoint": os.path.abspath(path),
        "step": int(state.get("global_step", 0) or 0),
        "epoch": int(state.get("epoch", 0) or 0),
        "mlflow_run_id": extra.get("mlflow_run_id"),
    }


def run_folder(ckpt_path: str) -> str:
    """The training run folder of a checkpoint (``<run>/checkpoints/x.ckpt`` -> ``<run>``)."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def prepare_out(out: str | None, ckpt_path: str) -> str:
    """Create the output folder; never reuse a non-empty one (nothing is overwritten)."""
    if not out:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        out = os.path.join(run_folder(ckpt_path), f"eval-{stamp}")
    out = os.path.abspath(os.path.expanduser(str(out)))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise HLSSError(f"out={out}: exists and is not empty; choose a new folder")
    os.makedirs(out, exist_ok=True)
    return out


def slide_and_patient_groups(frame: pd.DataFrame) -> dict[str, list]:
    """Group key of every patch at slide level (``(patient, slide)``) and patient level."""
    return {
        "slide": list(zip(frame["patient"], frame["slide"], strict=True)),
        "patient": frame["patient"].tolist(),
    }


def score_levels(
    val: EmbeddingSet,
    patch_scores: np.ndarray,
    group_scores: Callable[[list], np.ndarray],
    cfg: DictConfig,
) -> dict:
    """Metrics at patch, slide and patient level from patch scores and a group-scoring rule.

    Args:
        val: the evaluated patches (index and labels).
        patch_scores: ``[m, C]`` patch-level scores (predictions and patch metrics).
        group_scores: maps the per-patch group keys to ``[g, C]`` group scores, rows in sorted
            key order (as :func:`hlss.eval.aggregate.aggregate_scores` returns them).

    Returns ``{"metrics": {level: {...}}, "confusion": {level: CxC}, "predictions": DataFrame,
    "classes": [...]}``; patient level carries a bootstrap interval over patients.
    """
    classes = list(val.classes)
    C = len(classes)
    labels, frame = val.labels, val.index
    metrics, confusion = {}, {}
    m = classification_metrics(patch_scores, labels, C)
    confusion["patch"] = m.pop("confusion")
    metrics["patch"] = m
    correct = None
    for level, keys in slide_and_patient_groups(frame).items():
        level_scores = group_scores(keys)
        level_labels = group_labels(labels, keys)
        m = classification_metrics(level_scores, level_labels, C)
        confusion[level] = m.pop("confusion")
        metrics[level] = m
        correct = (np.asarray(level_scores).argmax(1) == level_labels).astype(np.int64)
    lo, hi = bootstrap_ci(
        correct, n_boot=int(cfg.bootstrap.n), level=float(cfg.bootstrap.level), seed=int(cfg.seed)
    )
    metrics["patient"]["acc_ci95"] = [float(lo), float(hi)]
    predictions = pd.DataFrame(
        {
            "path": frame["path"].to_numpy(),
            "patient": frame["patient"].to_numpy(),
            "slide": frame["slide"].to_numpy(),
            "label": frame["label"].to_numpy(),
            "predicted": np.asarray(classes, dtype=object)[np.asarray(patch_scores).argmax(1)],
        }
    )
    for j, name in enumerate(classes):
        predictions[f"score_{name}"] = np.round(np.asarray(patch_scores)[:, j], 6)
    return {
        "metrics": metrics,
        "confusion": confusion,
        "predictions": predictions,
        "classes": classes,
    }


def knn_evaluate(train: EmbeddingSet, val: EmbeddingSet, cfg: DictConfig) -> dict:
    """The kNN protocol: weighted cosine kNN of val patches against the train bank, then slide
    and patient predictions by the configured aggregation (see :func:`score_levels`)."""
    if cfg.aggregate not in AGGREGATIONS:
        raise ConfigError(f"aggregate must be one of {AGGREGATIONS}, got {cfg.aggregate!r}")
    if tuple(train.classes) != tuple(val.classes):
        raise HLSSError("train and val embeddings disagree on the class list")
    if len(val) == 0:
        raise HLSSError("no val patches to evaluate")
    C = len(val.classes)
    index = KNNIndex(
        train.features,
        train.labels,
        num_classes=C,
        backend=cfg.knn.backend,
        device=cfg.embed.device,
    )
    k, temp = int(cfg.knn.k), float(cfg.knn.temperature)
    scores = index.scores(val.features, k=k, temperature=temp)

    def group_scores(keys: list) -> np.ndarray:
        if cfg.aggregate == "softmax_sum":
            return aggregate_scores(scores, keys, how="softmax_sum", normalize=True)[1]
        _, means = mean_embeddings(val.features, keys)
        return index.scores(means, k=k, temperature=temp)

    return score_levels(val, patch_probabilities(scores), group_scores, cfg)


def write_json(path: str, payload: Mapping) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)


def write_level_outputs(folder: str, result: dict, info: dict, title: str) -> dict[str, str]:
    """metrics.json, predictions.csv and one confusion PNG per level into ``folder``."""
    from hlss.eval.plots import plot_confusion

    os.makedirs(folder, exist_ok=True)
    files = {}
    payload = {
        **result["metrics"],
        "checkpoint": info["checkpoint"],
        "step": info["step"],
        "epoch": info["epoch"],
    }
    files["metrics"] = os.path.join(folder, "metrics.json")
    write_json(files["metrics"], payload)
    files["predictions"] = os.path.join(folder, "predictions.csv")
    result["predictions"].to_csv(files["predictions"], index=False)
    for level in LEVELS:
        png = os.path.join(folder, f"confusion_{level}.png")
        plot_confusion(
            result["confusion"][level], result["classes"], png, title=f"{title} - {level} level"
        )
        files[f"confusion_{level}"] = png
    return files


def metrics_row(info: dict, metrics: Mapping) -> dict:
    row = {
        "step": info["step"],
        "epoch": info["epoch"],
        "checkpoint": os.path.basename(info["checkpoint"]),
    }
    for level in LEVELS:
        for key in SCALARS:
            row[f"{level}_{key}"] = metrics[level][key]
    lo, hi = metrics["patient"].get("acc_ci95", metrics["patient"].get("acc_ci", [None, None]))
    row["patient_acc_ci_lo"], row["patient_acc_ci_hi"] = lo, hi
    return row


def _embed_sets(cfg, run_cfg, ckpt, table, transform, source):
    """Train and val embedding sets of one checkpoint (or of the untrained model), cached."""
    if cfg.untrained:
        factory, ckpt_key = (lambda: untrained_model(run_cfg)), None
    else:
        factory, ckpt_key = (lambda: load_trained_model(ckpt, run_cfg)[0]), ckpt
    kwargs = {
        "batch_size": int(cfg.embed.batch_size),
        "num_workers": int(cfg.embed.num_workers),
        "device": cfg.embed.device,
    }
    sets = {}
    for split in ("train", "val"):
        sets[split] = cached_embeddings(
            factory,
            ckpt_key,
            table,
            transform,
            split,
            source,
            cfg.embed.cache_dir,
            cfg=run_cfg,
            **kwargs,
        )
    return sets


def _has_text_space(run_cfg: DictConfig) -> bool:
    return str(run_cfg.loss.get("head", "mlp")) == "text"


def language_outputs(cfg, run_cfg, ckpt, table, transform, out) -> dict:
    """Zero-shot classification and attribute retrieval of the final checkpoint (text models)."""
    from hlss.eval.explain import explain_levels, format_examples, write_explanations
    from hlss.eval.zero_shot import load_class_prompts, zero_shot_scores
    from hlss.models.text import embed_prompts
    from hlss.train.build import attribute_banks

    results: dict[str, Any] = {}
    sets = _embed_sets(cfg, run_cfg, ckpt, table, transform, "text_space")
    val = sets["val"]
    if cfg.zero_shot.enabled:
        classes = list(val.classes)
        prompts = load_class_prompts(str(cfg.zero_shot.prompts), classes)
        class_text = embed_prompts(
            build(run_cfg.text_encoder), prompts, run_cfg.attributes.get("cache_dir")
        )
        scores = zero_shot_scores(
            val.features, class_text, temperature=float(cfg.zero_shot.temperature)
        )
        folder = os.path.join(out, "zero_shot")

        def group_scores(keys: list) -> np.ndarray:
            return aggregate_scores(scores, keys, how="sum", normalize=True)[1]

        result = score_levels(val, scores, group_scores, cfg)
        info = {
            "checkpoint": os.path.abspath(ckpt),
            "step": checkpoint_info(ckpt)["step"] if not cfg.untrained else 0,
            "epoch": 0,
        }
        write_level_outputs(folder, result, info, "zero-shot")
        results["zero_shot"] = result["metrics"]
    if cfg.explain.enabled:
        model_text = _text_embeddings(cfg, run_cfg, ckpt)
        banks = attribute_banks(run_cfg)
        df = explain_levels(
            val.features,
            val.index,
            model_text,
            banks,
            k=int(cfg.explain.k),
            patches=cfg.explain.patches,
        )
        path = os.path.join(out, "attributes.csv")
        write_explanations(df, path)
        results["attributes_csv"] = path
        results["attribute_examples"] = format_examples(df, n_per_level=2)
    return results


def _text_embeddings(cfg, run_cfg, ckpt) -> dict:
    """The frozen attribute text embeddings stored in the checkpoint (or rebuilt untrained)."""
    if cfg.untrained:
        model = untrained_model(run_cfg)
    else:
        state = load_checkpoint_file(ckpt)["state_dict"]
        found = {lv: state[f"model.text_{lv}"] for lv in LEVELS if f"model.text_{lv}" in state}
        if found:
            return found
        model = load_trained_model(ckpt, run_cfg)[0]
    return dict(model.text_embeddings)


def probe_outputs(cfg, train: EmbeddingSet, val: EmbeddingSet, out: str, info: dict) -> dict:
    """Linear probe (logistic regression on frozen features, train patients -> val patients)."""
    from hlss.eval.probe import check_patient_disjoint, linear_probe

    check_patient_disjoint(train.index["patient"], val.index["patient"])
    probs = linear_probe(
        train.features,
        train.labels,
        val.features,
        len(val.classes),
        weight_decay=float(cfg.probe.weight_decay),
        max_iter=int(cfg.probe.max_iter),
        seed=int(cfg.seed),
        device=cfg.embed.device,
    )

    def group_scores(keys: list) -> np.ndarray:
        return aggregate_scores(probs, keys, how="sum", normalize=True)[1]

    result = score_levels(val, probs, group_scores, cfg)
    write_level_outputs(os.path.join(out, "probe"), result, info, "linear probe")
    return result["metrics"]


class MLflowSink:
    """Logs evaluation metrics and files to the training run (found by id in the run's store), or
    to a new run of the eval experiment when that run is not found."""

    def __init__(self, cfg: DictConfig, run_cfg: DictConfig, run_id: str | None, description: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = cfg.mlflow.tracking_uri or (run_cfg.get("logger") or {}).get("tracking_uri")
        if not uri:
            uri = "sqlite:///" + os.path.join(os.path.abspath("outputs"), "mlruns.db")
        if str(uri).startswith("sqlite:///"):
            os.makedirs(os.path.dirname(str(uri)[len("sqlite:///") :]) or ".", exist_ok=True)
        self.uri = str(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id, self.new_run = None, False
        if run_id:
            try:
                self.run_id = self.client.get_run(run_id).info.run_id
            except mlflow.exceptions.MlflowException:
                log.warning(
                    "MLflow run %s not found in %s; logging to a new eval run", run_id, self.uri
                )
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(str(cfg.mlflow.experiment))
            exp_id = (
                exp.experiment_id
                if exp
                else self.client.create_experiment(str(cfg.mlflow.experiment))
            )
            run = self.client.create_run(
                exp_id, tags={"hlss.eval_of": description}, run_name=f"eval {description}"
            )
            self.run_id, self.new_run = run.info.run_id, True

    def metrics(self, metrics: Mapping, step: int, prefix: str) -> None:
        from mlflow.entities import Metric

        stamp = int(_dt.datetime.now().timestamp() * 1000)
        batch = []
        for level in LEVELS:
            for key in SCALARS:
                batch.append(
                    Metric(f"{prefix}/{level}_{key}", float(metrics[level][key]), stamp, int(step))
                )
        self.client.log_batch(self.run_id, metrics=batch)

    def artifacts(self, folder: str) -> None:
        self.client.log_artifacts(
            self.run_id, folder, artifact_path=f"eval/{os.path.basename(folder)}"
        )

    def close(self) -> None:
        if self.new_run:
            self.client.set_terminated(self.run_id)


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation described by an ``eval`` config; returns a summary dict."""
    from hlss.eval.plots import plot_accuracy_curve

    checkpoints = list_checkpoints(str(cfg.ckpt))
    final = checkpoints[-1]
    run_cfg = run_config_for(final)
    dataset_cfg = cfg.dataset if cfg.get("dataset") else run_cfg.dataset
    if cfg.untrained:
        checkpoints = [final]  # the initialisation is one model, whatever the run saved
    out = prepare_out(cfg.out, final)
    table = build(dataset_cfg.table)
    transform = build(dataset_cfg.transform)
    source = str(cfg.features)
    what = "untrained" if cfg.untrained else "checkpoint"
    rows, last_result, last_sets, last_info = [], None, None, None
    for position, ckpt in enumerate(checkpoints):
        info = checkpoint_info(ckpt)
        if cfg.untrained:
            info.update(step=0, epoch=0)
        sets = _embed_sets(cfg, run_cfg, ckpt, table, transform, source)
        result = knn_evaluate(sets["train"], sets["val"], cfg)
        rows.append(metrics_row(info, result["metrics"]))
        if len(checkpoints) > 1:
            step_dir = os.path.join(out, "steps", f"step-{info['step']:07d}")
            write_json_dir(step_dir, {**result["metrics"], **_ids(info)})
        log.info(
            "%s %s step %d: patch %.3f slide %.3f patient %.3f",
            what,
            os.path.basename(ckpt),
            info["step"],
            result["metrics"]["patch"]["acc"],
            result["metrics"]["slide"]["acc"],
            result["metrics"]["patient"]["acc"],
        )
        if position == len(checkpoints) - 1:
            last_result, last_sets, last_info = result, sets, info
    files = write_level_outputs(out, last_result, last_info, f"step {last_info['step']}")
    table_rows = pd.DataFrame(rows)
    table_rows.to_csv(os.path.join(out, "metrics.csv"), index=False)
    if len(rows) > 1:
        files["accuracy_curve"] = str(
            plot_accuracy_curve(
                rows, os.path.join(out, "accuracy_vs_step.png"), title="kNN accuracy"
            )
        )

    summary: dict[str, Any] = {
        "out": out,
        "checkpoint": last_info["checkpoint"],
        "step": last_info["step"],
        "untrained": bool(cfg.untrained),
        "metrics": last_result["metrics"],
        "files": files,
    }
    if cfg.probe.enabled:
        summary["probe"] = probe_outputs(cfg, last_sets["train"], last_sets["val"], out, last_info)
    if _has_text_space(run_cfg) and (cfg.zero_shot.enabled or cfg.explain.enabled):
        summary.update(language_outputs(cfg, run_cfg, final, table, transform, out))

    if cfg.mlflow.enabled:
        run_id = None if cfg.untrained else last_info.get("mlflow_run_id")
        sink = MLflowSink(cfg, run_cfg, run_id, f"{what} {final}")
        prefix = "eval_untrained" if cfg.untrained else "eval"
        for row in rows:
            sink.metrics(_nested(row), row["step"], prefix)
        if "zero_shot" in summary:
            sink.metrics(summary["zero_shot"], last_info["step"], "zero_shot")
        if "probe" in summary:
            sink.metrics(summary["probe"], last_info["step"], "probe")
        sink.artifacts(out)
        sink.close()
        summary["mlflow"] = {
            "tracking_uri": sink.uri,
            "run_id": sink.run_id,
            "new_run": sink.new_run,
        }
    write_json(
        os.path.join(out, "summary.json"),
        {k: v for k, v in summary.items() if k != "attribute_examples"},
    )
    return summary


def _ids(info: dict) -> dict:
    return {"checkpoint": info["checkpoint"], "step": info["step"], "epoch": info["epoch"]}


def write_json_dir(folder: str, payload: Mapping) -> None:
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "metrics.json"), payload)


def _nested(row: Mapping) -> dict:
    """A metrics.csv row back to ``{level: {metric: value}}``."""
    return {level: {key: row[f"{level}_{key}"] for key in SCALARS} for level in LEVELS}
