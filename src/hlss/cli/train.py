"""`hlss-train`: compose the configs and train.

The configs live inside the package (``hlss/conf``), so the command works from any directory:
``hlss-train --cfg job dataset=opensrh dataset.root=/x`` prints the composed job config;
``hlss-train -m loss.temperature=0.05,0.1`` sweeps.
"""

from __future__ import annotations

import json
import logging
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hlss.cli.common import quiet_libraries, report_errors


def single_log_lines() -> None:
    """Lightning adds its own console handler; under Hydra's logging every line would then print
    twice. Keep Hydra's handlers (console and the run's log file) only."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if type(h) is not logging.StreamHandler]


@hydra.main(config_path="pkg://hlss.conf", config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> float | None:
    from hlss.train.run import run_training

    single_log_lines()

    summary = report_errors(run_training, cfg, HydraConfig.get().runtime.output_dir)
    print(json.dumps(summary, indent=1))
    return summary["metrics"].get("train/loss")


def auto_precision() -> str:
    """``bf16-mixed`` where a CUDA GPU with bfloat16 support is present, else ``32-true``."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_resolvers() -> None:
    """``${abspath:rel}``: a path made absolute against the directory the command runs in;
    ``${auto_precision:}``: the trainer precision for this machine (:func:`auto_precision`)."""
    OmegaConf.register_new_resolver(
        "abspath", lambda p: os.path.abspath(os.path.expanduser(str(p))), replace=True
    )
    OmegaConf.register_new_resolver("auto_precision", auto_precision, replace=True)


def main() -> None:
    quiet_libraries()
    register_resolvers()
    _train()


if __name__ == "__main__":
    main()
