"""Tests of :class:`ttmanifold.FixedTTRank` against independent dense references.

The reference ("oracle") for everything tangent-space related is built from first
principles, without any of the manifold's own projection code: the tangent space of M_r at
X is the range of the Jacobian of the core map ``cores -> dense tensor`` (evaluated here with
a plain einsum contraction written in this file), so ``P = Q Q^T`` with ``Q`` the leading
``dim M_r`` left singular vectors of that Jacobian is the orthogonal tangent projector.

Only gauge-invariant quantities are compared between different computations: assembled
dense tangent vectors, inner products, dense points. Raw packed deltas are compared only
when both sides live at the same point and the gauge makes them unique.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ttmanifold as tm
from ttmanifold.manifold import right_cores
from ttmanifold import TT, FixedTTRank, IndexSet

F64 = torch.float64
F32 = torch.float32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---------------------------------------------------------------------------------------
# independent helpers (no ttmanifold code)
# ---------------------------------------------------------------------------------------

def split(M, x):
    """Packed flat tensor -> list of cores (the documented layout: cores concatenated)."""
    sizes = [a * b * c for a, b, c in M.core_shapes]
    return [c.reshape(s) for c, s in zip(torch.split(x, sizes), M.core_shapes)]


def full(cores):
    """Dense tensor of a list of TT cores by plain einsum contraction."""
    res = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    for c in cores[1:]:
        res = torch.einsum("ia,ajb->ijb", res, c).reshape(-1, c.shape[2])
    return res.reshape([int(c.shape[1]) for c in cores])


def dense_point(M, p):
    return full(split(M, p))


def dense_tangent(M, p, u):
    """Assembled dense tangent vector (tangent_to_tt is itself checked against the oracle)."""
    return full(M.tangent_to_tt(p, u).cores)


def formula_dim(shape, ranks):
    return (sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape))
            - sum(r * r for r in ranks[1:-1]))


def jacobian_svd(M, p):
    p64 = p.detach().to(F64)
    J = torch.autograd.functional.jacobian(
        lambda v: full(split(M, v)).reshape(-1), p64, vectorize=True)
    Uj, S, _ = torch.linalg.svd(J, full_matrices=False)
    return Uj, S


def oracle(M, p, *, check_rank=True):
    """Orthogonal projector (N x N, float64) onto the tangent space at p."""
    Uj, S = jacobian_svd(M, p)
    if check_rank:
        tol = 1e-10 * float(S[0])
        rank = int((S > tol).sum())
        assert rank == M.dim == formula_dim(M.shape, M.ranks), (rank, M.dim)
    Q = Uj[:, : M.dim]
    return Q @ Q.T


def rel_err(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def close(a, b, tol=1e-10):
    """||a - b|| <= tol * max(1, ||b||)."""
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).norm()) <= tol * max(1.0, float(b.norm()))


def random_tt_cores(shape, R, gen, dtype=F64):
    """Gaussian cores with inner ranks R (redundant ranks are fine for a TT)."""
    d = len(shape)
    ranks = [1] + [R] * (d - 1) + [1]
    return [torch.randn(ranks[k], n, ranks[k + 1], dtype=dtype, generator=gen)
            for k, n in enumerate(shape)]


def uncoalesced_sparse(shape, gen, n_samples, dtype=F64):
    """Sparse COO tensor with duplicate indices (not coalesced) and its dense sum."""
    numel = math.prod(shape)
    flat = torch.randint(0, numel, (n_samples,), generator=gen)
    flat = torch.cat([flat, flat[: max(1, n_samples // 3)]])  # guaranteed duplicates
    idx = torch.stack(torch.unravel_index(flat, shape), 0) if len(shape) > 1 else flat[None]
    vals = torch.randn(flat.shape[0], dtype=dtype, generator=gen)
    Z = torch.sparse_coo_tensor(idx, vals, shape, check_invariants=True)
    dense = torch.zeros(numel, dtype=dtype).index_add_(0, flat, vals).reshape(shape)
    return Z, dense, idx.t().contiguous(), vals


def slope(ts, errs):
    x = torch.log(torch.tensor(ts, dtype=F64))
    y = torch.log(torch.tensor(errs, dtype=F64))
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


@st.composite
def manifolds(draw, max_d=5, max_n=4, max_numel=128):
    d = draw(st.integers(1, max_d))
    shape = tuple(draw(st.lists(st.integers(1, max_n), min_size=d, max_size=d)))
    assume(math.prod(shape) <= max_numel)
    feas = tm.feasible_ranks(shape)
    ranks = [1]
    for k in range(1, d):
        ranks.append(draw(st.integers(1, min(feas[k], ranks[-1] * shape[k - 1]))))
    ranks.append(1)
    for k in range(d - 1, 0, -1):  # attainable from the right as well
        ranks[k] = min(ranks[k], shape[k] * ranks[k + 1])
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, tuple(ranks), seed


def fixed_case(shape=(3, 4, 3, 2), ranks=(1, 2, 3, 2, 1), seed=0, dtype=F64):
    M = FixedTTRank(shape, ranks)
    gen = torch.Generator().manual_seed(seed)
    return M, M.random(dtype=dtype, generator=gen), gen


# ---------------------------------------------------------------------------------------
# projection and gradients against the Jacobian oracle (property based)
# ---------------------------------------------------------------------------------------

# 25 examples by default; a profile asking for more (HYPOTHESIS_PROFILE=thorough) gets more
_N_EXAMPLES = max(25, settings().max_examples) if settings().max_examples > 30 else 25


@settings(max_examples=_N_EXAMPLES, deadline=None)
@given(manifolds())
def test_projection_and_gradients_match_oracle(case):
    shape, ranks, seed = case
    M = FixedTTRank(shape, ranks)
    assert M.dim == formula_dim(shape, ranks)
    gen = torch.Generator().manual_seed(seed)
    p = M.random(dtype=F64, generator=gen)
    assert M._check_point_on_manifold(p)[0]
    assert unfolding_ranks(dense_point(M, p)) == M.ranks
    o = M.origin(dtype=F64)
    assert torch.equal(o, M.origin(dtype=F64))  # deterministic
    assert M._check_point_on_manifold(o)[0]
    assert unfolding_ranks(dense_point(M, o)) == M.ranks
    P = oracle(M, p)  # also checks rank(J) == M.dim
    X = dense_point(M, p)
    assert close(M.to_tt(p).full(), X, 1e-14)

    def ref(G):
        return (P @ G.reshape(-1)).reshape(shape)

    # tangent_to_tt of arbitrary (non-gauged) deltas lies in the tangent space
    t = dense_tangent(M, p, torch.randn(M.size, dtype=F64, generator=gen))
    assert close(ref(t), t)

    # project: dense, TT, sparse (duplicates, uncoalesced)
    Z = torch.randn(shape, dtype=F64, generator=gen)
    u = M.project(p, Z)
    assert close(dense_tangent(M, p, u), ref(Z))
    Zc = random_tt_cores(shape, 3, gen)
    assert close(dense_tangent(M, p, M.project(p, TT(Zc))), ref(full(Zc)))
    Zs, Zs_dense, idx, vals = uncoalesced_sparse(shape, gen, 2 * math.prod(shape))
    assert not Zs.is_coalesced()
    us = M.project(p, Zs)
    assert close(dense_tangent(M, p, us), ref(Zs_dense))
    assert close(us, M.project(p, Zs.coalesce()), 1e-12)  # same point: gauge unique

    # proju / egrad2rgrad of packed D_k = adjoint of the delta map applied to Z
    delta = torch.zeros(M.size, dtype=F64, requires_grad=True)
    inner_z = (dense_tangent(M, p, delta) * Z).sum()
    (D,) = torch.autograd.grad(inner_z, delta)
    assert close(dense_tangent(M, p, M.proju(p, D)), ref(Z))
    assert close(dense_tangent(M, p, M.egrad2rgrad(p, D)), ref(Z))

    # inner products, norm, idempotency, identity of proju on tangent vectors
    v = M.project(p, torch.randn(shape, dtype=F64, generator=gen))
    du, dv = dense_tangent(M, p, u), dense_tangent(M, p, v)
    assert abs(float(M.inner(p, u, v)) - float((du * dv).sum())) <= 1e-10 * max(
        1.0, float(du.norm() * dv.norm()))
    assert abs(float(M.norm(p, u)) - float(du.norm())) <= 1e-10 * max(1.0, float(du.norm()))
    assert close(M.project(p, du), u, 1e-10)
    assert close(M.proju(p, u), u, 1e-12)
    assert M._check_vector_on_tangent(p, u)[0]

    # the gradient path: unpack_tensor's backward gives the Riemannian gradient
    A = torch.randn(shape, dtype=F64, generator=gen)
    pp = p.clone().requires_grad_()
    T = M.unpack_tensor(pp)
    assert close(full(T.cores), X, 1e-13)
    (0.5 * (full(T.cores) - A).pow(2).sum()).backward()
    assert close(dense_tangent(M, p, pp.grad), ref(X - A))
    assert close(dense_tangent(M, p, M.egrad2rgrad(p, pp.grad)), ref(X - A))

    # riemannian_grad: quadratic, non-quadratic, sampled entries
    g = M.riemannian_grad(p, lambda T: 0.5 * (T.full() - A).pow(2).sum())
    assert close(dense_tangent(M, p, g), ref(X - A))
    g = M.riemannian_grad(p, lambda T: torch.sin(3 * T.full()).sum())
    assert close(dense_tangent(M, p, g), ref(3 * torch.cos(3 * X)))
    iset = IndexSet(idx, shape)
    a = torch.randn(idx.shape[0], dtype=F64, generator=gen)
    g = M.riemannian_grad(p, lambda T: 0.5 * (iset.gather(T) - a).pow(2).sum())
    resid = X[tuple(idx.t())] - a
    G = torch.zeros(shape, dtype=F64).index_put_(tuple(idx.t()), resid, accumulate=True)
    assert close(dense_tangent(M, p, g), ref(G))

    # gauge: same tangent vector, gauged deltas
    nu = torch.randn(M.size, dtype=F64, generator=gen)
    gu = M.gauge(p, nu)
    assert close(dense_tangent(M, p, gu), dense_tangent(M, p, nu))
    for Uk, dk in zip(split(M, p)[:-1], split(M, gu)[:-1]):
        ul, dl = Uk.reshape(-1, Uk.shape[2]), dk.reshape(-1, dk.shape[2])
        assert float((ul.T @ dl).abs().max()) <= 1e-12 * max(1.0, float(nu.abs().max()))


@pytest.mark.parametrize("chunk", [None, 5])
def test_sparse_projection_unbalanced_groups(chunk, monkeypatch):
    """Skewed samples: IndexSet falls back from padded groups to per-sample products
    (optionally in several chunks); still the oracle projection, duplicates summed."""
    import ttmanifold.tt.index_set as index_set_mod

    if chunk is not None:
        monkeypatch.setattr(index_set_mod, "CHUNK", chunk)
    M, p, gen = fixed_case((8, 3, 7), (1, 3, 3, 1), seed=14)
    N = 40
    idx = torch.stack([torch.zeros(N, dtype=torch.long),  # every sample in one group
                       torch.randint(0, 3, (N,), generator=gen),
                       torch.where(torch.arange(N) < N - 3, 6, torch.arange(N) % 7)], 1)
    idx[-1] = torch.tensor([5, 1, 2])
    idx[1] = idx[0]  # a duplicate
    vals = torch.randn(N, dtype=F64, generator=gen)
    iset = IndexSet(idx, M.shape)
    assert not iset.plan(0).padded and not iset.plan(2).padded  # the fallback path
    Zs = torch.sparse_coo_tensor(idx.t(), vals, M.shape, check_invariants=True)
    dense = torch.zeros(M.shape, dtype=F64).index_put_(tuple(idx.t()), vals, accumulate=True)
    P = oracle(M, p)
    ref = (P @ dense.reshape(-1)).reshape(M.shape)
    assert close(dense_tangent(M, p, M.project(p, Zs)), ref)
    assert close(dense_tangent(M, p, M.project_sampled(p, iset, vals)), ref)
    X = dense_point(M, p)
    assert close(iset.gather(M.to_tt(p)), X[tuple(idx.t())], 1e-13)
    g = M.riemannian_grad(p, lambda T: 0.5 * (iset.gather(T) - vals).pow(2).sum())
    G = torch.zeros(M.shape, dtype=F64).index_put_(tuple(idx.t()), X[tuple(idx.t())] - vals,
                                                    accumulate=True)
    assert close(dense_tangent(M, p, g), (P @ G.reshape(-1)).reshape(M.shape))


@pytest.mark.parametrize("shape,ranks", [((5, 5, 2), (1, 3, 1, 1)), ((3, 3, 4, 1), (1, 1, 3, 1, 1)),
                                         ((2, 1, 5, 4, 2), (1, 2, 2, 8, 2, 1)),
                                         ((3, 4, 3, 2), (1, 2, 3, 2, 1))])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_origin_is_a_point_of_exact_rank(shape, ranks, dtype):
    M = FixedTTRank(shape, ranks)
    o = M.origin(dtype=dtype)
    assert o.dtype == dtype and torch.equal(o, M.origin(dtype=dtype))
    ok, msg = M._check_point_on_manifold(o)
    assert ok, msg
    assert unfolding_ranks(dense_point(M, o.to(F64)), 1e-6) == M.ranks
    assert abs(float(dense_point(M, o.to(F64)).norm()) - 1) < 1e-6


def test_random_refuses_unknown_keywords():
    # swallowed by **kwargs: a misspelt dtype drew float32, geoopt's std was ignored
    M = FixedTTRank((3, 4, 3, 2), (1, 2, 3, 2, 1))
    for kw in ({"dtyp": F64}, {"std": 0.1}):
        for fn in (M.random, M.random_normal):
            with pytest.raises(TypeError, match=f"random: unexpected keyword argument\\(s\\) "
                                                f"{next(iter(kw))}"):
                fn(**kw)


def test_origin_in_a_default_device_context():
    # origin's CPU draw followed a default-device context: another point there (on CUDA a
    # CPU generator with a CUDA draw), and origin(device="cpu") failed under meta
    M = FixedTTRank((3, 4, 3, 2), (1, 2, 3, 2, 1))
    ref = M.origin(dtype=F64)
    with torch.device("meta"):
        assert torch.equal(M.origin(dtype=F64, device="cpu"), ref)
        o = M.origin(2, dtype=F32)
    assert o.device.type == "meta" and o.shape == (2, M.size)  # None: the default device


def tt_svd_right_to_left(X, ranks):
    """Dense TT-SVD sweeping from the last mode (truncated SVDs), as a dense tensor."""
    shape = X.shape
    d = len(shape)
    c, right = X.reshape(-1, shape[-1]), []
    r_next = 1
    for k in range(d - 1, 0, -1):
        c = c.reshape(-1, shape[k] * r_next)
        u, s, vh = torch.linalg.svd(c, full_matrices=False)
        r = ranks[k]
        right.insert(0, vh[:r].reshape(r, shape[k], r_next))
        c = u[:, :r] * s[:r]
        r_next = r
    return full([c.reshape(1, shape[0], r_next)] + right)


def test_pack_point_rounds_higher_ranks():
    M = FixedTTRank((3, 4, 3, 2), (1, 2, 3, 2, 1))
    gen = torch.Generator().manual_seed(15)
    x = TT.random(M.shape, (1, 3, 4, 2, 1), dtype=F64, generator=gen)
    p = M.pack_point(x)
    assert M._check_point_on_manifold(p)[0]
    assert close(dense_point(M, p), tt_svd_right_to_left(full(x.cores), M.ranks), 1e-12)
    # cores given as a list, same rank: same tensor
    y = TT.random(M.shape, M.ranks, dtype=F64, generator=gen)
    assert close(dense_point(M, M.pack_point(y.cores)), full(y.cores), 1e-13)
    assert close(dense_point(M, M.pack_point(*y.cores)), full(y.cores), 1e-13)


def test_dim_formula_examples():
    assert FixedTTRank((5, 4), 2).dim == 2 * (5 + 4 - 2)  # fixed-rank matrices
    assert FixedTTRank((3, 4, 3, 2), (1, 2, 3, 2, 1)).dim == 6 + 24 + 18 + 4 - (4 + 9 + 4)
    assert FixedTTRank((7,), (1, 1)).dim == 7


def test_component_inner_keeps_the_gauge():
    """RiemannianAdam divides by sqrt(component_inner): it must be constant on every core
    block (so the direction stays gauged) and, as documented, equal <u, v>."""
    M, p, gen = fixed_case(seed=16)
    u = M.project(p, torch.randn(M.shape, dtype=F64, generator=gen))
    v = M.project(p, torch.randn(M.shape, dtype=F64, generator=gen))
    c = M.component_inner(p, u, v)
    assert c.shape == u.shape and c.data_ptr() != u.data_ptr()
    for block in split(M, c):
        assert torch.all(block == block.reshape(-1)[0])
    assert torch.allclose(c, M.inner(p, u, v).expand(c.shape), rtol=1e-13, atol=0)
    cu = M.component_inner(p, u)
    assert bool((cu >= 0).all())
    ok, msg = M._check_vector_on_tangent(p, u / (cu.sqrt() + 1e-8), atol=1e-12, rtol=1e-12)
    assert ok, msg


def test_egrad2rgrad_returns_no_alias():
    for shape, ranks in [((3, 4, 3, 2), (1, 2, 3, 2, 1)), ((5,), (1, 1)), ((1, 1), (1, 1, 1))]:
        M = FixedTTRank(shape, ranks)
        p = M.random(dtype=F64)
        gvec = M.project(p, torch.randn(shape, dtype=F64))  # already gauged: a no-op projection
        keep = gvec.clone()
        out = M.egrad2rgrad(p, gvec)
        assert out.data_ptr() != gvec.data_ptr()
        out.add_(1.0)
        assert torch.equal(gvec, keep)
        out2 = M.proju(p, gvec)
        assert out2.data_ptr() != gvec.data_ptr()


# ---------------------------------------------------------------------------------------
# retraction and transport
# ---------------------------------------------------------------------------------------

def unfolding_ranks(X, tol=1e-9):
    shape = X.shape
    out = [1]
    for k in range(1, len(shape)):
        out.append(int(torch.linalg.matrix_rank(X.reshape(math.prod(shape[:k]), -1),
                                                rtol=tol)))
    return tuple(out + [1])


@pytest.mark.parametrize("shape,ranks", [((3, 4, 3, 2), (1, 2, 3, 2, 1)),
                                         ((4, 3, 4), (1, 3, 3, 1)),
                                         ((2, 3, 2, 3, 2), (1, 2, 3, 3, 2, 1))])
def test_retraction_second_order_and_on_manifold(shape, ranks):
    M, p, gen = fixed_case(shape, ranks, seed=3)
    X = dense_point(M, p)
    u = M.project(p, torch.randn(shape, dtype=F64, generator=gen))
    U = dense_tangent(M, p, u)
    u = u / U.norm()
    U = U / U.norm()
    y = M.retr(p, u)
    ok, msg = M._check_point_on_manifold(y)
    assert ok, msg
    assert unfolding_ranks(dense_point(M, y)) == M.ranks
    # R(x, 0) is x (possibly in another gauge: compare dense tensors); dist is chordal
    assert close(dense_point(M, M.retr(p, torch.zeros_like(p))), X, 1e-13)
    assert abs(float(M.dist(p, y)) - float((dense_point(M, y) - X).norm())) < 1e-12
    ts = [10.0 ** (-e) for e in (1, 1.5, 2, 2.5, 3, 3.5, 4)]
    errs = [float((dense_point(M, M.retr(p, t * u)) - (X + t * U)).norm()) for t in ts]
    assert 1.8 < slope(ts, errs) < 2.2, errs

    # Taylor remainder of a (non-quadratic) loss along the retraction curve
    A = torch.randn(shape, dtype=F64, generator=gen)

    def f_dense(Xd):
        return 0.5 * (Xd - A).pow(2).sum() + torch.sin(2 * Xd).sum()

    g = M.riemannian_grad(p, lambda T: f_dense(T.full()))
    f0 = f_dense(X)
    gu = float(M.inner(p, g, u))
    # (t <= 1e-2: at larger t the third-order term still competes with the second)
    ts = [10.0 ** (-e) for e in (2, 2.5, 3, 3.5, 4)]
    rem = [abs(float(f_dense(dense_point(M, M.retr(p, t * u))) - f0) - t * gu) for t in ts]
    assert 1.8 < slope(ts, rem) < 2.2, rem


def tt_svd_left_to_right(X, ranks):
    """Dense TT-SVD sweeping from the first mode (truncated SVDs), as a dense tensor."""
    shape = X.shape
    cores, c, r_prev = [], X.reshape(1, -1), 1
    for k in range(len(shape) - 1):
        u, s, vh = torch.linalg.svd(c.reshape(r_prev * shape[k], -1), full_matrices=False)
        r = ranks[k + 1]
        cores.append(u[:, :r].reshape(r_prev, shape[k], r))
        c, r_prev = s[:r, None] * vh[:r], r
    return full(cores + [c.reshape(r_prev, shape[-1], 1)])


@settings(max_examples=max(10, _N_EXAMPLES // 2), deadline=None)
@given(manifolds(), st.booleans(), st.floats(0.05, 2.0))
def test_retraction_is_tt_svd_of_x_plus_xi(case, gauged, scale):
    """retr = TT-SVD (left to right) of the dense X + xi, for gauged and non-gauged deltas."""
    shape, ranks, seed = case
    M = FixedTTRank(shape, ranks)
    gen = torch.Generator().manual_seed(seed)
    p = M.random(dtype=F64, generator=gen)
    u = torch.randn(M.size, dtype=F64, generator=gen)
    if gauged:
        u = M.proju(p, u)
    xi = dense_tangent(M, p, u)
    assume(float(xi.norm()) > 1e-8)
    u = u * (scale / float(xi.norm()))
    Y = dense_point(M, p) + scale * xi / xi.norm()
    for k in range(1, len(shape)):  # a clear gap at the truncation rank (unique TT-SVD)
        sv = torch.linalg.svdvals(Y.reshape(math.prod(shape[:k]), -1))
        if sv.shape[0] > ranks[k]:
            assume(float(sv[ranks[k] - 1] - sv[ranks[k]]) > 1e-6 * float(sv[0]))
    y = M.retr(p, u)
    assert close(dense_point(M, y), tt_svd_left_to_right(Y, M.ranks), 1e-8)
    U = split(M, y)
    for c in U[:-1]:  # left-orthogonal output
        cl = c.reshape(-1, c.shape[2])
        assert close(cl.T @ cl, torch.eye(cl.shape[1], dtype=F64), 1e-12)
    # the shared work of retr_transp gives the same point
    y2, _ = M.retr_transp(p, u, u)
    assert close(y2, y, 1e-12)


def test_retraction_rank_collapse_gives_a_finite_padded_point():
    M, p, gen = fixed_case((3, 4, 3, 2), (1, 2, 3, 2, 1), seed=8)
    u = torch.zeros_like(p)
    last = M.size - math.prod(M.core_shapes[-1])
    u[last:] = -p[last:]  # xi = -X: X + xi = 0
    y = M.retr(p, u)
    assert torch.isfinite(y).all()
    assert close(dense_point(M, y), torch.zeros(M.shape, dtype=F64), 1e-12)
    for c in split(M, y)[:-1]:
        cl = c.reshape(-1, c.shape[2])
        assert close(cl.T @ cl, torch.eye(cl.shape[1], dtype=F64), 1e-12)


def test_no_autograd_fast_path_and_differentiable_path():
    """Without gradients the sweeps run in inference mode but return ordinary tensors;
    with an input requiring grad, the same call is differentiable (checked against
    central differences of gauge-invariant dense tensors)."""
    M, p, gen = fixed_case((3, 4, 3, 2), (1, 2, 3, 2, 1), seed=9)
    u = M.project(p, torch.randn(M.shape, dtype=F64, generator=gen))
    Zt = TT(random_tt_cores(M.shape, 2, gen))
    outs = [M.retr(p, u), M.project(p, Zt), M.proju(p, u), M.transp(p, M.retr(p, u), u),
            *M.retr_transp(p, u, u), M.projx(p), M.gauge(p, u), M.egrad2rgrad(p, u)]
    for o in outs:
        assert not o.is_inference() and not o.requires_grad
        w = o.clone().requires_grad_()
        (w * o).sum().backward()  # usable in autograd afterwards
    with torch.inference_mode():
        assert M.retr(p, u).is_inference()

    t0, h = 0.3, 1e-6
    t = torch.tensor(t0, dtype=F64, requires_grad=True)
    Y = dense_point(M, M.retr(p, t * u))
    W = torch.randn(M.shape, dtype=F64, generator=gen)
    (g,) = torch.autograd.grad((Y * W).sum(), t)
    fd = ((dense_point(M, M.retr(p, (t0 + h) * u)) - dense_point(M, M.retr(p, (t0 - h) * u)))
          * W).sum() / (2 * h)
    assert abs(float(g) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))
    # projection of a TT whose cores require grad
    Zg = TT([c.clone().requires_grad_() for c in Zt.cores])
    pr = M.project(p, Zg)
    assert pr.requires_grad
    (gz,) = torch.autograd.grad((dense_tangent(M, p, pr) * W).sum(), Zg.cores[1])
    P = oracle(M, p)
    PW = (P @ W.reshape(-1)).reshape(M.shape)  # <P Z, W> = <Z, P W>
    zc = [c.detach().clone().requires_grad_(k == 1) for k, c in enumerate(Zt.cores)]
    (ref,) = torch.autograd.grad((full(zc) * PW).sum(), zc[1])
    assert close(gz, ref, 1e-10)


def test_retraction_d1_is_exact():
    M = FixedTTRank((5,), (1, 1))
    p = M.random(dtype=F64)
    u = torch.randn(M.size, dtype=F64)
    assert close(dense_point(M, M.retr(p, u)), dense_point(M, p) + dense_tangent(M, p, u), 1e-14)


def test_transport_matches_oracle():
    M, p, gen = fixed_case(seed=5)
    u = M.project(p, torch.randn(M.shape, dtype=F64, generator=gen))
    v = M.project(p, torch.randn(M.shape, dtype=F64, generator=gen))
    assert torch.allclose(M.transp(p, p, v), v, atol=1e-13, rtol=0)
    y = M.retr(p, 0.3 * u)
    w = M.transp(p, y, v)
    assert M._check_vector_on_tangent(y, w)[0]
    Py = oracle(M, y)
    ref = (Py @ dense_tangent(M, p, v).reshape(-1)).reshape(M.shape)
    assert close(dense_tangent(M, y, w), ref)
    # retr_transp == (retr, transp)
    y2, w2 = M.retr_transp(p, 0.3 * u, v)
    assert close(dense_point(M, y2), dense_point(M, y), 1e-13)
    assert close(dense_tangent(M, y2, w2), ref)
    # transport by orthogonal projection is non-expansive
    assert float(M.norm(y, w)) <= float(M.norm(p, v)) * (1 + 1e-12)


def test_retr_and_transp_accept_non_gauged_deltas():
    M, p, gen = fixed_case(seed=6)
    nu = 0.3 * torch.randn(M.size, dtype=F64, generator=gen)
    nv = torch.randn(M.size, dtype=F64, generator=gen)
    gu, gv = M.gauge(p, nu), M.gauge(p, nv)
    # non-gauged input really is non-gauged
    assert not M._check_vector_on_tangent(p, nu)[0]
    assert close(dense_point(M, M.retr(p, nu)), dense_point(M, M.retr(p, gu)), 1e-12)
    y = M.retr(p, gu)
    assert close(dense_tangent(M, y, M.transp(p, y, nv)),
                 dense_tangent(M, y, M.transp(p, y, gv)), 1e-12)
    y1, w1 = M.retr_transp(p, nu, nv)
    y2, w2 = M.retr_transp(p, gu, gv)
    assert close(dense_point(M, y1), dense_point(M, y2), 1e-12)
    assert close(dense_tangent(M, y1, w1), dense_tangent(M, y2, w2), 1e-12)
    assert M._check_point_on_manifold(M.retr(p, nu))[0]


# ---------------------------------------------------------------------------------------
# d = 2: the fixed-rank matrix manifold
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,r", [(5, 4, 2), (6, 3, 3), (4, 4, 1)])
def test_matrix_case(m, n, r):
    M, p, gen = fixed_case((m, n), (1, r, 1), seed=7)
    X = dense_point(M, p)
    U, S, Vh = torch.linalg.svd(X)
    PU = U[:, :r] @ U[:, :r].T
    PV = Vh[:r].T @ Vh[:r]
    Z = torch.randn(m, n, dtype=F64, generator=gen)
    ref = PU @ Z + Z @ PV - PU @ Z @ PV
    u = M.project(p, Z)
    assert close(dense_tangent(M, p, u), ref)
    assert abs(float(M.inner(p, u, u)) - float((ref * ref).sum())) < 1e-10
    xi = dense_tangent(M, p, u)
    for t in (1.0, 0.3, 1e-3):
        Y = X + t * xi
        Uy, Sy, Vhy = torch.linalg.svd(Y)
        best = (Uy[:, :r] * Sy[:r]) @ Vhy[:r]
        assert close(dense_point(M, M.retr(p, t * u)), best, 1e-11)


# ---------------------------------------------------------------------------------------
# projx
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F64])
def test_projx_idempotent_bitwise(dtype):
    M = FixedTTRank((3, 4, 3, 2), (1, 2, 3, 2, 1))
    gen = torch.Generator().manual_seed(8)
    p = M.random(dtype=dtype, generator=gen)
    assert torch.equal(M.projx(p), p)
    o = M.origin(dtype=dtype)
    assert torch.equal(M.projx(o), o)
    q = M.projx(M.random(dtype=F64, generator=gen).to(dtype))  # cast point
    assert torch.equal(M.projx(q), q)
    for _ in range(10):
        u = M.project(q, torch.randn(M.shape, dtype=dtype, generator=gen))
        q = M.retr(q, 0.5 * u / M.norm(q, u))
        assert torch.equal(M.projx(q), q)
        assert torch.equal(M.projx(M.projx(q)), q)


def test_projx_skips_the_sweep_for_valid_points_on_the_cpu(monkeypatch):
    """On the CPU, projx of valid points (one or a batch) runs no QR (the Adam step calls it
    every step), returns a new tensor equal bit for bit, and still repairs a batch with one
    bad point; the GPU's path (forced) keeps the device-side choice, which runs the sweep."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ttmanifold.manifold import sweeps

    class QRCount(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "linalg_qr" in str(func):
                QRCount.n += 1
            return func(*args, **(kwargs or {}))

    def qrs(fn):
        QRCount.n = 0
        with QRCount():
            out = fn()
        return out, QRCount.n

    M = FixedTTRank((3, 4, 3, 2), (1, 2, 3, 2, 1))
    gen = torch.Generator().manual_seed(10)
    for p in (M.random(dtype=F64, generator=gen), M.random(4, dtype=F64, generator=gen)):
        q, n = qrs(lambda: M.projx(p))
        assert n == 0 and torch.equal(q, p) and q.data_ptr() != p.data_ptr()
        bad = p.clone()
        bad[..., :6] *= 1.5  # the first core of (every) point is no longer orthonormal
        q, n = qrs(lambda: M.projx(bad))
        assert n > 0 and M.check_point_on_manifold(q)
        for qi, bi in zip(q.reshape(-1, M.size), bad.reshape(-1, M.size)):
            assert close(dense_point(M, qi), dense_point(M, bi), 1e-12)
        monkeypatch.setattr(sweeps, "PAIRED_SWEEPS", True)
        q, n = qrs(lambda: M.projx(p))
        assert n > 0 and torch.equal(q, p)
        monkeypatch.setattr(sweeps, "PAIRED_SWEEPS", None)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_projx_of_off_manifold_tensor(dtype):
    M = FixedTTRank((3, 4, 3, 2), (1, 2, 3, 2, 1))
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(M.size, dtype=F64, generator=gen).to(dtype)
    assert not M._check_point_on_manifold(x)[0]
    y = M.projx(x)
    ok, msg = M._check_point_on_manifold(y)
    assert ok, msg
    tol = 1e-12 if dtype == F64 else 1e-5
    assert rel_err(dense_point(M, y).to(F64), dense_point(M, x).to(F64)) < tol
    assert torch.equal(M.projx(y), y)


# ---------------------------------------------------------------------------------------
# structured tangent TTs: inner / norm / scaling without the rank-2r cores
# ---------------------------------------------------------------------------------------

def _structured_losses(A_tt):
    """Losses written with inner/norm/scaling (the structured paths) and their dense
    gradients (independent: plain autograd on the dense tensor)."""
    Ad = full(A_tt.cores)
    return [
        ("quadratic", lambda T: 0.5 * tm.inner(T, T) - tm.inner(T, A_tt) + 0.5 * tm.inner(A_tt, A_tt),
         lambda X: X - Ad),
        ("norm", lambda T: T.norm(), lambda X: X / X.norm()),
        ("scaled", lambda T: tm.inner(A_tt, 2.0 * T) ** 2, lambda X: 8 * (X * Ad).sum() * Ad),
        ("cubic", lambda T: tm.inner(T, T) * tm.inner(T, A_tt),
         lambda X: 2 * (X * Ad).sum() * X + (X * X).sum() * Ad),
        ("mixed", lambda T: tm.inner(T, T + A_tt) - (-T).norm() ** 2,  # = <X, A>
         lambda X: Ad),
    ]


@settings(max_examples=max(10, _N_EXAMPLES // 2), deadline=None)
@given(manifolds())
def test_structured_tangent_tt_matches_dense(case):
    shape, ranks, seed = case
    assume(len(shape) >= 2)
    M = FixedTTRank(shape, ranks)
    gen = torch.Generator().manual_seed(seed)
    p = M.random(dtype=F64, generator=gen)
    P = oracle(M, p)
    X = dense_point(M, p)
    A_tt = TT(random_tt_cores(shape, 2, gen))
    Ad = full(A_tt.cores)
    u = M.project(p, torch.randn(shape, dtype=F64, generator=gen))   # gauged
    w = torch.randn(M.size, dtype=F64, generator=gen)                  # not gauged
    for vec in (u, w):
        T = M.tangent_to_tt(p, vec)
        val = tm.inner(T, A_tt)
        assert T._dense is None  # <T, A> never built the rank-2r cores
        Td = full(TT(T.cores).cores)  # the rank-2r block cores, assembled independently
        assert T.ranks == (1,) + tuple(2 * r for r in M.ranks[1:-1]) + (1,)
        assert T.ranks == TT(T.cores).ranks and T.shape == M.shape
        assert abs(float(val) - float((Td * Ad).sum())) <= 1e-11 * max(1.0, float(Td.norm() * Ad.norm()))
        assert abs(float(tm.inner(A_tt, T)) - float(val)) <= 1e-12 * max(1.0, abs(float(val)))
        assert abs(float(tm.inner(T, T)) - float((Td * Td).sum())) <= 1e-11 * max(1.0, float((Td * Td).sum()))
        assert abs(float(T.norm()) - float(Td.norm())) <= 1e-11 * max(1.0, float(Td.norm()))
        assert close(full((3.0 * T).cores), 3.0 * Td, 1e-12)

    # gradients through the structured paths agree with the oracle-projected dense ones
    for name, f, grad in _structured_losses(A_tt):
        ref = (P @ grad(X).reshape(-1)).reshape(shape)
        g = M.riemannian_grad(p, f)
        assert close(dense_tangent(M, p, g), ref, 1e-9), name
        pp = p.clone().requires_grad_()
        f(M.unpack_tensor(pp)).backward()
        assert close(dense_tangent(M, p, pp.grad), ref, 1e-9), name


@pytest.mark.parametrize("shape,ranks", [((3, 4, 3, 2), (1, 2, 3, 2, 1)), ((3,) * 5, 2)])
def test_sampled_entries_of_tangent_tt_gradient_and_hvp(shape, ranks):
    """IndexSet.gather of the autodiff TangentTT runs at rank r (left/right vectors of U
    and V, one grouped product per mode); gradient and Hessian-vector product of a
    completion-type loss against the dense oracle."""
    M = FixedTTRank(shape, ranks)
    gen = torch.Generator().manual_seed(23)
    p = M.random(dtype=F64, generator=gen)
    N = 2 * math.prod(shape) // 3
    flat = torch.randperm(math.prod(shape), generator=gen)[:N]
    idx = torch.stack(torch.unravel_index(flat, shape), 1)
    iset = IndexSet(idx, shape)
    a = torch.randn(N, dtype=F64, generator=gen)

    def f(T):
        v = iset.gather(T)
        return 0.5 * (v - a).pow(2).sum() + 0.1 * v.pow(3).sum()

    def fd(Xd):
        v = Xd[tuple(idx.t())]
        return 0.5 * (v - a).pow(2).sum() + 0.1 * v.pow(3).sum()

    X = dense_point(M, p)
    P = oracle(M, p)
    Xr = X.clone().requires_grad_()
    (G,) = torch.autograd.grad(fd(Xr), Xr)
    ref = (P @ G.reshape(-1)).reshape(shape)
    T = M.tangent_to_tt(p, torch.zeros_like(p))
    assert torch.equal(iset.gather(T), iset.gather(TT(T.cores)))  # no grad: block cores
    assert close(dense_tangent(M, p, M.riemannian_grad(p, f)), ref)
    pp = p.clone().requires_grad_()
    X_t = M.unpack_tensor(pp)
    assert close(iset.gather(X_t).detach(), X[tuple(idx.t())], 1e-13)
    f(X_t).backward()
    assert close(dense_tangent(M, p, pp.grad), ref)
    H = torch.autograd.functional.hessian(lambda v: fd(v.reshape(shape)), X.reshape(-1))
    u = M.project(p, torch.randn(shape, dtype=F64, generator=gen))
    refH = (P @ (H @ (P @ dense_tangent(M, p, u).reshape(-1)))).reshape(shape)
    assert close(dense_tangent(M, p, M.riemannian_hvp(p, f, u)), refH)

    # backward twice with retain_graph; double backward needs twice_differentiable()
    pp = p.clone().requires_grad_()
    loss = f(M.unpack_tensor(pp))
    loss.backward(retain_graph=True)
    g1 = pp.grad.clone()
    loss.backward()
    assert close(pp.grad, 2 * g1, 1e-14)
    # double backward by hand (create_graph) through unpack_tensor + gather
    delta = torch.zeros_like(p).requires_grad_()
    xi = M.tangent_to_tt(p, delta)
    last = [c + u0 if k == M.d - 1 else c  # X + xi(delta): the last delta carries U_d
            for k, (c, u0) in enumerate(zip(xi.deltas, split(M, p)))]
    T = tm.TangentTT(xi._U, xi._V, last)
    (g,) = torch.autograd.grad(f(T), delta, create_graph=True)
    (hv,) = torch.autograd.grad((g * u).sum(), delta)
    assert close(dense_tangent(M, p, M.proju(p, hv)), refH)
    # and a TangentTT whose U requires grad takes the generic (block cores) path
    q = p.clone().requires_grad_()
    Tq = M.tangent_to_tt(q, u)
    (gq,) = torch.autograd.grad(iset.gather(Tq).sum(), q)
    q2 = p.clone().requires_grad_()
    (gq2,) = torch.autograd.grad(iset.gather(TT(M.tangent_to_tt(q2, u).cores)).sum(), q2)
    assert close(gq, gq2, 1e-13)


def test_tangent_tt_constructor_checks():
    M, p, gen = fixed_case(seed=24)
    U = split(M, p)
    V = right_cores(M.split(p))
    dU = [torch.zeros_like(u) for u in U]
    T = tm.TangentTT(U, V, dU)  # valid factors (V[0] is None)
    assert T.ranks == (1, 4, 6, 4, 1) and T.shape == M.shape
    with pytest.raises(ValueError, match="expected 4 cores"):
        tm.TangentTT(U, V[:-1], dU)
    with pytest.raises(ValueError, match=r"deltas\[2\] has shape"):
        tm.TangentTT(U, V, dU[:2] + [torch.zeros(3, 3, 3, dtype=F64)] + dU[3:])
    with pytest.raises(TypeError, match=r"V\[1\] is torch.float32"):
        tm.TangentTT(U, [None, V[1].float()] + V[2:], dU)
    with pytest.raises(ValueError, match="at least|d >= 2"):
        tm.TangentTT(U[:1], V[:1], dU[:1])


def test_tangent_tt_copy_and_pickle():
    import copy
    import pickle

    M, p, gen = fixed_case(seed=22)
    u = M.project(p, torch.randn(M.shape, dtype=F64, generator=gen))
    A_tt = TT(random_tt_cores(M.shape, 2, gen))
    T = M.tangent_to_tt(p, u)
    for clone in (copy.copy(T), copy.deepcopy(T), pickle.loads(pickle.dumps(T))):
        assert isinstance(clone, tm.TangentTT)
        assert close(clone.full(), T.full(), 0)
        assert float(tm.inner(clone, A_tt)) == float(tm.inner(T, A_tt))
    pp = p.clone().requires_grad_()
    X = M.unpack_tensor(pp)  # flat deltas, gauged
    X2 = copy.copy(X)
    assert X2._flat is X._flat and X2._gauged
    assert float(tm.inner(X2, X2).detach()) == float(tm.inner(X, X).detach())


@pytest.mark.parametrize("shape,ranks,R", [((3,) * 5, 2, 3), ((2,) * 6, 2, 2),
                                           ((4, 3, 3, 3, 4), (1, 3, 3, 3, 3, 1), 3)])
def test_uniform_cores_batched_paths_match_oracle(shape, ranks, R):
    """Runs of equal core shapes take the batched products (project_D, gauge projection)."""
    M = FixedTTRank(shape, ranks)
    gen = torch.Generator().manual_seed(5)
    p = M.random(dtype=F64, generator=gen)
    P = oracle(M, p)
    Zc = random_tt_cores(shape, R, gen)
    ref = (P @ full(Zc).reshape(-1)).reshape(shape)
    assert close(dense_tangent(M, p, M.project(p, TT(Zc))), ref)
    G = torch.randn(shape, dtype=F64, generator=gen)
    refG = (P @ G.reshape(-1)).reshape(shape)
    delta = torch.zeros(M.size, dtype=F64, requires_grad=True)
    (D,) = torch.autograd.grad((dense_tangent(M, p, delta) * G).sum(), delta)
    assert close(dense_tangent(M, p, M.proju(p, D)), refG)
    T = M.tangent_to_tt(p, M.project(p, G))
    assert abs(float(tm.inner(T, TT(Zc))) - float((refG * full(Zc)).sum())) < 1e-10
    for name, f, grad in _structured_losses(TT(Zc)):
        g = M.riemannian_grad(p, f)
        assert close(dense_tangent(M, p, g), (P @ grad(dense_point(M, p)).reshape(-1)).reshape(shape), 1e-9), name


def test_structured_hvp_matches_projected_dense_hessian():
    M, p, gen = fixed_case((3, 4, 3, 2), (1, 2, 3, 2, 1), seed=21)
    A_tt = TT(random_tt_cores(M.shape, 2, gen))
    Ad = full(A_tt.cores)
    X = dense_point(M, p)
    P = oracle(M, p)

    def fd(Xd):
        return (Xd * Xd).sum() * (Xd * Ad).sum()

    def ft(T):
        return tm.inner(T, T) * tm.inner(T, A_tt)

    H = torch.autograd.functional.hessian(lambda v: fd(v.reshape(M.shape)), X.reshape(-1))
    u = M.project(p, torch.randn(M.shape, dtype=F64, generator=gen))
    ref = (P @ (H @ (P @ dense_tangent(M, p, u).reshape(-1)))).reshape(M.shape)
    assert close(dense_tangent(M, p, M.riemannian_hvp(p, ft, u)), ref, 1e-9)
    # a loss linear in X has zero Hessian
    assert torch.equal(M.riemannian_hvp(p, lambda T: tm.inner(T, A_tt), u), torch.zeros_like(u))


def test_structured_gradient_float32_ill_conditioned():
    M = FixedTTRank((4, 5, 4, 3), (1, 3, 4, 3, 1))
    gen = torch.Generator().manual_seed(12)
    p32 = M.projx(ill_conditioned_point(M, gen).to(F32))
    X = dense_point(M, p32.to(F64))
    A_tt = TT(random_tt_cores(M.shape, 2, gen))
    Uj, S = jacobian_svd(M, p32)
    Q = Uj[:, : M.dim]
    ref = (Q @ (Q.T @ (X - full(A_tt.cores)).reshape(-1))).reshape(M.shape)
    A32 = A_tt.to(F32)
    f = _structured_losses(A32)[0][1]
    g = M.riemannian_grad(p32, f)
    assert g.dtype == F32
    assert rel_err(dense_tangent(M, p32.to(F64), g.to(F64)), ref) < 1e-4
    q = p32.clone().requires_grad_()
    f(M.unpack_tensor(q)).backward()
    assert rel_err(dense_tangent(M, p32.to(F64), q.grad.to(F64)), ref) < 1e-4


# ---------------------------------------------------------------------------------------
# Hessian-vector product
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,ranks", [((3, 4, 3, 2), (1, 2, 3, 2, 1)), ((4, 3), (1, 2, 1))])
def test_riemannian_hvp_matches_projected_dense_hessian(shape, ranks):
    M, p, gen = fixed_case(shape, ranks, seed=10)
    A = torch.randn(shape, dtype=F64, generator=gen)

    def fd(Xd):
        return torch.sin(3 * Xd).sum() + 0.25 * (Xd - A).pow(2).sum().pow(2)

    X = dense_point(M, p)
    H = torch.autograd.functional.hessian(lambda v: fd(v.reshape(shape)), X.reshape(-1))
    P = oracle(M, p)
    u = M.project(p, torch.randn(shape, dtype=F64, generator=gen))
    xi = dense_tangent(M, p, u).reshape(-1)
    ref = (P @ (H @ (P @ xi))).reshape(shape)
    hv = M.riemannian_hvp(p, lambda T: fd(T.full()), u)
    assert close(dense_tangent(M, p, hv), ref)
    # symmetric bilinear form on the tangent space
    v = M.project(p, torch.randn(shape, dtype=F64, generator=gen))
    hvv = M.riemannian_hvp(p, lambda T: fd(T.full()), v)
    assert abs(float(M.inner(p, hv, v) - M.inner(p, u, hvv))) < 1e-10


# ---------------------------------------------------------------------------------------
# float32 accuracy at a badly conditioned point
# ---------------------------------------------------------------------------------------

def ill_conditioned_point(M, gen):
    x = TT.random(M.shape, M.ranks, dtype=F64, generator=gen)
    cores = x.cores
    for k in range(M.d - 1):  # insert diag(logspace(0, -6, r_k)) at every bond
        s = torch.logspace(0, -6, M.ranks[k + 1], dtype=F64)
        cores[k] = cores[k] * s
    return M.pack_point(TT(cores))


@pytest.mark.parametrize("loss", ["quadratic", "cubic"])
def test_float32_gradient_accuracy_ill_conditioned(loss):
    M = FixedTTRank((4, 5, 4, 3), (1, 3, 4, 3, 1))
    gen = torch.Generator().manual_seed(11)
    p64 = ill_conditioned_point(M, gen)
    p32 = M.projx(p64.to(F32))
    # (the default rtol=1e-5 of the rank check would call this point numerically rank
    # deficient: that is the point of the test)
    ok, msg = M._check_point_on_manifold(p32, rtol=1e-10)
    assert ok, msg
    X = dense_point(M, p32.to(F64))  # the float32 point, evaluated exactly
    spreads = []
    for k in range(1, M.d):
        sv = torch.linalg.svdvals(X.reshape(math.prod(M.shape[:k]), -1))[: M.ranks[k]]
        spreads.append(float(sv[0] / sv[-1]))
    assert max(spreads) > 1e6, spreads  # six orders of magnitude (and more)
    A = torch.randn(M.shape, dtype=F64, generator=gen)

    def f(Xd, Ad):
        return 0.5 * (Xd - Ad).pow(2).sum() if loss == "quadratic" else Xd.pow(3).sum()

    Xr = X.clone().requires_grad_()
    (G,) = torch.autograd.grad(f(Xr, A), Xr)
    Uj, S = jacobian_svd(M, p32)
    assert float(S[M.dim] / S[M.dim - 1]) < 1e-5  # clear rank gap even here
    Q = Uj[:, : M.dim]
    ref = (Q @ (Q.T @ G.reshape(-1))).reshape(M.shape)

    q = p32.clone().requires_grad_()
    f(M.unpack_tensor(q).full(), A.to(F32)).backward()
    assert q.grad.dtype == F32
    got = dense_tangent(M, p32.to(F64), q.grad.to(F64))
    assert rel_err(got, ref) < 1e-4
    g2 = M.riemannian_grad(p32, lambda T: f(T.full(), A.to(F32)))
    assert rel_err(dense_tangent(M, p32.to(F64), g2.to(F64)), ref) < 1e-4


# ---------------------------------------------------------------------------------------
# meta (and cuda) devices
# ---------------------------------------------------------------------------------------

_SHAPE, _RANKS = (3, 4, 3, 2), (1, 2, 3, 2, 1)


def _device_calls(M, p, u, dtype, device):
    """name -> (callable, expected output shape); outputs are tensors or tuples."""
    def unpack():
        pp = p.clone().requires_grad_()
        T = M.unpack_tensor(pp)
        T.full().pow(2).sum().backward()
        return (T.full(), pp.grad)

    def f(T):
        return T.full().pow(2).sum()

    Zt = TT.random(M.shape, 2, dtype=dtype, device=device)

    def f_inner(T):  # the structured tangent-TT paths
        return tm.inner(T, T) * tm.inner(T, Zt) + T.norm()

    Zd = torch.ones(M.shape, dtype=dtype, device=device)
    s = (M.size,)
    return {
        "random": (lambda: M.random(dtype=dtype, device=device), s),
        "origin": (lambda: M.origin(dtype=dtype, device=device), s),
        "proju": (lambda: M.proju(p, u), s),
        "egrad2rgrad": (lambda: M.egrad2rgrad(p, u), s),
        "retr": (lambda: M.retr(p, u), s),
        "transp": (lambda: M.transp(p, p, u), s),
        "retr_transp": (lambda: M.retr_transp(p, u, u), [s, s]),
        "inner": (lambda: M.inner(p, u, u), ()),
        "component_inner": (lambda: M.component_inner(p, u, u), s),
        "norm": (lambda: M.norm(p, u), ()),
        "projx": (lambda: M.projx(p), s),
        "project_tt": (lambda: M.project(p, Zt), s),
        "project_dense": (lambda: M.project(p, Zd), s),
        "tangent_to_tt": (lambda: tuple(M.tangent_to_tt(p, u).cores),
                          [(a if k == 0 else 2 * a, n, b if k == M.d - 1 else 2 * b)
                           for k, (a, n, b) in enumerate(M.core_shapes)]),
        "unpack_tensor": (unpack, [M.shape, s]),
        "riemannian_grad": (lambda: M.riemannian_grad(p, f), s),
        "riemannian_hvp": (lambda: M.riemannian_hvp(p, f, u), s),
        "riemannian_grad_structured": (lambda: M.riemannian_grad(p, f_inner), s),
        "riemannian_hvp_structured": (lambda: M.riemannian_hvp(p, f_inner, u), s),
        "gauge": (lambda: M.gauge(p, u), s),
    }


_METHODS = ["random", "origin", "proju", "egrad2rgrad", "retr", "transp", "retr_transp",
            "inner", "component_inner", "norm", "projx", "project_tt", "project_dense",
            "tangent_to_tt", "unpack_tensor", "riemannian_grad", "riemannian_hvp", "gauge",
            "riemannian_grad_structured", "riemannian_hvp_structured"]

_DEVICES = ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available"))]


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("method", _METHODS)
def test_methods_on_device(method, dtype, device):
    M = FixedTTRank(_SHAPE, _RANKS)
    p = M.random(dtype=dtype, device=device)
    u = M.project(p, torch.ones(M.shape, dtype=dtype, device=device))
    fn, expected = _device_calls(M, p, u, dtype, device)[method]
    out = fn()
    outs = list(out) if isinstance(out, tuple) else [out]
    exp = expected if isinstance(expected, list) else [expected]
    assert len(outs) == len(exp)
    for o, e in zip(outs, exp):
        assert tuple(o.shape) == tuple(e)
        assert o.device.type == torch.device(device).type
        assert o.dtype == dtype
    if device != "meta":  # on a real device also check the values are usable
        for o in outs:
            assert bool(torch.isfinite(o).all())


@pytest.mark.parametrize("dtype", [F32, F64])
def test_project_sparse_on_meta(dtype):
    """On the meta device the index set runs the per-mode kernels (no grouping by
    bincount, which has no meta kernel): shapes only."""
    M = FixedTTRank(_SHAPE, _RANKS)
    p = M.random(dtype=dtype, device="meta")
    idx = torch.zeros(len(_SHAPE), 3, dtype=torch.long, device="meta")
    Z = torch.sparse_coo_tensor(idx, torch.empty(3, dtype=dtype, device="meta"), _SHAPE,
                                check_invariants=False)
    u = M.project(p, Z)
    ref = M.project(p, torch.empty(_SHAPE, dtype=dtype, device="meta"))
    assert u.device.type == "meta" and u.dtype == dtype and u.shape == ref.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    M, p, gen = fixed_case(seed=12)
    Z = torch.randn(M.shape, dtype=F64, generator=gen)
    u = M.project(p, Z)
    uc = M.project(p.cuda(), Z.cuda())
    assert close(dense_tangent(M, p, uc.cpu()), dense_tangent(M, p, u), 1e-12)
    assert close(dense_point(M, M.retr(p.cuda(), uc).cpu()), dense_point(M, M.retr(p, u)), 1e-12)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------

def test_bad_input_errors():
    M, p, gen = fixed_case(seed=13)
    u = M.project(p, torch.randn(M.shape, dtype=F64, generator=gen))
    with pytest.raises(ValueError, match=r"x: expected a flat tensor of size 52"):
        M.proju(p[:-1], u)
    with pytest.raises(ValueError, match=r"x: expected a flat tensor of size 52"):
        M.retr(p.reshape(4, 13), u)
    with pytest.raises(ValueError, match=r"u: expected a flat tensor of size 52"):
        M.proju(p, torch.cat([u, u[:1]]))
    with pytest.raises(ValueError, match=r"v: expected a flat tensor of size 52"):
        M.transp(p, p, u[:-2])
    with pytest.raises(ValueError, match=r"p: expected a flat tensor of size 52"):
        M.to_tt(p[:3])
    with pytest.raises(TypeError, match=r"u: dtype torch.float32 differs from the point's "
                                        r"torch.float64"):
        M.proju(p, u.to(F32))
    with pytest.raises(TypeError, match=r"v: dtype torch.float32 differs"):
        M.retr_transp(p, u, u.to(F32))
    with pytest.raises(ValueError, match=r"u: device meta differs from the point's cpu"):
        M.retr(p, u.to("meta"))
    with pytest.raises(TypeError, match=r"Z: dtype torch.float32 differs"):
        M.project(p, torch.zeros(M.shape, dtype=F32))
    # the metric does not read the point: a point of another dtype or device passed
    for metric in (M.inner, M.component_inner, M.norm):
        with pytest.raises(TypeError, match=r"u: dtype torch.float64 differs from the "
                                            r"point's torch.float32"):
            metric(p.to(F32), u)
        with pytest.raises(ValueError, match=r"u: device cpu differs from the point's meta"):
            metric(p.to("meta"), u)
    with pytest.raises(TypeError, match=r"expected a real floating dtype"):
        M.proju(p, u.to(torch.int64))
    # infeasible and unattainable ranks
    with pytest.raises(ValueError, match=r"infeasible for shape \(2, 2, 2, 2\)"):
        FixedTTRank((2, 2, 2, 2), (1, 2, 5, 2, 1))
    with pytest.raises(ValueError, match=r"infeasible"):
        FixedTTRank((2, 3), (3,))  # an explicit tuple stays exact (an int clips)
    with pytest.raises(ValueError, match=r"cannot be attained"):
        FixedTTRank((2, 2, 2, 2), (1, 1, 4, 1, 1))
    with pytest.raises(ValueError, match=r"expected 3 inner ranks or 5 ranks"):
        FixedTTRank((3, 4, 3, 2), (2, 2))
    # non-finite gradients
    bad = u.clone()
    bad[3] = float("nan")
    with pytest.raises(RuntimeError, match=r"NaN or Inf"):
        M.egrad2rgrad(p, bad)
    bad[3] = float("inf")
    with pytest.raises(RuntimeError, match=r"NaN or Inf"):
        M.egrad2rgrad(p, bad)
    bad[3] = -float("inf")
    with pytest.raises(RuntimeError, match=r"NaN or Inf"):
        M.egrad2rgrad(p, bad)
    huge = torch.full_like(u, torch.finfo(u.dtype).max)  # finite: no overflow false alarm
    M.egrad2rgrad(p, huge)  # finite entries whose sum overflows: no error
    for val in (float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match=r"f: gradient contains NaN or Inf"):
            M.riemannian_grad(p, lambda T: (T.full() * val).sum())
    # pack_point of a TT of lower ranks / another shape
    with pytest.raises(ValueError, match=r"ranks \(1, 1, 1, 1, 1\) are below"):
        M.pack_point(TT.random(M.shape, 1, dtype=F64))
    with pytest.raises(ValueError, match=r"shape \(3, 4, 3, 3\) differs"):
        M.pack_point(TT.random((3, 4, 3, 3), (1, 2, 3, 2, 1), dtype=F64))
    # pack_point of higher ranks rounds; same-rank TT gives the same dense tensor
    X = TT.random(M.shape, M.ranks, dtype=F64, generator=gen)
    assert close(dense_point(M, M.pack_point(X)), full(X.cores), 1e-13)
    # project of a sparse tensor of the wrong shape
    Zs = torch.sparse_coo_tensor(torch.zeros(4, 1, dtype=torch.long), torch.ones(1, dtype=F64),
                                 (3, 4, 3, 3), check_invariants=True)
    with pytest.raises(ValueError, match=r"Z: sparse shape \(3, 4, 3, 3\) differs"):
        M.project(p, Zs)
    with pytest.raises(ValueError, match=r"Z: shape \(3, 4, 3\) differs"):
        M.project(p, torch.zeros(3, 4, 3, dtype=F64))
    with pytest.raises(TypeError, match=r"expected a dense tensor, a TT or a sparse COO"):
        M.project(p, [1.0, 2.0])
    # f returning a non-scalar / not depending on the TT
    with pytest.raises(ValueError, match=r"f: expected a function returning a scalar"):
        M.riemannian_grad(p, lambda T: T.full())
    with pytest.raises(ValueError, match=r"f: expected a function returning a scalar"):
        M.riemannian_hvp(p, lambda T: T.full().sum(0), u)
    with pytest.raises(ValueError, match=r"does not depend on the TT"):
        M.riemannian_grad(p, lambda T: torch.tensor(1.0, dtype=F64))
    with pytest.raises(ValueError, match=r"size: a point of FixedTTRank is one flat tensor"):
        M.random(3, 4)


def _attainable(shape, inner):
    """Clip drawn inner ranks to TT-ranks that a tensor of this shape can have exactly."""
    d = len(shape)
    r = [1] + list(inner) + [1]
    for k in range(1, d):
        r[k] = min(r[k], r[k - 1] * shape[k - 1])
    for k in range(d - 1, 0, -1):
        r[k] = min(r[k], shape[k] * r[k + 1])
    return tuple(r)


@given(d=st.integers(1, 6), data=st.data())
def test_right_cores_batched_signs_match_the_signed_sweep(d, data):
    """``right_cores`` (unsigned LQs, one batched sign fix per run) and the projection's
    unsigned interleaved sweep give the canonical gauge of a signed LQ sweep written here
    with ``lq_pos`` (``diag(L_k) >= 0``), including runs of equal cores and ragged ranks."""
    from ttmanifold.manifold import project_tt as project_D, right_cores
    from ttmanifold.tt import lq_pos

    shape = tuple(data.draw(st.lists(st.integers(2, 4), min_size=d, max_size=d)))
    inner = [data.draw(st.sampled_from([2, 3, 4])) for _ in range(d - 1)]  # ragged or equal
    M = FixedTTRank(shape, _attainable(shape, inner))
    dtype = data.draw(st.sampled_from([F64, torch.float32]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10 ** 6)))
    p = M.random(dtype=dtype, generator=gen)
    U = M.split(p)
    ref = [None] * d  # the signed sweep: c_{d-1} = U_{d-1}, c_{k-1} = U_{k-1} L_k
    c = U[-1]
    for k in range(d - 1, 0, -1):
        l, q = lq_pos(c.reshape(c.shape[0], -1))
        ref[k] = q.reshape(c.shape)
        if k > 1:
            c = (U[k - 1].reshape(-1, U[k - 1].shape[2]) @ l).reshape(U[k - 1].shape)
    V = right_cores(U)
    assert V[0] is None
    tol = 1e-13 if dtype == F64 else 1e-5
    for k in range(1, d):
        assert V[k].shape == ref[k].shape and V[k].is_contiguous()
        assert float((V[k] - ref[k]).abs().max()) <= tol
    Z = TT([c.to(dtype) for c in random_tt_cores(shape, 2, gen)])
    a = project_D(U, None, Z.cores, packed=True, gauge=True)
    b = project_D(U, ref, Z.cores, packed=True, gauge=True)
    assert float((a - b).norm()) <= tol * max(1.0, float(b.norm()))


# ---------------------------------------------------------------------------------------
# compiled dense sweeps (ttmanifold.kernels, set "dense")
# ---------------------------------------------------------------------------------------

@pytest.fixture
def dense_native():
    import shutil

    from ttmanifold import kernels

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the compiled sweeps cannot be built here")
    was = kernels.enabled()
    kernels.set_enabled(True)
    kernels.build(["dense"], verbose=False)
    mod = kernels.module("dense")
    assert mod is not None, "the compiled dense sweeps failed to build"
    yield mod
    kernels.set_enabled(was)


def _torch_path(fn, *args, **kw):
    from ttmanifold import kernels

    was = kernels.enabled()
    kernels.set_enabled(False)
    try:
        return fn(*args, **kw)
    finally:
        kernels.set_enabled(was)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(d=st.integers(1, 6), data=st.data())
def test_dense_native_sweeps_match_torch(dense_native, d, data):
    """right_cores and project_D (packed, with and without V, gauged or not) on the compiled
    sweeps agree with the torch implementation, for ragged ranks and any rank R of Z."""
    from ttmanifold.manifold import project_tt as project_D, right_cores

    shape = tuple(data.draw(st.lists(st.integers(2, 5), min_size=d, max_size=d)))
    M = FixedTTRank(shape, _attainable(shape, [data.draw(st.integers(1, 5)) for _ in range(d - 1)]))
    dtype = data.draw(st.sampled_from([F64, torch.float32]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10 ** 6)))
    p = M.random(dtype=dtype, generator=gen)
    U = M.split(p)
    tol = 1e-12 if dtype == F64 else 1e-5
    Vn = right_cores(U)
    Vt = _torch_path(right_cores, U)
    for a, b in zip(Vn[1:], Vt[1:]):
        assert float((a - b).abs().max()) <= tol
    R = data.draw(st.integers(1, 4))
    Zc = [c.to(dtype) for c in random_tt_cores(shape, R, gen)]
    for V in (None, Vt):
        for gauge in (False, True):
            a = project_D(U, V, Zc, packed=True, gauge=gauge)
            b = _torch_path(project_D, U, V, Zc, packed=True, gauge=gauge)
            assert a.shape == b.shape == (M.size,) and a.dtype == dtype
            assert float((a - b).norm()) <= tol * max(1.0, float(b.norm()))


def test_dense_native_used_and_bypassed(dense_native, monkeypatch):
    """The compiled sweeps serve CPU calls without gradients; with a gradient to propagate
    the differentiable torch path runs."""
    from ttmanifold.manifold import project_tt as project_D

    calls = []
    real = dense_native.project
    monkeypatch.setattr(dense_native, "project", lambda *a: (calls.append(1), real(*a))[1])
    M, p, gen = fixed_case()
    U = M.split(p)
    Zc = random_tt_cores(M.shape, 2, gen)
    project_D(U, None, Zc, packed=True, gauge=True)
    assert calls
    calls.clear()
    Zg = [c.clone().requires_grad_() for c in Zc]
    out = project_D(U, None, Zg, packed=True, gauge=True)
    assert out.requires_grad and not calls
    out.sum().backward()
    assert all(z.grad is not None for z in Zg)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(d=st.integers(2, 6), data=st.data())
def test_dense_native_retract_matches_torch(dense_native, d, data):
    """The compiled retraction equals the torch implementation (packed cores), for ragged
    ranks, steps of any size and a step that cancels X (rank collapse to zero)."""
    shape = tuple(data.draw(st.lists(st.integers(2, 5), min_size=d, max_size=d)))
    M = FixedTTRank(shape, _attainable(shape, [data.draw(st.integers(1, 5)) for _ in range(d - 1)]))
    dtype = data.draw(st.sampled_from([F64, torch.float32]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10 ** 6)))
    p = M.random(dtype=dtype, generator=gen)
    kind = data.draw(st.sampled_from(["small", "large", "cancel", "raw"]))
    if kind == "cancel":
        u = torch.zeros_like(p)
        u[-M.core_sizes[-1]:] = -p[-M.core_sizes[-1]:]  # xi = -X
    else:
        u = torch.randn(M.size, dtype=F64, generator=gen).to(dtype)
        if kind != "raw":  # raw: non-gauged deltas, as geoopt's first momentum step feeds
            u = M.proju(p, u)
        u = u * (1e-3 if kind == "small" else 3.0)
    from ttmanifold.manifold import retract, right_cores

    U = M.split(p)
    V = right_cores(U)
    du = M.split(u)
    a = retract(U, V, du, M.ranks)
    b = _torch_path(retract, U, V, du, M.ranks)
    tol = 1e-11 if dtype == F64 else 2e-4
    assert a.shape == b.shape and a.dtype == dtype
    fa, fb = (M.to_tt(x).full().double() for x in (a, b))  # gauge-invariant comparison
    assert float((fa - fb).norm()) <= tol * max(1.0, float(fb.norm()))
    if kind != "cancel":  # a valid point: left-orthogonal cores of full TT-rank
        ok, why = M._check_point_on_manifold(a)
        assert ok, why


def test_dense_native_retract_non_finite_step_is_a_clear_error(dense_native):
    M, p, gen = fixed_case()
    u = M.proju(p, torch.randn(M.size, dtype=F64, generator=gen))
    u[3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        M.retr(p, u)


@pytest.mark.parametrize("shape,ranks", [((3, 4, 3, 2), (1, 2, 3, 2, 1)),
                                         ((4, 3, 5), (1, 3, 4, 1)), ((5, 4), (1, 3, 1))])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_dense_native_against_dense_references(dense_native, monkeypatch, shape, ranks, dtype):
    """With the compiled sweeps certainly in use (spied), project of a TT and retr agree
    with the independent dense float64 references: the orthogonal projector onto the
    Jacobian's column space and the dense left-to-right TT-SVD of X + xi."""
    calls = []
    for name in ("project", "retract_point", "right_cores"):
        real = getattr(dense_native, name)
        monkeypatch.setattr(dense_native, name,
                            lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1])
    M = FixedTTRank(shape, ranks)
    gen = torch.Generator().manual_seed(17)
    p64 = M.random(dtype=F64, generator=gen)
    p = p64.to(dtype)
    Zc = random_tt_cores(shape, 2, gen)
    tol = 1e-10 if dtype == F64 else 1e-4
    ref = (oracle(M, p64) @ full(Zc).reshape(-1)).reshape(shape)
    got = dense_tangent(M, p64, M.project(p, TT([c.to(dtype) for c in Zc])).double())
    assert close(got, ref, tol * max(1.0, float(ref.norm())))
    u = M.proju(p64, torch.randn(M.size, dtype=F64, generator=gen))
    u = u * (0.3 / float(dense_tangent(M, p64, u).norm()))
    Y = dense_point(M, p64) + dense_tangent(M, p64, u)
    y = M.retr(p, u.to(dtype)).double()
    assert close(dense_point(M, y), tt_svd_left_to_right(Y, M.ranks),
                 tol * max(1.0, float(Y.norm())))
    assert {"project", "retract_point"} <= set(calls)


def test_riemannian_gradient_of_a_norm_loss():
    """``0.5 ||X - A||^2`` written with ``norm`` (a general loss through the rank-2r cores)
    gives the same Riemannian gradient as the inner-product form, finite (the norm of the
    tangent TT's rank-deficient block cores used to give NaN)."""
    M, p, gen = fixed_case(seed=31)
    A = TT([c for c in random_tt_cores(M.shape, 3, gen)])
    g1 = M.riemannian_grad(p, lambda X: 0.5 * (X - A).norm() ** 2)
    g2 = M.riemannian_grad(p, lambda X: 0.5 * tm.inner(X, X) - tm.inner(X, A))
    assert torch.isfinite(g1).all()
    assert torch.allclose(g1, g2, atol=1e-11)
