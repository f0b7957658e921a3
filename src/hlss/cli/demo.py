"""`hlss-demo`: the whole pipeline on synthetic data, on the CPU, in a few minutes.

Generates (or reuses) a synthetic OpenSRH-layout dataset, validates it, trains the HiDisc baseline
and HLSS with the CPU experiment, evaluates both and the untrained backbone with the kNN protocol,
and prints a table. Each step is the real console command, printed before it runs. The keys,
their defaults and comments are in ``conf/demo.yaml`` (``hlss-demo --help``)::

    hlss-demo [out=demo] [steps=300] [patients=8] [patients_per_class=8] [size=64]
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import shlex
import subprocess
import sys
import time

import hydra
from omegaconf import DictConfig

from hlss.cli.common import command_argv, report_errors, run_hydra_command
from hlss.config import check_config
from hlss.data.opensrh import META_FILE
from hlss.errors import HLSSError
from hlss.levels import LEVELS
from hlss.schemas.tools import DemoConfig, to_typed

PROG = "hlss-demo"


def _bin(name: str) -> str:
    """The console script next to this Python (the same environment), else from PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


def run(cmd: list[str]) -> None:
    """Print ``cmd`` and run it; its output goes to this process's stdout and stderr.

    ``HYDRA_FULL_ERROR``, which this Hydra app sets for itself, is not passed on, so a step
    reports a bad input in one line (rerun the printed command with it to see a traceback).

    Raises:
        HLSSError: the command exited with a non-zero status.
    """
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(cmd, check=False, env=env)
    if proc.returncode != 0:
        raise HLSSError(f"step failed (exit {proc.returncode}): {' '.join(cmd[:2])} ...")


def trained_run(root: str) -> str:
    """The output folder of the one finished training run under ``root``.

    Raises:
        HLSSError: ``root`` holds no finished run (no ``summary.json``) or more than one.
    """
    found = glob.glob(os.path.join(root, "**", "summary.json"), recursive=True)
    if len(found) != 1:
        raise HLSSError(f"{root}: expected one finished training run, found {len(found)}")
    with open(found[0], encoding="utf-8") as handle:
        return json.load(handle)["output_dir"]


def format_rows(results: dict[str, dict]) -> str:
    """A text table: one row per model, accuracy and MCA per level (``results[model][level]``)
    and the bootstrap 95% interval of the patient-level accuracy (resampling patients)."""
    head = (
        f"{'model':<22}"
        + "".join(f"{lv + ' acc':>13}{lv + ' mca':>13}" for lv in LEVELS)
        + f"{'patient acc 95% CI':>21}"
    )
    lines = [head, "-" * len(head)]
    for name, metrics in results.items():
        cells = "".join(f"{metrics[lv]['acc']:>13.3f}{metrics[lv]['mca']:>13.3f}" for lv in LEVELS)
        lo, hi = metrics["patient"].get("acc_ci95", [float("nan"), float("nan")])
        lines.append(f"{name:<22}{cells}{f'[{lo:.3f}, {hi:.3f}]':>21}")
    return "\n".join(lines)


def learning_curves(folders: dict[str, str]) -> dict[str, dict[int, dict]]:
    """``{model: {step: {level: {"mean": acc}}}}`` from each evaluation's ``metrics.csv``."""
    import pandas as pd

    curves: dict[str, dict[int, dict]] = {}
    for label, folder in folders.items():
        table = pd.read_csv(os.path.join(folder, "metrics.csv"))
        name = "untrained" if label.startswith("untrained") else label.split()[0]
        curves[name] = {
            int(row["step"]): {lv: {"mean": float(row[f"{lv}_acc"])} for lv in LEVELS}
            for _, row in table.iterrows()
        }
    return curves


def demo(args: DemoConfig) -> None:
    """Run the pipeline for ``args`` under ``args.out`` and print the comparison.

    Raises:
        HLSSError: a step failed (its own output says why) or left no finished training run.
    """
    start = time.perf_counter()
    out = os.path.abspath(args.out)
    sizes = f"{args.patients_per_class}x{args.slides_per_patient}x{args.patches_per_slide}"
    data = os.path.join(out, f"data-{sizes}-{args.size}px-seed{args.seed}")
    session = os.path.join(out, _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S"))
    os.makedirs(session, exist_ok=False)
    if not os.path.isfile(os.path.join(data, META_FILE)):
        run(
            [
                _bin("hlss-synth"),
                f"out={data}",
                f"seed={args.seed}",
                f"size={args.size}",
                f"patients_per_class={args.patients_per_class}",
                f"slides_per_patient={args.slides_per_patient}",
                f"patches_per_slide={args.patches_per_slide}",
            ]
        )
    run([_bin("hlss-validate"), f"root={data}", "max_examples=2"])

    common = [
        "experiment=demo_cpu",
        "dataset=opensrh",
        f"dataset.root={data}",
        f"trainer.max_steps={args.steps}",
        f"loader.patients={args.patients}",
        f"seed={args.seed}",
        f"logger.tracking_uri=sqlite:///{out}/mlruns.db",
    ]
    runs = {}
    for name, loss in (("hidisc", "hidisc"), ("hlss", "attr3levels")):
        run([_bin("hlss-train"), *common, f"loss={loss}", f"paths.root={session}/{name}"])
        runs[name] = trained_run(os.path.join(session, name))

    evals = {
        "untrained (ResNet-18)": (
            runs["hlss"],
            ["untrained=true", "zero_shot.enabled=false", "explain.enabled=false"],
        ),
        "HiDisc (trained)": (runs["hidisc"], []),
        "HLSS (trained)": (runs["hlss"], []),
    }
    results, folders = {}, {}
    for label, (run_dir, extra) in evals.items():
        folder = os.path.join(session, "eval", label.split()[0].lower())
        run([_bin("hlss-eval"), f"ckpt={run_dir}", f"out={folder}", "probe.enabled=false", *extra])
        with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as handle:
            results[label] = json.load(handle)
        folders[label] = folder

    print("\n" + "=" * 100)
    print(
        f"kNN evaluation on the synthetic val split (k=200, T=0.07), "
        f"{args.steps} training steps each\n"
    )
    print(format_rows(results))
    from hlss.eval.plots import plot_learning_curves

    curves_png = plot_learning_curves(
        learning_curves(folders),
        os.path.join(session, "learning_curves.png"),
        title=f"kNN accuracy on the synthetic val split; dashed: untrained (seed {args.seed})",
    )
    print(f"\nlearning curves: {curves_png}")
    hlss_eval = folders["HLSS (trained)"]
    attributes = os.path.join(hlss_eval, "attributes.csv")
    if os.path.isfile(attributes):
        import pandas as pd

        from hlss.eval.explain import format_examples

        print(
            "\nWhat HLSS's language-aligned space says about a few val patches, slides and patients:"
        )
        print(format_examples(pd.read_csv(attributes, keep_default_na=False), n_per_level=2))
    print("\nplots:")
    for label, folder in folders.items():
        for png in sorted(glob.glob(os.path.join(folder, "*.png"))):
            print(f"  {label:<22} {png}")
    print(f"\nruns and evaluations: {session}")
    print(f"mlflow ui --backend-store-uri sqlite:///{out}/mlruns.db")
    print(f"demo wall time: {time.perf_counter() - start:.0f} s")


@hydra.main(config_path="pkg://hlss.conf", config_name="demo", version_base="1.3")
def _demo(cfg: DictConfig) -> None:
    report_errors(check_config, cfg, DemoConfig)
    report_errors(demo, report_errors(to_typed, cfg))


def main(argv: list[str] | None = None) -> int:
    """Run ``hlss-demo`` with ``argv`` (default: the process's arguments); returns 0.

    Raises:
        SystemExit: status 2 with one ``error:`` line for bad input or a failed step.
    """
    with command_argv(PROG, argv):
        run_hydra_command(_demo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
