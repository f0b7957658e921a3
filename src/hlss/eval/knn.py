"""Weighted cosine kNN classification (the HiDisc/HLSS evaluation protocol).

Protocol: L2-normalise the bank (train patch embeddings) and the queries; for every query take
its ``k`` nearest bank items by cosine similarity (``k`` capped at the bank size); weight each
neighbour by ``exp(sim / T)``; add the weights per class of the neighbours; divide by the sum so
every query's score vector is L1-normalised (sums to 1).

Search backends (inner product on L2-normalised vectors):

* ``"faiss_gpu"`` -- a faiss GPU flat inner-product index (needs faiss built with GPU support and
  a visible GPU); exact, float32;
* ``"faiss"`` -- the exact CPU ``faiss.IndexFlatIP``, float32;
* ``"torch"`` -- float32, exact. On CUDA: chunked matmul + ``topk``; on the CPU: the
  threshold-pruned tiled scan of :mod:`hlss.eval.knn_scan`;
* ``"torch_bf16"`` -- the same CPU scan with a bfloat16 similarity product (float32 accumulation):
  ~2.5x faster where the CPU has native bf16 units (AVX512-BF16/AMX); neighbours differ from
  float32 ones only at near-ties (|sim difference| below ~1e-3); :meth:`KNNIndex.scores` re-votes
  on exact float32 similarities every query whose two best classes lie within
  :data:`REFINE_MARGIN`, so predictions are float32's (unless most votes are near-tied, see
  :data:`REFINE_MAX_FRACTION`). Always runs on the CPU;
* ``"auto"`` -- the fastest of these for the device: on CUDA ``faiss_gpu`` when available, else
  ``torch`` on CUDA; on a CPU ``torch_bf16`` when :func:`cpu_bf16_fast` (a cheap timing, once
  per process), else ``torch``. ``faiss`` (exact CPU) is never picked by ``auto``: at ``k=200``
  its heap selection makes it several times slower than the float32 scan; name it to use it.

Queries are streamed in batches of ``batch_size`` and, for the torch backends, the bank is scanned
in tiles, so no ``m x n`` similarity matrix is ever held in memory; progress (queries done, rate,
ETA) is reported per batch through :class:`hlss.progress.Progress`. Inputs may be numpy arrays or
torch tensors of any float dtype (embeddings are stored in float16); arithmetic is float32 except
the product of ``torch_bf16``.

Ties: each backend is deterministic, and its neighbours are returned sorted by similarity
(descending) then bank index (ascending). Backends use different BLAS kernels, so similarities can
differ in the last bits and, where two bank items are (nearly) tied at the k-th place, backends may
pick different ones; compare backends by scores with a tolerance, not by indices.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import numpy as np
import torch

from hlss.devices import resolve_device
from hlss.errors import ConfigError, HLSSError
from hlss.eval.knn_scan import BankScan, normalised_rows
from hlss.progress import Progress

BACKENDS = ("auto", "faiss_gpu", "faiss", "torch", "torch_bf16")

log = logging.getLogger(__name__)

# Largest similarity block (queries x bank items) of the CUDA torch backend, in elements.
_TORCH_BLOCK_ELEMS = {"cpu": 1 << 25, "cuda": 1 << 28}
# Tile of the CPU scan (bank items per product) and its query block; see hlss.eval.knn_scan.
_SCAN_ROWS_PER_TILE = 4096
_SCAN_QUERIES_PER_BLOCK = 1024
# Smallest query batch handed to the CPU scan: 16 blocks, so that worker threads share them out
# evenly even when one core is slowed by another process (its memory is ~4 KB per query).
_SCAN_MIN_BATCH = 16 * _SCAN_QUERIES_PER_BLOCK
REFINE_MARGIN = 0.02
"""``torch_bf16`` scores: queries whose best two classes are closer than this are re-voted on
float32 similarities (exact), so bf16 rounding cannot flip a prediction..."""
REFINE_MAX_FRACTION = 0.25
"""... unless more than this fraction of the queries is that close (data without class
structure, e.g. random embeddings): then the bf16 scores are kept and a warning is logged."""
# faiss GPU k-selection limit (2048 since faiss 1.7.3; 1024 before).
_FAISS_GPU_MAX_K = 2048


# --------------------------------------------------------------------------------------------
# backend discovery


def _import_faiss() -> Any | None:
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        return None
    return faiss


def faiss_gpu_available() -> bool:
    """True when faiss is built with GPU support and sees at least one GPU."""
    faiss = _import_faiss()
    if faiss is None or not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return int(faiss.get_num_gpus()) > 0
    except Exception:  # pragma: no cover - broken GPU driver
        return False


def _cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (``/proc/cpuinfo``; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def cpu_bf16_fast() -> bool:
    """True when this CPU multiplies bfloat16 matrices clearly faster than float32.

    That is the case with native bf16 units and not where bf16 is emulated. Decided once per
    process: False where oneDNN has no bf16 support; True where the CPU reports ``amx_bf16`` or
    ``avx512_bf16`` (2-3x the float32 rate); otherwise (flags unknown or without native bf16) a
    timing of single-threaded 1-GFLOP products, interleaved, medians of 7 (~0.1 s): bf16 must be
    at least 1.5x faster.
    """
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):  # pragma: no cover - torch without the query
        pass
    if _cpu_flags() & {"amx_bf16", "avx512_bf16"}:
        return True
    gen = torch.Generator().manual_seed(0)
    a32 = torch.randn(512, 1024, generator=gen)
    b32 = torch.randn(1024, 1024, generator=gen)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a16 @ b16, a32 @ b32  # warm-up (oneDNN builds its kernels on first use)
        t32, t16 = [], []
        for _ in range(7):
            start = time.perf_counter()
            a32 @ b32
            t32.append(time.perf_counter() - start)
            start = time.perf_counter()
            a16 @ b16
            t16.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return float(np.median(t16)) * 1.5 < float(np.median(t32))


def resolve_backend(backend: str = "auto", device: Any = None) -> str:
    """The concrete backend (``"faiss_gpu"``, ``"faiss"``, ``"torch"`` or ``"torch_bf16"``) that
    ``backend`` means on ``device`` (``None``/``"auto"``: CUDA when available, else the CPU; an
    int is a CUDA index).

    Decided once per process for each ``(backend, device)``: every evaluation of a run (one per
    checkpoint) gets the first answer without probing faiss, CUDA or the CPU's bf16 speed again
    (``_resolve_backend.cache_clear()`` forgets the answers). Errors are not remembered.

    Raises:
        ConfigError: ``backend`` is not one of :data:`BACKENDS`, or ``"faiss_gpu"`` is asked
            for without a GPU-enabled faiss and a visible GPU, or ``"faiss"`` without faiss.
    """
    try:
        hash(device)
    except TypeError:  # not a device spelling a cache can hold: decide without remembering
        return _resolve_backend.__wrapped__(backend, device)
    return _resolve_backend(backend, device)


@functools.lru_cache(maxsize=64, typed=True)
def _resolve_backend(backend: str, device: Any) -> str:
    """:func:`resolve_backend`'s decision, remembered per ``(backend, device)``."""
    if backend not in BACKENDS:
        raise ConfigError(
            f"knn backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}"
        )
    if backend == "auto":
        on_cpu = not isinstance(device, int) and (
            (device in (None, "auto") and not torch.cuda.is_available())
            or (device not in (None, "auto") and resolve_device(device).type == "cpu")
        )
        if not on_cpu:
            return "faiss_gpu" if faiss_gpu_available() else "torch"
        return "torch_bf16" if cpu_bf16_fast() else "torch"
    if backend == "faiss_gpu" and not faiss_gpu_available():
        faiss = _import_faiss()
        why = (
            "faiss is not installed"
            if faiss is None
            else "this faiss has no GPU support (install the `gpu` extra, faiss-gpu)"
            if not hasattr(faiss, "StandardGpuResources")
            else "faiss sees no GPU"
        )
        raise ConfigError(
            f"knn backend 'faiss_gpu' is not available: {why}; use 'faiss' or 'torch'"
        )
    if backend == "faiss" and _import_faiss() is None:  # pragma: no cover
        raise ConfigError("knn backend 'faiss' is not available: faiss is not installed")
    return backend


# --------------------------------------------------------------------------------------------
# input handling


def _as_2d(x: Any, name: str) -> np.ndarray | torch.Tensor:
    """Check that ``x`` is a 2-D float array/tensor; returns it (tensors detached)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if not torch.is_floating_point(x):
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    else:
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name} must be a floating-point array, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [rows, dim], got {tuple(x.shape)}")
    return x


def _check_finite(x: np.ndarray | torch.Tensor, name: str) -> None:
    ok = (
        bool(torch.isfinite(x).all()) if isinstance(x, torch.Tensor) else bool(np.isfinite(x).all())
    )
    if not ok:
        raise HLSSError(f"kNN {name} embeddings contain NaN or infinite values")


def _normalise_np(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32; zero rows stay zero. [r, d] -> [r, d] float32."""
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    x /= norms
    return x


def _normalise_torch(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float32)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if not isinstance(x, torch.Tensor):
        return x
    if x.dtype not in (torch.float16, torch.float32, torch.float64):  # e.g. bfloat16
        x = x.to(torch.float32)
    return x.cpu().numpy()


def _torch_device(device: Any) -> torch.device:
    """An int is a CUDA index; anything else goes to :func:`hlss.devices.resolve_device`."""
    if isinstance(device, int):
        return torch.device("cuda", device)
    return resolve_device(device)


def _gpu_id(device: Any) -> int:
    if device is None or device == "auto":
        return 0
    if isinstance(device, int):
        return device
    dev = resolve_device(device)
    if dev.type != "cuda":
        raise ConfigError(f"knn backend 'faiss_gpu' needs a CUDA device, got {device!r}")
    return dev.index or 0


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ConfigError(f"knn k must be a positive integer, got {k!r}")
    return int(k)


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ConfigError(f"knn batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _check_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"bank_labels must have shape [{n}], got {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"bank_labels must be integers, got {labels.dtype}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    labels = labels.astype(np.int64)
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"bank_labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    return labels


def _sort_neighbours(sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by similarity descending, then bank index ascending."""
    order = np.lexsort((idx, -sims), axis=-1)
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _blocked_topk(
    bank: torch.Tensor, q: torch.Tensor, k: int, block_elems: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of normalised ``q [b, d]`` in normalised ``bank [n, d]`` (any device), by
    scanning the bank in blocks of ``block_elems // b`` rows; keeps a running best-k per query."""
    block = max(k, block_elems // max(1, q.shape[0]))
    best_v: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start in range(0, bank.shape[0], block):
        chunk = bank[start : start + block]
        sims = q @ chunk.T  # [b, block]
        v, i = sims.topk(min(k, chunk.shape[0]), dim=1)
        i = i + start
        if best_v is None:
            best_v, best_i = v, i
        else:
            v = torch.cat([best_v, v], dim=1)
            i = torch.cat([best_i, i], dim=1)
            best_v, pos = v.topk(k, dim=1)
            best_i = i.gather(1, pos)
        del sims
    assert best_v is not None and best_i is not None
    return best_v, best_i


def _streamed_topk(
    bank: np.ndarray | torch.Tensor, q: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 top-k of normalised CPU ``q [b, d]`` in ``bank [n, d]`` (any float dtype),
    normalising the bank chunk by chunk (no float32 copy of the whole bank)."""
    best_v: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    start = 0
    for chunk in normalised_rows(bank, torch.float32):
        v, i = (q @ chunk.T).topk(min(k, chunk.shape[0]), dim=1)
        i = i + start
        start += chunk.shape[0]
        if best_v is not None:
            v, i = torch.cat([best_v, v], dim=1), torch.cat([best_i, i], dim=1)
            v, pos = v.topk(min(k, v.shape[1]), dim=1)
            i = i.gather(1, pos)
        best_v, best_i = v, i
    assert best_v is not None and best_i is not None
    return best_v, best_i


# --------------------------------------------------------------------------------------------
# the index


class KNNIndex:
    """An exact cosine-similarity index over a bank of embeddings, built once, queried often.

    Args:
        bank: ``[n, d]`` float array or tensor (any float dtype); rows are L2-normalised here.
        labels: optional ``[n]`` integer class of each bank row, in ``[0, num_classes)``;
            needed by :meth:`scores`.
        num_classes: number of classes ``C``; needed with ``labels``.
        backend: one of :data:`BACKENDS` (``"auto"`` is resolved for ``device``; the choice is
            in ``self.backend``).
        device: torch device for ``"torch"`` (``None``/``"auto"``: CUDA when available, else
            CPU), or the GPU (int or ``"cuda:N"``) for ``"faiss_gpu"`` (default 0); ignored by
            ``"faiss"`` and ``"torch_bf16"`` (CPU).

    Raises:
        ConfigError: unknown/unavailable backend.
        HLSSError: the bank is empty or holds NaN/inf.
        ValueError: wrong shapes/dtypes, labels out of range.
    """

    def __init__(
        self,
        bank: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | None = None,
        num_classes: int | None = None,
        backend: str = "auto",
        device: Any = None,
    ):
        self.backend = resolve_backend(backend, device)
        bank = _as_2d(bank, "bank")
        self.n, self.dim = int(bank.shape[0]), int(bank.shape[1])
        if self.n == 0:
            raise HLSSError("kNN bank is empty: no train embeddings to compare against")
        _check_finite(bank, "bank")
        if labels is not None:
            if num_classes is None:
                raise ValueError("num_classes is required together with labels")
            self.labels = _check_labels(labels, self.n, num_classes)
            self.num_classes = int(num_classes)
        else:
            self.labels, self.num_classes = None, None

        self._faiss_res = None
        self._scan: BankScan | None = None
        self._source: np.ndarray | torch.Tensor | None = None
        if self.backend in ("torch", "torch_bf16"):
            self.device = (
                torch.device("cpu") if self.backend == "torch_bf16" else _torch_device(device)
            )
            if self.device.type == "cpu":
                self._scan = BankScan(
                    bank,
                    "bf16" if self.backend == "torch_bf16" else "fp32",
                    rows_per_tile=_SCAN_ROWS_PER_TILE,
                    queries_per_block=_SCAN_QUERIES_PER_BLOCK,
                )
                # the input as given (no copy): float32 source of the contested-vote refinement
                self._source = bank if self.backend == "torch_bf16" else None
            else:
                self._bank = _normalise_torch(torch.as_tensor(bank).to(self.device))
        else:
            faiss = _import_faiss()
            vectors = _normalise_np(_to_numpy(bank))
            if self.backend == "faiss_gpu":
                gpu = _gpu_id(device)
                self.device = torch.device("cuda", gpu)
                self._faiss_res = faiss.StandardGpuResources()
                config = faiss.GpuIndexFlatConfig()
                config.device = gpu
                self._index = faiss.GpuIndexFlatIP(self._faiss_res, self.dim, config)
            else:
                self.device = torch.device("cpu")
                self._index = faiss.IndexFlatIP(self.dim)
            self._index.add(vectors)
            del vectors

    # -- search ---------------------------------------------------------------------------------

    def _search_batch(
        self, q: np.ndarray | torch.Tensor, k: int, sort: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of one query batch ``[b, d]`` -> (sims [b, k] float32, idx [b, k] int64),
        rows sorted (see :meth:`search`) when ``sort``, else in any order."""
        if self._scan is not None:
            sims, idx = self._scan.topk(q, k)
            sims, idx = sims.numpy(), idx.numpy()
        elif self.backend == "torch":
            sims, idx = self._device_topk(q, k)
            sims, idx = sims.cpu().numpy(), idx.cpu().numpy()
        else:
            qn = _normalise_np(_to_numpy(q))
            try:
                sims, idx = self._index.search(qn, k)
            except RuntimeError as err:
                if self.backend == "faiss_gpu" and k > 1024:
                    first = str(err).strip().splitlines()[0] if str(err).strip() else "error"
                    raise ConfigError(
                        f"knn k={k} is too large for backend 'faiss_gpu' (limit "
                        f"{_FAISS_GPU_MAX_K}, 1024 in older faiss): {first}; use 'faiss' or 'torch'"
                    ) from err
                raise
            sims, idx = np.asarray(sims, np.float32), np.asarray(idx, np.int64)
        return _sort_neighbours(sims, idx) if sort else (sims, idx)

    def _device_topk(
        self, q: np.ndarray | torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` of one query batch on the ``torch`` backend's device (a GPU): unsorted
        ``(sims [b, k], idx [b, k])`` left there."""
        qt = _normalise_torch(torch.as_tensor(q).to(self.device))
        block = _TORCH_BLOCK_ELEMS.get(self.device.type, _TORCH_BLOCK_ELEMS["cpu"])
        return _blocked_topk(self._bank, qt, k, block)

    def search(
        self, queries: np.ndarray | torch.Tensor, k: int = 200, batch_size: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest bank items of every query by cosine similarity.

        Args:
            queries: ``[m, d]`` float array/tensor (normalised here).
            k: neighbours per query, capped at the bank size.
            batch_size: queries per search batch (the CPU scan takes at least 16,384).

        Returns:
            ``(sims [m, k'] float32, idx [m, k'] int64)`` with ``k' = min(k, n)``, each row
            sorted by similarity descending, then index ascending.

        Raises:
            ConfigError: ``k`` or ``batch_size`` not a positive integer.
            HLSSError: queries hold NaN/inf.
            ValueError: wrong shape or dimension.
        """
        k = min(_check_k(k), self.n)
        batch_size = self._batch(_check_batch_size(batch_size))
        queries = self._check_queries(queries)
        m = int(queries.shape[0])
        sims = np.empty((m, k), np.float32)
        idx = np.empty((m, k), np.int64)
        with Progress(m, f"kNN search (k={k})", "queries") as progress:
            for start in range(0, m, batch_size):
                s, i = self._search_batch(queries[start : start + batch_size], k)
                sims[start : start + len(s)] = s
                idx[start : start + len(s)] = i
                progress.update(len(s))
        return sims, idx

    def scores(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int = 200,
        temperature: float = 0.07,
        batch_size: int = 4096,
    ) -> np.ndarray:
        """Weighted-vote class scores of every query, ``[m, C]`` float32, rows summing to 1.

        Raises:
            ConfigError: bad ``k``, ``temperature`` or ``batch_size``.
            ValueError: the index was built without labels; wrong query shape.
        """
        if self.labels is None or self.num_classes is None:
            raise ValueError("KNNIndex.scores needs an index built with labels and num_classes")
        k = min(_check_k(k), self.n)
        _check_temperature(temperature)
        batch_size = self._batch(_check_batch_size(batch_size))
        queries = self._check_queries(queries)
        m = int(queries.shape[0])
        out = np.empty((m, self.num_classes), np.float32)
        on_device = self._scan is None and self.backend == "torch"  # the GPU path
        if on_device:
            labels = torch.as_tensor(self.labels, device=self.device)
        with Progress(m, f"kNN search (k={k})", "queries") as progress:
            for start in range(0, m, batch_size):
                batch = queries[start : start + batch_size]
                if on_device:  # search and vote stay on the device; only [b, C] comes back
                    s, i = self._device_topk(batch, k)
                    votes = weighted_vote_torch(s, labels[i], self.num_classes, temperature)
                    out[start : start + len(s)] = votes.cpu().numpy()
                else:
                    s, i = self._search_batch(batch, k, sort=False)
                    out[start : start + len(s)] = weighted_vote(
                        s, self.labels[i], self.num_classes, temperature
                    )
                progress.update(len(s))
        if self._source is not None and len(out) and self.num_classes > 1:
            self._refine_contested(out, queries, k, temperature)
        return out

    def _refine_contested(
        self, out: np.ndarray, queries: np.ndarray | torch.Tensor, k: int, temperature: float
    ) -> None:
        """Recompute in float32 (exact) the votes of queries whose two best classes lie within
        :data:`REFINE_MARGIN` (bf16 moves scores by ~1e-3), in place: predictions then agree
        with float32 kNN everywhere else by a wide margin."""
        top2 = np.sort(out, axis=1)[:, -2:]
        contested = np.flatnonzero(top2[:, 1] - top2[:, 0] < REFINE_MARGIN)
        if len(contested) > REFINE_MAX_FRACTION * len(out):
            log.warning(
                "kNN: %.0f%% of the votes are near-tied (embeddings without class structure?); "
                "kept their bf16 scores, where a float32 re-vote would cost more than a float32 "
                "search (knn.backend=torch gives float32 throughout)",
                100 * len(contested) / len(out),
            )
            return
        for start in range(0, len(contested), _SCAN_QUERIES_PER_BLOCK):
            rows = contested[start : start + _SCAN_QUERIES_PER_BLOCK]
            q = queries[torch.from_numpy(rows) if isinstance(queries, torch.Tensor) else rows]
            sims, idx = _streamed_topk(self._source, _normalise_torch(torch.as_tensor(q).cpu()), k)
            out[rows] = weighted_vote(
                sims.numpy(), self.labels[idx.numpy()], self.num_classes, temperature
            )

    def _batch(self, batch_size: int) -> int:
        """Queries per search batch: at least :data:`_SCAN_MIN_BATCH` for the CPU scan."""
        return max(batch_size, _SCAN_MIN_BATCH) if self._scan is not None else batch_size

    def _check_queries(self, queries: Any) -> np.ndarray | torch.Tensor:
        queries = _as_2d(queries, "queries")
        if int(queries.shape[1]) != self.dim:
            raise ValueError(
                f"queries have dimension {queries.shape[1]} but the bank has dimension {self.dim}"
            )
        _check_finite(queries, "query")
        return queries


def _check_temperature(temperature: float) -> None:
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(temperature, bool) or not (np.isfinite(value) and value > 0):
        raise ConfigError(f"knn temperature must be a positive number, got {temperature!r}")


# --------------------------------------------------------------------------------------------
# public functions


def weighted_vote(
    sims: np.ndarray, neighbour_labels: np.ndarray, num_classes: int, temperature: float = 0.07
) -> np.ndarray:
    """Protocol vote: per-class sum of ``exp(sim / T)`` over the neighbours, L1-normalised.

    Args:
        sims: ``[m, k]`` cosine similarities of each query's neighbours.
        neighbour_labels: ``[m, k]`` integer class of each neighbour, in ``[0, num_classes)``.
        num_classes: ``C``.
        temperature: ``T > 0``.

    Returns:
        ``[m, C]`` float32 scores, each row summing to 1. The row maximum is subtracted before
        ``exp`` (cancels in the normalisation), so small temperatures cannot overflow.

    Raises:
        ConfigError: ``temperature`` is not positive.
        ValueError: shapes disagree, ``k == 0`` with ``m > 0``, or labels out of range.
    """
    _check_temperature(temperature)
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(neighbour_labels, dtype=np.int64)
    if sims.ndim != 2 or sims.shape != labels.shape:
        raise ValueError(
            f"sims and neighbour_labels must share a shape [m, k], got {sims.shape}, {labels.shape}"
        )
    m, k = sims.shape
    if m == 0:
        return np.zeros((0, num_classes), np.float32)
    if k == 0:
        raise ValueError("weighted_vote needs at least one neighbour per query")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"neighbour labels must lie in [0, {num_classes})")
    weights = np.exp((sims - sims.max(axis=1, keepdims=True)) / float(temperature))
    flat = (np.arange(m, dtype=np.int64)[:, None] * num_classes + labels).ravel()
    votes = np.bincount(flat, weights=weights.ravel(), minlength=m * num_classes)
    votes = votes.reshape(m, num_classes)
    votes /= votes.sum(axis=1, keepdims=True)
    return votes.astype(np.float32)


def weighted_vote_torch(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float = 0.07
) -> torch.Tensor:
    """:func:`weighted_vote` on tensors, computed where they are (a GPU keeps the vote on the
    device): the same formula in float64.

    Args:
        sims: ``[m, k]`` float tensor; neighbour_labels: ``[m, k]`` integer tensor in
            ``[0, num_classes)`` on the same device; num_classes: ``C``; temperature: ``T > 0``.

    Returns:
        ``[m, C]`` float32 tensor on that device, each row summing to 1.

    Raises:
        ConfigError: ``temperature`` is not positive.
        ValueError: shapes disagree or ``k == 0`` with ``m > 0`` (labels are not range-checked
            here: they come from an index that checked them).
    """
    _check_temperature(temperature)
    if sims.ndim != 2 or sims.shape != neighbour_labels.shape:
        raise ValueError(
            "sims and neighbour_labels must share a shape [m, k], got "
            f"{tuple(sims.shape)}, {tuple(neighbour_labels.shape)}"
        )
    m, k = sims.shape
    if m and not k:
        raise ValueError("weighted_vote needs at least one neighbour per query")
    s = sims.to(torch.float64)
    weights = torch.exp((s - s.amax(dim=1, keepdim=True)) / float(temperature)) if m else s
    votes = torch.zeros(m, num_classes, dtype=torch.float64, device=sims.device)
    votes.scatter_add_(1, neighbour_labels.to(torch.int64), weights)
    return (votes / votes.sum(dim=1, keepdim=True)).to(torch.float32)


def knn_search(
    bank: np.ndarray | torch.Tensor,
    queries: np.ndarray | torch.Tensor,
    k: int = 200,
    backend: str = "auto",
    batch_size: int = 4096,
    device: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` of ``queries`` ``[m, d]`` in ``bank`` ``[n, d]``.

    Returns ``(sims [m, min(k, n)] float32, idx [m, min(k, n)] int64)``, rows sorted by similarity
    descending, then index ascending. See :class:`KNNIndex` for arguments and raise conditions;
    build a :class:`KNNIndex` directly to query one bank several times.
    """
    return KNNIndex(bank, backend=backend, device=device).search(queries, k, batch_size)


def knn_scores(
    bank: np.ndarray | torch.Tensor,
    bank_labels: np.ndarray | torch.Tensor,
    queries: np.ndarray | torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    backend: str = "auto",
    batch_size: int = 4096,
    device: Any = None,
) -> np.ndarray:
    """Protocol kNN class scores of ``queries`` against a labelled ``bank``.

    Args:
        bank: ``[n, d]`` train embeddings (any float dtype, normalised here).
        bank_labels: ``[n]`` integer classes in ``[0, num_classes)``.
        queries: ``[m, d]`` embeddings to classify.
        num_classes: ``C``.
        k: neighbours (default 200), capped at ``n``.
        temperature: ``T`` of the ``exp(sim / T)`` weights (default 0.07).
        backend: ``"auto"``, ``"faiss_gpu"``, ``"faiss"`` or ``"torch"``.
        batch_size: queries per batch (bounds memory).
        device: see :class:`KNNIndex`.

    Returns:
        ``[m, C]`` float32 scores; each row sums to 1; ``argmax`` is the kNN prediction.

    Raises:
        ConfigError: unknown/unavailable backend, non-positive ``k``/``temperature``/``batch_size``.
        HLSSError: empty bank, NaN/inf embeddings.
        ValueError: shapes, dtypes or label ranges that do not fit.
    """
    index = KNNIndex(bank, bank_labels, num_classes, backend=backend, device=device)
    return index.scores(queries, k=k, temperature=temperature, batch_size=batch_size)
