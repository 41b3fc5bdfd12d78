"""Batches on FixedTTRank (issue 12): points and tangent vectors of shape ``(*batch, size)``.

Every batched method is checked against independent dense float64 references (plain
einsum/SVD code, no ttmanifold sweeps): tangent projections against the orthogonal
projector of the tangent space (from the Jacobian of the core map at a dense TT-SVD),
retractions against the dense TT-SVD of ``X + xi``, transports against the projector at
the new point; results are compared as gauge-invariant quantities (full tensors, inner
products). Hypothesis tests vary shapes, ranks and batch shapes; geoopt optimizers on one
``ManifoldParameter`` holding a batch follow B independent runs to rounding.
"""
from __future__ import annotations

import re

import geoopt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttmanifold import TT, FixedTTRank, kernels
from ttmanifold.tt import feasible_ranks

F64, F32 = torch.float64, torch.float32
SHAPE = (4, 5, 3)
RANKS = (1, 2, 3, 1)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(params=[True, False], ids=["kernels-on", "kernels-off"])
def compiled(request):
    """Run with the compiled CPU kernels enabled (batched calls must step aside to the
    torch path) and disabled."""
    old = kernels.enabled()
    kernels.set_enabled(request.param)
    yield request.param
    kernels.set_enabled(old)


# ---------------------------------------------------------------------------------------
# independent dense references (no ttmanifold code)
# ---------------------------------------------------------------------------------------

def core_shapes(shape, ranks):
    return [(ranks[k], n, ranks[k + 1]) for k, n in enumerate(shape)]


def unflatten(v, shape, ranks):
    cs = core_shapes(shape, ranks)
    sizes = [a * b * c for a, b, c in cs]
    return [c.reshape(s) for c, s in zip(torch.split(v, sizes), cs)]


def full(cores):
    res = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    for c in cores[1:]:
        res = torch.einsum("ia,ajb->ijb", res, c).reshape(-1, c.shape[2])
    return res.reshape([int(c.shape[1]) for c in cores])


def dense_point(M, p):
    return full(unflatten(p.detach().to(F64), M.shape, M.ranks))


def tt_svd(X, ranks):
    shape = X.shape
    cores, c, r_prev = [], X.reshape(shape[0], -1), 1
    for k in range(len(shape) - 1):
        c = c.reshape(r_prev * shape[k], -1)
        u, s, vh = torch.linalg.svd(c, full_matrices=False)
        r = ranks[k + 1]
        cores.append(u[:, :r].reshape(r_prev, shape[k], r))
        c = s[:r, None] * vh[:r]
        r_prev = r
    cores.append(c.reshape(r_prev, shape[-1], 1))
    return cores


def tangent_projector(X, ranks):
    """Orthogonal projector (N x N) onto the tangent space of M_r at the dense X: the
    range of the Jacobian of the core map at a TT-SVD of X."""
    shape = tuple(X.shape)
    v0 = torch.cat([c.reshape(-1) for c in tt_svd(X, ranks)])
    J = torch.autograd.functional.jacobian(
        lambda v: full(unflatten(v, shape, ranks)).reshape(-1), v0, vectorize=True)
    U, S, _ = torch.linalg.svd(J, full_matrices=False)
    dim = sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape)) - sum(
        r * r for r in ranks[1:-1])
    Q = U[:, :dim]
    return Q @ Q.T


def dense_tangent(M, p, u):
    """Dense value of the tangent vector with packed deltas ``u`` at the single point
    ``p``: ``sum_k U_<k dU_k V_>k`` (docs/manifold.md) with the canonical right-orthogonal
    cores V (``diag(L_k) >= 0``) computed here by a plain QR chain."""
    U = unflatten(p.detach().to(F64), M.shape, M.ranks)
    dU = unflatten(u.detach().to(F64), M.shape, M.ranks)
    d = len(U)
    V = [None] * d
    c = U[-1]
    for k in range(d - 1, 0, -1):
        a, n, b = c.shape
        q, r = torch.linalg.qr(c.reshape(a, n * b).T)
        s = torch.sign(torch.diagonal(r))
        s[s == 0] = 1
        q, r = q * s, r * s[:, None]
        V[k] = q.T.reshape(a, n, b)
        if k > 1:
            prv = U[k - 1]
            c = torch.einsum("anb,cb->anc", prv, r)
    X = torch.zeros(M.shape, dtype=F64)
    for k in range(d):
        cores = [U[j] for j in range(k)] + [dU[k]] + [V[j] for j in range(k + 1, d)]
        X = X + full(cores)
    return X


def close(a, b, tol):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def batch_case(shape=SHAPE, ranks=RANKS, batch=(3,), seed=0, dtype=F64):
    M = FixedTTRank(shape, ranks)
    gen = torch.Generator().manual_seed(seed)
    p = M.random(*batch, M.size, dtype=dtype, generator=gen)
    Z = TT.random(shape, [min(3, f) for f in feasible_ranks(shape)], dtype=dtype,
                  generator=gen, batch=batch)
    return M, torch.Tensor(p), Z, gen


def points(batch):
    return [idx for idx in torch.cartesian_prod(*[torch.arange(b) for b in batch]).reshape(
        -1, len(batch)).tolist()] if batch else [[]]


# ---------------------------------------------------------------------------------------
# every method against dense references, one value per point
# ---------------------------------------------------------------------------------------

def test_project_retr_transp_against_dense(compiled):
    M, p, Z, gen = batch_case(batch=(3,))
    u = M.project(p, Z)  # a batch of TTs at a batch of points
    assert u.shape == (3, M.size)
    y = M.retr(p, u)
    w = M.project(p, TT.random(M.shape, 2, dtype=F64, generator=gen, batch=(3,)))
    t = M.transp(p, y, w)
    y2, t2 = M.retr_transp(p, u, w)
    assert torch.allclose(y2, y, atol=1e-13) and torch.allclose(t2, t, atol=1e-13)
    for b in range(3):
        X = dense_point(M, p[b])
        P = tangent_projector(X, M.ranks)
        xi = (P @ Z[b].full().reshape(-1)).reshape(M.shape)
        assert close(dense_tangent(M, p[b], u[b]), xi, 1e-10)
        Y = full(tt_svd(X + xi, M.ranks))
        assert close(dense_point(M, y[b]), Y, 1e-10)
        Py = tangent_projector(Y, M.ranks)
        eta = dense_tangent(M, p[b], w[b]).reshape(-1)
        assert close(dense_tangent(M, y[b], t[b]).reshape(-1), Py @ eta, 1e-9)
        # the metric: the Euclidean inner product of the embedded tangent vectors
        assert abs(float(M.inner(p, u, w)[b]) - float(xi.reshape(-1) @ eta)) < 1e-10
    assert M.inner(p, u, w).shape == (3,) and M.inner(p, u, keepdim=True).shape == (3, 1)
    assert torch.allclose(M.norm(p, u), M.inner(p, u).sqrt())
    ci = M.component_inner(p, u)
    assert ci.shape == u.shape and torch.allclose(ci, M.inner(p, u)[:, None].expand_as(u))


def test_batch_equals_single_point_calls(compiled):
    """Each point of a batch gets what a single-point call gives (to rounding)."""
    M, p, Z, gen = batch_case(batch=(2, 3), seed=1)
    g = torch.randn(2, 3, M.size, dtype=F64, generator=gen)
    u = M.proju(p, g)
    v = M.proju(p, torch.randn(2, 3, M.size, dtype=F64, generator=gen))
    y = M.retr(p, u)
    out = {
        "proju": (M.proju(p, g), lambda i, j: M.proju(p[i, j], g[i, j])),
        "egrad2rgrad": (M.egrad2rgrad(p, g), lambda i, j: M.egrad2rgrad(p[i, j], g[i, j])),
        "gauge": (M.gauge(p, g), lambda i, j: M.gauge(p[i, j], g[i, j])),
        "retr": (y, lambda i, j: M.retr(p[i, j], u[i, j])),
        "transp": (M.transp(p, y, v), lambda i, j: M.transp(p[i, j], y[i, j], v[i, j])),
        "project": (M.project(p, Z), lambda i, j: M.project(p[i, j], Z[i, j])),
        "point_as_tangent": (M.point_as_tangent(p), lambda i, j: M.point_as_tangent(p[i, j])),
        "dist": (M.dist(p, y), lambda i, j: M.dist(p[i, j], y[i, j])),
    }
    for name, (batched, single) in out.items():
        for i in range(2):
            for j in range(3):
                assert torch.allclose(batched[i, j], single(i, j), atol=1e-12), name
    # retr_transp as the pair
    y2, t2 = M.retr_transp(p, u, v)
    assert torch.allclose(y2, y, atol=1e-13)
    assert torch.allclose(t2, M.transp(p, y, v), atol=1e-12)


def test_broadcast_one_point_many_vectors(compiled):
    M, p, Z, gen = batch_case(batch=(), seed=2)
    us = M.proju(p, torch.randn(4, M.size, dtype=F64, generator=gen))
    assert us.shape == (4, M.size)
    ys = M.retr(p, us)
    ts = M.transp(p, ys, us)
    Zs = TT.random(M.shape, 2, dtype=F64, generator=gen, batch=(4,))
    pr = M.project(p, Zs)  # the point's right cores once for the whole batch
    assert ys.shape == ts.shape == pr.shape == (4, M.size)
    for b in range(4):
        # the same tensor (the packed cores may differ by the SVD's sign choices)
        assert torch.allclose(M.to_tt(ys[b]).full(), M.to_tt(M.retr(p, us[b])).full(),
                              atol=1e-12)
        assert torch.allclose(ts[b], M.transp(p, ys[b], us[b]), atol=1e-12)
        assert torch.allclose(pr[b], M.project(p, Zs[b]), atol=1e-12)



def test_metric_broadcasts_with_the_points():
    """``inner``, ``norm`` and ``component_inner`` broadcast the batch shapes of the points
    too (geoopt's convention): a batch of points and one vector gives one value per point,
    and a point batch that does not broadcast is named, not silently ignored."""
    M, p, Z, gen = batch_case(batch=(2, 3), seed=30)
    u = torch.randn(M.size, dtype=F64, generator=gen)
    v = torch.randn(3, M.size, dtype=F64, generator=gen)
    ref = (u * v).sum(-1)
    assert torch.equal(M.inner(p, u, v), ref.expand(2, 3))
    assert M.inner(p, u, v, keepdim=True).shape == (2, 3, 1)
    assert torch.equal(M.norm(p, u), u.norm().expand(2, 3))
    assert M.inner(p[0, 0], u).shape == () and M.inner(p[0], u).shape == (3,)
    ci = M.component_inner(p, u, v)  # v's batch larger than u's, both below p's
    assert torch.equal(ci, ref[:, None].expand(2, 3, M.size))
    assert torch.equal(M.component_inner(p[0, 0], v, u), ref[:, None].expand(3, M.size))
    with pytest.raises(ValueError, match=r"x: batch shape \(2, 3\) does not broadcast with "
                                         r"the vectors' \(2,\)"):
        M.inner(p, torch.zeros(2, M.size, dtype=F64))
    with pytest.raises(ValueError, match=r"x: batch shape \(2, 3\)"):
        M.component_inner(p, torch.zeros(2, M.size, dtype=F64))
    with pytest.raises(ValueError, match=r"x: expected a flat tensor of size"):
        M.norm(p[..., 1:], u)


def test_one_core_manifold_broadcasts_like_the_others():
    """d = 1 (no gauge: the projections are the identity) still broadcasts a batch of
    points with one vector, as every d >= 2 manifold does."""
    M = FixedTTRank((5,), 1)
    p = torch.Tensor(M.random(3, M.size, dtype=F64))
    q = torch.Tensor(M.random(dtype=F64))
    u = torch.randn(M.size, dtype=F64)
    for out in (M.proju(p, u), M.egrad2rgrad(p, u), M.gauge(p, u), M.transp(p, q, u),
                M.retr_transp(p, u, u)[1], M.tangent_to_tt(p, u).full()):
        assert torch.equal(out, u.expand(3, 5))

@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_project_batch_of_tts_at_one_point(compiled, monkeypatch, dtype):
    """A batch of TTs at one point (the batch folded into the products with the point's
    cores, written into one output): each result is the dense float64 projector applied to
    its TT and the single call's result; uneven ranks (the TTs' differ from the point's),
    two batch dimensions, slices with a remainder, inference mode, the autograd path (its
    values and gradients against per-TT calls) and the ungauged deltas."""
    from ttmanifold.manifold import fixed_rank as FR
    from ttmanifold.manifold import project_tt, project_tt_at_point

    shape = (3, 4, 5, 3)
    M = FixedTTRank(shape, (1, 2, 4, 3, 1))
    gen = torch.Generator().manual_seed(21)
    p64 = M.random(dtype=F64, generator=gen)
    Z64 = TT.random(shape, (1, 3, 2, 3, 1), dtype=F64, generator=gen, batch=(2, 3))
    p, Z = p64.to(dtype), Z64.to(dtype)
    tol = 1e-10 if dtype == F64 else 2e-5
    calls = []
    real = FR.project_tt_at_point

    def spy(*args, **kwargs):
        calls.append(kwargs.get("chunk"))
        return real(*args, **kwargs)

    monkeypatch.setattr(FR, "project_tt_at_point", spy)
    u = M.project(p, Z)
    assert u.shape == (2, 3, M.size) and u.dtype == dtype and not u.is_inference()
    assert len(calls) == 1  # the folded path ran (once: the 6 TTs fit one slice)
    P = tangent_projector(dense_point(M, p64), M.ranks)
    for i, j in points((2, 3)):
        xi = (P @ Z64[i, j].full().reshape(-1)).reshape(shape)
        assert close(dense_tangent(M, p64, u[i, j]), xi, tol)
        assert close(u[i, j], M.project(p, Z[i, j]), tol)
    # slices of 4 TTs (4 + 2), and the pure function with an output of its own
    per_tt = sum(c.numel() for c in Z[0, 0].cores) * p.element_size()
    monkeypatch.setattr(FR, "CPU_PROJECT_CHUNK_BYTES", 4 * per_tt)
    assert close(M.project(p, Z), u, tol) and calls[-1] == 4
    flat = [c.reshape((6,) + c.shape[-3:]) for c in Z.cores]
    out = torch.full((6, M.size), float("nan"), dtype=dtype)
    assert project_tt_at_point(M.split(p), None, flat, out=out, chunk=4) is out
    assert close(out, u.reshape(6, -1), tol)
    with torch.inference_mode():
        assert close(M.project(p, Z), u, tol)
    # gradients flow through the unsliced path (no output buffer)
    Zg = Z.detach().requires_grad_(True)
    w = torch.randn(2, 3, M.size, dtype=F64, generator=gen).to(dtype)
    (M.project(p, Zg) * w).sum().backward()
    for i, j in points((2, 3)):
        Zij = TT([c.detach().clone() for c in Z[i, j].cores]).requires_grad_(True)
        (M.project(p, Zij) * w[i, j]).sum().backward()
        for cg, ci in zip(Zg.cores, Zij.cores):
            assert close(cg.grad[i, j], ci.grad, tol)
    # the ungauged deltas as cores (the tangent vectors' inner product with a TT uses them)
    D = project_tt(M.split(p), None, Z.cores)
    for i, j in points((2, 3)):
        for a, b in zip(D, project_tt(M.split(p), None, Z[i, j].cores)):
            assert a.shape[:2] == (2, 3) and close(a[i, j], b, tol)
    # meta tensors: shapes only
    pm = torch.empty(M.size, device="meta", dtype=dtype)
    Zm = TT.random(shape, 2, device="meta", dtype=dtype, batch=(5,))
    assert M.project(pm, Zm).shape == (5, M.size)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_retraction_on_block_cores_of_the_unsigned_sweep(monkeypatch, dtype):
    """Where launches dominate (forced; torch path), retr without kept right cores runs the
    block-core sweeps on the unsigned LQ frames, the deltas' right bonds scaled by the
    bonds' signs: the dense TT-SVD of X + xi (float64 reference) for a batch of points,
    one point with many vectors, a single point, uneven ranks, gauged and arbitrary
    deltas."""
    from ttmanifold.manifold import sweeps

    monkeypatch.setattr(sweeps, "PAIRED_SWEEPS", True)
    old = kernels.enabled()
    kernels.set_enabled(False)
    tol = 1e-10 if dtype == F64 else 2e-5
    try:
        for shape, ranks in (((4, 5, 3, 4), (1, 3, 4, 2, 1)), ((3, 3, 3, 3, 3), 2)):
            M = FixedTTRank(shape, ranks)
            gen = torch.Generator().manual_seed(31)
            p = M.random(3, dtype=F64, generator=gen)
            g = torch.randn(3, M.size, dtype=F64, generator=gen)
            for u in (0.3 * M.proju(p, g), 0.05 * g):  # gauged, then arbitrary deltas
                y = M.retr(p.to(dtype), u.to(dtype))
                y0 = M.retr(p[0].to(dtype), u.to(dtype))  # one point, three vectors
                y1 = M.retr(p[1].to(dtype), u[1].to(dtype))  # one point alone
                for b in range(3):
                    for q, out in ((p[b], y[b]), (p[0], y0[b])):
                        ref = full(tt_svd(dense_point(M, q) + dense_tangent(M, q, u[b]), M.ranks))
                        assert close(dense_point(M, out), ref, tol), (shape, b)
                assert close(dense_point(M, y1), dense_point(M, y[1]), tol)
                assert M.check_point_on_manifold(y.double(), atol=1e-4)
    finally:
        kernels.set_enabled(old)


@pytest.mark.parametrize("ranks", [2, (1, 3, 4, 2, 1)], ids=["uniform", "uneven"])
def test_retraction_of_a_large_batch_copies_each_factor(monkeypatch, ranks):
    """A large batch on the CPU packs the retraction's left factors one by one (each copied
    right after its SVD) instead of by one concatenation: forced here by a zero stack bound
    (the path ran untested: the bound was read at import). Same points as one by one."""
    from ttmanifold.manifold import sweeps

    M = FixedTTRank((4, 5, 3, 4), ranks)
    gen = torch.Generator().manual_seed(32)
    p = M.random(4, dtype=F64, generator=gen)
    u = 0.3 * M.proju(p, torch.randn(4, M.size, dtype=F64, generator=gen))
    monkeypatch.setattr(sweeps, "PAIRED_SWEEPS", False)
    grouped = M.retr(p, u)
    monkeypatch.setattr(sweeps, "STACK_MAX_NUMEL", 0)
    y = M.retr(p, u)
    for b in range(4):
        ref = full(tt_svd(dense_point(M, p[b]) + dense_tangent(M, p[b], u[b]), M.ranks))
        assert close(dense_point(M, y[b]), ref, 1e-10)
        assert close(dense_point(M, y[b]), dense_point(M, grouped[b]), 1e-12)
    assert M.check_point_on_manifold(y)


def test_gauge_keeps_the_tangent_vector():
    M, p, Z, gen = batch_case(batch=(2,), seed=3)
    g = torch.randn(2, M.size, dtype=F64, generator=gen)
    u = M.gauge(p, g)
    for b in range(2):
        assert close(dense_tangent(M, p[b], u[b]),
                     M.tangent_to_tt(p[b], g[b]).full(), 1e-10)
        assert M.check_vector_on_tangent(p[b], u[b])
    assert M.check_vector_on_tangent(p, u)
    assert not M.check_vector_on_tangent(p, g)
    T = M.tangent_to_tt(p, u)
    assert T.batch_shape == (2,)
    assert close(T.full()[1], dense_tangent(M, p[1], u[1]), 1e-10)


def test_projx_per_point_and_checks():
    M, p, Z, gen = batch_case(batch=(3,), seed=4)
    bad = p.clone()
    bad[1] = bad[1] * 1.5  # cores no longer left-orthogonal: only this point changes
    q = M.projx(bad)
    assert torch.equal(q[0], p[0]) and torch.equal(q[2], p[2])
    assert not torch.equal(q[1], bad[1])
    assert close(dense_point(M, q[1]), dense_point(M, bad[1]), 1e-12)
    assert M.check_point_on_manifold(q)
    ok, why = M.check_point_on_manifold(bad, explain=True)
    assert not ok and "left-orthogonal" in why
    M.check_point(p)
    with pytest.raises(ValueError, match=r"left-orthogonal \(defect .*\) at point \(1,\)$"):
        M.check_point(bad)  # the failing point is named
    nan = p.clone().reshape(3, 1, M.size)
    nan[2, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite entries at point \(2, 0\)$"):
        M.check_point(nan)
    # vectors: every point against its own scale (a large vector of another point let a
    # gauge violation of 1e-3 pass the batch's check)
    g = M.proju(p, torch.randn(3, M.size, dtype=F64, generator=gen))
    g[0] *= 1e6
    off = g.clone()
    off[2] += 1e-3 * p[2]  # U^T dU != 0 at point 2
    ok, why = M.check_vector_on_tangent(p, off, explain=True)
    assert not ok and why.endswith("at point (2,)")
    assert M.check_vector_on_tangent(p, g)


def test_random_origin_to_tt_unpack():
    M = FixedTTRank(SHAPE, RANKS)
    gen = torch.Generator().manual_seed(5)
    p = M.random(4, dtype=F64, generator=gen)
    assert isinstance(p, geoopt.ManifoldTensor) and p.shape == (4, M.size)
    assert M.random(2, 3, M.size, dtype=F64).shape == (2, 3, M.size)
    assert M.random((2, M.size), dtype=F32).dtype == F32
    M.check_point(p)
    assert not torch.allclose(p[0], p[1])  # independent draws
    o = M.origin(3, dtype=F32)
    assert o.shape == (3, M.size) and all(torch.equal(o[b], M.origin(dtype=F32)) for b in range(3))
    x = M.to_tt(p)
    assert x.batch_shape == (4,)
    for b in range(4):
        assert close(x.full()[b], dense_point(M, p[b]), 1e-12)
    # pack_point of a batched TT: a batch of points of the same tensors
    q = M.pack_point(TT.random(M.shape, (1, 4, 3, 1), dtype=F64, generator=gen, batch=(2,)) * 1.0)
    assert q.shape == (2, M.size)
    M.check_point(q)
    # unpack_tensor of a batch: each point gets its own Riemannian gradient
    A = torch.randn((4,) + M.shape, dtype=F64, generator=gen)
    pp = p.clone().requires_grad_()
    T = M.unpack_tensor(pp)
    assert T.batch_shape == (4,)
    (0.5 * (T.full() - A).pow(2).sum()).backward()
    for b in range(4):
        X = dense_point(M, p[b])
        Pg = (tangent_projector(X, M.ranks) @ (X - A[b]).reshape(-1)).reshape(M.shape)
        assert close(dense_tangent(M, p[b], pp.grad[b]), Pg, 1e-10)


def test_riemannian_grad_and_hvp_of_a_batch():
    M, p, Z, gen = batch_case(batch=(3,), seed=6)
    A = TT.random(M.shape, 2, dtype=F64, generator=gen, batch=(3,))

    def f(T):  # one value per point
        return 0.5 * (T - A).norm() ** 2

    g = M.riemannian_grad(p, f)
    u = M.proju(p, torch.randn(3, M.size, dtype=F64, generator=gen))
    h = M.riemannian_hvp(p, lambda T: (f(T) ** 2).sum(), u)
    for b in range(3):
        Ab = A[b]
        gb = M.riemannian_grad(p[b], lambda T: 0.5 * (T - Ab).norm() ** 2)
        assert torch.allclose(g[b], gb, atol=1e-12)
        X = dense_point(M, p[b])
        Pg = (tangent_projector(X, M.ranks) @ (X - Ab.full()).reshape(-1)).reshape(M.shape)
        assert close(dense_tangent(M, p[b], g[b]), Pg, 1e-10)
        hb = M.riemannian_hvp(p[b], lambda T: (0.5 * (T - Ab).norm() ** 2) ** 2, u[b])
        assert torch.allclose(h[b], hb, atol=1e-11)


def test_float32_batch_matches_float64():
    M, p, Z, gen = batch_case(batch=(5,), seed=7)
    u = M.project(p, Z)
    y64 = M.retr(p, u)
    y32 = M.retr(p.float(), u.float())
    assert y32.dtype == F32
    for b in range(5):
        assert close(dense_point(M, y32[b]), dense_point(M, y64[b]), 1e-5)
    t32 = M.transp(p.float(), y32, u.float())
    t64 = M.transp(p, y64, u)
    assert float((M.inner(p, t64) - M.inner(p.float(), t32).double()).abs().max()) < 1e-5


def test_meta_device_batch():
    M = FixedTTRank(SHAPE, RANKS)
    p = torch.empty(2, 3, M.size, device="meta", dtype=F32)
    u = torch.empty(2, 3, M.size, device="meta", dtype=F32)
    for out in (M.proju(p, u), M.egrad2rgrad(p, u), M.retr(p, u), M.transp(p, p, u),
                M.retr_transp(p, u, u)[1], M.gauge(p, u), M.projx(p),
                M.project(p, TT.random(M.shape, 2, device="meta", dtype=F32, batch=(2, 3))),
                M.project(p, torch.empty((3,) + M.shape, device="meta", dtype=F32))):
        assert out.shape == (2, 3, M.size) and out.device.type == "meta"
    assert M.inner(p, u).shape == (2, 3) and M.norm(p, u).shape == (2, 3)
    assert M.random(4, device="meta").shape == (4, M.size)
    e = torch.empty(0, M.size, device="meta", dtype=F32)  # an empty batch, shapes only
    assert M.projx(e).shape == M.retr(e, e).shape == M.proju(e, e).shape == (0, M.size)



@pytest.mark.parametrize("fewer_launches", [None, True], ids=["cpu-choice", "fewer-launches"])
def test_empty_batch(compiled, monkeypatch, fewer_launches):
    """A batch of no points (``p[mask]`` with an empty mask) gives empty results of the
    right shapes: no reshape with an ambiguous -1, no max of an empty tensor, and the
    compiled batch kernels (rank 8: they would divide by the batch size) never see it."""
    from ttmanifold.manifold import sweeps
    monkeypatch.setattr(sweeps, "PAIRED_SWEEPS", fewer_launches)
    f = lambda T: T.norm() ** 2  # noqa: E731
    for shape, ranks, batch in [((3, 4), (1, 2, 1), (0,)), ((2, 3, 3, 2), (1, 2, 3, 2, 1), (2, 0)),
                                ((2, 4, 4, 2), (1, 2, 8, 2, 1), (0,))]:
        M = FixedTTRank(shape, ranks)
        p = torch.Tensor(M.random(*batch, M.size, dtype=F64))
        u = torch.zeros(batch + (M.size,), dtype=F64)
        one = torch.Tensor(M.random(dtype=F64))
        Z = TT.random(shape, 2, dtype=F64, batch=batch)
        packed = batch + (M.size,)
        for out in (M.proju(p, u), M.egrad2rgrad(p, u), M.gauge(p, u), M.retr(p, u),
                    M.transp(p, p, u), *M.retr_transp(p, u, u), M.projx(p),
                    M.project(p, Z), M.project(one, Z),
                    M.project(p, torch.zeros(batch + shape, dtype=F64)),
                    M.riemannian_grad(p, f), M.riemannian_hvp(p, f, u), M.riemannian_hess(p, f, u)):
            assert out.shape == packed
        assert M.inner(p, u).shape == batch and M.dist(p, p).shape == batch
        M.check_point(p)

def test_batch_errors_name_the_argument():
    M, p, Z, gen = batch_case(batch=(3,), seed=8)
    u = torch.zeros(2, M.size, dtype=F64)
    with pytest.raises(ValueError, match=r"u: batch shape \(2,\) does not broadcast"):
        M.retr(p, u)
    with pytest.raises(ValueError, match=r"v: batch shape"):
        M.transp(p, p, u)
    with pytest.raises(ValueError, match=r"x: expected a flat tensor of size"):
        M.proju(p[:, :-1], p)
    with pytest.raises(ValueError, match=r"Z: a sparse Z is projected at a single"):
        M.project(p, torch.zeros(M.shape, dtype=F64).to_sparse())
    with pytest.raises(ValueError, match=r"Z: batch shape \(2,\) does not broadcast"):
        M.project(p, torch.zeros((2,) + M.shape, dtype=F64))
    with pytest.raises(ValueError, match=r"p: expected a flat tensor of size \d+ \(packed"):
        from ttmanifold import IndexSet
        idx = IndexSet(torch.zeros(1, 3, dtype=torch.long), M.shape)
        M.project_sampled(p, idx, torch.zeros(1, dtype=F64))
    with pytest.raises(ValueError, match=r"size: .* a batch is"):
        M.random(3, 4)
    with pytest.raises(ValueError, match=r"f: expected a function returning a scalar"):
        M.riemannian_grad(p, lambda T: T.full())
    # batch mismatches between two tangent vectors, two points, or a point and a batched TT
    # are named, not a broadcasting error from inside torch
    with pytest.raises(ValueError, match=r"u, v: batch shapes \(3,\) and \(2,\) do not"):
        M.inner(p, torch.zeros(3, M.size, dtype=F64), u)
    with pytest.raises(ValueError, match=r"y: batch shape \(2,\) does not broadcast"):
        M.transp(p, p[:2], torch.zeros(3, M.size, dtype=F64))
    with pytest.raises(ValueError, match=r"Z: batch shape \(2,\) does not broadcast"):
        M.project(p, TT.random(M.shape, 2, dtype=F64, batch=(2,), generator=gen))


@settings(max_examples=15)
@given(data=st.data())
def test_property_batched_ops(data):
    """Random shapes, ranks and batch shapes: batched retr/transp/project equal the
    single-point calls, and retractions equal the dense TT-SVD of X + xi."""
    d = data.draw(st.integers(2, 4), label="d")
    shape = tuple(data.draw(st.lists(st.integers(2, 4), min_size=d, max_size=d), label="shape"))
    inner_r = []
    left = 1
    for k in range(d - 1):
        right = 1
        for n in shape[k + 1:]:
            right *= n
        hi = min(left * shape[k], right, 3)
        inner_r.append(data.draw(st.integers(1, hi), label=f"r{k}"))
        left = inner_r[-1]
    ranks = [1] + inner_r + [1]
    for k in range(d - 1, 0, -1):  # attainable from the right too
        ranks[k] = min(ranks[k], shape[k] * ranks[k + 1])
    batch = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=2), label="batch"))
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    M, p, Z, gen = batch_case(tuple(shape), tuple(ranks), batch, seed)
    u = M.project(p, Z)
    y = M.retr(p, u)
    t = M.transp(p, y, u)
    for idx in points(batch):
        i = tuple(idx)
        assert torch.allclose(u[i], M.project(p[i], Z[i]), atol=1e-11)
        assert torch.allclose(t[i], M.transp(p[i], y[i], u[i]), atol=1e-10)
        xi = dense_tangent(M, p[i], u[i])
        Y = full(tt_svd(dense_point(M, p[i]) + xi, M.ranks))
        assert close(dense_point(M, y[i]), Y, 1e-9)


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_property_project_batch_of_tts_at_one_point(data):
    """Random shapes, point ranks, TT ranks and batch shapes: the projection of a batch of
    TTs at one point equals the single calls and the dense projector (float64)."""
    d = data.draw(st.integers(1, 4), label="d")
    shape = tuple(data.draw(st.lists(st.integers(2, 4), min_size=d, max_size=d), label="shape"))
    bound = feasible_ranks(shape)
    ranks = [1] + [data.draw(st.integers(1, min(3, b)), label=f"r{k}")
                   for k, b in enumerate(bound[1:-1])] + [1]
    for k in range(1, d):  # attainable from both sides
        ranks[k] = min(ranks[k], ranks[k - 1] * shape[k - 1])
    for k in range(d - 1, 0, -1):
        ranks[k] = min(ranks[k], shape[k] * ranks[k + 1])
    R = data.draw(st.integers(1, 4), label="R")
    batch = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=2), label="batch"))
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    M = FixedTTRank(shape, ranks)
    gen = torch.Generator().manual_seed(seed)
    p = M.random(dtype=F64, generator=gen)
    Z = TT.random(shape, [min(R, b) for b in bound], dtype=F64, generator=gen, batch=batch)
    u = M.project(p, Z)
    assert u.shape == batch + (M.size,)
    P = tangent_projector(dense_point(M, p), M.ranks)
    for idx in points(batch):
        i = tuple(idx)
        assert torch.allclose(u[i], M.project(p, Z[i]), atol=1e-11)
        xi = (P @ Z[i].full().reshape(-1)).reshape(shape)
        assert close(dense_tangent(M, p, u[i]), xi, 1e-9)


# ---------------------------------------------------------------------------------------
# geoopt optimizers on one ManifoldParameter holding a batch = B independent runs
# ---------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda ps: geoopt.optim.RiemannianSGD(ps, lr=0.3),
    "sgd_momentum": lambda ps: geoopt.optim.RiemannianSGD(ps, lr=0.2, momentum=0.6),
    "sgd_nesterov": lambda ps: geoopt.optim.RiemannianSGD(ps, lr=0.2, momentum=0.6,
                                                          nesterov=True),
    "adam": lambda ps: geoopt.optim.RiemannianAdam(ps, lr=0.05),
    "adam_amsgrad": lambda ps: geoopt.optim.RiemannianAdam(ps, lr=0.05, amsgrad=True),
}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_on_a_batch_equals_independent_runs(name, dtype):
    B, steps = 4, 12
    M = FixedTTRank(SHAPE, RANKS)
    gen = torch.Generator().manual_seed(11)
    p0 = M.random(B, dtype=F64, generator=gen).to(dtype)
    A = (2.0 * TT.random(SHAPE, RANKS, dtype=F64, generator=gen, batch=(B,)).full()
         + 0.05 * torch.randn((B,) + SHAPE, dtype=F64, generator=gen)).to(dtype)
    pb = geoopt.ManifoldParameter(p0.clone(), manifold=M)
    opt_b = OPTIMIZERS[name]([pb])
    singles = [geoopt.ManifoldParameter(p0[b].clone(), manifold=M) for b in range(B)]
    opts = [OPTIMIZERS[name]([s]) for s in singles]
    tol = 1e-10 if dtype == F64 else 2e-4
    for _ in range(steps):
        opt_b.zero_grad()
        (0.5 * (pb.unpack_tensor().full() - A).pow(2).sum()).backward()
        opt_b.step()
        for b in range(B):
            opts[b].zero_grad()
            (0.5 * (singles[b].unpack_tensor().full() - A[b]).pow(2).sum()).backward()
            opts[b].step()
        for b in range(B):
            assert close(dense_point(M, pb[b]), dense_point(M, singles[b]), tol), (name, b)
    assert M.check_point_on_manifold(pb.detach())


def test_batch_of_one_point_takes_the_single_point_path(compiled):
    """A batch holding one point ((1, size), (1, 1, size)) gives the single-point call's
    result (the compiled kernels serve it when loaded)."""
    M, p, Z, gen = batch_case(batch=(), seed=12)
    u = M.proju(p, torch.randn(M.size, dtype=F64, generator=gen))
    for shape in ((1,), (1, 1)):
        pb, ub = p.reshape(shape + p.shape), u.reshape(shape + u.shape)
        y = M.retr(pb, ub)
        assert y.shape == pb.shape and torch.allclose(y.reshape(-1), M.retr(p, u), atol=1e-13)
        t = M.transp(pb, y, ub)
        assert torch.allclose(t.reshape(-1), M.transp(p, y.reshape(-1), u), atol=1e-13)
        pr = M.project(pb, Z)
        assert pr.shape == pb.shape and torch.allclose(pr.reshape(-1), M.project(p, Z), atol=1e-13)
        y2, t2 = M.retr_transp(pb, ub, ub)
        assert torch.allclose(y2, y, atol=1e-13) and t2.shape == pb.shape


def test_batch_of_points_one_ambient_tt():
    """One ambient TT projected at every point of a batch (Z broadcast over the points)."""
    M, p, Z, gen = batch_case(batch=(3,), seed=13)
    W = TT.random(M.shape, 2, dtype=F64, generator=gen)
    u = M.project(p, W)
    assert u.shape == (3, M.size)
    for b in range(3):
        X = dense_point(M, p[b])
        xi = (tangent_projector(X, M.ranks) @ W.full().reshape(-1)).reshape(M.shape)
        assert close(dense_tangent(M, p[b], u[b]), xi, 1e-10)
    # the structured inner product of a batched tangent TT with one TT: one value per point
    T = M.tangent_to_tt(p, u)
    from ttmanifold import inner
    ip = inner(T, W)
    assert ip.shape == (3,)
    assert torch.allclose(ip, (T.full() * W.full()).flatten(1).sum(-1), atol=1e-12)


def test_project_batch_of_dense_tensors(compiled):
    """Dense ambient tensors (*B, *shape) at a batch of points, at one point, and one dense
    tensor at a batch of points: the dense projector per point."""
    M, p, Z, gen = batch_case(batch=(3,), seed=14)
    W = torch.randn((3,) + M.shape, dtype=F64, generator=gen)
    u = M.project(p, W)
    u1 = M.project(p[0], W)
    u2 = M.project(p, W[0])
    assert u.shape == u1.shape == u2.shape == (3, M.size)
    for b in range(3):
        for q, w, out in ((p[b], W[b], u[b]), (p[0], W[b], u1[b]), (p[b], W[0], u2[b])):
            P = tangent_projector(dense_point(M, q), M.ranks)
            xi = (P @ w.reshape(-1)).reshape(M.shape)
            assert close(dense_tangent(M, q, out), xi, 1e-10)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_large_cpu_batches_run_in_chunks_with_the_same_results(monkeypatch, dtype):
    # a budget of three points per chunk splits a batch of 7 into 3 + 3 + 1: every chunked
    # method gives the unchunked result (per point, to rounding), for batched arguments,
    # broadcast ones (one point, one TT) and tuples (retr_transp)
    from ttmanifold.manifold import fixed_rank as FR

    M = FixedTTRank((4, 5, 3, 4), (1, 2, 3, 2, 1))
    g = torch.Generator().manual_seed(3)
    B = 7
    p = M.random(B, dtype=dtype, generator=g)
    p1 = M.random(dtype=dtype, generator=g)
    Z = TT.random(M.shape, 3, dtype=dtype, generator=g, batch=(B,))
    u = M.project(p, Z)
    v = M.project(p, TT.random(M.shape, 2, dtype=dtype, generator=g, batch=(B,)))
    y = M.retr(p, u)
    D = torch.randn((B,) + M.shape, dtype=dtype, generator=g)
    calls = {
        "retr": lambda: M.retr(p, u),
        "retr_transp": lambda: M.retr_transp(p, u, v),
        "transp": lambda: M.transp(p, y, v),
        "proju": lambda: M.proju(p, u + 0.1 * v),
        "gauge": lambda: M.gauge(p, u + 0.1 * v),
        "project TT, batch of points": lambda: M.project(p, Z),
        "project TT, one point": lambda: M.project(p1, Z),
        "project dense": lambda: M.project(p, D),
    }
    monkeypatch.setattr(FR, "CPU_BATCH_CHUNK_BYTES", None)
    whole = {k: f() for k, f in calls.items()}
    seen = []
    real = FR.retract_point

    def spy(U, du, ranks):
        seen.append(U[0].shape[0])
        return real(U, du, ranks)

    monkeypatch.setattr(FR, "retract_point", spy)
    monkeypatch.setattr(FR, "CPU_BATCH_CHUNK_BYTES", 3 * M.size * p.element_size())
    tol = 1e-12 if dtype == F64 else 1e-5
    for k, f in calls.items():
        out = f()
        ref = whole[k]
        for a, b in zip(out if isinstance(out, tuple) else (out,),
                        ref if isinstance(ref, tuple) else (ref,)):
            assert a.shape == b.shape, k
            if k.startswith("retr") and a is (out[0] if isinstance(out, tuple) else out):
                a, b = M.to_tt(a).full(), M.to_tt(b).full()  # points: compare tensors
            assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), k
    assert seen == [3, 3, 1]  # retr ran in three chunks
    # a gradient to keep: one call, not chunked
    seen.clear()
    uu = u.clone().requires_grad_(True)
    M.retr(p, uu).sum().backward()
    assert seen == [B] and uu.grad is not None


def test_chunks_only_for_one_batch_dimension_of_packed_and_dense_arguments(monkeypatch):
    # d = 3: a packed batch (1, B, size) is 3-D like a dense Z; it must count as a 2-D batch
    # (no chunking), not as one point while the other argument's batch is chunked
    from ttmanifold.manifold import fixed_rank as FR

    M = FixedTTRank((2, 3, 4), (1, 2, 3, 1))
    g = torch.Generator().manual_seed(31)
    p = torch.Tensor(M.random(1, 4, M.size, dtype=F64, generator=g))
    u = torch.randn(4, M.size, dtype=F64, generator=g)
    D = torch.randn((4,) + M.shape, dtype=F64, generator=g)
    calls = [lambda: M.proju(p, u), lambda: M.to_tt(M.retr(p, u)).full(),
             lambda: M.project(p, D), lambda: M.proju(p[0], u), lambda: M.project(p[0], D)]
    monkeypatch.setattr(FR, "CPU_BATCH_CHUNK_BYTES", None)
    whole = [f() for f in calls]
    monkeypatch.setattr(FR, "CPU_BATCH_CHUNK_BYTES", M.size * p.element_size())
    for f, ref in zip(calls, whole):
        out = f()
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-12)


def test_check_vector_on_tangent_names_a_mismatched_vector():
    """A vector whose batch shape, dtype or device does not match the point's is not
    tangent there: check_vector_on_tangent says so, naming ``u`` (it raised torch's
    broadcasting or dtype error from inside, and passed a vector on another device)."""
    M, p, _, _ = batch_case(batch=(3,), seed=9)
    u = M.proju(p, torch.randn(3, M.size, dtype=F64))
    many = M.proju(p[0], torch.randn(3, M.size, dtype=F64))  # many vectors at one point
    assert M.check_vector_on_tangent(p, u) and M.check_vector_on_tangent(p[0], many)
    for bad, why in ((u[:2], r"u: batch shape \(2,\) does not broadcast with the point's "
                              r"\(3,\)"),
                     (u.float(), "u: dtype torch.float32 differs"),
                     (u.to("meta"), "u: device meta differs")):
        ok, reason = M.check_vector_on_tangent(p, bad, explain=True)
        assert not ok and re.match(why, reason), reason
        with pytest.raises(ValueError, match=why):
            M.assert_check_vector_on_tangent(p, bad)
