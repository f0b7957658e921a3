"""The patient -> slide -> patch dataset and sampler."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader

from hlss.data.hierarchy import HierarchicalDataset, HierarchicalSampler, PatientIndex
from hlss.data.table import PatchTable
from hlss.errors import BadPatchError, ConfigError, DataError

SIZE = 4


def write_table(root, layout: dict[str, tuple[str, list[int]]], split: str = "train") -> PatchTable:
    """Write one tiny SRH TIFF per patch; every pixel of a patch holds its table row index.

    ``layout`` maps patient -> (class, [patches per slide]).
    """
    patients, slides, paths, labels, splits = [], [], [], [], []
    for patient, (label, per_slide) in layout.items():
        for s, n in enumerate(per_slide):
            for i in range(n):
                row = len(paths)
                path = os.path.join(root, f"{patient}-{s}-{i}.tif")
                tifffile.imwrite(path, np.full((2, SIZE, SIZE), row, dtype=np.uint16))
                patients.append(patient)
                slides.append(str(100 + s))
                paths.append(path)
                labels.append(label)
                splits.append(split)
    return PatchTable.from_records(patients, slides, paths, labels, splits, modality="srh")


def row_of(image: torch.Tensor) -> int:
    """The row index a test patch encodes (see write_table)."""
    return int(image[0, 0, 0].item())


@pytest.fixture
def table(tmp_path):
    layout = {
        "P1": ("a", [3, 2]),
        "P2": ("a", [1]),  # one slide with one patch: wraps around
        "P3": ("b", [2, 2, 2]),
        "P4": ("b", [4]),
        "P5": ("c", [2, 3]),
    }
    return write_table(str(tmp_path), layout)


def test_patient_index_groups_rows(table):
    index = PatientIndex.from_table(table)
    assert index.patients == ["P1", "P2", "P3", "P4", "P5"]
    assert index.labels.tolist() == [0, 0, 1, 1, 2]
    assert [len(r) for r in index.rows] == [2, 1, 3, 1, 2]
    frame = table.frame
    for p, patient in enumerate(index.patients):
        for s, rows in enumerate(index.rows[p]):
            assert set(frame.loc[rows, "patient"]) == {patient}
            assert len(set(frame.loc[rows, "slide"])) == 1
            assert index.slide_names[index.slide_ids[p][s]].startswith(patient + "/")
    all_rows = np.concatenate([r for rows in index.rows for r in rows])
    assert sorted(all_rows.tolist()) == list(range(len(table)))


def test_item_shapes_and_ids(table):
    ds = HierarchicalDataset(table, slides_per_patient=2, patches_per_slide=3, views=2)
    item = ds[(2, 123)]
    assert item["image"].shape == (2, 3, 2, 2, SIZE, SIZE)
    assert item["slide"].shape == (2,)
    assert item["patch"].shape == (2, 3)
    assert item["label"].item() == 1 and item["patient"].item() == 2
    frame = table.frame
    for s in range(2):
        slide_rows = item["patch"][s].tolist()
        # every patch of a slide position comes from that one slide of this patient
        assert len(set(frame.loc[slide_rows, "slide"])) == 1
        assert set(frame.loc[slide_rows, "patient"]) == {"P3"}
        for n, row in enumerate(slide_rows):
            for t in range(2):
                assert row_of(item["image"][s, n, t]) == row
    # the two slide positions hold two different slides (P3 has three)
    assert item["slide"][0] != item["slide"][1]


def test_wrap_around_when_patient_is_small(table):
    ds = HierarchicalDataset(table, slides_per_patient=3, patches_per_slide=4, views=1)
    item = ds[(1, 7)]  # P2: one slide, one patch
    assert item["image"].shape == (3, 4, 1, 2, SIZE, SIZE)
    assert set(item["patch"].flatten().tolist()) == {
        table.frame.index[table.frame.patient == "P2"][0]
    }
    item = ds[(0, 7)]  # P1: slides of 3 and 2 patches, asked 4 each: all patches used, repeated
    frame = table.frame
    for s in range(3):
        rows = item["patch"][s].tolist()
        slide = frame.loc[rows[0], "slide"]
        whole_slide = frame.index[(frame.patient == "P1") & (frame.slide == slide)].tolist()
        assert set(rows) == set(whole_slide)  # a permutation of the slide, cycled to length 4
    assert item["slide"][0] == item["slide"][2]  # three positions over two slides wrap around


def test_item_depends_only_on_draw_seed(table):
    ds = HierarchicalDataset(table, slides_per_patient=2, patches_per_slide=2, views=1)
    a, b = ds[(4, 99)], ds[(4, 99)]
    assert torch.equal(a["patch"], b["patch"])
    draws = {tuple(ds[(4, seed)]["patch"].flatten().tolist()) for seed in range(20)}
    assert len(draws) > 1


def test_bad_file_is_skipped_and_counted(table):
    bad_row = int(table.frame.index[table.frame.patient == "P4"][0])
    with open(table.frame.loc[bad_row, "path"], "wb") as handle:
        handle.write(b"not a tiff")
    ds = HierarchicalDataset(table, slides_per_patient=1, patches_per_slide=4, views=1)
    item = ds[(3, 0)]  # P4 has one slide of 4 patches: the bad one is always drawn
    assert item["bad"].item() >= 1
    loaded = {row_of(item["image"][0, n, 0]) for n in range(4)}
    assert bad_row not in loaded
    assert table.frame.loc[bad_row, "path"] in ds.bad_paths


def test_bad_file_fails_when_asked(table):
    bad_row = int(table.frame.index[table.frame.patient == "P4"][0])
    os.remove(table.frame.loc[bad_row, "path"])
    ds = HierarchicalDataset(
        table, slides_per_patient=1, patches_per_slide=4, views=1, on_bad_file="fail"
    )
    with pytest.raises(BadPatchError, match="file not found"):
        ds[(3, 0)]


def test_patient_without_readable_patch_ends_with_error(table):
    for path in table.frame.loc[table.frame.patient == "P3", "path"]:
        os.remove(path)
    ds = HierarchicalDataset(table, slides_per_patient=2, patches_per_slide=2, views=1)
    with pytest.raises(DataError, match="patient P3: none of its 6 patches"):
        ds[(2, 0)]


@pytest.mark.parametrize(
    "key,value", [("slides_per_patient", 0), ("views", -1), ("on_bad_file", "ignore")]
)
def test_bad_dataset_config(table, key, value):
    with pytest.raises(ConfigError, match=key):
        HierarchicalDataset(table, **{key: value})


def test_mixed_label_patient_rejected(tmp_path):
    table = write_table(str(tmp_path), {"P1": ("a", [1])})
    table.frame.loc[len(table.frame)] = ["P1", "101", "x.tif", "b", "train"]
    table = PatchTable(table.frame, ("a", "b"))
    with pytest.raises(DataError, match="patient P1 has patches of several classes"):
        PatientIndex.from_table(table)


# ------------------------------------------------------------------------------- sampler


def collect(sampler):
    return [p for p, _ in sampler]


def test_sampler_is_a_permutation_and_deterministic():
    labels = np.arange(10) % 3
    s1, s2 = HierarchicalSampler(labels, seed=5), HierarchicalSampler(labels, seed=5)
    e0 = collect(s1)
    assert sorted(e0) == list(range(10)) and len(s1) == 10
    assert e0 == collect(s2)
    assert [seed for _, seed in s1] == [seed for _, seed in s2]
    s1.set_epoch(1)
    assert collect(s1) != e0
    assert collect(HierarchicalSampler(labels, seed=6)) != e0
    assert collect(HierarchicalSampler(labels, shuffle=False)) == list(range(10))


@pytest.mark.parametrize("n,replicas", [(10, 2), (11, 2), (12, 3), (7, 4)])
def test_distributed_ranks_see_distinct_patients(n, replicas):
    labels = np.zeros(n, dtype=int)
    per_rank = [
        collect(HierarchicalSampler(labels, seed=1, num_replicas=replicas, rank=r))
        for r in range(replicas)
    ]
    lengths = {len(p) for p in per_rank}
    assert lengths == {-(-n // replicas)}
    flat = [p for part in per_rank for p in part]
    assert set(flat) == set(range(n))  # every patient seen
    if n % replicas == 0:
        assert len(flat) == len(set(flat))  # no patient on two ranks
    # padding only repeats as many as needed
    assert len(flat) - len(set(flat)) == (-n) % replicas
    # the draw seeds follow the global position, so they are distinct across ranks
    seeds = [
        s
        for r in range(replicas)
        for _, s in HierarchicalSampler(labels, seed=1, num_replicas=replicas, rank=r)
    ]
    assert len(set(seeds)) == len(seeds)


def test_distributed_drop_last():
    labels = np.zeros(11, dtype=int)
    per_rank = [
        collect(HierarchicalSampler(labels, num_replicas=2, rank=r, drop_last=True))
        for r in range(2)
    ]
    flat = per_rank[0] + per_rank[1]
    assert len(flat) == 10 and len(set(flat)) == 10


def test_class_balance():
    labels = np.array([0] * 12 + [1] * 3 + [2] * 1)
    sampler = HierarchicalSampler(labels, balance=True, seed=0)
    order = collect(sampler)
    assert len(order) == len(sampler) == 36
    counts = np.bincount(labels[order])
    assert counts.tolist() == [12, 12, 12]
    # each round of 3 holds one patient of every class
    rounds = labels[order].reshape(-1, 3)
    assert all(sorted(r) == [0, 1, 2] for r in rounds.tolist())
    # the small class cycles through all its patients
    assert set(np.array(order)[labels[order] == 1].tolist()) == {12, 13, 14}
    unbalanced = np.bincount(labels[collect(HierarchicalSampler(labels, seed=0))])
    assert unbalanced.tolist() == [12, 3, 1]


def test_sampler_rejects_bad_rank():
    with pytest.raises(ConfigError, match="rank 2"):
        collect(HierarchicalSampler(np.zeros(4), num_replicas=2, rank=2))


# ------------------------------------------------------------------------------- loader


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_independent_of_workers(table, workers):
    ds = HierarchicalDataset(table, slides_per_patient=2, patches_per_slide=2, views=2)
    sampler = HierarchicalSampler(ds.labels, seed=3)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers, drop_last=True)
    batches = list(loader)
    assert len(batches) == 2
    batch = batches[0]
    assert batch["image"].shape == (2, 2, 2, 2, 2, SIZE, SIZE)
    assert batch["label"].shape == (2,) and batch["slide"].shape == (2, 2)
    reference = [ds[key] for key in list(sampler)[:2]]
    assert torch.equal(batch["patch"], torch.stack([r["patch"] for r in reference]))
    for p in range(2):
        for s in range(2):
            for n in range(2):
                assert row_of(batch["image"][p, s, n, 1]) == batch["patch"][p, s, n].item()


def test_sampler_skip_resumes_mid_epoch():
    labels = np.arange(9) % 3
    full = list(HierarchicalSampler(labels, seed=2))
    sampler = HierarchicalSampler(labels, seed=2)
    sampler.resume(epoch=0, items=4)
    assert sampler.start_item() == 4
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the skip applies once


def test_sampler_resume_applies_to_its_epoch_only():
    labels = np.arange(9) % 3
    reference = HierarchicalSampler(labels, seed=2)
    reference.set_epoch(1)
    epoch1 = list(reference)
    sampler = HierarchicalSampler(labels, seed=2)
    sampler.resume(epoch=0, items=9)  # saved at the very end of epoch 0
    sampler.set_epoch(1)  # Lightning moves on to epoch 1
    assert sampler.start_item() == 0
    assert list(sampler) == epoch1
    with pytest.raises(ConfigError):
        sampler.resume(epoch=0, items=-1)


@pytest.mark.parametrize("workers", [0, 2])
def test_collate_patients_equals_plain_collate_with_views_sharing_memory(table, workers):
    from torch.utils.data import default_collate

    from hlss.data.datamodule import ResumableLoader
    from hlss.data.hierarchy import collate_patients, expand_views, shares_views

    ds = HierarchicalDataset(table, slides_per_patient=2, patches_per_slide=2, views=3)
    keys = list(HierarchicalSampler(ds.labels, seed=3))[:2]
    items = [ds[key] for key in keys]
    compact = collate_patients(items)
    assert compact["image"].shape == (2, 2, 2, 1, 2, SIZE, SIZE)
    assert int(compact["views"]) == 3
    plain = default_collate(items)
    batch = expand_views(compact)
    assert set(batch) == set(plain)
    for key in plain:
        assert torch.equal(batch[key], plain[key]), key
    assert shares_views(batch["image"]) and not shares_views(plain["image"])

    loader = ResumableLoader(
        ds,
        batch_size=2,
        sampler=HierarchicalSampler(ds.labels, seed=3),
        num_workers=workers,
        drop_last=True,
    )
    first = next(iter(loader))
    assert "views" not in first and shares_views(first["image"])
    assert torch.equal(first["image"], plain["image"])


def test_collate_patients_leaves_other_items_to_the_default():
    from hlss.data.hierarchy import collate_patients, expand_views

    out = collate_patients([torch.tensor(1), torch.tensor(2)])
    assert torch.equal(out, torch.tensor([1, 2]))
    assert expand_views(out) is out
    flat = collate_patients([{"image": torch.zeros(3, 4)}, {"image": torch.ones(3, 4)}])
    assert flat["image"].shape == (2, 3, 4) and "views" not in flat


def test_datamodule_moves_one_copy_of_each_patch_and_expands_on_the_device(monkeypatch):
    from hlss.data.datamodule import HierarchicalDataModule
    from hlss.data.hierarchy import expand_views

    base = torch.rand(2, 2, 2, 1, 3, 4, 4)
    batch = expand_views({"image": base, "patient": torch.arange(2), "views": torch.tensor(2)})
    moved = []

    dm = HierarchicalDataModule(table=lambda: None)
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        moved.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    out = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    monkeypatch.undo()
    assert (2, 2, 2, 1, 3, 4, 4) in moved and (2, 2, 2, 2, 3, 4, 4) not in moved
    assert out["image"].shape == (2, 2, 2, 2, 3, 4, 4)
    assert torch.equal(out["image"], base.expand(2, 2, 2, 2, 3, 4, 4))
    assert torch.equal(out["patient"], torch.arange(2))


@pytest.mark.parametrize("expanded", [True, False])
def test_the_count_of_bad_patches_stays_on_the_host(monkeypatch, expanded):
    """``bad`` is read by the training step each step; on a GPU, reading it from the device
    would make the step wait for the GPU, so the data module never moves it."""
    from lightning.pytorch.core.hooks import DataHooks

    from hlss.data.datamodule import HierarchicalDataModule
    from hlss.data.hierarchy import expand_views

    image = torch.rand(2, 2, 2, 1, 3, 4, 4)
    batch = {"image": image, "patient": torch.arange(2), "bad": torch.tensor([0, 1])}
    batch = expand_views({**batch, "views": torch.tensor(2)}) if expanded else batch
    seen = []

    def spy(self, batch, device, dataloader_idx):
        seen.extend(batch)
        return batch

    monkeypatch.setattr(DataHooks, "transfer_batch_to_device", spy)
    out = HierarchicalDataModule(table=lambda: None).transfer_batch_to_device(
        batch, torch.device("cpu"), 0
    )
    assert "patient" in seen and "bad" not in seen
    assert out["bad"] is batch["bad"] and set(out) == set(batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_loader_batch_reaches_the_gpu_with_its_views(table):
    from torch.utils.data import default_collate

    from hlss.data.datamodule import HierarchicalDataModule, ResumableLoader

    ds = HierarchicalDataset(table, slides_per_patient=2, patches_per_slide=2, views=2)
    sampler = HierarchicalSampler(ds.labels, seed=3)
    keys = list(sampler)[:2]
    loader = ResumableLoader(
        ds, batch_size=2, sampler=sampler, num_workers=2, pin_memory=True, drop_last=True
    )
    batch = next(iter(loader))
    assert batch["image"].is_pinned()
    moved = HierarchicalDataModule(table=lambda: None).transfer_batch_to_device(
        batch, torch.device("cuda"), 0
    )
    plain = default_collate([ds[key] for key in keys])
    assert moved["image"].is_cuda and torch.equal(moved["image"].cpu(), plain["image"])
    assert moved["bad"].device.type == "cpu"  # read by the training step: no GPU sync


def test_patches_of_different_sizes_in_one_patient_are_one_data_error(tmp_path):
    table = write_table(str(tmp_path), {"P1": ("a", [2]), "P2": ("b", [1])})
    tifffile.imwrite(table.frame["path"][1], np.zeros((2, SIZE + 2, SIZE), dtype=np.uint16))
    ds = HierarchicalDataset(table, slides_per_patient=1, patches_per_slide=2, views=2)
    with pytest.raises(DataError, match=r"P1: patches of different sizes .*dataset.transform.size"):
        ds[(0, 0)]
    assert ds[(1, 0)]["image"].shape == (1, 2, 2, 2, SIZE, SIZE)


def test_a_base_transform_writing_into_the_item_gives_what_a_plain_transform_gives(table):
    from hlss.data.transforms import BaseTransform

    base = BaseTransform("srh")  # keeps the row each test patch encodes
    direct = HierarchicalDataset(table, 2, 3, 2, transform=base)
    copied = HierarchicalDataset(table, 2, 3, 2, transform=lambda raw: base(raw))
    assert hasattr(direct.transform, "into") and not hasattr(copied.transform, "into")
    for key in [(0, 1), (2, 7), (4, 3)]:
        a, b = direct[key], copied[key]
        assert a["image"].shape == b["image"].shape == (2, 3, 2, 3, SIZE, SIZE)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["patch"], b["patch"])


def _shared_flag(items):
    """A worker's collate: whether the collated image lies in shared memory."""
    from hlss.data.hierarchy import collate_patients

    batch = collate_patients(items)
    return {"shared": torch.tensor(batch["image"].is_shared()), "image": batch["image"]}


def test_a_loader_batch_is_made_in_one_block_and_collated_without_a_copy(table):
    from torch.utils.data import default_collate

    from hlss.data.hierarchy import collate_patients

    ds = HierarchicalDataset(table, slides_per_patient=2, patches_per_slide=2, views=2)
    keys = list(HierarchicalSampler(ds.labels, seed=3))[:3]
    together = ds.__getitems__(keys)
    alone = [ds[key] for key in keys]
    for a, b in zip(together, alone, strict=True):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    batch = collate_patients(together)
    assert batch["image"].data_ptr() == together[0]["image"].data_ptr()  # no copy
    plain = default_collate(alone)
    assert torch.equal(batch["image"].expand_as(plain["image"]), plain["image"])
    copied = collate_patients(alone)  # items made one by one are stacked, as before
    assert copied["image"].data_ptr() != alone[0]["image"].data_ptr()
    assert torch.equal(copied["image"], batch["image"])
    # in a loader worker the block is in shared memory, as default_collate's batches are
    loader = DataLoader(ds, batch_size=3, sampler=keys, num_workers=1, collate_fn=_shared_flag)
    out = next(iter(loader))
    assert bool(out["shared"]) and torch.equal(out["image"], batch["image"])


def test_items_of_another_size_in_a_batch_get_their_own_memory(tmp_path):
    from hlss.data.hierarchy import collate_patients

    table = write_table(str(tmp_path), {"P1": ("a", [2]), "P2": ("b", [2])})
    for row in (2, 3):  # P2's patches are larger
        tifffile.imwrite(table.frame["path"][row], np.zeros((2, SIZE + 2, SIZE), dtype=np.uint16))
    ds = HierarchicalDataset(table, slides_per_patient=1, patches_per_slide=2, views=2)
    together = ds.__getitems__([(0, 0), (1, 0)])
    for key, item in zip([(0, 0), (1, 0)], together, strict=True):
        assert torch.equal(item["image"], ds[key]["image"])
    for items in (together, [ds[(0, 0)], ds[(1, 0)]]):
        with pytest.raises(DataError, match=r"different sizes .*dataset.transform.size"):
            collate_patients(items)


@pytest.fixture
def intra_op_threads():
    """Sets torch's intra-op thread count for a test and puts it back afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_batch_read_on_threads_is_what_one_thread_reads(table, intra_op_threads, threads):
    import pickle

    bad_row = int(table.frame.index[table.frame.patient == "P4"][0])
    with open(table.frame.loc[bad_row, "path"], "wb") as handle:
        handle.write(b"not a tiff")
    intra_op_threads(threads)
    ds = HierarchicalDataset(table, slides_per_patient=2, patches_per_slide=3, views=2)
    keys = [(p, 10 + p) for p in range(5)] * 2  # P4 (index 3) always draws its bad patch
    together = ds.__getitems__(keys)
    assert (ds._threads._pool is not None) == (threads > 1)  # threads kept for the next batch
    assert int(together[3]["bad"]) >= 1 and table.frame.loc[bad_row, "path"] in ds.bad_paths
    for key, item in zip(keys, together, strict=True):
        alone = ds[key]
        assert all(torch.equal(item[k], alone[k]) for k in alone), key
    assert pickle.loads(pickle.dumps(ds))._threads._pool is None  # a worker starts its own


def test_an_error_on_a_reading_thread_reaches_the_caller(table, intra_op_threads):
    for path in table.frame.loc[table.frame.patient == "P3", "path"]:
        os.remove(path)
    intra_op_threads(2)
    ds = HierarchicalDataset(table, slides_per_patient=2, patches_per_slide=2, views=1)
    with pytest.raises(DataError, match="patient P3: none of its 6 patches"):
        ds.__getitems__([(0, 0), (1, 0), (2, 0), (3, 0)])


def test_a_transform_of_another_dtype_gets_a_block_of_that_dtype(table):
    from hlss.data.hierarchy import collate_patients

    ds = HierarchicalDataset(
        table, 2, 2, 2, transform=lambda raw: torch.from_numpy(raw.astype(np.float64))
    )
    keys = [(0, 1), (2, 5), (4, 2)]
    together = ds.__getitems__(keys)
    for key, item in zip(keys, together, strict=True):
        assert item["image"].dtype == torch.float64
        assert torch.equal(item["image"], ds[key]["image"])
    batch = collate_patients(together)
    assert batch["image"].dtype == torch.float64
    assert batch["image"].data_ptr() == together[0]["image"].data_ptr()


def test_a_bad_file_in_a_loader_worker_stays_a_one_line_user_error(table):
    """``on_bad_file=fail`` inside a worker: the DataLoader raises the error again in the main
    process; it must still be a BadPatchError (which the console scripts print as one line)."""
    from hlss.cli.common import _last_line

    bad_row = int(table.frame.index[table.frame.patient == "P4"][0])
    os.remove(table.frame.loc[bad_row, "path"])
    ds = HierarchicalDataset(
        table, slides_per_patient=1, patches_per_slide=4, views=1, on_bad_file="fail"
    )
    loader = DataLoader(ds, batch_size=1, sampler=[(3, 0)], num_workers=1)
    with pytest.raises(BadPatchError) as caught:
        next(iter(loader))
    line = _last_line(caught.value)
    assert line == f"{table.frame.loc[bad_row, 'path']}: file not found"
    assert BadPatchError("a.tif", "truncated").path == "a.tif"
