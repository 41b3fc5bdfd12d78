"""Riemannian trust region (exact Hessian), Riemannian L-BFGS and the chart line-search
baselines against independent dense float64 references: the best rank-r approximation of
a matrix (Eckart-Young, by a dense SVD written here) and recovery of a completion target;
quadratic local convergence of the trust region on a small completion problem."""
from __future__ import annotations

import math

import pytest
import torch

from ttmanifold import inner
from ttmanifold.experiments import problems as P
from ttmanifold.experiments import solvers as S

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


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


def _far_noisy_completion(seed=0):
    """t3f's tutorial setting: shape (3, 4, 4, 5, 7, 5), ranks (3, 5, 5, 5, 5), entries of
    unit mean square (norm about 92, far from a unit-norm start), 25 % observed with noise
    1e-2; the rest is the test set."""
    shape = (3, 4, 4, 5, 7, 5)
    gen = torch.Generator().manual_seed(seed)
    target = P.random_tt(shape, [1, 3, 5, 5, 5, 5, 1], generator=gen)
    total = math.prod(shape)
    target = target * math.sqrt(total)
    perm = torch.randperm(total, generator=gen)
    n_obs = total // 4
    multi = torch.stack(torch.unravel_index(perm, shape), 1)
    vals = target.full().reshape(-1)[perm]
    vals = vals + 1e-2 * torch.randn(total, generator=gen, dtype=F64)
    pb = P.Completion.from_data(multi[:n_obs], vals[:n_obs], shape, (3, 5, 5, 5, 5),
                                test=(multi[n_obs:], vals[n_obs:]))
    return pb, pb.initial_point(seed)


def test_trust_region_backtracks_instead_of_rejecting_far_from_the_data():
    # from a unit-norm start two orders of magnitude from the data, rejected steps cost
    # whole outer iterations (18 to test MSE 1.3e-4); backtracking along a rejected step
    # keeps the iteration (14)
    pb, x0 = _far_noisy_completion()
    kw = dict(iters=30, stop_metric="test_mse", stop_tol=1.3e-4, measure_memory=False)
    h = S.riemannian_trust_region(pb, x0, **kw)
    old = S.riemannian_trust_region(pb, x0, max_backtracks=0, **kw)
    it, it_old = h.reach("test_mse", 1.3e-4)[0], old.reach("test_mse", 1.3e-4)[0]
    assert it <= 15 and it < it_old, (it, it_old)
    assert h.info["backtracked"] >= 1 and h.info["rejected"] < old.info["rejected"]
    # both reach the same minimizer's neighbourhood
    assert h.final_metrics()["test_mse"] < 1.3e-4 and old.final_metrics()["test_mse"] < 1.3e-4


def test_riemannian_adam_grid_is_in_units_of_the_distance_to_the_data():
    pb, x0 = _far_noisy_completion()
    kw = dict(iters=150, stop_metric="test_mse", stop_tol=1.3e-4, measure_memory=False,
              metrics_every=5)
    h = S.run(pb, "radam", x0, **kw)
    f0 = float(pb.loss(pb.manifold.to_tt(x0)))
    assert h.info["lr_scale"] == pytest.approx(math.sqrt(2 * f0 / pb.manifold.dim))
    assert max(h.info["tune_scores"]) == pytest.approx(10 * h.info["lr_scale"])
    r = h.reach("test_mse", 1.3e-4)
    assert r is not None and r[0] <= 150, r
    # the unit grid (at most lr 1) is far slower from this start (about 560 steps)
    unit = S.run(pb, "radam", x0, lr_grid_values=S.lr_grid(7), **kw)
    assert unit.reach("test_mse", 1.3e-4) is None


def test_lbfgs_pair_is_the_step_taken_when_every_backtrack_fails():
    # c1 close to 1 fails the Armijo test at t = 1 on this non-quadratic problem, and one
    # trial allowed: the point moves by the full step, and so must the stored pair's s
    pb = P.Completion((5, 5, 5, 5), 2, oversampling=5, seed=1)
    x0 = pb.initial_point(0, kind="perturbed", distance=0.3)
    st = S._LBFGSStepper(pb, x0, max_backtracks=1, c1=0.999)
    M = pb.manifold
    st.step()
    assert st.info["backtracks"] == 1  # the only trial failed
    g0 = M.riemannian_grad(x0, pb.loss).detach()
    eta = -g0 * (min(1.0, float(g0.norm())) / float(g0.norm()))  # the first direction
    s = st.pairs[-1][0] if st.pairs else None
    assert s is not None
    expected = M.transp(x0, st.p, eta)
    assert abs(float(s.norm()) / float(expected.norm()) - 1.0) < 1e-10


def test_trust_region_at_a_critical_point_stays_there_without_nan():
    # a loss whose Riemannian gradient is exactly zero everywhere: the inner CG must not
    # divide 0 by 0 (the boundary step of a zero direction), and no step is taken
    class Flat(P.Approximation):
        def loss(self, x):
            return 0.0 * inner(x, x)

    pb = Flat.random((4, 4, 4), 4, 2, seed=0)
    x0 = pb.initial_point(0)
    h = S.riemannian_trust_region(pb, x0, iters=2, measure_memory=False)
    assert h.status == "ok" and h.n_iters == 2 and h.loss == [0.0, 0.0, 0.0]
    assert h.info["hess_products"] == 0
    M = pb.manifold
    assert float((M.to_tt(h.x) - M.to_tt(x0)).norm()) < 1e-12
    e, he = S.truncated_cg(torch.zeros(5, dtype=F64), None, 1.0, 10, 1.0, 0.1,
                           {"hess_products": 0, "inner_iters": 0})
    assert not e.any() and not he.any()


def test_chart_armijo_at_a_critical_point_does_not_grow_its_step_to_nan():
    # at a zero gradient every trial passed the Armijo test and the next trial step was
    # doubled: after ~1000 iterations it was inf, and the point inf * 0 = NaN ("diverged")
    class Flat(P.Approximation):
        def loss(self, x):
            return 0.0 * inner(x, x)

    pb = Flat.random((4, 4, 4), 4, 2, seed=0)
    x0 = pb.initial_point(0)
    st = S._ChartLineSearchStepper(pb, "chart_gd_armijo", x0, None)
    theta0 = st.theta.detach().clone()
    st.t = 2.0 ** 1023  # where ~1000 iterations at the critical point had taken it
    for _ in range(3):
        assert float(st.step()) == 0.0
    assert st.t == 2.0 ** 1023 and torch.equal(st.theta.detach(), theta0)
    h = S.run(pb, "chart_gd_armijo", x0, iters=3, metrics_every=0, measure_memory=False)
    assert h.status == "ok" and h.loss == [0.0] * 4


@pytest.mark.parametrize("curv", [-1.0, 1e-3])
def test_truncated_cg_boundary_step_at_a_huge_scale_is_finite(curv):
    # ||delta||^2 radius^2 = 1e398 overflowed: tau = inf and the step NaN (the trust region
    # on a target of norm 1e100 ended "diverged" at its first iteration)
    g = torch.tensor([3.0, -4.0, 0.0, 12.0], dtype=F64) * 1e100
    radius = 1e99
    info = {"hess_products": 0, "inner_iters": 0}
    e, he = S.truncated_cg(g, lambda v: curv * v, radius, 5, 1.0, 0.1, info)
    # negative or tiny curvature: the steepest-descent direction cut at the boundary
    torch.testing.assert_close(e, -radius * g / g.norm(), rtol=1e-14, atol=0)
    torch.testing.assert_close(he, curv * e, rtol=1e-14, atol=0)
    assert info["hess_products"] == 1


@pytest.mark.parametrize("curv", [-1.0, 1.0])
def test_truncated_cg_takes_a_radius_past_the_square_overflow(curv):
    # radius ** 2 raised OverflowError past radius 1.3e154 (e.g. radius=1e200 passed to
    # mean "no trust region"); its product is inf, and the boundary step must stay finite
    g = torch.tensor([3.0, -4.0, 0.0, 12.0], dtype=F64)
    info = {"hess_products": 0, "inner_iters": 0}
    e, he = S.truncated_cg(g, lambda v: curv * v, 1e200, 5, 1.0, 0.1, info)
    # negative curvature: steepest descent to the boundary; positive: the Newton step
    expected = -1e200 * g / g.norm() if curv < 0 else -g
    torch.testing.assert_close(e, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(he, curv * e, rtol=1e-14, atol=0)
    pb = P.Approximation.random((4, 4, 4), 4, 2, seed=0)
    h = S.riemannian_trust_region(pb, pb.initial_point(0), iters=20, radius=1e200,
                                  max_radius=1e200, measure_memory=False)
    assert h.status == "ok" and abs(h.final_metrics()["gap"]) < 1e-4


@pytest.mark.parametrize("seed", [0, 2])
def test_lbfgs_from_a_unit_start_reaches_the_optimum_of_large_data(seed):
    # a target of norm 1e6: the curvature pairs are skipped near the unit start and the
    # step without memory had length min(1, ||g||) (seed 2: rel. error 0.99 after 20
    # steps); it is -g capped at the trust region's initial radius (CG's first step)
    pb0 = P.Approximation.random((6, 7), 4, 2, noise=0.2, seed=seed)
    pb = P.Approximation(pb0.target * 1e6, 2)
    A = pb.target.full()
    best = eckart_young(A, 2)
    x0 = pb.initial_point(0)
    h = S.riemannian_lbfgs(pb, x0, iters=20, metrics_every=0, measure_memory=False)
    X = pb.manifold.to_tt(h.x).full()
    assert float((X - best).norm() / A.norm()) < 1e-8
    # the cap: max(1, scale / 4), scale the larger of ||X_0|| and sqrt(2 f(X_0))
    f0 = 0.5 * float((pb.manifold.to_tt(x0).full() - A).norm()) ** 2
    cap = S.lbfgs_first_length(pb.manifold, x0, f0)
    assert cap == pytest.approx(max(1.0, math.sqrt(2 * f0) / 4), rel=1e-12)
    g = torch.tensor([3.0, 4.0], dtype=F64)
    torch.testing.assert_close(S.lbfgs_direction([], g, 2.0), -0.4 * g, rtol=1e-15, atol=0)
    torch.testing.assert_close(S.lbfgs_direction([], g), -0.2 * g, rtol=1e-15, atol=0)


def test_lbfgs_keeps_a_curvature_pair_of_large_vectors():
    # the cautious test multiplied ||s||^2 ||y||^2 (1e320 here: inf) and skipped the pair
    pb = P.Approximation.random((3, 4, 3), 3, 2, seed=0)
    M, p = pb.manifold, pb.initial_point(0)
    gen = torch.Generator().manual_seed(0)
    s = M.proju(p, torch.randn(M.size, dtype=F64, generator=gen)) * 1e80
    g = M.proju(p, torch.randn(M.size, dtype=F64, generator=gen)) * 1e80
    info = {"skipped_updates": 0}
    pairs = S.lbfgs_update(M, p, p, [], s, g, g + 2 * s, 10, info)
    assert info["skipped_updates"] == 0 and len(pairs) == 1
    s_, y_, rho = pairs[0]
    assert rho == pytest.approx(1 / float(s_ @ y_)) and math.isfinite(1 / rho)


def test_one_process_solvers_refuse_the_options_their_data_parallel_versions_refuse():
    # (these ran before: a negative radius, no inner iterations, an empty L-BFGS memory,
    # an Armijo constant above 1, a negative ridge or restart tolerance)
    pb = P.Completion((5, 5, 5, 5), 2, oversampling=3, seed=0)
    x0 = pb.initial_point(0)
    kw = dict(iters=1, measure_memory=False)
    for match, call in [
        ("radius", lambda: S.riemannian_trust_region(pb, x0, radius=-1.0, **kw)),
        ("max_radius", lambda: S.riemannian_trust_region(pb, x0, max_radius=0.0, **kw)),
        ("max_inner", lambda: S.riemannian_trust_region(pb, x0, max_inner=0, **kw)),
        ("max_backtracks", lambda: S.riemannian_trust_region(pb, x0, max_backtracks=-1,
                                                             **kw)),
        ("theta", lambda: S.riemannian_trust_region(pb, x0, theta=float("nan"), **kw)),
        ("kappa", lambda: S.riemannian_trust_region(pb, x0, kappa=0.0, **kw)),
        ("rho_accept", lambda: S.run(pb, "rtr", x0, rtr_kwargs=dict(rho_accept=1.0), **kw)),
        ("memory", lambda: S.riemannian_lbfgs(pb, x0, memory=0, **kw)),
        ("c1", lambda: S.riemannian_lbfgs(pb, x0, c1=2.0, **kw)),
        ("ridge", lambda: S.als_completion(pb, x0, ridge=-1.0, **kw)),
        ("restart_tol", lambda: S.riemannian_cg(pb, x0, restart_tol=-0.1, **kw)),
        ("restart_every", lambda: S.riemannian_cg(pb, x0, restart_every=0, **kw)),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
