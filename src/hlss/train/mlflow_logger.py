"""The training run's MLflow logger: Lightning's ``MLFlowLogger`` writing steps in batches.

Lightning logs a step's metrics with one MLflow ``log_batch`` per call, two calls a step here
(the losses, the learning rate). Against a sqlite store each call is a transaction: ~15 ms of
the training process a step on a 2-core CPU, which a GPU step of ~100 ms waits for.
:class:`BufferedMLFlowLogger` keeps the metrics of up to ``flush_every_n_steps`` steps (or
``flush_every_s`` seconds) and writes them in one call (~2 ms a step for 10 steps;
``benchmarks/bench_logger.py``). Every metric
still carries its own step and time. Nothing is lost on the way out: the buffer is written
when a checkpoint is saved, when the run ends, fails or is stopped by a signal (Lightning
finalizes its loggers then), and at interpreter exit. A run stopped by a signal ends ``KILLED``
in MLflow, one that failed ``FAILED``.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import re
import sys
import time
import weakref
from collections.abc import Mapping

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

_NOT_IN_A_KEY = re.compile(r"[^a-zA-Z0-9_/. -]+")  # what MLflow refuses in a metric name

# loggers with metrics still buffered, written at interpreter exit
_OPEN: weakref.WeakSet = weakref.WeakSet()


def _flush_open_loggers() -> None:
    for logger in list(_OPEN):
        try:
            logger.flush()
        except Exception as err:  # at exit: report, never raise
            log.warning("could not write buffered MLflow metrics: %s", err)


atexit.register(_flush_open_loggers)


class BufferedMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` whose metrics reach MLflow in batches of steps (see the module).

    Args:
        flush_every_n_steps: write once this many steps' metrics are buffered (1: every step,
            as ``MLFlowLogger`` does).
        flush_every_s: write when the oldest buffered metric is this many seconds old, so a
            slow run still shows its curves as it goes.
        *args, **kwargs: ``MLFlowLogger``'s arguments.

    Raises:
        ValueError: ``flush_every_n_steps`` < 1 or ``flush_every_s`` <= 0.
    """

    def __init__(self, *args, flush_every_n_steps: int = 10, flush_every_s: float = 30.0, **kwargs):
        if int(flush_every_n_steps) < 1:
            raise ValueError(f"flush_every_n_steps must be >= 1, got {flush_every_n_steps}")
        if not float(flush_every_s) > 0:
            raise ValueError(f"flush_every_s must be > 0, got {flush_every_s}")
        super().__init__(*args, **kwargs)
        self.flush_every_n_steps = int(flush_every_n_steps)
        self.flush_every_s = float(flush_every_s)
        self._pending: list = []  # mlflow.entities.Metric
        self._pending_steps: set[int] = set()
        self._oldest: float | None = None
        self._renamed: set[str] = set()  # metric names already warned about
        _OPEN.add(self)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = time.time()
        if self._prefix:
            metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        for key, value in metrics.items():
            if isinstance(value, str):
                log.warning("not logging the text metric %s=%s", key, value)
                continue
            name = _NOT_IN_A_KEY.sub("", key)
            if name != key and key not in self._renamed:
                self._renamed.add(key)
                log.warning("MLflow metric %r logged as %r (characters MLflow refuses)", key, name)
            self._pending.append(Metric(name, float(value), int(now * 1000), step or 0))
        self._pending_steps.add(step or 0)
        self._oldest = now if self._oldest is None else self._oldest
        if (
            len(self._pending_steps) >= self.flush_every_n_steps
            or now - self._oldest >= self.flush_every_s
        ):
            self.flush()

    def flush(self) -> None:
        """Write the buffered metrics to MLflow (one ``log_batch``; nothing when none wait)."""
        if not self._pending:
            return
        pending = self._pending
        self._pending, self._pending_steps, self._oldest = [], set(), None
        for start in range(0, len(pending), 1000):  # MLflow takes up to 1,000 metrics a call
            self.experiment.log_batch(
                run_id=self.run_id, metrics=pending[start : start + 1000], **self._log_batch_kwargs
            )

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.flush()  # the run's curves reach at least the checkpoint a resume starts from
        super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Write what is buffered and end the MLflow run. A run stopped by a signal or Ctrl-C
        (Lightning finalizes with ``"failed"`` while the ``SystemExit`` of
        :class:`hlss.train.preemption.Preemption` or the ``KeyboardInterrupt`` is handled) ends
        ``KILLED``, as MLflow names a run stopped from outside; it resumes. Errors end ``FAILED``."""
        self.flush()
        if status == "failed" and isinstance(sys.exc_info()[1], (SystemExit, KeyboardInterrupt)):
            status = "KILLED"
        super().finalize(status)


def _signature() -> inspect.Signature:
    """``MLFlowLogger``'s parameters and this class's own, for the config check (which holds a
    config's keys against the target's signature; ``**kwargs`` alone would admit any key)."""
    base = inspect.signature(MLFlowLogger.__init__)
    own = inspect.signature(BufferedMLFlowLogger.__init__)
    params = [p for p in base.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [
        own.parameters[name].replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=kind)
        for name, kind in (("flush_every_n_steps", int), ("flush_every_s", float))
    ]
    positional = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return base.replace(parameters=positional + keyword)


BufferedMLFlowLogger.__init__.__signature__ = _signature()
