"""Resuming a run: which checkpoint, into which folder, and whether this config still fits it.

A resumed run continues where its checkpoint was written: in the original run folder (its
``checkpoints/`` gets the new checkpoints, ``config-resume-<n>.yaml`` records the resumed
config) and in the same MLflow run. It starts a new folder (and a new MLflow run) instead when
continuing in place would rewrite history: the checkpoint is older than the run's ``last.ckpt``
(a branch from an earlier step), the checkpoint does not sit in an hlss run folder
(``<run>/checkpoints/*.ckpt`` beside ``<run>/config.yaml``), or that folder is not writable.

Compatibility rule (:func:`incompatible_keys`): the keys that decide the shapes of the weights
and the objective must equal the checkpoint's stored config (``checkpoint["hlss"]["config"]``):

* everything under ``model``, ``backbone``, ``text_encoder`` and ``attributes``, except keys
  named ``pretrained``, ``device`` and ``text_cache_dir`` (where initial weights and caches come
  from, and where the text encoder runs: the checkpoint's weights replace the initial ones);
* under ``loss``: every ``_target_`` and ``name`` (which objective, which language tie) and
  whether ``loss.align`` is set; the numbers (temperatures, level weights, balance) may change.

Everything else may change (``trainer.max_steps``, ``optimizer.lr``, ``loader.*``,
``logger``, ``paths``, ``dataset.root``...) and is recorded as a changed key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hlss.checkpoints import find_checkpoint, load_checkpoint_file
from hlss.errors import ConfigError, HLSSError

SHAPING_GROUPS = ("model", "backbone", "text_encoder", "attributes")
LOCATION_KEYS = ("pretrained", "device", "text_cache_dir")
NOT_COMPARED = ("resume",)  # differs on every resume by construction
SHOWN_KEYS = 8


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to resume from.

    Attributes:
        checkpoint: the checkpoint file (absolute).
        step: its global step.
        config: the resolved run config stored in it (``{}`` for a checkpoint without one).
        mlflow_run_id: the MLflow run it was logged to, if any.
        run_dir: the original run folder to continue in, or ``None``: start a new folder.
        shapes: ``state_dict`` key -> tensor shape, to check the model built for the resume.
    """

    checkpoint: str
    step: int
    config: dict
    mlflow_run_id: str | None
    run_dir: str | None
    shapes: dict[str, tuple[int, ...]] = field(repr=False, default_factory=dict)


def _step(path: str) -> int:
    return int(load_checkpoint_file(path, mmap=True).get("global_step", 0))


def continue_folder(checkpoint: str, step: int) -> str | None:
    """The run folder a resume from ``checkpoint`` (at ``step``) continues in, or ``None`` when
    it must start a new one (see the module docstring)."""
    ckpt_dir = os.path.dirname(checkpoint)
    run_dir = os.path.dirname(ckpt_dir)
    if os.path.basename(ckpt_dir) != "checkpoints":
        return None
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        return None
    if not (os.access(run_dir, os.W_OK) and os.access(ckpt_dir, os.W_OK)):
        return None
    last = os.path.join(ckpt_dir, "last.ckpt")
    if os.path.basename(checkpoint) != "last.ckpt" and os.path.isfile(last) and _step(last) > step:
        return None  # a branch from an earlier step: the run folder has moved on
    return run_dir


def resume_point(resume: str, search_root: str) -> ResumePoint:
    """Resolve ``resume=PATH|auto`` (see :func:`hlss.checkpoints.find_checkpoint`) and read what
    a resume needs from the checkpoint (memory-mapped: the weights are not read here).

    Raises:
        HLSSError: no checkpoint, or one that cannot be read.
    """
    path = os.path.abspath(find_checkpoint(resume, search_root))
    state = load_checkpoint_file(path, mmap=True)
    meta = state.get("hlss") or {}
    step = int(state.get("global_step", 0))
    shapes = {k: tuple(v.shape) for k, v in (state.get("state_dict") or {}).items()}
    return ResumePoint(
        checkpoint=path,
        step=step,
        config=dict(meta.get("config") or {}),
        mlflow_run_id=meta.get("mlflow_run_id"),
        run_dir=continue_folder(path, step),
        shapes=shapes,
    )


def differing_keys(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs; a subtree present on one side
    only is one key (``loss.align`` rather than each of its leaves). Sorted, ``resume`` left out."""
    if isinstance(stored, Mapping) and isinstance(current, Mapping):
        out: list[str] = []
        for key in sorted(set(stored) | set(current), key=str):
            dotted = f"{prefix}{key}"
            if dotted in NOT_COMPARED:
                continue
            if key not in stored or key not in current:
                out.append(dotted)
            else:
                out.extend(differing_keys(stored[key], current[key], dotted + "."))
        return out
    return [] if stored == current else [prefix.rstrip(".")]


def _shapes_training(key: str) -> bool:
    parts = key.split(".")
    if parts[-1] in LOCATION_KEYS:
        return False
    if parts[0] in SHAPING_GROUPS:
        return True
    if parts[0] == "loss":
        return parts[-1] in ("_target_", "name") or parts[1:] == ["align"]
    return False


def incompatible_keys(stored: Mapping, current: Mapping) -> list[str]:
    """The differing keys that the compatibility rule (module docstring) refuses."""
    return [k for k in differing_keys(stored, current) if _shapes_training(k)]


def _lookup(config: Mapping, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return "<unset>"
        node = node[part]
    return node


def _describe(stored: Mapping, current: Mapping, key: str) -> str:
    old, new = _lookup(stored, key), _lookup(current, key)
    scalar = (str, int, float, bool, type(None))
    if isinstance(old, scalar) and isinstance(new, scalar) and len(f"{old}{new}") <= 60:
        return f"{key} ({old} -> {new})"
    return key


def check_compatible(point: ResumePoint, current: Mapping) -> None:
    """Refuse to resume ``point`` with the run config ``current`` when keys that shape the model
    or the objective differ from the checkpoint's.

    Raises:
        ConfigError: one line naming the checkpoint and the differing keys (the first
            :data:`SHOWN_KEYS`, with both values when they are short scalars).
    """
    if not point.config:
        return  # a checkpoint from before configs were stored: the weights check decides
    keys = incompatible_keys(point.config, current)
    if not keys:
        return
    shown = ", ".join(_describe(point.config, current, k) for k in keys[:SHOWN_KEYS])
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    raise ConfigError(
        f"resume={point.checkpoint}: this config differs from the checkpoint's in {shown}{more}; "
        "resume with the checkpoint's settings, or start a new run without resume"
    )


def check_weights_fit(point: ResumePoint, state_dict: Mapping[str, Any]) -> None:
    """Refuse to resume when the model built now has other weights than the checkpoint (e.g. an
    attribute bank file that changed size behind the same config).

    Args:
        state_dict: the module's ``state_dict()`` (tensors, any device).

    Raises:
        HLSSError: one line naming the first differing weights.
    """
    if not point.shapes:
        return
    here = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = [f"{k} missing in the checkpoint" for k in here if k not in point.shapes]
    problems += [f"{k} not in this model" for k in point.shapes if k not in here]
    problems += [
        f"{k} {list(point.shapes[k])} in the checkpoint, {list(v)} here"
        for k, v in here.items()
        if k in point.shapes and point.shapes[k] != v
    ]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise HLSSError(
            f"resume={point.checkpoint}: the checkpoint's weights do not fit this model: "
            + "; ".join(problems[:3])
            + more
        )


def next_resume_number(run_dir: str) -> int:
    """1 + the number of ``config-resume-<n>.yaml`` files already in ``run_dir``."""
    n = 1
    while os.path.exists(os.path.join(run_dir, f"config-resume-{n}.yaml")):
        n += 1
    return n
