"""Riemannian automatic differentiation on the fixed-TT-rank manifold.

The gradient of a loss ``f`` at a point ``X`` with cores ``U`` (left-orthogonal) and
``V`` (right-orthogonal) is read off one reverse pass of ``g(delta) = f(sum_k U_<k delta_k
V_>k)`` at ``delta = (0, ..., 0, U_d)`` (where the sum equals X) followed by the gauge
projection; a second reverse pass gives Hessian-vector products. ``f`` receives a
:class:`~.tangent.TangentTT`, so losses built from inner products and norms cost about
one projection. The mathematics: ``docs/autodiff.md``.

The functions take the manifold (a :class:`~.fixed_rank.FixedTTRank`) for its packing.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import kernels
from .._checks import assert_finite_async, functorch_wrapped
from ..kernels import dense as compiled_dense
from ..kernels.memory import big_cpu_output, empty_for_output
from ..tt import TT
from ..tt.tensor_train import packed_grads_only
from .sweeps import gauge_project_flat, right_cores
from .tangent import TangentTT

__all__ = ["gauge_project_checked", "riemannian_grad", "riemannian_hvp", "tangent_at_point"]


class _DeltaFromPoint(torch.autograd.Function):
    """The packed deltas ``(0, ..., 0, U_d)`` of the point ``p`` (value X), with the
    gradient path of ``dU_k = p_k - p_k.detach()``: the incoming gradient, gauge
    projected on the cores ``k < d``, goes to ``p``. Written for functorch too
    (``setup_context``, out-of-place forward, generated vmap rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(p, runs):
        last = runs[1]
        if big_cpu_output(p) and not functorch_wrapped(p):
            # written in place into one fresh output (huge pages): no zeros to concatenate
            out = empty_for_output(p.shape, p.dtype, p.device)
            out[..., :last].zero_()
            out[..., last:].copy_(p[..., last:])
            return out
        if p.dim() > 1:  # a batch of points (*batch, size)
            return torch.cat([p.new_zeros(p.shape[:-1] + (last,)), p[..., last:]], -1)
        return torch.cat([p.new_zeros(last), p[last:]])

    @staticmethod
    def setup_context(ctx, inputs, output):
        p, runs = inputs
        ctx.runs = runs
        ctx.save_for_backward(p)

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return gauge_project_flat(ctx.runs, p.detach(), g), None


def tangent_at_point(M, p: torch.Tensor, cores=None) -> TangentTT:
    """The rank-2r tangent TT whose value is X, its deltas tied to ``p`` (which requires
    grad): backpropagating a loss of it gives ``p.grad`` = the Riemannian gradient in
    packed gauged form (what :meth:`FixedTTRank.unpack_tensor
    <ttmanifold.FixedTTRank.unpack_tensor>` returns under autograd). ``cores``: ``p``'s
    cores as ``M.split(p)`` returns them, if the caller has them (spares a second split).
    O(d n r^3)."""
    U = [c.detach() for c in (M.split(p, "p") if cores is None else cores)]
    V = right_cores(U)
    flat = _DeltaFromPoint.apply(p, M.gauge_runs)
    return TangentTT(U, V, None, flat=flat, gauged=True, check=False, canonical=True)


def _delta_tt(M, p, U, V):
    """Packed deltas ``(0, .., 0, U_d)`` requiring grad, and the TT they define (X). The
    deltas are a view of a private leaf: a non-leaf, so that :func:`packed_grads_only` can
    tell the reverse pass that differentiates with respect to them."""
    leaf = M.point_as_tangent(p).requires_grad_()
    flat = leaf.view_as(leaf)
    if M.d == 1:
        return flat, TT(M.split(flat, "p"), check=False)
    return flat, TangentTT(U, V, None, flat=flat, gauged=True, check=False, canonical=True)


def _func_loss(M, p, U, V, f):
    """``delta -> f(T(delta))`` for ``torch.func`` (points that are functorch-wrapped, e.g.
    under ``vmap``, and torch.compile tracing, which stops at ``torch.autograd.grad``); for
    a batch ``p`` the values are summed (points are independent)."""
    batch = p.shape[:-1]

    def g(flat):
        deltas = M.split(flat, "p")
        T = TT(deltas, check=False) if M.d == 1 else TangentTT(U, V, deltas, flat=flat,
                                                               gauged=True, check=False)
        return _check_loss_shape(f(T), batch).sum()

    return g


def _func_grad(M, p, U, V, f):
    """``d f(T(delta)) / d delta`` at ``delta = (0, .., 0, U_d)`` with ``torch.func.grad``
    (see :func:`_func_loss`)."""
    return torch.func.grad(_func_loss(M, p, U, V, f))(M.point_as_tangent(p))


def _gauge(M, p, D):
    """The gauge projection of the packed ``D`` at ``p`` (inputs already validated here,
    so the pure function directly: ``M.proju`` would check and copy again)."""
    if M.d == 1:
        return D.clone()
    return gauge_project_flat(M.gauge_runs, p, D)


_NONFINITE = "f: gradient contains NaN or Inf"
_NONFINITE_G = "f: gradient contains NaN or Inf (or the point p does)"
_NONFINITE_HVP = "f: Hessian-vector product contains NaN or Inf"


def _checkable(runs, p, D) -> bool:
    return p.dim() == D.dim() and p.dim() <= 2 and p.shape == D.shape


@kernels.dispatch("dense", compiled=compiled_dense.gauge_project_checked, when=_checkable)
def gauge_project_checked(runs, p: torch.Tensor, D: torch.Tensor):
    """The gauge projection of the packed ``D`` at the packed point ``p`` and whether it is
    finite: compiled on the CPU, one call that tests the result as it writes it (a
    non-finite ``D`` or point makes it non-finite: no pass over ``D`` of its own).

    Args:
        runs: the manifold's ``gauge_runs`` (``d >= 2``); p, D: one point and tensor
            ``(size,)``, or a batch ``(B, size)`` of each (other shapes: the torch path).
    Returns:
        ``(G, finite)``: ``finite`` a bool from the compiled kernel, None from the torch
        path (the caller then checks ``G`` itself, e.g. asynchronously).
    Cost: O(size r) per point, one call.
    """
    return gauge_project_flat(runs, p, D), None


def _check_loss_shape(val, batch=()):
    """``val`` if it is a scalar, or for a batch of points one value per point (shape
    ``batch``); raises ``ValueError`` naming ``f`` otherwise."""
    ok = isinstance(val, torch.Tensor) and (
        val.numel() == 1 or (batch and tuple(val.shape) == tuple(batch)))
    if not ok:
        extra = f" or one value per point (shape {tuple(batch)})" if batch else ""
        raise ValueError(f"f: expected a function returning a scalar tensor{extra}")
    return val


def _check_loss(val, batch=()):
    """A scalar, or for a batch of points a scalar or one value per point (shape
    ``batch``), that depends on the TT; returns it, to differentiate with ones as the seed
    (the sum: points are independent; one operation, as the implicit seed of a scalar,
    instead of a sum and a seed)."""
    _check_loss_shape(val, batch)
    if not val.requires_grad:
        raise ValueError("f: the returned scalar does not depend on the TT (no grad)")
    return val


def _seed(val):
    """The backward seed of the loss value(s): ones per point (None: the scalar's own)."""
    return torch.ones_like(val) if val.dim() > 0 else None


def riemannian_grad(M, p: torch.Tensor, f: Callable[[TT], torch.Tensor]) -> torch.Tensor:
    """Riemannian gradient of ``f`` at the packed point ``p`` of ``M``.

    Args:
        M: the manifold (:class:`~ttmanifold.FixedTTRank`).
        p: a packed point.
        f: a differentiable function of a :class:`~ttmanifold.TT` returning a scalar; it
            receives a :class:`~.tangent.TangentTT` (inner products and norms at rank r,
            other operations on the rank-2r cores). For a batch of points ``(*B, size)``
            it receives the batched tangent TT and returns one value per point (shape
            ``B``) or their sum.
    Returns:
        the packed gauged deltas of the gradient (detached), ``p``'s shape: each point's
        gradient of its own value. Non-finite gradients raise through
        ``torch._assert_async`` (no host sync).
    Cost: ``f`` and its backward at the tangent TT plus O(d n r^3) (Novikov, Rakhuba,
    Oseledets 2021).
    """
    p = p.detach()
    U = M.split(p, "p")
    V = right_cores(U)
    if torch.compiler.is_compiling() or functorch_wrapped(p):
        # inside vmap/grad, or traced by dynamo (which stops at torch.autograd.grad):
        # differentiate with torch.func instead
        return M.proju(p, _func_grad(M, p, U, V, f))
    with torch.enable_grad():
        flat, T = _delta_tt(M, p, U, V)
        val = _check_loss(f(T), p.shape[:-1])
        with packed_grads_only(flat):  # only flat's gradient is read: no whole core gradients
            (D,) = torch.autograd.grad(val, flat, _seed(val), allow_unused=True)
    if D is None:
        return torch.zeros_like(p)
    if M.d == 1:
        assert_finite_async(D, "f", _NONFINITE)
        return D.clone()
    # G, not only D: a non-finite point reaches G through the gauge projection even where D
    # is finite (0.5 <X, X> has D = (0, .., 0, U_d)); one pass, no host sync
    G, finite = gauge_project_checked(M.gauge_runs, p, D)
    if finite is None:
        assert_finite_async(G, "f", _NONFINITE_G)
    elif not finite:  # the compiled path tested G
        raise RuntimeError(_NONFINITE_G)
    return G


def riemannian_hvp(M, p: torch.Tensor, f: Callable[[TT], torch.Tensor],
                   u: torch.Tensor) -> torch.Tensor:
    """Projected Hessian-vector product ``P_X (nabla^2 f) [xi]`` at ``p``.

    A second reverse pass through the delta map (linear in delta): the Euclidean Hessian
    of ``f`` restricted to the tangent space. The curvature term of the Riemannian
    Hessian is **not** included: it depends on the normal part of the Euclidean gradient,
    so it vanishes only where that part does (e.g. a zero-residual fit at its solution),
    not at every critical point (``docs/autodiff.md#what-the-hessian-vector-product-omits``).

    Args:
        M, p, f: as for :func:`riemannian_grad`; u: packed tangent vector at ``p`` (a batch
            ``(*B, size)`` with a batch of points).
    Returns:
        packed gauged deltas (per point for a batch). Non-finite ``p`` or ``u`` raise
        ``RuntimeError`` naming it, a non-finite product ``RuntimeError`` naming ``f``
        (on-device asserts, no host sync). Cost: about twice
        :func:`riemannian_grad`.
    """
    p = p.detach()
    U = M.split(p, "p")
    M.split(u, "u")
    if u.shape != p.shape:
        raise ValueError(f"u: shape {tuple(u.shape)} differs from the point's {tuple(p.shape)}")
    if u.dtype != p.dtype or u.device != p.device:
        raise TypeError(f"u: {u.dtype} on {u.device}, the point is {p.dtype} on {p.device}")
    # (the products below would only spread a NaN into every delta)
    assert_finite_async(p, "p")
    assert_finite_async(u, "u")
    V = right_cores(U)
    if torch.compiler.is_compiling() or functorch_wrapped(p):
        # forward over reverse with torch.func (as riemannian_grad there): H = d/dt D(x + t u)
        g = torch.func.grad(_func_loss(M, p, U, V, f))
        H = torch.func.jvp(g, (M.point_as_tangent(p),), (u,))[1]
        assert_finite_async(H, "f", _NONFINITE_HVP)
        return _gauge(M, p, H)
    with torch.enable_grad():
        flat, T = _delta_tt(M, p, U, V)
        val = _check_loss(f(T), p.shape[:-1])
        (D,) = torch.autograd.grad(val, flat, _seed(val), create_graph=True, allow_unused=True)
        if D is None or not D.requires_grad:  # f at most linear in X
            return torch.zeros_like(p)
        Du = torch.dot(D, u) if D.dim() == 1 else (D * u).sum()  # points are independent
        (H,) = torch.autograd.grad(Du, flat, allow_unused=True)
    if H is None:
        return torch.zeros_like(p)
    # (f non-finite near p, e.g. a NaN loss: riemannian_grad raises for it, so does this)
    assert_finite_async(H, "f", _NONFINITE_HVP)
    return _gauge(M, p, H)
