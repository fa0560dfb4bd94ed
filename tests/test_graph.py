"""k-NN graph backends: exact backends agree, approximate recall on Digits, recall helper, errors."""
import numpy as np
import pytest
import torch

from sparsebench.core.errors import ConfigError
from sparsebench.graph.backends import GRAPH_BACKENDS, backend_names, drop_self, make_backend, smallest_k
from sparsebench.graph.knn import knn_graph, knn_search, recall_at_k, sampled_recall


@pytest.fixture(scope="module")
def gauss():
    # continuous random data: no distance ties, so exact backends must return the same sets
    return np.random.default_rng(0).normal(size=(1500, 20)).astype(np.float32)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y


@pytest.fixture(scope="module")
def digits_exact(digits):
    return knn_graph(digits[0], 10, "brute")


def test_exact_backends_identical_neighbour_sets(gauss):
    a = knn_graph(gauss, 10, "brute", block_size=256)  # several blocks
    b = knn_graph(gauss, 10, "faiss")
    assert a.exact and b.exact and a.indices.shape == (1500, 10)
    np.testing.assert_array_equal(np.sort(a.indices, 1), np.sort(b.indices, 1))
    np.testing.assert_allclose(a.distances, b.distances, rtol=1e-4, atol=1e-4)
    assert (a.indices != np.arange(1500)[:, None]).all()  # self excluded
    assert (np.diff(a.distances, axis=1) >= 0).all()  # sorted by distance


def test_brute_matches_sklearn_reference(gauss):
    from sklearn.neighbors import NearestNeighbors

    d, i = NearestNeighbors(n_neighbors=7).fit(gauss).kneighbors()  # sklearn excludes self without X
    g = knn_graph(gauss, 7, "brute")
    np.testing.assert_array_equal(np.sort(g.indices, 1), np.sort(i, 1))
    np.testing.assert_allclose(g.distances, d, rtol=1e-5, atol=1e-5)


def test_exact_backends_on_digits_agree_up_to_ties(digits, digits_exact):
    f = knn_graph(digits[0], 10, "faiss")
    # integer pixels give many equal distances: compare the distance profiles, and the sets where the
    # k-th and (k+1)-th distances are not tied
    np.testing.assert_allclose(digits_exact.distances, f.distances, atol=1e-4)
    same = np.array([set(a) == set(b) for a, b in zip(digits_exact.indices, f.indices)])
    assert same.mean() > 0.95


def test_knn_search_queries_agree(gauss):
    base, q = gauss[:1000], gauss[1000:]
    d1, i1, _, _ = knn_search(base, q, 5, "brute")
    d2, i2, _, _ = knn_search(base, q, 5, "faiss")
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-4)


RECALL_BOUND = 0.97  # stated bound for recall@10 on Digits (measured: hnsw 0.998, ivf 0.995, nndescent 0.997)


@pytest.mark.parametrize("backend,params", [("faiss_hnsw", {}), ("faiss_ivf", {"nprobe": 8})])
def test_faiss_approximate_recall_on_digits(digits, digits_exact, backend, params):
    g = knn_graph(digits[0], 10, backend, **params)
    assert not g.exact
    r = recall_at_k(g.indices, digits_exact.indices)
    assert RECALL_BOUND < r <= 1.0


def test_ivf_recall_grows_with_nprobe(digits, digits_exact):
    r = [recall_at_k(knn_graph(digits[0], 10, "faiss_ivf", nprobe=p).indices, digits_exact.indices) for p in (1, 16)]
    assert r[0] < r[1]


@pytest.fixture(scope="module")
def nnd_graph(digits):
    # the only pynndescent build of the suite: its numba compilation (~30 s) is paid here once
    return knn_graph(digits[0], 10, "pynndescent", seed=0)


def test_nndescent_recall_on_digits(nnd_graph, digits_exact, digits):
    r = recall_at_k(nnd_graph.indices, digits_exact.indices)
    assert RECALL_BOUND < r <= 1.0
    assert (nnd_graph.indices != np.arange(len(digits[1]))[:, None]).all()
    # the sampled estimate used by the methods is close to the full value
    assert abs(sampled_recall(nnd_graph, digits[0], sample=800, seed=1) - r) < 0.02


def test_nndescent_tuning_reaches_pynndescent(nnd_graph, digits, digits_exact):
    """n_trees / n_iters / low_memory / max_candidates go to pynndescent.NNDescent (compiled already by
    the nnd_graph fixture); None keeps pynndescent's default."""
    b = make_backend("pynndescent", n_trees=3, n_iters=2, low_memory=False, max_candidates=8, leaf_size=None)
    with b.threads():
        d, i = b.graph(digits[0], 10)
    assert (b.index.n_trees, b.index.n_iters, b.index.low_memory, b.index.max_candidates) == (3, 2, False, 8)
    assert b.index.leaf_size is None
    assert recall_at_k(i, digits_exact.indices) > 0.8


def test_recall_helper():
    exact = np.array([[1, 2, 3], [0, 2, 3]])
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(np.array([[1, 2, 9], [-1, -1, 3]]), exact) == pytest.approx(3 / 6)
    g = knn_graph(np.random.default_rng(1).normal(size=(200, 5)), 4, "brute")
    assert sampled_recall(g, np.random.default_rng(1).normal(size=(200, 5)), sample=500) == 1.0


def test_drop_self_with_duplicates():
    # point 0 and 1 coincide: a self-query may list 1 before 0 for row 0
    idx = np.array([[1, 0, 2], [1, 0, 2], [2, 0, 1]])
    d = np.zeros((3, 3), np.float32)
    _, i = drop_self(d, idx, 2)
    np.testing.assert_array_equal(i, [[1, 2], [0, 2], [0, 1]])
    _, i = drop_self(d, np.array([[5, 6, 7]] * 3), 2)  # own index absent: drop the farthest
    np.testing.assert_array_equal(i, [[5, 6]] * 3)


def test_k_must_be_smaller_than_n():
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ConfigError, match=r"^k=10: must be smaller than the number of samples \(10\)"):
        knn_graph(x, 10, "brute")
    with pytest.raises(ConfigError, match="k=0"):
        knn_graph(x, 0, "faiss")
    with pytest.raises(ConfigError, match="method.backend='annoy': unknown"):
        knn_graph(x, 3, "annoy")


def test_backend_registry_metadata():
    assert backend_names(exact=True) == ["brute", "faiss", "numpy_rows"]
    assert {"faiss_hnsw", "faiss_ivf", "pynndescent"} <= set(backend_names(exact=False))
    assert [n for n in GRAPH_BACKENDS.names() if GRAPH_BACKENDS.get(n).jit] == ["pynndescent"]
    g = knn_graph(np.random.default_rng(0).normal(size=(50, 3)), 3, "faiss_hnsw")
    assert g.exact is False  # the graph carries its backend's metadata


def test_backend_thread_settings_are_restored(monkeypatch):
    import faiss

    from sparsebench.graph.backends import FaissFlatBackend

    before = faiss.omp_get_max_threads()
    seen = []
    inner = FaissFlatBackend.graph

    def spy(self, x, k):
        seen.append(faiss.omp_get_max_threads())
        return inner(self, x, k)

    monkeypatch.setattr(FaissFlatBackend, "graph", spy)
    x = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
    knn_graph(x, 3, "faiss", num_threads=before + 1)
    assert seen == [before + 1] and faiss.omp_get_max_threads() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_brute_on_cuda_matches_cpu(gauss):
    a = knn_graph(gauss, 10, "brute", device="cuda")
    b = knn_graph(gauss, 10, "brute")
    np.testing.assert_array_equal(np.sort(a.indices, 1), np.sort(b.indices, 1))


@pytest.mark.parametrize("m", [5000, 5000 + 37, 100])
def test_smallest_k_matches_topk(m):
    d = torch.from_numpy(np.random.default_rng(m).normal(size=(64, m)).astype(np.float32))
    d[3, m - 1] = -100.0  # the minimum in the partial last group
    v, i = smallest_k(d, 10)
    v0, i0 = torch.topk(d, 10, dim=1, largest=False)
    np.testing.assert_array_equal(np.sort(i.numpy(), 1), np.sort(i0.numpy(), 1))
    np.testing.assert_array_equal(np.sort(v.numpy(), 1), np.sort(v0.numpy(), 1))
    assert (d.gather(1, i) == v).all()


def test_numpy_rows_backend_is_the_exact_graph():
    """Document 000's naive per-row brute force gives brute's graph (same neighbours, same distances)."""
    x = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    a, b = knn_graph(x, 5, "numpy_rows"), knn_graph(x, 5, "brute")
    assert a.exact and GRAPH_BACKENDS.get("numpy_rows").exact
    np.testing.assert_array_equal(np.sort(a.indices, 1), np.sort(b.indices, 1))
    np.testing.assert_allclose(np.sort(a.distances, 1), np.sort(b.distances, 1), rtol=1e-5, atol=1e-5)
    assert not (a.indices == np.arange(300)[:, None]).any()  # self excluded


@pytest.mark.parametrize("n,k,tile_cols,block_size", [(3001, 10, 512, 256), (2600, 10, 4096, 512), (4100, 5, 1024, 700)])
def test_tiled_brute_is_the_exact_graph(n, k, tile_cols, block_size):
    """The tiled CPU path (group minima per cache-sized tile, candidates recomputed) finds the true k
    nearest neighbours: equal to a float64 oracle, with a partial last tile, row blocks that straddle
    tiles, and an exact duplicate (whose twin is its nearest neighbour, itself excluded)."""
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    x[7] = x[n - 3]
    b = make_backend("brute", tile_cols=tile_cols, block_size=block_size)
    assert n >= 16 * k * b.group  # the tiled path is the one under test
    g = knn_graph(x, k, "brute", tile_cols=tile_cols, block_size=block_size)
    x64 = x.astype(np.float64)
    d2 = (x64 ** 2).sum(1)[:, None] - 2 * x64 @ x64.T + (x64 ** 2).sum(1)[None, :]
    np.fill_diagonal(d2, np.inf)
    oracle = np.sort(d2, 1)[:, :k]
    np.testing.assert_allclose(g.distances, np.sqrt(np.maximum(oracle, 0)), rtol=1e-4, atol=1e-4)
    assert not (g.indices == np.arange(n)[:, None]).any()
    assert g.indices[7, 0] == n - 3 and g.indices[n - 3, 0] == 7
    picked = np.take_along_axis(d2, g.indices, 1)
    np.testing.assert_allclose(picked, oracle, rtol=1e-4, atol=1e-3)  # the true neighbours, up to ties
    q = rng.normal(size=(50, 12)).astype(np.float32)
    dq, iq, _, _ = knn_search(x, q, k, "brute", tile_cols=tile_cols, block_size=block_size)
    dq64 = ((q.astype(np.float64)[:, None, :] - x64[None]) ** 2).sum(2)
    np.testing.assert_allclose(dq, np.sqrt(np.sort(dq64, 1)[:, :k]), rtol=1e-4, atol=1e-4)
