"""``Completion.from_data``: completion on the user's indices and values (optional test set
or held-out fraction, per-sample weights, int rank requests clipped), and the MSE / RMSE
metrics, all against dense float64 references."""
import math
import warnings

import pytest
import torch

from ttmanifold import TT
from ttmanifold.experiments.problems import Completion, sample_distinct_indices
from ttmanifold.experiments.solvers import riemannian_cg

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _data(shape=(4, 5, 3, 4), n_train=120, n_test=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(shape, dtype=DT, generator=g)  # full rank: completion data, any tensor
    idx = sample_distinct_indices(shape, n_train + n_test, generator=seed)
    vals = A[tuple(idx.t())]
    return A, idx[:n_train], vals[:n_train], idx[n_train:], vals[n_train:]


def _dense_reference(P, p, idx, vals, weights=None):
    """Loss, MSE and the Riemannian gradient of the weighted loss, densely in float64."""
    M = P.manifold
    X = M.to_tt(p).full().detach().requires_grad_(True)
    total = math.prod(M.shape)
    w = total / idx.shape[0]
    sw = torch.ones(idx.shape[0], dtype=DT) if weights is None else weights / weights.mean()
    r = X[tuple(idx.t())] - vals
    loss = 0.5 * w * (sw * r * r).sum()
    loss.backward()
    return float(loss.detach()), M.project(p, X.grad), r.detach()


@pytest.mark.parametrize("weighted", [False, True])
def test_loss_metrics_and_gradient_match_dense_reference(weighted):
    _, idx, vals, tidx, tvals = _data()
    weights = None
    if weighted:
        weights = 0.5 + torch.rand(idx.shape[0], dtype=DT,
                                   generator=torch.Generator().manual_seed(3))
    P = Completion.from_data(idx, vals, ranks=(2, 3, 2), test=(tidx, tvals), weights=weights)
    M = P.manifold
    assert M.shape == (4, 5, 3, 4) and M.ranks == (1, 2, 3, 2, 1)  # shape = max + 1
    assert P.target is None and P.target_metric == "test_err"
    p = P.initial_point(1)
    loss_ref, grad_ref, r = _dense_reference(P, p, idx, vals, weights)
    assert abs(float(P.loss(M.to_tt(p))) - loss_ref) <= 1e-12 * loss_ref
    loss, g, ctx = P.cg_grad(p)  # the sparse path Riemannian CG uses
    assert abs(float(loss) - loss_ref) <= 1e-12 * loss_ref
    assert _rel(g, grad_ref) < 1e-10
    assert _rel(M.riemannian_grad(p, P.loss), grad_ref) < 1e-10  # the autodiff path
    # exact line search: the minimizer of the dense loss along the tangent line
    X = M.to_tt(p).full()
    E = M.tangent_to_tt(p, -g).full()
    alpha = float(P.exact_step(p, -g, ctx))
    f = lambda t: float(P.dense_loss(X + t * E))  # noqa: E731
    assert alpha > 0 and f(alpha) <= min(f(1.01 * alpha), f(0.99 * alpha)) + 1e-14
    # metrics: relative errors, and the unweighted MSE / RMSE on both sets
    m = P.metrics(p)
    rt = X[tuple(tidx.t())] - tvals
    ref = {"train_err": float(r.norm() / vals.norm()), "test_err": float(rt.norm() / tvals.norm()),
           "train_mse": float((r * r).mean()), "test_mse": float((rt * rt).mean())}
    ref["train_rmse"], ref["test_rmse"] = math.sqrt(ref["train_mse"]), math.sqrt(ref["test_mse"])
    assert list(m) == ["train_err", "test_err", "train_mse", "train_rmse", "test_mse",
                       "test_rmse"]
    for k, v in ref.items():
        assert abs(m[k] - v) <= 1e-12 * v, k


def test_generated_problem_reports_mse_and_rmse():
    P = Completion((5, 6, 4, 5), 2, oversampling=5, test_size=50, seed=1)
    p = P.initial_point(0)
    X = P.manifold.to_tt(p).full()
    full_target = P.target.full()
    for name, iset in (("train", P.train), ("test", P.test)):
        r = (X - full_target)[tuple(iset.indices.t())]
        assert abs(P.metrics(p)[f"{name}_mse"] - float((r * r).mean())) < 1e-14
        assert abs(P.metrics(p)[f"{name}_rmse"] - float(r.pow(2).mean().sqrt())) < 1e-14


def test_held_out_fraction_is_a_seeded_disjoint_split():
    _, idx, vals, _, _ = _data(n_train=100, n_test=0)
    P = Completion.from_data(idx, vals, (4, 5, 3, 4), 2, test=0.25, seed=7)
    assert len(P.train) == 75 and len(P.test) == 25
    both = torch.cat([P.train.indices, P.test.indices])
    assert torch.unique(both, dim=0).shape[0] == 100
    # every (index, value) pair comes from the data
    lookup = {tuple(i.tolist()): float(v) for i, v in zip(idx, vals)}
    for iset, a in ((P.train, P.a_train), (P.test, P.a_test)):
        assert all(lookup[tuple(i.tolist())] == float(v) for i, v in zip(iset.indices, a))
    Q = Completion.from_data(idx, vals, (4, 5, 3, 4), 2, test=0.25, seed=7)
    assert torch.equal(P.test.indices, Q.test.indices)


def test_without_test_set_the_target_is_train_err():
    _, idx, vals, _, _ = _data()
    P = Completion.from_data(idx, vals, ranks=2)
    assert P.test is None and P.target_metric == "train_err"
    assert set(P.metrics(P.initial_point(0))) == {"train_err", "train_mse", "train_rmse"}
    assert "|Gamma|=0" in P.describe() and "cores=data" in P.describe()
    # an empty test set is refused (it would report test_err NaN and test_mse 0)
    with pytest.raises(ValueError, match=r"test\[0\] \(indices\): no test samples"):
        Completion.from_data(idx, vals, ranks=2, test=(idx[:0], vals[:0]))
    # generated problems: test_size=0 means no test set; a negative size is refused (it
    # used to drop training samples silently)
    G = Completion((4, 4, 4), 2, oversampling=2, test_size=0, seed=0)
    assert G.test is None and G.target_metric == "train_err"
    assert set(G.metrics(G.initial_point(0))) == {"train_err", "train_mse", "train_rmse"}
    with pytest.raises(ValueError, match="test_size"):
        Completion((4, 4, 4), 2, oversampling=2, test_size=-3)


def test_int_rank_request_is_clipped_with_a_warning_and_tuples_are_exact():
    # t3f's tutorial shape: rank 5 exceeds the boundary mode size 3
    shape = (3, 4, 4, 5, 7, 5)
    idx = sample_distinct_indices(shape, 500, generator=0)
    vals = torch.randn(500, dtype=DT, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning):
        P = Completion.from_data(idx, vals, shape, 5)
    assert P.manifold.ranks == (1, 3, 5, 5, 5, 5, 1)
    with pytest.raises(ValueError):
        Completion.from_data(idx, vals, shape, (5, 5, 5, 5, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Completion.from_data(idx, vals, shape, (3, 5, 5, 5, 5)).manifold.ranks == \
            (1, 3, 5, 5, 5, 5, 1)


def test_bad_data_gives_clear_errors():
    _, idx, vals, _, _ = _data()
    with pytest.raises(ValueError, match="repeated"):
        Completion.from_data(torch.cat([idx, idx[:1]]), torch.cat([vals, vals[:1]]), ranks=2)
    with pytest.raises(ValueError, match="out of range"):
        Completion.from_data(idx, vals, (4, 5, 3, 3), ranks=2)
    with pytest.raises(ValueError, match="negative"):
        Completion.from_data(idx - 1, vals, (4, 5, 3, 4), ranks=2)
    bad = vals.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="values: contains NaN"):
        Completion.from_data(idx, bad, ranks=2)
    with pytest.raises(ValueError, match="values: expected shape"):
        Completion.from_data(idx, vals[:-1], ranks=2)
    with pytest.raises(TypeError, match="indices: expected integer"):
        Completion.from_data(idx.to(DT), vals, ranks=2)
    with pytest.raises(ValueError, match="order"):
        Completion.from_data(idx, vals, (4, 5, 3, 4, 2), ranks=2)
    with pytest.raises(ValueError, match="weights: expected positive"):
        Completion.from_data(idx, vals, ranks=2, weights=torch.zeros(len(vals)))
    with pytest.raises(ValueError, match="fraction"):
        Completion.from_data(idx, vals, ranks=2, test=1.5)
    with pytest.raises(TypeError, match="ranks"):
        Completion.from_data(idx, vals)
    P = Completion.from_data(idx, vals, ranks=2)
    with pytest.raises(ValueError, match="perturbed"):
        P.initial_point(0, kind="perturbed")


def test_a_test_set_that_overlaps_the_training_set_is_named():
    """A hand-given test set that repeats training samples measures the fit, not
    generalization: one warning with the count (it passed silently)."""
    _, idx, vals, _, _ = _data()
    test = (torch.cat([idx[:2], idx[-3:]]), torch.cat([vals[:2], vals[-3:]]))
    with pytest.warns(UserWarning, match=r"test: 2 of the 5 test samples are also training"):
        Completion.from_data(idx[:-3], vals[:-3], (4, 5, 3, 4), ranks=2, test=test)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # disjoint: no warning
        Completion.from_data(idx[:-3], vals[:-3], (4, 5, 3, 4), ranks=2,
                             test=(idx[-3:], vals[-3:]))


def test_recovers_a_low_rank_tensor_from_its_entries():
    """The user's workflow: entries of an (unknown) rank-2 TT as numpy arrays, 40 % observed,
    a held-out fraction; spectral start + Riemannian CG recover it."""
    shape = (6, 5, 6, 5)
    A = TT.random(shape, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    idx = sample_distinct_indices(shape, int(0.4 * math.prod(shape)), generator=1)
    vals = A.gather(idx)
    P = Completion.from_data(idx.numpy(), vals.numpy(), shape, 2, test=0.2, seed=0)
    h = riemannian_cg(P, P.initial_point(0, kind="spectral"), iters=200, stop_metric="test_err",
                      stop_tol=1e-10)
    m = h.final_metrics()
    assert m["test_err"] < 1e-9 and m["test_rmse"] < 1e-9 * float(vals.pow(2).mean().sqrt())
    assert h.status == "converged"
    # a stop metric met by the last iterate is convergence too (it was reported "ok")
    last = riemannian_cg(P, h.x, iters=0, stop_metric="test_err", stop_tol=1e-8)
    assert last.status == "converged" and len(last.iters) == 1
    full = P.manifold.to_tt(h.x).full()
    assert _rel(full, A.full()) < 1e-8  # the whole tensor, not only the samples
