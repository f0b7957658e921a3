"""The training loader keeps its workers loading across epoch boundaries, batch for batch the
epochs a DataLoader per epoch would give (references come from HierarchicalSampler itself)."""

from __future__ import annotations

import glob
import json
import os
import time

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator
from torch.utils.data import Dataset

from hlss.data.datamodule import ResumableLoader
from hlss.data.hierarchy import HierarchicalSampler
from tests.train.helpers import TINY, run_train

LABELS = np.arange(13) % 3  # 13 patients of 3 classes
WAIT_S = 60  # the machine may be busy: poll for the workers' log, never sleep a guessed time
MADE: list[ResumableLoader] = []  # this test's loaders


@pytest.fixture(autouse=True)
def end_workers():
    """End the loaders' workers after each test, as Lightning does after fitting: they ignore
    SIGTERM (``loader_worker_init``), so workers still alive at exit (a failed test's traceback
    keeps its loader) would keep the test process from ending."""
    yield
    while MADE:
        _shutdown_workers_and_reset_iterator(MADE.pop())


class Keys(Dataset):
    """Items are the sampler's ``(patient, draw seed)`` keys, ``[2]`` int64."""

    def __len__(self) -> int:
        return len(LABELS)

    def __getitem__(self, key):
        return torch.tensor([int(key[0]), int(key[1])])


class LoggedKeys(Keys):
    """Keys that also append each draw seed served to a file (shared by all worker processes)."""

    def __init__(self, log_path: str):
        self.log_path = log_path

    def __getitem__(self, key):
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"{int(key[1])}\n")
        return super().__getitem__(key)


class WorkerIds(Keys):
    """Items are the id of the process that loaded them."""

    def __getitem__(self, key):
        return torch.tensor(os.getpid())


def sampler(**options) -> HierarchicalSampler:
    return HierarchicalSampler(LABELS, seed=7, **options)


def make_loader(
    batch_size: int = 4,
    workers: int = 2,
    drop_last: bool = True,
    dataset: Dataset | None = None,
    **options,
) -> ResumableLoader:
    loader = ResumableLoader(
        dataset or Keys(),
        batch_size=batch_size,
        sampler=sampler(**options),
        num_workers=workers,
        drop_last=drop_last,
    )
    MADE.append(loader)
    return loader


def reference(epoch: int, batch_size: int, drop_last: bool, skip: int = 0, **options) -> list:
    """The epoch's batches as lists of ``[patient, seed]``: the sampler's keys after ``skip``,
    in runs of ``batch_size``, a short last run dropped when ``drop_last``."""
    alone = sampler(**options)
    alone.set_epoch(epoch)
    keys = [[patient, seed] for patient, seed in alone][skip:]
    batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def run_epoch(loader: ResumableLoader, epoch: int) -> list:
    """What Lightning does each epoch: set the epoch, then iterate once."""
    loader.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    ("batch_size", "drop_last", "options"),
    [
        (4, True, {}),  # 13 patients: 3 batches, one patient dropped per epoch
        (4, False, {}),  # a last batch of 1
        (5, True, {"balance": True}),  # 15 balanced items: 3 batches
        (3, True, {"num_replicas": 2, "rank": 1}),  # this rank's 7 items: 2 batches
    ],
)
def test_consecutive_epochs_are_the_per_epoch_batches(workers, batch_size, drop_last, options):
    loader = make_loader(batch_size, workers, drop_last, **options)
    for epoch in range(4):
        expected = reference(epoch, batch_size, drop_last, **options)
        assert len(loader) == len(expected)
        assert run_epoch(loader, epoch) == expected
        size = len(expected) * batch_size
        assert loader.state_dict() == {"epoch": epoch, "items": size}


@pytest.mark.parametrize("workers", [0, 2])
def test_jumps_repeats_and_unfinished_epochs_restart_where_asked(workers):
    loader = make_loader(workers=workers)
    assert run_epoch(loader, 0) == reference(0, 4, True)
    assert run_epoch(loader, 3) == reference(3, 4, True)  # a set_epoch jump
    assert run_epoch(loader, 3) == reference(3, 4, True)  # the same epoch again
    loader.sampler.set_epoch(4)
    iterator = iter(loader)
    next(iterator)  # an epoch left unfinished (max_steps, a break) ...
    del iterator
    assert run_epoch(loader, 5) == reference(5, 4, True)  # ... the next starts at its beginning
    assert run_epoch(loader, 6) == reference(6, 4, True)


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_continues_and_the_epochs_after_are_whole(workers):
    first = make_loader(batch_size=4, workers=workers)
    first.sampler.set_epoch(2)
    iterator = iter(first)
    taken = [next(iterator).tolist()]
    state = first.state_dict()
    assert state == {"epoch": 2, "items": 4}
    del iterator

    second = make_loader(batch_size=3, workers=workers)  # resumed with another batch size
    second.load_state_dict(state)
    assert run_epoch(second, 2) == reference(2, 3, True, skip=4)
    assert second.state_dict() == {"epoch": 2, "items": 4 + 3 * 3}
    assert taken == reference(2, 4, True)[:1]
    assert run_epoch(second, 3) == reference(3, 3, True)


def test_workers_load_the_next_epoch_before_this_one_ends(tmp_path):
    """Epoch 0 has 3 batches; 2 workers keep 4 batches in flight, so the batches of epoch 1
    are requested while epoch 0 is still handed out (a DataLoader per epoch would start
    epoch 1 only at the next ``iter``)."""
    log_path = str(tmp_path / "served.txt")
    loader = make_loader(batch_size=4, workers=2, dataset=LoggedKeys(log_path))
    next_epoch = {seed for batch in reference(1, 4, True) for _, seed in batch}
    loader.sampler.set_epoch(0)
    iterator = iter(loader)
    for _ in range(len(loader)):
        next(iterator)  # up to and including the last batch of epoch 0
    deadline, served = time.monotonic() + WAIT_S, set()
    while time.monotonic() < deadline and not served & next_epoch:
        with open(log_path, encoding="utf-8") as log:
            served = {int(line) for line in log if line.strip()}
        time.sleep(0.05)
    assert served & next_epoch, "no item of epoch 1 was loaded before epoch 0 ended"
    with pytest.raises(StopIteration):
        next(iterator)  # the epoch ends after its own batches
    assert run_epoch(loader, 1) == reference(1, 4, True)  # and hands them out in its turn


def test_the_same_workers_serve_every_epoch():
    loader = make_loader(workers=2, dataset=WorkerIds())
    pids = [{int(p) for batch in run_epoch(loader, epoch) for p in batch} for epoch in range(3)]
    assert len(pids[0]) >= 1 and pids[1] <= pids[0] and pids[2] <= pids[0]
    assert os.getpid() not in pids[0]


def test_training_over_several_epochs_draws_what_an_in_process_loader_draws(tmp_path):
    """Lightning's epochs (set_epoch, len, one iter each, max_steps mid-epoch) with workers
    prefetching across the boundaries draw the patches of a loader without workers."""
    common = [*TINY, "logger=none", "callbacks=[default,batch_record]", "trainer.max_steps=5"]
    rows = {}
    for workers in (0, 2):
        run_train(*common, f"loader.num_workers={workers}", f"paths.root={tmp_path / str(workers)}")
        (path,) = glob.glob(
            str(tmp_path / str(workers) / "**" / "batches-rank0.jsonl"), recursive=True
        )
        with open(path, encoding="utf-8") as records:
            rows[workers] = [json.loads(line) for line in records]
    assert [r["step"] for r in rows[2]] == [1, 2, 3, 4, 5]
    assert len({r["epoch"] for r in rows[2]}) >= 3  # several epoch boundaries crossed
    assert [r["patches"] for r in rows[2]] == [r["patches"] for r in rows[0]]


def test_a_loader_alive_at_exit_does_not_hang_the_exit(tmp_path):
    """Workers ignore SIGTERM (stop signals are the main process's); a loader whose workers are
    still running when the interpreter exits must not leave multiprocessing waiting on them."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "alive_at_exit.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {root!r})\n"
        "from hlss.data.datamodule import ResumableLoader\n"
        "from hlss.data.hierarchy import HierarchicalSampler\n"
        "from tests.data.test_loader_prefetch import LABELS, Keys\n"
        "loader = ResumableLoader(Keys(), batch_size=4, sampler=HierarchicalSampler(LABELS),"
        " num_workers=2)\n"
        "batches = iter(loader)\n"
        "next(batches)\n"
        "print('handed out', flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0 and "handed out" in proc.stdout, proc.stderr[-2000:]
