"""Learning curves of the objectives on the synthetic data, with the demo's budget.

For every curve (by default the README's: HiDisc, the paper's HLSS layout with each
objective, and ``model=hlss_shared``) and seed: ``hlss-train experiment=demo_cpu``
(checkpoints every ``--every`` steps), then ``hlss-eval`` of every checkpoint (kNN k=200, the protocol) and of the untrained
backbone. Prints one JSON document (per loss and step: mean, min and max over seeds of the
patch / slide / patient kNN accuracy, and the mean patient-level bootstrap interval) and writes
``curves.json``, ``curves.csv`` and ``learning_curves.png`` under ``--out``.

    python benchmarks/learning_curves.py --out outputs/curves            # 5 curves x 3 seeds
    python benchmarks/learning_curves.py --losses hidisc,attr3levels --seeds 0 --steps 100
    python benchmarks/learning_curves.py --losses hidisc \
        --variant hlss_orth "loss=attr3levels model.head_init=orthogonal"

``--variant LABEL OVERRIDES`` adds a curve named ``LABEL`` trained with the given
``hlss-train`` overrides (space-separated, one string), beside the plain ``--losses``.

Every step is the real console command, so a run can be repeated by hand (commands are printed
to stderr). Runs that already finished under ``--out`` are reused.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

LEVELS = ("patch", "slide", "patient")
# The curves of the README's Results table: label -> hlss-train overrides. The text-head rows
# name the paper's layout (model=hlss) so they mean the same whatever the default model is.
CURVES = {
    "hidisc": ["loss=hidisc"],
    "hvc3": ["loss=hvc3", "model=hlss"],
    "attr3levels": ["loss=attr3levels", "model=hlss"],
    "attr3levels_consistency": ["loss=attr3levels_consistency", "model=hlss"],
    "attr3levels+hlss_shared": ["loss=attr3levels", "model=hlss_shared"],
}


def _bin(name: str) -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


def _run(cmd: list[str], log: str) -> None:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    with open(log, "w", encoding="utf-8") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: step failed (exit {proc.returncode}), see {log}")


def _dataset(out: str, args) -> str:
    data = os.path.join(out, f"data-{args.patients_per_class}x2x8-{args.size}px-seed0")
    if not os.path.isfile(os.path.join(data, "meta", "opensrh.json")):
        cmd = [
            _bin("hlss-synth"),
            f"out={data}",
            "seed=0",
            f"size={args.size}",
            f"patients_per_class={args.patients_per_class}",
            "slides_per_patient=2",
            "patches_per_slide=8",
            *args.synth,
        ]
        _run(cmd, os.path.join(out, "synth.log"))
    return data


def _train_and_eval(
    out: str, data: str, label: str, overrides: list[str], seed: int, args, first: bool
) -> str:
    """The ``metrics.csv`` of one (curve, seed): every checkpoint's kNN accuracy."""
    name = f"{label}-seed{seed}"
    evaluation = os.path.join(out, "eval", name)
    table = os.path.join(evaluation, "metrics.csv")
    if os.path.isfile(table):
        return table
    root = os.path.join(out, "runs", name)
    found = glob.glob(os.path.join(root, "**", "summary.json"), recursive=True)
    if not found:
        _run(
            [
                _bin("hlss-train"),
                "experiment=demo_cpu",
                "dataset=opensrh",
                f"dataset.root={data}",
                *overrides,
                f"seed={seed}",
                f"trainer.max_steps={args.steps}",
                f"checkpoint.every_n_steps={args.every}",
                "logger=none",
                f"paths.root={root}",
                *args.train,
            ],
            os.path.join(out, f"train-{name}.log"),
        )
        found = glob.glob(os.path.join(root, "**", "summary.json"), recursive=True)
    with open(found[0], encoding="utf-8") as handle:
        run_dir = json.load(handle)["output_dir"]
    _run(
        [
            _bin("hlss-eval"),
            f"ckpt={run_dir}",
            f"out={evaluation}",
            "probe.enabled=false",
            "zero_shot.enabled=false",
            "explain.enabled=false",
            "mlflow.enabled=false",
        ],
        os.path.join(out, f"eval-{name}.log"),
    )
    if first:  # the untrained backbone of this seed, once
        _run(
            [
                _bin("hlss-eval"),
                f"ckpt={run_dir}",
                f"out={os.path.join(out, 'eval', f'untrained-seed{seed}')}",
                "untrained=true",
                "probe.enabled=false",
                "zero_shot.enabled=false",
                "explain.enabled=false",
                "mlflow.enabled=false",
            ],
            os.path.join(out, f"eval-untrained-seed{seed}.log"),
        )
    return table


def summarise(frames: dict) -> dict:
    """``{model: {step: {level: {mean, min, max}, patient_ci: [lo, hi]}}}`` over seeds."""
    import pandas as pd

    summary: dict = {}
    for model, seed_frames in frames.items():
        data = pd.concat(seed_frames, ignore_index=True)
        per_step = {}
        for step, rows in data.groupby("step", sort=True):
            entry = {
                lv: {
                    "mean": float(rows[f"{lv}_acc"].mean()),
                    "min": float(rows[f"{lv}_acc"].min()),
                    "max": float(rows[f"{lv}_acc"].max()),
                }
                for lv in LEVELS
            }
            entry["patient_ci"] = [
                float(rows["patient_acc_ci_lo"].mean()),
                float(rows["patient_acc_ci_hi"].mean()),
            ]
            entry["seeds"] = len(rows)
            per_step[int(step)] = entry
        summary[model] = per_step
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/learning-curves")
    parser.add_argument(
        "--losses",
        default="",
        help="comma-separated losses, each with the default model (default: the README's curves)",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--patients-per-class", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train", nargs="*", default=[], help="extra hlss-train overrides")
    parser.add_argument("--synth", nargs="*", default=[], help="extra hlss-synth overrides")
    parser.add_argument(
        "--variant",
        nargs=2,
        action="append",
        default=[],
        metavar=("LABEL", "OVERRIDES"),
        help="an extra curve: its label and its hlss-train overrides in one string",
    )
    args = parser.parse_args(argv)
    args.losses = [s for s in args.losses.split(",") if s]
    curves = [(loss, [f"loss={loss}"]) for loss in args.losses]
    curves += [(label, overrides.split()) for label, overrides in args.variant]
    if not curves:
        curves = list(CURVES.items())
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    data = _dataset(out, args)

    import pandas as pd

    frames: dict = {"untrained": []}
    for i, (label, overrides) in enumerate(curves):
        frames[label] = []
        for seed in seeds:
            table = _train_and_eval(out, data, label, overrides, seed, args, first=i == 0)
            frames[label].append(pd.read_csv(table))
    for seed in seeds:
        table = os.path.join(out, "eval", f"untrained-seed{seed}", "metrics.csv")
        frames["untrained"].append(pd.read_csv(table))
    summary = summarise(frames)
    with open(os.path.join(out, "curves.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    rows = [
        {"model": m, "step": s, **{f"{lv}_{k}": v[lv][k] for lv in LEVELS for k in v[lv]}}
        for m, per_step in summary.items()
        for s, v in per_step.items()
    ]
    pd.DataFrame(rows).to_csv(os.path.join(out, "curves.csv"), index=False)
    from hlss.eval.plots import plot_learning_curves

    title = f"{len(seeds)} seed(s); band: min-max over seeds; dashed: untrained backbone"
    plot_learning_curves(summary, os.path.join(out, "learning_curves.png"), title=title)
    result = {
        "steps": args.steps,
        "every": args.every,
        "seeds": seeds,
        "curves": {label: overrides for label, overrides in curves},
        "wall_s": round(time.perf_counter() - start, 1),
        "final": {m: per_step[max(per_step)] for m, per_step in summary.items()},
        "out": out,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
