"""Edge inputs of the single-point API (points, tangent vectors, the TT norm): non-finite
values, extreme scales, zero TTs, rank-deficient points, mixed dtypes. Each test pins a
bug found with an independent dense float64 reference or a bad input, and fails on the
code before its fix."""
from __future__ import annotations

import pytest
import torch

from ttmanifold import TT, FixedTTRank, IndexSet, inner

F64 = torch.float64


def test_project_sampled_rejects_non_finite_values():
    """project_sampled returned NaN deltas for a NaN value (project of a sparse Z with the
    same entries raised)."""
    M = FixedTTRank((3, 4, 5), (2, 3))
    p = M.random(dtype=F64, generator=torch.Generator().manual_seed(0))
    iset = IndexSet(torch.tensor([[0, 1, 2], [2, 3, 4]]), M.shape)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="values: contains NaN or Inf"):
            M.project_sampled(p, iset, torch.tensor([1.0, bad], dtype=F64))
    assert torch.isfinite(M.project_sampled(p, iset, torch.tensor([1.0, 2.0], dtype=F64))).all()


def test_hvp_and_hess_reject_non_finite_point_or_vector_by_name():
    """riemannian_hvp returned NaN for a NaN point or vector; riemannian_hess of a NaN
    point blamed ``u`` (the NaN reached a proju of an inner vector)."""
    M = FixedTTRank((3, 4, 5), (2, 3))
    p = M.random(dtype=F64, generator=torch.Generator().manual_seed(0))
    u = M.proju(p, torch.randn(M.size, dtype=F64, generator=torch.Generator().manual_seed(1)))

    def f(T):
        return 0.5 * T.norm() ** 2

    for hess in (M.riemannian_hvp, M.riemannian_hess):
        bad = p.clone()
        bad[2] = float("nan")
        with pytest.raises(RuntimeError, match="^p: contains NaN or Inf"):
            hess(bad, f, u)
        bad = u.clone()
        bad[-1] = float("inf")
        with pytest.raises(RuntimeError, match="^u: contains NaN or Inf"):
            hess(p, f, bad)
        assert torch.allclose(hess(p, f, u), u, atol=1e-12)  # Hess of ||X||^2 / 2 is I


def test_transp_dist_inner_check_the_second_argument_by_name():
    """transp with a point y of another dtype (or device) failed with a torch dtype error
    from deep inside the projection sweep; dist named ``add``; component_inner of a wrong
    size failed inside torch; inner of mixed dtypes promoted silently."""
    M = FixedTTRank((3, 4, 5), (2, 3))
    g = torch.Generator().manual_seed(0)
    p, q = M.random(dtype=F64, generator=g), M.random(dtype=F64, generator=g)
    u = M.proju(p, torch.randn(M.size, dtype=F64, generator=g))
    with pytest.raises(TypeError, match="^y: dtype torch.float32 differs"):
        M.transp(p, q.float(), u)
    with pytest.raises(ValueError, match="^y: device meta differs"):
        M.transp(p, q.to("meta"), u)
    with pytest.raises(TypeError, match="^y: dtype torch.float32 differs"):
        M.dist(p, q.float())
    with pytest.raises(ValueError, match="^u, v: expected packed tangent vectors of size"):
        M.component_inner(p, u[:-1], u)
    with pytest.raises(TypeError, match="^u, v: torch.float64 on cpu and torch.float32"):
        M.inner(p, u, u.float())
    w = M.component_inner(p, u, u.expand(2, -1))  # broadcasts like inner
    assert w.shape == (2, M.size) and torch.allclose(w[1, 0], M.inner(p, u))


@pytest.mark.parametrize("dtype,scale", [(F64, 1e200), (F64, 1e-200),
                                         (torch.float32, 1e30), (torch.float32, 1e-30)])
def test_norms_under_autograd_at_extreme_scales(dtype, scale):
    """Where ``<X, X>`` over- or underflows: ``TT.norm()`` under autograd was NaN in value
    and gradient (its derivatives came from the unscaled Gram sweep). Reference: the homogeneity
    of the norm (``X`` with its first core scaled by ``s`` has norm ``s ||X||`` and core
    gradients ``(g_1, s g_2, s g_3)``). (The tangent TT and ``M.norm``: the next test.)"""
    g = torch.Generator().manual_seed(3)
    x0 = TT.random((3, 4, 5), 2, dtype=F64, generator=g)
    ref = TT([c.clone().requires_grad_() for c in x0.cores])
    n_ref = ref.norm()
    n_ref.backward()
    x = TT([c.to(dtype).clone().requires_grad_() for c in (x0 * scale).cores])
    n = x.norm()
    n.backward()
    tol = 1e-12 if dtype == F64 else 1e-5
    assert abs(float(n.detach()) / scale / float(n_ref.detach()) - 1) < tol
    for k, (c, r) in enumerate(zip(x.cores, ref.cores)):
        got = c.grad.double() / (1 if k == 0 else scale)
        assert float((got - r.grad).norm() / r.grad.norm()) < tol, k


@pytest.mark.parametrize("dtype,scale", [(F64, 1e200), (F64, 1e-200),
                                         (torch.float32, 1e30), (torch.float32, 1e-30)])
def test_tangent_tt_and_riemannian_norms_at_extreme_scales(dtype, scale):
    """The norm of a point's tangent TT (``unpack_tensor``, a gauged TangentTT: the norm
    of its deltas) and ``M.norm`` squared without scaling: inf or 0 (with a zero gradient)
    where ``<u, u>`` over- or underflows."""
    x0 = TT.random((3, 4, 5), 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    n_ref = x0.norm()
    tol = 1e-12 if dtype == F64 else 1e-5
    M = FixedTTRank((3, 4, 5), 2)
    p = M.pack_point(x0).to(dtype)
    p[-M.core_sizes[-1]:] *= scale
    pp = p.clone().requires_grad_()
    t = M.unpack_tensor(pp).norm()
    t.backward()
    assert abs(float(t.detach()) / scale / float(n_ref.detach()) - 1) < tol
    # d||X|| is X / ||X||: as a tangent vector at X, the point over its norm
    want = M.point_as_tangent(p).double() / float(t.detach())
    assert float((pp.grad.double() - want).norm()) < tol
    for u in (p, p.expand(2, -1)):
        assert torch.allclose(M.norm(p, M.point_as_tangent(u)).double() / scale,
                              n_ref.detach(), rtol=tol, atol=0)


def test_trust_region_zero_gradient():
    """truncated_cg divided by ||delta||^2 = 0 for a zero gradient (ZeroDivisionError):
    the trust region on a completion problem of order 1, where one step fits the samples
    exactly."""
    from ttmanifold.experiments import problems, solvers

    info = {"hess_products": 0, "inner_iters": 0}
    e, he = solvers.truncated_cg(torch.zeros(4, dtype=F64), lambda v: 2 * v, 1.0, 5, 1.0, 0.1,
                                 info)
    assert not e.any() and not he.any()
    P = problems.Completion((30,), 1, oversampling=0.4, seed=1)
    h = solvers.riemannian_trust_region(P, iters=4)
    assert h.status == "ok" and h.metrics[-1]["train_err"] < 1e-12


def test_hess_at_rank_deficient_point_names_p():
    """At a packed tensor whose TT-rank is below the manifold's (left-orthogonal cores, a
    zero row in the last core), riemannian_hess failed inside torch.linalg.solve
    ("the input matrix is singular"); now a ValueError naming p and the bond."""
    M = FixedTTRank((4, 6), 4)
    p = M.random(dtype=F64, generator=torch.Generator().manual_seed(0))
    M.split(p)[1][0] = 0.0  # X = U_1 U_2 has rank 3
    with pytest.raises(ValueError, match="TT-rank at bond 1 is below"):
        M.check_point(p)
    u = M.proju(p, torch.randn(M.size, dtype=F64, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="^p: the interface factor at bond 1 is singular"):
        M.riemannian_hess(p, lambda T: 0.5 * T.norm() ** 2, u)


def test_transp_gauge_tangent_to_tt_reject_non_finite_inputs():
    """transp, gauge and tangent_to_tt returned NaN for a NaN vector or point."""
    M = FixedTTRank((3, 4, 5), (2, 3))
    g = torch.Generator().manual_seed(0)
    p, q = M.random(dtype=F64, generator=g), M.random(dtype=F64, generator=g)
    u = M.proju(p, torch.randn(M.size, dtype=F64, generator=g))
    bad_u, bad_p = u.clone(), p.clone()
    bad_u[4], bad_p[1] = float("nan"), float("inf")
    with pytest.raises(RuntimeError, match="^v: contains NaN or Inf"):
        M.transp(p, q, bad_u)
    with pytest.raises(RuntimeError, match=r"^v: contains NaN or Inf \(or the points x, y"):
        M.transp(p, bad_p, u)
    with pytest.raises(RuntimeError, match=r"^v: contains NaN or Inf \(or the points x, y"):
        M.transp(bad_p, q, u)
    for fn in (M.gauge, M.tangent_to_tt):
        with pytest.raises(RuntimeError, match="^u: contains NaN or Inf"):
            fn(p, bad_u)
        with pytest.raises(RuntimeError, match="^p: contains NaN or Inf"):
            fn(bad_p, u)
    assert torch.allclose(M.tangent_to_tt(p, M.gauge(p, u)).full(), M.tangent_to_tt(p, u).full())


def test_chart_rejects_non_finite_theta():
    """STTPChart(theta) with a NaN or Inf coordinate gave a TT of NaNs silently."""
    from ttmanifold import STTPChart

    chart = STTPChart(FixedTTRank((3, 4, 5), (2, 3)))
    theta = chart.random_theta(dtype=F64, generator=torch.Generator().manual_seed(0))
    for bad in (float("nan"), float("inf")):
        t = theta.clone()
        t[1] = bad
        with pytest.raises(RuntimeError, match="^theta: contains NaN or Inf"):
            chart(t)
    assert torch.allclose(chart(chart.inverse(chart(theta))).full(), chart(theta).full())


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_norm_under_autograd_of_an_exactly_zero_tt(dtype):
    """``x - x`` and a TT of zero cores: the norm under autograd was NaN (0 / 0 in its
    derivative surrogate); now 0, as without autograd, with a zero (finite) gradient. Also
    for a batch, and with a nonzero point in the batch unaffected."""
    for shape in ((1, 1, 1), (2, 3, 4), (4,)):
        x = TT.random(shape, min(2, shape[0]), dtype=dtype,
                      generator=torch.Generator().manual_seed(0))
        xs = TT([c.clone().requires_grad_() for c in x.cores])
        for y in (xs - x, TT([0 * c for c in xs.cores])):
            n = y.norm()
            grads = torch.autograd.grad(n, xs.cores)
            assert float(n.detach()) < 1e-6 * float(x.norm()), shape
            assert all(torch.isfinite(g).all() for g in grads), shape
    xb = TT.random((3, 4, 5), 2, dtype=dtype, batch=(2,), generator=torch.Generator().manual_seed(1))
    cores = [torch.stack([c[0], 0 * c[1]]).requires_grad_() for c in xb.cores]
    n = TT(cores).norm()
    (g0,) = torch.autograd.grad(n.sum(), cores[0])
    assert float(n[1].detach()) == 0.0 and torch.isfinite(g0).all()
    ref = TT([c[0].detach().clone().requires_grad_() for c in cores])
    nr = ref.norm()
    (gr,) = torch.autograd.grad(nr, ref.cores[0])
    assert torch.allclose(n[0], nr) and torch.allclose(g0[0], gr, atol=1e-6)


def test_scaled_norm_path_second_derivatives_match_plain():
    """The scaled Gram sweep (taken by batches and off the CPU) gives the derivatives of
    every order of the plain one: first and second derivatives of a batch of two TTs
    against each TT alone (the CPU's plain sweep)."""
    g = torch.Generator().manual_seed(5)
    xb = TT.random((3, 4, 2, 3), 3, dtype=F64, batch=(2,), generator=g)
    cores = [(c * s).requires_grad_() for c, s in zip(xb.cores, (1e3, 1.0, 1e-2, 1.0))]
    v = [torch.randn(c.shape, dtype=F64, generator=g) for c in cores]
    n = TT(cores).norm()
    gb = torch.autograd.grad(n.sum(), cores, create_graph=True)
    hb = torch.autograd.grad(sum((a * b).sum() for a, b in zip(gb, v)), cores)
    for j in range(2):
        one = [c[j].detach().clone().requires_grad_() for c in cores]
        n1 = TT(one).norm()
        g1 = torch.autograd.grad(n1, one, create_graph=True)
        h1 = torch.autograd.grad(sum((a * b[j]).sum() for a, b in zip(g1, v)), one)
        assert torch.allclose(n[j], n1)
        for a, b in zip(gb, g1):
            assert torch.allclose(a[j], b, rtol=1e-10, atol=1e-12 * float(b.detach().abs().max()))
        for a, b in zip(hb, h1):
            assert torch.allclose(a[j], b, rtol=1e-9, atol=1e-11 * float(b.detach().abs().max()))


def test_pack_point_rejects_non_finite_tt():
    """pack_point of a TT built by arithmetic (``x * nan``: no constructor check) returned
    a NaN point, and one of higher rank failed in LAPACK's SVD; README promises that
    pack_point rejects non-finite data."""
    M = FixedTTRank((3, 4, 5), 2)
    g = torch.Generator().manual_seed(0)
    for r in (2, 3):
        x = TT.random(M.shape, r, dtype=F64, generator=g)
        for bad in (float("nan"), float("inf")):
            with pytest.raises(RuntimeError, match="^tt: contains NaN or Inf"):
                M.pack_point(x * bad)
    assert torch.isfinite(M.pack_point(x)).all()


def test_pack_point_rejects_rank_deficient_tt():
    """pack_point of a TT with the manifold's nominal ranks but a lower true TT-rank (a zero
    core, the zero tensor, dependent slices, a higher-rank TT that rounds to a deficient
    one) returned a packed "point" outside the fixed-rank manifold, silently; now a
    ValueError naming tt and the bond, unless check_rank=False."""
    M = FixedTTRank((3, 4, 5), (1, 2, 3, 1))
    g = torch.Generator().manual_seed(0)
    x = TT.random(M.shape, M.ranks, dtype=F64, generator=g)
    a, b, c = x.cores
    dup = torch.cat([b[..., :1], b[..., :1] * 2.0, b[..., 2:]], -1)  # rank 2 at bond 2
    low = TT.random(M.shape, 1, dtype=F64, generator=g)
    l0, l1, l2 = low.cores  # true rank 1, nominal ranks (1, 3, 3, 1)
    padded = TT([torch.cat([l0] * 3, -1), torch.cat([torch.cat([l1] * 3, -1)] * 3, 0) / 3,
                 torch.cat([l2] * 3, 0) / 3])
    cases = {"zero core": ([a, b * 0, c], r"\d"), "zero tensor": ([a * 0, b, c], r"\d"),
             "dependent": ([a, dup, c], 2), "dependent, scaled": ([a * 1e-150, dup, c], 2)}
    for name, (cores, bond) in cases.items():
        with pytest.raises(ValueError, match=rf"^tt: not a point .*TT-rank at bond {bond} "):
            M.pack_point(cores)
        # check_rank=False packs it anyway: the same dense tensor (float64 reference)
        p = M.pack_point(cores, check_rank=False)
        ref = TT(cores).full()
        assert torch.allclose(M.to_tt(p).full(), ref, atol=1e-14 * float(ref.abs().max()))
    M2 = FixedTTRank(M.shape, (1, 2, 2, 1))  # a higher-rank TT rounded to a deficient one
    with pytest.raises(ValueError, match=r"^tt: not a point .*TT-rank at bond \d "):
        M2.pack_point(padded)
    # a batch: the deficient point is named
    xb = TT([t.expand(3, *t.shape).clone() for t in x.cores])
    xb.cores[1][1] = 0
    with pytest.raises(ValueError, match=r"TT-rank at bond 2 is below 3 at point \(1,\)"):
        M.pack_point(xb)
    # full rank but ill-conditioned (1e-10 relative): still a point; rtol is adjustable
    ill = [a, torch.cat([b[..., :2], b[..., :2].sum(-1, keepdim=True) + 1e-10 * b[..., 2:]], -1), c]
    assert M.pack_point(ill).shape == (M.size,)
    with pytest.raises(ValueError, match="TT-rank at bond 2"):
        M.pack_point(ill, rtol=1e-6)
    with pytest.raises(ValueError, match="^rtol: expected"):
        M.pack_point(x, rtol=-1.0)
    assert torch.allclose(M.to_tt(M.pack_point(x)).full(), x.full(), atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_metric_rejects_non_finite_vectors(dtype):
    """inner, norm and component_inner returned NaN/Inf for a non-finite vector where
    project, proju and transp raise (README: non-finite data is rejected); now the same
    RuntimeError naming the vectors, checked on the per-point results (no host sync)."""
    M = FixedTTRank((3, 4, 5), (2, 3))
    g = torch.Generator().manual_seed(0)
    p = M.random(dtype=dtype, generator=g)
    u = M.proju(p, torch.randn(M.size, dtype=F64, generator=g).to(dtype))
    v = M.proju(p, torch.randn(M.size, dtype=F64, generator=g).to(dtype))
    ub = torch.stack([u, v, u])
    for bad in (float("nan"), float("inf"), -float("inf")):
        b = u.clone()
        b[7] = bad
        bb = ub.clone()
        bb[1, 3] = bad
        for call, who in ((lambda: M.inner(p, b), "u"), (lambda: M.inner(p, u, b), "u, v"),
                          (lambda: M.inner(p, b, v), "u, v"), (lambda: M.norm(p, b), "u"),
                          (lambda: M.component_inner(p, b), "u"),
                          (lambda: M.component_inner(p, v, b), "u, v"),
                          (lambda: M.inner(p, bb), "u"), (lambda: M.norm(p, bb, keepdim=True), "u"),
                          (lambda: M.component_inner(p, bb, ub), "u, v")):
            with pytest.raises(RuntimeError, match=f"^{who}: contains? NaN or Inf"):
                call()
    # finite vectors: the float64 reference values, also for norms beyond sqrt(max float)
    ref = float((u.double() * v.double()).sum())
    assert abs(float(M.inner(p, u, v)) - ref) <= 1e-5 * abs(ref) + 1e-6
    want = torch.full((M.size,), ref, dtype=F64)
    assert torch.allclose(M.component_inner(p, u, v).double(), want, rtol=1e-5)
    huge = u * (1e30 if dtype == torch.float32 else 1e200)
    assert torch.isfinite(M.norm(p, huge)) and torch.isfinite(M.norm(p, ub, keepdim=True)).all()


def test_egrad2rgrad_at_a_non_finite_point_says_so():
    """The first egrad2rgrad at a NaN point failed with "not left-orthogonal" only."""
    M = FixedTTRank((3, 4, 5), (2, 3))
    p = M.random(dtype=F64, generator=torch.Generator().manual_seed(0))
    p[0] = float("nan")
    with pytest.raises(RuntimeError, match=r"^x: the packed cores .* \(or not finite\)"):
        M.egrad2rgrad(p, torch.zeros(M.size, dtype=F64))


def test_save_refuses_what_load_cannot_read(tmp_path):
    """ttmanifold.save wrote a TT with NaN cores without complaint; load then failed
    ("contains NaN"). (Batches round-trip: tests/test_io.py.)"""
    import ttmanifold as tm

    g = torch.Generator().manual_seed(0)
    x = TT.random((3, 4, 5), 2, dtype=F64, generator=g)
    with pytest.raises(ValueError, match="^x: core 0: contains NaN"):
        tm.save(x * float("nan"), tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()
    tm.save(x, tmp_path / "x.npz")
    assert torch.equal(tm.load(tmp_path / "x.npz").full(), x.full())


def test_project_of_tt_or_dense_at_a_non_finite_point_raises():
    """project(p, Z) of a TT or dense Z at a NaN point returned NaN deltas; the point now
    joins Z's one fused finiteness assert (no extra operation for a TT Z)."""
    M = FixedTTRank((3, 4, 5), (2, 3))
    g = torch.Generator().manual_seed(0)
    p = M.random(dtype=F64, generator=g)
    Z = TT.random(M.shape, 2, dtype=F64, generator=g)
    bad = p.clone()
    bad[3] = float("nan")
    for z in (Z, Z.full()):
        with pytest.raises(RuntimeError, match=r"^Z: contains NaN or Inf \(or the point p does\)"):
            M.project(bad, z)
        assert torch.isfinite(M.project(p, z)).all()


def test_proju_at_a_non_finite_point_raises():
    """proju at a NaN point returned NaN deltas (only u was checked)."""
    M = FixedTTRank((3, 4, 5), (2, 3))
    p = M.random(dtype=F64, generator=torch.Generator().manual_seed(0))
    u = torch.randn(M.size, dtype=F64, generator=torch.Generator().manual_seed(1))
    bad = p.clone()
    bad[0] = float("inf")
    with pytest.raises(RuntimeError, match=r"^u: contains NaN or Inf \(or the point x does\)"):
        M.proju(bad, u)


def test_project_sampled_and_dist_at_a_non_finite_point_raise():
    """project_sampled and dist at a NaN point returned NaN."""
    M = FixedTTRank((3, 4, 5), (2, 3))
    g = torch.Generator().manual_seed(0)
    p, q = M.random(dtype=F64, generator=g), M.random(dtype=F64, generator=g)
    bad = p.clone()
    bad[2] = float("nan")
    iset = IndexSet(torch.tensor([[0, 1, 2], [2, 3, 4]]), M.shape)
    with pytest.raises(RuntimeError, match=r"^values: contains NaN or Inf \(or the point p"):
        M.project_sampled(bad, iset, torch.ones(2, dtype=F64))
    for a, b in ((bad, q), (q, bad)):
        with pytest.raises(RuntimeError, match="^x, y: contains NaN or Inf"):
            M.dist(a, b)
    assert torch.allclose(M.dist(p, q), (M.to_tt(p).full() - M.to_tt(q).full()).norm())


def test_differentiable_retr_after_unpack_tensor_keeps_the_gradient_through_v():
    """After ``unpack_tensor(p)`` (a loss), a differentiable ``retr``/``retr_transp``/
    ``transp`` at ``p`` (grad mode on, ``p`` requiring grad: unrolled optimization) used
    the right cores kept for the optimizer step, computed without a graph: the gradient
    with respect to ``p`` lost the part through them (off by half its size)."""
    M = FixedTTRank((3, 4, 5), (2, 3))
    g = torch.Generator().manual_seed(0)
    p0 = M.random(dtype=F64, generator=g)
    u = 0.3 * M.proju(p0, torch.randn(M.size, dtype=F64, generator=g))
    A = TT.random(M.shape, 2, dtype=F64, generator=g)
    B = TT.random(M.shape, 2, dtype=F64, generator=g)

    def grads(with_loss_first):
        out = []
        for fn in (lambda p: inner(M.to_tt(M.retr(p, u)), A),
                   lambda p: M.inner(p, M.retr_transp(p, u, u)[1], M.project(p, B)),
                   lambda p: M.inner(p, M.transp(p, p.detach(), u), M.project(p, B))):
            p = p0.clone().requires_grad_()
            if with_loss_first:
                M.unpack_tensor(p)  # keeps the right cores for an optimizer step
            out.append(torch.autograd.grad(fn(p), p)[0])
        return out

    for a, b in zip(grads(False), grads(True)):
        assert torch.allclose(a, b, atol=1e-12), (a - b).abs().max()


def test_hessian_operator_checks_grad_by_name():
    """hessian_operator's ``grad`` was validated later under the name ``u`` (or failed on
    ``.detach`` of a list)."""
    from ttmanifold.manifold import hessian_operator

    M = FixedTTRank((3, 4, 5), (2, 3))
    p = M.random(dtype=F64, generator=torch.Generator().manual_seed(0))

    def f(T):
        return 0.5 * T.norm() ** 2

    for bad, err in ((torch.zeros(M.size - 1, dtype=F64), ValueError),
                     (torch.zeros(M.size), ValueError), ([0.0] * M.size, TypeError),
                     (torch.full((M.size,), float("nan"), dtype=F64), RuntimeError)):
        with pytest.raises(err, match="^grad: "):
            hessian_operator(M, p, f, grad=bad)
    H = hessian_operator(M, p, f, grad=M.riemannian_grad(p, f))
    u = M.proju(p, torch.randn(M.size, dtype=F64, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(H(u), u, atol=1e-12)


def test_project_of_a_sparse_z_is_differentiable_in_its_values():
    """project(p, Z) of a sparse Z whose values require grad returned a tensor without a
    graph (``Z._values()`` drops it): the gradient was silently lost, unlike for a dense or
    TT Z and for project_sampled."""
    M = FixedTTRank((3, 4, 5), (2, 3))
    g = torch.Generator().manual_seed(0)
    p = M.random(dtype=F64, generator=g)
    idx = torch.tensor([[0, 1, 2], [2, 3, 4], [0, 1, 2]])  # a duplicate: summed
    vals = torch.randn(3, dtype=F64, generator=g, requires_grad=True)
    c = torch.randn(M.size, dtype=F64, generator=g)
    Z = torch.sparse_coo_tensor(idx.t(), vals, M.shape, check_invariants=True)
    out = M.project(p, Z)
    (gz,) = torch.autograd.grad((out * c).sum(), vals)
    dense = torch.zeros(M.shape, dtype=F64).index_put((idx[:, 0], idx[:, 1], idx[:, 2]),
                                                       vals.detach(), accumulate=True)
    assert torch.allclose(out.detach(), M.project(p, dense), atol=1e-12)
    ref = torch.stack([(M.project_sampled(p, IndexSet(idx[e:e + 1], M.shape),
                                          torch.ones(1, dtype=F64)) * c).sum() for e in range(3)])
    assert torch.allclose(gz, ref, atol=1e-12)


@pytest.mark.parametrize("batch", [(), (4,)])
@pytest.mark.parametrize("where", ["x", "u"])
def test_torch_path_retraction_of_nonfinite_input_says_so(monkeypatch, batch, where):
    """On the torch path torch's SVD of a NaN matrix fails with "failed to converge"; the
    retraction (and retr_transp) says what happened, as the compiled kernels do."""
    from ttmanifold import kernels
    monkeypatch.setitem(kernels._config, "enabled", False)
    M = FixedTTRank((5, 4, 5, 4), 2)
    g = torch.Generator().manual_seed(0)
    x = torch.Tensor(M.random(*batch, dtype=torch.float64, generator=g))
    u = M.proju(x, torch.randn(x.shape, dtype=torch.float64, generator=g))
    (x if where == "x" else u)[..., 3] = float("nan")
    with pytest.raises(RuntimeError, match="X \\+ u is not finite"):
        M.retr(x, u)
    with pytest.raises(RuntimeError, match="X \\+ u is not finite"):
        M.retr_transp(x, u, u.nan_to_num())
