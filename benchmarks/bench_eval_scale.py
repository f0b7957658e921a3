"""Evaluation-scale benchmark (the ``eval_scale`` section of ``make bench``); prints one JSON object.

The OpenSRH-sized kNN of the evaluation: 232,000 train (reference) patches x 58,000 val
(query) patches at dim 2048, random L2-normalised embeddings stored in float16, 7 classes,
``knn.backend=auto``, k=200; then slide and patient aggregation of the patch scores
(:mod:`hlss.eval.aggregate`: softmax-sum per slide and per patient, their labels).

:func:`measure` runs all of it in a fresh child process, so that ``peak_rss_mb`` (``ru_maxrss``)
is that process's own peak resident memory: embeddings, index, search buffers, everything.
``seconds`` covers index build + kNN scores + aggregation (not the generation of the random
embeddings). The details also time the aggregation of 100,000 patches alone.

Usage: python benchmarks/bench_eval_scale.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import peak_rss_mb, random_embeddings

K, TEMPERATURE, CLASSES = 200, 0.07, 7
FULL = {"n_ref": 232_000, "n_query": 58_000, "dim": 2048}
QUICK = {"n_ref": 8_000, "n_query": 2_000, "dim": 64}
PATCHES_PER_SLIDE, SLIDES_PER_PATIENT = 100, 2


def patch_groups(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slide ids, patient ids and patient classes of ``n`` patches (100 patches per slide, two
    slides per patient, like an OpenSRH val split)."""
    slide = np.arange(n) // PATCHES_PER_SLIDE
    patient = slide // SLIDES_PER_PATIENT
    patient_class = rng.integers(0, CLASSES, patient.max() + 1)
    slides = np.char.add("S", slide.astype(str)).astype(object)
    patients = np.char.add("P", patient.astype(str)).astype(object)
    return slides, patients, patient_class[patient]


def aggregate(scores: np.ndarray, slides: np.ndarray, patients: np.ndarray, labels) -> None:
    """Slide and patient scores and labels, as the protocol computes them."""
    from hlss.eval.aggregate import aggregate_scores, group_labels

    for groups in (slides, patients):
        aggregate_scores(scores, groups, how="softmax_sum", normalize=True)
        group_labels(labels, groups)


def child(quick: bool) -> dict:
    """The whole measurement, in this process (run by :func:`measure` in a fresh one)."""
    import hlss.eval.aggregate  # noqa: F401  (imported before the clock starts)
    from hlss.eval.knn import KNNIndex

    sizes = QUICK if quick else FULL
    rng = np.random.default_rng(0)
    bank = random_embeddings(sizes["n_ref"], sizes["dim"], rng)
    bank_labels = rng.integers(0, CLASSES, sizes["n_ref"])
    queries = random_embeddings(sizes["n_query"], sizes["dim"], rng)
    slides, patients, labels = patch_groups(sizes["n_query"], rng)

    start = time.perf_counter()
    index = KNNIndex(bank, bank_labels, CLASSES, backend="auto")
    del bank  # the index holds its own copy; the float16 input is not needed any more
    built = time.perf_counter()
    scores = index.scores(queries, k=K, temperature=TEMPERATURE)
    searched = time.perf_counter()
    aggregate(scores, slides, patients, labels)
    done = time.perf_counter()

    m = 100_000  # the aggregation alone, at 100k patches
    big_scores = rng.random((m, CLASSES)).astype(np.float32)
    big_slides, big_patients, big_labels = patch_groups(m, rng)
    agg_start = time.perf_counter()
    aggregate(big_scores, big_slides, big_patients, big_labels)
    agg_100k = time.perf_counter() - agg_start
    return {
        "section": {**sizes, "seconds": round(done - start, 2), "peak_rss_mb": peak_rss_mb()},
        "details": {
            "backend": index.backend,
            "build_s": round(built - start, 2),
            "knn_s": round(searched - built, 2),
            "aggregate_s": round(done - searched, 3),
            "aggregate_100k_patches_s": round(agg_100k, 3),
        },
    }


def measure(quick: bool = False, extra: dict | None = None) -> dict:
    """The ``eval_scale`` section: ``{"n_ref", "n_query", "dim", "seconds", "peak_rss_mb"}``,
    measured in a fresh child process; ``extra``, when given, receives the details.

    Raises:
        RuntimeError: the child process failed (its stderr tail is in the message).
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"eval_scale child failed ({proc.returncode}): {proc.stderr[-800:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if extra is not None:
        extra.update(result["details"])
    return result["section"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.quick)))
        return
    details: dict = {}
    section = measure(args.quick, details)
    print(json.dumps({"eval_scale": section, "details": details}, indent=1))


if __name__ == "__main__":
    main()
