"""What a user sees: a short ``hlss-train`` run with the default MLflow logger, started from another
folder with its output captured (not a terminal), prints no library chatter."""

from __future__ import annotations

import json
import logging
import warnings

import pytest

from hlss.cli.common import CHATTER, quiet_libraries
from tests.cli.console import console
from tests.train.helpers import TINY

# chatter of MLflow's store set-up, Lightning's adverts and summary, dependency deprecations
NOISE = (
    "Creating initial MLflow database tables",
    "Updating database tables",
    "alembic",
    "Context impl",
    "💡 Tip",
    "litlogger",
    "litmodels",
    "not found. Creating it",
    "TPU available",
    "FLOPs",
    "FutureWarning",
    "DeprecationWarning",
    "is deprecated",
    "LeafSpec",
)


@pytest.fixture(scope="module")
def run_output(tmp_path_factory) -> tuple[int, str]:
    """Exit status and stdout + stderr of a 3-step run into a fresh MLflow store."""
    cwd = tmp_path_factory.mktemp("console")
    args = [a for a in TINY if not a.startswith(("trainer.max_steps", "trainer.enable_"))]
    proc = console("hlss-train", *args, "trainer.max_steps=3", cwd=cwd, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_short_run_prints_no_library_chatter(run_output):
    status, text = run_output
    assert status == 0, text[-3000:]
    found = [noise for noise in NOISE if noise in text]
    assert found == [], text
    # what the user needs is still there: the summary with the run's folder and MLflow run
    summary = json.loads(text[text.index("\n{") + 1 : text.rindex("}") + 1])
    assert summary["global_step"] == 3 and summary["mlflow_run_id"]


def test_quiet_libraries_is_narrow(caplog):
    """Only the named messages go: other INFO lines and warnings of the same sources still show."""
    quiet_libraries()
    quiet_libraries()  # a second call adds nothing twice
    for name, drop in CHATTER.items():
        assert logging.getLogger(name).filters.count(drop) == 1
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        rank_zero.info("💡 Tip: try our cloud")
        rank_zero.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_libraries()
        warnings.warn_explicit(
            "`isinstance(treespec, LeafSpec)` is deprecated, use ...",
            FutureWarning,
            "_pytree.py",
            21,
            module="lightning.pytorch.utilities._pytree",
        )
        warnings.warn_explicit("something is deprecated", FutureWarning, "mine.py", 1, "mine")
    assert [str(w.message) for w in seen] == ["something is deprecated"]
