"""Stopping a training run on a signal with a checkpoint of the last completed step.

SIGINT (Ctrl-C), SIGTERM (cluster preemption, ``scancel``, ``kill``) and SIGUSR1 (SLURM's
warning ahead of the time limit, ``--signal=USR1@S``, which submitit requests) only set a flag;
at the end of the training step in progress every process saves ``last.ckpt`` in the run's
checkpoint folder (atomically, like every checkpoint), rank 0 prints one line with the command
that resumes the run, and the process exits with ``128 + signal number``: 130 for SIGINT, 143
for SIGTERM, 138 for SIGUSR1 on Linux, so a scheduler sees a run that did not finish.

A second Ctrl-C stops at once without a checkpoint (exit 1). ``kill -9`` cannot be caught: it
loses the steps since the last periodic checkpoint, and never leaves a truncated one.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from hlss.data.datamodule import STOP_SIGNALS

log = logging.getLogger(__name__)


def exit_code(signum: int) -> int:
    """The shell's status of a process ended by ``signum``: ``128 + signum``."""
    return 128 + int(signum)


def launch_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (a sweep member's own values), or
    none outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def _is_resume(override: str) -> bool:
    return override.lstrip("+~").split("=", 1)[0] == "resume"


class Preemption(Callback):
    """Saves ``last.ckpt`` and exits non-zero on SIGINT, SIGTERM or SIGUSR1 (always on).

    Handlers are installed when training starts (after Lightning's own SIGTERM handler, which
    would end the run with status 0 and no checkpoint) and the previous ones are restored when
    training ends or fails. Under DDP all ranks agree at each step end whether any received a
    signal, so every rank stops at the same step; only rank 0 prints. After the checkpoint, a
    SIGUSR1 handler that was installed before training (submitit's or Lightning's SLURM requeue)
    is called, so the job is requeued.

    Args:
        program: the command named in the resume line.
        overrides: the run's command-line overrides, repeated in the resume line (any
            ``resume=`` among them is replaced).
    """

    def __init__(self, program: str = "hlss-train", overrides: Sequence[str] = ()):
        self.program = program
        self.overrides = [str(o) for o in overrides if not _is_resume(str(o))]
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    # ----------------------------------------------------------------- handlers

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            self._restore()  # second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        if self.received is None:
            self.received = int(signum)

    def _install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        self._install()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    # ----------------------------------------------------------------- stopping

    def _agreed_signal(self, trainer: L.Trainer) -> int:
        """The signal to stop on (0: none), the same on every rank."""
        received = self.received
        if received is None and trainer.received_sigterm:  # came before training started
            received = int(signal.SIGTERM)
        if trainer.world_size <= 1:
            return received or 0
        flag = torch.tensor(received or 0, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(flag, reduce_op="max").item())

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> str:
        """``last.ckpt`` in the folder of the run's periodic checkpoints (``<run>/checkpoints``
        when there is no checkpoint callback)."""
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        folder = folder or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(os.path.abspath(str(folder)), "last.ckpt")

    def resume_command(self, checkpoint: str) -> str:
        """The command that continues from ``checkpoint``: the run folder when the checkpoint
        is in ``<run>/checkpoints``, else the file, then the run's overrides."""
        folder = os.path.dirname(checkpoint)
        target = (
            os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else checkpoint
        )
        words = [self.program, f"resume={target}", *self.overrides]
        return " ".join(shlex.quote(w) for w in words)

    @staticmethod
    def _log_step(trainer: L.Trainer) -> None:
        """Hand the stopped step's metrics to the loggers, as Lightning would have right after
        the callbacks' ``on_train_batch_end`` (the stop comes first), at the step number it
        would have used; the checkpoint then writes out what the logger buffers. Without this a
        stopped and resumed run's curves miss the stopped step."""
        connector = trainer._logger_connector
        if trainer.loggers and connector.should_update_logs:
            connector.log_metrics(connector.metrics["log"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._agreed_signal(trainer)
        if not signum:
            return
        self._log_step(trainer)
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the full training state
        name = signal.Signals(signum).name
        if trainer.is_global_zero:
            print(
                f"{name}: stopped after step {trainer.global_step}, saved {path}; "
                f"resume with: {self.resume_command(path)}",
                file=sys.stderr,
                flush=True,
            )
        previous = self._previous.get(signum)
        self._restore()
        if signum == getattr(signal, "SIGUSR1", None) and callable(previous):
            log.info("passing %s on to the handler installed before training", name)
            previous(signum, None)  # e.g. submitit: requeue the job (it may exit itself)
        raise SystemExit(exit_code(signum))
