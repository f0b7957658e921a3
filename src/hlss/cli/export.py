"""``hlss-export``: the trained backbone of a checkpoint as weights that timm / open_clip load
without hlss, with a model card.

The keys, their defaults and comments are in ``conf/export.yaml`` (``hlss-export --help``)::

    hlss-export ckpt=outputs/2026-01-01/12-00-00-000000 out=export/hlss-rn18
"""

from __future__ import annotations

import dataclasses

from hlss.cli.common import run_config_command
from hlss.levels import LEVELS
from hlss.schemas.export import ExportConfig

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


def export(args: ExportConfig) -> None:
    """Export as ``args`` says and print two summary lines.

    Raises:
        HLSSError: an unknown ``dtype``, an existing non-empty ``out``, or a missing /
            unreadable checkpoint.
    """
    from hlss.export import check_request, export_model

    check_request(args.out, args.dtype)  # before the checkpoint is read
    result = export_model(**dataclasses.asdict(args))
    print("\n".join(summary_lines(result)))


def main(argv: list[str] | None = None) -> int:
    """Run ``hlss-export`` with ``argv`` (default: the process's arguments); returns 0.

    Raises:
        SystemExit: status 2 with one ``error:`` line for bad input; status 0 after ``--help``.
    """
    return run_config_command(PROG, "export", ExportConfig, export, argv)


if __name__ == "__main__":
    raise SystemExit(main())
