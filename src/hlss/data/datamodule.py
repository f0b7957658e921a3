"""Lightning data module: patch table -> hierarchy dataset -> loader -> augmentation on device."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from hlss.data.hierarchy import HierarchicalDataset, HierarchicalSampler
from hlss.data.table import PatchTable
from hlss.errors import ConfigError, DataError


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
            if self.drop_last and len(self.train_set) < self.patients:
                raise ConfigError(
                    f"{len(self.train_set)} train patients cannot fill a batch of "
                    f"{self.patients} patients; lower data.patients"
                )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        sampler = HierarchicalSampler(self.train_set.labels, balance=self.balance, seed=self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.patients,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
            persistent_workers=self.num_workers > 0,
        )

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = getattr(self, "trainer", None)
        training = trainer is None or trainer.training
        if self.augment is not None and training:
            batch["image"] = self.augment(batch["image"])
        return batch
