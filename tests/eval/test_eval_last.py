"""`hlss-eval ckpt=RUN` on a run that stopped between two step checkpoints: its final weights,
only in ``last.ckpt``, are evaluated too, and every output says which step they are."""

from __future__ import annotations

import json
import shutil

import pandas as pd

from tests.eval.test_eval_cli import FAST, run_eval


def test_last_checkpoint_past_the_newest_step_is_evaluated(tiny_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run["config"], run / "config.yaml")
    # the step checkpoint of the final step is missing: step 2 lives only in last.ckpt
    shutil.copy(tiny_run["checkpoints"][0], run / "checkpoints" / "step-0000001.ckpt")
    shutil.copy(tiny_run["last"], run / "checkpoints" / "last.ckpt")
    out = tmp_path / "ev"
    run_eval(
        f"ckpt={run}",
        f"out={out}",
        "mlflow.enabled=false",
        "zero_shot.enabled=false",
        "explain.enabled=false",
        "probe.enabled=false",
        *FAST,
    )
    table = pd.read_csv(out / "metrics.csv")
    assert table["step"].tolist() == [1, 2]
    assert table["checkpoint"].tolist() == ["step-0000001.ckpt", "last.ckpt"]
    final = json.loads((out / "metrics.json").read_text())
    assert final["step"] == 2 and final["checkpoint"].endswith("last.ckpt")
    for step in (1, 2):
        assert (out / "steps" / f"step-{step:07d}" / "metrics.json").is_file()
