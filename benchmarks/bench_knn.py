"""kNN benchmark (the ``knn`` section of ``make bench``); prints one JSON object.

:func:`measure` times the protocol kNN (:class:`hlss.eval.knn.KNNIndex` with ``backend=auto``:
weighted-vote scores of every query, k=200, the index built beforehand) for 100,000 references x 10,000
queries at dim 2048 (float16 embeddings with a class/slide structure, 7 classes), and compares it
with

* ``matmul_bound_seconds``: the bare similarity product of the same sizes at the same precision
  (the compute floor): the faster of the product on the scan's own tiles and threads
  (:meth:`hlss.eval.knn_scan.BankScan.product_only`) and one plain ``torch`` product per 1,024
  queries; ``ratio`` = kNN seconds / that (median over paired runs);
* the reference algorithm of the published evaluators (float32 torch, chunks of 1,024 queries,
  full similarity rows, ``topk(200)``), timed once on the first 3,072 queries and scaled to all
  (it is linear in the queries): ``reference_seconds`` in the details; and the agreement of the
  kNN predictions with its float32 exact ones on those queries.

On a CUDA machine the details also hold FAISS GPU kNN at the OpenSRH evaluation scale (232,000 x
58,000 x 2048), when faiss has GPU support.

Usage: python benchmarks/bench_knn.py [--quick] [--backend auto|torch|torch_bf16|faiss|...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import clustered_embeddings, paired, random_embeddings, sync, timed

from hlss.eval.knn import KNNIndex, faiss_gpu_available, weighted_vote
from hlss.eval.knn_scan import BankScan

K, TEMPERATURE, CLASSES = 200, 0.07, 7
FULL = {"n_ref": 100_000, "n_query": 10_000, "dim": 2048}
QUICK = {"n_ref": 6_000, "n_query": 600, "dim": 64}
EVAL_SCALE = {"n_ref": 232_000, "n_query": 58_000, "dim": 2048}
REFERENCE_QUERIES = 3072
"""The reference algorithm runs on the first 3,072 queries (3 chunks); its time is scaled to all
queries, and the agreement is measured on these."""


def reference_topk(
    bank: np.ndarray, queries: np.ndarray, device: torch.device
) -> tuple[np.ndarray, np.ndarray, float]:
    """The published evaluators' algorithm: float32, 1,024 queries at a time, full rows, top-k.
    Returns ``(sims [m, k], idx [m, k], seconds)``."""
    b = torch.from_numpy(bank).to(device, torch.float32)
    b = b / b.norm(dim=1, keepdim=True)
    q = torch.from_numpy(queries).to(device, torch.float32)
    q = q / q.norm(dim=1, keepdim=True)
    sims, idx = [], []

    def run() -> None:
        for start in range(0, len(q), 1024):
            top = (q[start : start + 1024] @ b.T).topk(K, dim=1)
            sims.append(top.values.cpu())
            idx.append(top.indices.cpu())

    seconds = timed(run, device)
    return torch.cat(sims).numpy(), torch.cat(idx).numpy(), seconds


def plain_product(bank: np.ndarray, queries: np.ndarray, dtype: torch.dtype, device) -> float:
    """Seconds of the bare product, 1,024 queries at a time against the whole bank."""
    b = torch.from_numpy(bank).to(device, dtype)
    q = torch.from_numpy(queries).to(device, dtype)

    def run() -> None:
        for start in range(0, len(q), 1024):
            q[start : start + 1024] @ b.T

    run() if len(q) <= 1024 else (q[:1024] @ b.T)  # warm-up
    return timed(run, device)


def faiss_gpu_eval_scale(quick: bool) -> dict | None:
    """FAISS GPU exact kNN (search only) at the evaluation scale; ``None`` without faiss-gpu."""
    if not faiss_gpu_available():
        return None
    sizes = QUICK if quick else EVAL_SCALE
    rng = np.random.default_rng(1)
    bank = random_embeddings(sizes["n_ref"], sizes["dim"], rng)
    queries = random_embeddings(sizes["n_query"], sizes["dim"], rng)
    labels = rng.integers(0, CLASSES, sizes["n_ref"])
    start = time.perf_counter()
    index = KNNIndex(bank, labels, CLASSES, backend="faiss_gpu")
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    index.scores(queries, k=K, temperature=TEMPERATURE)
    return {**sizes, "build_s": round(build_s, 2), "seconds": round(time.perf_counter() - start, 2)}


def measure(quick: bool = False, extra: dict | None = None, backend: str = "auto") -> dict:
    """The ``knn`` section: ``{"n_ref", "n_query", "dim", "seconds", "matmul_bound_seconds",
    "ratio", "backend"}``. ``extra``, when given, receives the details (reference algorithm,
    agreement, the two product timings, FAISS GPU at evaluation scale)."""
    sizes = QUICK if quick else FULL
    rng = np.random.default_rng(0)
    bank, labels, queries = clustered_embeddings(
        sizes["n_ref"], sizes["n_query"], sizes["dim"], rng
    )
    start = time.perf_counter()
    index = KNNIndex(bank, labels, CLASSES, backend=backend)
    build_s = time.perf_counter() - start
    device = index.device
    index.scores(queries[:256], k=K, temperature=TEMPERATURE)  # warm-up (threads, kernels)
    scan: BankScan | None = index._scan

    result: dict = {}

    def knn() -> None:
        result["scores"] = index.scores(queries, k=K, temperature=TEMPERATURE)

    if scan is not None:  # the CPU scan: its own tiles are the fair floor
        scan.product_only(queries[:256])
        runs = paired(knn, lambda: scan.product_only(queries), repeats=1 if quick else 3)
        tiled_s = runs["b_s"]
        dtype = scan.dtype
    else:  # faiss / CUDA torch: the plain float32 product on the index's device
        runs = {"a_s": timed(knn, device), "b_s": float("inf"), "ratio": float("nan")}
        tiled_s, dtype = None, torch.float32
    plain_s = plain_product(bank, queries, dtype, device)
    bound = min(runs["b_s"], plain_s)
    ratio = runs["ratio"] if scan is not None and runs["b_s"] <= plain_s else runs["a_s"] / bound

    scores = result["scores"]
    subset = min(len(queries), REFERENCE_QUERIES)  # the reference is linear in the queries
    ref_sims, ref_idx, ref_s = reference_topk(bank, queries[:subset], device)
    ref_s *= len(queries) / subset
    exact = weighted_vote(ref_sims, labels[ref_idx], CLASSES, TEMPERATURE)
    agreement = float((exact.argmax(1) == scores[:subset].argmax(1)).mean())
    sync(device)
    if extra is not None:
        extra.update(
            {
                "index_build_seconds": round(build_s, 2),
                "reference_seconds": round(ref_s, 2),
                "seconds_over_reference": round(runs["a_s"] / ref_s, 3),
                "agreement_with_fp32": round(agreement, 5),
                "tiled_product_seconds": None if tiled_s is None else round(tiled_s, 2),
                "plain_product_seconds": round(plain_s, 2),
                "product_dtype": str(dtype).replace("torch.", ""),
                "faiss_gpu_eval_scale": faiss_gpu_eval_scale(quick),
            }
        )
    return {
        **sizes,
        "seconds": round(runs["a_s"], 4),
        "matmul_bound_seconds": round(bound, 4),
        "ratio": round(ratio, 3),
        "backend": index.backend,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--backend", default="auto", help="kNN backend to time (default auto)")
    args = parser.parse_args()
    details: dict = {}
    section = measure(args.quick, details, backend=args.backend)
    print(json.dumps({"knn": section, "details": details}, indent=1))


if __name__ == "__main__":
    main()
