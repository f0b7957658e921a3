"""Helpers shared by the benchmarks: machine description, peak memory, paired timings, embeddings,
the composed training config and the command line of a stage.

Timings on a shared CPU are noisy (other processes, frequency changes), so a ratio of two
figures is measured as the median over *paired* runs (A then B, repeated), which cancels most
drift; the single figures are medians too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """The ``machine`` section: CPU, cores, versions, device, bf16-fast flag, CUDA."""
    from hlss.eval.knn import cpu_bf16_fast

    cuda = torch.cuda.is_available()
    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        faiss_version = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "faiss": faiss_version,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": cuda,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_fast": cpu_bf16_fast(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work (timings on a GPU need it); nothing on a CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Seconds of one call of ``fn``."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def paired(
    fn_a: Callable[[], object],
    fn_b: Callable[[], object],
    repeats: int = 3,
    device: torch.device | str | None = None,
) -> dict:
    """Time ``fn_a`` and ``fn_b`` alternately ``repeats`` times.

    Returns:
        ``{"a_s", "b_s", "ratio"}``: median seconds of each, and the median of the per-pair
        ratios ``a / b``.
    """
    a_times, b_times = [], []
    for _ in range(repeats):
        a_times.append(timed(fn_a, device))
        b_times.append(timed(fn_b, device))
    ratios = [a / b for a, b in zip(a_times, b_times, strict=True)]
    return {
        "a_s": statistics.median(a_times),
        "b_s": statistics.median(b_times),
        "ratio": statistics.median(ratios),
    }


def train_config(workdir: str, overrides: Sequence[str] | None = None):
    """The composed ``train`` config (``conf/train.yaml`` with its schema and resolvers), its
    ``paths.root`` and ``paths.output_dir`` under ``workdir``, then Hydra ``overrides``."""
    from hydra import compose, initialize_config_module

    from hlss.config import register_resolvers
    from hlss.schemas import register_schemas

    register_resolvers()
    register_schemas()
    with initialize_config_module("hlss.conf", version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"paths.root={workdir}",
                f"paths.output_dir={workdir}/run",
                *(overrides or []),
            ],
        )


def stage_main(doc: str, measure: Callable[..., dict]) -> None:
    """The command line of a ``make bench`` stage run alone: ``[--quick] [override ...]``
    (Hydra overrides of the training config); prints ``measure(quick, overrides)`` as JSON.
    ``doc``'s first line is the description ``--help`` shows."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(json.dumps(measure(args.quick, args.overrides), indent=1))


def random_embeddings(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``[rows, dim]`` L2-normalised float16 (how embeddings are stored), made in chunks."""
    out = np.empty((rows, dim), np.float16)
    for start in range(0, rows, 16384):
        x = rng.standard_normal((min(16384, rows - start), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + len(x)] = x
    return out


def clustered_embeddings(
    n_ref: int, n_query: int, dim: int, rng: np.random.Generator, classes: int = 7
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bank, bank labels and queries with the structure of patch features (a weak class
    direction, a slide offset, patch noise; slides of different classes overlap), float16."""
    slides = 400
    class_dir = 0.2 * rng.standard_normal((classes, dim), dtype=np.float32)
    slide_class = rng.integers(0, classes, slides)
    slide_dir = class_dir[slide_class] + 0.5 * rng.standard_normal((slides, dim), dtype=np.float32)

    def draw(rows: int) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty((rows, dim), np.float16)
        labels = np.empty(rows, np.int64)
        for start in range(0, rows, 16384):
            size = min(16384, rows - start)
            slide = rng.integers(0, slides, size)
            x = slide_dir[slide] + 1.5 * rng.standard_normal((size, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start : start + size] = x
            labels[start : start + size] = slide_class[slide]
        return out, labels

    bank, labels = draw(n_ref)
    queries, _ = draw(n_query)
    return bank, labels, queries
