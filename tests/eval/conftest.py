"""Shared evaluation fixtures: one tiny trained run per test session."""

from __future__ import annotations

import glob
import os

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, _session_cache) -> dict:
    """A 2-step ``hlss-train`` run on 32-px synthetic SRH patches (CPU, a few seconds, once).

    Trained in-process with ``tests.train.helpers.TINY`` (text_encoder=tiny, default loss
    ``attr3levels`` with text heads, ResNet-18, a checkpoint every step), ``logger=none``, into a
    session temp folder; synthetic data and text embeddings go to the session ``$HLSS_CACHE``.
    Treat it as read-only: copy files before changing them.

    Returns:
        ``{"run_dir": str, "checkpoints": [step-0000001.ckpt, step-0000002.ckpt] (step order),
        "config": <run_dir>/config.yaml, "last": <run_dir>/checkpoints/last.ckpt}``.
    """
    from tests.train.helpers import TINY, run_train

    root = tmp_path_factory.mktemp("tiny-run")
    run_train(*TINY, "logger=none", f"paths.root={root / 'outputs'}")
    configs = glob.glob(os.path.join(str(root), "outputs", "**", "config.yaml"), recursive=True)
    configs = [c for c in configs if os.sep + ".hydra" + os.sep not in c]
    assert len(configs) == 1, configs
    run_dir = os.path.dirname(configs[0])
    checkpoints = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step-*.ckpt")))
    assert len(checkpoints) == 2, checkpoints
    return {
        "run_dir": run_dir,
        "checkpoints": checkpoints,
        "config": configs[0],
        "last": os.path.join(run_dir, "checkpoints", "last.ckpt"),
    }
