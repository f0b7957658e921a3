"""Training-step benchmark (the ``train`` section of ``make bench``); prints one JSON object.

:func:`measure` builds the default HLSS model and objective (three text heads, three contrastive
terms, the alignment) and times, on one fixed hierarchy batch of random images:

* ``step_s``: a full HLSS step (forward, objective, backward, AdamW step);
* ``backbone_only_step_s``: a backbone-only forward + backward + AdamW step on the same images;
* ``step_ratio``: median over paired runs (one of each, alternating) of full / backbone-only;
* ``overhead_fraction``: everything but the backbone (projection, heads, the three contrastive
  terms, the alignment, their backward), timed alone on the same (detached) backbone features,
  over the backbone's forward + backward.

Usage: python benchmarks/bench_train.py [--quick] [override ...]   (Hydra overrides, e.g. backbone=resnet50)
"""

from __future__ import annotations

import statistics
import tempfile

import torch
from common import paired, stage_main, timed, train_config

from hlss.config import build_model, build_objective
from hlss.train.module import hierarchy_ids


def _batch(shape: tuple[int, int, int, int], size: int, device: torch.device) -> dict:
    """A hierarchy batch ``[P, S, N, T, 3, size, size]`` with globally distinct ids."""
    P, S, N, T = shape
    gen = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(P, S, N, T, 3, size, size, generator=gen).to(device),
        "patient": torch.arange(P, device=device),
        "slide": torch.arange(P * S, device=device).view(P, S),
        "patch": torch.arange(P * S * N, device=device).view(P, S, N),
    }


def measure(
    quick: bool = False, overrides: list[str] | None = None, device: torch.device | None = None
) -> dict:
    """The ``train`` section: ``{"step_s", "backbone_only_step_s", "step_ratio",
    "overhead_fraction"}`` (seconds, and ratios of medians over paired runs)."""
    device = torch.device("cpu") if device is None else device
    cfg = train_config(tempfile.mkdtemp(prefix="hlss-bench-train-"), overrides)
    shape, size, pairs = ((2, 2, 2, 2), 64, 3) if quick else ((4, 2, 2, 2), 160, 5)
    model = build_model(cfg).to(device).train()
    objective = build_objective(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    batch = _batch(shape, size, device)
    flat = batch["image"].reshape(-1, 3, size, size)
    ids = hierarchy_ids(batch)
    text = getattr(model, "text_embeddings", None)

    def objective_of(features: torch.Tensor) -> torch.Tensor:
        """Everything after the backbone: projection, heads, the objective."""
        out = model.outputs(features)
        return objective(out["heads"], ids, text_embeddings=text, text_space=out.get("text_space"))[
            "loss"
        ]

    def full_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        objective_of(model.backbone(flat)).backward()
        optimizer.step()

    def backbone_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.backbone(flat).pow(2).mean().backward()
        optimizer.step()

    features = model.backbone(flat).detach()
    grad = torch.randn_like(features)

    def backbone_fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model.backbone(flat).backward(grad)

    def overhead() -> None:
        model.zero_grad(set_to_none=True)
        objective_of(features.clone().requires_grad_(True)).backward()

    full_step()  # warm-up (allocations, lazy initialisation)
    backbone_step()
    steps = paired(full_step, backbone_step, repeats=pairs, device=device)
    overhead()
    fwd_bwd = [timed(backbone_fwd_bwd, device) for _ in range(max(2, pairs // 2))]
    extra = [timed(overhead, device) for _ in range(5 * pairs)]
    return {
        "step_s": round(steps["a_s"], 4),
        "backbone_only_step_s": round(steps["b_s"], 4),
        "step_ratio": round(steps["ratio"], 4),
        "overhead_fraction": round(statistics.median(extra) / statistics.median(fwd_bwd), 5),
    }


def main() -> None:
    stage_main(__doc__, measure)


if __name__ == "__main__":
    main()
