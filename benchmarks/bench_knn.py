"""kNN evaluation benchmark; prints one JSON object.

Times the protocol kNN (:class:`hlss.eval.knn.KNNIndex`: index build, then weighted-vote scores
of every query) on random L2-normalised float16 embeddings with 7 classes, for each embedding
dimension and each available backend: ``faiss`` (exact CPU) and ``torch`` on CPU always, plus
``faiss_gpu`` and ``torch`` on CUDA where present. Also reports the largest score difference of
each backend against the first one (they must agree up to float rounding).

Usage: python benchmarks/bench_knn.py [--bank 100000] [--queries 10000] [--dims 128 2048]
                                      [--k 200] [--backends faiss torch ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from hlss.eval.knn import KNNIndex, faiss_gpu_available


def random_embeddings(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``[rows, dim]`` L2-normalised float16, generated in chunks to bound memory."""
    out = np.empty((rows, dim), np.float16)
    for start in range(0, rows, 16384):
        x = rng.standard_normal((min(16384, rows - start), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + len(x)] = x
    return out


def plan(requested: list[str] | None) -> list[tuple[str, str, str | None]]:
    """(label, backend, device) triples to time."""
    runs: list[tuple[str, str, str | None]] = [
        ("faiss", "faiss", None),
        ("torch_cpu", "torch", "cpu"),
    ]
    if faiss_gpu_available():
        runs.append(("faiss_gpu", "faiss_gpu", None))
    if torch.cuda.is_available():
        runs.append(("torch_cuda", "torch", "cuda"))
    if requested:
        runs = [r for r in runs if r[0] in requested or r[1] in requested]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="subset of faiss, torch_cpu, faiss_gpu, torch_cuda (default: all available)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    try:
        import faiss

        faiss_threads = int(faiss.omp_get_max_threads())
    except ImportError:  # pragma: no cover
        faiss_threads = None
    report: dict = {
        "benchmark": "knn",
        "bank": args.bank,
        "queries": args.queries,
        "k": args.k,
        "classes": args.classes,
        "dtype": "float16",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss_threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "machine": platform.machine(),
        "results": [],
    }
    rng = np.random.default_rng(args.seed)
    for dim in args.dims:
        bank = random_embeddings(args.bank, dim, rng)
        queries = random_embeddings(args.queries, dim, rng)
        labels = rng.integers(0, args.classes, args.bank)
        reference = None
        for label, backend, device in plan(args.backends):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            index = KNNIndex(bank, labels, args.classes, backend=backend, device=device)
            t1 = time.perf_counter()
            scores = index.scores(queries, k=args.k, batch_size=args.batch_size)
            t2 = time.perf_counter()
            if reference is None:
                reference = scores
            row = {
                "dim": dim,
                "backend": label,
                "build_s": round(t1 - t0, 3),
                "search_s": round(t2 - t1, 3),
                "total_s": round(t2 - t0, 3),
                "queries_per_s": round(args.queries / (t2 - t1), 1),
                "max_abs_diff_vs_first": float(np.abs(scores - reference).max()),
            }
            report["results"].append(row)
            del index, scores
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
