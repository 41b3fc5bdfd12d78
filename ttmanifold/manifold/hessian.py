"""The exact Riemannian Hessian on the fixed-TT-rank manifold, curvature term included.

``Hess f(X)[xi] = P_X(nabla^2 f(X)[xi]) + W_X(xi)``: the first term is
:func:`~.autodiff.riemannian_hvp`; the curvature (Weingarten) term ``W_X`` pairs the
normal part of the Euclidean gradient with the second derivative of the core map, read off
one reverse pass of ``f`` on a rank-4r TT whose value is ``X``. The mathematics:
``docs/autodiff.md#the-riemannian-hessian``.
"""
from __future__ import annotations

from typing import Callable, List

import torch

from .._checks import assert_finite_async, functorch_wrapped
from ..tt import TT, inner
from .autodiff import riemannian_grad, riemannian_hvp
from .sweeps import right_cores

__all__ = ["riemannian_hess", "hessian_operator", "interface_factors"]


def interface_factors(U, V) -> List[torch.Tensor]:
    """The ``r_k x r_k`` factors ``R_k`` with ``U_>k = R_k V_>k`` (``k = 1..d-1``).

    Args:
        U: left-orthogonal cores of a point; V: its right-orthogonal cores
            (:func:`~.sweeps.right_cores`). Cores with leading batch dimensions
            ``(*B, r, n, r')`` give one factor per point.
    Returns:
        ``d - 1`` matrices (``(*B, r_k, r_k)`` for a batch); ``R[k]`` belongs to the bond
        between cores ``k`` and ``k+1`` (0-based), in ``U``'s dtype and device.
    Cost: O(d n r^3) per point, no inversion.
    """
    d = len(U)
    R: List[torch.Tensor] = [None] * (d - 1)  # type: ignore[list-item]
    last = U[d - 1]
    R[d - 2] = last.flatten(-2) @ V[d - 1].flatten(-2).mT  # (flatten: also an empty batch)
    for k in range(d - 2, 0, -1):
        R[k - 1] = torch.einsum("...aib,...bc,...dic->...ad", U[k], R[k], V[k])
    return R


def _second_derivative_tt(U, a, b) -> TT:
    """The rank-4r TT of ``X + sum_{j != k} phi(U; a at j, b at k)``, ``phi`` the core map
    (batched TT for cores with leading batch dimensions).

    States of the block cores: 0 nothing inserted, 1 ``a`` inserted, 2 ``b`` inserted,
    3 both. Paths from state 0 to state 0 give X, to state 3 the mixed second derivative.
    """
    d = len(U)
    cores = []
    for k in range(d):
        u, x, y = U[k], a[k], b[k]
        z = torch.zeros_like(u)
        if k == 0:
            cores.append(torch.cat([u, x, y, z], dim=-1))
        elif k == d - 1:
            cores.append(torch.cat([u, y, x, u], dim=-3))
        else:
            rows = [[u, x, y, z], [z, u, z, y], [z, z, u, x], [z, z, z, u]]
            cores.append(torch.cat([torch.cat(r, dim=-1) for r in rows], dim=-3))
    return TT(cores, check=False)


def _solve_right(R, w, transpose: bool, k: int = 0):
    """``w_(left unfolding) R^{-1}`` (or ``R^{-T}``) by a linear solve, batched; ``k``: the
    bond, named in the error for a singular ``R``."""
    wl = w.flatten(-3, -2).mT
    try:
        return torch.linalg.solve(R.mT if transpose else R, wl).mT.reshape(w.shape)
    except torch.linalg.LinAlgError as e:  # (solve reads LAPACK's info anyway: no extra sync)
        raise ValueError(
            f"p: the interface factor at bond {k + 1} is singular: the point's TT-rank there is "
            f"below the manifold's ({R.shape[-1]}), so it is not a point of M_r and the "
            f"Riemannian Hessian (its curvature term) is undefined; M.check_point(p) tells "
            f"why") from e


def _check_value(val, batch) -> torch.Tensor:
    """The scalar to differentiate: ``f``'s value, or the sum of its per-point values."""
    if not isinstance(val, torch.Tensor) or not (
            val.numel() == 1 or (batch and tuple(val.shape) == tuple(batch))):
        extra = f" or one value per point (shape {tuple(batch)})" if batch else ""
        raise ValueError(f"f: expected a function returning a scalar tensor{extra}")
    return val.sum() if val.dim() > 0 else val


def riemannian_hess(M, p: torch.Tensor, f: Callable[[TT], torch.Tensor],
                    u: torch.Tensor) -> torch.Tensor:
    """Riemannian Hessian ``Hess f(X)[xi]`` of ``f`` at ``p`` applied to ``u`` (exact).

    The sum of the projected Euclidean Hessian (:func:`~.autodiff.riemannian_hvp`) and the
    curvature term ``W_X(xi)``: with ``N`` the normal part of the Euclidean gradient,
    ``<W_X(xi), eta> = <N, phi''[a, b]>`` for core velocities ``a``, ``b`` with
    ``phi'(a) = xi``, ``phi'(b) = eta`` (``phi`` maps the left-orthogonal cores to the
    tensor). ``a_k = dU_k R_k^{-1}`` is obtained by linear solves with the interface
    factors ``R_k`` (:func:`interface_factors`), never by an explicit inverse; the curvature
    term grows like the inverse of the smallest singular values of the unfoldings, as it
    must.

    Args:
        M: the manifold (:class:`~ttmanifold.FixedTTRank`).
        p: a packed point, or a batch of points ``(*B, size)`` (then ``u`` is ``(*B, size)``
            and ``f`` returns one value per point, or their sum: points are independent).
        f: a differentiable function of a :class:`~ttmanifold.TT` returning a scalar; it is
            called on a :class:`~.tangent.TangentTT` (as in :func:`~.autodiff.riemannian_grad`)
            and once on a plain rank-4r TT whose value is ``X``.
        u: a packed tangent vector at ``p`` (gauged or not: it is gauged first, the
            tangent vector it represents is kept).
    Returns:
        packed gauged deltas of ``Hess f(X)[xi]`` (detached), in ``p``'s dtype and device
        (per point for a batch, every sweep and solve batched).
    Cost: :func:`~.autodiff.riemannian_hvp` + :func:`~.autodiff.riemannian_grad` + ``f``
    and its backward on a rank-4r TT + O(d n r^3). For many products at one point use
    :func:`hessian_operator` (the gradient and the factors are computed once).
    """
    return hessian_operator(M, p, f)(u)


def hessian_operator(M, p: torch.Tensor, f: Callable[[TT], torch.Tensor],
                     grad: torch.Tensor = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map ``u -> Hess f(X)[u]`` at ``p`` (see :func:`riemannian_hess`), with the
    Riemannian gradient, the right cores and the interface factors computed once.

    Args:
        M, p, f: as for :func:`riemannian_hess`.
        grad: the Riemannian gradient at ``p`` if already known (packed gauged deltas).
    Returns:
        a function of a packed tangent vector ``u`` returning packed gauged deltas.
    Cost: one :func:`~.autodiff.riemannian_grad` (unless ``grad`` is given) + O(d n r^3);
    each call as :func:`riemannian_hess` without the gradient.
    """
    p = p.detach()
    U = M.split(p, "p")
    assert_finite_async(p, "p")  # (else the NaN surfaced as "u" from a proju inside)
    if M.d == 1:
        return lambda u: riemannian_hvp(M, p, f, _checked_u(M, p, u))
    if grad is None:
        g = riemannian_grad(M, p, f)
    else:
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"grad: expected a packed tangent vector (a tensor), got "
                            f"{type(grad).__name__}")
        M.split(grad, "grad")
        if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
            raise ValueError(f"grad: {tuple(grad.shape)} {grad.dtype} on {grad.device}, the "
                             f"point is {tuple(p.shape)} {p.dtype} on {p.device}")
        assert_finite_async(grad, "grad")
        g = grad.detach()
    V = right_cores(U)
    R = interface_factors(U, V)
    grad_tt = M.tangent_to_tt(p, g)

    batch = tuple(p.shape[:-1])

    def apply(u: torch.Tensor) -> torch.Tensor:
        u = _checked_u(M, p, u)
        hvp = riemannian_hvp(M, p, f, u)
        w = M.split(u, "u")
        a = [_solve_right(R[k], w[k], True, k) for k in range(M.d - 1)] + [w[-1]]
        def weingarten(flat):
            Z = _second_derivative_tt(U, a, M.split(flat, "b"))
            # <N, phi''[a, b]> = <G, phi''[a, b]> - <P_X G, phi''[a, b]>
            return _check_value(f(Z), batch) - inner(grad_tt, Z).sum()

        if torch.compiler.is_compiling() or functorch_wrapped(p):
            # (dynamo stops at torch.autograd.grad; vmap: torch.func as well)
            gb = torch.func.grad(weingarten)(torch.zeros_like(p))
        else:
            with torch.enable_grad():
                flat = torch.zeros_like(p).requires_grad_()
                (gb,) = torch.autograd.grad(weingarten(flat), flat, allow_unused=True)
        if gb is None:
            return hvp
        c = M.split(gb, "b")
        gw = [_solve_right(R[k], c[k], False, k) for k in range(M.d - 1)] + [c[-1]]
        return hvp + M.proju(p, torch.cat([t.flatten(-3) for t in gw], -1))

    return apply


def _checked_u(M, p, u):
    M.split(u, "u")
    if u.dtype != p.dtype or u.device != p.device:
        raise TypeError(f"u: {u.dtype} on {u.device}, the point is {p.dtype} on {p.device}")
    if u.shape != p.shape:
        raise ValueError(f"u: shape {tuple(u.shape)} differs from the point's {tuple(p.shape)} "
                         f"(one tangent vector per point)")
    assert_finite_async(u, "u")
    return M.gauge(p, u.detach())
