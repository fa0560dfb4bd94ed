"""Dynamic sparse training, selection and similarity search: exact top-n, brute force vs faiss, LSH,
conv unfolding, the brute-|ip| shortcut through ``weight.grad``, and the Figure 3.1 builder."""
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from dst_helpers import digits_bundle, make_grow, sparse_mlp
from sparsebench.config import TrainerConfig
from sparsebench.core.errors import ConfigError
from sparsebench.dst.capture import layer_vectors
from sparsebench.dst.grow import LayerUpdate, SimilarityGrow
from sparsebench.dst.search import (BruteForceSearch, FaissIndexSearch, FaissSearch, _merge_topn,
                                    _per_query_candidates, per_query_topn)
from sparsebench.dst.selection import kth_np, top_and_kth_np, top_np, topk_indices
from sparsebench.dst.similarity import AbsInnerProduct, L2Similarity, LSHSimilarity
from sparsebench.dst.updater import DSTUpdater
from sparsebench.sparsity.distributions import layer_counts, random_masks
from sparsebench.sparsity.masking import Masking
from sparsebench.training.trainer import Trainer

torch.set_num_threads(1)


def _fixed_vectors(seed=0, R=32, n_out=20, n_in=30):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(R, n_out, generator=gen), torch.randn(R, n_in, generator=gen)



@pytest.mark.parametrize("metric", [AbsInnerProduct(), L2Similarity()], ids=["abs_ip", "l2"])
def test_brute_force_and_faiss_flat_return_the_same_set(metric):
    G, U = _fixed_vectors()
    mask = torch.zeros(G.shape[1] * U.shape[1])
    mask[torch.randperm(mask.numel(), generator=torch.Generator().manual_seed(1))[:120]] = 1
    blocked = mask.nonzero().squeeze(1)
    n = 50
    exact = BruteForceSearch(metric).find("l", G, U, mask, n)
    flat = FaissSearch(metric, k_similar=1.0).find("l", G, U, mask, n)
    assert set(exact.tolist()) == set(flat.tolist())
    assert not set(exact.tolist()) & set(blocked.tolist())
    # the brute-force set is the true top-n of the metric among growable pairs
    s = metric.exact(G, U).reshape(-1)
    s[blocked] = -float("inf")
    assert set(exact.tolist()) == set(torch.topk(s, n).indices.tolist())


def test_per_query_search_with_small_k_similar_can_miss_global_topk():
    # Figure 3.1: one input vector is very similar to every gradient vector; per-query top-k misses pairs
    G, U = _fixed_vectors(seed=3, R=16, n_out=20, n_in=30)
    U[:, 0] = 10 * G.sum(1)
    mask = torch.zeros(600)
    exact = set(BruteForceSearch(AbsInnerProduct()).find("l", G, U, mask, 30).tolist())
    approx = set(FaissSearch(AbsInnerProduct(), k_similar=0.1).find("l", G, U, mask, 30).tolist())
    assert len(approx) == 30 and len(exact & approx) < 30


def test_lsh_path_runs_and_reports_recall():
    G, U = _fixed_vectors(seed=2, R=64, n_out=40, n_in=50)
    mask = torch.zeros(2000)
    mask[::7] = 1
    for bits in (0.5, 2.0):
        got = FaissSearch(LSHSimilarity(bits), k_similar=0.2).find("l", G, U, mask, 40)
        assert got.numel() == 40 and got.unique().numel() == 40
        assert torch.all(mask[got] == 0)
    # through the grow strategy: recall is logged and lies in [0, 1]
    model, masking, counts = sparse_mlp()
    upd = DSTUpdater(masking, make_grow("similarity", metric="lsh", bits=1.0), d0=0.1, schedule="constant",
                     delta_t=2, t_end=1.0)
    cfg = TrainerConfig(lr=0.05, batch_size=64, iterations=6, device="cpu")
    Trainer(cfg, model, digits_bundle(), torch.device("cpu"), masking=masking, callbacks=[upd]).fit()
    s = upd.summary()
    assert upd.updates == 3 and 0.0 <= s["recall_mean"] <= 1.0
    assert masking.counts() == {n: (counts[n], w.numel()) for n, w, _ in masking.items()}


def test_lsh_with_brute_force_is_a_config_error():
    with pytest.raises(ConfigError, match="method.search"):
        SimilarityGrow(torch.Generator(), metric="lsh", search="brute")



@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_conv_unfold_vectors_give_the_weight_gradient(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, dilation=dilation, bias=False)
    x = torch.randn(4, 3, 9, 9)
    out = conv(x)
    gout = torch.randn_like(out)
    out.backward(gout)
    U, G = layer_vectors(conv, x, gout)
    assert U.shape == (4 * out.shape[2] * out.shape[3], 27) and G.shape == (U.shape[0], 5)
    torch.testing.assert_close((G.t() @ U).view_as(conv.weight), conv.weight.grad, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("largest", [True, False])
def test_sampled_threshold_topk_is_exact(largest):
    gen = torch.Generator().manual_seed(0)
    for N, n in [(200_000, 1), (200_000, 2000), (50_000, 3000), (1000, 10)]:
        s = torch.randn(N, generator=gen)
        s[torch.randint(0, N, (N // 5,), generator=gen)] = -float("inf")
        for scores in (s, s.round()):  # with many ties
            got = topk_indices(scores, n, largest=largest)
            assert got.numel() == n and got.unique().numel() == n
            ref = torch.topk(scores, n, largest=largest).values
            assert torch.equal(torch.sort(scores[got]).values, torch.sort(ref).values)
    # with a threshold hint carried between calls (CPU): exact even when the distribution shifts a lot
    hint = {}
    for shift in (0.0, 0.01, 3.0, -5.0, 0.0):
        scores = torch.randn(100_000, generator=gen) + shift
        scores[:50_000] *= 1 + abs(shift)
        got = topk_indices(scores, 1500, largest=largest, hint=hint)
        assert "t" in hint and got.numel() == 1500 and got.unique().numel() == 1500
        ref = torch.topk(scores, 1500, largest=largest).values
        assert torch.equal(torch.sort(scores[got]).values, torch.sort(ref).values)



def test_block_threshold_passes_about_n_scores_and_memo_holds_few_samples():
    # a large block: the sample quantile lets at least n pass, and not many more than the sample's rank implies
    # (1.2 n plus four standard errors); a small block or a large n: the exact n-th largest; the per-layer memo
    # keeps at most SAMPLES_HELD samples
    from sparsebench.dst.selection import SAMPLES_HELD, _sample_rank, block_threshold
    gen = torch.Generator().manual_seed(3)
    memo = {}
    for N, n, absolute in [(784_000, 2000, True), (784_000, 2000, False), (200_000, 500, True)]:
        s = torch.randn(N, generator=gen)
        t = block_threshold(s, n, absolute, memo)
        a = s.abs() if absolute else s
        passed = int((a >= t).sum())
        size = min(8192, N // 8)
        assert n <= passed <= 1.5 * N * _sample_rank(n, N, size) / size, (N, n, passed)
    for N, n in [(1000, 10), (50_000, 10_000)]:  # exact: the n-th largest
        s = torch.randn(N, generator=gen)
        assert block_threshold(s, n, False, memo) == float(torch.topk(s, n).values[-1])
        assert block_threshold(s, n, True, memo) == float(torch.topk(s.abs(), n).values[-1])
    for N in range(20_000, 20_000 + 8 * 1000, 1000):  # a nonzero part changes size at every update
        block_threshold(torch.randn(N, generator=gen), 10, True, memo)
    assert sum(1 for k in memo if isinstance(k, tuple) and k[0] == "sample") == SAMPLES_HELD


@pytest.mark.parametrize("largest", [True, False])
def test_numpy_selection_primitives_equal_a_full_sort_on_tied_scores(largest):
    # top_np / kth_np / top_and_kth_np (torch.topk on a numpy view; numpy's partition is 10-25x slower on
    # ties) give the sorted order's values: arrays of mostly zeros and -inf marks, k from 1 to the size
    # (kth_np ranks from the nearer end)
    rng = np.random.default_rng(0)
    for size, zero in [(9, 0.5), (8192, 0.9), (100_000, 0.6), (5000, 0.0)]:
        a = np.abs(rng.standard_normal(size)).astype(np.float32)
        a[rng.random(size) < zero] = 0.0
        a[rng.random(size) < 0.05] = -np.inf
        ranked = np.sort(a)[::-1] if largest else np.sort(a)
        for k in sorted({1, 2, size // 3, size // 2, size // 2 + 1, size - 1, size}):
            v, i = top_np(a, k, largest)
            assert i.dtype == np.int64 and np.unique(i).size == k and np.array_equal(a[i], v)
            assert np.array_equal(np.sort(v), np.sort(ranked[:k]))
            assert kth_np(a, k, largest) == ranked[k - 1]
            n = max(1, k // 2)
            top, t = top_and_kth_np(a, n, k, largest)
            assert t == ranked[k - 1] and np.unique(top).size == n
            assert np.array_equal(np.sort(a[top]), np.sort(ranked[:n]))


def test_brute_abs_ip_reads_the_dense_gradient_and_matches_the_explicit_search():
    # grow=similarity search=brute metric=abs_ip takes |weight.grad| (== |G^T U|) instead of capturing vectors:
    # on a Linear and a Conv2d layer its chosen set equals the explicit brute-force search over the
    # captured (unfolded) vectors, up to float rounding at the n-th score.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 10))
    masking = Masking(model)
    masking.set_masks(random_masks(masking, layer_counts(masking, 0.3, "uniform"), torch.Generator().manual_seed(0)))
    grow = make_grow("similarity", metric="abs_ip", search="brute")
    assert grow.from_gradient and not grow.needs_activations and grow.needs_gradients
    assert not make_grow("similarity", metric="abs_ip", search="brute", max_rows=10**6).from_gradient
    upd = DSTUpdater(masking, grow, d0=0.2, schedule="constant", delta_t=1, t_end=1.0)
    assert upd.capture is None
    data = digits_bundle()
    x, y = data.train.x[:200].reshape(-1, 1, 8, 8), data.train.y[:200]
    inputs, gouts = {}, {}
    def keep(name):
        def hook(mod, inp, out):
            inputs[name] = inp[0].detach()
            out.register_hook(lambda g: gouts.__setitem__(name, g))
        return hook

    for name in masking.names:
        masking.module(name).register_forward_hook(keep(name))
    F.cross_entropy(model(x), y).backward()

    grow.prepare(masking, masking.names)
    for name in masking.names:
        m_flat = masking.mask(name).reshape(-1)
        n = 20
        layer = LayerUpdate(name, masking.module(name), masking.weight(name), m_flat, n)
        got = grow.grow(layer)
        U, G = layer_vectors(masking.module(name), inputs[name], gouts[name])
        want = BruteForceSearch(AbsInnerProduct()).find(name, G, U, m_flat, n)
        assert got.numel() == n and got.unique().numel() == n and torch.all(m_flat[got] == 0)
        ref = (G.t() @ U).abs().reshape(-1)
        kth = torch.sort(ref[want]).values[0]
        assert torch.all(ref[got] >= kth * (1 - 1e-4)), name
        assert len(set(got.tolist()) & set(want.tolist())) >= n - 1, name
    assert grow.stats["recall_hits"] == grow.stats["recall_n"] == 2 * 20



def test_topk_indices_exclude_on_numpy_and_torch_paths():
    gen = torch.Generator().manual_seed(5)
    for N, n in [(50_000, 700), (3000, 40)]:
        s = torch.rand(N, generator=gen)
        ex = (torch.rand(N, generator=gen) < 0.3).float()
        want = set(torch.topk(s.masked_fill(ex.bool(), -1.0), n).indices.tolist())
        got_np = topk_indices(s, n, exclude=ex)  # float32 on CPU: numpy path
        got_np2 = topk_indices(s.numpy(), n, exclude=ex.numpy(), hint={})
        got_t = topk_indices(s.double().to(torch.bfloat16).float(), n, exclude=ex)  # ties possible: check scores
        got_bf = topk_indices(s.to(torch.bfloat16), n, exclude=ex.to(torch.bfloat16))  # no numpy dtype: torch path
        assert set(got_np.tolist()) == want == set(got_np2.tolist())
        for g in (got_t, got_bf):
            assert g.numel() == n and g.unique().numel() == n and torch.all(ex[g] == 0)
        kth = s.to(torch.bfloat16)[list(want)].min()
        assert torch.all(s.to(torch.bfloat16)[got_bf] >= kth)
        with pytest.raises(ValueError, match="not excluded"):
            topk_indices(s, N, exclude=ex)



def test_fig31_builder_recall_and_quick_figure_stays_out_of_results(tmp_path):
    # Figure 3.1 builder (calls the searches directly): schema, the toy example's 3 of 4, recall 1 at
    # k_similar = 1 (every pair returned), and in quick mode the figure goes to a temporary file.
    from sparsebench.tables.builders.t001 import fig31
    from sparsebench.tables.figures import figure_path
    from sparsebench.tables.schema import RESULTS, TABLE_COLUMNS
    from sparsebench.tables.spec import QUICK_PREFIX, load_spec

    spec = load_spec("T001-fig3.1")
    spec.update(scale=f"{QUICK_PREFIX} (test); full: {spec['scale']}", warmup_steps=10, batches=1,
                k_similar=[0.1, 1.0])
    before = (RESULTS / "T001-fig3.1.png").stat().st_mtime_ns if (RESULTS / "T001-fig3.1.png").exists() else None
    t = fig31(spec, None)
    assert set(TABLE_COLUMNS) <= set(t.columns)
    assert float(t[t["layer"] == "toy"]["measured"].iloc[0]) == 0.75
    full = t[(t["layer"] != "toy") & (t["k_similar"] == 1.0)]
    assert len(full) == 3 and (full["measured"] == 1.0).all()
    path = figure_path(spec)
    assert path.parent != RESULTS and path.is_file()
    after = (RESULTS / "T001-fig3.1.png").stat().st_mtime_ns if (RESULTS / "T001-fig3.1.png").exists() else None



# ---------------------------------------------------------------- issue 15: faiss' flat search as one matrix product
def _mask(numel, active, seed):
    mask = torch.zeros(numel)
    mask[torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:active]] = 1
    return mask


@pytest.mark.parametrize("metric", [AbsInnerProduct(), L2Similarity()], ids=["abs_ip", "l2"])
@pytest.mark.parametrize("k_similar", [0.05, 0.15, 0.5, 1.0])
def test_flat_faiss_search_returns_the_faiss_index_set(metric, k_similar):
    # search=faiss answers IndexFlatIP/IndexFlatL2's batched queries by a GEMM and a per-query selection:
    # the same set as the faiss library's index (search=faiss_index), on random layers of several shapes
    for seed, (R, n_out, n_in, n) in enumerate([(32, 20, 30, 50), (64, 100, 300, 300), (16, 300, 784, 2000)]):
        G, U = _fixed_vectors(seed=seed, R=R, n_out=n_out, n_in=n_in)
        mask = _mask(n_out * n_in, n_out * n_in // 5, seed)
        new = FaissSearch(metric, k_similar=k_similar)
        assert metric.flat_index and not new.rerank
        got = new.find("l", G, U, mask, n)
        want = FaissIndexSearch(metric, k_similar=k_similar).find("l", G, U, mask, n)
        assert got.numel() == want.numel() and got.unique().numel() == got.numel()
        assert set(got.tolist()) == set(want.tolist()), (seed, R, n_out, n_in)
        assert torch.all(mask[got] == 0)


def test_flat_faiss_search_caps_each_query_like_the_index():
    # Figure 3.1's case: one input vector is the most similar to every gradient vector, so its query's
    # k-result cap binds (the preselection holds more than k pairs of that query): still faiss' set,
    # which misses global top-n pairs; and a layer with all-zero input vectors (zero scores preselected:
    # the full per-query lists are used)
    metric = AbsInnerProduct()
    G, U = _fixed_vectors(seed=3, R=16, n_out=20, n_in=30)
    U[:, 0] = 10 * G.sum(1)
    U[:, 1] = -10 * G.sum(1)  # the -q side of the cap
    mask = torch.zeros(600)
    for k_similar in (0.1, 0.3):
        got = FaissSearch(metric, k_similar=k_similar).find("l", G, U, mask, 30)
        want = FaissIndexSearch(metric, k_similar=k_similar).find("l", G, U, mask, 30)
        assert set(got.tolist()) == set(want.tolist())
        exact = set(BruteForceSearch(metric).find("l", G, U, mask, 30).tolist())
        assert len(exact & set(got.tolist())) < 30
    G, U = _fixed_vectors(seed=4, R=16, n_out=20, n_in=30)
    U[:, 5:] = 0  # 25 of 30 queries score 0 against every indexed vector
    got = FaissSearch(metric, k_similar=0.2).find("l", G, U, mask, 40)  # 5 queries x (4 + 4) results > 40
    want = FaissIndexSearch(metric, k_similar=0.2).find("l", G, U, mask, 40)
    S = (G.t() @ U).abs().reshape(-1)
    assert got.numel() == want.numel() == 40
    assert torch.equal(torch.sort(S[got]).values, torch.sort(S[want]).values)  # the zero-score ties may differ


def test_per_query_topn_preselection_equals_the_full_lists():
    # the CPU preselection path (thresholds carried between calls while the scale shifts) against merging
    # every query's full top-k lists, for both sign sets and n from a few to more than the lists hold
    gen = torch.Generator().manual_seed(7)
    hint = {}
    for step, (scale, n) in enumerate([(1.0, 500), (1.0, 500), (10.0, 500), (0.01, 2000), (1.0, 20), (1.0, 9000)]):
        S = torch.randn(200, 300, generator=gen) * scale
        S[:, :3] *= 20  # a few dominant queries: the per-query cap binds
        mask = _mask(S.numel(), S.numel() // 5, step)
        for signs in ((1, -1), (1,)):
            k = 12
            flat, sim = _per_query_candidates(S, signs, k)
            want = _merge_topn(flat.numpy(), sim.numpy(), mask, n)
            got = per_query_topn(S, signs, k, mask, n, hint=hint if signs == (1, -1) else None)
            assert set(got.tolist()) == set(want.tolist()), (step, signs, n)
    assert "r" in hint and "t" in hint


def test_faiss_grow_trains_like_the_faiss_index_at_dt1():
    # the same masks after 8 updates at dT=1 whether faiss_grow's search is the GEMM path or faiss' index
    masks = {}
    for search in ("faiss", "faiss_index"):
        model, masking, counts = sparse_mlp()
        upd = DSTUpdater(masking, make_grow("similarity", metric="abs_ip", search=search, k_similar=0.15),
                         d0=0.05, schedule="constant", delta_t=1, t_end=1.0)
        cfg = TrainerConfig(lr=0.05, batch_size=64, iterations=8, device="cpu")
        Trainer(cfg, model, digits_bundle(), torch.device("cpu"), masking=masking, callbacks=[upd]).fit()
        assert upd.updates == 8 and upd.random_fill == 0
        masks[search] = {n: masking.mask(n).clone() for n in masking.names}
        assert masking.counts() == {n: (counts[n], w.numel()) for n, w, _ in masking.items()}
    for name in masks["faiss"]:
        assert torch.equal(masks["faiss"][name], masks["faiss_index"][name]), name


def test_flat_faiss_search_from_the_weight_gradient_equals_the_vector_search():
    # abs_ip: S = G^T U is autograd's dense weight.grad (Linear and Conv2d), so find_scores(weight.grad)
    # returns find(G, U)'s set (up to float rounding at the k-th / n-th score); lsh and rerank need the vectors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 10))
    masking = Masking(model)
    masking.set_masks(random_masks(masking, layer_counts(masking, 0.3, "uniform"), torch.Generator().manual_seed(0)))
    data = digits_bundle()
    x, y = data.train.x[:200].reshape(-1, 1, 8, 8), data.train.y[:200]
    store = {}

    def keep(name):
        def hook(mod, inp, out):
            store[name] = [inp[0].detach(), None]
            out.register_hook(lambda g: store[name].__setitem__(1, g))
        return hook

    for name in masking.names:
        masking.module(name).register_forward_hook(keep(name))
    F.cross_entropy(model(x), y).backward()
    search = FaissSearch(AbsInnerProduct(), k_similar=0.15)
    assert search.answers_from_scores()
    for name in masking.names:
        w, m_flat = masking.weight(name), masking.mask(name).reshape(-1)
        U, G = layer_vectors(masking.module(name), *store[name])
        n = 20
        got = search.find_scores(name, w.grad.view(w.shape[0], -1), m_flat, n)
        want = FaissSearch(AbsInnerProduct(), k_similar=0.15).find(name, G, U, m_flat, n)
        assert got.numel() == want.numel() >= 10 and torch.all(m_flat[got] == 0)  # conv: 9 queries x 2 x k=1
        assert len(set(got.tolist()) & set(want.tolist())) >= want.numel() - 1, name
    for other in (FaissSearch(LSHSimilarity(1.0)), FaissSearch(AbsInnerProduct(), rerank=True),
                  FaissIndexSearch(AbsInnerProduct())):
        assert not other.answers_from_scores()
        with pytest.raises(NotImplementedError):
            other.find_scores("l", torch.zeros(3, 4), torch.zeros(12), 2)


@pytest.mark.parametrize("threads", [1, 2])
def test_select_above_equals_abs_compare_exclude_and_gather(threads):
    """select_above (native when built, threaded parts packed in order; else torch) equals the torch
    reference: |t| > thr or t > thr, NaN never above, listed positions left out, values gathered; sizes
    below / above the native and threading cut-offs, off a vector multiple; a capacity overflow retried."""
    from sparsebench.core.threads import scoped_threads
    from sparsebench.dst.selection import flat_nonzero, select_above

    g = torch.Generator().manual_seed(8)
    with scoped_threads(threads, torch.get_num_threads, torch.set_num_threads):
        for size in (100, 4096, 65535, 65536 * 3 + 7, 1 << 20):
            t = torch.randn(size, generator=g)
            t[3::89] = float("nan")
            ex = torch.unique(torch.randint(0, size, (size // 20,), generator=g))
            for absolute in (False, True):
                for thr in (2.0, 0.1, -0.5):  # 0.1 with |t|: more than the first capacity (size / 64) passes
                    v = t.abs() if absolute else t
                    want = flat_nonzero(v > thr)
                    i, val = select_above(t, thr, absolute)
                    assert torch.equal(i, want), (size, absolute, thr)
                    assert torch.equal(val, v[want])
                    keep = v > thr
                    keep[ex] = False
                    i, val = select_above(t, thr, absolute, exclude=ex)  # listed positions left out
                    assert torch.equal(i, flat_nonzero(keep)) and torch.equal(val, v[flat_nonzero(keep)])


def test_native_select_equals_the_compare_and_nonzero_it_replaces():
    """The native one-pass selects (when built) and their fallbacks give flat_nonzero(t > thr) exactly:
    ascending, ties at the threshold left out, -inf and NaN never above, sizes below and above the
    native cut-off and off a vector multiple, a buffer that overflows its first capacity, and
    non-contiguous input; topk_indices (its `>=` candidate pass) still equals torch.topk's set."""
    import numpy as np

    from sparsebench.dst.selection import _native_above, flat_nonzero, select_above

    def indices_above(t, thr):
        return select_above(t, thr)[0]

    g = torch.Generator().manual_seed(5)
    for size in (10, 4095, 4096, 70001, 1 << 20):
        t = torch.randn(size, generator=g)
        t[::97] = 0.5  # ties at the threshold
        t[1::101] = -float("inf")
        t[2::103] = float("nan")
        for thr in (0.5, 2.5, -1.0, -float("inf")):
            want = flat_nonzero(t > thr)
            got = indices_above(t, thr)
            assert torch.equal(got, want), (size, thr)
        a = t.numpy()
        ge = _native_above(a, 0.5, inclusive=True)
        if ge is not None:
            assert np.array_equal(ge, np.flatnonzero(a >= 0.5))
    m = torch.randn(300, 200, generator=g)
    assert torch.equal(indices_above(m.t(), 1.0), flat_nonzero(m.t() > 1.0))  # non-contiguous: the fallback
    s = torch.randn(1 << 20, generator=g)
    for n in (10, 5000, 100000):
        assert set(topk_indices(s, n).tolist()) == set(torch.topk(s, n).indices.tolist())


@pytest.mark.parametrize("k_similar", [0.15, 0.01])
def test_faiss_search_on_the_nonzero_part_of_a_sparse_layer_equals_the_full_search(monkeypatch, k_similar):
    """FaissSearch.find_sparse with abs_ip searches only the rows and columns of S that can be nonzero
    (nonzero_part; the per-query k of the whole layer): find's set on the whole S, whose query lists also
    hold zero-score pairs (fewer positive pairs per query and sign than k at k_similar = 0.15)."""
    import sparsebench.dst.search as search_mod

    parts = []
    real = search_mod.nonzero_part
    monkeypatch.setattr(search_mod, "nonzero_part", lambda *a, **k: parts.append(real(*a, **k)) or parts[-1])
    g = torch.Generator().manual_seed(12)
    n_out, n_in, B, n = 600, 500, 16, 1500
    G, U = torch.randn(B, n_out, generator=g), torch.randn(B, n_in, generator=g)
    G[:, torch.randperm(n_out, generator=g)[:450]] = 0.0
    U[:, ::4] = 0.0
    mask = (torch.rand(n_out * n_in, generator=g) < 0.01).to(torch.uint8)
    ex = mask.nonzero().squeeze(1)
    lu = LayerUpdate("l", nn.Linear(n_in, n_out), None, None, n, U, G, shape=(n_out, n_in), excluded=ex)
    want = set(FaissSearch(AbsInnerProduct(), k_similar).find("l", G, U, mask, n).tolist())
    got = FaissSearch(AbsInnerProduct(), k_similar).find_sparse("l", G, U, lu, n, 1 << 22)
    assert parts and parts[0] is not None and parts[0][3].numel() == 150 and parts[0][4].numel() == 375
    assert got.numel() == n and set(got.tolist()) == want and not bool(mask[got].any())


@pytest.mark.parametrize("metric_cls,k_similar", [(AbsInnerProduct, 0.15), (L2Similarity, 0.15)])
def test_faiss_sparse_search_differs_from_the_full_search_only_by_ties(metric_cls, k_similar):
    """On tied scores, as in standardized MNIST (pixels that are 0 across a batch become one constant: equal
    columns of U) and dead units (zero columns of G: equal L2 distances), find_sparse may pick other pairs
    than find, but only among ties: every pair in one answer and not the other has exactly its query's k-th
    score (a tied list slot) or the answer's n-th score; none lies outside its query's list or below."""
    from sparsebench.dst.search import _k_per_query

    g = torch.Generator().manual_seed(21)
    n_out, n_in, B, n = 300, 784, 32, 470  # LeNet's first layer: above the 16384 scores of a sampled threshold
    G, U = torch.randn(B, n_out, generator=g), torch.randn(B, n_in, generator=g)
    U[:, :300] = U[:, :1]  # 300 equal input columns
    G[:, :40] = 0.0  # 40 dead output units
    metric = metric_cls()
    S = metric.signed_scores(G.t().contiguous().t(), U).reshape(-1)
    S = S.abs() if len(metric.signs) == 2 else S
    k = _k_per_query(k_similar, n_out)
    kth = torch.topk(S.view(n_out, n_in), k, dim=0).values[-1]  # (n_in,): each query's k-th score
    differ = 0
    for trial in range(3):
        mask = (torch.rand(n_out * n_in, generator=g) < 0.2).to(torch.uint8)
        ex = mask.nonzero().squeeze(1)
        lu = LayerUpdate("l", nn.Linear(n_in, n_out), None, None, n, U, G, shape=(n_out, n_in), excluded=ex)
        ref = FaissSearch(metric, k_similar).find("l", G, U, mask, n)
        got = FaissSearch(metric, k_similar).find_sparse("l", G, U, lu, n, 1 << 22)
        assert got.numel() == n and got.unique().numel() == n and not bool(mask[got].any())
        a, b = set(got.tolist()), set(ref.tolist())
        differ += len(a ^ b)
        for answer, other in ((got, a - b), (ref, b - a)):
            nth = float(S[answer].min())
            for f in other:
                v = float(S[f])
                assert v >= float(kth[f % n_in]) and v >= min(nth, float(S[got].min()), float(S[ref].min())), (f, v)
                assert v == float(kth[f % n_in]) or v == float(S[got].min()) or v == float(S[ref].min()), (f, v)
    assert differ > 0  # the ties do bite here (so the tie branch of the check is exercised)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("metric_cls,k_similar", [(AbsInnerProduct, 0.15), (AbsInnerProduct, 0.01), (L2Similarity, 0.02)])
def test_faiss_search_on_sparse_layers_in_row_blocks_equals_the_full_search(monkeypatch, metric_cls, k_similar, bf16):
    """FaissSearch.find_sparse (row blocks of S, one threshold, list ranks from the preselection, the
    sorted excluded positions instead of a mask) returns find's set (per_query_topn on the whole S,
    itself tested against faiss' index) for two-sign and one-sign metrics, lists that bind (k of 1-2%:
    queries lose pairs to their list length) and blocks of 7 and 64 rows or the whole matrix; with the
    bf16 prefilter too (abs_ip only: its scores are a product; l2 never takes it), which only a layer over
    SCAN_MIN_ELEMENTS scores takes."""
    import sparsebench.dst.selection as sel
    from sparsebench.sparsity import native

    import sparsebench.dst.search as search_mod

    monkeypatch.setattr(sel, "bf16_matmul_fast", lambda: bf16)
    monkeypatch.setattr(search_mod, "SCAN_MIN_ELEMENTS", 1000)  # this small layer counts as a large one
    used = []
    real = sel.rows_above_bounded
    monkeypatch.setattr(sel, "rows_above_bounded", lambda *a, **k: used.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(11)
    n_out, n_in, B, n = 300, 200, 16, 150
    G, U = torch.randn(B, n_out, generator=g), torch.randn(B, n_in, generator=g)
    G[:, :5] *= 6.0  # a few strong output units: their queries' lists fill up
    mask = (torch.rand(n_out * n_in, generator=g) < 0.03).to(torch.uint8)
    ex = mask.nonzero().squeeze(1)
    lu = LayerUpdate("l", nn.Linear(n_in, n_out), None, None, n, U, G, shape=(n_out, n_in), excluded=ex)
    metric = metric_cls()
    want = set(FaissSearch(metric, k_similar).find("l", G, U, mask, n).tolist())
    for rows in (7, 64, n_out):
        got = FaissSearch(metric, k_similar).find_sparse("l", G, U, lu, n, rows * n_in)
        assert set(got.tolist()) == want, rows
        assert got.numel() == n and not bool(mask[got].any())
    takes = bf16 and metric_cls is AbsInnerProduct and native.load() is not None
    assert (len(used) >= 3) if takes else not used
