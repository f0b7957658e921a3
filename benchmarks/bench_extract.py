"""Embedding-extraction benchmark (the ``extract`` section of ``make bench``); prints one JSON object.

:func:`measure` writes a synthetic OpenSRH set, then embeds its patches to disk through the
project's own path (:func:`hlss.eval.embed.embed_table`: TIFF reading, base transform,
``Trainer.predict``, the float16 embedding writer) and, on the same images already in memory,
times the backbone's forward pass alone (``model.embed`` under ``inference_mode``, same batch size).

* ``images_per_s``: patches per second of the whole extraction to disk;
* ``forward_only_images_per_s``: patches per second of the forward passes alone;
* ``ratio``: the first over the second (1 = extraction costs nothing beyond the forward pass).

Usage: python benchmarks/bench_extract.py [--quick] [override ...]   (Hydra overrides, e.g. backbone=resnet50)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from hydra import compose, initialize_config_module

from hlss.config import build_model, register_resolvers
from hlss.data.io import load_patch
from hlss.data.opensrh import read_opensrh
from hlss.data.synthetic import generate_opensrh
from hlss.data.transforms import BaseTransform
from hlss.eval.embed import embed_table
from hlss.schemas import register_schemas


def measure(
    quick: bool = False, overrides: list[str] | None = None, device: torch.device | None = None
) -> dict:
    """The ``extract`` section: ``{"images_per_s", "forward_only_images_per_s", "ratio"}``."""
    device = torch.device("cpu") if device is None else device
    register_resolvers()
    register_schemas()
    size, per_slide, batch_size = (64, 4, 16) if quick else (224, 8, 32)
    with tempfile.TemporaryDirectory(prefix="hlss-bench-extract-") as workdir:
        with initialize_config_module("hlss.conf", version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    f"paths.root={workdir}",
                    f"paths.output_dir={workdir}/run",
                    *(overrides or []),
                ],
            )
        model = build_model(cfg).eval()
        root = generate_opensrh(
            os.path.join(workdir, "synth"),
            seed=0,
            patients_per_class=2,
            slides_per_patient=2,
            patches_per_slide=per_slide,
            nondiagnostic_per_slide=0,
            size=size,
        )
        table = read_opensrh(root).subset("train")
        transform = BaseTransform("srh")
        n = len(table.frame)

        # warm-up of both paths (allocations, Lightning's first start)
        embed_table(
            model,
            table,
            transform,
            os.path.join(workdir, "warm"),
            batch_size=batch_size,
            device=device,
            progress_bar=False,
        )
        start = time.perf_counter()
        embed_table(
            model,
            table,
            transform,
            os.path.join(workdir, "emb"),
            batch_size=batch_size,
            device=device,
            progress_bar=False,
        )
        extract_s = time.perf_counter() - start

        images = torch.stack([transform(load_patch(p, "srh")) for p in table.frame["path"]])
        model.to(device)
        with torch.inference_mode():
            model.embed(images[:batch_size].to(device))
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for first in range(0, n, batch_size):
                model.embed(images[first : first + batch_size].to(device))
            if device.type == "cuda":
                torch.cuda.synchronize()
            forward_s = time.perf_counter() - start
    return {
        "images_per_s": round(n / extract_s, 1),
        "forward_only_images_per_s": round(n / forward_s, 1),
        "ratio": round(forward_s / extract_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(json.dumps(measure(args.quick, args.overrides), indent=1))


if __name__ == "__main__":
    main()
