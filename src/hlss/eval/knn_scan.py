"""Exact cosine top-k by a threshold-pruned, tiled scan of the bank (the kNN search engine of the
``torch`` and ``torch_bf16`` backends).

Why: on a CPU the similarity product itself is fast (bfloat16 runs ~2.5x the float32 rate where
the CPU has native bf16 units), but ``torch.topk`` over full similarity rows costs as much again.
The scan keeps the selection to a few cheap, vectorised passes per tile:

1. **Threshold.** For a block of queries, the similarities to a strided 1/``s`` subsample of the
   bank give, per query, a value ``c`` that about ``T = max(3k + 128, 640)`` bank items exceed
   (the ``ceil(T/s)``-th largest of the subsample).
2. **Shifted product.** Bank rows carry an extra column of ones and the query the value ``-c``,
   so one matrix product gives ``S' = sim - c`` per tile of ``rows_per_tile`` bank items. The
   shift matters for bfloat16 output: it is rounded relative to ``|S'|``, so values near the
   selection boundary keep ~5 digits (without the shift, similarities near 0.8 round to steps of
   0.004). Similarities are reconstructed as ``S' + c`` in float32.
3. **Pruning.** ``S'`` is reinterpreted as integer keys (int16 for bf16, int32 for float32): a
   non-negative float keeps its order as an integer, and every negative float has its sign bit
   set. Viewing the tile as int64 words and AND-ing the words of a 16-key group (strided, so the
   ANDs run over contiguous slabs) leaves a sign bit clear exactly where some key of the group is
   ``>= 0``; only those groups' words are gathered and their keys filtered. The selection runs in
   numpy (its ``nonzero`` is ~3x torch's on a CPU) on views of the torch tile, no copies.
4. **Top-k.** A candidate is packed into one int64 (key high, ``2^31 - 1 - index`` low, so it
   sorts by similarity, then lower index first) in a per-query buffer; the top ``k`` of the
   buffer are the answer. If a buffer fills up (``k + rows_per_tile``: many items above ``c``),
   it is cut to its top ``k`` and that query's floor is raised to just above its ``k``-th key, so
   later items equal to it lose (ties go to the lower bank index, the order of the scan).

Exactness: every item with ``S' >= threshold`` is a candidate, so when a query has at least ``k``
candidates its top ``k`` are exactly the top ``k`` of the computed similarities. A query with
fewer (its subsample was unlucky, or the bank is small) is redone by the dense path: full rows,
``topk`` (two products: an unshifted one to find the shift, then the shifted one).

Precision: float32 gives the float32 similarities. bfloat16 rounds the inputs (~3e-4 at most
on normalised 2048-d vectors) and the shifted output; neighbours can differ from float32 ones only
where two similarities lie that close (near-ties), so predictions agree with float32 kNN except on
near-tied votes (``tests/eval/test_knn_scan.py`` checks >= 99.5% on clustered embeddings).

CPU threads: a search runs query blocks on ``torch.get_num_threads()`` Python worker threads, with
torch's own intra-op threads set to 1 for its duration (restored afterwards). Independent workers
keep the cores busy where intra-op threads would wait for each other at every small operation
(badly so on a shared machine), and one worker's selection overlaps the other's product. The
scan is CPU-only; the CUDA ``torch`` backend uses a plain blocked ``topk`` (fast on a GPU).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

SCAN_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_KEY_DTYPE = {torch.bfloat16: torch.int16, torch.float32: torch.int32}
GROUP = 16
"""Keys tested together in step 3 (one strided group)."""
_SUBSAMPLE_MAX_STRIDE = 32
_SUBSAMPLE_TARGET_RANK = 20
_DENSE_BLOCK_ELEMS = 1 << 24
_PAD_MARK = -4.0
_NORM_CHUNK = 16384

_threads_lock = threading.Lock()

_SIGN_BITS = {torch.int16: -0x7FFF7FFF7FFF8000, torch.int32: -0x7FFFFFFF80000000}
"""Sign bits of every key lane of an int64 word (0x8000800080008000, 0x8000000080000000)."""
_EMPTY = np.iinfo(np.int64).min
_COL_MASK = 0x7FFFFFFF
"""Candidates are packed into one int64 that sorts like (similarity, then lower index first):
the shifted similarity's key (>= 0) in the high half, ``2^31 - 1 - index`` in the low half."""


def candidate_target(k: int) -> int:
    """``T``: the number of bank items the threshold aims to let through for top-``k``."""
    return max(3 * k + 128, 640)


def _round_up(x: int, step: int) -> int:
    return -(-x // step) * step


def normalised_rows(x: np.ndarray | torch.Tensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """L2-normalised float32 chunks of ``x`` (zero rows stay zero), cast to ``dtype``. Arrays are
    converted a chunk at a time (a read-only memory map is never handed to torch)."""
    for start in range(0, x.shape[0], _NORM_CHUNK):
        if isinstance(x, torch.Tensor):
            part = x[start : start + _NORM_CHUNK].detach().cpu().to(torch.float32)
        else:
            part = torch.from_numpy(np.array(x[start : start + _NORM_CHUNK], dtype=np.float32))
        part = part / part.norm(dim=1, keepdim=True).clamp_min(1e-12)
        yield part.to(dtype)


@contextmanager
def _single_intra_op_thread() -> Iterator[int]:
    """Set torch's intra-op threads to 1 meanwhile; yields the number it had."""
    with _threads_lock:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield before
        finally:
            torch.set_num_threads(before)


class BankScan:
    """A bank prepared for threshold-pruned top-k scans (see the module doc).

    Args:
        bank: ``[n, d]`` float array or tensor, any float dtype (not modified; normalised here).
        dtype: ``"bf16"`` or ``"fp32"``: the precision of the similarity product.
        rows_per_tile: bank items per product tile (a multiple of 16).
        queries_per_block: queries per work unit (one worker thread runs one block at a time).
        workers: worker threads (default: ``torch.get_num_threads()`` when a search starts).

    Memory: the bank is held once, in ``dtype``, ``[n, d + 2]`` (rounded up to multiples of 16);
    per worker one ``queries_per_block x rows_per_tile`` tile, and one int64 candidate buffer of
    ``queries_per_block x (k + rows_per_tile)``.

    Raises:
        ValueError: an unknown ``dtype`` or a ``rows_per_tile`` that is not a positive multiple
            of 16.
    """

    def __init__(
        self,
        bank: np.ndarray | torch.Tensor,
        dtype: str = "bf16",
        rows_per_tile: int = 4096,
        queries_per_block: int = 1024,
        workers: int | None = None,
    ):
        if dtype not in SCAN_DTYPES:
            raise ValueError(f"scan dtype must be one of {sorted(SCAN_DTYPES)}, got {dtype!r}")
        if rows_per_tile < GROUP or rows_per_tile % GROUP:
            raise ValueError(f"rows_per_tile must be a positive multiple of {GROUP}")
        self.dtype = SCAN_DTYPES[dtype]
        self.key_dtype = _KEY_DTYPE[self.dtype]
        self.n, self.dim = int(bank.shape[0]), int(bank.shape[1])
        self.rows_per_tile = int(rows_per_tile)
        self.queries_per_block = int(queries_per_block)
        self.workers = workers
        self.n_padded = _round_up(self.n, GROUP)
        self.width = _round_up(self.dim + 2, GROUP)
        self.col_shift, self.col_pad = self.dim, self.dim + 1
        # [n_padded, width]: normalised rows | 1 | 0 | zeros; padding rows: 0 ... | 0 | -4 | 0
        self.bank = torch.zeros(self.n_padded, self.width, dtype=self.dtype)
        start = 0
        for part in normalised_rows(bank, self.dtype):
            self.bank[start : start + len(part), : self.dim] = part
            start += len(part)
        self.bank[: self.n, self.col_shift] = 1.0
        self.bank[self.n :, self.col_pad] = _PAD_MARK
        self._subsamples: dict[int, torch.Tensor] = {}
        self._subsample_lock = threading.Lock()

    def _subsample(self, stride: int) -> torch.Tensor:
        """Every ``stride``-th bank row, contiguous (built once per stride)."""
        with self._subsample_lock:
            if stride not in self._subsamples:
                self._subsamples[stride] = self.bank[: self.n : stride].contiguous()
            return self._subsamples[stride]

    # -- public ---------------------------------------------------------------------------------

    def topk(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` bank items of every query by cosine similarity, in no particular order.

        Args:
            queries: ``[m, d]`` float array/tensor (normalised here).
            k: ``1 <= k <= n``.

        Returns:
            ``(sims [m, k] float32, idx [m, k] int64)`` on the CPU.
        """
        m = int(queries.shape[0])
        sims = torch.empty((m, k), dtype=torch.float32)
        idx = torch.empty((m, k), dtype=torch.int64)
        if m == 0:
            return sims, idx
        qa = torch.zeros((m, self.width), dtype=self.dtype)
        start = 0
        for part in normalised_rows(queries, self.dtype):
            qa[start : start + len(part), : self.dim] = part
            start += len(part)
        qa[:, self.col_pad] = 1.0
        blocks = [
            (s, min(s + self.queries_per_block, m)) for s in range(0, m, self.queries_per_block)
        ]

        def run(block: tuple[int, int]) -> None:
            lo, hi = block
            s, i = self._block_topk(qa[lo:hi], k)
            sims[lo:hi], idx[lo:hi] = s, i

        with _single_intra_op_thread() as threads:
            _run_all(run, blocks, max(1, self.workers or threads))
        return sims, idx

    def product_only(self, queries: np.ndarray | torch.Tensor) -> None:
        """Compute (and drop) the same similarity tiles as :meth:`topk`, on the same threads,
        without the selection: the compute floor that benchmarks compare :meth:`topk` with."""
        m = int(queries.shape[0])
        qa = torch.zeros((max(m, 1), self.width), dtype=self.dtype)
        start = 0
        for part in normalised_rows(queries, self.dtype):
            qa[start : start + len(part), : self.dim] = part
            start += len(part)
        blocks = [qa[s : s + self.queries_per_block] for s in range(0, m, self.queries_per_block)]

        def run(block: torch.Tensor) -> None:
            out = torch.empty(block.shape[0] * self.rows_per_tile, dtype=self.dtype)
            for lo in range(0, self.n_padded, self.rows_per_tile):
                w = min(self.rows_per_tile, self.n_padded - lo)
                torch.mm(block, self.bank[lo : lo + w].T, out=out[: block.shape[0] * w].view(-1, w))

        with _single_intra_op_thread() as threads:
            _run_all(run, blocks, max(1, self.workers or threads))

    # -- one block ------------------------------------------------------------------------------

    def _block_topk(self, qa: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of one query block ``qa [b, width]`` (shift column still 0)."""
        target = candidate_target(k)
        stride = max(1, min(_SUBSAMPLE_MAX_STRIDE, target // _SUBSAMPLE_TARGET_RANK))
        rank = math.ceil(target / stride)
        if -(-self.n // stride) < 4 * rank:  # small bank: dense rows are cheap and exact
            return self._dense_topk(qa, k)
        est = qa @ self._subsample(stride).T  # [b, n/stride], unshifted
        shift = est.topk(rank, dim=1, sorted=False).values.amin(1)  # ~T items lie above
        del est
        qa = qa.clone()
        qa[:, self.col_shift] = -shift
        sims, cols, fill = self._scan(qa, shift.to(torch.float32), k)
        short = torch.nonzero(fill < k).flatten()
        if len(short):  # too few items above the threshold: redo these queries densely
            s2, i2 = self._dense_topk(qa[short], k)
            sims[short], cols[short] = s2, i2
        return sims, cols

    def _scan(
        self, qa: torch.Tensor, shift: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidate scan of one block: ``(sims [b, k], idx [b, k], candidates per query [b])``.

        ``qa [b, width]`` carries ``-shift`` in its shift column. Rows with fewer than ``k``
        candidates hold padding; the caller redoes them.
        """
        b, tile = qa.shape[0], self.rows_per_tile
        key_np = np.int16 if self.key_dtype == torch.int16 else np.int32
        per_word = 8 // self.bank.element_size()  # keys per int64 word
        words_per_group = GROUP // per_word
        sign = np.int64(_SIGN_BITS[self.key_dtype])
        cap = k + tile  # a cut leaves k, and one tile adds at most `tile` per query
        packed = np.full((b, cap), _EMPTY, np.int64)
        fill = np.zeros(b, np.int64)
        floor: np.ndarray | None = None  # per-query lowest key still wanted, once cut
        prod_buf = torch.empty(b * tile, dtype=self.dtype)
        and_buf = np.empty(b * tile // per_word // 2, np.int64)
        hit_buf = np.empty(b * tile // GROUP, bool)
        for start in range(0, self.n_padded, tile):
            w = min(tile, self.n_padded - start)
            span, row_words = w // GROUP, w // per_word  # group g: words g, g + span, ...
            prod = prod_buf[: b * w].view(b, w)
            torch.mm(qa, self.bank[start : start + w].T, out=prod)
            words = prod.view(torch.int64).numpy().reshape(b, words_per_group, span)
            half = words_per_group // 2
            both = and_buf[: b * half * span].reshape(b, half, span)
            np.bitwise_and(words[:, :half], words[:, half:], out=both)
            while half > 1:  # AND over the group's words: a sign bit survives where all
                half //= 2  # of the group's keys are negative
                np.bitwise_and(both[:, :half], both[:, half : 2 * half], out=both[:, :half])
            np.bitwise_and(both[:, 0], sign, out=both[:, 0])
            hit = np.not_equal(both[:, 0], sign, out=hit_buf[: b * span].reshape(b, span))
            flat = np.flatnonzero(hit)
            if flat.size == 0:
                continue
            r = flat // span
            at = (r * row_words + (flat - r * span))[:, None] + np.arange(words_per_group) * span
            member = words.reshape(-1).take(at).view(key_np)  # [hits, 16] keys
            ok = member >= 0 if floor is None else member >= floor[r][:, None]
            lane = np.flatnonzero(ok)
            where = at.reshape(-1)[lane // per_word]  # word position in the tile
            rows = where // row_words
            cols = per_word * (where - rows * row_words) + lane % per_word + start
            keys = member.reshape(-1)[lane].astype(np.int64)
            count = np.bincount(rows, minlength=b)
            if (fill + count).max() > cap:
                floor = self._cut(packed, fill, np.flatnonzero(fill + count > cap), k, floor)
                keep = keys >= floor[rows]
                rows, cols, keys = rows[keep], cols[keep], keys[keep]
                count = np.bincount(rows, minlength=b)
            first = np.cumsum(count) - count
            pos = fill[rows] + np.arange(rows.size) - first[rows]
            packed.reshape(-1)[rows * cap + pos] = (keys << 32) | (_COL_MASK - cols)
            fill += count
        used = max(k, int(fill.max()))
        top = torch.from_numpy(packed[:, :used]).topk(k, dim=1, sorted=False).values
        return self._unpack(top, shift), _COL_MASK - (top & _COL_MASK), torch.from_numpy(fill)

    def _unpack(self, top: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Similarities (float32) of packed candidates ``top [b, k]`` of shifts ``shift [b]``."""
        key = (top >> 32).to(torch.int32)
        if self.dtype == torch.bfloat16:
            key = key << 16  # bfloat16 bits are the top half of the float32 bits
        return key.view(torch.float32) + shift[:, None]

    @staticmethod
    def _cut(
        packed: np.ndarray, fill: np.ndarray, rows: np.ndarray, k: int, floor: np.ndarray | None
    ) -> np.ndarray:
        """Cut the buffers of ``rows`` (each holding more than ``k``) to their top ``k``, in place;
        returns the per-query floor: one key above the ``k``-th (ties go to the lower index)."""
        if floor is None:
            floor = np.zeros(len(fill), np.int64)
        used = int(fill[rows].max())
        top = torch.from_numpy(packed[rows, :used]).topk(k, dim=1).values.numpy()
        packed[rows] = _EMPTY
        packed[rows, :k] = top
        fill[rows] = k
        floor[rows] = (top[:, -1] >> 32) + 1
        return floor

    # -- dense rows ---------------------------------------------------------------------------

    def _dense_topk(self, qa: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of full rows for ``qa [b, width]``; for bf16 a first, unshifted product
        places the shift at each query's ``k``-th similarity."""
        rows = max(1, _DENSE_BLOCK_ELEMS // self.n_padded)
        sims, idx = [], []
        for lo in range(0, qa.shape[0], rows):
            q = qa[lo : lo + rows].clone()
            q[:, self.col_shift] = 0.0
            shift = torch.zeros(
                q.shape[0],
                dtype=self.dtype,
            )
            if self.dtype != torch.float32:
                rough = (q @ self.bank[: self.n].T).to(torch.float32)
                shift = rough.topk(k, dim=1).values[:, -1].to(self.dtype)
                q[:, self.col_shift] = -shift
            exact = (q @ self.bank[: self.n].T).to(torch.float32)
            s, i = exact.topk(k, dim=1, sorted=False)
            sims.append(s + shift.to(torch.float32)[:, None])
            idx.append(i)
        return torch.cat(sims), torch.cat(idx)


def _run_all(fn: Callable[[Any], None], items: list, workers: int) -> None:
    """``fn(item)`` for every item, on ``workers`` threads (inline when 1); re-raises errors."""
    if workers <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()
