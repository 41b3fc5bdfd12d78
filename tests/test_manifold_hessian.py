"""The exact Riemannian Hessian (:func:`ttmanifold.manifold.riemannian_hess`) against an
independent dense float64 oracle and against central differences of the Riemannian
gradient along retraction curves.

The oracle is built from first principles: the tangent projector ``P`` is the orthogonal
projector onto the range of the Jacobian ``J`` of the core map (an einsum written here),
its derivative along ``xi`` is ``P' = (I - P) J' J^+ + ((I - P) J' J^+)^T`` with ``J'`` the
derivative of ``J`` along core velocities ``a`` solving ``J a = xi`` (least squares), and
``Hess f[xi] = P (nabla^2 f xi) + P (P' nabla f)``. Only gauge-invariant quantities (dense
tangent vectors, inner products) are compared.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttmanifold import TT, FixedTTRank
from ttmanifold.manifold import riemannian_hess, riemannian_hvp, right_cores
from ttmanifold.tt import inner

F64 = torch.float64


def split(M, x):
    sizes = [a * b * c for a, b, c in M.core_shapes]
    return [c.reshape(s) for c, s in zip(torch.split(x, sizes), M.core_shapes)]


def full(cores):
    res = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    for c in cores[1:]:
        res = torch.einsum("ia,ajb->ijb", res, c).reshape(-1, c.shape[2])
    return res.reshape([int(c.shape[1]) for c in cores])


def dense_hess(M, p, f_dense, xi):
    """Oracle ``Hess f(X)[xi]`` as a dense tensor (float64, no ttmanifold code)."""
    c0 = p.detach().clone()

    def phi(c):
        return full(split(M, c)).reshape(-1)

    J = torch.func.jacrev(phi)(c0)
    Uj, s, _ = torch.linalg.svd(J, full_matrices=False)
    Q = Uj[:, :M.dim]
    P = Q @ Q.T
    Jp = torch.linalg.pinv(J, rtol=1e-10)
    a = Jp @ xi.reshape(-1)  # least-squares core velocities: J a = xi
    _, dJ = torch.func.jvp(torch.func.jacrev(phi), (c0,), (a,))
    A = (torch.eye(P.shape[0], dtype=F64) - P) @ dJ @ Jp
    dP = A + A.T
    X = phi(c0)
    G = torch.func.grad(lambda v: f_dense(v.reshape(M.shape)))(X)
    _, HX = torch.func.jvp(torch.func.grad(lambda v: f_dense(v.reshape(M.shape))), (X,),
                           (xi.reshape(-1),))
    return (P @ HX + P @ (dP @ G)).reshape(M.shape), (P @ HX).reshape(M.shape)


def setup(seed, shape=(3, 4, 3), ranks=(1, 2, 2, 1)):
    M = FixedTTRank(shape, ranks)
    g = torch.Generator().manual_seed(seed)
    p = M.random(dtype=F64, generator=g)
    u = M.proju(p, torch.randn(M.size, dtype=F64, generator=g))
    T = torch.randn(shape, dtype=F64, generator=g)
    return M, p.detach(), u, T


def losses(T):
    """(TT loss, the same loss of a dense tensor): non-quadratic, with a normal gradient."""
    def f_dense(A):
        return 0.5 * ((A - T) ** 2).sum() + 0.1 * torch.sin(3 * A).sum()

    def f_tt(x):
        return f_dense(x.full())
    return f_tt, f_dense


@pytest.mark.parametrize("shape,ranks", [((3, 4, 3), (1, 2, 2, 1)), ((4, 5), (1, 2, 1)),
                                         ((2, 3, 3, 2), (1, 2, 3, 2, 1))])
def test_hess_matches_dense_oracle(shape, ranks):
    M, p, u, T = setup(0, shape, ranks)
    f_tt, f_dense = losses(T)
    h = riemannian_hess(M, p, f_tt, u)
    xi = M.tangent_to_tt(p, u).full()
    ref, ref_hvp = dense_hess(M, p, f_dense, xi)
    got = M.tangent_to_tt(p, h).full()
    assert torch.allclose(got, ref, atol=1e-10, rtol=1e-9), (got - ref).abs().max()
    # the curvature term is not negligible here (the residual is not small)
    assert (ref - ref_hvp).norm() > 1e-2 * ref.norm()
    hv = M.tangent_to_tt(p, riemannian_hvp(M, p, f_tt, u)).full()
    assert torch.allclose(hv, ref_hvp, atol=1e-10)


def test_hess_structured_loss_higher_rank_target():
    """0.5||X - A||^2 with A of higher rank, written with TT inner products (the documented
    example where the projected Euclidean Hessian alone is off)."""
    M, p, u, _ = setup(1, (4, 5), (1, 1, 1))
    A = TT.random((4, 5), 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    Ad = A.full()

    def f_tt(x):
        return 0.5 * inner(x, x) - inner(x, A)

    def f_dense(Y):
        return 0.5 * (Y * Y).sum() - (Y * Ad).sum()

    h = riemannian_hess(M, p, f_tt, u)
    ref, _ = dense_hess(M, p, f_dense, M.tangent_to_tt(p, u).full())
    assert torch.allclose(M.tangent_to_tt(p, h).full(), ref, atol=1e-10)


def _rgrad_dense(M, y, f):
    return M.tangent_to_tt(y, M.riemannian_grad(y, f)).full()


def test_hess_equals_derivative_of_gradient_along_retraction():
    """P_X (grad f(R_X(t xi)) - grad f(R_X(-t xi))) / 2t -> Hess f[xi], error O(t^2)."""
    M, p, u, T = setup(2, (3, 4, 3), (1, 2, 2, 1))
    f_tt, _ = losses(T)
    h = M.tangent_to_tt(p, riemannian_hess(M, p, f_tt, u)).full()
    errs = []
    for t in (2e-3, 1e-3):
        gp = _rgrad_dense(M, M.retr(p, t * u).detach(), f_tt)
        gm = _rgrad_dense(M, M.retr(p, -t * u).detach(), f_tt)
        fd = M.tangent_to_tt(p, M.project(p, (gp - gm) / (2 * t))).full()
        errs.append(float((fd - h).norm() / h.norm()))
    assert errs[1] < 1e-3 and errs[1] < 0.35 * errs[0], errs


def test_hess_method_and_second_derivative_along_curve():
    """<Hess xi, xi> equals d^2/dt^2 f(R_X(t xi)) minus <grad f, c''(0)> with c'' tangent
    part from the retraction; checked via the method on the manifold and a gauge-free
    quadratic form: along the retraction of a zero-residual fit the curvature is absent."""
    M, p, u, T = setup(3)
    f_tt, _ = losses(T)
    h1 = M.riemannian_hess(p, f_tt, u)
    h2 = riemannian_hess(M, p, f_tt, u)
    assert torch.allclose(M.tangent_to_tt(p, h1).full(), M.tangent_to_tt(p, h2).full())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000))
def test_hess_symmetric_and_linear(seed):
    M, p, u, T = setup(seed)
    g = torch.Generator().manual_seed(seed + 1)
    v = M.proju(p, torch.randn(M.size, dtype=F64, generator=g))
    f_tt, _ = losses(T)
    hu = riemannian_hess(M, p, f_tt, u)
    hv = riemannian_hess(M, p, f_tt, v)
    a = float(M.inner(p, hu, v))
    b = float(M.inner(p, u, hv))
    assert abs(a - b) <= 1e-9 * (1 + abs(a))
    huv = riemannian_hess(M, p, f_tt, 2 * u - v)
    assert torch.allclose(M.tangent_to_tt(p, huv).full(),
                          M.tangent_to_tt(p, 2 * hu - hv).full(), atol=1e-9)


def test_hess_ungauged_u_same_vector_and_dtype_device():
    M, p, u, T = setup(4)
    f_tt, _ = losses(T)
    U = split(M, p)
    raw = split(M, u.clone())
    V = right_cores(U)
    # add a gauge component U_0 S to core 0 and compensate in core 1: same tangent vector
    S = torch.randn(2, 2, dtype=F64)
    raw[0] = raw[0] + torch.einsum("aib,bc->aic", U[0], S)
    raw[1] = raw[1] - torch.einsum("bc,cjd->bjd", S, V[1])
    u2 = torch.cat([c.reshape(-1) for c in raw])
    assert torch.allclose(M.tangent_to_tt(p, u2).full(), M.tangent_to_tt(p, u).full())
    h = riemannian_hess(M, p, f_tt, u)
    h2 = riemannian_hess(M, p, f_tt, u2)
    assert torch.allclose(M.tangent_to_tt(p, h).full(), M.tangent_to_tt(p, h2).full(),
                          atol=1e-10)
    assert h.dtype == F64 and h.device == p.device
    with pytest.raises(TypeError, match="u:"):
        riemannian_hess(M, p, f_tt, u.float())
    with pytest.raises(ValueError, match="u"):
        riemannian_hess(M, p, f_tt, u[:-1])


def test_hess_float32_close_to_float64():
    M, p, u, T = setup(5)
    f_tt, _ = losses(T)
    h64 = M.tangent_to_tt(p, riemannian_hess(M, p, f_tt, u)).full()
    f32, _ = losses(T.float())
    h32 = M.tangent_to_tt(p.float(), riemannian_hess(M, p.float(), f32, u.float())).full()
    assert float((h32.double() - h64).norm() / h64.norm()) < 1e-4


# ---------------------------------------------------------------------------------------
# batches of points (*B, size): B independent Hessians
# ---------------------------------------------------------------------------------------

def _batch_setup(seed, B, shape=(3, 4, 3), ranks=(1, 2, 2, 1)):
    M = FixedTTRank(shape, ranks)
    g = torch.Generator().manual_seed(seed)
    p = torch.Tensor(M.random(B, dtype=F64, generator=g)).detach()
    u = M.proju(p, torch.randn(B, M.size, dtype=F64, generator=g))
    T = torch.randn((B,) + shape, dtype=F64, generator=g)
    return M, p, u, T


@pytest.mark.parametrize("per_point", [False, True], ids=["summed", "per-point"])
def test_hess_batch_matches_independent_calls_and_oracle(per_point):
    """A batch of 3 points: each row equals the single-point call (to rounding) and the
    dense oracle; ``f`` may return the summed loss or one value per point."""
    M, p, u, T = _batch_setup(7, 3)

    def f_dense(A):  # A: (B, *shape) -> one value per point
        return (0.5 * ((A - T) ** 2) + 0.1 * torch.sin(3 * A)).flatten(1).sum(-1)

    def f_tt(x):
        v = f_dense(x.full())
        return v if per_point else v.sum()

    h = riemannian_hess(M, p, f_tt, u)
    assert h.shape == p.shape
    for b in range(p.shape[0]):
        def fb(x, b=b):
            A = x.full()
            return (0.5 * (A - T[b]) ** 2 + 0.1 * torch.sin(3 * A)).sum()
        hb = riemannian_hess(M, p[b], fb, u[b])
        got = M.tangent_to_tt(p[b], h[b]).full()
        assert torch.allclose(got, M.tangent_to_tt(p[b], hb).full(), atol=1e-11, rtol=1e-10)
        ref, _ = dense_hess(M, p[b], lambda A, b=b: (0.5 * (A - T[b]) ** 2
                                                      + 0.1 * torch.sin(3 * A)).sum(),
                            M.tangent_to_tt(p[b], u[b]).full())
        assert torch.allclose(got, ref, atol=1e-10, rtol=1e-9), (got - ref).abs().max()


def test_hessian_operator_batch_reused_and_checks():
    """The operator of a batch applied to two vectors is linear per point; a vector of
    another batch shape and a loss of the wrong shape are rejected naming the argument."""
    from ttmanifold.manifold import hessian_operator
    M, p, u, T = _batch_setup(8, 2, (4, 5), (1, 2, 1))

    def f_tt(x):
        return 0.5 * ((x.full() - T) ** 2).flatten(1).sum(-1) + (x.full() ** 4).flatten(1).sum(-1)

    H = hessian_operator(M, p, f_tt)
    v = M.proju(p, torch.randn(p.shape, dtype=F64, generator=torch.Generator().manual_seed(9)))
    hu, hv, huv = H(u), H(v), H(2 * u - v)
    assert torch.allclose(huv, 2 * hu - hv, atol=1e-10)
    # symmetric per point (the Hessian of each point's own loss)
    assert torch.allclose(M.inner(p, hu, v), M.inner(p, u, hv), atol=1e-9)
    with pytest.raises(ValueError, match="u:"):
        H(u[:1])
    with pytest.raises(ValueError, match="f:"):
        hessian_operator(M, p, lambda x: x.full().flatten(1)[:, :3].sum(0), grad=hu)(u)


def test_nonfinite_loss_raises_naming_f_in_hvp_and_hess_with_a_given_gradient():
    """A loss that is NaN near the point: riemannian_grad raised for it but riemannian_hvp
    returned NaN silently (and with it hessian_operator given a finite gradient, as the
    data-parallel trust region does)."""
    from ttmanifold.manifold import hessian_operator
    M, p, u, T = setup(3)
    f_tt, _ = losses(T)

    def f_nan(x):
        return f_tt(x) * float("nan")

    with pytest.raises(RuntimeError, match="f: Hessian-vector product contains NaN or Inf"):
        riemannian_hvp(M, p, f_nan, u)
    g = M.riemannian_grad(p, f_tt)
    with pytest.raises(RuntimeError, match="f: Hessian-vector product contains NaN or Inf"):
        hessian_operator(M, p, f_nan, grad=g)(u)
    with pytest.raises(RuntimeError, match="f: gradient contains NaN or Inf"):
        riemannian_hess(M, p, f_nan, u)
