"""The training logger's cost on the training process: milliseconds a step for the default
MLflow logger (``logger=mlflow``, a local sqlite store) writing every step
(``flush_every_n_steps=1``, what Lightning's ``MLFlowLogger`` does) and in batches of steps (the
default, 10). A step is logged as Lightning logs it: two calls, the losses (6 metrics) and the
learning rate. Prints one JSON object.

Usage: python benchmarks/bench_logger.py [--steps 400] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

LOSSES = ("loss", "hvc_patch", "hvc_slide", "hvc_patient", "hvc", "align")


def ms_per_step(uri: str, flush_every_n_steps: int, steps: int) -> float:
    """Milliseconds a step of ``steps`` logged steps, the final write included."""
    from hlss.train.mlflow_logger import BufferedMLFlowLogger

    logger = BufferedMLFlowLogger(
        experiment_name="bench", tracking_uri=uri, flush_every_n_steps=flush_every_n_steps
    )
    logger.log_metrics({"warm_up": 0.0}, step=0)  # creates the run (not timed)
    logger.flush()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        logger.log_metrics({f"train/{k}": 1.0 / step for k in LOSSES}, step=step)
        logger.log_metrics({"lr-AdamW": 1e-3}, step=step)
    logger.finalize("success")
    return 1e3 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hlss-bench-logger-") as tmp:
        uri = f"sqlite:///{tmp}/mlruns.db"
        times: dict[int, list[float]] = {1: [], 10: []}
        for _ in range(args.rounds):
            for n in times:
                times[n].append(ms_per_step(uri, n, args.steps))
    print(
        json.dumps(
            {
                "steps": args.steps,
                "every_step_ms_per_step": round(statistics.median(times[1]), 2),
                "batched_10_ms_per_step": round(statistics.median(times[10]), 2),
                "runs_ms_per_step": {str(n): [round(t, 2) for t in v] for n, v in times.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
