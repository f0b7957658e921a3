"""Training progress: one display over the whole run (step / max_steps, img/s, ETA)."""

from __future__ import annotations

import glob
import logging
import os
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ProgressBar

from hlss.config import build_callbacks
from hlss.train.progress import NoProgress, StepProgressBar, images_in, progress_bar
from tests.test_configs import train_cfg
from tests.train.helpers import TINY, run_train


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_trainer(step: int = 0, max_steps: int = 100, world_size: int = 2) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=step,
        max_steps=max_steps,
        world_size=world_size,
        is_global_zero=True,
        progress_bar_metrics={"loss": 3.21},
    )


def batch(p: int = 4, s: int = 2, n: int = 2, t: int = 2) -> dict:
    return {"image": torch.zeros(p, s, n, t, 1, 1, 1)}  # [P, S, N, T, C, H, W]


@pytest.fixture
def lines(caplog, monkeypatch):
    monkeypatch.delenv("HLSS_PROGRESS", raising=False)
    monkeypatch.delenv("HLSS_PROGRESS_EVERY", raising=False)
    caplog.set_level(logging.INFO, logger="hlss.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "hlss.progress"]


def run_steps(bar: StepProgressBar, trainer, clock: FakeClock, steps: int, seconds: float) -> None:
    for _ in range(steps):
        clock.now += seconds
        trainer.global_step += 1
        bar.on_train_batch_end(trainer, None, None, batch(), trainer.global_step - 1)


def test_images_per_batch_are_p_s_n_t():
    assert images_in(batch(4, 2, 2, 2)) == 32
    assert images_in({"image": torch.zeros(3, 5)}) == 0 and images_in([1, 2]) == 0


def test_eta_and_images_per_second_on_a_fake_trainer(lines):
    clock, trainer = FakeClock(), fake_trainer()
    bar = StepProgressBar(every_n_steps=10, mode="log", clock=clock)
    bar.on_train_start(trainer, None)
    run_steps(bar, trainer, clock, steps=10, seconds=0.5)
    # 32 images per batch and process x 2 processes / 0.5 s; 90 steps left at 0.5 s each
    assert lines()[-1] == "step 10/100 (10%) | 128 img/s | loss 3.21 | ETA 0:00:45"
    run_steps(bar, trainer, clock, steps=90, seconds=0.5)
    assert lines()[-1] == "step 100/100 (100%) done in 0:00:50 | 128 img/s | loss 3.21"
    assert bar.progress is None  # closed at the last step
    bar.on_train_end(trainer, None)
    assert len([line for line in lines() if "done in" in line]) == 1


def test_a_resumed_run_counts_from_its_step(lines):
    clock, trainer = FakeClock(), fake_trainer(step=50, world_size=1)
    bar = StepProgressBar(every_n_steps=10, mode="log", clock=clock)
    bar.on_train_start(trainer, None)
    run_steps(bar, trainer, clock, steps=10, seconds=2.0)
    assert lines()[-1] == "step 60/100 (60%) | 16.0 img/s | loss 3.21 | ETA 0:01:20"


def test_only_rank_zero_reports(lines):
    clock, trainer = FakeClock(), fake_trainer()
    trainer.is_global_zero = False
    bar = StepProgressBar(every_n_steps=1, mode="log", clock=clock)
    bar.on_train_start(trainer, None)
    run_steps(bar, trainer, clock, steps=3, seconds=40)
    bar.on_train_end(trainer, None)
    assert lines() == []


def test_the_callbacks_group_replaces_lightnings_bar(tmp_path):
    cfg = train_cfg(tmp_path)
    (ours,) = [c for c in build_callbacks(cfg) if isinstance(c, ProgressBar)]
    assert isinstance(ours, StepProgressBar)
    trainer = L.Trainer(callbacks=[ours], logger=False, enable_checkpointing=False)
    assert trainer.progress_bar_callback is ours
    assert [c for c in trainer.callbacks if isinstance(c, ProgressBar)] == [ours]
    # ~callbacks.progress drops it; enable_progress_bar=false leaves no bar at all
    dropped = build_callbacks(train_cfg(tmp_path, "~callbacks.progress"))
    assert not any(isinstance(c, StepProgressBar | NoProgress) for c in dropped)
    off = build_callbacks(train_cfg(tmp_path, "trainer.enable_progress_bar=false"))
    assert any(isinstance(c, NoProgress) for c in off)
    assert not any(isinstance(c, ProgressBar) for c in off)
    assert isinstance(progress_bar(enabled=False), NoProgress)


def test_a_tiny_run_logs_steps_and_images_per_second(tmp_path, monkeypatch, capsys):
    """The default config (MLflow on), another working directory, output not a terminal."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HLSS_PROGRESS", raising=False)
    monkeypatch.delenv("HLSS_PROGRESS_EVERY", raising=False)
    run_train(*TINY, "trainer.enable_progress_bar=true", "callbacks.progress.every_n_steps=1")
    captured = capsys.readouterr()
    (log_file,) = glob.glob(str(tmp_path / "outputs" / "**" / "*.log"), recursive=True)
    with open(log_file, encoding="utf-8") as handle:
        logged = handle.read()
    step = re.compile(r"step (\d+)/2 \(\d+%\) \| [\d.]+ img/s \| loss [\d.]+ \| ETA \d:\d\d:\d\d")
    assert [m.group(1) for m in step.finditer(logged)] == ["1"]  # step 2 is the closing line
    closing = re.findall(r"step 2/2 \(100%\) done in \d:\d\d:\d\d \| [\d.]+ img/s", logged)
    assert len(closing) == 1
    assert len(re.findall(r"step 2/2 \(100%\) done in", captured.out + captured.err)) == 1
    # Lightning's per-epoch bar is gone
    assert "Epoch" not in captured.err and "it/s" not in captured.err
    assert os.path.isfile(os.path.join(os.path.dirname(log_file), "summary.json"))
