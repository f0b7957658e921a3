"""Data-path benchmarks; prints one JSON object.

* indexing: build an OpenSRH-format metadata file with ``--entries`` patch paths (no images) and
  time ``read_opensrh`` plus the hierarchy grouping;
* pipeline: generate a synthetic OpenSRH dataset at full patch size (300 px) and time the
  hierarchy loader (single process) with and without the HiDisc augmentation on this machine's
  CPU (or GPU when present).

Usage: python benchmarks/bench_data.py [--entries 300000] [--batches 5] [--out DIR]
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
from hlss.data.hierarchy import HierarchicalDataset, HierarchicalSampler, PatientIndex
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


def bench_pipeline(workdir: str, batches: int, patients: int, device: torch.device) -> dict:
    root = os.path.join(workdir, "synth")
    t0 = time.perf_counter()
    generate_opensrh(
        root, seed=0, patients_per_class=3, slides_per_patient=2, patches_per_slide=6, size=300
    )
    gen_s = time.perf_counter() - t0
    table = read_opensrh(root).subset("train")
    dataset = HierarchicalDataset(table, 2, 2, 2, transform=BaseTransform("srh"))
    sampler = HierarchicalSampler(dataset.labels, seed=0)
    conf = os.path.join(os.path.dirname(hlss.__file__), "conf", "augment", "hidisc.yaml")
    augment = build(OmegaConf.load(conf)).to(device)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=patients, sampler=sampler, num_workers=0
    )

    def run(with_aug: bool) -> tuple[float, int, int]:
        items = images = 0
        start = time.perf_counter()
        it = iter(loader)
        for _ in range(batches):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            x = batch["image"].to(device)
            if with_aug:
                x = augment(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            items += x.shape[0]
            images += int(np.prod(x.shape[:4]))
        return time.perf_counter() - start, items, images

    run(True)  # warm-up
    load_s, items, images = run(False)
    full_s, _, _ = run(True)
    return {
        "device": str(device),
        "synthetic_generation_s": round(gen_s, 2),
        "patch_size": 300,
        "batch": [patients, 2, 2, 2],
        "load_only_items_per_s": round(items / load_s, 2),
        "load_only_images_per_s": round(images / load_s, 1),
        "with_augment_items_per_s": round(items / full_s, 2),
        "with_augment_images_per_s": round(images / full_s, 1),
        "augment_share": round(1 - load_s / full_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=300_000)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    device = resolve_device()
    with tempfile.TemporaryDirectory(dir=args.out) as workdir:
        result = {
            "torch_threads": torch.get_num_threads(),
            "indexing": bench_indexing(workdir, args.entries),
            "pipeline": bench_pipeline(workdir, args.batches, args.patients, device),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
