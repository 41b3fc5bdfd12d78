"""The retraction of the fixed-TT-rank manifold as a pure function of cores:
``R_X(xi) = round_r(X + xi)``, the TT-SVD of the rank-2r TT of ``X + xi`` that uses its
block structure. The mathematics: ``docs/manifold.md#retraction``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from .. import kernels
from ..kernels import dense as compiled_dense
from ..tt import qr_pos
from .sweeps import (batched_qr, batched_svd, core_runs, has_bonds,
                     one_point_batch, prefer_fewer_launches, right_cores, right_sweep,
                     squeeze_cores, stack_pays)

__all__ = ["retract", "retract_point", "block_cores", "scattered_block_cores",
           "retract_transport_cores", "small_retract_module", "retract_small",
           "wide_retract_module", "retract_wide"]


@kernels.dispatch("dense", compiled=compiled_dense.retract, when=has_bonds)
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
    orthonormal complement (the result stays on the manifold's format). Where launches
    dominate (:func:`~.sweeps.prefer_fewer_launches`) the plain orthogonalization of the
    block cores runs instead (:func:`_retract_blocks`: fewer operations, more flops).
    Cost: O(d n r^3); differentiable. Compiled CPU version via :mod:`ttmanifold.kernels`.
    """
    d = len(U)
    if U[0].dim() > 3 or du[0].dim() > 3:
        bs = one_point_batch(U, V, du)
        if bs is not None:  # one point: the single-point path, compiled kernels included
            out = retract(squeeze_cores(U), squeeze_cores(V), squeeze_cores(du), ranks)
            return out.reshape(bs + out.shape)
        return _retract_batched(U, V, du, ranks)
    if d == 1:
        return (U[0] + du[0]).reshape(-1)
    if d > 2 and prefer_fewer_launches(U[0].device, 4 * sum(c.numel() for c in du)):
        X = scattered_block_cores(U, V, [du], (), add_point=(True,))[0]
        return _retract_blocks(U, X, ranks, ())
    QV: List[Optional[torch.Tensor]] = [None] * d
    QW: List[int] = [0] * d
    rows = U[-1].shape[0]
    left = (U[-1] + du[-1]).reshape(rows, -1)  # bottom block, columns of the V part
    right = None  # bottom block, the other columns
    for k in range(d - 1, 0, -1):
        vm = V[k].reshape(V[k].shape[0], -1)
        C = left @ vm.transpose(0, 1)
        w = torch.addmm(left, C, vm, alpha=-1)
        W = w if right is None else torch.cat([w, right], 1)
        q, r = _complement_qr(W.transpose(0, 1), W.shape[1] - vm.shape[0])
        qt = q.transpose(0, 1)
        QV[k], QW[k] = qt, w.shape[1]  # [Q_V | Q_W] whole and the width of Q_V
        ul = U[k - 1].reshape(-1, U[k - 1].shape[2])
        rows = U[k - 1].shape[0]
        left = torch.addmm(du[k - 1].reshape(ul.shape), ul, C).reshape(rows, -1)
        right = (ul @ r.transpose(0, 1)).reshape(rows, U[k - 1].shape[1] * r.shape[0])
    n = U[0].shape[1]
    c = torch.cat([left.reshape(n, -1), right.reshape(n, right.shape[1] // n)], 1)
    group = _group_lefts(U)
    lefts = []  # the new cores' factors, concatenated at the end (no in-place writes)
    for k in range(d - 1):
        u, s, vh = torch.linalg.svd(c, full_matrices=False)
        r = ranks[k + 1]
        if u.shape[1] < r:  # rank collapsed below r: pad with an orthonormal complement
            u, s, vh = _pad_svd(u, s, vh, r)
        lefts.append(u[:, :r] if group else u[:, :r].reshape(-1))
        sv = s[:r, None] * vh[:r]
        a, nk, b = V[k + 1].shape
        # one product for both blocks, [s v Q_V | s v Q_W], then the V part added to the first
        prod = sv[:, a:] @ QV[k + 1]
        nv = QW[k + 1]
        top = torch.addmm(prod[:, :nv], sv[:, :a], V[k + 1].reshape(a, -1))
        if k + 2 == d:  # the last core: no Q_W block
            c = top
        elif nv == prod.shape[1]:  # no Q_W block left at a maximal bond (_cap_complement)
            c = top.reshape(r * nk, b)
        else:
            c = torch.cat([top.reshape(r, nk, b), prod[:, nv:].reshape(r, nk, -1)], 2).reshape(
                r * nk, -1)
    return _packed(lefts, c, 0, group)


#: The compiled batched retraction for small ranks (``dense.cpp``'s ``retract_batch_small``:
#: blocks of points through the whole computation, SIMD across the points) takes a batch of
#: at least ``SMALL_RETRACT_MIN_BATCH`` points or steps whose TT-ranks are at most
#: ``SMALL_RETRACT_MAX_RANK`` (its SVDs have ``2 r`` columns, at most 8) and whose unfoldings
#: ``r_k n_k x 2 r_{k+1}`` are not wide. Measured: see docs/kernels.md.
SMALL_RETRACT_MIN_BATCH = 16
SMALL_RETRACT_MAX_RANK = 4


def _small_retract(U, du, ranks) -> bool:
    """Whether the compiled small-rank batched retraction takes the call (shapes only)."""
    return _simd_retract_takes(U, du, SMALL_RETRACT_MIN_BATCH, SMALL_RETRACT_MAX_RANK)


def _simd_retract_takes(U, du, min_batch: int, max_rank: int) -> bool:
    """Whether a SIMD batch retraction kernel takes ``retract_point(U, du, ranks)``: a batch
    of at least ``min_batch`` points or steps, TT-ranks at most ``max_rank``, cores with an
    LQ (``n_k r_{k+1} >= r_k``) and rank-2r unfoldings that are not wide."""
    d = len(U)
    if d < 2 or len(du) != d or any(c.dim() < 3 for c in list(U) + list(du)):
        return False
    if U[0].dim() == 3 and du[0].dim() == 3:  # one point: the single-point kernels
        return False
    shapes = [c.shape[:-3] for c in list(U) + list(du)]
    # one shape: no torch.broadcast_shapes (~0.3 ms of Python a call); compared, not
    # hashed: hashing a traced symbolic size would specialize it under torch.compile
    try:
        one = all(s == shapes[0] for s in shapes[1:])
        bs = shapes[0] if one else torch.broadcast_shapes(*shapes)
    except RuntimeError:
        return False
    if bs.numel() < min_batch:
        return False
    for k, (u, e) in enumerate(zip(U, du)):
        a, n, b = u.shape[-3:]
        if (tuple(e.shape[-3:]) != (a, n, b) or max(a, b) > max_rank
                or (k > 0 and n * b < a) or (k < d - 1 and a * n < 2 * b)):
            return False
    return True


@kernels.dispatch("dense", compiled=compiled_dense.retract_batch_small, when=_small_retract)
def retract_point(U: Sequence[torch.Tensor], du: Sequence[torch.Tensor],
                  ranks: Sequence[int]) -> torch.Tensor:
    """:func:`retract` that computes the right-orthogonal cores itself (one compiled call
    on the CPU; a batch of small TT-ranks runs SIMD across the points,
    :data:`SMALL_RETRACT_MAX_RANK`, and up to :data:`WIDE_RETRACT_MAX_RANK` another
    kernel). Same arguments without ``V``; cost O(d n r^3)."""
    return _retract_point_wide(U, du, ranks)


def small_retract_module(U: Sequence[torch.Tensor], du: Sequence[torch.Tensor],
                         ranks: Sequence[int]):
    """The loaded dense module when the compiled small-rank batched retraction takes
    ``retract_point(U, du, ranks)`` (shapes, dtypes, grad and device as its dispatch
    decides), else None; :func:`retract_small` then runs it. Cost: shapes only."""
    return retract_point.module_for(U, du, ranks)


def retract_small(mod, U: Sequence[torch.Tensor], du: Sequence[torch.Tensor],
                  ranks: Sequence[int],
                  V: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """``retract_point(U, du, ranks)`` of a batch by the compiled small-rank kernel ``mod``
    (from :func:`small_retract_module`; None: the usual dispatch).

    Args: ``mod`` and the arguments of :func:`retract_point`; ``V``: the points' canonical
        right cores (``right_cores(U)``, ``V[0]`` unused) when the caller has them (the
        kernel's LQ sweep skipped: the same result), else None.
    Returns: ``(*batch, size)``, the packed left-orthogonal cores of each result.
    Cost: O(B d n r^3), one call."""
    if V is None or mod is None:
        return retract_point.call_with(mod, U, du, ranks)
    return retract_point.call_with(mod, U, du, ranks, V=V)


#: The compiled batched retraction for ranks above :data:`SMALL_RETRACT_MAX_RANK`
#: (``dense.cpp``'s ``retract_batch_wide``: the small-rank kernel's algorithm with
#: factorizations of runtime width) takes what that one does not: a batch of at least
#: ``WIDE_RETRACT_MIN_BATCH`` points or steps, TT-ranks at most ``WIDE_RETRACT_MAX_RANK``,
#: unfoldings ``r_k n_k x 2 r_{k+1}`` that are not wide. Measured: see docs/kernels.md.
WIDE_RETRACT_MIN_BATCH = 16
WIDE_RETRACT_MAX_RANK = 12


def _wide_retract(U, du, ranks) -> bool:
    """Whether the compiled batched retraction of runtime width takes the call."""
    return _simd_retract_takes(U, du, WIDE_RETRACT_MIN_BATCH, WIDE_RETRACT_MAX_RANK)


@kernels.dispatch("dense", compiled=compiled_dense.retract_batch_wide, when=_wide_retract)
def _retract_point_wide(U: Sequence[torch.Tensor], du: Sequence[torch.Tensor],
                        ranks: Sequence[int]) -> torch.Tensor:
    """:func:`retract_point` outside the small-rank batched kernel: a batch of TT-ranks up
    to :data:`WIDE_RETRACT_MAX_RANK` runs SIMD across the points."""
    return _retract_point(U, du, ranks)


def wide_retract_module(U: Sequence[torch.Tensor], du: Sequence[torch.Tensor],
                        ranks: Sequence[int]):
    """The loaded dense module when the compiled batched retraction of runtime width takes
    ``retract_point(U, du, ranks)`` (:data:`WIDE_RETRACT_MAX_RANK`; shapes, dtypes, grad and
    device as its dispatch decides), else None; :func:`retract_wide` then runs it.

    Args: as :func:`retract_point`.
    Returns: the module or None. Cost: shapes only."""
    return _retract_point_wide.module_for(U, du, ranks)


def retract_wide(mod, U: Sequence[torch.Tensor], du: Sequence[torch.Tensor],
                 ranks: Sequence[int],
                 V: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """``retract_point(U, du, ranks)`` of a batch by the compiled kernel of runtime width
    ``mod`` (from :func:`wide_retract_module`; None: the usual dispatch).

    Args: ``mod`` and the arguments of :func:`retract_point`; ``V``: as
        :func:`retract_small`'s.
    Returns: ``(*batch, size)``, the packed left-orthogonal cores of each result.
    Cost: O(B d n r^3), one call."""
    if V is None or mod is None:
        return _retract_point_wide.call_with(mod, U, du, ranks)
    return _retract_point_wide.call_with(mod, U, du, ranks, V=V)


@kernels.dispatch("dense", compiled=compiled_dense.retract_point, when=has_bonds)
def _retract_point(U: Sequence[torch.Tensor], du: Sequence[torch.Tensor],
                   ranks: Sequence[int]) -> torch.Tensor:
    """:func:`retract_point` outside the small-rank batched kernel."""
    if U[0].dim() > 3 or du[0].dim() > 3:
        bs = one_point_batch(U, du)
        if bs is not None:  # one point: the single-point path (one compiled call)
            out = retract_point(squeeze_cores(U), squeeze_cores(du), ranks)
            return out.reshape(bs + out.shape)
    if len(U) > 2 and prefer_fewer_launches(U[0].device, 4 * sum(c.numel() for c in du)):
        return _retract_point_blocks(U, du, ranks)
    return retract(U, right_cores(U), du, ranks)


def _retract_point_blocks(U, du, ranks) -> torch.Tensor:
    """:func:`retract_point` where launches dominate: the block-core sweeps of
    :func:`_retract_blocks` on block cores built from the unsigned LQ sweep. The canonical
    right cores are ``V_k = S_k V'_k S_{k+1}`` (:func:`~.sweeps.right_sweep`), so
    ``V_>k = S_{k+1} V'_>k`` and the step ``sum_k U_<k du_k V_>k`` has the block cores of
    ``V'`` with the deltas' right bonds scaled by the signs, ``du_k S_{k+1}``: one
    operation on all deltas (:func:`scattered_block_cores`) instead of fixing the signs
    of every ``V_k``. Same arguments as :func:`retract_point`; ``d >= 3``."""
    d = len(U)
    Vr: List[Optional[torch.Tensor]] = [None] * d
    dg: List[torch.Tensor] = []
    for k, q, r in right_sweep(U):  # on the point's own batch shape
        dg.append(torch.diagonal(r, dim1=-2, dim2=-1))
        a, n, b = U[k].shape[-3:]
        Vr[k] = q.reshape(q.shape[:-2] + (n, b, a)).movedim(-1, -3)  # V'_k, a view
    bs = tuple(torch.broadcast_shapes(U[0].shape[:-3], du[0].shape[:-3]))
    X = scattered_block_cores(U, Vr, [du], bs, add_point=(True,),
                              diagonals=dg[::-1])[0]
    return _retract_blocks(U, X, ranks, bs)


def _retract_batched(U, V, du, ranks) -> torch.Tensor:
    """:func:`retract` for cores and deltas with leading batch dimensions ``B`` (broadcast):
    the same sweeps, every QR, SVD and product batched over ``B``; returns ``(*B, size)``."""
    d = len(U)
    bs = torch.broadcast_shapes(U[0].shape[:-3], du[0].shape[:-3])
    nb = len(bs)

    def ex(c):
        return c if c is None or tuple(c.shape[:-3]) == tuple(bs) else c.expand(bs + c.shape[-3:])

    U, du = [ex(u) for u in U], [ex(c) for c in du]
    if d == 1:
        return (U[0] + du[0]).flatten(nb)
    V = [ex(v) for v in V]
    if d > 2 and prefer_fewer_launches(U[0].device, 4 * sum(c.numel() for c in du)):
        X = scattered_block_cores(U, V, [du], tuple(bs), add_point=(True,))[0]
        return _retract_blocks(U, X, ranks, tuple(bs))
    QV: List[Optional[torch.Tensor]] = [None] * d
    QW: List[int] = [0] * d
    a, n, b = U[-1].shape[-3:]
    left = (U[-1] + du[-1]).reshape(bs + (a, n * b))
    right = None
    for k in range(d - 1, 0, -1):
        va, vn, vb = V[k].shape[-3:]
        vm = V[k].reshape(bs + (va, vn * vb))
        C = left @ vm.mT
        w = _addmm(left, C, vm, -1)
        W = w if right is None else torch.cat([w, right], -1)
        q, r = _complement_qr(W.mT, W.shape[-1] - vm.shape[-2])
        qt = q.mT
        QV[k], QW[k] = qt, w.shape[-1]  # [Q_V | Q_W] whole and the width of Q_V
        ua, un, ub = U[k - 1].shape[-3:]
        ul = U[k - 1].reshape(bs + (ua * un, ub))
        left = _addmm(du[k - 1].reshape(ul.shape), ul, C, 1).reshape(bs + (ua, un * C.shape[-1]))
        right = (ul @ r.mT).reshape(bs + (ua, un * r.shape[-2]))
    n = U[0].shape[-2]
    c = torch.cat([left.reshape(bs + (n, left.shape[-1] // n)),
                   right.reshape(bs + (n, right.shape[-1] // n))], -1)
    group = _group_lefts(U)
    lefts = []
    for k in range(d - 1):
        u, s, vh = batched_svd(c)  # the compiled batched SVD where it pays
        r = ranks[k + 1]
        if u.shape[-1] < r:
            u, s, vh = _pad_svd(u, s, vh, r)
        lefts.append(u[..., :r] if group else u[..., :r].flatten(nb))
        sv = s[..., :r, None] * vh[..., :r, :]
        a, nk, b = V[k + 1].shape[-3:]
        prod = sv[..., a:] @ QV[k + 1]  # [s v Q_V | s v Q_W] in one product
        nv = QW[k + 1]
        top = _addmm(prod[..., :nv], sv[..., :a], V[k + 1].reshape(bs + (a, nk * b)), 1)
        if k + 2 == d:  # the last core: no Q_W block
            c = top
        elif nv == prod.shape[-1]:  # no Q_W block left at a maximal bond (_cap_complement)
            c = top.reshape(bs + (r * nk, b))
        else:
            # (unflatten/flatten, not reshape with -1: an empty batch leaves -1 ambiguous)
            c = torch.cat([top.reshape(bs + (r, nk, b)), prod[..., nv:].unflatten(-1, (nk, -1))],
                          -1).flatten(-3, -2)
    return _packed(lefts, c, nb, group)


def block_cores(U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
                delta_sets: Sequence[Sequence[torch.Tensor]], *,
                signs: Optional[torch.Tensor] = None) -> List[List[torch.Tensor]]:
    """The rank-2r block cores ``[D_1, U_1]``, ``[[V_k, 0], [D_k, U_k]]``, ``[[V_d], [D_d]]``
    of the TTs ``sum_k U_<k D_k V_>k`` for several sets of deltas ``D`` at one point, built
    together with a fixed number of operations (kernel launches): two for the first and
    the last cores and four per run of equal middle shapes, whatever the number of sets.

    Args:
        U, V: the point's left- and right-orthogonal cores (``V[0]`` unused), ``d >= 2``.
        delta_sets: ``P`` sequences of ``d`` delta cores of ``U``'s shapes.
        signs: None, or with the unsigned right cores ``V'`` of the LQ sweep
            (:func:`~.sweeps.right_sweep`) the signs ``S_1, ..., S_{d-1}`` of the bonds
            concatenated, ``(*B, r_1 + ... + r_{d-1})``: the deltas' right bonds are
            scaled by them (``D_k S_{k+1}``, k < d - 1), which gives the block cores of
            the same tensors as the canonical ``V``.
        All cores of one batch shape ``(*B, r, n, r')`` (expand broadcast ones first).
    Returns:
        ``P`` lists of ``d`` block cores (views of a few fresh tensors).
    Cost: O(P d n r^2) copies.
    """
    d, P = len(U), len(delta_sets)

    def stack(ts):  # sets on a leading dimension (a view for one set)
        return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(list(ts))

    nb = U[0].dim() - 3
    offs = [0]  # offsets of S_1, S_2, ... in signs
    for k in range(1, d):
        offs.append(offs[-1] + U[k].shape[-3])

    def bond_signs(k0, m):
        # signs of the right bonds of cores k0..k0+m-1, (m, *B, 1, 1, b): a view
        b = U[k0].shape[-1]
        sv = signs[..., offs[k0]:offs[k0] + m * b].unflatten(-1, (m, b)).movedim(-2, 0)
        return sv.unsqueeze(-2).unsqueeze(-2)

    d0 = stack([D[0] for D in delta_sets])
    if signs is not None:
        d0 = d0 * bond_signs(0, 1)[0]
    first = torch.cat([d0, U[0].unsqueeze(0).expand((P,) + U[0].shape)], -1)
    out = [[c] for c in first.unbind(0)]
    for k0, k1 in core_runs([tuple(U[k].shape[-3:]) for k in range(1, d - 1)]):
        k0, k1 = k0 + 1, k1 + 1
        m = k1 - k0
        parts = torch.stack(list(V[k0:k1]) + [D[k] for D in delta_sets for k in range(k0, k1)]
                            + list(U[k0:k1]))  # (m + P m + m, *B, a, n, b)
        if signs is not None:  # in place on the fresh stack: one product for the run
            parts[m:(P + 1) * m].unflatten(0, (P, m)).mul_(bond_signs(k0, m))
        us = parts[(P + 1) * m:]
        if P == 1:  # [[V, D], [0, U]] as (m, *B, 2, a, n, 2, b): a pad and a concatenation
            left = parts[:2 * m].unflatten(0, (2, m)).movedim(0, nb + 1).unsqueeze(-2)
            right = torch.nn.functional.pad(us.unsqueeze(nb + 1).unsqueeze(-2),
                                            (0, 0) * 4 + (1, 0))
            a, n, b = U[k0].shape[-3:]
            cores = torch.cat([left, right], -2).reshape((1, m) + tuple(us.shape[1:-3])
                                                         + (2 * a, n, 2 * b))
        else:
            top = torch.nn.functional.pad(parts[:m], (0, parts.shape[-1]))
            bottom = torch.cat([parts[m:(P + 1) * m].unflatten(0, (P, m)),
                                us.unsqueeze(0).expand((P,) + us.shape)], -1)
            cores = torch.cat([top.unsqueeze(0).expand((P,) + top.shape), bottom], -3)
        for i in range(P):
            out[i].extend(cores[i].unbind(0))
    last = torch.cat([V[-1].unsqueeze(0).expand((P,) + V[-1].shape),
                      stack([D[-1] for D in delta_sets])], -3)
    for i in range(P):
        out[i].append(last[i])
    return out


def scattered_block_cores(U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
                          delta_sets: Sequence[Sequence[torch.Tensor]], batch_shape=(), *,
                          add_point: Optional[Sequence[bool]] = None,
                          diagonals: Optional[Sequence[torch.Tensor]] = None
                          ) -> List[List[torch.Tensor]]:
    """The block cores of :func:`block_cores` for several sets of deltas at one point, all
    built by three operations whatever ``d`` and the number of sets: one concatenation of
    the cores, one zero fill and one ``scatter_add_`` that puts every number at its place
    in the block cores (the index depends on the shapes only and is kept per device). The
    point's last core is added to the last delta by the same scatter (``add_point``).

    Args:
        U, V: the point's left- and right-orthogonal cores (``V[0]`` unused), ``d >= 2``.
        delta_sets: ``P`` sequences of ``d`` delta cores of ``U``'s shapes.
        batch_shape: the broadcast batch shape ``B`` of all cores (leading dimensions).
        add_point: per set, whether its last block core is ``[[V_d], [D_d + U_d]]`` (the
            TT of ``X + xi``) instead of ``[[V_d], [D_d]]``; default: False for all.
        diagonals: None, or with the unsigned right cores ``V'`` of the LQ sweep
            (:func:`~.sweeps.right_sweep`) the diagonals of its factors ``L'_1 ..
            L'_{d-1}`` in bond order: the first set's deltas ``D_k`` (k < d - 1) are scaled
            by the bonds' signs ``S_{k+1}`` (``copysign(1, .)``), which gives the block
            cores of the same tensor as the canonical ``V`` (three more operations, four
            for uneven bond ranks).
    Returns:
        ``P`` lists of ``d`` block cores ``(*B, 2 r, n, 2 r')`` (first ``(*B, 1, n, 2 r')``,
        last ``(*B, 2 r, n, 1)``), views of one fresh tensor.
    Cost: O(P d n r^2) copies; differentiable.
    """
    d, P = len(U), len(delta_sets)
    bs = tuple(batch_shape)
    add = tuple(bool(a) for a in (add_point if add_point is not None else (False,) * P))
    shapes = tuple(tuple(int(s) for s in u.shape[-3:]) for u in U)
    if len(add) != P:
        raise ValueError(f"add_point: {len(add)} flags for {P} sets of deltas")
    for D in delta_sets:
        if len(D) != d or any(tuple(c.shape[-3:]) != sh for c, sh in zip(D, shapes)):
            raise ValueError("delta_sets: each set needs d cores of the point's core shapes "
                             f"{shapes}, got {[tuple(c.shape[-3:]) for c in D]}")
    idx, layout, total = _block_index(shapes, add, U[0].device)

    def flat(c):  # (*B, numel): a view for a core with contiguous last three dimensions
        c = c.flatten(-3)
        return c if tuple(c.shape[:-1]) == bs else c.expand(bs + c.shape[-1:])

    pieces = []
    for D, with_point in zip(delta_sets, add):
        pieces += [flat(u) for u in U[:d - 1 + with_point]]
        pieces += [flat(c) for c in D] + [flat(v) for v in V[1:]]
    src = torch.cat(pieces, -1)
    if diagonals is not None:
        # the first set's deltas D_0 .. D_{d-2} follow the point's cores in src; their
        # right bonds' signs flip them: D - 2 D [signbit], in place on the fresh copy
        lo = sum(a * n * b for a, n, b in shapes[:d - 1 + add[0]])
        seg = src[..., lo:lo + sum(a * n * b for a, n, b in shapes[:-1])]
        seg.addcmul_(seg, torch.signbit(_spread_diagonals(diagonals, shapes, bs)), value=-2)
    out = src.new_zeros(bs + (P * total,))
    out.scatter_add_(-1, idx.expand(bs + idx.shape), src)
    views = out.split([a * n * b for _, (a, n, b) in layout] * P, -1)  # one view op for all
    return [[views[p * d + k].unflatten(-1, layout[k][1]) for k in range(d)] for p in range(P)]


def _spread_diagonals(dg, shapes, bs) -> torch.Tensor:
    """The diagonals ``dg[k]`` (bond k + 1) spread over the right bonds of the deltas
    ``D_0 .. D_{d-2}`` packed one after the other, ``(*B, sum_k r_k n_k r_{k+1})``: one
    concatenation of broadcast views when the bonds have one rank, else a concatenation
    and a gather (index kept per device)."""
    widths = {b for _, _, b in shapes[:-1]}
    if len(widths) == 1:
        (b,) = widths
        rows = [dg[k].unsqueeze(-2).expand(bs + (a * n, b)) for k, (a, n, _) in
                enumerate(shapes[:-1])]
        return torch.cat(rows, -2).flatten(-2)
    spread = _cached_index(("spread", shapes), dg[0].device, lambda: torch.cat(
        [(sum(s[2] for s in shapes[:k]) + torch.arange(b)).repeat(a * n)
         for k, (a, n, b) in enumerate(shapes[:-1])]))
    g = torch.cat([t.expand(bs + t.shape[-1:]) for t in dg], -1)
    return g.index_select(-1, spread)


_INDEX_CACHE: dict = {}


def _cached_index(key, device: torch.device, build) -> torch.Tensor:
    """An index tensor that depends on shapes only, built on the host once and kept per
    device (no host-to-device copy per call); rebuilt while tracing for torch.compile.
    Built outside inference mode: autograd saves it later (scatter's backward)."""
    if torch.compiler.is_compiling():
        return build().to(device)
    key = key + (str(device),)
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        with torch.inference_mode(False):
            idx = _INDEX_CACHE[key] = build().to(device)
    return idx


def _block_index(shapes, add, device):
    """For :func:`scattered_block_cores`: the destination of every number of its
    concatenation (per set: the point's cores, the deltas, the right cores ``1..d-1``) in
    the sets' block cores laid out one after the other; the block cores' ``(offset,
    shape)`` within one set, and one set's size."""
    d = len(shapes)
    layout, off = [], 0
    for k, (a, n, b) in enumerate(shapes):
        blk = (1 if k == 0 else 2 * a, n, 2 * b if k < d - 1 else 1)
        layout.append((off, blk))
        off += blk[0] * blk[1] * blk[2]
    total = off

    def place(k, row, col):  # destinations of core k's numbers at block (row, col)
        a, n, b = shapes[k]
        o, (_, bn, bc) = layout[k]
        i = torch.arange(a).view(a, 1, 1) + row * (a if k > 0 else 0)
        j = torch.arange(n).view(1, n, 1)
        c = torch.arange(b).view(1, 1, b) + col * b
        return (o + (i * bn + j) * bc + c).reshape(-1)

    def build():
        parts = []
        for p, with_point in enumerate(add):
            # point: bottom-right (first core: right; last core: bottom, with the delta)
            ps = [place(k, 1, 1 if k < d - 1 else 0) for k in range(d - 1 + with_point)]
            ps += [place(k, 1, 0) for k in range(d)]  # deltas: bottom-left (first: left)
            ps += [place(k, 0, 0) for k in range(1, d)]  # right cores: top-left
            parts.append(torch.cat(ps) + p * total)
        return torch.cat(parts)

    return _cached_index(("blocks", shapes, add), device, build), layout, total


def retract_transport_cores(U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
                            du: Sequence[torch.Tensor], dv: Sequence[torch.Tensor],
                            ranks: Sequence[int]):
    """:func:`retract` of the step ``du`` by the block-core sweeps, and the block cores of
    the tangent vector ``dv`` (to transport it), both sets of block cores built together
    (:func:`scattered_block_cores`): for a retraction followed by a transport where
    launches dominate.

    Args: as :func:`retract`, plus ``dv``, deltas of the vector to transport; leading batch
    dimensions broadcast. Returns ``(packed result, block cores of dv)``; ``d >= 3``.
    Cost: O(d n r^3)."""
    bs = tuple(torch.broadcast_shapes(*[c.shape[:-3] for c in (U[0], du[0], dv[0])]))
    X, Xi = scattered_block_cores(U, V, [du, dv], bs, add_point=(True, False))
    return _retract_blocks(U, X, ranks, bs), Xi


def _retract_blocks(U, X, ranks, bs) -> torch.Tensor:
    """The sweeps of :func:`retract` on the full block cores ``X`` of ``X + xi`` (the choice
    where launches dominate, :func:`~.sweeps.prefer_fewer_launches`): the plain
    right-to-left orthogonalization of the rank-2r TT costs one QR and one product per core
    (the structured sweeps: one QR and five other operations), for about twice their
    flops; the block cores cost a few operations per run (:func:`block_cores`)."""
    d = len(U)
    G: List[Optional[torch.Tensor]] = [None] * d
    a, n, _ = X[-1].shape[-3:]
    c = X[-1].reshape(bs + (a, n))
    for k in range(d - 1, 0, -1):
        q, r = batched_qr(c.mT)  # batches: the compiled batched QR where it pays
        G[k] = q.mT  # right-orthonormal rows
        xa, xn, xb = X[k - 1].shape[-3:]
        c = (X[k - 1].reshape(bs + (xa * xn, xb)) @ r.mT).reshape(bs + (xa, xn * r.shape[-2]))
    return _truncate(c.unflatten(-1, (U[0].shape[-2], -1)).flatten(-3, -2), G, U, ranks, bs)


def _truncate(c, G, U, ranks, bs) -> torch.Tensor:
    """The left-to-right truncated SVDs of :func:`retract`: ``c`` the first core (as a
    matrix) of the right-orthogonalized rank-2r TT, ``G[k]`` (k >= 1) its other cores as
    ``(rows, n_k cols)`` matrices with orthonormal rows. Returns the packed result."""
    d, nb = len(U), len(bs)
    group = _group_lefts(U)
    lefts = []
    for k in range(d - 1):
        u, s, vh = batched_svd(c)  # batches: the compiled batched SVD where it pays
        r = ranks[k + 1]
        if u.shape[-1] < r:  # rank collapsed below r: pad with an orthonormal complement
            u, s, vh = _pad_svd(u, s, vh, r)
        lefts.append(u[..., :r] if group else u[..., :r].flatten(nb))
        c = ((s[..., :r, None] * vh[..., :r, :]) @ G[k + 1]).unflatten(
            -1, (U[k + 1].shape[-2], -1)).flatten(-3, -2)
    return _packed(lefts, c, nb, group)


def _group_lefts(U) -> bool:
    """Whether the retraction copies its left factors out together (:func:`_packed`):
    where launches dominate or they fit in cache (:data:`~.sweeps.STACK_MAX_NUMEL`); a
    large batch on the CPU copies each factor right after its SVD, while in cache
    (deferring the copies measured 15-25 % slower at B = 256, r = 10)."""
    numel = sum(u.numel() for u in U[:-1])  # the new cores have the point's shapes
    return stack_pays(U[0].device, numel)


def _packed(lefts, last, nb: int, group: bool) -> torch.Tensor:
    """The packed result from the left-orthogonal factors ``lefts`` and the last core:
    with ``group``, ``lefts`` are views of the SVDs' factors ``(*B, rows, r_k)`` and those
    of one width in a row are copied out by one concatenation along their rows (row-major,
    their packed layout) instead of one copy each; else they are flat copies already."""
    # inside the inference fast path, concatenated as an ordinary tensor the caller returns
    # as is (instead of copying an inference tensor out: one operation per call)
    with compiled_dense.ordinary_outputs():
        return _packed_cat(lefts, last, nb, group)


def _packed_cat(lefts, last, nb: int, group: bool) -> torch.Tensor:
    w = lefts[0].shape[-1] if lefts else 0
    if (group and lefts and all(u.shape[-1] == w for u in lefts)
            and math.prod(last.shape[nb:]) % w == 0):
        # one width (uniform ranks): the last core, row-major, is rows of that width too,
        # so one concatenation packs everything
        return torch.cat(list(lefts) + [last.flatten(nb).unflatten(-1, (-1, w))], -2).flatten(nb)
    pieces = []
    i = 0
    while i < len(lefts):
        j = i + 1
        while group and j < len(lefts) and lefts[j].shape[-1] == lefts[i].shape[-1]:
            j += 1
        blk = lefts[i] if j == i + 1 else torch.cat(lefts[i:j], -2)
        pieces.append(blk.flatten(nb) if group else blk)
        i = j
    pieces.append(last.flatten(nb))
    return torch.cat(pieces, -1)


def _addmm(c, a, b, alpha):
    """``c + alpha a b``: one fused ``addmm``/``baddbmm`` for matrices or one batch
    dimension (the common cases), else a product and a sum."""
    if c.dim() == 2 and a.dim() == 2 and b.dim() == 2:
        return torch.addmm(c, a, b, alpha=alpha)
    if c.dim() == 3 and a.dim() == 3 and b.dim() == 3:
        return torch.baddbmm(c, a, b, alpha=alpha)
    return c + a @ b if alpha == 1 else c - a @ b


def _complement_qr(wt: torch.Tensor, dim: int):
    """The reduced QR ``q, r`` of the structured sweep's new directions ``wt = W^T``
    (``(*, m, a)``), knowing that its columns lie in a ``dim``-dimensional space (the
    complement of ``V_k``'s rows: ``W``'s columns minus ``V_k``'s rows). Where ``a`` exceeds
    that (at a bond whose rank reaches the largest feasible one, e.g. ``r_{d-1} = n_d``), a
    plain QR would add columns repeating directions ``V_k`` already spans: the rank-2r TT
    would carry exact zero singular values, and the backward of ``qr`` / ``svd`` divides by
    them (a NaN gradient). Then ``q`` is the QR of the first ``dim`` columns (they span the
    space for data in general position) and ``r`` their coefficients plus the projections of
    the other columns; no columns at all when ``dim = 0``. Only where autograd records
    (without it the extra columns cost nothing but a little work, and the plain QR keeps the
    gauge of the compiled single-point kernel, which batches are compared with). Shapes
    only, no host read."""
    dim = max(int(dim), 0)
    if dim >= min(wt.shape[-2:]) or not (wt.requires_grad and torch.is_grad_enabled()):
        return batched_qr(wt)  # batches: the compiled batched QR where it pays
    if dim == 0:
        return (wt.new_zeros(wt.shape[:-1] + (0,)),
                wt.new_zeros(wt.shape[:-2] + (0, wt.shape[-1])))
    q, r1 = torch.linalg.qr(wt[..., :dim])
    return q, torch.cat([r1, q.mT @ wt[..., dim:]], -1)


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
