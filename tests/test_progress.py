"""The progress helper in both displays, and the long jobs that report through it."""

from __future__ import annotations

import io
import logging
import re
import time

import numpy as np
import pytest

from hlss.errors import ConfigError
from hlss.progress import (
    Progress,
    emit,
    eta_seconds,
    every_seconds,
    format_duration,
    progress_mode,
    stage,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _auto_display(monkeypatch, caplog):
    """Every test starts from the defaults (no display forced, 30 s between lines) and logging
    not set up for INFO (lines go to the given stream), whatever earlier tests configured."""
    monkeypatch.delenv("HLSS_PROGRESS", raising=False)
    monkeypatch.delenv("HLSS_PROGRESS_EVERY", raising=False)
    caplog.set_level(logging.WARNING, logger="hlss.progress")


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# ---------------------------------------------------------------------------------------------
# choosing the display


def test_auto_is_a_bar_on_a_terminal_and_lines_otherwise(monkeypatch):
    assert progress_mode(stream=Terminal()) == "bar"
    assert progress_mode(stream=io.StringIO()) == "log"
    assert progress_mode("log", stream=Terminal()) == "log"
    monkeypatch.setenv("HLSS_PROGRESS", "off")
    assert progress_mode(stream=Terminal()) == "off"
    monkeypatch.setenv("HLSS_PROGRESS", "loud")
    with pytest.raises(ConfigError, match=r"HLSS_PROGRESS.*'loud'"):
        progress_mode()
    with pytest.raises(ConfigError, match="progress mode"):
        progress_mode("sometimes")


def test_every_seconds_from_the_environment(monkeypatch):
    assert every_seconds() == 30.0
    assert every_seconds(4) == 4.0
    monkeypatch.setenv("HLSS_PROGRESS_EVERY", "7.5")
    assert every_seconds() == 7.5
    monkeypatch.setenv("HLSS_PROGRESS_EVERY", "soon")
    with pytest.raises(ConfigError, match=r"HLSS_PROGRESS_EVERY.*'soon'"):
        every_seconds()


def test_eta_and_durations():
    assert eta_seconds(25, 100, elapsed=10.0) == pytest.approx(30.0)
    # a resumed job counts its rate from where it started
    assert eta_seconds(60, 100, elapsed=10.0, initial=50) == pytest.approx(40.0)
    assert eta_seconds(0, 100, elapsed=10.0) is None
    assert eta_seconds(5, None, elapsed=10.0) is None
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(None) == "?"


# ---------------------------------------------------------------------------------------------
# log lines (output not a terminal)


def test_log_lines_every_tenth_and_a_closing_line():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(100, "embedding val", "patches", mode="log", stream=out, clock=clock)
    with progress:
        for _ in range(100):
            clock.now += 0.3  # 10% = 3 s, under the 5 s gap: every second tenth is printed
            progress.update(1)
    lines = lines_of(out)
    assert lines[0] == "embedding val 20/100 patches (20%) | 3.33 patches/s | ETA 0:00:24"
    assert [re.match(r"embedding val (\d+)/", line).group(1) for line in lines[:-1]] == [
        "20",
        "40",
        "60",
        "80",
    ]
    assert lines[-1] == "embedding val 100/100 patches (100%) done in 0:00:30 | 3.33 patches/s"


def test_log_lines_at_least_every_every_s_when_slow():
    clock, out = FakeClock(), io.StringIO()
    with Progress(1000, "kNN", "queries", mode="log", every_s=30, stream=out, clock=clock) as p:
        for _ in range(9):  # 9 updates of 1 query, 20 s apart: far below 10%
            clock.now += 20
            p.update(1)
    counts = [int(re.match(r"kNN (\d+)/1000", line).group(1)) for line in lines_of(out)]
    assert counts == [2, 4, 6, 8, 9]  # 40 s, 80 s, ... then the closing line
    assert "ETA" in lines_of(out)[0] and "done in 0:03:00" in lines_of(out)[-1]


def test_a_quick_job_prints_nothing_and_a_failed_one_no_closing_line():
    clock, out = FakeClock(), io.StringIO()
    with Progress(10, "quick", "files", mode="log", stream=out, clock=clock) as p:
        clock.now += 1.0
        p.update(10)
    assert out.getvalue() == ""
    with Progress(10, "quick", "files", mode="log", stream=out, clock=clock, closing_line=True):
        pass
    assert lines_of(out) == ["quick 0/10 files (0%) done in 0:00:00"]
    out.truncate(0)
    out.seek(0)
    broken = Progress(10, "broken", "files", mode="log", stream=out, clock=clock)
    with pytest.raises(RuntimeError), broken:
        clock.now += 60
        broken.update(5)
        raise RuntimeError("stop")
    assert all("done in" not in line for line in lines_of(out))


def test_every_zero_prints_each_update_and_the_postfix_lazily(monkeypatch):
    monkeypatch.setenv("HLSS_PROGRESS_EVERY", "0")
    clock, out, calls = FakeClock(), io.StringIO(), []

    def postfix() -> str:
        calls.append(1)
        return "loss 3.21"

    with Progress(4, "step", mode="log", show_rate=False, stream=out, clock=clock) as p:
        for _ in range(3):
            clock.now += 1
            p.update(1, postfix)
    assert lines_of(out)[0] == "step 1/4 (25%) | loss 3.21 | ETA 0:00:03"
    assert len(lines_of(out)) == 4 and len(calls) == 3


def test_off_prints_nothing_but_counts(monkeypatch):
    monkeypatch.setenv("HLSS_PROGRESS", "off")
    out = io.StringIO()
    with Progress(3, "x", "files", stream=out, closing_line=True) as p:
        p.update(3)
    assert p.n == 3 and out.getvalue() == ""


def test_lines_go_to_the_logger_when_logging_is_set_up(caplog):
    out = io.StringIO()
    emit("not configured", stream=out)
    assert out.getvalue() == "not configured\n"
    caplog.set_level(logging.INFO, logger="hlss.progress")
    emit("configured", stream=out)
    assert out.getvalue() == "not configured\n"
    assert [r.getMessage() for r in caplog.records if r.name == "hlss.progress"] == ["configured"]


# ---------------------------------------------------------------------------------------------
# the bar (a terminal)


def test_bar_shows_counts_rate_and_eta_on_a_terminal():
    term = Terminal()
    with Progress(10, "checking patch files", "files", stream=term) as p:
        for _ in range(10):
            p.update(1)
            time.sleep(0.08)  # past tqdm's 0.5 s refresh interval
    text = term.getvalue()
    assert "checking patch files" in text and "files/s" in text
    assert re.search(r"\d+/10 \[\d\d:\d\d<\d\d:\d\d", text)  # count, elapsed < ETA
    assert "done in" not in text  # drawn in place, not as log lines
    # a bar of under two seconds is cleared when it ends: no line left behind
    assert text.endswith("\r") and text.rsplit("\r", 2)[-2].strip() == ""


def test_bar_with_a_format_shows_the_postfix_and_stays():
    term = Terminal()
    fmt = "step {n_fmt}/{total_fmt} |{bar}| {desc} | ETA {remaining}"
    with Progress(5, "step", stream=term, bar_format=fmt, closing_line=True) as p:
        p.advance_to(5, "134 img/s | loss 3.21")
    last = term.getvalue().rstrip("\n").rsplit("\r", 1)[-1]
    assert last.startswith("step 5/5 |") and last.endswith("| 134 img/s | loss 3.21 | ETA 00:00")


# ---------------------------------------------------------------------------------------------
# a step without counts (the linear probe's fit)


def test_stage_prints_start_and_end_of_a_long_step(monkeypatch):
    out = io.StringIO()
    with stage("linear probe: fitting 10 x 4", mode="log", stream=out):
        pass
    assert out.getvalue() == ""  # a quick step stays quiet
    monkeypatch.setenv("HLSS_PROGRESS_EVERY", "0")
    with stage("linear probe: fitting 10 x 4", mode="log", stream=out):
        pass
    assert lines_of(out) == [
        "linear probe: fitting 10 x 4",
        "linear probe: fitting 10 x 4: done in 0:00:00",
    ]


# ---------------------------------------------------------------------------------------------
# the jobs that report through it


@pytest.fixture
def every_update(monkeypatch, caplog):
    """Log lines at every update, through logging set up at INFO (as under Hydra); returns a
    function giving the lines so far."""
    monkeypatch.setenv("HLSS_PROGRESS", "log")
    monkeypatch.setenv("HLSS_PROGRESS_EVERY", "0")
    caplog.set_level(logging.INFO, logger="hlss.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "hlss.progress"]


def test_knn_reports_queries(every_update):
    from hlss.eval.knn import KNNIndex, knn_scores

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(50, 8))
    labels = rng.integers(0, 3, 50)
    # searched in blocks of batch_size queries (the CPU scan takes larger ones)
    block = KNNIndex(bank, labels, num_classes=3)._batch(10)
    queries = rng.normal(size=(2 * block + 5, 8))
    scores = knn_scores(bank, labels, queries, 3, k=5, batch_size=10)
    assert scores.shape == (len(queries), 3)
    lines = every_update()
    total = len(queries)
    assert lines[0].startswith(f"kNN search (k=5) {block}/{total} queries (")
    assert lines[-1].startswith(f"kNN search (k=5) {total}/{total} queries (100%) done in")


def test_zero_shot_reports_patches(every_update):
    from hlss.eval.zero_shot import zero_shot_scores

    rng = np.random.default_rng(0)
    zero_shot_scores(rng.normal(size=(7, 4)), rng.normal(size=(2, 4)), chunk_size=4)
    lines = every_update()
    assert lines[0].startswith("zero-shot 4/7 patches (57%)")
    assert "7/7 patches (100%) done in" in lines[-1]


def test_linear_probe_reports_its_size(every_update):
    from hlss.eval.probe import linear_probe

    rng = np.random.default_rng(0)
    linear_probe(rng.normal(size=(40, 6)), np.arange(40) % 3, rng.normal(size=(5, 6)), 3)
    lines = every_update()
    assert lines == [
        "linear probe: fitting 40 x 6 train embeddings, 3 classes",
        "linear probe: fitting 40 x 6 train embeddings, 3 classes: done in 0:00:00",
    ]


def test_patch_checks_report_files(every_update):
    from hlss.data import patch_scan

    paths = [f"p{i}" for i in range(patch_scan.CHUNK_SIZE + 6)]
    seen = []
    verdicts = list(
        patch_scan.inspect_many(
            paths, progress=lambda d, t: seen.append((d, t)), inspect=lambda p: (p, "", None)
        )
    )
    assert len(verdicts) == len(paths) and seen[-1] == (len(paths), len(paths))
    lines = every_update()
    total = len(paths)
    assert lines[0].startswith(f"checking patch files {patch_scan.CHUNK_SIZE}/{total} files")
    assert lines[-1].startswith(f"checking patch files {total}/{total} files (100%) done in")
