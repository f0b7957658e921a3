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

import os
import tempfile

import torch
from common import stage_main, timed, train_config

from hlss.config import build_model
from hlss.data.io import load_patch
from hlss.data.opensrh import read_opensrh
from hlss.data.synthetic import generate_opensrh
from hlss.data.transforms import BaseTransform
from hlss.eval.embed import embed_table


def measure(
    quick: bool = False, overrides: list[str] | None = None, device: torch.device | None = None
) -> dict:
    """The ``extract`` section: ``{"images_per_s", "forward_only_images_per_s", "ratio"}``."""
    device = torch.device("cpu") if device is None else device
    size, per_slide, batch_size = (64, 4, 16) if quick else (224, 8, 32)
    with tempfile.TemporaryDirectory(prefix="hlss-bench-extract-") as workdir:
        model = build_model(train_config(workdir, overrides)).eval()
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

        def extract(folder: str) -> None:
            embed_table(
                model,
                table,
                transform,
                os.path.join(workdir, folder),
                batch_size=batch_size,
                device=device,
                progress_bar=False,
            )

        extract("warm")  # warm-up (allocations, Lightning's first start)
        extract_s = timed(lambda: extract("emb"), device)

        images = torch.stack([transform(load_patch(p, "srh")) for p in table.frame["path"]])
        model.to(device)

        def forward_all() -> None:
            for first in range(0, n, batch_size):
                model.embed(images[first : first + batch_size].to(device))

        with torch.inference_mode():
            model.embed(images[:batch_size].to(device))  # warm-up
            forward_s = timed(forward_all, device)
    return {
        "images_per_s": round(n / extract_s, 1),
        "forward_only_images_per_s": round(n / forward_s, 1),
        "ratio": round(forward_s / extract_s, 3),
    }


def main() -> None:
    stage_main(__doc__, measure)


if __name__ == "__main__":
    main()
