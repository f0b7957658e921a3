"""Training progress over the whole run: global step / total steps, images per second, ETA.

The hierarchical sampler's epochs are short and the run is driven by ``trainer.max_steps``, so
Lightning's per-epoch bar ("Epoch 33/-2", an ETA for a 3-step epoch) says nothing useful.
:class:`StepProgressBar` shows one bar for the run on a terminal::

    step 120/2000 |███▋      | 134 img/s | loss 3.21 | ETA 14:02

and, when stderr is not a terminal (cluster logs), a line through the ``hlss.progress`` logger
(so it reaches Hydra's console and the run's log file once) every 10% of the run, at least
every 30 s, and optionally every ``every_n_steps`` steps, plus a closing line::

    step 120/2000 (6%) | 134 img/s | loss 3.21 | ETA 0:14:02
    step 2000/2000 (100%) done in 0:15:10 | 131 img/s | loss 2.87

It is the ``progress`` entry of the ``callbacks`` group (``~callbacks.progress`` drops it and
Lightning's own bar returns); as a Lightning ``ProgressBar`` it replaces Lightning's default.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar

from hlss.progress import Progress, format_rate

BAR_FORMAT = "step {n_fmt}/{total_fmt} |{bar}| {desc} | ETA {remaining}"


def images_in(batch: Any) -> int:
    """Images of one batch on one process: ``P * S * N * T`` of ``batch["image"]``
    ``[P, S, N, T, C, H, W]`` (0 when the batch has no such tensor)."""
    image = batch.get("image") if isinstance(batch, dict) else None
    shape = getattr(image, "shape", ())
    return math.prod(shape[:4]) if len(shape) >= 4 else 0


def total_steps(trainer: L.Trainer) -> int | None:
    """Optimizer steps of the whole run: ``trainer.max_steps``, or Lightning's estimate when
    the run is bounded by epochs instead (``None`` when unbounded)."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimate = trainer.estimated_stepping_batches
    return int(estimate) if math.isfinite(estimate) else None


class StepProgressBar(ProgressBar):
    """One progress display for the run, on global rank 0 (see the module).

    Args:
        every_n_steps: log mode: also a line every this many steps (``None``: only every 10%
            and every ``every_s``).
        every_s: log mode: longest silence between lines (``None``: ``$HLSS_PROGRESS_EVERY``
            or 30 s).
        mode: ``None`` (``$HLSS_PROGRESS``, default auto), ``auto``, ``bar``, ``log``, ``off``.
        clock: seconds, monotonic (tests pass a fake one).

    Images per second count ``P * S * N * T`` images per batch and process, times the world
    size, since the start of this fit (a resumed run counts from its resumed step).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_s: float | None = None,
        mode: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        self.every_n_steps = int(every_n_steps) if every_n_steps else None
        self.every_s = every_s
        self.mode = mode
        self.clock = clock
        self.enabled = True
        self.images = 0
        self.progress: Progress | None = None

    # -- Lightning's ProgressBar interface ----------------------------------------------------

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    # -- what is shown --------------------------------------------------------------------------

    def images_per_second(self) -> float | None:
        """Images (all processes) per second since the start of the fit."""
        if self.progress is None or self.progress.elapsed <= 0:
            return None
        return self.images / self.progress.elapsed

    def postfix(self, trainer: L.Trainer) -> str:
        """``<img/s> img/s | loss <loss>`` (the parts known so far)."""
        parts = []
        rate = self.images_per_second()
        if rate is not None and self.images:
            parts.append(f"{format_rate(rate)} img/s")
        loss = trainer.progress_bar_metrics.get("loss")
        if isinstance(loss, int | float) and math.isfinite(loss):
            parts.append(f"loss {loss:.4g}")
        return " | ".join(parts)

    # -- hooks --------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        self.images = 0
        self.progress = Progress(
            total_steps(trainer),
            "step",
            initial=int(trainer.global_step),
            mode=self.mode,
            every_s=self.every_s,
            every_n=self.every_n_steps,
            show_rate=False,
            closing_line=True,
            bar_format=BAR_FORMAT,
            clock=self.clock,
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self.progress is None:
            return
        self.images += images_in(batch) * max(1, int(trainer.world_size))
        step = int(trainer.global_step)
        self.progress.advance_to(step, lambda: self.postfix(trainer))
        if self.progress.total is not None and step >= self.progress.total:
            self._close(trainer)  # before Lightning's "`Trainer.fit` stopped" line

    def _close(self, trainer: L.Trainer) -> None:
        if self.progress is not None:
            self.progress.advance_to(int(trainer.global_step))
            self.progress.close(self.postfix(trainer))
            self.progress = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(trainer)  # a run that stopped before its last step

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self.progress is not None:
            self.progress.close(finished=False)
            self.progress = None


class NoProgress(Callback):
    """Stands in for the progress bar when ``trainer.enable_progress_bar`` is false (Lightning
    refuses a progress-bar callback then)."""


def progress_bar(
    enabled: bool = True,
    every_n_steps: int | None = None,
    every_s: float | None = None,
    mode: str | None = None,
) -> Callback:
    """The ``callbacks.progress`` node: a :class:`StepProgressBar`, or :class:`NoProgress` when
    ``enabled`` (``${trainer.enable_progress_bar}``) is false."""
    if not enabled:
        return NoProgress()
    return StepProgressBar(every_n_steps=every_n_steps, every_s=every_s, mode=mode)
