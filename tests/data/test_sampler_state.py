"""The training loader's place in the epoch as state Lightning saves and restores."""

from __future__ import annotations

import signal
import warnings

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.types import _Stateful
from torch.utils.data import Dataset

from hlss.checkpoints import find_checkpoint, load_checkpoint_file
from hlss.data.datamodule import STOP_SIGNALS, ResumableLoader
from hlss.data.hierarchy import HierarchicalSampler
from hlss.errors import ConfigError, DataError
from tests.train.helpers import TINY, run_train, summaries

LABELS = np.arange(12) % 3  # 12 patients of 3 classes


class Keys(Dataset):
    """Items are the sampler's ``(patient, draw seed)`` keys themselves."""

    def __len__(self) -> int:
        return len(LABELS)

    def __getitem__(self, key):
        return torch.tensor(key[0])


class WorkerHandlers(Keys):
    """Items say whether the loading process ignores each stop signal."""

    def __getitem__(self, key):
        return torch.tensor([signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS])


def loader(batch_size: int = 2, workers: int = 0, dataset=None) -> ResumableLoader:
    return ResumableLoader(
        dataset or Keys(),
        batch_size=batch_size,
        sampler=HierarchicalSampler(LABELS, seed=4),
        num_workers=workers,
        drop_last=True,
    )


def patients(batches) -> list[int]:
    return [int(p) for batch in batches for p in batch]


def epoch_patients(epoch: int) -> list[int]:
    sampler = HierarchicalSampler(LABELS, seed=4)
    sampler.set_epoch(epoch)
    return [p for p, _ in sampler]


def test_lightning_sees_a_resumable_loader():
    assert isinstance(loader(), _Stateful)
    with pytest.raises(ConfigError):
        ResumableLoader(Keys(), batch_size=2)  # not a HierarchicalSampler


@pytest.mark.parametrize("workers", [0, 2])
def test_position_counts_batches_handed_out_not_prefetched(workers):
    first = loader(workers=workers)
    first.sampler.set_epoch(1)
    iterator = iter(first)
    taken = [next(iterator), next(iterator)]  # workers have prefetched further by now
    state = first.state_dict()
    assert state == {"epoch": 1, "items": 4}
    del iterator

    second = loader(workers=workers)
    second.load_state_dict(state)
    assert second.sampler.epoch == 1  # set before Lightning iterates
    second.sampler.set_epoch(1)  # what Lightning does before the epoch continues
    rest = list(second)
    assert patients(taken) + patients(rest) == epoch_patients(1)
    assert second.state_dict() == {"epoch": 1, "items": 12}
    assert patients(second) == epoch_patients(1)  # the resume applied once


def test_saved_at_the_end_of_an_epoch_the_next_starts_from_its_beginning():
    first = loader()
    assert len(list(first)) == 6
    second = loader()
    second.load_state_dict(first.state_dict())
    second.sampler.set_epoch(1)
    assert patients(second) == epoch_patients(1)


def test_position_survives_a_new_batch_size():
    first = loader(batch_size=2)
    iterator = iter(first)
    next(iterator), next(iterator)
    second = loader(batch_size=4)
    second.load_state_dict(first.state_dict())
    second.sampler.set_epoch(0)
    assert patients(second) == epoch_patients(0)[4:]


def test_unreadable_state_is_one_clear_error():
    with pytest.raises(DataError, match="data loader position"):
        loader().load_state_dict({"epoch": 0})


def test_loader_workers_ignore_stop_signals():
    (batch, *_) = list(loader(workers=1, dataset=WorkerHandlers()))
    assert batch.all()  # Ctrl-C reaches the workers too; the main process decides
    assert signal.getsignal(signal.SIGINT) != signal.SIG_IGN  # the main process is untouched


def test_mid_epoch_resume_is_not_reported_unresumable(tmp_path, monkeypatch):
    """Lightning warns "not resumable" on a mid-epoch resume unless the loader has state."""
    monkeypatch.chdir(tmp_path)
    common = [*TINY, "logger=none", "loss=hidisc", "loader.patients=3"]
    run_train(*common, "trainer.max_steps=1", f"paths.root={tmp_path / 'first'}")
    ckpt = find_checkpoint("auto", str(tmp_path / "first"))
    state = load_checkpoint_file(ckpt)
    (position,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert position == {"epoch": 0, "items": 3}  # after one batch of 3 patients
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_train(*common, "trainer.max_steps=2", f"resume={ckpt}", f"paths.root={tmp_path / 'b'}")
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "not resumable" in m], messages
    assert summaries(str(tmp_path))[-1]["global_step"] == 2  # the resumed run, wherever it wrote
