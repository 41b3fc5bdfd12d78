"""The retraction of the fixed-TT-rank manifold as a pure function of cores:
``R_X(xi) = round_r(X + xi)``, the TT-SVD of the rank-2r TT of ``X + xi`` that uses its
block structure. The mathematics: ``docs/manifold.md#retraction``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import kernels
from ..kernels import dense as compiled_dense
from ..tt import qr_pos
from .sweeps import (core_runs, one_point_batch, prefer_fewer_launches, right_cores,
                     squeeze_cores)

__all__ = ["retract", "retract_point"]


def _has_bonds(U, *args, **kwargs) -> bool:
    """The compiled kernels take one point with bonds: ``d > 1``, no batch dimension."""
    return len(U) > 1 and all(not isinstance(c, torch.Tensor) or c.dim() == 3
                              for seq in (U,) + args if isinstance(seq, (list, tuple))
                              for c in seq)


@kernels.dispatch("dense", compiled=compiled_dense.retract, when=_has_bonds)
def retract(U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
            du: Sequence[torch.Tensor], ranks: Sequence[int]) -> torch.Tensor:
    """Packed left-orthogonal cores of ``round_r(X + xi)``, ``xi = sum_k U_<k du_k V_>k``.

    Args:
        U: left-orthogonal cores of the point X.
        V: its right-orthogonal cores (:func:`~.sweeps.right_cores`; ``V[0]`` unused).
        du: deltas of the tangent step (gauged or not), cores of ``U``'s shapes.
        ranks: the ``d + 1`` TT-ranks of the manifold.
    Returns:
        one flat tensor, the left-orthogonal cores of the result concatenated; with leading
        batch dimensions ``B`` on the cores (``(*B, r, n, r')``, broadcast between ``U``,
        ``V`` and ``du``) one such tensor per point, ``(*B, size)``, every step batched.

    The TT-SVD of the rank-2r TT with block cores ``[[V_k, 0], [du_k, U_k]]`` (last core
    ``[[V_d], [U_d + du_d]]``): the rows ``[V_k, 0]`` are already right-orthonormal, so the
    right-to-left orthogonalization only removes their component from the bottom block and
    QR-factorizes the rest (an ``r x n (r + r')`` LQ instead of a ``2r x 2nr`` one), then
    truncated SVDs from left to right. A rank that collapses below ``r`` is padded with an
    orthonormal complement (the result stays on the manifold's format).
    Cost: O(d n r^3); differentiable. Compiled CPU version via :mod:`ttmanifold.kernels`.
    """
    if U[0].dim() > 3 or du[0].dim() > 3:
        bs = one_point_batch(U, V, du)
        if bs is not None:  # one point: the single-point path, compiled kernels included
            out = retract(squeeze_cores(U), squeeze_cores(V), squeeze_cores(du), ranks)
            return out.reshape(bs + out.shape)
        return _retract_batched(U, V, du, ranks)
    return _retract_sweeps(U, V, du, ranks, ())


@kernels.dispatch("dense", compiled=compiled_dense.retract_point, when=_has_bonds)
def retract_point(U: Sequence[torch.Tensor], du: Sequence[torch.Tensor],
                  ranks: Sequence[int]) -> torch.Tensor:
    """:func:`retract` that computes the right-orthogonal cores itself (one compiled call
    on the CPU). Same arguments without ``V``; cost O(d n r^3)."""
    if U[0].dim() > 3 or du[0].dim() > 3:
        bs = one_point_batch(U, du)
        if bs is not None:  # one point: the single-point path (one compiled call)
            out = retract_point(squeeze_cores(U), squeeze_cores(du), ranks)
            return out.reshape(bs + out.shape)
    return retract(U, right_cores(U), du, ranks)


def _retract_batched(U, V, du, ranks) -> torch.Tensor:
    """:func:`retract` for cores and deltas with leading batch dimensions ``B`` (broadcast):
    the same sweeps, every QR, SVD and product batched over ``B``; returns ``(*B, size)``."""
    bs = tuple(torch.broadcast_shapes(U[0].shape[:-3], du[0].shape[:-3]))

    def ex(c):
        return c if c is None or tuple(c.shape[:-3]) == bs else c.expand(bs + c.shape[-3:])

    return _retract_sweeps([ex(u) for u in U], [ex(v) for v in V], [ex(c) for c in du],
                           ranks, bs)


def _padded(U, V, du, bs):
    """The top rows ``[V_k, 0]`` (k = 1..d-2) and bottom deltas ``[du_k, 0]`` (k = 0..d-2)
    of the block cores, each zero block as wide as the core: one stack and one pad per run
    of equal middle shapes (a few kernel launches instead of two per core)."""
    d, nb = len(U), len(bs)
    Vp: List[Optional[torch.Tensor]] = [None] * d
    dp: List[Optional[torch.Tensor]] = [None] * d
    dp[0] = torch.nn.functional.pad(du[0], (0, du[0].shape[-1]))
    for k0, k1 in core_runs([tuple(U[k].shape[-3:]) for k in range(1, d - 1)]):
        k0, k1 = k0 + 1, k1 + 1
        both = torch.stack(list(V[k0:k1]) + list(du[k0:k1]), nb)
        parts = torch.nn.functional.pad(both, (0, both.shape[-1])).unbind(nb)
        Vp[k0:k1], dp[k0:k1] = parts[:k1 - k0], parts[k1 - k0:]
    return Vp, dp


def _retract_sweeps(U, V, du, ranks, bs) -> torch.Tensor:
    """The sweeps of :func:`retract` for cores of batch shape ``bs`` (``()`` for one point;
    ``U``, ``V``, ``du`` already expanded to it).

    Right to left, the bottom block ``[B_V | B_W]`` of core k (columns of the V block and
    of the factor carried from core k+1, interleaved per mode index as in the core) loses
    its component along the rows of ``[V_k, 0]`` (``C``, one product, and one fused
    subtraction: the zero block adds nothing), the rest is QR-factorized, and the next
    bottom block is ``[du_{k-1}, 0] + U_{k-1} [C | R^T]`` in one fused product. The
    orthogonalized block core ``G_k = [[V_k, 0], [Q^T]]`` is kept, so left to right each
    core costs one SVD, one scaling and one product. The left-orthogonal factors of equal
    width are copied out with one concatenation at the end."""
    d, nb = len(U), len(bs)
    if d == 1:
        return (U[0] + du[0]).flatten(nb)
    if d > 2 and prefer_fewer_launches(U[0].device, 4 * sum(c.numel() for c in du)):
        return _retract_blocks(U, V, du, ranks, bs)
    Vp, dp = _padded(U, V, du, bs)
    a, n, _ = U[-1].shape[-3:]
    bottom = (U[-1] + du[-1]).reshape(bs + (a, n))
    G: List[Optional[torch.Tensor]] = [None] * d
    for k in range(d - 1, 0, -1):
        top = V[k] if k == d - 1 else Vp[k]
        top = top.reshape(bs + (top.shape[-3], -1))
        C = bottom @ top.mT
        q, r = torch.linalg.qr(_addmm(bottom, C, top, -1).mT)
        G[k] = torch.cat([top, q.mT], -2)
        ua, un, ub = U[k - 1].shape[-3:]
        ul = U[k - 1].reshape(bs + (ua * un, ub))
        bottom = _addmm(dp[k - 1].reshape(bs + (ua * un, -1)), ul, torch.cat([C, r.mT], -1),
                        1).reshape(bs + (ua, -1))
    return _truncate(bottom.reshape(bs + (U[0].shape[-2], -1)), G, U, ranks, bs)


def _retract_blocks(U, V, du, ranks, bs) -> torch.Tensor:
    """The sweeps of :func:`retract` on the full block cores (the choice where launches
    dominate, :func:`~.sweeps.prefer_fewer_launches`): the block cores are built with a few
    operations per run of equal middle shapes, then the plain right-to-left
    orthogonalization of the rank-2r TT costs one QR and one product per core (the
    structured sweeps: one QR and five other operations), for about twice their flops."""
    d, nb = len(U), len(bs)
    X = [torch.cat([du[0], U[0]], -1)]
    for k0, k1 in core_runs([tuple(U[k].shape[-3:]) for k in range(1, d - 1)]):
        k0, k1 = k0 + 1, k1 + 1
        m = k1 - k0
        parts = torch.stack(list(V[k0:k1]) + list(du[k0:k1]) + list(U[k0:k1]), nb)
        top = torch.nn.functional.pad(parts.narrow(nb, 0, m), (0, parts.shape[-1]))
        bottom = torch.cat([parts.narrow(nb, m, m), parts.narrow(nb, 2 * m, m)], -1)
        X.extend(torch.cat([top, bottom], -3).unbind(nb))
    X.append(torch.cat([V[-1], U[-1] + du[-1]], -3))
    G: List[Optional[torch.Tensor]] = [None] * d
    a, n, _ = X[-1].shape[-3:]
    c = X[-1].reshape(bs + (a, n))
    for k in range(d - 1, 0, -1):
        q, r = torch.linalg.qr(c.mT)
        G[k] = q.mT  # right-orthonormal rows
        xa, xn, xb = X[k - 1].shape[-3:]
        c = (X[k - 1].reshape(bs + (xa * xn, xb)) @ r.mT).reshape(bs + (xa, -1))
    return _truncate(c.reshape(bs + (U[0].shape[-2], -1)), G, U, ranks, bs)


def _truncate(c, G, U, ranks, bs) -> torch.Tensor:
    """The left-to-right truncated SVDs of :func:`retract`: ``c`` the first core (as a
    matrix) of the right-orthogonalized rank-2r TT, ``G[k]`` (k >= 1) its other cores as
    ``(rows, n_k cols)`` matrices with orthonormal rows. Returns the packed result."""
    d, nb = len(U), len(bs)
    lefts = []
    for k in range(d - 1):
        u, s, vh = torch.linalg.svd(c, full_matrices=False)
        r = ranks[k + 1]
        if u.shape[-1] < r:  # rank collapsed below r: pad with an orthonormal complement
            u, s, vh = _pad_svd(u, s, vh, r)
        lefts.append(u[..., :r])
        c = ((s[..., :r, None] * vh[..., :r, :]) @ G[k + 1]).reshape(
            bs + (r * U[k + 1].shape[-2], -1))
    pieces = []  # consecutive factors of one width: one concatenation (rows), flattened
    i = 0
    while i < len(lefts):
        j = i + 1
        while j < len(lefts) and lefts[j].shape[-1] == lefts[i].shape[-1]:
            j += 1
        pieces.append((lefts[i] if j == i + 1 else torch.cat(lefts[i:j], -2)).flatten(nb))
        i = j
    pieces.append(c.flatten(nb))
    return torch.cat(pieces, -1)


def _addmm(c, a, b, alpha):
    """``c + alpha a b``: one fused ``addmm``/``baddbmm`` for matrices or one batch
    dimension (the common cases), else a product and a sum."""
    if c.dim() == 2 and a.dim() == 2 and b.dim() == 2:
        return torch.addmm(c, a, b, alpha=alpha)
    if c.dim() == 3 and a.dim() == 3 and b.dim() == 3:
        return torch.baddbmm(c, a, b, alpha=alpha)
    return c + a @ b if alpha == 1 else c - a @ b


def _pad_svd(u, s, vh, r):
    """Extend a thin SVD of rank ``k < r`` to ``r`` columns with an orthonormal
    complement and zero singular values."""
    m, k = u.shape[-2:]
    if u.dim() > 2:  # leading batch dimensions
        bs = u.shape[:-2]
        extra = torch.eye(m, r - k, dtype=u.dtype, device=u.device).expand(bs + (m, r - k))
        q, _ = qr_pos(torch.cat([u, extra], -1))
        return (torch.cat([u, q[..., k:r]], -1), torch.cat([s, s.new_zeros(bs + (r - k,))], -1),
                torch.cat([vh, vh.new_zeros(bs + (r - k, vh.shape[-1]))], -2))
    extra = torch.eye(m, r - k, dtype=u.dtype, device=u.device)
    q, _ = qr_pos(torch.cat([u, extra], 1))
    u = torch.cat([u, q[:, k:r]], 1)
    s = torch.cat([s, s.new_zeros(r - k)])
    vh = torch.cat([vh, vh.new_zeros(r - k, vh.shape[1])], 0)
    return u, s, vh
