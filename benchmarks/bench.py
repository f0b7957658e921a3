"""``make bench``: every stage against its own target; prints a table, writes ``latest.json``.

Stages (each a module ``benchmarks/bench_<stage>.py`` with ``measure(quick=False) -> dict``):
``data``, ``train``, ``extract``, ``knn``, ``eval_scale``, and on a CUDA machine ``gpu`` (the
paper's training setting in bf16 and channels-last, the loader at 16 workers, kNN at evaluation
scale on the GPU; ``null`` without CUDA). Each stage runs in its own child
process (a crash, a leak or a thread setting of one stage cannot touch the next); a stage whose
module or ``measure`` is missing, or that fails, is reported as ``not available (reason)`` and
written as ``null``. ``benchmarks/latest.json`` has the layout

    {"machine": {...}, "data": {...}, "train": {...}, "extract": {...}, "knn": {...},
     "eval_scale": {...}, "gpu": {...} or null}

Usage: python benchmarks/bench.py [--quick] [--stages knn,eval_scale] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("data", "train", "extract", "knn", "eval_scale", "gpu")
NEEDS_CUDA = ("gpu",)
DEFAULT_OUT = os.path.join(HERE, "latest.json")

# (stage, figure, comparison, target): the CPU targets. A figure may come from the
# section or from the stage's details (knn, eval_scale).
TARGETS = [
    ("data", "images_per_s", ">=", 600),
    ("data", "raw_read_files_per_s", None, None),
    ("train", "overhead_fraction", "<=", 0.02),
    ("train", "step_ratio", "<=", 1.05),
    ("extract", "ratio", ">=", 0.9),
    ("knn", "ratio", "<=", 1.3),
    ("knn", "seconds_over_reference", "<=", 0.5),
    ("knn", "agreement_with_fp32", ">=", 0.995),
    ("knn", "seconds", None, None),
    ("eval_scale", "peak_rss_mb", "<=", 4096),
    ("eval_scale", "seconds", None, None),
    ("eval_scale", "aggregate_100k_patches_s", "<", 1.0),
    ("gpu", "train_images_per_s", None, None),
    ("gpu", "backbone_only_images_per_s", None, None),
    ("gpu", "loader_images_per_s", None, None),
    ("gpu", "pipeline_images_per_s", None, None),
    ("gpu", "loader_keeps_up", None, None),
    ("gpu", "train_compiled_images_per_s", None, None),
    ("gpu", "pipeline_compiled_images_per_s", None, None),
    ("gpu", "knn_eval_scale_s", None, None),
]

_CHILD = """
import inspect, json, sys
sys.path.insert(0, {here!r})
try:
    import bench_{stage} as mod
except Exception as err:
    json.dump({{"unavailable": f"module bench_{stage} cannot be imported: {{err}}"}}, open({out!r}, "w"))
    raise SystemExit(0)
if not callable(getattr(mod, "measure", None)):
    json.dump({{"unavailable": "bench_{stage}.py has no measure()"}}, open({out!r}, "w"))
    raise SystemExit(0)
details = {{}}
kwargs = {{"quick": {quick}}}
if "extra" in inspect.signature(mod.measure).parameters:
    kwargs["extra"] = details
section = mod.measure(**kwargs)
json.dump({{"section": section, "details": details}}, open({out!r}, "w"))
"""


def run_stage(stage: str, quick: bool) -> tuple[dict | None, dict, str | None]:
    """``(section or None, details, reason it is not available or None)`` of one stage."""
    with tempfile.TemporaryDirectory(prefix=f"hlss-bench-{stage}-") as tmp:
        out = os.path.join(tmp, "result.json")
        code = _CHILD.format(here=HERE, stage=stage, out=out, quick=quick)
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not os.path.exists(out):
            lines = (proc.stderr or proc.stdout or "no output").strip().splitlines()
            return None, {}, f"failed (exit {proc.returncode}): {lines[-1] if lines else ''}"
        with open(out, encoding="utf-8") as handle:
            result = json.load(handle)
    if "unavailable" in result:
        return None, {}, result["unavailable"]
    return result["section"], result["details"], None


def met(value, comparison: str | None, target) -> str:
    """``yes``/``no`` for a figure against its target, ``-`` without a target or a value."""
    if comparison is None or value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    ok = {">=": value >= target, "<=": value <= target, "<": value < target}[comparison]
    return "yes" if ok else "no"


def table(results: dict, details: dict) -> str:
    """The printed table: stage, figure, value, target, met?"""
    rows = [("stage", "figure", "value", "target", "met?")]
    for stage, figure, comparison, target in TARGETS:
        if stage not in results:
            continue
        section = results[stage]
        if section is None:
            continue
        value = section.get(figure, details.get(stage, {}).get(figure))
        if value is None:
            continue
        goal = "" if comparison is None else f"{comparison} {target}"
        rows.append((stage, figure, str(value), goal, met(value, comparison, target)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the JSON goes")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")

    sys.path.insert(0, HERE)
    from common import machine_info

    report: dict = {"machine": machine_info()}
    details: dict = {}
    for stage in STAGES:
        if stage not in stages:
            report[stage] = None
            continue
        if stage in NEEDS_CUDA and not report["machine"]["cuda"]:
            print(f"stage {stage}: not available (no CUDA device)", flush=True)
            report[stage] = None
            continue
        start = time.perf_counter()
        section, extra, reason = run_stage(stage, args.quick)
        took = time.perf_counter() - start
        if reason is not None:
            print(f"stage {stage}: not available ({reason})", flush=True)
        else:
            print(f"stage {stage}: {json.dumps(section)} ({took:.0f} s)", flush=True)
            if extra:
                print(f"  details: {json.dumps(extra)}", flush=True)
        report[stage] = section
        details[stage] = extra
    print()
    if args.quick:
        print("quick sizes: a smoke test; the figures are not comparable with the targets")
    print(table(report, details))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
        handle.write("\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
