"""Tests of ttmanifold.experiments.problems and ttmanifold.experiments.solvers (chart vs Riemannian descent)."""
import importlib.util
import math
import time

import pytest
import torch

from ttmanifold.experiments.problems import (
    Approximation,
    Completion,
    _dedupe,
    inverse_sum_tt,
    random_tt,
    sample_distinct_indices,
)
from ttmanifold.experiments.solvers import (
    METHODS,
    History,
    homotopy_point,
    lr_grid,
    riemannian_cg,
    run,
    tune_lr,
)

HAS_CHART = importlib.util.find_spec("ttmanifold.chart") is not None
HAS_NN = importlib.util.find_spec("ttmanifold.nn") is not None
DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _dense_oracle_grad(problem, p):
    """Riemannian gradient by the dense oracle: autograd of the loss of the full tensor,
    then the dense tangent projection."""
    M = problem.manifold
    full = M.to_tt(p).full().detach().requires_grad_(True)
    problem.dense_loss(full).backward()
    return M.project(p, full.grad)


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 7, 8, 5), (10, 10, 10, 10, 10), (3, 4)])
def test_inverse_sum_tt_matches_dense(shape):
    A = inverse_sum_tt(shape)
    grids = [torch.arange(n, dtype=DT) / (n - 1) for n in shape]
    dense = 1.0 / (1.0 + sum(torch.meshgrid(*grids, indexing="ij")))
    assert _rel(A.full(), dense) < 1e-9
    assert max(A.ranks) <= 12


def test_inverse_sum_tt_large_without_dense():
    A = inverse_sum_tt((50,) * 20)
    assert A.shape == (50,) * 20 and 5 <= max(A.ranks) <= 12
    # rounding is accurate in the Frobenius norm, i.e. for the RMS over typical entries
    # (not pointwise at the rare large entries near i = 0)
    idx = torch.randint(0, 50, (2000, 20), generator=torch.Generator().manual_seed(0))
    exact = 1.0 / (1.0 + idx.to(DT).sum(1) / 49.0)
    assert _rel(A.gather(idx), exact) < 1e-8


@pytest.mark.parametrize("shape,count", [((10,) * 5, 5000), ((3, 3), 9), ((4, 5, 6), 100),
                                         ((50,) * 20, 20000)])
def test_sample_distinct_indices(shape, count):
    idx = sample_distinct_indices(shape, count, generator=3)
    assert idx.shape == (count, len(shape)) and idx.dtype == torch.int64
    assert torch.unique(idx, dim=0).shape[0] == count
    assert bool((idx >= 0).all()) and bool((idx < torch.tensor(shape)).all())
    again = sample_distinct_indices(shape, count, generator=3)
    assert torch.equal(idx, again)


def test_dedupe_hash_path_is_exact():
    # n^d >= 2^62: the hashed path; duplicates must go, distinct rows must all stay
    shape = (50,) * 20
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 50, (500, 20), generator=g)
    with_dups = torch.cat([rows, rows[:100], rows[:7]], 0)
    out = _dedupe(with_dups, shape)
    assert out.shape[0] == torch.unique(rows, dim=0).shape[0] == 500


def test_sample_distinct_errors():
    with pytest.raises(ValueError, match="distinct"):
        sample_distinct_indices((2, 3), 7)


@pytest.mark.parametrize("dist", ["gaussian", "uniform"])
def test_random_tt_unit_norm(dist):
    A = random_tt((20,) * 10, 6, core_dist=dist, generator=1)
    assert abs(float(A.norm()) - 1.0) < 1e-10
    assert A.ranks == (1,) + (6,) * 9 + (1,)


def test_completion_construction_and_disjoint_sets():
    P = Completion((10,) * 5, 3, oversampling=10, seed=2)
    M = P.manifold
    assert len(P.train) == math.ceil(10 * M.dim)
    both = torch.cat([P.train.indices, P.test.indices])
    assert torch.unique(both, dim=0).shape[0] == both.shape[0]  # distinct and disjoint
    assert torch.allclose(P.a_train, P.target.gather(P.train.indices))
    m = P.metrics(P.target)
    assert m["train_err"] < 1e-14 and m["test_err"] < 1e-14
    with pytest.raises(ValueError, match="exceeds"):
        Completion((4, 4, 4), 2, oversampling=40)
    with pytest.raises(ValueError):
        Completion((4, 4, 4), 9)  # infeasible rank


@pytest.mark.parametrize("scale", [1.0, 1e-170, 1e150])
def test_completion_metrics_of_tiny_and_huge_data_match_dense(scale):
    # the squares of data below ~1e-154 underflowed to 0: train_err was 0 / 0 = NaN
    P = Completion((5, 5, 5), 2, oversampling=2, test_size=20, seed=0)
    Q = Completion.from_data(P.train.indices, P.a_train * scale, P.manifold.shape, 2,
                             test=(P.test.indices, P.a_test * scale))
    x = P.manifold.to_tt(P.initial_point(0))
    X = x.full()
    m = Q.metrics(x * scale)
    for name, iset, a in (("train", P.train, P.a_train), ("test", P.test, P.a_test)):
        r = X[tuple(iset.indices.t())] - a  # the unit-scale dense reference
        assert m[f"{name}_err"] == pytest.approx(float(r.norm() / a.norm()), rel=1e-12)
        assert m[f"{name}_rmse"] == pytest.approx(scale * float(r.pow(2).mean().sqrt()),
                                                  rel=1e-12)


def test_completion_large_order_construction():
    # d = 20, n = 50 (n^d ~ 1e34): sampling by hashing; the benchmark builds |Omega| = 1e6
    P = Completion((50,) * 20, 2, train_size=20000, test_size=1000, seed=0)
    both = torch.cat([P.train.indices, P.test.indices])
    assert torch.unique(both, dim=0).shape[0] == 21000
    x = P.initial_point(0)
    loss = P.loss(P.manifold.to_tt(x))
    assert torch.isfinite(loss)
    assert 0.5 < P.metrics(x)["test_err"] < 10.0  # unrelated unit-norm tensors


# ---------------------------------------------------------------------------------------
# gradients against the dense oracle
# ---------------------------------------------------------------------------------------

def _problems_small():
    return [
        Approximation.random((4, 5, 6, 4), 4, 2, seed=1),
        Approximation.function((5, 6, 4, 5), 3),
        Completion((5, 6, 4, 5), 2, oversampling=5, test_size=50, seed=1),
        Completion((6, 5, 7), (3, 2), core_dist="uniform", oversampling=3, test_size=20,
                   seed=2),
    ]


@pytest.mark.parametrize("k", range(4))
def test_riemannian_grad_matches_dense_oracle(k):
    problem = _problems_small()[k]
    M = problem.manifold
    p = problem.initial_point(5)
    oracle = _dense_oracle_grad(problem, p)
    auto = M.riemannian_grad(p, problem.loss)
    assert _rel(auto, oracle) < 1e-10
    loss, g, _ = problem.cg_grad(p)  # the gradient CG uses (sparse projection / TT)
    assert _rel(g, oracle) < 1e-10
    assert abs(float(loss) - float(problem.loss(M.to_tt(p)))) < 1e-10 * max(1.0, float(loss))
    # the tangent tensors agree too
    assert _rel(M.tangent_to_tt(p, g).full(), M.tangent_to_tt(p, oracle).full()) < 1e-10


def test_regularized_completion_grad_and_step():
    P = Completion((5, 6, 4, 5), 2, oversampling=5, test_size=50, seed=1)
    P.reg = 0.3
    p = P.initial_point(1)
    oracle = _dense_oracle_grad(P, p)
    _, g, ctx = P.cg_grad(p)
    assert _rel(g, oracle) < 1e-10
    _check_exact_step(P, p, -g, ctx)


def _check_exact_step(problem, p, eta, ctx):
    M = problem.manifold
    alpha = float(problem.exact_step(p, eta, ctx))
    X = M.to_tt(p).full()
    E = M.tangent_to_tt(p, eta).full()
    f = lambda t: float(problem.dense_loss(X + t * E))  # noqa: E731
    # a quadratic in t: the exact minimizer satisfies f(a +- h) >= f(a)
    for h in (1e-3, 1e-1):
        assert f(alpha) <= f(alpha + h * abs(alpha)) + 1e-14
        assert f(alpha) <= f(alpha - h * abs(alpha)) + 1e-14
    assert alpha > 0


@pytest.mark.parametrize("k", range(4))
def test_exact_line_search(k):
    problem = _problems_small()[k]
    p = problem.initial_point(2)
    _, g, ctx = problem.cg_grad(p)
    _check_exact_step(problem, p, -g, ctx)


def test_eval_tangent_matches_dense():
    P = Completion((5, 6, 4, 5), 3, oversampling=2, test_size=50, seed=4)
    M = P.manifold
    p = P.initial_point(0)
    _, g, ctx = P.cg_grad(p)
    eta = torch.randn(M.size, dtype=DT, generator=torch.Generator().manual_seed(0))
    vals = P.eval_tangent(p, eta, ctx) / math.sqrt(P.weight)
    dense = M.tangent_to_tt(p, eta).full()[tuple(P.train.indices.t())]
    assert _rel(vals, dense) < 1e-12


@pytest.mark.skipif(not HAS_NN, reason="ttmanifold.nn not available yet")
def test_layer_riemannian_grad_matches_dense_oracle():
    from ttmanifold.experiments.problems import LayerTraining

    P = LayerTraining(hidden=16, rank=3, dtype=DT)
    M = P.manifold
    p = P.initial_point()
    oracle = _dense_oracle_grad(P, p)
    auto = M.riemannian_grad(p, P.loss)
    assert _rel(auto, oracle) < 1e-9
    # the TT -> matrix map is the layer's
    model = P.build_model("manifold")
    assert torch.allclose(P.weight_of(p), model[0].weight_matrix().detach(), atol=1e-12)


# ---------------------------------------------------------------------------------------
# solvers
# ---------------------------------------------------------------------------------------

def test_lr_grid():
    g = lr_grid(7)
    assert len(g) == 7 and abs(g[0] - 1e-3) < 1e-15 and abs(g[-1] - 1.0) < 1e-12
    assert lr_grid(1) == [1.0]
    with pytest.raises(ValueError):
        lr_grid(0)


def _small(kind):
    if kind == "approximation":
        return Approximation.random((5, 6, 6, 5), 5, 3, seed=0)
    return Completion((6, 5, 6, 5), 2, oversampling=8, seed=0)


@pytest.mark.parametrize("kind", ["approximation", "completion"])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_decreases_loss(kind, method):
    if method.startswith("chart") and not HAS_CHART:
        pytest.skip("ttmanifold.chart not available yet")
    problem = _small(kind)
    x0 = problem.initial_point(1)
    h = run(problem, method, x0, iters=12, grid_size=3, tune_iters=3, seed=0)
    assert h.status == "ok" and h.n_iters == 12
    assert h.final_loss < 0.9 * h.loss[0]
    assert len(h.loss) == len(h.time) == len(h.metrics) == 13
    assert h.time == sorted(h.time) and h.time[0] == 0.0
    assert problem.target_metric in h.final_metrics()
    if method == "rcg":
        assert h.lr is None
    elif method == "radam":  # its grid is in units of the distance to the data
        grid = [g * h.info["lr_scale"] for g in lr_grid(3, 1e-2, 10.0)]
        assert h.lr in grid and len(h.info["tune_scores"]) == 3
    else:
        assert h.lr in lr_grid(3) and len(h.info["tune_scores"]) == 3
    if method.startswith("chart"):
        assert h.info["chart_start_rel_err"] < 1e-10  # same start as the manifold methods


@pytest.mark.skipif(not (HAS_NN and HAS_CHART), reason="ttmanifold.nn/chart not available yet")
@pytest.mark.parametrize("method", [m for m in METHODS if m != "rcg"])
def test_layer_methods_decrease_loss(method):
    from ttmanifold.experiments.problems import LayerTraining

    P = LayerTraining(hidden=32, rank=3)
    # tuning over the whole horizon: the chosen lr is the best after the 6 iterations
    # (chart SGD at lr=1 is better after 2 iterations, worse after 6)
    h = run(P, method, iters=6, grid_size=2, tune_iters=6)
    assert h.status == "ok"
    assert h.final_loss < h.loss[0]
    assert 0.0 <= h.final_metrics()["test_acc"] <= 1.0
    with pytest.raises(ValueError, match="quadratic"):
        run(P, "rcg", iters=1)


def test_deterministic_on_cpu():
    problem = _small("completion")
    x0 = problem.initial_point(0)
    for method in ("radam", "rcg") + (("chart_adam",) if HAS_CHART else ()):
        a = run(problem, method, x0, iters=5, lr=0.1, seed=3)
        b = run(problem, method, x0, iters=5, lr=0.1, seed=3)
        assert a.loss == b.loss and a.metrics == b.metrics


def test_completion_recovery_with_cg():
    """|Omega| = 10 dim M, d = 5, n = 10, r = 3: Riemannian CG from the spectral start
    reaches test error < 1e-6 (Steinlechner's RTTC)."""
    P = Completion((10,) * 5, 3, oversampling=10, seed=0)
    assert len(P.train) == 10 * P.manifold.dim
    x0 = P.initial_point(0, kind="spectral")
    t0 = time.perf_counter()
    h = riemannian_cg(P, x0, iters=300, metrics_every=5, stop_metric="test_err", stop_tol=1e-7)
    wall = time.perf_counter() - t0
    assert h.status == "converged", h.final_metrics()
    assert h.final_metrics()["test_err"] < 1e-6
    assert h.reach("test_err", 1e-6)[0] <= 150
    assert wall < 30  # a few seconds normally


def test_cg_options_and_errors():
    problem = _small("approximation")
    x0 = problem.initial_point(0)
    h = riemannian_cg(problem, x0, iters=8, beta="fr", restart_every=3)
    assert h.final_loss < h.loss[0] and h.info["restarts"] >= 2
    with pytest.raises(ValueError, match="beta"):
        riemannian_cg(problem, x0, iters=1, beta="hs")
    with pytest.raises(ValueError, match="unknown method"):
        run(problem, "lbfgs", x0)
    with pytest.raises(ValueError, match="lr"):
        run(problem, "rsgd", x0, lr=-1.0)


def test_run_arguments_give_clear_errors_before_any_step():
    # each of these used to run: an option ignored for a typo, a stop_metric that is never
    # met, a start that is not a point (wrong gradients), or a budget ignored
    problem = _small("completion")
    x0 = problem.initial_point(0)
    M = problem.manifold
    bad = [
        (TypeError, "unexpected options \\['restart_evry'\\]", dict(restart_evry=3)),
        (ValueError, "stop_metric: 'tset_err' is not a metric", dict(stop_metric="tset_err",
                                                                   stop_tol=1e-3)),
        (ValueError, "stop_tol", dict(stop_metric="test_err")),
        (ValueError, "never evaluated", dict(stop_metric="test_err", stop_tol=1e-3,
                                             metrics_every=0)),
        (ValueError, "time_budget", dict(time_budget=float("nan"))),
        (ValueError, "time_budget", dict(time_budget=-1.0)),
        (ValueError, "metrics_every", dict(metrics_every=-1)),
        (ValueError, "iters", dict(iters=True)),
        (ValueError, "x0: .*not left-orthogonal", dict(x0=torch.randn_like(x0))),
        (ValueError, "x0: torch.float32", dict(x0=x0.float())),
        (ValueError, "x0: expected one packed point", dict(x0=x0[None])),
        (TypeError, "x0: expected a packed point", dict(x0=x0.tolist())),
    ]
    for exc, match, kw in bad:
        kw = {"x0": x0, "iters": 3, **kw}
        with pytest.raises(exc, match=match):
            run(problem, "rcg", kw.pop("x0"), measure_memory=False, **kw)
    with pytest.raises(ValueError, match="lr"):
        run(problem, "rsgd", x0, lr=float("inf"))
    # the step-size search: bad candidates or a bad start raise (they scored +inf, and an
    # all-inf search returned its smallest candidate, here -1)
    for grid in ([], [-1.0], [0.1, float("nan")]):
        with pytest.raises(ValueError, match="grid"):
            tune_lr(problem, "rsgd", x0, grid=grid)
    with pytest.raises(ValueError, match="x0"):
        tune_lr(problem, "rsgd", torch.randn_like(x0), grid=[0.1])
    M.check_point(x0)  # (the valid start runs)
    assert run(problem, "rcg", x0, iters=2, measure_memory=False).n_iters == 2


def test_time_budget_and_callback():
    problem = _small("approximation")
    x0 = problem.initial_point(0)
    h = run(problem, "rsgd", x0, iters=10 ** 6, lr=0.5, time_budget=0.05)
    assert h.status == "budget" and h.n_iters < 10 ** 6
    h = run(problem, "rsgd", x0, iters=50, lr=0.5, callback=lambda t, hist: t >= 4)
    assert h.status == "stopped" and h.n_iters == 5
    assert isinstance(h, History) and h.rows()[0]["method"] == "rsgd"


def test_approximation_metrics_and_svd_gap():
    P = Approximation.random((5, 6, 6, 5), 5, 3, seed=0)
    m = P.metrics(P.svd_point)
    assert abs(m["gap"]) < 1e-12 and 0.02 < m["rel_err_svd"] < 0.5
    h = riemannian_cg(P, P.initial_point(0), iters=40)
    assert h.final_metrics()["gap"] < 1e-3  # reaches (or beats) the TT-SVD truncation
    zero = P.target * 0.0  # (a ZeroDivisionError from inside the constructor)
    with pytest.raises(ValueError, match="target: expected a nonzero finite tensor"):
        Approximation(zero, 3)


def test_homotopy_and_perturbed_starts():
    P = Completion((6, 5, 6, 5), 2, oversampling=8, seed=0)
    x = homotopy_point(P, P.initial_point(0), lam0=10.0, iters_per_stage=2, lam_min=1e-2)
    assert P.reg == 0.0 and x.shape == (P.manifold.size,)
    assert P.metrics(x)["train_err"] < P.metrics(P.initial_point(0))["train_err"]
    with pytest.raises(ValueError, match="homotopy_point"):
        P.initial_point(0, kind="homotopy")
    x = P.initial_point(0, kind="perturbed", distance=0.2)
    assert 0.01 < P.metrics(x)["test_err"] < 0.4  # rounding removes part of the noise
    with pytest.raises(ValueError, match="kind"):
        P.initial_point(0, kind="nope")


def test_random_start_of_a_given_core_law():
    # kind="random" with core_dist: a unit-norm random TT of the manifold's ranks whose
    # cores follow that law (uniform [0, 1] cores: every entry of the tensor is positive),
    # drawn from a stream apart from the data's and reproducible from the seed
    pb = Completion((5, 4, 6), 2, core_dist="uniform", oversampling=2, test_size=10, seed=0)
    x = pb.initial_point(1, kind="random", core_dist="uniform")
    full = pb.manifold.to_tt(x).full()
    assert float(full.min()) > 0 and abs(float(full.norm()) - 1) < 1e-12
    assert torch.equal(x, pb.initial_point(1, kind="random", core_dist="uniform"))
    g = pb.manifold.to_tt(pb.initial_point(1, kind="random", core_dist="gaussian")).full()
    assert float(g.min()) < 0 < float(g.max())
    with pytest.raises(ValueError, match="core_dist"):
        pb.initial_point(1, kind="random", core_dist="normal")
    with pytest.raises(TypeError, match="unexpected"):
        pb.initial_point(1, kind="random", distance=0.3)
