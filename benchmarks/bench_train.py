"""Training-step benchmark on the default configuration; prints one JSON object.

* seconds per step and images per second of a whole step (data loading, batched augmentation,
  forward, HLSS objective, backward, optimiser step), as ``hlss-train`` runs it;
* the cost of the HLSS parts: a full HLSS forward+backward of a fixed batch against a
  backbone-only forward+backward of the same images.

Usage: python benchmarks/bench_train.py [--steps 10] [override ...]   (Hydra overrides, e.g. loader.patients=16)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from hydra import compose, initialize_config_module

from hlss.config import build_datamodule, build_model, build_objective, register_resolvers
from hlss.devices import resolve_device
from hlss.schemas import register_schemas
from hlss.train.module import hierarchy_ids


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    register_resolvers()
    register_schemas()
    root = tempfile.mkdtemp(prefix="hlss-bench-")
    with initialize_config_module("hlss.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"paths.root={root}", f"paths.output_dir={root}/run", *args.overrides],
        )
    device = resolve_device()
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    model = build_model(cfg)
    objective = build_objective(cfg)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    augment = datamodule.augment.to(device) if datamodule.augment is not None else None

    def hlss_loss(batch):
        images = batch["image"]
        out = model(images.reshape(-1, *images.shape[4:]))
        return objective(
            out["heads"],
            hierarchy_ids(batch),
            text_embeddings=getattr(model, "text_embeddings", None),
            text_space=out.get("text_space"),
        )["loss"]

    # 1. whole steps, as the trainer runs them
    loader = datamodule.train_dataloader()
    it = iter(loader)
    batch = next(it)
    images_per_step = int(batch["image"].shape[:4].numel())
    start = time.perf_counter()
    for _ in range(args.steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = {k: v.to(device) for k, v in batch.items()}
        if augment is not None:
            batch["image"] = augment(batch["image"])
        loss = hlss_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / args.steps

    # 2. HLSS forward+backward vs backbone-only forward+backward on one fixed batch
    flat = batch["image"].reshape(-1, *batch["image"].shape[4:])

    def backbone_only():
        optimizer.zero_grad(set_to_none=True)
        model.backbone(flat).pow(2).mean().backward()

    def full_hlss():
        optimizer.zero_grad(set_to_none=True)
        hlss_loss(batch).backward()

    backbone_s = timed(backbone_only, args.repeats, device)
    hlss_s = timed(full_hlss, args.repeats, device)
    print(
        json.dumps(
            {
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "loss": str(cfg.loss.name),
                "backbone": str(cfg.backbone.name),
                "batch": [int(v) for v in batch["image"].shape[:4]],
                "image_size": list(batch["image"].shape[-2:]),
                "images_per_step": images_per_step,
                "num_workers": int(cfg.loader.num_workers),
                "seconds_per_step": round(step_s, 3),
                "images_per_second": round(images_per_step / step_s, 1),
                "backbone_fwd_bwd_s": round(backbone_s, 4),
                "hlss_fwd_bwd_s": round(hlss_s, 4),
                "hlss_over_backbone": round(hlss_s / backbone_s, 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
