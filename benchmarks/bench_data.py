"""Data-path benchmark (the ``data`` section of ``make bench``); prints one JSON object.

:func:`measure`: a synthetic OpenSRH set at 300 px is read from TIFF through the hierarchy loader
in one process, base transform plus the packaged HiDisc augmentation, 2 views per patch;
``raw_read_files_per_s`` is TIFF decoding alone on the same files; ``load_images_per_s`` and
``augment_images_per_s`` split the total into its two stages. ``--indexing N`` also times
``read_opensrh`` + hierarchy grouping of an N-entry metadata file (no images).

Usage: python benchmarks/bench_data.py [--quick] [--device cpu|cuda] [--indexing 300000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from omegaconf import OmegaConf

import hlss
from hlss.config import build
from hlss.data.hierarchy import (
    HierarchicalDataset,
    HierarchicalSampler,
    PatientIndex,
    collate_patients,
    expand_views,
)
from hlss.data.io import read_patch
from hlss.data.opensrh import (
    META_DIR,
    META_FILE,
    NONDIAGNOSTIC_PATCHES,
    SPLIT_FILE,
    diagnostic_key,
    empty_patch_lists,
    patch_path,
    read_opensrh,
)
from hlss.data.synthetic import generate_opensrh
from hlss.data.transforms import BaseTransform
from hlss.devices import resolve_device


def write_big_meta(root: str, entries: int, seed: int = 0) -> int:
    """OpenSRH-format metadata with about ``entries`` tumour/normal paths over ~300 patients."""
    rng = np.random.default_rng(seed)
    classes = list(hlss.CLASSES_OPENSRH)
    patients = 300
    per_patient = entries // patients
    meta, split, written = {}, {"train": [], "val": []}, 0
    for p in range(patients):
        pid = f"NIO_{p:03d}" if p % 5 else f"NIO_UM_{p:03d}"
        label = classes[p % len(classes)]
        n_slides = int(rng.integers(2, 7))
        sizes = np.full(n_slides, per_patient // n_slides)
        sizes[0] += per_patient - sizes.sum()
        slides = {}
        for s, n in enumerate(sizes):
            sid = str(1000000 + 37 * p + s)
            paths = [
                patch_path(pid, sid, i // 9 * 1000, 0, i % 3 * 300, i // 3 % 3 * 300)
                for i in range(int(n))
            ]
            slides[sid] = empty_patch_lists()
            slides[sid][diagnostic_key(label)] = paths
            slides[sid][NONDIAGNOSTIC_PATCHES] = paths[:2]
            written += len(paths)
        meta[pid] = {"class": label, "slides": slides}
        split["val" if p % 5 == 0 else "train"].append(pid)
    os.makedirs(os.path.join(root, META_DIR), exist_ok=True)
    with open(os.path.join(root, META_FILE), "w") as h:
        json.dump(meta, h)
    with open(os.path.join(root, SPLIT_FILE), "w") as h:
        json.dump(split, h)
    return written


def bench_indexing(workdir: str, entries: int) -> dict:
    root = os.path.join(workdir, "big")
    written = write_big_meta(root, entries)
    t0 = time.perf_counter()
    table = read_opensrh(root)
    t1 = time.perf_counter()
    index = PatientIndex.from_table(table.subset("train"))
    t2 = time.perf_counter()
    return {
        "entries": written,
        "read_opensrh_s": round(t1 - t0, 3),
        "hierarchy_index_train_s": round(t2 - t1, 3),
        "train_patients": len(index),
    }


def _hidisc_augment(device: torch.device) -> torch.nn.Module:
    """The packaged ``augment=hidisc`` (whatever values it holds), at its default probability."""
    conf = os.path.join(os.path.dirname(hlss.__file__), "conf", "augment", "hidisc.yaml")
    return build(OmegaConf.load(conf)).to(device)


def measure(quick: bool = False, device: torch.device | None = None) -> dict:
    """The ``data`` section of ``make bench``.

    Single process (``num_workers=0``): SRH patches read from TIFF (a synthetic set at 300 px),
    the SRH base transform, 2 patches x 2 slides x 2 views per patient, and the packaged HiDisc
    augmentation at its default probability, batched on ``device`` (the CPU unless given).

    Returns:
        ``{"images_per_s", "load_images_per_s", "augment_images_per_s", "raw_read_files_per_s",
        "workers", "torch_threads", "batches", "mean_images_per_s"}``: augmented 300-px images
        per second through loader + augmentation, the same images over the loader's time alone
        (TIFF read, base transform, hierarchy batch) and over the augmentation's time alone, each
        from the median batch (a shared machine's bursts of noise move a mean by +-15%), TIFF files
        decoded per second on the same files, the intra-op thread count in effect, the number of
        timed batches, and the first figure from the total time of all batches.
    """
    device = torch.device("cpu") if device is None else device
    patients, batches = (4, 3) if quick else (8, 20)
    with tempfile.TemporaryDirectory(prefix="hlss-bench-data-") as workdir:
        root = generate_opensrh(
            os.path.join(workdir, "synth"),
            seed=0,
            patients_per_class=2,
            slides_per_patient=2,
            patches_per_slide=3 if quick else 6,
            nondiagnostic_per_slide=0,
            size=300,
        )
        table = read_opensrh(root).subset("train")
        paths = [str(p) for p in table.frame["path"]]
        read_patch(paths[0])
        start = time.perf_counter()
        for path in paths:
            read_patch(path)
        read_s = time.perf_counter() - start

        dataset = HierarchicalDataset(table, 2, 2, 2, transform=BaseTransform("srh"))
        sampler = HierarchicalSampler(dataset.labels, seed=0)
        loader = torch.utils.data.DataLoader(  # the training loader's batches
            dataset,
            batch_size=patients,
            sampler=sampler,
            num_workers=0,
            collate_fn=collate_patients,
        )
        augment = _hidisc_augment(device)

        def batches_of_images():
            while True:
                yield from map(expand_views, loader)

        stream = batches_of_images()
        augment(next(stream)["image"].to(device))  # warm-up
        images, load_s, augment_s = 0, [], []
        for _ in range(batches):
            t0 = time.perf_counter()
            batch = next(stream)["image"].to(device)
            t1 = time.perf_counter()
            x = augment(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            load_s.append(t1 - t0)
            augment_s.append(t2 - t1)
            images = int(np.prod(x.shape[:4]))  # the same in every batch
            del batch
    load, aug = float(np.median(load_s)), float(np.median(augment_s))
    return {
        "images_per_s": round(images / (load + aug), 1),
        "load_images_per_s": round(images / load, 1),
        "augment_images_per_s": round(images / aug, 1),
        "raw_read_files_per_s": round(len(paths) / read_s, 1),
        "workers": 0,
        "torch_threads": torch.get_num_threads(),
        "batches": batches,
        "mean_images_per_s": round(images * batches / (sum(load_s) + sum(augment_s)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds)")
    parser.add_argument(
        "--indexing",
        type=int,
        default=0,
        metavar="ENTRIES",
        help="also time metadata indexing of this many entries",
    )
    parser.add_argument("--device", default="cpu", help="where the augmentation runs")
    args = parser.parse_args()
    result = measure(args.quick, resolve_device(args.device))
    if args.indexing:
        with tempfile.TemporaryDirectory() as workdir:
            result["indexing"] = bench_indexing(workdir, args.indexing)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
