"""``hlss-export``: the trained backbone of a checkpoint as weights that timm / open_clip load
without hlss, with a model card.

The keys, their defaults and comments are in ``conf/export.yaml`` (``hlss-export --help``)::

    hlss-export ckpt=outputs/2026-01-01/12-00-00-000000 out=export/hlss-rn18
"""

from __future__ import annotations

import dataclasses

import hydra
from omegaconf import DictConfig

from hlss.cli.common import command_argv, report_errors, run_hydra_command
from hlss.config import check_config
from hlss.levels import LEVELS
from hlss.schemas.export import ExportConfig
from hlss.schemas.tools import to_typed

PROG = "hlss-export"


def summary_lines(result: dict) -> list[str]:
    """What the export wrote (one line) and the kNN accuracies its card reports (one line)."""
    weights = result["weights"]
    lines = [
        f"wrote {result['out']}: {result['architecture']} ({result['library']}, "
        f"{result['feature_dim']} features, {weights['dtype']}) from step "
        f"{result['training']['step']} of {result['training']['checkpoint']}"
    ]
    evaluation = result.get("evaluation")
    if evaluation:
        acc = " ".join(f"{lv} {evaluation['knn'][lv]['acc']:.3f}" for lv in LEVELS)
        lines.append(f"kNN accuracy {acc} (from {evaluation['file']})")
    else:
        lines.append("no evaluation of this checkpoint found: the model card has no accuracies")
    return lines


@hydra.main(config_path="pkg://hlss.conf", config_name="export", version_base="1.3")
def _export(cfg: DictConfig) -> None:
    """Export as ``cfg`` (an :class:`ExportConfig`) says and print two summary lines.

    Raises:
        SystemExit(2): one error line for an unknown key, a missing ``ckpt``/``out``, an unknown
            ``dtype``, an existing non-empty ``out``, or a missing / unreadable checkpoint.
    """
    from hlss.export import check_request, export_model

    report_errors(check_config, cfg, ExportConfig)
    args: ExportConfig = report_errors(to_typed, cfg)
    report_errors(check_request, args.out, args.dtype)  # before the checkpoint is read
    result = report_errors(export_model, **dataclasses.asdict(args))
    print("\n".join(summary_lines(result)))


def main(argv: list[str] | None = None) -> int:
    """Run ``hlss-export`` with ``argv`` (default: the process's arguments); returns 0.

    Raises:
        SystemExit: status 2 with one ``error:`` line for bad input; status 0 after ``--help``.
    """
    with command_argv(PROG, argv):
        run_hydra_command(_export)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
