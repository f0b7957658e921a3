"""Running `hlss-train` in-process on tiny generated data."""

from __future__ import annotations

import glob
import json
import os
import sys

from hlss.cli import train as train_cli

# a CPU run of seconds: 32-px synthetic SRH patches, 4 patients x 2 x 2 x 2 images per step
TINY = [
    "dataset.table.size=32",
    "dataset.table.patients_per_class=2",
    "dataset.table.patches_per_slide=4",
    "loader.patients=4",
    "loader.num_workers=0",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "text_encoder=tiny",
    "checkpoint.every_n_steps=1",
]


def run_train(*args: str) -> None:
    """Run ``hlss-train *args`` in this process (raises SystemExit on user errors)."""
    argv = sys.argv
    sys.argv = ["hlss-train", *args]
    try:
        train_cli.main()
    finally:
        sys.argv = argv


def summaries(root: str) -> list[dict]:
    """The summary.json of every run below ``root``, oldest first."""
    paths = glob.glob(os.path.join(root, "**", "summary.json"), recursive=True)
    return [json.load(open(p)) for p in sorted(paths, key=os.path.getmtime)]


def read_batches(run_dir: str, rank: int = 0) -> list[dict]:
    with open(os.path.join(run_dir, f"batches-rank{rank}.jsonl")) as handle:
        return [json.loads(line) for line in handle]
