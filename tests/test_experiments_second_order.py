"""Riemannian trust region (exact Hessian), Riemannian L-BFGS and the chart line-search
baselines against independent dense float64 references: the best rank-r approximation of
a matrix (Eckart-Young, by a dense SVD written here) and recovery of a completion target;
quadratic local convergence of the trust region on a small completion problem."""
from __future__ import annotations

import math

import pytest
import torch

from ttmanifold.experiments import problems as P
from ttmanifold.experiments import solvers as S

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def eckart_young(A: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(A)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("method", ["rtr", "rlbfgs"])
def test_matrix_approximation_reaches_the_svd_optimum(method):
    """0.5 ||X - A||^2 over rank-2 6 x 7 matrices, A of rank 4 (a nonzero normal residual at
    the optimum, so the trust region needs the curvature term)."""
    pb = P.Approximation.random((6, 7), 4, 2, noise=0.3, seed=3)
    A = pb.target.full()
    best = eckart_young(A, 2)
    h = S.run(pb, method, pb.initial_point(0), iters=12 if method == "rtr" else 200,
              metrics_every=0)
    X = pb.manifold.to_tt(h.x).full()
    assert float((X - best).norm() / best.norm()) < 1e-8
    g = h.info["grad_norms"]
    assert g[-1] < 1e-9 * g[0]


def test_trust_region_converges_quadratically_on_completion():
    pb = P.Completion((5, 5, 5, 5), 2, oversampling=5, seed=2)
    x0 = pb.initial_point(0, kind="perturbed", distance=0.3)
    stop = lambda t, hist: False  # noqa: E731
    h = S.riemannian_trust_region(pb, x0, iters=6, metrics_every=0, callback=stop)
    g = h.info["grad_norms"]
    assert min(g) < 1e-12, g
    # ||g_{k+1}|| <= C ||g_k||^2 on the way down (local quadratic convergence)
    pairs = [(a, b) for a, b in zip(g, g[1:]) if 1e-10 < a < 1e-2]
    assert len(pairs) >= 2, g
    assert all(b <= 50 * a * a for a, b in pairs), g
    assert pb.metrics(pb.manifold.to_tt(h.x))["test_err"] < 1e-10
    assert h.info["rejected"] <= 1


def test_trust_region_model_decrease_matches_dense_newton_step():
    """With a large radius the first step of the trust region at a point near the optimum
    is the Newton step: the next gradient is much smaller than the first."""
    pb = P.Approximation.random((5, 6), 3, 2, noise=0.2, seed=4)
    best = eckart_young(pb.target.full(), 2)
    p0 = pb.manifold.pack_point(P.TT.from_dense(best + 1e-3 * torch.randn(5, 6, dtype=F64,
                                generator=torch.Generator().manual_seed(1)), ranks=2))
    h = S.riemannian_trust_region(pb, p0, iters=2, metrics_every=0, max_radius=10.0,
                                  radius=10.0)
    g = h.info["grad_norms"]
    assert g[1] < 1e-3 * g[0] and g[1] < 30 * g[0] ** 2, g


def test_lbfgs_and_chart_baselines_decrease_monotonically_and_recover():
    pb = P.Completion((5, 5, 5, 5), 2, oversampling=5, seed=1)
    x0 = pb.initial_point(0, kind="perturbed", distance=0.3)
    h = S.riemannian_lbfgs(pb, x0, iters=80, metrics_every=0)
    # Armijo: never an increase beyond rounding of the loss
    assert all(b <= a * (1 + 1e-12) + 1e-28 for a, b in zip(h.loss, h.loss[1:]))
    assert pb.metrics(pb.manifold.to_tt(h.x))["test_err"] < 1e-8
    for method in ("chart_gd_armijo", "chart_lbfgs"):
        h = S.run(pb, method, x0, iters=15, metrics_every=0)
        assert h.lr is None and h.status == "ok"
        assert h.loss[-1] < 0.5 * h.loss[0]
        if method == "chart_gd_armijo":
            assert all(b <= a * (1 + 1e-12) for a, b in zip(h.loss, h.loss[1:]))


def test_line_search_methods_reject_model_problems_and_need_no_lr():
    pb = P.LayerTraining(hidden=16, rank=2, seed=0)
    for method in S.LINE_SEARCH_METHODS:
        with pytest.raises(ValueError, match="tensor problem"):
            S.run(pb, method, iters=1)
    with pytest.raises(ValueError, match="method"):
        S.run(pb, "newton", iters=1)
    assert set(S.ALL_METHODS) == (set(S.METHODS) | set(S.LINE_SEARCH_METHODS)
                                  | set(S.COMPLETION_METHODS))
    assert math.isfinite(len(S.ALL_METHODS))
