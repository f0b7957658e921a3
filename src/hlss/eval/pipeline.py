"""One evaluation from a composed ``eval`` config: checkpoints -> embeddings -> kNN -> outputs.

For every checkpoint (step order): embed the train and val patches (base transform only, cached
on disk), classify val patches by weighted cosine kNN against the train bank, aggregate to slides
and patients, compute the metrics (:mod:`hlss.eval.protocol`). The final checkpoint also gets
predictions, confusion matrices, zero-shot classification, attribute retrieval and a linear
probe. Everything is written to ``out`` (:mod:`hlss.eval.writers`) and logged to the MLflow run
that trained the checkpoint (:class:`hlss.tracking.EvalSink`) under metric names that carry the
evaluation's settings (:mod:`hlss.eval.settings`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

from hlss.checkpoints import load_checkpoint_file
from hlss.config import build
from hlss.eval.embed import EmbeddingSet, cached_embeddings
from hlss.eval.protocol import (
    SCALARS,
    knn_evaluate,
    metrics_row,
    nested_metrics,
    score_levels,
    summed_groups,
)
from hlss.eval.restore import (
    checkpoint_info,
    list_checkpoints,
    load_trained_model,
    run_config_for,
    untrained_model,
)
from hlss.eval.settings import metric_prefixes, tracking_params, used_config
from hlss.eval.writers import (
    prepare_out,
    write_config,
    write_level_outputs,
    write_metrics_table,
    write_step_metrics,
    write_summary,
)
from hlss.levels import LEVELS

log = logging.getLogger(__name__)


def _bootstrap(cfg: DictConfig) -> dict:
    """The bootstrap arguments of :func:`hlss.eval.protocol.score_levels` from ``cfg``."""
    return {
        "n_boot": int(cfg.bootstrap.n),
        "ci_level": float(cfg.bootstrap.level),
        "seed": int(cfg.seed),
    }


def _embed_sets(
    cfg, run_cfg, ckpt, table, transform, source, splits=("train", "val")
) -> dict[str, EmbeddingSet]:
    """The embedding sets of ``splits`` of one checkpoint (or of the untrained model), cached."""
    if cfg.untrained:
        factory, ckpt_key = (lambda: untrained_model(run_cfg)), None
    else:
        factory, ckpt_key = (lambda: load_trained_model(ckpt, run_cfg)[0]), ckpt
    kwargs = {
        "batch_size": int(cfg.embed.batch_size),
        "num_workers": int(cfg.embed.num_workers),
        "device": cfg.embed.device,
    }
    return {
        split: cached_embeddings(
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
        for split in splits
    }


def _text_encoder_node(run_cfg: DictConfig):
    """The run's text encoder node: ``model.text_encoder`` (resolved run configs), else the
    top-level ``text_encoder`` group."""
    model = run_cfg.get("model")
    node = model.get("text_encoder") if isinstance(model, DictConfig) else None
    return node if node is not None else run_cfg.text_encoder


def _in_folder(folder: str, files: dict[str, str]) -> dict[str, str]:
    """``files`` keys prefixed with ``<folder>/`` (the keys of ``summary.json``'s ``files``)."""
    return {f"{folder}/{key}": path for key, path in files.items()}


def class_prompt_file(prompts: str, classes: list[str]) -> str | None:
    """The class-prompt file for ``zero_shot.prompts``: ``auto`` picks the packaged prompts whose
    classes are exactly ``classes`` (OpenSRH's seven) and ``None`` when none are packaged;
    anything else is returned as given (a packaged name or a path)."""
    if prompts != "auto":
        return prompts
    from hlss import CLASSES_OPENSRH

    return "opensrh_classes" if sorted(classes) == sorted(CLASSES_OPENSRH) else None


def language_outputs(cfg, run_cfg, ckpt, table, transform, out, info) -> dict:
    """Zero-shot classification (``zero_shot/``) and attribute retrieval (``attributes.csv``) of
    the final checkpoint of a model with a text space.

    Returns:
        ``{"files": {...}}`` plus, when enabled, ``zero_shot`` (metrics), ``attributes_csv``,
        ``attribute_examples`` and ``explain_quality``.
    """
    from hlss.config import attribute_banks
    from hlss.eval.explain import (
        explain_levels,
        explanation_quality,
        format_examples,
        write_explanations,
    )
    from hlss.eval.zero_shot import load_class_prompts, zero_shot_scores
    from hlss.models.text import embed_prompts

    results: dict[str, Any] = {"files": {}}
    val = _embed_sets(cfg, run_cfg, ckpt, table, transform, "text_space", ("val",))["val"]
    prompt_file = class_prompt_file(str(cfg.zero_shot.prompts), list(val.classes))
    if cfg.zero_shot.enabled and prompt_file is None:
        log.warning(
            "zero-shot skipped: no packaged class prompts for the classes %s; "
            "give zero_shot.prompts=/path/prompts.yaml ({class: [descriptions]})",
            ", ".join(map(str, val.classes)),
        )
    if cfg.zero_shot.enabled and prompt_file is not None:
        prompts = load_class_prompts(prompt_file, list(val.classes))
        encoder = build(_text_encoder_node(run_cfg))
        class_text = embed_prompts(encoder, prompts, run_cfg.model.get("text_cache_dir"))
        scores = zero_shot_scores(
            val.features, class_text, temperature=float(cfg.zero_shot.temperature)
        )
        result = score_levels(val, scores, summed_groups(scores), **_bootstrap(cfg))
        files = write_level_outputs(os.path.join(out, "zero_shot"), result, info, "zero-shot")
        results["files"].update(_in_folder("zero_shot", files))
        results["zero_shot"] = result["metrics"]
    if cfg.explain.enabled:
        df = explain_levels(
            val.features,
            val.index,
            _text_embeddings(cfg, run_cfg, ckpt),
            attribute_banks(run_cfg),
            k=int(cfg.explain.k),
            patches=cfg.explain.patches,
            readout=cfg.explain.readout,
        )
        path = os.path.join(out, "attributes.csv")
        write_explanations(df, path)
        results["attributes_csv"] = results["files"]["attributes"] = path
        results["attribute_examples"] = format_examples(df, n_per_level=2)
        results["explain_quality"] = explanation_quality(df)
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


def probe_outputs(
    cfg, train: EmbeddingSet, val: EmbeddingSet, out: str, info: dict
) -> tuple[dict, dict[str, str]]:
    """Linear probe (logistic regression on frozen features, train patients -> val patients)
    into ``probe/``; returns its metrics and the files written."""
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
    result = score_levels(val, probs, summed_groups(probs), **_bootstrap(cfg))
    files = write_level_outputs(os.path.join(out, "probe"), result, info, "linear probe")
    return result["metrics"], _in_folder("probe", files)


def log_to_mlflow(
    cfg, run_cfg, summary: dict, rows: list[dict], run_id: str | None, description: str
) -> dict:
    """Per-checkpoint kNN metrics, zero-shot and probe metrics, the settings and the output
    folder to the MLflow run ``run_id`` in the training run's store (a new eval run when it is
    not found).

    Metric names are ``<prefix>/<level>_<metric>`` with the prefixes of
    :func:`hlss.eval.settings.metric_prefixes` (``summary["metric_prefixes"]``); the settings
    that define a prefix are params ``<prefix>.<setting>`` (:func:`tracking_params`: never two
    values under one key), while the backend, checkpoint and output folder of the latest
    evaluation under that prefix are tags ``<prefix>.backend|ckpt|out``; ``config.yaml`` in the
    uploaded folder keeps every setting of each evaluation.

    Returns:
        ``{"tracking_uri", "run_id", "new_run"}``.
    """
    from hlss.tracking import EvalSink, default_tracking_uri

    uri = (
        cfg.mlflow.tracking_uri
        or (run_cfg.get("logger") or {}).get("tracking_uri")
        or default_tracking_uri()
    )
    sink = EvalSink(str(uri), run_id, str(cfg.mlflow.experiment), description)
    prefixes = summary["metric_prefixes"]
    from hlss.eval.knn import resolve_backend

    backend = resolve_backend(str(cfg.knn.backend), cfg.embed.device)  # what "auto" chose
    latest = {"backend": backend, "ckpt": summary["checkpoint"], "out": summary["out"]}
    knn = prefixes["knn"].replace("/", ".")
    sink.log_settings(tracking_params(cfg, run_cfg), {f"{knn}.{k}": v for k, v in latest.items()})
    for row in rows:
        sink.log_levels(nested_metrics(row), row["step"], prefixes["knn"], SCALARS)
    for name in ("zero_shot", "probe"):
        if name in summary:
            sink.log_levels(summary[name], summary["step"], prefixes[name], SCALARS)
    sink.log_folder(summary["out"])
    sink.close()
    return {"tracking_uri": sink.uri, "run_id": sink.run_id, "new_run": sink.new_run}


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation described by an ``eval`` config (``conf/eval.yaml``).

    Returns:
        The summary also written to ``<out>/summary.json``: ``out``, ``checkpoint``, ``step``
        (the step of every metric file), ``untrained``, ``metric_prefixes`` (MLflow names, see
        :mod:`hlss.eval.settings`), ``metrics`` (``{level: {...}}`` of the final checkpoint),
        ``files`` (every file written, ``config.yaml`` and ``summary.json`` included), and when
        enabled ``probe``, ``zero_shot``, ``attributes_csv``, ``mlflow``.

    Raises:
        HLSSError: (one line) a missing or unreadable checkpoint or run config, a non-empty
            ``out``, weights that do not fit the run config, bad data or settings.
    """
    from hlss.config import has_text_space

    checkpoints = list_checkpoints(str(cfg.ckpt))
    final = checkpoints[-1]
    run_cfg = run_config_for(final)
    dataset_cfg = cfg.dataset if cfg.get("dataset") else run_cfg.dataset
    if cfg.untrained:
        checkpoints = [final]  # the initialisation is one model, whatever the run saved
    out = prepare_out(cfg.out, final)
    files = {"config": write_config(out, used_config(cfg, dataset_cfg, checkpoints))}
    table = build(dataset_cfg.table)
    transform = build(dataset_cfg.transform)
    what = "untrained" if cfg.untrained else "checkpoint"
    knn = {
        "k": int(cfg.knn.k),
        "temperature": float(cfg.knn.temperature),
        "aggregate": str(cfg.aggregate),
        "backend": str(cfg.knn.backend),
        "device": cfg.embed.device,
        **_bootstrap(cfg),
    }
    rows: list[dict] = []
    for ckpt in checkpoints:
        info = checkpoint_info(ckpt)
        if cfg.untrained:
            info.update(step=0, epoch=0)
        sets = _embed_sets(cfg, run_cfg, ckpt, table, transform, str(cfg.features))
        result = knn_evaluate(sets["train"], sets["val"], **knn)
        rows.append(metrics_row(info, result["metrics"]))
        if len(checkpoints) > 1:
            path = write_step_metrics(out, result["metrics"], info)
            files[os.path.splitext(os.path.relpath(path, out))[0]] = path  # steps/step-N/metrics
        acc = {level: result["metrics"][level]["acc"] for level in LEVELS}
        log.info(
            "%s %s step %d: patch %.3f slide %.3f patient %.3f",
            what,
            os.path.basename(ckpt),
            info["step"],
            acc["patch"],
            acc["slide"],
            acc["patient"],
        )
    # after the loop: result, sets and info are the final checkpoint's
    files.update(write_level_outputs(out, result, info, f"step {info['step']}"))
    files.update(write_metrics_table(out, rows))
    summary: dict[str, Any] = {
        "out": out,
        "checkpoint": info["checkpoint"],
        "step": info["step"],
        "untrained": bool(cfg.untrained),
        "metric_prefixes": metric_prefixes(cfg, run_cfg),
        "metrics": result["metrics"],
        "files": files,
    }
    if cfg.probe.enabled:
        summary["probe"], probe_files = probe_outputs(cfg, sets["train"], sets["val"], out, info)
        files.update(probe_files)
    if has_text_space(run_cfg) and (cfg.zero_shot.enabled or cfg.explain.enabled):
        language = language_outputs(cfg, run_cfg, final, table, transform, out, info)
        files.update(language.pop("files"))
        summary.update(language)
    files["summary"] = write_summary(out, summary)  # in the folder MLflow receives
    if cfg.mlflow.enabled:
        run_id = None if cfg.untrained else info.get("mlflow_run_id")
        summary["mlflow"] = log_to_mlflow(cfg, run_cfg, summary, rows, run_id, f"{what} {final}")
        write_summary(out, summary)
    return summary
