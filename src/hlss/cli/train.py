"""`hlss-train`: compose the configs and train.

The configs live inside the package (``hlss/conf``), so the command works from any directory:
``hlss-train --cfg job dataset=opensrh dataset.root=/x`` prints the composed job config;
``hlss-train -m loss.temperature=0.05,0.1`` sweeps; ``hlss-train --help`` lists the groups.
"""

from __future__ import annotations

import json
import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hlss.cli.common import quiet_libraries, report_errors, run_hydra_command
from hlss.config import check_config, check_schema, register_resolvers
from hlss.schemas.train import TrainConfig
from hlss.train.preflight import preflight


def single_log_lines() -> None:
    """Lightning adds its own console handler; under Hydra's logging every line would then print
    twice. Keep Hydra's handlers (console and the run's log file) only."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if type(h) is not logging.StreamHandler]


@hydra.main(config_path="pkg://hlss.conf", config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> float | None:
    # Checks in the order their answers come: the keys (instant); the dataset, the batch and the
    # resume checkpoint (seconds); then every _target_ against its signature, which imports
    # Lightning, timm, open_clip and MLflow (10 s and more). No MLflow run exists before they pass.
    report_errors(check_schema, cfg, TrainConfig)
    report_errors(preflight, cfg)
    report_errors(check_config, cfg, TrainConfig)
    from hlss.train.fit import run_training

    single_log_lines()
    summary = report_errors(run_training, cfg, HydraConfig.get().runtime.output_dir)
    print(json.dumps(summary, indent=1))
    return summary["metrics"].get("train/loss")


def main() -> None:
    quiet_libraries()
    register_resolvers()
    run_hydra_command(_train)


if __name__ == "__main__":
    main()
