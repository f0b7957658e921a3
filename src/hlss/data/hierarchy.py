"""The patient -> slide -> patch hierarchy as a dataset and a sampler.

One dataset item is one patient: ``S`` slides of that patient, ``N`` patches of each slide and
``T`` views of each patch, i.e. an image tensor ``[S, N, T, C, H, W]``. A batch of ``P`` items is
``[P, S, N, T, C, H, W]``. The ``T`` views leave the dataset identical (base transform only); the
strong augmentation runs batched on the training device (:class:`hlss.data.augment.BatchAugment`),
which is where per-view randomness comes from.

Which slides and patches an item holds is decided by a draw seed that the sampler hands over
with the patient index, so the choice depends only on ``(seed, epoch, position in the epoch)``:
the same for any number of data-loader workers, and distinct patients per rank.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from hlss.data.io import load_patch
from hlss.data.table import PatchTable
from hlss.data.threads import KeptThreads
from hlss.errors import BadPatchError, ConfigError, DataError

log = logging.getLogger(__name__)

BAD_FILE_POLICIES = ("skip", "fail")


@dataclass(frozen=True)
class PatientIndex:
    """Row indices of a patch table grouped as patient -> slide -> patches.

    Attributes:
        patients: patient ids, sorted.
        labels: class index per patient, shape ``[num_patients]``.
        slide_ids: per patient, the global slide index of each of its slides.
        slide_names: global slide index -> ``"patient/slide"``.
        rows: per patient, per slide, an int array of table row indices.
    """

    patients: list[str]
    labels: np.ndarray
    slide_ids: list[np.ndarray]
    slide_names: list[str]
    rows: list[list[np.ndarray]]

    @classmethod
    def from_table(cls, table: PatchTable) -> PatientIndex:
        """Group a table's rows; one patient must have one label.

        Raises:
            DataError: the table is empty or a patient carries two different labels.
        """
        frame = table.frame
        if len(frame) == 0:
            raise DataError(f"{table.name}: no patches to build a hierarchy from")
        labels_of = frame.groupby("patient", sort=True)["label"].unique()
        mixed = [p for p, labs in labels_of.items() if len(labs) > 1]
        if mixed:
            raise DataError(f"{table.name}: patient {mixed[0]} has patches of several classes")
        class_index = {c: i for i, c in enumerate(table.classes)}
        patients = [str(p) for p in labels_of.index]
        labels = np.array([class_index[labs[0]] for labs in labels_of.to_numpy()], dtype=np.int64)

        patient_codes = {p: i for i, p in enumerate(patients)}
        p_code = frame["patient"].map(patient_codes).to_numpy()
        s_key = (frame["patient"] + "/" + frame["slide"]).to_numpy()
        slide_names, s_code = np.unique(s_key, return_inverse=True)
        order = np.lexsort((np.arange(len(frame)), s_code, p_code))
        rows: list[list[np.ndarray]] = [[] for _ in patients]
        slide_ids: list[list[int]] = [[] for _ in patients]
        # split the sorted order wherever the slide changes
        sorted_slides = s_code[order]
        cuts = np.flatnonzero(np.diff(sorted_slides)) + 1
        for chunk in np.split(order, cuts):
            patient = int(p_code[chunk[0]])
            rows[patient].append(chunk.astype(np.int64))
            slide_ids[patient].append(int(s_code[chunk[0]]))
        return cls(
            patients=patients,
            labels=labels,
            slide_ids=[np.asarray(s, dtype=np.int64) for s in slide_ids],
            slide_names=[str(s) for s in slide_names],
            rows=rows,
        )

    def __len__(self) -> int:
        return len(self.patients)


def _cyclic_choice(rng: np.random.Generator, n_have: int, n_want: int) -> np.ndarray:
    """``n_want`` indices into ``range(n_have)``: a random permutation, repeated when too short."""
    perm = rng.permutation(n_have)
    reps = math.ceil(n_want / n_have)
    return np.tile(perm, reps)[:n_want]


class HierarchicalDataset(Dataset):
    """Patients as items of ``S x N x T`` images.

    Args:
        table: patches of ONE split.
        slides_per_patient / patches_per_slide / views: ``S``, ``N``, ``T``.
        transform: base transform, raw ``[C,H,W]`` numpy patch -> float tensor ``[C',H',W']``.
        on_bad_file: ``"skip"`` replaces an unreadable/malformed patch by another patch of the same
            patient and counts it (``item["bad"]``); ``"fail"`` raises :class:`BadPatchError`.

    Items are fetched with a ``(patient_index, draw_seed)`` pair (what
    :class:`HierarchicalSampler` yields) or a plain patient index (draw seed = index). An item is a
    dict with ``image [S,N,T,C,H,W]`` float32, ``label`` (class index), ``patient`` (patient
    index), ``slide [S]`` (global slide index), ``patch [S,N]`` (table row index) and ``bad``
    (number of bad files replaced while building this item).
    """

    def __init__(
        self,
        table: PatchTable,
        slides_per_patient: int = 2,
        patches_per_slide: int = 2,
        views: int = 2,
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
        on_bad_file: str = "skip",
    ):
        for name, value in (
            ("slides_per_patient", slides_per_patient),
            ("patches_per_slide", patches_per_slide),
            ("views", views),
        ):
            if int(value) < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if on_bad_file not in BAD_FILE_POLICIES:
            raise ConfigError(
                f"on_bad_file must be one of {BAD_FILE_POLICIES}, got {on_bad_file!r}"
            )
        self.table = table
        self.index = PatientIndex.from_table(table)
        self.paths = table.frame["path"].to_numpy()
        self.modality = table.modality
        self.S, self.N, self.T = int(slides_per_patient), int(patches_per_slide), int(views)
        self.transform = transform if transform is not None else _to_float_tensor
        self.on_bad_file = on_bad_file
        self.bad_paths: set[str] = set()  # per process (each worker keeps its own)
        self._threads = KeptThreads("hlss-read")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> np.ndarray:
        """Class index per patient (what the sampler balances on)."""
        return self.index.labels

    def _load(self, row: int) -> np.ndarray:
        """The checked raw patch of ``row`` (the base transform is applied by the caller)."""
        path = str(self.paths[row])
        if path in self.bad_paths:
            raise BadPatchError(path, "known bad file")
        try:
            return load_patch(path, self.modality)
        except BadPatchError as err:
            self.bad_paths.add(path)
            if self.on_bad_file == "skip":
                log.warning("skipping bad patch %s", err)
            raise

    def _load_with_fallback(self, patient: int, slide_pos: int, row: int) -> tuple[np.ndarray, int]:
        """Load ``row``; on a bad file try the patient's other patches (same slide first).

        Returns the raw patch and the number of bad files met. Every candidate is tried at most
        once, so this ends; when none is readable the patient is reported. With
        ``on_bad_file="fail"`` the first bad file raises :class:`BadPatchError`.
        """
        try:
            return self._load(row), 0
        except BadPatchError:
            if self.on_bad_file == "fail":
                raise
        slides = self.index.rows[patient]
        candidates = [r for r in slides[slide_pos] if r != row]
        candidates += [r for s, rs in enumerate(slides) if s != slide_pos for r in rs]
        bad = 1
        for cand in candidates:
            try:
                return self._load(int(cand)), bad
            except BadPatchError:
                bad += 1
        raise DataError(
            f"patient {self.index.patients[patient]}: none of its {bad} patches could be read "
            "(run hlss-validate on the dataset)"
        )

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        return self._item(key, None)

    def __getitems__(self, keys: list) -> list[dict[str, torch.Tensor]]:
        """The items of ``keys`` (one loader batch; the DataLoader calls this rather than
        :meth:`__getitem__` per key). Their images are written into one ``[P, S, N, C, H, W]``
        block (in shared memory inside a loader worker), so that :func:`collate_patients` takes
        the block as the batch instead of stacking (copying) the items.

        Outside loader workers (``num_workers=0``) the patients are read on
        ``torch.get_num_threads()`` threads (decoding and the base transform release Python's
        lock); the items are the same as one thread makes. In a worker, one thread."""

        block = _ImageBlock(len(keys))

        def item(p: int) -> dict[str, torch.Tensor]:
            return self._item(keys[p], functools.partial(block.slot, p))

        in_worker = torch.utils.data.get_worker_info() is not None
        workers = 1 if in_worker else min(len(keys), torch.get_num_threads())
        if workers <= 1:
            return [item(p) for p in range(len(keys))]
        return list(self._threads.pool(workers).map(item, range(len(keys))))

    def _item(self, key: int | tuple[int, int], slot: Callable | None) -> dict[str, torch.Tensor]:
        patient, draw_seed = (key, key) if isinstance(key, (int, np.integer)) else key
        patient = int(patient)
        rng = np.random.default_rng(int(draw_seed))
        slide_rows = self.index.rows[patient]
        slide_pick = _cyclic_choice(rng, len(slide_rows), self.S)
        image = _PatientImage(
            self.transform, self.S, self.N, self.index.patients[patient], slot=slot
        )
        patch_rows, bad = np.empty((self.S, self.N), dtype=np.int64), 0
        for s, slide_pos in enumerate(slide_pick):
            rows = slide_rows[slide_pos]
            picks = rows[_cyclic_choice(rng, len(rows), self.N)]
            for n, row in enumerate(picks):
                raw, n_bad = self._load_with_fallback(patient, int(slide_pos), int(row))
                bad += n_bad
                patch_rows[s, n] = row
                image.put(s, n, raw)
        image = image.tensor.unsqueeze(2).expand(-1, -1, self.T, -1, -1, -1)
        return {
            "image": image,
            "label": torch.tensor(int(self.index.labels[patient])),
            "patient": torch.tensor(patient),
            "slide": torch.from_numpy(self.index.slide_ids[patient][slide_pick]),
            "patch": torch.from_numpy(patch_rows),
            "bad": torch.tensor(bad),
        }


def _new_batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor for a whole batch: in shared memory inside a loader worker (as
    ``default_collate`` makes its batches there, so that sending it to the main process copies
    nothing), in ordinary memory elsewhere."""
    if torch.utils.data.get_worker_info() is not None:
        try:
            like = torch.empty(0, dtype=dtype)
            storage = like._typed_storage()._new_shared(math.prod(shape))
            return like.new(storage).view(shape)
        except (AttributeError, RuntimeError, TypeError):  # private API: may change
            pass
    return torch.empty(shape, dtype=dtype)


class _ImageBlock:
    """One batch's patient images ``[P, S, N, C, H, W]`` in one tensor, allocated when the first
    patch's transformed shape is known (by whichever reading thread gets there first)."""

    def __init__(self, patients: int):
        self.patients = patients
        self.tensor: torch.Tensor | None = None
        self._lock = threading.Lock()

    def slot(self, patient: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """Patient ``patient``'s ``shape`` (``[S, N, C, H, W]``) part of the block; None when its
        shape or dtype differs from the block's (that patient's image is then a tensor of its
        own)."""
        with self._lock:
            if self.tensor is None:
                self.tensor = _new_batch_tensor((self.patients, *shape), dtype)
        same = tuple(self.tensor.shape[1:]) == shape and self.tensor.dtype == dtype
        return self.tensor[patient] if same else None


class _PatientImage:
    """An item's ``[S, N, C, H, W]`` image, filled one transformed patch at a time: a base
    transform with ``into`` (:class:`hlss.data.transforms.BaseTransform`) writes each patch
    straight into it; any other transform's output is copied in. ``slot(shape, dtype)``, when
    given, offers the memory to fill (a part of a batch block; None: a tensor of its own)."""

    def __init__(
        self,
        transform: Callable,
        slides: int,
        patches: int,
        patient: str,
        slot: Callable[[tuple[int, ...], torch.dtype], torch.Tensor | None] | None = None,
    ):
        self.transform, self.shape, self.patient = transform, (slides, patches), patient
        self.slot = slot
        self.tensor: torch.Tensor | None = None

    def _allocate(self, shape: tuple[int, ...], like: torch.Tensor | None = None) -> None:
        full = (*self.shape, *shape)
        dtype = torch.float32 if like is None else like.dtype
        place = None
        if self.slot is not None and (like is None or like.device.type == "cpu"):
            place = self.slot(full, dtype)
        if place is not None:
            self.tensor = place
        elif like is not None:
            self.tensor = like.new_empty(full)
        else:
            self.tensor = torch.empty(full, dtype=dtype)

    def _check(self, shape: tuple[int, ...]) -> None:
        if shape != tuple(self.tensor.shape[2:]):
            raise DataError(
                f"patient {self.patient}: patches of different sizes "
                f"({tuple(self.tensor.shape[2:])} and {shape}); set dataset.transform.size "
                "so that the base transform crops them alike"
            )

    def put(self, slide: int, patch: int, raw: np.ndarray) -> None:
        into = getattr(self.transform, "into", None)
        if into is not None:
            shape = tuple(self.transform.output_shape(raw))
            if self.tensor is None:
                self._allocate(shape)
            self._check(shape)
            into(raw, self.tensor[slide, patch])
            return
        img = self.transform(raw)
        if self.tensor is None:
            self._allocate(tuple(img.shape), like=img)
        self._check(tuple(img.shape))
        self.tensor[slide, patch] = img


def collate_patients(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch dataset items keeping one copy of each patch: ``image`` ``[P, S, N, 1, C, H, W]``
    and ``views`` (``T``, a 0-d tensor); :func:`expand_views` turns it into the full batch.

    The ``T`` views of a patch are identical until the batched augmentation, so a loader worker
    needs to write only ``1/T`` of the bytes into shared memory (pinning, too, copies only that).
    Other keys, and items that are not such mappings, are collated by
    :func:`torch.utils.data.default_collate`.
    """
    from torch.utils.data import default_collate

    first = items[0] if items else None
    image = first.get("image") if isinstance(first, dict) else None
    if not isinstance(image, torch.Tensor) or image.dim() != 6:
        return default_collate(items)
    shape = image.shape
    images = [item["image"][:, :, :1] if isinstance(item, dict) else None for item in items]
    shapes = {tuple(im.shape) for im in images if isinstance(im, torch.Tensor)}
    if len(shapes) > 1:
        sizes = " and ".join(str(s[-3:]) for s in sorted(shapes)[:2])
        raise DataError(
            f"patients of one batch have patches of different sizes ({sizes}); set "
            "dataset.transform.size so that the base transform crops them alike"
        )
    block = _one_block(images)
    if block is None:
        batch = default_collate(
            [{**item, "image": im} for item, im in zip(items, images, strict=True)]
        )
    else:  # the items were made together (HierarchicalDataset.__getitems__): no copy
        batch = default_collate([{k: v for k, v in item.items() if k != "image"} for item in items])
        batch["image"] = block
    batch["views"] = torch.tensor(int(shape[2]))
    return batch


def _one_block(images: list) -> torch.Tensor | None:
    """``images`` (each ``[S, N, 1, C, H, W]``) as one ``[P, S, N, 1, C, H, W]`` tensor without
    copying, when they lie one after another in one contiguous block of memory; else None."""
    first = images[0]
    if not isinstance(first, torch.Tensor) or not first.squeeze(2).is_contiguous():
        return None
    step, storage = first.numel(), first.untyped_storage().data_ptr()
    for p, im in enumerate(images):
        if (
            not isinstance(im, torch.Tensor)
            or im.shape != first.shape
            or im.stride() != first.stride()
            or im.dtype != first.dtype
            or im.device != first.device
            or im.untyped_storage().data_ptr() != storage
            or im.storage_offset() != first.storage_offset() + p * step
        ):
            return None
    return first.as_strided((len(images), *first.shape), (step, *first.stride()))


def expand_views(batch):
    """A :func:`collate_patients` batch as the full ``[P, S, N, T, C, H, W]`` batch: ``image``
    expanded along the views axis (stride 0, no copy; the values of a plain collate), ``views``
    dropped. Anything else (a batch without ``views``) is returned unchanged."""
    if not isinstance(batch, dict) or "views" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k != "views"}
    image = batch["image"]
    out["image"] = image.expand(*image.shape[:3], int(batch["views"]), *image.shape[4:])
    return out


def shares_views(image: torch.Tensor) -> bool:
    """Whether a batch image ``[P, S, N, T, C, H, W]`` holds one copy of each patch for all
    ``T`` views (stride 0 along the views axis, as :func:`collate_patients` makes it)."""
    return image.dim() == 7 and image.shape[3] > 1 and image.stride(3) == 0


def _to_float_tensor(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(raw.astype(np.float32))


class HierarchicalSampler(Sampler):
    """Yields ``(patient_index, draw_seed)`` pairs, one epoch at a time.

    Args:
        labels: class index per patient (``HierarchicalDataset.labels``).
        shuffle: random patient order per epoch (else index order).
        balance: class-balanced epochs: patients are drawn round-robin over classes in random
            class order, smaller classes cycling through their (reshuffled) patients, so every
            class appears equally often; the epoch then has ``num_classes * largest_class`` items.
        seed: base seed; the order depends only on ``(seed, epoch)``.
        num_replicas / rank: distributed split; ``None`` reads them from ``torch.distributed``
            when it is initialised at iteration time, else 1 / 0. The epoch order is padded by
            wrapping to a multiple of ``num_replicas`` and rank ``r`` takes positions
            ``r, r + num_replicas, ...``, so ranks see distinct patients (without balancing).
        drop_last: drop the wrap-around padding instead (ranks may then see fewer items).

    Call :meth:`set_epoch` each epoch (Lightning does it). :meth:`resume` makes the next
    iteration over a given epoch start part-way in (a mid-epoch resume; the position itself is
    counted by :class:`hlss.data.datamodule.ResumableLoader`, which Lightning saves).
    """

    def __init__(
        self,
        labels: np.ndarray,
        shuffle: bool = True,
        balance: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ):
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.size == 0:
            raise DataError("no patients to sample from")
        self.shuffle = shuffle
        self.balance = balance
        self.seed = int(seed)
        self._num_replicas = num_replicas
        self._rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, items already done)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, items: int) -> None:
        """Start the next iteration over ``epoch`` after its first ``items`` items (of this rank).

        Applies once, and only if :attr:`epoch` is ``epoch`` when iteration starts (a resume
        at the very end of an epoch moves on to the next epoch from its start).

        Raises:
            ConfigError: ``epoch`` or ``items`` is negative.
        """
        if int(epoch) < 0 or int(items) < 0:
            raise ConfigError(f"cannot resume at epoch {epoch}, item {items}")
        self.epoch = int(epoch)
        self._resume_at = (int(epoch), int(items))

    def start_item(self) -> int:
        """Where the next iteration starts in this rank's epoch (0 unless :meth:`resume` applies)."""
        if self._resume_at is None or self._resume_at[0] != self.epoch:
            return 0
        return self._resume_at[1]

    def _world(self) -> tuple[int, int]:
        replicas, rank = self._num_replicas, self._rank
        if replicas is None or rank is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                replicas = dist.get_world_size() if replicas is None else replicas
                rank = dist.get_rank() if rank is None else rank
            else:
                replicas = 1 if replicas is None else replicas
                rank = 0 if rank is None else rank
        if not 0 <= rank < replicas:
            raise ConfigError(f"rank {rank} is outside [0, {replicas})")
        return replicas, rank

    def epoch_order(self) -> np.ndarray:
        """The global (all ranks) patient order of the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.labels)
        if not self.balance:
            return rng.permutation(n) if self.shuffle else np.arange(n)
        classes = np.unique(self.labels)
        members = {c: np.flatnonzero(self.labels == c) for c in classes}
        per_class = max(len(m) for m in members.values())
        columns = []
        for c in classes:
            m = members[c]
            cycle = [
                rng.permutation(m) if self.shuffle else m
                for _ in range(math.ceil(per_class / len(m)))
            ]
            columns.append(np.concatenate(cycle)[:per_class])
        grid = np.stack(columns, axis=1)  # [per_class, num_classes]: one round per row
        if self.shuffle:
            grid = rng.permuted(grid, axis=1)  # random class order within each round
        return grid.reshape(-1)

    def _positions(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's patients and their slot numbers in the (padded) global epoch order."""
        order = self.epoch_order()
        replicas, rank = self._world()
        if self.drop_last:
            total = (len(order) // replicas) * replicas
        else:
            total = math.ceil(len(order) / replicas) * replicas
        slots = np.arange(rank, total, replicas)
        return order[slots % len(order)], slots  # padding wraps around to the start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        patients, slots = self._positions()
        skip, self._resume_at = self.start_item(), None
        for patient, slot in zip(patients[skip:].tolist(), slots[skip:].tolist(), strict=True):
            seed = np.random.SeedSequence([self.seed, self.epoch, slot]).generate_state(1)[0]
            yield patient, int(seed)

    def __len__(self) -> int:
        if self.balance:
            counts = np.bincount(self.labels)
            n = int(np.count_nonzero(counts) * counts.max())
        else:
            n = len(self.labels)
        replicas, _ = self._world()
        return n // replicas if self.drop_last else math.ceil(n / replicas)
