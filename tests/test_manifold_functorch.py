"""The manifold under torch.func (vmap, grad), with and without the compiled dense kernels
loaded: the compiled path steps aside for functorch-wrapped tensors and the torch path is
written without in-place writes into unbatched buffers. Each batched result equals the
loop over its members; ``torch.func.grad`` through ``unpack_tensor`` equals backward."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch.func import grad, vmap

import ttmanifold as tm
from ttmanifold import kernels

F64 = torch.float64


@pytest.fixture(params=["torch", "compiled"])
def path(request):
    was = kernels.enabled()
    if request.param == "compiled":
        if shutil.which("c++") is None:
            pytest.skip("no C++ compiler")
        kernels.set_enabled(True)
        kernels.build(["dense"], verbose=False)
        assert kernels.module("dense") is not None
    else:
        kernels.set_enabled(False)
    yield request.param
    kernels.set_enabled(was)


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    M = tm.FixedTTRank((3, 4, 5, 3), (1, 2, 3, 2, 1))
    p = M.random(dtype=F64, generator=g)
    us = torch.stack([M.proju(p, torch.randn(M.size, dtype=F64, generator=g)) for _ in range(3)])
    ps = torch.stack([M.retr(p, 0.2 * u) for u in us])
    A = tm.TT.random(M.shape, 2, dtype=F64, generator=g)
    return M, p, us, ps, A


def _same(fn, xs, tol=1e-12):
    out = vmap(fn)(xs)
    ref = torch.stack([fn(x) for x in xs])
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= tol


def test_vmap_over_tangent_vectors(path, setup):
    M, p, us, ps, A = setup
    y = ps[0]
    _same(lambda u: M.retr(p, u), us)
    _same(lambda u: M.transp(p, y, u), us)
    _same(lambda u: M.retr_transp(p, u, u)[1], us)
    _same(lambda u: M.proju(p, u), us)


def test_vmap_over_points(path, setup):
    M, p, us, ps, A = setup
    _same(lambda q: M.retr(q, M.proju(q, us[0])), ps)
    _same(lambda q: M.project(q, A), ps)
    _same(lambda q: M.riemannian_grad(q, lambda X: 0.5 * tm.inner(X, X) - tm.inner(X, A)), ps)
    _same(lambda q: M.riemannian_grad(q, lambda X: 0.5 * (X - A).norm() ** 2), ps)
    # the Hessian-vector product (forward over reverse with torch.func there)
    _same(lambda q: M.riemannian_hvp(q, lambda X: tm.inner(X, X) ** 2 / 4 - tm.inner(X, A),
                                     M.proju(q, us[0])), ps)
    _same(lambda q: M.riemannian_hess(q, lambda X: tm.inner(X, X) ** 2 / 4 - tm.inner(X, A),
                                      M.proju(q, us[0])), ps, tol=1e-11)


def test_func_grad_through_unpack_tensor(path, setup):
    M, p, us, ps, A = setup
    idx = torch.stack([torch.randint(0, n, (50,)) for n in M.shape], 1)
    iset = tm.IndexSet(idx, M.shape)
    vals = A.gather(idx)

    def loss(q):
        X = M.unpack_tensor(q)
        return 0.5 * tm.inner(X, X) - tm.inner(X, A) + 0.5 * ((iset.gather(X) - vals) ** 2).sum()

    g1 = grad(loss)(p)
    q = p.clone().requires_grad_()
    loss(q).backward()
    assert torch.allclose(g1, q.grad, atol=1e-12)
    assert torch.allclose(M.proju(p, g1), g1, atol=1e-12)  # a Riemannian gradient


def _grad_ref(f, x):
    x = x.clone().requires_grad_()
    f(x).backward()
    return x.grad


def test_transform_of_one_core_only(path, setup):
    """vmap/grad of a function of one inner core (the others plain tensors): the checks
    that read values (``TT(cores)``'s finite check, the sum's pairwise Gram) and the
    custom-backward sweeps asked only the first core whether it was wrapped, and failed
    inside torch (``.item()`` under vmap, an autograd.Function without setup_context)."""
    M, p, us, ps, A = setup
    B = M.to_tt(p)
    mids = torch.stack([M.to_tt(q).cores[1] for q in ps])

    def tt(m):
        return tm.TT([B.cores[0], m] + B.cores[2:])

    fns = [lambda m: tt(m).full(), lambda m: tt(m).norm(), lambda m: tm.inner(tt(m), A),
           lambda m: (A - tt(m)).norm()]
    for fn in fns:
        _same(fn, mids)
        sc = lambda m, fn=fn: fn(m).sum()  # noqa: E731
        assert torch.allclose(grad(sc)(mids[0]), _grad_ref(sc, mids[0]), atol=1e-12)
    _same(lambda q: M.dist(p, q), ps)  # x - y with only y batched
    # a tangent TT of one varying delta
    X = M.tangent_to_tt(p, us[0])
    (U, V), D = X.point_cores, X.deltas

    def tan(dl):
        return (tm.TangentTT(U, V, [D[0], dl] + D[2:]) - A).norm()

    assert torch.allclose(grad(tan)(D[1]), _grad_ref(tan, D[1]), atol=1e-12)
