"""One contract suite over every manifold-like object of the package (as geoopt's own
tests run one suite over its manifolds): the geoopt ``Manifold`` methods keep their
promises on every case, compared on represented tensors (packed cores are unique only up
to the point's gauge). Numerical oracles live in the per-module tests."""
from __future__ import annotations

import geoopt
import pytest
import torch

import ttmanifold as tm

F64, F32 = torch.float64, torch.float32

CASES = [
    ("d1", (7,), (1, 1)),
    ("d2", (4, 5), (1, 3, 1)),
    ("ragged", (3, 4, 5, 2), (1, 2, 4, 2, 1)),
    ("uniform", (4, 4, 4, 4, 4), 3),
    ("full_rank_bond", (2, 3, 2), (1, 2, 2, 1)),
]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    _, shape, ranks = request.param
    return tm.FixedTTRank(shape, ranks)


@pytest.fixture(params=[F64, F32], ids=["float64", "float32"])
def dtype(request):
    return request.param


def _tol(dtype):
    return 1e-10 if dtype == F64 else 2e-4


def _full(M, x):
    return M.to_tt(x).full().double()


def _tangent_full(M, x, u):
    if M.d == 1:
        return u.double().reshape(M.shape)
    return M.tangent_to_tt(x, u).full().double()


def _point_and_vectors(M, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = M.random(dtype=dtype, generator=g)
    u = M.proju(x, torch.randn(M.size, generator=g, dtype=F64).to(dtype))
    v = M.proju(x, torch.randn(M.size, generator=g, dtype=F64).to(dtype))
    return x, u, v


def test_points_are_on_the_manifold(case, dtype):
    M = case
    x = M.random(dtype=dtype)
    assert x.shape == (M.size,) and x.dtype == dtype
    ok, why = M._check_point_on_manifold(x)
    assert ok, why
    o = M.origin(dtype=dtype)
    assert M._check_point_on_manifold(o)[0]
    assert torch.equal(M.origin(dtype=dtype), o)  # deterministic


def test_projx_keeps_points_and_repairs_gauge(case, dtype):
    M = case
    x, _, _ = _point_and_vectors(M, dtype)
    assert torch.equal(M.projx(x), x)
    if M.d > 1:  # scale a core and its neighbour inversely: same tensor, not left-orthogonal
        cores = [c.clone() for c in M.split(x)]
        cores[0] = cores[0] * 2.0
        cores[1] = cores[1] / 2.0
        y = torch.cat([c.reshape(-1) for c in cores])
        assert not M._check_point_on_manifold(y)[0]
        z = M.projx(y)
        assert M._check_point_on_manifold(z)[0]
        assert torch.allclose(_full(M, z), _full(M, x), atol=_tol(dtype))


def test_proju_is_a_projection(case, dtype):
    M = case
    x, u, v = _point_and_vectors(M, dtype)
    tol = _tol(dtype)
    assert torch.allclose(M.proju(x, u), u, atol=tol)  # idempotent
    assert M._check_vector_on_tangent(x, u, atol=tol, rtol=tol)[0]
    a = M.proju(x, 2.0 * u - v)
    assert torch.allclose(a, 2.0 * u - v, atol=tol)  # linear on tangent vectors
    assert torch.allclose(M.egrad2rgrad(x, u), M.proju(x, u), atol=tol)


def test_metric(case, dtype):
    M = case
    x, u, v = _point_and_vectors(M, dtype)
    tol = _tol(dtype)
    assert torch.allclose(M.inner(x, u, v), M.inner(x, v, u), atol=tol)
    assert float(M.inner(x, u)) >= 0
    assert torch.allclose(M.norm(x, u) ** 2, M.inner(x, u), rtol=tol, atol=tol)
    # the metric is the Euclidean one of the represented tangent tensors
    ref = float((_tangent_full(M, x, u) * _tangent_full(M, x, v)).sum())
    assert abs(float(M.inner(x, u, v)) - ref) <= 10 * tol * max(1.0, abs(ref))
    c = M.component_inner(x, u)
    assert c.shape == u.shape
    assert M.inner(x, u, keepdim=True).shape == (1,)


def test_retraction(case, dtype):
    M = case
    x, u, _ = _point_and_vectors(M, dtype)
    tol = _tol(dtype)
    assert torch.allclose(_full(M, M.retr(x, 0 * u)), _full(M, x), atol=tol)
    y = M.retr(x, 0.3 * u)
    assert M._check_point_on_manifold(y)[0]
    with pytest.raises(NotImplementedError, match="use retr"):
        M.expmap(x, 0.3 * u)  # geoopt's convention: exact map or NotImplementedError
    # first order: ||R_x(t u) - (X + t xi)|| = O(t^2)
    X, xi = _full(M, x), _tangent_full(M, x, u)
    errs = []
    for t in (1e-2, 1e-3):
        errs.append(float((_full(M, M.retr(x, t * u)) - X - t * xi).norm()))
    if dtype == F64:  # second order: a tenth of the step, a hundredth of the error
        assert errs[1] <= max(0.03 * errs[0], 1e-12)


def test_transport(case, dtype):
    M = case
    x, u, v = _point_and_vectors(M, dtype)
    tol = _tol(dtype)
    y = M.retr(x, 0.2 * u)
    w = M.transp(x, y, v)
    assert M._check_vector_on_tangent(y, w, atol=10 * tol, rtol=10 * tol)[0]
    assert torch.allclose(_tangent_full(M, x, M.transp(x, x, v)), _tangent_full(M, x, v),
                          atol=10 * tol)
    y2, w2 = M.retr_transp(x, 0.2 * u, v)
    assert torch.allclose(_full(M, y2), _full(M, y), atol=tol)
    assert torch.allclose(_tangent_full(M, y2, w2), _tangent_full(M, y, w), atol=10 * tol)


def test_dist(case, dtype):
    M = case
    x, u, _ = _point_and_vectors(M, dtype)
    assert float(M.dist(x, x)) <= 10 * torch.finfo(dtype).eps
    y = M.retr(x, u)
    assert abs(float(M.dist(x, y)) - float((_full(M, x) - _full(M, y)).norm())) <= 10 * _tol(dtype)


def test_one_optimizer_step_stays_on_the_manifold(case, dtype):
    M = case
    g = torch.Generator().manual_seed(3)
    target = tm.TT.random(M.shape, 2, dtype=dtype, generator=g)
    p = geoopt.ManifoldParameter(M.random(dtype=dtype, generator=g), manifold=M)
    for opt in (geoopt.optim.RiemannianSGD([p], lr=0.1, momentum=0.9),
                geoopt.optim.RiemannianAdam([p], lr=0.01)):
        for _ in range(2):
            opt.zero_grad()
            X = p.unpack_tensor()
            loss = 0.5 * tm.inner(X, X) - tm.inner(X, target)
            loss.backward()
            opt.step()
        assert M._check_point_on_manifold(p.detach())[0]


# -- geoopt's own contract cases (tests/test_manifold_basic.py), in this suite's words -----

def test_projection_of_an_ambient_tensor_passes_geoopt_checks(case, dtype):
    """geoopt: ``projx`` of any ambient point passes ``assert_check_point_on_manifold``, and
    projecting a point again changes nothing."""
    M = case
    g = torch.Generator().manual_seed(7)
    amb = torch.randn(M.size, generator=g, dtype=F64).to(dtype)
    px = M.projx(amb)
    M.assert_check_point_on_manifold(px)
    assert torch.equal(M.projx(px), px)


def test_vector_projection_passes_geoopt_checks(case, dtype):
    M = case
    x, _, _ = _point_and_vectors(M, dtype)
    g = torch.Generator().manual_seed(8)
    v = torch.randn(M.size, generator=g, dtype=F64).to(dtype)
    pv = M.proju(x, v)
    M.assert_check_vector_on_tangent(x, pv, atol=_tol(dtype), rtol=_tol(dtype))
    assert torch.allclose(M.proju(x, pv), pv, atol=_tol(dtype))


def test_geoopt_conventions(case, dtype):
    """``random``/``origin`` return ``ManifoldTensor``s that carry the manifold; an
    explicit empty size is rejected as geoopt does; ``logmap`` and ``expmap`` have no
    closed form and say so; ``dist`` is the documented chordal distance; the manifold is
    not reversible (geoopt skips its reversibility case)."""
    M = case
    x = M.random(dtype=dtype)
    assert isinstance(x, geoopt.ManifoldTensor) and x.manifold is M
    o = M.origin(dtype=dtype)
    assert isinstance(o, geoopt.ManifoldTensor) and o.manifold is M
    with pytest.raises(ValueError, match="size"):
        M.random(())
    with pytest.raises(NotImplementedError):
        M.logmap(x, o)
    with pytest.raises(NotImplementedError):
        M.expmap_transp(x, x, x)
    assert not M.reversible
    p = geoopt.ManifoldParameter(x)
    assert p.manifold is M
