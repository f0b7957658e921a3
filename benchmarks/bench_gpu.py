"""GPU benchmark (the ``gpu`` section of ``make bench`` on a CUDA machine); prints one JSON object.

The paper's training setting, ``experiment=opensrh_hlss`` (CLIP RN50 with its own text tower,
224-px images, 32 patients x 2 slides x 2 patches x 2 views = 256 images a step, AdamW), with
random weights (no hub needed) on a generated OpenSRH-layout set of 300-px patches:

* ``train_images_per_s``: a full HLSS step (GPU augmentation, forward, three heads, the three
  contrastive terms and the alignment, backward, optimiser) on one fixed batch, bf16 autocast
  (Lightning's ``bf16-mixed``) and channels-last; beside it the same step without channels-last,
  in float32 (the published precision), without the augmentation, and a backbone-only step;
* ``loader_images_per_s``: the experiment's training loader alone (``loader.num_workers``
  processes reading TIFF and applying the base transform, pinned memory), over epochs of
  OpenSRH's length (``epoch_batches``; :func:`replicated`);
* ``pipeline_images_per_s``: loader -> device -> augmentation -> step, as training runs it;
  ``loader_keeps_up`` is whether that reaches 95% of the fixed-batch step;
* ``augment_images_per_s``: the HiDisc augmentation alone, batched on the GPU;
* ``train_compiled_images_per_s`` and ``pipeline_compiled_images_per_s``: the full step and the
  pipeline with the model's forward and the objective compiled as ``compile=true`` does it
  (``torch.compile``, torch's defaults; ``compile_s``: the first step's compile time);
* ``knn_eval_scale``: kNN (k=200) of 58,000 queries against 232,000 references at dim 2048 on the
  GPU with the backend ``knn.backend=auto`` picks there (FAISS GPU when installed, else torch),
  its agreement with exact float32 kNN, and the GPU memory it peaked at.

Usage: python benchmarks/bench_gpu.py [--quick] [--device cuda] [--workers 16]
(``--quick --device cpu`` runs every branch at tiny sizes, without figures worth reading.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from common import sync, train_config

from hlss.config import build, build_datamodule, build_model, build_objective
from hlss.data.synthetic import generate_opensrh
from hlss.data.table import PatchTable
from hlss.eval.knn import KNNIndex, weighted_vote
from hlss.train.module import hierarchy_ids

#: The paper's setting with random weights (the benchmark needs no model hub).
PAPER = ["experiment=opensrh_hlss", "backbone.pretrained=false", "text_encoder.pretrained=false"]
EVAL_SCALE = {"n_ref": 232_000, "n_query": 58_000, "dim": 2048}
QUICK_SCALE = {"n_ref": 4_000, "n_query": 1_000, "dim": 256}
K, TEMPERATURE, CLASSES = 200, 0.07, 7


def _median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Stepper:
    """One training step of the composed model and objective, in a chosen precision and
    memory order (what ``HLSSModule`` and Lightning's precision plugin do, without a Trainer)."""

    def __init__(self, cfg, device: torch.device, augment: torch.nn.Module):
        self.device = device
        self.model = build_model(cfg).to(device).train()
        self.objective = build_objective(cfg).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, _ = build(cfg.optimizer)(params, total_steps=1000)
        self.augment = augment.to(device)
        self.text = getattr(self.model, "text_embeddings", None)
        self.memory_format = torch.contiguous_format

    def step(
        self, batch: dict, bf16: bool, channels_last: bool, augment: bool, backbone_only=False
    ):
        images = batch["image"]
        if augment:
            images = self.augment(images)
        flat = images.reshape(-1, *images.shape[4:])
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if fmt is not self.memory_format:
            self.model.to(memory_format=fmt)
            self.memory_format = fmt
        flat = flat.contiguous(memory_format=fmt)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            if backbone_only:
                loss = self.model.backbone(flat).float().pow(2).mean()
            else:
                out = self.model(flat)
                loss = self.objective(
                    out["heads"],
                    hierarchy_ids(batch),
                    text_embeddings=self.text,
                    text_space=out.get("text_space"),
                )["loss"]
        loss.backward()
        self.optimizer.step()


def _train(cfg, stepper: _Stepper, batch: dict, quick: bool) -> dict:
    """Images/s of the step variants on one fixed batch already on the device."""
    images = int(np.prod(batch["image"].shape[:4]))
    warmup, repeats = (1, 2) if quick else (3, 10)
    variants = {
        "train_images_per_s": {"bf16": True, "channels_last": True, "augment": True},
        "train_no_channels_last_images_per_s": {
            "bf16": True,
            "channels_last": False,
            "augment": True,
        },
        "train_fp32_images_per_s": {"bf16": False, "channels_last": True, "augment": True},
        "train_no_augment_images_per_s": {"bf16": True, "channels_last": True, "augment": False},
        "backbone_only_images_per_s": {
            "bf16": True,
            "channels_last": True,
            "augment": False,
            "backbone_only": True,
        },
    }
    out = {}
    for name, kwargs in variants.items():
        seconds = _median_seconds(
            lambda kw=kwargs: stepper.step(batch, **kw), stepper.device, warmup, repeats
        )
        out[name] = round(images / seconds, 1)
    out["step_ratio"] = round(
        out["backbone_only_images_per_s"] / out["train_no_augment_images_per_s"], 3
    )
    return out


def replicated(table: PatchTable, copies: int) -> PatchTable:
    """``copies`` renamed copies of every patient of ``table`` (the same files).

    A balanced epoch of the small generated set is one batch of 32 patients; with OpenSRH's
    ~300 training patients an epoch is ~17 batches. Copies give the benchmark epochs of that
    length without writing more files (the page cache holds them), so the figure is not
    dominated by what happens at epoch boundaries.
    """
    frame = table.frame
    copies_of = [frame.assign(patient=frame["patient"] + f"~{i}") for i in range(copies)]
    return dataclasses.replace(table, frame=pd.concat(copies_of, ignore_index=True))


def _loader(cfg, stepper: _Stepper, quick: bool) -> dict:
    """The loader alone, and loader + step as training runs them (the data module's own
    transfer to the device, as Lightning calls it), over epochs of OpenSRH's length."""
    datamodule = build_datamodule(cfg)
    datamodule.table = replicated(build(cfg.dataset.table), 1 if quick else 16)
    loader = datamodule.train_dataloader()
    batches = 3 if quick else 30

    def stream():
        while True:
            yield from loader

    source = stream()
    first = next(source)  # the workers start here
    images = int(np.prod(first["image"].shape[:4]))
    for _ in range(2):
        next(source)
    start = time.perf_counter()
    for _ in range(batches):
        next(source)
    loader_s = time.perf_counter() - start

    device = stepper.device

    def to_device(batch: dict) -> dict:
        return datamodule.transfer_batch_to_device(batch, device, 0)

    for _ in range(2):
        stepper.step(to_device(next(source)), True, True, True)
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        stepper.step(to_device(next(source)), True, True, True)
    sync(device)
    pipeline_s = time.perf_counter() - start
    return {
        "loader_images_per_s": round(images * batches / loader_s, 1),
        "pipeline_images_per_s": round(images * batches / pipeline_s, 1),
        "loader_workers": int(cfg.loader.num_workers),
        "epoch_batches": len(loader),
        "pin_memory": bool(cfg.loader.pin_memory),
    }


def _compiled(cfg, stepper: _Stepper, batch: dict, quick: bool) -> dict:
    """The full step and the pipeline with the model's forward and the objective compiled in place,
    as ``compile=true`` does; ``--quick`` traces without code generation (``backend="eager"``), a
    smoke test only."""
    images = int(np.prod(batch["image"].shape[:4]))
    arguments = {"backend": "eager"} if quick else {}
    stepper.model.compile(**arguments)
    stepper.objective.compile(**arguments)
    sync(stepper.device)
    start = time.perf_counter()
    stepper.step(batch, True, True, True)
    sync(stepper.device)
    compile_s = time.perf_counter() - start
    seconds = _median_seconds(
        lambda: stepper.step(batch, True, True, True), stepper.device, 2, 2 if quick else 10
    )
    return {
        "compile_s": round(compile_s, 1),
        "train_compiled_images_per_s": round(images / seconds, 1),
        "pipeline_compiled_images_per_s": _loader(cfg, stepper, quick)["pipeline_images_per_s"],
    }


def _augment(stepper: _Stepper, batch: dict, quick: bool) -> float:
    images = int(np.prod(batch["image"].shape[:4]))
    seconds = _median_seconds(
        lambda: stepper.augment(batch["image"]), stepper.device, 1, 2 if quick else 10
    )
    return round(images / seconds, 1)


def _unit_rows(rows: int, dim: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(rows, dim, dtype=torch.float16, device=device)
    for start in range(0, rows, 16384):
        x = torch.randn(min(16384, rows - start), dim, generator=gen, device="cpu").to(device)
        out[start : start + len(x)] = torch.nn.functional.normalize(x, dim=1).half()
    return out


def knn_eval_scale(device: torch.device, quick: bool) -> dict:
    """The ``auto`` kNN backend at the evaluation scale on ``device``, with its agreement
    against exact float32 kNN on the first 4,096 queries and the peak GPU memory."""
    sizes = QUICK_SCALE if quick else EVAL_SCALE
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(400, sizes["dim"], generator=gen).to(device)
    slide_class = torch.randint(0, CLASSES, (400,), generator=gen)

    def draw(rows: int) -> tuple[torch.Tensor, np.ndarray]:
        slide = torch.randint(0, 400, (rows,), generator=gen)
        noise = _unit_rows(rows, sizes["dim"], device, gen).float() * 1.5 * sizes["dim"] ** 0.5
        x = torch.nn.functional.normalize(0.5 * centres[slide.to(device)] + noise, dim=1)
        return x.half(), slide_class[slide].numpy()

    bank, labels = draw(sizes["n_ref"])
    queries, _ = draw(sizes["n_query"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    index = KNNIndex(bank, labels, CLASSES, backend="auto", device=device)
    index.scores(queries[:256], k=K, temperature=TEMPERATURE)  # warm-up
    build_s = time.perf_counter() - start
    sync(device)
    start = time.perf_counter()
    scores = index.scores(queries, k=K, temperature=TEMPERATURE)
    sync(device)
    seconds = time.perf_counter() - start

    subset = min(4096, sizes["n_query"])
    sims = queries[:subset].float() @ bank.float().T
    top, idx = sims.topk(K, dim=1)
    exact = weighted_vote(top.cpu().numpy(), labels[idx.cpu().numpy()], CLASSES, TEMPERATURE)
    agreement = float((exact.argmax(1) == np.asarray(scores)[:subset].argmax(1)).mean())
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        **sizes,
        "backend": index.backend,
        "build_and_warmup_s": round(build_s, 2),
        "seconds": round(seconds, 2),
        "agreement_with_fp32": round(agreement, 5),
        "peak_gpu_mb": None if peak is None else round(peak, 1),
    }


def measure(
    quick: bool = False,
    extra: dict | None = None,
    device: torch.device | None = None,
    workers: int = 16,
) -> dict:
    """The ``gpu`` section (module docstring). ``extra`` receives the kNN details.

    Raises:
        RuntimeError: no ``device`` is given and no CUDA device is visible.
    """
    if device is None:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        device = torch.device("cuda")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="hlss-bench-gpu-") as workdir:
        root = generate_opensrh(
            os.path.join(workdir, "opensrh"),
            seed=0,
            patients_per_class=2 if quick else 7,  # 5 train patients per class: 35 >= 32
            slides_per_patient=2,
            patches_per_slide=2 if quick else 4,
            nondiagnostic_per_slide=0,
            size=300,
        )
        overrides = [*PAPER, f"dataset.root={root}", f"loader.num_workers={workers}"]
        if quick:
            overrides += ["loader.patients=4", "dataset.transform.size=64"]
        cfg = train_config(workdir, overrides)
        stepper = _Stepper(cfg, device, build(cfg.augment))
        datamodule = build_datamodule(cfg)
        datamodule.num_workers = 0
        batch = datamodule.transfer_batch_to_device(
            next(iter(datamodule.train_dataloader())), device, 0
        )
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "batch_images": int(np.prod(batch["image"].shape[:4])),
            "image_size": int(batch["image"].shape[-1]),
            "backbone": f"{cfg.backbone.name} {cfg.backbone.model}",
        }
        result.update(_train(cfg, stepper, batch, quick))
        result["augment_images_per_s"] = _augment(stepper, batch, quick)
        result.update(_loader(cfg, stepper, quick))
        result["loader_keeps_up"] = bool(
            result["pipeline_images_per_s"] >= 0.95 * result["train_images_per_s"]
        )
        result.update(_compiled(cfg, stepper, batch, quick))
        if device.type == "cuda":
            result["peak_gpu_mb_train"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        del stepper, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    knn = knn_eval_scale(device, quick)
    result["knn_eval_scale_s"] = knn["seconds"]
    result["knn_backend"] = knn["backend"]
    if extra is not None:
        extra["knn_eval_scale"] = knn
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--device", default=None, help="cuda (default when visible) or cpu")
    parser.add_argument("--workers", type=int, default=16, help="loader worker processes")
    args = parser.parse_args()
    extra: dict = {}
    device = None if args.device is None else torch.device(args.device)
    result = measure(args.quick, extra, device, args.workers)
    print(json.dumps({**result, "details": extra}, indent=1))


if __name__ == "__main__":
    main()
