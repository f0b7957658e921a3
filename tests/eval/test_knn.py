"""Weighted cosine kNN: hand-computed votes, a dense reference, backend parity, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hlss.errors import ConfigError, HLSSError
from hlss.eval import knn
from hlss.eval.knn import KNNIndex, knn_scores, knn_search, resolve_backend, weighted_vote

CPU_BACKENDS = ["faiss", "torch"]


@pytest.fixture(autouse=True)
def _fresh_backend_choice():
    """resolve_backend remembers its answers per process: each test decides afresh, and what a
    test decided under patched probes is not left to later tests."""
    knn._resolve_backend.cache_clear()
    yield
    knn._resolve_backend.cache_clear()


def reference_scores(bank, labels, queries, num_classes, k, temperature):
    """Dense protocol kNN: all similarities, full argsort, exp(sim/T) votes, L1 normalisation."""
    b = np.asarray(bank, np.float64)
    q = np.asarray(queries, np.float64)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ b.T
    k = min(k, len(b))
    out = np.zeros((len(q), num_classes))
    for r in range(len(q)):
        top = np.argsort(-sims[r], kind="stable")[:k]
        for j in top:
            out[r, labels[j]] += math.exp(sims[r, j] / temperature)
        out[r] /= out[r].sum()
    return out


def random_problem(n=300, m=50, d=16, c=5, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((n, d)).astype(dtype)
    queries = rng.standard_normal((m, d)).astype(dtype)
    labels = rng.integers(0, c, n)
    return bank, labels, queries, c


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_computed_votes(backend):
    # Bank of 2-D points with different lengths (normalisation must remove them).
    bank = np.array([[3.0, 0.0], [0.8, 0.6], [0.0, 2.0], [-5.0, 0.0]], np.float32)
    labels = np.array([0, 0, 1, 2])
    queries = np.array([[2.0, 0.0], [0.0, -1.0]], np.float32)
    t = 0.5
    scores = knn_scores(bank, labels, queries, 3, k=3, temperature=t, backend=backend)
    # query 1: sims 1, 0.8, 0, -1 -> k=3 keeps labels 0, 0, 1
    w = [math.exp(1 / t), math.exp(0.8 / t), math.exp(0 / t)]
    expect0 = [(w[0] + w[1]) / sum(w), w[2] / sum(w), 0.0]
    # query 2 (0,-1): sims 0, -0.6, -1, 0 -> top-3: idx0 (0), idx3 (0), idx1 (-0.6)
    v = [math.exp(0 / t), math.exp(0 / t), math.exp(-0.6 / t)]
    expect1 = [(v[0] + v[2]) / sum(v), 0.0, v[1] / sum(v)]
    np.testing.assert_allclose(scores, [expect0, expect1], atol=1e-6)
    assert scores.dtype == np.float32
    sims, idx = knn_search(bank, queries, k=3, backend=backend)
    np.testing.assert_array_equal(idx[0], [0, 1, 2])
    np.testing.assert_array_equal(idx[1], [0, 3, 1])  # tie at sim 0 broken by index
    np.testing.assert_allclose(sims[0], [1.0, 0.8, 0.0], atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("k", "t", "dtype"),
    [(1, 0.07, np.float32), (7, 0.07, np.float16), (40, 0.5, np.float32), (200, 0.07, np.float16)],
)
def test_matches_dense_reference(backend, k, t, dtype):
    bank, labels, queries, c = random_problem(dtype=dtype, seed=k)
    got = knn_scores(bank, labels, queries, c, k=k, temperature=t, backend=backend)
    want = reference_scores(bank.astype(np.float32), labels, queries.astype(np.float32), c, k, t)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_faiss_torch_parity_and_tensor_inputs():
    bank, labels, queries, c = random_problem(n=2000, m=300, d=32, c=7, seed=3, dtype=np.float16)
    bank_copy, queries_copy = bank.copy(), queries.copy()
    a = knn_scores(bank, labels, queries, c, k=200, backend="faiss")
    b = knn_scores(
        torch.from_numpy(bank),
        torch.from_numpy(labels),
        torch.from_numpy(queries),
        c,
        k=200,
        backend="torch",
        device="cpu",
    )
    np.testing.assert_allclose(a, b, atol=1e-5)
    s1, i1 = knn_search(bank, queries, k=20, backend="faiss")
    s2, _ = knn_search(bank, queries, k=20, backend="torch", device="cpu")
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    assert s1.dtype == np.float32 and i1.dtype == np.int64
    np.testing.assert_array_equal(bank, bank_copy)  # inputs are never normalised in place
    np.testing.assert_array_equal(queries, queries_copy)
    assert np.all(np.diff(s1, axis=1) <= 1e-7)  # sorted by similarity


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_k_capped_and_batching(backend):
    bank, labels, queries, c = random_problem(n=12, m=30, d=8, c=3, seed=5)
    full = knn_scores(bank, labels, queries, c, k=500, backend=backend)
    np.testing.assert_allclose(
        full, reference_scores(bank, labels, queries, c, 12, 0.07), atol=2e-5
    )
    sims, idx = knn_search(bank, queries, k=500, backend=backend)
    assert sims.shape == idx.shape == (30, 12)
    small = knn_scores(bank, labels, queries, c, k=5, backend=backend, batch_size=7)
    big = knn_scores(bank, labels, queries, c, k=5, backend=backend, batch_size=4096)
    # the same scores up to float rounding: BLAS may sum in another order for another batch size
    # (or thread count), so bit-equality is not promised
    np.testing.assert_allclose(small, big, rtol=1e-5, atol=1e-6)


def test_torch_blocked_scan_matches(monkeypatch):
    """Bank scanned in many blocks (running top-k merge) gives the single-block answer."""
    bank, labels, queries, c = random_problem(n=1000, m=40, d=16, c=4, seed=9)
    whole = knn_scores(bank, labels, queries, c, k=30, backend="torch", device="cpu")
    monkeypatch.setitem(knn._TORCH_BLOCK_ELEMS, "cpu", 40 * 64)  # blocks of 64 bank rows
    monkeypatch.setattr(knn, "_SCAN_ROWS_PER_TILE", 64)  # the CPU scan: tiles of 64 rows
    blocked = knn_scores(bank, labels, queries, c, k=30, backend="torch", device="cpu")
    np.testing.assert_allclose(blocked, whole, atol=1e-6)
    np.testing.assert_allclose(
        blocked, reference_scores(bank, labels, queries, c, 30, 0.07), atol=2e-5
    )


def test_index_reuse_and_empty_queries():
    bank, labels, queries, c = random_problem(seed=11)
    index = KNNIndex(bank, labels, c, backend="faiss")
    np.testing.assert_allclose(
        index.scores(queries, k=10),
        knn_scores(bank, labels, queries, c, k=10, backend="faiss"),
        rtol=1e-5,
        atol=1e-6,
    )
    assert index.scores(queries[:0], k=10).shape == (0, c)
    sims, idx = index.search(queries[:0], k=10)
    assert sims.shape == (0, 10) and idx.shape == (0, 10)


def test_small_temperature_no_overflow():
    scores = weighted_vote(np.array([[1.0, 0.99, -1.0]]), np.array([[0, 1, 1]]), 2, 0.001)
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores.sum(), 1.0, atol=1e-6)
    assert scores[0, 0] > 0.99


def test_errors():
    bank, labels, queries, c = random_problem(n=20, m=3)
    with pytest.raises(ConfigError, match="unknown"):
        knn_scores(bank, labels, queries, c, backend="annoy")
    if not knn.faiss_gpu_available():
        with pytest.raises(ConfigError, match="faiss_gpu"):
            resolve_backend("faiss_gpu")
    if not knn.faiss_gpu_available() and not torch.cuda.is_available():
        # auto on a CPU: the bf16 scan where bf16 is fast, else the exact float32 scan
        assert resolve_backend("auto") == ("torch_bf16" if knn.cpu_bf16_fast() else "torch")
    with pytest.raises(ConfigError, match="k must"):
        knn_scores(bank, labels, queries, c, k=0, backend="faiss")
    with pytest.raises(ConfigError, match="temperature"):
        knn_scores(bank, labels, queries, c, temperature=0.0, backend="torch")
    with pytest.raises(HLSSError, match="empty"):
        knn_scores(bank[:0], labels[:0], queries, c, backend="faiss")
    bad = queries.copy()
    bad[1, 2] = np.nan
    with pytest.raises(HLSSError, match="NaN"):
        knn_scores(bank, labels, bad, c, backend="faiss")
    with pytest.raises(ValueError, match="dimension"):
        knn_scores(bank, labels, queries[:, :5], c, backend="torch")
    with pytest.raises(ValueError, match="bank_labels"):
        knn_scores(bank, labels + c, queries, c, backend="faiss")
    with pytest.raises(ValueError, match="bank_labels"):
        knn_scores(bank, labels[:-1], queries, c, backend="faiss")


def test_cuda_blocked_topk_merges_blocks():
    """The CUDA torch path's running top-k merge, run on CPU tensors: blocks of 64 bank rows
    give the dense answer."""
    bank, _, queries, _ = random_problem(n=1000, m=40, d=16, seed=4)
    b = torch.nn.functional.normalize(torch.from_numpy(bank), dim=1)
    q = torch.nn.functional.normalize(torch.from_numpy(queries), dim=1)
    sims, idx = knn._blocked_topk(b, q, 30, 40 * 64)
    want = (q @ b.T).topk(30, dim=1)
    np.testing.assert_allclose(sims.numpy(), want.values.numpy(), atol=1e-6)
    np.testing.assert_array_equal(np.sort(idx.numpy(), 1), np.sort(want.indices.numpy(), 1))


@pytest.mark.parametrize(
    ("cuda", "faiss_gpu", "bf16_fast", "device", "want"),
    [
        (False, False, True, None, "torch_bf16"),
        (False, False, False, None, "torch"),
        (True, False, True, None, "torch"),
        (True, True, True, None, "faiss_gpu"),
        (True, True, True, "cpu", "torch_bf16"),
        (False, True, False, "cpu", "torch"),
    ],
)
def test_auto_picks_fastest_for_device(monkeypatch, cuda, faiss_gpu, bf16_fast, device, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(knn, "faiss_gpu_available", lambda: faiss_gpu)
    monkeypatch.setattr(knn, "cpu_bf16_fast", lambda: bf16_fast)
    assert resolve_backend("auto", device) == want
    # an explicit backend is kept as it is
    assert resolve_backend("faiss", device) == "faiss"
    assert resolve_backend("torch_bf16", device) == "torch_bf16"


def test_auto_is_decided_once_per_backend_and_device(monkeypatch):
    probes = {"bf16": 0, "faiss_gpu": 0}

    def timed_bf16() -> bool:  # stands for the matmul timing
        probes["bf16"] += 1
        return True

    def faiss_gpu() -> bool:
        probes["faiss_gpu"] += 1
        return True

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(knn, "cpu_bf16_fast", timed_bf16)
    monkeypatch.setattr(knn, "faiss_gpu_available", faiss_gpu)
    assert resolve_backend("auto", "cpu") == "torch_bf16"
    assert resolve_backend("auto", "cpu") == "torch_bf16"
    assert probes == {"bf16": 1, "faiss_gpu": 0}
    # another device is another decision, itself made once
    assert resolve_backend("auto", None) == "faiss_gpu"
    assert resolve_backend("auto", None) == "faiss_gpu"
    assert probes == {"bf16": 1, "faiss_gpu": 1}
    # the answer stays for the process, even if a probe would now say otherwise
    monkeypatch.setattr(knn, "cpu_bf16_fast", lambda: False)
    assert resolve_backend("auto", "cpu") == "torch_bf16"
    knn._resolve_backend.cache_clear()
    assert resolve_backend("auto", "cpu") == "torch"


def test_backend_errors_are_not_remembered(monkeypatch):
    available = [False]
    monkeypatch.setattr(knn, "faiss_gpu_available", lambda: available[0])
    with pytest.raises(ConfigError, match="faiss_gpu"):
        resolve_backend("faiss_gpu", 0)
    available[0] = True
    assert resolve_backend("faiss_gpu", 0) == "faiss_gpu"
    with pytest.raises(ConfigError, match="unknown"):
        resolve_backend("annoy", ["not", "hashable"])


def test_cpu_bf16_fast_is_a_cached_bool(monkeypatch):
    knn.cpu_bf16_fast.cache_clear()
    try:
        monkeypatch.setattr(knn, "_cpu_flags", lambda: {"avx512f", "amx_bf16"})
        assert knn.cpu_bf16_fast() is True  # native bf16 units: fast, no timing needed
        knn.cpu_bf16_fast.cache_clear()
        monkeypatch.setattr(knn, "_cpu_flags", lambda: {"avx2"})
        before = torch.get_num_threads()
        assert isinstance(knn.cpu_bf16_fast(), bool)  # decided by timing
        assert torch.get_num_threads() == before
        knn.cpu_bf16_fast.cache_clear()
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
        assert knn.cpu_bf16_fast() is False  # no oneDNN bf16 at all
    finally:
        knn.cpu_bf16_fast.cache_clear()
    assert isinstance(knn.cpu_bf16_fast(), bool)
    assert knn.cpu_bf16_fast.cache_info().currsize == 1


def test_bf16_backend_scores_close_to_float32():
    bank, labels, queries, c = random_problem(n=3000, m=200, d=64, c=5, seed=21)
    exact = knn_scores(bank, labels, queries, c, k=50, backend="torch", device="cpu")
    fast = knn_scores(bank, labels, queries, c, k=50, backend="torch_bf16")
    # bf16 products move similarities by ~1e-3, weights exp(sim/0.07) by ~2%
    np.testing.assert_allclose(fast, exact, atol=0.03)
    np.testing.assert_allclose(fast.sum(1), 1.0, atol=1e-5)
    index = KNNIndex(bank, labels, c, backend="torch_bf16", device="cuda:0")
    assert index.backend == "torch_bf16" and index.device.type == "cpu"  # always the CPU scan


def test_bf16_contested_votes_are_refined_in_float32(monkeypatch):
    """Weak-signal embeddings (many near-tied votes): every query whose final margin is below
    REFINE_MARGIN carries the exact float32 scores, and predictions equal float32's."""
    rng = np.random.default_rng(12)
    d, classes, slides = 256, 7, 40
    slide_dir = 0.1 * rng.standard_normal((slides, d))
    slide_class = rng.integers(0, classes, slides)

    def draw(rows):
        slide = rng.integers(0, slides, rows)
        return (slide_dir[slide] + rng.standard_normal((rows, d))).astype(np.float16), slide

    bank, bank_slide = draw(6000)
    queries, _ = draw(800)
    labels = slide_class[bank_slide]
    refined = []
    original = knn._streamed_topk
    monkeypatch.setattr(
        knn, "_streamed_topk", lambda b, q, k: refined.append(len(q)) or original(b, q, k)
    )
    exact = knn_scores(bank, labels, queries, classes, k=200, backend="torch", device="cpu")
    fast = knn_scores(bank, labels, queries, classes, k=200, backend="torch_bf16")
    assert sum(refined) > 0
    top2 = np.sort(fast, 1)[:, -2:]
    close = top2[:, 1] - top2[:, 0] < knn.REFINE_MARGIN
    assert close.any()
    np.testing.assert_allclose(fast[close], exact[close], atol=1e-5)
    np.testing.assert_array_equal(fast.argmax(1), exact.argmax(1))
    np.testing.assert_allclose(fast, exact, atol=0.03)


def test_bf16_structureless_votes_are_kept_with_a_warning(monkeypatch, caplog):
    bank, labels, queries, c = random_problem(n=4000, m=200, d=32, c=7, seed=13)
    monkeypatch.setattr(knn, "_streamed_topk", lambda *a: pytest.fail("no re-vote expected"))
    with caplog.at_level("WARNING", logger="hlss.eval.knn"):
        scores = knn_scores(bank, labels, queries, c, k=200, backend="torch_bf16")
    assert "near-tied" in caplog.text
    np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.07, 0.005, 1.0])
def test_torch_vote_equals_the_numpy_vote(temperature):
    rng = np.random.default_rng(2)
    sims = rng.uniform(-1, 1, (40, 25)).astype(np.float32)
    labels = rng.integers(0, 6, (40, 25))
    want = weighted_vote(sims, labels, 6, temperature)
    got = knn.weighted_vote_torch(torch.from_numpy(sims), torch.from_numpy(labels), 6, temperature)
    assert got.dtype == torch.float32 and got.shape == (40, 6)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)
    empty = knn.weighted_vote_torch(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.int64), 6)
    assert empty.shape == (0, 6)


def test_torch_vote_errors():
    s, lab = torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(ConfigError, match="temperature"):
        knn.weighted_vote_torch(s, lab, 2, 0.0)
    with pytest.raises(ValueError, match="share a shape"):
        knn.weighted_vote_torch(s, lab[:, :3], 2)
    with pytest.raises(ValueError, match="at least one neighbour"):
        knn.weighted_vote_torch(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.int64), 2)


def test_the_device_path_searches_and_votes_on_the_device_in_batches():
    """The GPU path of ``scores`` (search and vote kept on the index's device, only [b, C]
    copied back), run here on the CPU: the scores of the CPU scan, batch by batch."""
    bank, labels, queries, c = random_problem(n=800, m=70, d=16, c=4, seed=12)
    index = KNNIndex(bank, labels, c, backend="torch", device="cpu")
    want = index.scores(queries, k=20)
    index._scan, index._bank = None, knn._normalise_torch(torch.from_numpy(bank))
    got = index.scores(queries, k=20, batch_size=16)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got, reference_scores(bank, labels, queries, c, 20, 0.07), atol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_equal_the_cpu_scores():
    bank, labels, queries, c = random_problem(n=3000, m=300, d=32, c=5, seed=13)
    gpu = knn_scores(bank, labels, queries, c, k=50, backend="torch", device="cuda")
    cpu = knn_scores(bank, labels, queries, c, k=50, backend="torch", device="cpu")
    np.testing.assert_allclose(gpu, cpu, atol=1e-5)
