"""Lightning data module: patch table -> hierarchy dataset -> loader -> augmentation on device.

The training loader is resumable: its position in the epoch is saved in every checkpoint.
"""

from __future__ import annotations

import atexit
import copy
import os
import signal
import weakref
from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from hlss.data.batch import check_batch
from hlss.data.hierarchy import (
    HierarchicalDataset,
    HierarchicalSampler,
    collate_patients,
    expand_views,
    shares_views,
)
from hlss.data.table import PatchTable
from hlss.errors import ConfigError, DataError

# the signals that stop a training run with a checkpoint (hlss.train.preemption)
STOP_SIGNALS = tuple(
    getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, n)
)

# batch keys that stay on the host when a batch moves to the device (read there each step)
HOST_KEYS = ("bad",)


def loader_worker_init(worker_id: int) -> None:
    """Loader workers ignore the stop signals: Ctrl-C reaches the whole process group, and a
    worker killed by it would fail the batch the main process finishes before its checkpoint.
    Workers end with the main process. Seeds the worker as Lightning would (``PL_SEED_WORKERS``)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id)


# Inner loader iterators whose workers may still run (see _track_workers).
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()
_EXIT_HOOK_REGISTERED = False


def _shutdown_live_workers() -> None:
    """Stop the workers of loader iterators still alive at interpreter exit."""
    for iterator in list(_LIVE_ITERATORS):
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _track_workers(iterator: Iterator) -> Iterator:
    """Remember ``iterator`` so its workers are stopped at exit if nothing else stops them.

    Workers ignore SIGTERM (:func:`loader_worker_init`), and at exit :mod:`multiprocessing`
    terminates its daemonic children with SIGTERM and then joins them: a loader still alive
    then (one kept in a global, or by a traceback) would hang the exit. ``atexit`` runs the
    last-registered hook first, and this one is registered after :mod:`multiprocessing`'s
    (imported with torch), so the workers are asked to stop the normal way before that join.
    """
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        atexit.register(_shutdown_live_workers)
        _EXIT_HOOK_REGISTERED = True
    _LIVE_ITERATORS.add(iterator)
    return iterator


def epoch_batches(keys: list, batch_size: int, drop_last: bool) -> list[list]:
    """One epoch's sampler keys as batches, cut as a DataLoader cuts them: consecutive runs of
    ``batch_size`` keys, a shorter last run kept, or dropped when ``drop_last``."""
    stop = len(keys) - len(keys) % batch_size if drop_last else len(keys)
    return [keys[i : i + batch_size] for i in range(0, stop, batch_size)]


class EpochChain:
    """Batch sampler that runs on across epoch boundaries: ``first`` (the batches of ``epoch``
    still to load), then every batch of ``epoch + 1``, ``epoch + 2``, ... from their beginning.

    Each epoch is cut on its own (:func:`epoch_batches`), so no batch mixes two epochs and
    ``drop_last`` applies per epoch. Later epochs come from a copy of ``sampler`` taken now, so
    :meth:`HierarchicalSampler.set_epoch` / ``resume`` calls on the original do not move it. Ends
    only when a whole epoch has no batch (then every later one has none either).
    """

    def __init__(
        self,
        sampler: HierarchicalSampler,
        epoch: int,
        first: list[list],
        batch_size: int,
        drop_last: bool,
    ):
        self.sampler = copy.copy(sampler)
        self.epoch, self.first = int(epoch), first
        self.batch_size, self.drop_last = int(batch_size), drop_last

    def __iter__(self) -> Iterator[list]:
        yield from self.first
        epoch = self.epoch + 1
        while True:
            self.sampler.resume(epoch, 0)  # the epoch from its start, whatever the copy held
            batches = epoch_batches(list(self.sampler), self.batch_size, self.drop_last)
            if not batches:
                return
            yield from batches
            epoch += 1


class ResumableLoader(DataLoader):
    """A loader over a :class:`HierarchicalSampler` whose place in the epoch is training state.

    Lightning stores :meth:`state_dict` in every checkpoint (a loader with ``state_dict`` /
    ``load_state_dict`` is "resumable" to it) and calls :meth:`load_state_dict` before iterating
    on resume, so a mid-epoch resume draws exactly the batches an uninterrupted run would draw.
    The position counts the batches handed to the training loop, not those the workers
    prefetched; it is kept in items (``batches x batch_size``), so it survives a change of
    ``batch_size``. Iteration starts lazily, after Lightning has set the sampler's epoch.
    Workers run :func:`loader_worker_init` unless another ``worker_init_fn`` is given, and
    batches are made by :func:`hlss.data.hierarchy.collate_patients` unless another
    ``collate_fn`` is given: workers and the pinning thread handle one copy of each patch, and
    the batch handed out is :func:`hlss.data.hierarchy.expand_views` of it (``[P, S, N, T, C, H,
    W]`` whose views share memory).

    Prefetch across epochs (``num_workers > 0``): Lightning calls ``iter(loader)`` once per
    epoch, and a plain DataLoader only starts loading an epoch then, so the first batch of every
    epoch would cost a whole worker's batch latency with the device idle. Since an epoch's
    order depends only on ``(seed, epoch)``, the workers are instead fed by one inner DataLoader
    iterator over an :class:`EpochChain` (epoch ``e``'s batches, then ``e + 1``'s, ...), kept
    in ``_iterator`` (where Lightning shuts workers down at the end of fitting) and reused by
    the next ``iter``: each ``iter`` hands out exactly one epoch's batches (those of
    ``sampler.epoch`` from :meth:`HierarchicalSampler.start_item`, cut per epoch as a
    DataLoader cuts them), while the workers already load the next epoch's first batches. The
    inner iterator is rebuilt where it does not stand at the start of the requested part of an
    epoch: the first ``iter``, a resume, a ``set_epoch`` other than the next epoch, or an epoch
    left unfinished (``max_steps``, a ``break``). With ``num_workers=0`` nothing loads ahead and
    the loader iterates as a plain DataLoader.

    Raises:
        ConfigError: the sampler is not a :class:`HierarchicalSampler`, or no ``batch_size``.
    """

    def __init__(self, dataset, **kwargs):
        kwargs.setdefault("worker_init_fn", loader_worker_init)
        kwargs.setdefault("collate_fn", collate_patients)
        super().__init__(dataset, **kwargs)
        if not isinstance(self.sampler, HierarchicalSampler) or self.batch_size is None:
            raise ConfigError("ResumableLoader needs a HierarchicalSampler and a batch_size")
        self._epoch, self._items = self.sampler.epoch, 0
        # (epoch, item) at which the batches of the inner iterator in ``_iterator`` continue
        self._ahead_at: tuple[int, int] | None = None

    def __iter__(self) -> Iterator:
        self._epoch, self._items = self.sampler.epoch, self.sampler.start_item()
        if self.num_workers == 0:
            for batch in super().__iter__():
                self._items += self.batch_size
                yield expand_views(batch)
            return
        # this epoch's keys from start_item() on; iterating the sampler consumes a resume
        batches = epoch_batches(list(self.sampler), self.batch_size, self.drop_last)
        if not batches:
            return
        position, ahead_at = (self._epoch, self._items), self._ahead_at
        self._ahead_at = None  # unknown until this epoch is handed out in full
        if self._iterator is None or ahead_at != position:
            self._iterator = None  # the old workers end with their iterator
            self._iterator = self._chained(batches)
        inner, last = self._iterator, len(batches) - 1
        for number in range(len(batches)):
            batch = next(inner)
            self._items += self.batch_size
            if number == last and self._iterator is inner:
                self._ahead_at = (position[0] + 1, 0)  # the next epoch's batches come next
            yield expand_views(batch)

    def _chained(self, first: list[list]) -> Iterator:
        """A fresh inner iterator: ``first`` (this epoch's batches), then the epochs after it."""
        chain = EpochChain(self.sampler, self._epoch, first, self.batch_size, self.drop_last)
        options = {
            "num_workers": self.num_workers,
            "collate_fn": self.collate_fn,
            "pin_memory": self.pin_memory,
            "timeout": self.timeout,
            "worker_init_fn": self.worker_init_fn,
            "multiprocessing_context": self.multiprocessing_context,
            "generator": self.generator,
            "prefetch_factor": self.prefetch_factor,
            "pin_memory_device": self.pin_memory_device,
        }
        if hasattr(self, "in_order"):  # torch >= 2.6
            options["in_order"] = self.in_order
        return _track_workers(iter(DataLoader(self.dataset, batch_sampler=chain, **options)))

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "items"}``: the epoch and the items of it (this rank) already trained on."""
        return {"epoch": int(self._epoch), "items": int(self._items)}

    def load_state_dict(self, state: dict) -> None:
        """Continue at a saved position (see :meth:`HierarchicalSampler.resume`).

        Raises:
            DataError: the checkpoint's loader state is not ``{"epoch", "items"}``.
        """
        try:
            epoch, items = int(state["epoch"]), int(state["items"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"checkpoint: unreadable data loader position {state!r}") from None
        self.sampler.resume(epoch, items)
        self._epoch, self._items = epoch, items


class HierarchicalDataModule(L.LightningDataModule):
    """Training batches ``[P, S, N, T, C, H, W]`` of patients from the train split.

    Args:
        table: the whole patch table (both splits) or a zero-argument callable building it (so
            indexing happens in :meth:`setup`, once per process).
        transform: base transform applied per patch in the loader workers.
        augment: batched augmentation applied on the device after transfer, training only.
        patients / slides / patches / views: ``P``, ``S``, ``N``, ``T``.
        balance: class-balanced patient sampling.
        drop_last: drop a last, smaller batch (contrastive losses want full batches).
        num_workers: loader worker processes (0 = load in the main process).
        on_bad_file: ``"skip"`` (count and replace) or ``"fail"``.
        seed: sampler seed (slide/patch choice and patient order depend on it and the epoch).
    """

    def __init__(
        self,
        table: PatchTable | Callable[[], PatchTable],
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
        augment: torch.nn.Module | None = None,
        patients: int = 8,
        slides: int = 2,
        patches: int = 2,
        views: int = 2,
        balance: bool = False,
        drop_last: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_file: str = "skip",
        seed: int = 0,
    ):
        super().__init__()
        if int(patients) < 1:
            raise ConfigError(f"patients per batch must be >= 1, got {patients}")
        if int(num_workers) < 0:
            raise ConfigError(
                f"loader.num_workers must be >= 0 (0 loads in the main process), got {num_workers}"
            )
        self._table_source = table
        self.table: PatchTable | None = table if isinstance(table, PatchTable) else None
        self.transform = transform
        self.augment = augment
        self.patients = int(patients)
        self.hierarchy = {
            "slides_per_patient": slides,
            "patches_per_slide": patches,
            "views": views,
        }
        self.balance = balance
        self.drop_last = drop_last
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.on_bad_file = on_bad_file
        self.seed = int(seed)
        self.train_set: HierarchicalDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.table is None:
            self.table = self._table_source()
        if self.train_set is None:
            train = self.table.subset("train")
            if len(train) == 0:
                raise DataError(f"{self.table.name}: the train split has no patches")
            self.train_set = HierarchicalDataset(
                train, transform=self.transform, on_bad_file=self.on_bad_file, **self.hierarchy
            )
            trainer = getattr(self, "trainer", None)
            processes = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
            check_batch(len(self.train_set), self.patients, self.drop_last, processes)

    def train_dataloader(self) -> ResumableLoader:
        self.setup("fit")
        sampler = HierarchicalSampler(self.train_set.labels, balance=self.balance, seed=self.seed)
        return ResumableLoader(
            self.train_set,
            batch_size=self.patients,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
        )

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Move a batch to ``device``; an image whose views share memory
        (:func:`hlss.data.hierarchy.shares_views`) travels as one copy per patch and is expanded
        to its ``T`` views on the device (a plain ``.to`` would copy all ``T``). The count of
        unreadable patches (``bad``) stays on the host, where the training step reads it (on the
        device, reading it would make every step wait for the GPU)."""
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        image = batch.get("image")
        shared = image is not None and shares_views(image)
        kept = {*HOST_KEYS, "image"} if shared else set(HOST_KEYS)
        moved = {k: v for k, v in batch.items() if k not in kept}
        out = super().transfer_batch_to_device(moved, device, dataloader_idx)
        out.update({k: batch[k] for k in HOST_KEYS if k in batch})
        if shared:
            out["image"] = image[:, :, :, :1].to(device, non_blocking=True).expand(image.shape)
        return out

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = getattr(self, "trainer", None)
        training = trainer is None or trainer.training
        if self.augment is not None and training:
            batch["image"] = self.augment(batch["image"])
        return batch
