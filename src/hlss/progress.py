"""Progress of long jobs: a tqdm bar on a terminal, periodic log lines in cluster logs.

Every long job of hlss (training steps, embedding extraction, kNN search, zero-shot scoring,
the validator's file checks, writing a synthetic dataset) reports through :class:`Progress`:

* ``bar`` (stderr is a terminal): a tqdm bar with counts, rate and ETA, on stderr;
* ``log`` (stderr is not a terminal: batch jobs, ``| tee``, captured output): one line
  ``embedding val 1200/5000 patches (24%) | 410 patches/s | ETA 0:00:09`` whenever another 10%
  is done (at most one per 5 s) and at least every 30 s, and a closing
  ``... done in 0:00:12 ...`` line (left out for jobs of under 2 s that printed nothing else);
* ``off``: nothing.

Lines go to the ``hlss.progress`` logger when logging is set up at INFO (Hydra's console and
log file of ``hlss-train``/``hlss-eval``), else to stderr. The environment chooses:
``HLSS_PROGRESS=auto|bar|log|off`` (default ``auto``: ``bar`` on a terminal, else ``log``) and
``HLSS_PROGRESS_EVERY=SECONDS`` (the longest silence between lines, default 30; ``0`` prints a
line at every update). Updates are per chunk or batch, never per item, so the overhead is a
clock read and a comparison per update.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from hlss.errors import ConfigError

MODES = ("auto", "bar", "log", "off")
ENV_MODE = "HLSS_PROGRESS"
ENV_EVERY = "HLSS_PROGRESS_EVERY"
EVERY_S = 30.0
"""Longest silence between two log lines, in seconds (``HLSS_PROGRESS_EVERY``)."""
FRACTION_GAP_S = 5.0
"""Shortest gap between two lines printed for reaching another ``every_fraction``."""
QUIET_BELOW_S = 2.0
"""A job shorter than this that printed no line prints no closing line either."""
BAR_REFRESH_S = 0.5

log = logging.getLogger("hlss.progress")

Postfix = str | Callable[[], str] | None


def progress_mode(mode: str | None = None, stream: IO | None = None) -> str:
    """The display to use: ``"bar"``, ``"log"`` or ``"off"``.

    Args:
        mode: ``"auto"``, ``"bar"``, ``"log"``, ``"off"``; ``None`` reads ``$HLSS_PROGRESS``
            (default ``auto``). ``auto`` is ``bar`` when ``stream`` is a terminal, else ``log``.
        stream: the stream a bar would be drawn on (default ``sys.stderr``).

    Raises:
        ConfigError: an unknown mode (naming ``HLSS_PROGRESS`` when it came from there).
    """
    where = "progress mode"
    if mode is None:
        mode, where = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto", ENV_MODE
    if mode not in MODES:
        raise ConfigError(f"{where}: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return "bar" if isatty is not None and isatty() else "log"
    except (ValueError, OSError):  # a closed stream
        return "log"


def every_seconds(every_s: float | None = None) -> float:
    """``every_s``, or ``$HLSS_PROGRESS_EVERY``, or :data:`EVERY_S`.

    Raises:
        ConfigError: ``$HLSS_PROGRESS_EVERY`` is not a number >= 0.
    """
    if every_s is not None:
        return max(0.0, float(every_s))
    text = os.environ.get(ENV_EVERY, "").strip()
    if not text:
        return EVERY_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{ENV_EVERY}: expected seconds >= 0, got {text!r}")
    return value


def format_duration(seconds: float | None) -> str:
    """``H:MM:SS`` (``"?"`` for ``None`` or a non-finite value)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    whole = round(max(0.0, seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def format_rate(value: float) -> str:
    """A rate with three significant digits at most (``134``, ``41.2``, ``0.52``)."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def eta_seconds(
    done: float, total: float | None, elapsed: float, initial: float = 0
) -> float | None:
    """Seconds left at the average rate since the start: ``(total - done) / rate`` with
    ``rate = (done - initial) / elapsed``; ``None`` while nothing is done or the total unknown."""
    if total is None or elapsed <= 0 or done <= initial:
        return None
    return max(0.0, total - done) * elapsed / (done - initial)


def _terminal_columns(stream: IO) -> int:
    """Columns of the terminal behind ``stream`` (0 when unknown: tqdm then draws nothing)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def emit(text: str, stream: IO | None = None) -> None:
    """One progress line: to the ``hlss.progress`` logger when it is set up at INFO (Hydra's
    console and log file), else to ``stream`` (default stderr)."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(text)
    else:
        print(text, file=sys.stderr if stream is None else stream, flush=True)


class Progress:
    """Progress of one job of ``total`` units: a tqdm bar or periodic log lines (see module).

    Args:
        total: units of the whole job (``None``: unknown, no ETA).
        desc: what is being done, e.g. ``"embedding val"`` or ``"step"``.
        unit: the unit counted, e.g. ``"patches"`` (``""``: bare counts).
        initial: units already done when the job starts (a resumed run); rates and ETA count
            from here.
        mode: see :func:`progress_mode` (``None``: ``$HLSS_PROGRESS``, default auto).
        every_s: longest silence between log lines (``None``: ``$HLSS_PROGRESS_EVERY`` or 30).
        every_fraction: also a line whenever another such share of ``total`` is done (at most
            one per :data:`FRACTION_GAP_S`); ``0`` turns this off.
        every_n: also a line whenever another ``every_n`` units are done.
        show_rate: include ``<rate> <unit>/s`` (off when the postfix carries its own rate).
        closing_line: ``True`` always prints the closing line; ``None`` leaves it out for a
            job under :data:`QUIET_BELOW_S` that printed nothing else.
        leave: keep the finished bar on the terminal (not a bar of a job under
            :data:`QUIET_BELOW_S`, unless ``closing_line``).
        bar_format: tqdm's ``bar_format``; with one, ``{desc}`` shows the postfix.
        stream: where the bar (and lines without logging) go; default stderr.
        clock: seconds, monotonic (tests pass a fake one).

    Use as a context manager (the closing line is printed on a normal exit only) or call
    :meth:`close`. Raises :class:`ConfigError` for a bad mode or ``$HLSS_PROGRESS_EVERY``.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "",
        *,
        initial: int = 0,
        mode: str | None = None,
        every_s: float | None = None,
        every_fraction: float = 0.1,
        every_n: int | None = None,
        show_rate: bool = True,
        closing_line: bool | None = None,
        leave: bool = True,
        bar_format: str | None = None,
        stream: IO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total = None if total is None else int(total)
        self.desc, self.unit = desc, unit
        self.initial = self.n = int(initial)
        self.mode = progress_mode(mode, stream)
        self.every_s = every_seconds(every_s)
        self.show_rate, self.closing_line = show_rate, closing_line
        self.stream, self.clock = stream, clock
        self.postfix = ""
        self.lines = 0
        self.closed = False
        self.start = self._last_line = clock()
        self._last_postfix = -math.inf  # the first postfix shows at once
        self._fraction = self.total * every_fraction if self.total and every_fraction > 0 else 0
        self._next_fraction = self.n + self._fraction
        self._every_n = int(every_n or 0)
        self._next_n = self.n + self._every_n
        self._bar_format = bar_format
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            sized = _terminal_columns(sys.stderr if stream is None else stream) > 0
            self._bar = tqdm(
                total=self.total,
                initial=self.n,
                desc="" if bar_format else desc,
                unit=f" {unit}" if unit else "it",
                file=sys.stderr if stream is None else stream,
                dynamic_ncols=sized,
                ncols=None if sized else 100,
                nrows=None if sized else 20,
                mininterval=BAR_REFRESH_S,
                leave=leave,
                bar_format=bar_format,
            )

    # -- state --------------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return max(0.0, self.clock() - self.start)

    @property
    def rate(self) -> float | None:
        """Units per second since the start (``None`` when no time has passed)."""
        elapsed = self.elapsed
        return (self.n - self.initial) / elapsed if elapsed > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds left at the average rate (see :func:`eta_seconds`)."""
        return eta_seconds(self.n, self.total, self.elapsed, self.initial)

    def _count(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.total is None:
            return f"{self.desc} {self.n}{unit}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return f"{self.desc} {self.n}/{self.total}{unit}{pct}"

    def _rate(self) -> list[str]:
        rate = self.rate
        if not self.show_rate or rate is None:
            return []
        return [f"{format_rate(rate)} {self.unit or 'it'}/s"]

    def line(self) -> str:
        """The periodic line: ``<desc> n/total unit (p%) | rate | postfix | ETA h:mm:ss``."""
        parts = [self._count(), *self._rate(), *([self.postfix] if self.postfix else [])]
        return " | ".join([*parts, f"ETA {format_duration(self.eta)}"])

    def closing(self) -> str:
        """The closing line: ``<desc> n/total unit done in h:mm:ss | rate | postfix``."""
        parts = [f"{self._count()} done in {format_duration(self.elapsed)}", *self._rate()]
        return " | ".join([*parts, *([self.postfix] if self.postfix else [])])

    # -- updates ------------------------------------------------------------------------------

    def update(self, n: int = 1, postfix: Postfix = None) -> None:
        """Add ``n`` finished units; ``postfix`` (text, or a callable evaluated only when it is
        shown) follows the counts."""
        self.advance_to(self.n + int(n), postfix)

    def advance_to(self, done: int, postfix: Postfix = None) -> None:
        """Set the finished units to ``done`` (e.g. the global step); see :meth:`update`."""
        if self.closed or self.mode == "off":
            self.n = int(done)
            return
        step, self.n = int(done) - self.n, int(done)
        now = self.clock()
        if self._bar is not None:
            if postfix is not None and now - self._last_postfix >= BAR_REFRESH_S:
                self._last_postfix = now
                self._set_postfix(postfix)
                self._show_postfix()
            self._bar.update(step)
            return
        if self._due(now) and not (self.total is not None and self.n >= self.total):
            self._set_postfix(postfix)
            self._last_line = now
            self.lines += 1
            emit(self.line(), self.stream)

    def _show_postfix(self) -> None:
        """The postfix on the bar: ``{desc}`` of a custom ``bar_format``, else tqdm's postfix."""
        if self._bar_format:
            self._bar.set_description_str(self.postfix, refresh=False)
        else:
            self._bar.set_postfix_str(self.postfix, refresh=False)

    def _set_postfix(self, postfix: Postfix) -> None:
        if postfix is not None:
            self.postfix = postfix() if callable(postfix) else str(postfix)

    def _due(self, now: float) -> bool:
        """A line is due: ``every_s`` of silence, another ``every_n`` units, or another fraction
        (at most one per :data:`FRACTION_GAP_S`, or the shorter ``every_s``)."""
        due = now - self._last_line >= self.every_s
        if self._every_n and self.n >= self._next_n:
            self._next_n = (self.n // self._every_n + 1) * self._every_n
            due = True
        if self._fraction and self.n >= self._next_fraction:
            self._next_fraction = (math.floor(self.n / self._fraction) + 1) * self._fraction
            due = due or now - self._last_line >= min(FRACTION_GAP_S, self.every_s)
        return due

    def close(self, postfix: Postfix = None, finished: bool = True) -> None:
        """End the job; prints the closing line in log mode (see ``closing_line``) when
        ``finished``. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._set_postfix(postfix)
        quick = self.elapsed < min(QUIET_BELOW_S, self.every_s)
        if self._bar is not None:
            if self.postfix:
                self._show_postfix()
            if quick and not self.closing_line:
                self._bar.leave = False  # a bar of a moment leaves no line behind
            self._bar.close()
            return
        if self.mode != "log" or not finished:
            return
        if self.closing_line or (self.closing_line is None and not (quick and self.lines == 0)):
            emit(self.closing(), self.stream)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finished=exc_type is None)


@contextmanager
def stage(text: str, mode: str | None = None, stream: IO | None = None) -> Iterator[None]:
    """A step without a count (e.g. a scikit-learn fit): ``text`` is printed once the step has
    run :data:`QUIET_BELOW_S` (or ``$HLSS_PROGRESS_EVERY`` when shorter), and then
    ``<text>: done in h:mm:ss`` at its end; a quicker step prints nothing. Off with
    ``HLSS_PROGRESS=off``."""
    if progress_mode(mode, stream) == "off":
        yield
        return
    start = time.monotonic()
    started = threading.Event()

    def announce() -> None:
        started.set()
        emit(text, stream)

    delay = min(QUIET_BELOW_S, every_seconds())
    timer = threading.Timer(delay, announce)
    timer.daemon = True
    if delay > 0:
        timer.start()
    else:
        announce()
    try:
        yield
    finally:
        timer.cancel()
        if timer.is_alive():
            timer.join()
        if started.is_set():
            emit(f"{text}: done in {format_duration(time.monotonic() - start)}", stream)
