"""Riemannian gradients and Hessian-vector products of general losses (written through TT
algebra on the rank-2r tangent TT: sums, norms, inner products, dense and elementwise
terms), against the dense float64 projection of the Euclidean gradient."""
from __future__ import annotations

import pytest
import torch

import ttmanifold as tm
from ttmanifold import TT, FixedTTRank

F64 = torch.float64
SHAPE, RANKS = (3, 4, 3, 2), (1, 2, 3, 2, 1)


def _oracle(M, p):
    """Orthogonal projector onto the tangent space at p, from the SVD of the Jacobian of the
    dense tensor with respect to the packed cores (float64)."""
    p64 = p.detach().to(F64)
    J = torch.autograd.functional.jacobian(lambda v: M.to_tt(v).full().reshape(-1), p64)
    Uj, S, _ = torch.linalg.svd(J, full_matrices=False)
    Q = Uj[:, : M.dim]
    return Q @ Q.T


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(3)
    M = FixedTTRank(SHAPE, RANKS)
    p = M.random(dtype=F64, generator=g)
    A = TT.random(SHAPE, 2, dtype=F64, generator=g)
    return M, p, A, _oracle(M, p)


LOSSES = {
    # name: (f on a TT, Euclidean gradient of f at the dense X)
    "norm2 of TT(X.cores) - A": (lambda A: lambda X: 0.5 * (TT(X.cores) - A).norm() ** 2,
                                 lambda X, A: X - A),
    "norm of TT(X.cores) - A": (
        lambda A: lambda X: (TT(X.cores) - A).norm(),
        lambda X, A: (X - A) / torch.linalg.vector_norm(X - A)),
    "norm2 of X - A (structured sum)": (lambda A: lambda X: 0.5 * (X - A).norm() ** 2,
                                        lambda X, A: X - A),
    "inner of a sum": (lambda A: lambda X: tm.inner(TT(X.cores) + A, TT(X.cores) - 2 * A),
                       lambda X, A: 2 * X - A),
    "full and elementwise": (lambda A: lambda X: (TT(X.cores).full() ** 3).sum()
                             + tm.inner(TT(X.cores), A), lambda X, A: 3 * X ** 2 + A),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_riemannian_grad_of_general_losses_matches_dense(case, name):
    M, p, A, P = case
    make, egrad = LOSSES[name]
    xi = M.riemannian_grad(p, make(A))
    X = M.to_tt(p).full()
    ref = (P @ egrad(X, A.full()).reshape(-1)).reshape(SHAPE)
    got = M.tangent_to_tt(p, xi).full()
    assert float(torch.linalg.vector_norm(got - ref)) <= 1e-11 * float(
        torch.linalg.vector_norm(ref))


@pytest.mark.parametrize("name", ["norm2 of TT(X.cores) - A", "norm of TT(X.cores) - A"])
def test_riemannian_grad_float32(case, name):
    M, p, A, P = case
    make, egrad = LOSSES[name]
    xi = M.riemannian_grad(p.float(), make(A.to(torch.float32)))
    X = M.to_tt(p).full()
    ref = (P @ egrad(X, A.full()).reshape(-1)).reshape(SHAPE)
    got = M.tangent_to_tt(p, xi.double()).full()
    assert float(torch.linalg.vector_norm(got - ref)) <= 1e-5 * float(
        torch.linalg.vector_norm(ref))


def test_riemannian_grad_near_the_target_float32(case):
    """f = ||X - A|| with A = X + 1e-4 Z in float32: the difference nearly cancels, so its
    norm and gradient come from the concatenated cores (the QR value); the gradient still
    matches the dense float64 one to the difference's conditioning."""
    M, p, _, P = case
    g = torch.Generator().manual_seed(4)
    Z = TT.random(SHAPE, 1, dtype=F64, generator=g)
    A = M.to_tt(p) + 1e-4 * Z
    A32 = TT([c.float() for c in A.cores])
    xi = M.riemannian_grad(p.float(), lambda X: (TT(X.cores) - A32).norm())
    X = M.to_tt(p.float().double()).full()
    D = X - A32.to(F64).full()
    ref = (P @ (D / torch.linalg.vector_norm(D)).reshape(-1)).reshape(SHAPE)
    got = M.tangent_to_tt(p, xi.double()).full()
    assert float(torch.linalg.vector_norm(got - ref)) <= 2e-2 * float(
        torch.linalg.vector_norm(ref))


def test_riemannian_hvp_of_a_general_loss(case):
    """f = 0.5 ||X - A||^2 through TT(X.cores): the Euclidean Hessian is the identity, so the
    projected Hessian-vector product of a tangent u is u (second derivatives through the
    inner-product sweep's differentiable backward)."""
    M, p, A, _ = case
    g = torch.Generator().manual_seed(5)
    u = M.proju(p, torch.randn(M.size, dtype=F64, generator=g))
    h = M.riemannian_hvp(p, LOSSES["norm2 of TT(X.cores) - A"][0](A), u)
    assert float(torch.linalg.vector_norm(h - u)) <= 1e-11 * float(torch.linalg.vector_norm(u))
