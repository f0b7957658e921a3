"""Signals stop a training run with a checkpoint of the last completed step, a resume command
and a non-zero exit status; the resumed run continues exactly (CPU, real signals)."""

from __future__ import annotations

import glob
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import Logger

from hlss.checkpoints import find_checkpoint, load_checkpoint_file
from tests.train.helpers import TINY, run_train

EXE = os.path.join(os.path.dirname(sys.executable), "hlss-train")
# long enough to be still running when the signal comes; no periodic checkpoint on the way
LONG = [
    *TINY,
    "trainer.max_steps=100000",
    "checkpoint.every_n_steps=100000",
    "callbacks=[default,batch_record]",
]
WAIT_S = 900  # the machine may be busy: poll for files, never sleep a guessed time


def start(args: list[str], cwd, **popen) -> subprocess.Popen:
    """``hlss-train *args`` as a user runs it: the console script, output not a terminal."""
    with (
        open(os.path.join(cwd, "stdout.txt"), "w") as out,
        open(os.path.join(cwd, "stderr.txt"), "w") as err,
    ):  # the child keeps its own copies of the files
        return subprocess.Popen([EXE, *args], cwd=cwd, stdout=out, stderr=err, **popen)


def read(path) -> str:
    with open(path) as handle:
        return handle.read()


def output(cwd) -> tuple[str, str]:
    return read(os.path.join(cwd, "stdout.txt")), read(os.path.join(cwd, "stderr.txt"))


def wait_for_first_step(proc: subprocess.Popen, cwd) -> str:
    """The run folder, once its first step is done (batches-rank0.jsonl has a row)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = glob.glob(os.path.join(cwd, "outputs", "**", "batches-rank0.jsonl"), recursive=True)
        if found and os.path.getsize(found[0]) > 0:
            return os.path.dirname(found[0])
        assert proc.poll() is None, f"hlss-train ended early: {output(cwd)[1][-2000:]}"
        time.sleep(0.2)
    proc.kill()
    pytest.fail("no training step completed in time")


def rows_of(root) -> list[dict]:
    """Every batches-rank0.jsonl row below ``root``."""
    rows = []
    for path in glob.glob(os.path.join(root, "**", "batches-rank0.jsonl"), recursive=True):
        rows += [json.loads(line) for line in read(path).splitlines()]
    return rows


def stopped(proc: subprocess.Popen, cwd, code: int) -> str:
    """Wait for the exit; check the status and the single resume line; return the command."""
    try:
        assert proc.wait(timeout=WAIT_S) == code, output(cwd)[1][-2000:]
    finally:
        proc.kill()
    out, err = output(cwd)
    lines = [line for line in (out + err).splitlines() if "resume with:" in line]
    assert len(lines) == 1, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    return lines[0].split("resume with: ", 1)[1]


def logged_steps(cwd, run_id: str) -> list[int]:
    """The steps of ``train/loss`` in the MLflow run ``run_id`` of ``cwd/outputs/mlruns.db``."""
    with sqlite3.connect(os.path.join(cwd, "outputs", "mlruns.db")) as db:
        rows = db.execute(
            "select step from metrics where run_uuid=? and key='train/loss'", (run_id,)
        ).fetchall()
    return sorted(step for (step,) in rows)


def run_status(cwd, run_id: str) -> str:
    """The status of the MLflow run ``run_id`` of ``cwd/outputs/mlruns.db``."""
    with sqlite3.connect(os.path.join(cwd, "outputs", "mlruns.db")) as db:
        (status,) = db.execute("select status from runs where run_uuid=?", (run_id,)).fetchone()
    return status


@pytest.mark.timeout(3 * WAIT_S)
def test_sigterm_saves_last_step_and_resume_continues_exactly(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = start(LONG, work)
    run_dir = wait_for_first_step(proc, work)
    proc.send_signal(signal.SIGTERM)
    command = stopped(proc, work, 143)

    done = rows_of(run_dir)
    k = done[-1]["step"]
    assert [r["step"] for r in done] == list(range(1, k + 1))
    ckpts = glob.glob(os.path.join(run_dir, "checkpoints", "*.ckpt"))
    assert ckpts == [os.path.join(run_dir, "checkpoints", "last.ckpt")]  # the signal's only
    state = load_checkpoint_file(ckpts[0])
    assert state["global_step"] == k  # the last completed step
    # the default MLflow logger buffers steps; the stop logged the stopped step and wrote all
    # the logger held: every completed step (Lightning numbers them from 0)
    run_id = state["hlss"]["mlflow_run_id"]
    assert logged_steps(work, run_id) == list(range(k))
    assert run_status(work, run_id) == "KILLED"  # stopped from outside, not failed

    argv = shlex.split(command)
    assert argv[0] == "hlss-train" and argv[1] == f"resume={run_dir}"
    assert argv[2:] == LONG  # the original overrides
    resumed = subprocess.run(
        [EXE, *argv[1:], f"trainer.max_steps={k + 2}"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stderr
    after = [r for r in rows_of(work / "outputs") if r["step"] > k]
    assert [r["step"] for r in after] == [k + 1, k + 2]
    assert logged_steps(work, run_id) == list(range(k + 2))  # the same run, continued, no gap
    assert run_status(work, run_id) == "FINISHED"

    # an uninterrupted run draws the same patches at every step
    run_train(*LONG, "logger=none", f"trainer.max_steps={k + 2}", f"paths.root={tmp_path / 'ref'}")
    reference = rows_of(tmp_path / "ref")
    assert [r["step"] for r in reference] == list(range(1, k + 3))
    assert [r["patches"] for r in done + after] == [r["patches"] for r in reference]


@pytest.mark.timeout(2 * WAIT_S)
def test_ctrl_c_saves_last_step_and_exits_130(tmp_path):
    """Ctrl-C reaches the whole process group, data-loader workers included."""
    proc = start([*LONG, "logger=none", "loader.num_workers=1"], tmp_path, start_new_session=True)
    run_dir = wait_for_first_step(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    command = stopped(proc, tmp_path, 130)
    assert shlex.split(command)[1] == f"resume={run_dir}"
    k = rows_of(run_dir)[-1]["step"]
    state = load_checkpoint_file(os.path.join(run_dir, "checkpoints", "last.ckpt"))
    assert state["global_step"] == k


class SignalAt(Callback):
    """Sends this process ``signals`` at the end of step ``step``."""

    def __init__(self, step: int, signals: list[str]):
        self.step, self.signals = int(step), [getattr(signal, s) for s in signals]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for signum in self.signals:
                os.kill(os.getpid(), signum)


def send_at(step: int, *signals: str) -> list[str]:
    names = ",".join(signals)
    return [
        "+callbacks.signal._target_=tests.train.test_preemption.SignalAt",
        f"+callbacks.signal.step={step}",
        f"+callbacks.signal.signals=[{names}]",
    ]


STOP = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def test_sigusr1_saves_then_passes_on_to_the_requeue_handler(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    calls = []

    def requeue(signum, frame):  # what submitit or Lightning's SLURM requeue would install
        last = find_checkpoint("auto", str(tmp_path))
        calls.append((signum, load_checkpoint_file(last)["global_step"]))

    before = {s: signal.getsignal(s) for s in STOP}
    previous = signal.signal(signal.SIGUSR1, requeue)
    try:
        with pytest.raises(SystemExit) as stop:
            run_train(*LONG, "logger=none", *send_at(2, "SIGUSR1"))
        after = {s: signal.getsignal(s) for s in STOP}
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert stop.value.code == 128 + signal.SIGUSR1
    assert calls == [(signal.SIGUSR1, 2)]  # called once, after last.ckpt of step 2 was written
    assert after == {**before, signal.SIGUSR1: requeue}  # our handlers are gone again
    err = capsys.readouterr().err
    assert err.count("resume with:") == 1 and "SIGUSR1: stopped after step 2" in err


def test_second_ctrl_c_stops_at_once_without_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {s: signal.getsignal(s) for s in STOP}
    with pytest.raises(SystemExit) as stop:
        run_train(*LONG, "logger=none", *send_at(1, "SIGINT", "SIGINT"))
    assert stop.value.code == 1
    assert not glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    assert {s: signal.getsignal(s) for s in STOP} == before


def test_handlers_restored_after_a_finished_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {s: signal.getsignal(s) for s in STOP}
    run_train(*TINY, "logger=none", "loss=hidisc")
    assert {s: signal.getsignal(s) for s in STOP} == before


KILLED_MID_SAVE = """
import os, signal, sys, torch
from hlss.checkpoints import AtomicCheckpointIO

path = sys.argv[1]
io = AtomicCheckpointIO()
io.save_checkpoint({"global_step": 1, "weights": torch.zeros(1000)}, path)

def truncated_save(obj, handle):  # half a checkpoint on disk, then kill -9
    handle.write(b"PK" + b"0" * 100)
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = truncated_save
io.save_checkpoint({"global_step": 2, "weights": torch.ones(1000)}, path)
"""


def test_kill_9_during_a_save_never_leaves_a_truncated_last_ckpt(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    path = folder / "last.ckpt"
    script = tmp_path / "save.py"
    script.write_text(textwrap.dedent(KILLED_MID_SAVE))
    proc = subprocess.run([sys.executable, str(script), str(path)], timeout=WAIT_S)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in folder.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.")  # the truncated write
    assert load_checkpoint_file(str(path))["global_step"] == 1  # the previous checkpoint, whole
    assert find_checkpoint("auto", str(tmp_path)) == str(path)


class Recorder(Logger):
    """A logger that keeps every ``log_metrics`` call: ``calls = [(step, metrics)]``."""

    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.mark.parametrize("every", [1, 2])
def test_a_stopped_step_is_logged_before_the_checkpoint(tmp_path, every):
    """In process: a signal noticed at the end of step 3 logs that step's metrics (at the step
    number Lightning would have used) before ``last.ckpt`` is written; with
    ``log_every_n_steps=2`` only the steps Lightning logs anyway."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from hlss.train.preemption import Preemption

    class Logged(BoringModel):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            self.log("train/loss", out["loss"], on_step=True)
            return out

    preemption = Preemption()
    saved: list[int] = []

    class SignalAtStep3(Callback):  # runs before Preemption's hook: the signal arrives mid-step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                preemption.received = int(signal.SIGTERM)

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            saved.append(len(recorder.calls))

    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=10,
        logger=recorder,
        callbacks=[SignalAtStep3(), preemption],
        log_every_n_steps=every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    with pytest.raises(SystemExit) as stop:
        trainer.fit(Logged())
    assert stop.value.code == 143
    steps = [step for step, metrics in recorder.calls if "train/loss" in metrics]
    assert steps == ([0, 1, 2] if every == 1 else [1])
    assert saved == [len(recorder.calls)]  # logged before the checkpoint was written
    assert os.path.isfile(tmp_path / "checkpoints" / "last.ckpt")
