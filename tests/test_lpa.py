"""Label spreading: agreement with scikit-learn, solvers, early stopping, preprocessing, the estimator
(scikit-learn's estimator checks), errors, methods."""
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from sparsebench.core.errors import ConfigError
from sparsebench.graph.affinity import affinity, normalized_affinity
from sparsebench.graph.estimator import LabelSpreading
from sparsebench.graph.knn import knn_classify, knn_graph
from sparsebench.core.threads import torch_threads
from sparsebench.graph.pca import pca, scale_unit
from sparsebench.graph.spreading import label_spreading, mask_labels, seed_matrix


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return scale_unit(x), y


@pytest.fixture(scope="module")
def problem(digits):
    """Digits, k=5 exact graph, 90% of labels hidden (seed 0)."""
    x, y = digits
    labelled = mask_labels(y, 0.9, seed=0, num_classes=10)
    W = affinity(knn_graph(x, 5, "brute"))
    return x, y, labelled, W, normalized_affinity(W), seed_matrix(y, labelled, 10)


def _acc(pred, y, labelled):
    return float((pred[~labelled] == y[~labelled]).mean())


def _sklearn_spreading(x, y, labelled, W, max_iter):
    from sklearn.semi_supervised import LabelSpreading

    m = LabelSpreading(kernel=lambda a, b: W, alpha=0.99, max_iter=max_iter, tol=1e-9)  # the same graph W
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter=30
        m.fit(x, np.where(labelled, y, -1))
    return m.transduction_


def test_agrees_with_sklearn_label_spreading(problem):
    x, y, labelled, W, S, Y = problem
    # sklearn's default max_iter=30 stops long before convergence (alpha=0.99 needs ~1000 iterations):
    # compare at its 30 iterations and at convergence
    ours30 = label_spreading(S, Y, 0.99, "iterate", max_iter=30, tol=0).F.argmax(1)
    sk30 = _sklearn_spreading(x, y, labelled, W, 30)
    assert abs(_acc(ours30, y, labelled) - _acc(sk30, y, labelled)) <= 0.005
    assert (ours30 == sk30).mean() > 0.995
    sk = _sklearn_spreading(x, y, labelled, W, 3000)
    for solver in ("iterate", "cg"):
        ours = label_spreading(S, Y, 0.99, solver, max_iter=3000, tol=1e-7, cg_rtol=1e-6).F.argmax(1)
        assert abs(_acc(ours, y, labelled) - _acc(sk, y, labelled)) <= 0.005
        assert (ours == sk).mean() > 0.995
    assert _acc(sk, y, labelled) > 0.9


def test_cg_solves_the_closed_form(problem):
    *_, S, Y = problem
    n = S.shape[0]
    exact = spla.spsolve((sp.identity(n, format="csc") - 0.99 * S.astype(np.float64)).tocsc(), 0.01 * Y.astype(float))
    r = label_spreading(S, Y, 0.99, "cg", max_iter=1000, cg_rtol=1e-5)
    assert r.converged and r.iterations < 200 and r.residual <= 1e-5
    np.testing.assert_allclose(r.F, exact, atol=1e-4 * np.abs(exact).max())
    assert r.F.dtype == np.float32
    # the document's iteration converges to the same fixed point, far more slowly
    it = label_spreading(S, Y, 0.99, "iterate", max_iter=5000, tol=1e-8)
    assert it.iterations > 3 * r.iterations
    assert (it.F.argmax(1) == r.F.argmax(1)).mean() > 0.999


def test_early_stopping_stops(problem):
    *_, S, Y = problem
    seen = []
    es = label_spreading(S, Y, 0.99, "iterate", max_iter=1000, tol=1e-3, callback=lambda i, d: seen.append(d))
    assert es.converged and es.iterations < 1000 and es.residual < 1e-3
    assert len(seen) == es.iterations and seen[-2] >= 1e-3  # stopped at the first step below tol
    loose = label_spreading(S, Y, 0.99, "iterate", max_iter=1000, tol=1e-2)
    assert loose.iterations < es.iterations
    full = label_spreading(S, Y, 0.99, "iterate", max_iter=200, tol=0)  # tol=0: never stops early
    assert full.iterations == 200 and not full.converged


def test_affinity_binary_and_heat(problem):
    x, *_ = problem
    g = knn_graph(x, 6, "brute")
    for weighting in ("binary", "heat"):
        W = affinity(g, weighting)
        assert abs(W - W.T).max() == 0 and W.diagonal().max() == 0
        assert W.nnz >= 6 * len(x)  # every directed edge survives the symmetrisation
        assert 0 < W.data.min() and W.data.max() <= 1
    assert (affinity(g, "binary").data == 1).all()
    assert affinity(g, "heat").data.min() < 0.5  # far neighbours weigh less
    S = normalized_affinity(affinity(g, "binary"))
    assert abs(S - S.T).max() < 1e-6
    assert np.abs(spla.eigsh(S.astype(np.float64), k=1, which="LA")[0][0] - 1.0) < 1e-6  # spectral radius 1


def test_mask_is_seeded_and_exact():
    y = np.repeat(np.arange(10), 50)
    a, b, c = mask_labels(y, 0.9, 0), mask_labels(y, 0.9, 0), mask_labels(y, 0.9, 1)
    assert (a == b).all() and (a != c).any() and a.sum() == 50


def test_fully_masked_class_is_a_clear_error():
    y = np.array([0] * 50 + [1] * 50 + [2])  # class 2 has one point: half the seeds hide it
    errors = []
    for seed in range(10):
        try:
            labelled = mask_labels(y, 0.5, seed)
            assert labelled[-1]
        except ConfigError as err:
            errors.append(str(err))
    assert errors and all(e.startswith("mask_fraction=0.5: class(es) [2] have no labelled point") for e in errors)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match=rf"mask_fraction={bad}: the masked fraction must be in \(0, 1\)"):
            mask_labels(y, bad, 0)


def test_k_not_below_n_is_a_clear_error(digits):
    x, y = digits
    with pytest.raises(ConfigError, match=r"^n_neighbors=60: must be smaller than the number of samples \(60\)"):
        LabelSpreading(n_neighbors=60, graph="brute").fit(x[:60], y[:60])
    with pytest.raises(ConfigError, match=r"^solver='jacobi': unknown \(allowed: cg, iterate\)"):
        LabelSpreading(solver="jacobi").fit(x[:60], y[:60])
    with pytest.raises(ConfigError, match=r"^y: no labelled point"):
        LabelSpreading(graph="brute").fit(x[:60], np.full(60, -1))


def test_pca_solvers_agree(digits):
    x, _ = digits
    ref = pca(x, 10, "sklearn")
    for solver in ("covariance", "randomized"):
        z = pca(x, 10, solver)
        assert z.shape == (len(x), 10) and z.dtype == np.float32
        # same components up to sign: compare absolute per-component correlations of the scores
        corr = np.abs([np.corrcoef(z[:, j], ref[:, j])[0, 1] for j in range(10)])
        assert corr[:5].min() > 0.999 and corr.min() > 0.98
    with pytest.raises(ConfigError, match="method.pca_components=100"):
        pca(x, 100)


@pytest.mark.parametrize("solver", ["covariance", "randomized"])
def test_pca_fit_transform_fuses_the_scaling(digits, solver):
    """(x - offset) * scale inside the centring gives the PCA of the scaled features, with the mean in
    scaled units and scores = (features - mean) @ axes."""
    from sparsebench.graph.pca import pca_fit_transform

    x = digits[0] * 16.0
    lo, hi = float(x.min()), float(x.max())
    mean, axes, z = pca_fit_transform(x, 10, solver, seed=3, offset=lo, scale=1.0 / (hi - lo))
    xs = scale_unit(x)
    np.testing.assert_allclose(mean, xs.mean(0), atol=1e-6)
    np.testing.assert_allclose(z, (xs - mean) @ axes, atol=1e-4)
    np.testing.assert_allclose(np.abs(z), np.abs(pca(xs, 10, solver, seed=3)), atol=1e-3)


def test_randomized_pca_keeps_the_variance_and_the_callers_rng(digits):
    import torch

    x = digits[0]
    var = lambda z: float((z.astype(np.float64) ** 2).sum())  # noqa: E731
    exact = var(pca(x, 20, "covariance"))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    z = pca(x, 20, "randomized", seed=1)
    assert torch.equal(torch.rand(3), expected)  # the solver's own generator, not torch's global one
    assert 0.99 * exact < var(z) <= exact * (1 + 1e-5)
    np.testing.assert_array_equal(z, pca(x, 20, "randomized", seed=1))  # seeded


def test_knn_classifier(digits):
    x, y = digits
    pb, _, _ = knn_classify(x[:1400], y[:1400], x[1400:], k=5, backend="brute")
    pf, _, _ = knn_classify(x[:1400], y[:1400], x[1400:], k=5, backend="faiss")
    assert (pb == pf).mean() > 0.99
    assert (pb == y[1400:]).mean() > 0.93


def test_estimator_pipeline(digits):
    x, y = digits
    labelled = mask_labels(y, 0.9, seed=0, num_classes=10)
    est = LabelSpreading(n_neighbors=5, graph="faiss_hnsw", solver="cg", random_state=0).fit(x, np.where(labelled, y, -1))
    assert est.converged_ and est.n_iter_ < 200 and est.X_.shape == x.shape
    assert (est.classes_ == np.arange(10)).all() and est.label_distributions_.shape == (1797, 10)
    np.testing.assert_allclose(est.label_distributions_.sum(1), 1.0)
    assert (est.transduction_ == est.label_distributions_.argmax(1)).all()
    assert _acc(est.transduction_, y, labelled) > 0.9
    t = est.timings_
    assert t["total"] == pytest.approx(t["pca"] + t["graph"] + t["propagation"])
    # new points: neighbours' label distributions; the training points themselves mostly keep their labels
    assert est.score(x[labelled], y[labelled]) > 0.9
    assert est.predict_proba(x[:7]).shape == (7, 10)


def test_estimator_matches_the_pipeline_by_hand(digits):
    """fit() is scale -> PCA -> graph -> affinity -> spreading, with labels encoded through classes_."""
    x, y = digits
    labelled = mask_labels(y, 0.9, seed=1, num_classes=10)
    est = LabelSpreading(n_neighbors=5, graph="brute", scale=True, pca_components=20).fit(
        x * 16.0, np.where(labelled, 2 * y + 10, -1))  # labels 10, 12, ..., 28; scaling undoes the * 16
    z = pca(scale_unit(x * 16.0), 20)
    S = normalized_affinity(affinity(knn_graph(z, 5, "brute")))
    F = label_spreading(S, seed_matrix(y, labelled, 10), 0.99, "cg").F
    assert (est.classes_ == 2 * np.arange(10) + 10).all()
    assert (est.transduction_ == 2 * F.argmax(1) + 10).all()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.SkipTestWarning")
def test_estimator_is_sklearn_compatible():
    """scikit-learn's estimator checks, all of them (brute graph and n_neighbors=3 keep the tiny check
    data sets valid and the run short). ``check_array_api_input`` is skipped by scikit-learn itself
    unless SCIPY_ARRAY_API=1: the estimator converts its input to NumPy and claims no array-API support."""
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(LabelSpreading(n_neighbors=3, graph="brute"), on_fail=None)
    failed = [(r["check_name"], repr(r["exception"])) for r in results if r["status"] == "failed"]
    assert not failed
    assert sum(r["status"] == "passed" for r in results) >= 50


def test_sklearn_clone_and_params():
    from sklearn.base import clone

    import sparsebench

    est = sparsebench.LabelSpreading(n_neighbors=7, alpha=0.9, graph="faiss", solver="iterate")
    assert clone(est).get_params() == est.get_params() and est.get_params()["graph"] == "faiss"


def test_torch_threads_restores():
    import torch

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError
    assert torch.get_num_threads() == before


def test_config_builds_the_estimator_from_its_own_keys():
    """Every estimator parameter not supplied by the run is a config key (renamed ones in CONFIG_KEYS)."""
    from sparsebench.methods.lpa import CONFIG_KEYS, RUN_PARAMS, KannLPAConfig

    c = KannLPAConfig(k=7, alpha=0.5, pca_solver="randomized", n_trees=3, block_size=64, num_threads=1)
    est = c.estimator(seed=3)
    for p in LabelSpreading._get_param_names():
        if p not in RUN_PARAMS:
            assert est.get_params()[p] == getattr(c, CONFIG_KEYS.get(p, p)), p
    assert est.random_state == 3 and est.graph_params["n_trees"] == 3 and est.graph_params["block_size"] == 64
    assert est.n_neighbors == 7 and est.graph == "pynndescent"


# ---------------------------------------------------------------- the registered methods
@pytest.fixture
def run_cfg(tmp_path, monkeypatch):
    from sparsebench.api import compose

    monkeypatch.setenv("SPARSEBENCH_OUT", str(tmp_path))

    def make(*overrides):
        return compose(["logger=csv", *overrides, f"out_dir={tmp_path}"])

    return make


def test_knn_lpa_method_on_digits(run_cfg, tmp_path):
    from sparsebench.api import execute

    df = execute(run_cfg("method=knn_lpa", "dataset=digits", "method.k=5", "method.pca_components=null"), quiet=True)
    row = df.iloc[0]
    assert row.method == "knn_lpa" and row.backend == "brute" and row.n == 1797  # all splits pooled
    assert row.acc_masked > 0.9 and np.isnan(row.recall)
    assert list(Path(tmp_path).glob("*/metrics.csv"))  # per-iteration residuals logged


def test_kann_lpa_method_with_faiss_hnsw(run_cfg):
    from sparsebench.api import execute

    df = execute(run_cfg("method=kann_lpa", "dataset=digits", "method.backend=faiss_hnsw", "method.k=5",
                         "method.solver=iterate", "method.tol=0.001", "method.weighting=heat"), quiet=True)
    row = df.iloc[0]
    assert row.backend == "faiss_hnsw" and row.recall > 0.97 and row.acc_masked > 0.9 and row.iterations < 1000


@pytest.mark.parametrize("overrides,match", [
    (["method=knn_lpa", "method.mask_fraction=1.0"], r"method.mask_fraction=1.0: the masked fraction must be in"),
    (["method=knn_lpa", "method.backend=pynndescent"], r"method.backend='pynndescent': knn_lpa needs an exact"),
    (["method=kann_lpa", "method.backend=brute"], r"method.backend='brute': kann_lpa needs an approximate"),
    (["method=knn_lpa", "method.solver=jacobi"], r"method.solver='jacobi': unknown"),
    (["method=knn_lpa", "method.alpha=1.0"], r"method.alpha=1.0: the clamping factor"),
])
def test_method_config_errors(run_cfg, overrides, match):
    from sparsebench.api import execute

    with pytest.raises(ConfigError, match=match):
        execute(run_cfg(*overrides), quiet=True)


def test_method_k_and_masking_errors_name_the_key(run_cfg):
    from sparsebench.api import execute

    with pytest.raises(ConfigError, match=r"^method.k=100: must be smaller than the number of samples \(100\)"):
        execute(run_cfg("method=knn_lpa", "dataset=iris", "method.k=100", "method.n_samples=100",
                        "method.pca_components=null"), quiet=True)
    with pytest.raises(ConfigError, match=r"^method.mask_fraction=0.99: class\(es\) .* no labelled point"):
        execute(run_cfg("method=knn_lpa", "dataset=iris", "method.k=3", "method.mask_fraction=0.99",
                        "method.pca_components=null"), quiet=True)


MNIST = Path(os.environ.get("SPARSEBENCH_DATA", "./data")) / "MNIST" / "raw"


@pytest.mark.skipif(not MNIST.is_dir(), reason="real MNIST not found under $SPARSEBENCH_DATA")
def test_mnist_subset_pipeline(run_cfg):
    from sparsebench.api import execute

    df = execute(run_cfg("method=knn_lpa", "dataset=mnist", "method.n_samples=5000", "method.backend=faiss"),
                 quiet=True)
    row = df.iloc[0]
    assert row.n == 5000 and row.features == 50 and row.acc_masked > 0.8  # 500 labels
