"""`hlss-eval`: kNN evaluation of a checkpoint (or of every checkpoint of a run).

hlss-eval ckpt=outputs/<date>/<time>            # every checkpoint in step order
hlss-eval ckpt=.../checkpoints/last.ckpt out=my-eval knn.k=50
hlss-eval ckpt=... untrained=true               # the same architecture at initialisation
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from hlss.cli.common import quiet_libraries, report_errors, run_hydra_command
from hlss.config import check_config, register_resolvers
from hlss.levels import LEVELS
from hlss.schemas.eval import EvalConfig


def format_table(summary: dict) -> str:
    """A small text table of accuracy / MCA per level."""
    lines = [f"{'level':<8} {'acc':>6} {'top2':>6} {'top3':>6} {'mca':>6} {'map':>6}"]
    for level in LEVELS:
        m = summary["metrics"][level]
        lines.append(
            f"{level:<8} " + " ".join(f"{m[k]:6.3f}" for k in ("acc", "top2", "top3", "mca", "map"))
        )
    lo, hi = summary["metrics"]["patient"]["acc_ci95"]
    lines.append(f"patient accuracy 95% CI (bootstrap over patients): [{lo:.3f}, {hi:.3f}]")
    return "\n".join(lines)


def format_explain_quality(quality: dict) -> str:
    """One line per figure on how far the attribute explanations go: how much the top attribute
    says about the class (``class_information``, adjusted mutual information; 0 = chance) and
    the share of entities whose explanation earns trust ``medium`` or ``high``. Empty without
    explanations."""
    levels = [lv for lv in LEVELS if lv in quality]
    if not levels:
        return ""
    lines = []
    if any("class_information" in quality[lv] for lv in levels):
        info = ", ".join(
            f"{lv} {quality[lv]['class_information']:.2f}"
            for lv in levels
            if "class_information" in quality[lv]
        )
        lines.append(f"explanations vs class (AMI, 0 = chance; compare untrained=true): {info}")
    trusted = ", ".join(
        f"{lv} {quality[lv].get('trust_high', 0.0) + quality[lv].get('trust_medium', 0.0):.0%}"
        for lv in levels
    )
    lines.append(f"explanations trusted (medium or high, beyond chance): {trusted}")
    return "\n".join(lines)


@hydra.main(config_path="pkg://hlss.conf", config_name="eval", version_base="1.3")
def _eval(cfg: DictConfig) -> None:
    from hlss.eval.pipeline import evaluate

    report_errors(check_config, cfg, EvalConfig)
    summary = report_errors(evaluate, cfg)
    print(format_table(summary))
    if summary.get("attribute_examples"):
        print("top attributes:\n" + summary["attribute_examples"])
    if summary.get("explain_quality"):
        print(format_explain_quality(summary["explain_quality"]))
    print(f"outputs: {summary['out']}")
    if "mlflow" in summary:
        print(f"mlflow ui --backend-store-uri {summary['mlflow']['tracking_uri']}")


def main() -> None:
    quiet_libraries()
    register_resolvers()
    run_hydra_command(_eval)


if __name__ == "__main__":
    main()
