"""Adapters of the compiled dense sweeps (``dense.cpp``, kernel set ``"dense"``): each
takes the loaded module (``kernels.module("dense")``) and the torch implementation's
arguments, and returns what the torch implementation returns.

Conventions of the compiled module: contiguous cores; a list of right-orthogonal cores has
a placeholder (an empty tensor) at index 0; results are lists of cores or packed flat
tensors (left-orthogonal cores concatenated).
"""
from __future__ import annotations

import contextlib

from typing import List, Optional, Sequence

import torch


def _contig(cores: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [c.contiguous() for c in cores]


def _with_placeholder(U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]]):
    return [U[0].new_empty(0)] + [v.contiguous() for v in V[1:]]


def _batch_shape(*seqs) -> Optional[torch.Size]:
    """The broadcast batch shape of the cores of ``seqs`` (None entries skipped), or None
    when no core has a batch dimension (one point: the single-point kernels)."""
    # one point (the per-step case): every sequence's cores are 3-D, so its last one is
    # (V of d = 1 is [None]); only otherwise look at all of them
    if all(seq is None or seq[-1] is None or seq[-1].dim() == 3 for seq in seqs):
        return None
    shapes = [c.shape[:-3] for seq in seqs if seq is not None for c in seq if c is not None]
    # one batch shape for all (the usual case): no torch.broadcast_shapes (a Python
    # reference implementation, ~0.3 ms a call); compared, not hashed (a traced symbolic
    # size would be specialized)
    if all(s == shapes[0] for s in shapes[1:]):
        return shapes[0]
    return torch.broadcast_shapes(*shapes)


def _batched(cores: Sequence[Optional[torch.Tensor]], bs: torch.Size, skip_first: bool = False):
    """The cores as contiguous ``(B, r, n, r')`` tensors of the batch ``bs`` (``B`` its
    number of points): a list whose cores hold one point for the whole batch keeps batch
    size 1 (the kernels reuse it, no copy per point); others are broadcast to ``bs``."""
    B = bs.numel()
    live = [c for c in cores[int(skip_first):]]
    one = all(c.shape[:-3].numel() == 1 for c in live)
    out = []
    for k, c in enumerate(cores):
        if skip_first and k == 0:
            out.append(c.new_empty(0) if c is not None else live[0].new_empty(0))
        elif one:
            out.append(c.reshape((1,) + c.shape[-3:]).contiguous())
        else:
            out.append(c.expand(bs + c.shape[-3:]).reshape((B,) + c.shape[-3:]).contiguous())
    return out


def right_cores(mod, U: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """The canonical right-orthogonal cores ``V`` of the left-orthogonal cores ``U``
    (``V[0]`` is None), as :func:`ttmanifold.manifold.sweeps.right_cores`; with leading batch
    dimensions on the cores, each point's (one call for the batch)."""
    if len(U) == 1:
        return [None]
    bs = _batch_shape(U)
    if bs is not None:
        V = list(mod.right_cores_batch(_batched(U, bs)))  # (B, a, n, b), B = bs.numel()
        return [None] + [v.reshape(bs + v.shape[1:]) for v in V[1:]]
    V = list(mod.right_cores(_contig(U)))
    V[0] = None
    return V


def project_tt(mod, U: Sequence[torch.Tensor], V: Optional[Sequence[Optional[torch.Tensor]]],
               Z: Sequence[torch.Tensor], gauge: bool = False, *, packed: bool = True) -> torch.Tensor:
    """Packed ``D_k = U_<k^T Z V_>k^T`` (gauge-projected with ``gauge``) of the TT with cores
    ``Z``, as the torch ``project_tt(U, V, Z, packed=True, gauge=gauge)``; ``V`` None:
    computed here. Only the packed form exists compiled (``packed=False`` is an error)."""
    if not packed:
        raise ValueError("the compiled projection returns packed cores only (packed=True)")
    bs = _batch_shape(U, V, Z)
    if bs is not None:  # one call for the batch: (*bs, size)
        Vb = [] if V is None else _batched(V, bs, skip_first=True)
        out = mod.project_batch(_batched(U, bs), Vb, _batched(Z, bs), bool(gauge), bs.numel())
        return out.reshape(bs + out.shape[1:])
    Uc = _contig(U)
    Vc = list(mod.right_cores(Uc)) if V is None else _with_placeholder(U, V)
    return mod.project(Uc, Vc, _contig(Z), bool(gauge))


def retract(mod, U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
            du: Sequence[torch.Tensor], ranks: Sequence[int]) -> torch.Tensor:
    """Packed left-orthogonal cores of ``round_r(X + xi)`` (``FixedTTRank._retract``) at the
    point with cores ``U``, ``V`` (``V[0]`` unused) for the deltas ``du``; with leading
    batch dimensions (broadcast), ``(*batch, size)`` in one call."""
    bs = _batch_shape(U, V, du)
    if bs is not None:
        out = mod.retract_batch(_batched(U, bs), _batched(V, bs, skip_first=True),
                                _batched(du, bs), [int(r) for r in ranks], bs.numel())
        return out.reshape(bs + out.shape[1:])
    return mod.retract(_contig(U), _with_placeholder(U, V), _contig(du), [int(r) for r in ranks])


def retract_point(mod, U: Sequence[torch.Tensor], du: Sequence[torch.Tensor],
                  ranks: Sequence[int]) -> torch.Tensor:
    """:func:`retract` with ``V`` computed from ``U`` in the same compiled call (batches
    too, as :func:`retract`)."""
    bs = _batch_shape(U, du)
    if bs is not None:
        out = mod.retract_batch(_batched(U, bs), [], _batched(du, bs), [int(r) for r in ranks],
                                bs.numel())
        return out.reshape(bs + out.shape[1:])
    return mod.retract_point(_contig(U), _contig(du), [int(r) for r in ranks])


def inner(mod, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """``<x, y>`` (0-d) of two single TTs of one shape given by their cores, as the torch
    sweep of :func:`ttmanifold.inner`."""
    xc = _contig(xs)
    same = len(xs) == len(ys) and all(x is y for x, y in zip(xs, ys))
    return mod.inner(xc, xc if same else _contig(ys))


def one_vs_blocks(mod, k: int, cores: Sequence[torch.Tensor], pairs: bool = False):
    """``(<x, x>, <x, t_1>, ..., <x, t_{k-1}>)`` and the left environments ``ws`` (``ws[m]``
    before core ``m``) of the sweep of one TT ``x`` against the blocks ``[x, t_1, ...]``;
    ``cores``: the ``d`` cores of each block in turn, ``x``'s first. With ``pairs`` the
    values go on with the constant pairs ``<t_i, t_j>``, ``1 <= i <= j < k``, row by row."""
    vals, ws = mod.one_vs_blocks(_contig(cores), int(k), bool(pairs))
    return vals, list(ws)


def one_vs_blocks_backward(mod, k: int, cores: Sequence[torch.Tensor],
                           ws: Sequence[torch.Tensor], g: torch.Tensor) -> List[torch.Tensor]:
    """The cores of ``d/dx sum_b g_b <x, block_b>`` (block 0 is ``x`` itself) from the
    environments ``ws`` of :func:`one_vs_blocks`."""
    return list(mod.one_vs_blocks_backward(_contig(cores), int(k), _contig(ws), g))


def all_finite(mod, xs: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of the tensors ``xs`` is finite (one pass, no allocation)."""
    return bool(mod.all_finite(_contig(xs)))


def tangent_block_cores(mod, U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
                        flat: torch.Tensor) -> List[torch.Tensor]:
    """The rank-2r block cores of the tangent TT ``sum_k U_<k dU_k V_>k`` (``V[0]`` unused)
    with the deltas packed in ``flat``, as ``ttmanifold.manifold.tangent``'s torch build."""
    return list(mod.tangent_block_cores(_contig(U), _with_placeholder(U, V), flat.contiguous()))


def tangent_block_cores_backward(mod, gs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The packed gradient of the deltas from the gradients ``gs`` of those block cores."""
    return mod.tangent_block_cores_backward(_contig(gs))


def gauge_project(mod, runs, U_flat: torch.Tensor, g: torch.Tensor):
    """``(g_k - U_k (U_k^T g_k) for k < d, g_d)`` packed (the gauge projection of the packed
    ``g`` at the packed point ``U_flat``; ``runs``: the manifold's ``gauge_runs``) and
    whether it is finite (a non-finite ``g`` or point makes it non-finite)."""
    return mod.gauge_project(U_flat.contiguous(), g.contiguous(), _flat_runs(runs))


def gauge_project_checked(mod, runs, U_flat: torch.Tensor, g: torch.Tensor):
    """:func:`gauge_project` for one point or a batch ``(B, size)`` of points and tensors of
    one shape: the projection and whether it is all finite, one call (the finiteness is
    tested in cache as the result is written: no pass of its own)."""
    if g.dim() == 1:
        return gauge_project(mod, runs, U_flat, g)
    fn = (mod.gauge_project_batch_small if g.shape[0] >= GAUGE_SIMD_MIN_BATCH
          else mod.gauge_project_batch)
    return fn(U_flat.contiguous(), g.contiguous(), _flat_runs(runs))


def _flat_runs(runs) -> List[int]:
    """The manifold's ``gauge_runs`` as the compiled kernels take them: (offset, count,
    rows, cols) of every run, flattened."""
    return [int(v) for run in runs[0] for v in run]


#: Batches of at least this many points run the gauge projection SIMD across blocks of
#: points (``gauge_project_batch_small``; per-point BLAS calls below: a partial block's
#: padding lanes cost as much as points).
GAUGE_SIMD_MIN_BATCH = 16


def gauge_project_flat(mod, runs, U_flat: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The torch ``gauge_project_flat(runs, U_flat, g)`` for leading batch dimensions
    (broadcast; a single point for the whole batch is not copied per point): one call,
    SIMD across blocks of points from :data:`GAUGE_SIMD_MIN_BATCH` points."""
    bs = g.shape[:-1]  # (one batch shape for both, the step's case: no broadcast_shapes)
    if U_flat.shape[:-1] != bs:
        bs = torch.broadcast_shapes(U_flat.shape[:-1], bs)
    n = g.shape[-1]
    one = U_flat.shape[:-1].numel() == 1
    p2 = (U_flat.reshape(1, n) if one else U_flat.expand(bs + (n,)).reshape(-1, n)).contiguous()
    g2 = g.expand(bs + (n,)).reshape(-1, n).contiguous()
    fn = (mod.gauge_project_batch_small if g2.shape[0] >= GAUGE_SIMD_MIN_BATCH
          else mod.gauge_project_batch)
    out, _ = fn(p2, g2, _flat_runs(runs))
    return out.reshape(bs + (n,))


def one_vs_blocks_backward_deltas(mod, k: int, cores: Sequence[torch.Tensor],
                                  ws: Sequence[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """:func:`one_vs_blocks_backward` for an ``x`` of tangent block cores: the packed
    gradient of the deltas only (the delta blocks, as ``tt.tensor_train.tangent_block_deltas``
    reads them from the full gradient; the zero blocks of ``x``'s cores are skipped)."""
    return mod.one_vs_blocks_backward_deltas(_contig(cores), int(k), _contig(ws), g)


def batched_qr(mod, a: torch.Tensor):
    """Thin QR ``(Q, R)`` of every matrix of ``a`` ``(*B, m, n)`` (``m >= n``, ``n <= 8``;
    leading dimensions flattened for the call): Householder, LAPACK's signs, SIMD across the
    matrices (``dense.cpp``'s ``batched_qr``)."""
    if a.dim() == 3:  # (the sweeps' case: no reshapes)
        return tuple(mod.batched_qr(a))
    m, n = a.shape[-2:]
    q, r = mod.batched_qr(a.reshape(-1, m, n))
    return q.reshape(a.shape), r.reshape(a.shape[:-2] + (n, n))


def batched_svd(mod, a: torch.Tensor):
    """Thin SVD ``(U, S, Vh)`` of every matrix of ``a`` ``(*B, m, n)`` (``min(m, n) <= 8``;
    a wide matrix is factored as its transpose): QR then one-sided Jacobi, SIMD across the
    matrices (``dense.cpp``'s ``batched_svd``); ``S`` descending."""
    m, n = a.shape[-2:]
    bs = a.shape[:-2]
    if m < n:  # A^T = U' S Vh'  ->  A = Vh'^T S U'^T
        u, s, vh = mod.batched_svd(a.mT.reshape(-1, n, m))
        return vh.mT.reshape(bs + (m, m)), s.reshape(bs + (m,)), u.mT.reshape(bs + (m, n))
    if a.dim() == 3:
        return tuple(mod.batched_svd(a))
    u, s, vh = mod.batched_svd(a.reshape(-1, m, n))
    return u.reshape(a.shape), s.reshape(bs + (n,)), vh.reshape(bs + (n, n))


def project_batch_small(mod, U: Sequence[torch.Tensor], V: Optional[Sequence[Optional[torch.Tensor]]],
                        Z: Sequence[torch.Tensor], *, packed: bool, gauge: bool,
                        check: Optional[str] = None):
    """The batched ``project_tt(U, V, Z, packed=packed, gauge=gauge)`` for TT-ranks
    ``<= 16`` in one call that runs blocks of points together, SIMD across the points
    (``dense.cpp``'s ``project_batch_small``: the LQ sweep of each point, both interface
    sweeps and the deltas). ``V``: None (computed inside), or the points' canonical right
    cores (``V[0]`` unused; the LQ sweep is skipped: other right cores would give other
    deltas); cores broadcast over the leading batch dimensions (one ``Z`` for all points
    is not copied per point).

    Args: as the torch ``project_tt`` (``mod``: the loaded dense module); ``check``: if
        given, the message of the ``RuntimeError`` raised when a delta is NaN or infinite
        (tested in cache while they are written; a non-finite point or ``Z`` reaches them).
    Returns: ``(*batch, size)`` (``packed``) or the list of ``(*batch, r, n, r')`` cores.
    Cost: O(B d n r R (r + R) + B d n r^3), one call."""
    bs = _batch_shape(U, Z) if V is None else _batch_shape(U, V[1:], Z)
    B = bs.numel()
    u, z = _point_views(U, bs), _point_views(Z, bs)
    v = [] if V is None else _point_views(V[1:], bs)
    # under the manifold's inference fast path the result is allocated as an ordinary
    # tensor, which the caller returns without a copy (the kernel only reads the inputs)
    with ordinary_outputs():
        out = mod.project_batch_small(u, z, bool(gauge), B, check or "", v)
    out = out.reshape(bs + out.shape[1:])
    if packed:
        return out
    sizes = [u.shape[-3:].numel() for u in U]
    return [c.unflatten(-1, u.shape[-3:]) for c, u in zip(out.split(sizes, -1), U)]


def ordinary_outputs():
    """Context: outside ``torch.inference_mode`` for the body when it is on (not while
    tracing), so that the tensors the body allocates (a kernel's result, a packed
    concatenation) are ordinary tensors the manifold's inference fast path returns without
    copying them out."""
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        return torch.inference_mode(False)
    return contextlib.nullcontext()


def retract_batch_small(mod, U: Sequence[torch.Tensor], du: Sequence[torch.Tensor],
                        ranks: Sequence[int],
                        V: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """The batched ``retract_point(U, du, ranks)`` for TT-ranks ``<= 4`` in one call that
    runs blocks of points together, SIMD across the points (``dense.cpp``'s
    ``retract_batch_small``: the LQ sweep of each point, the structured orthogonalization
    of the rank-2r TT and the truncated SVDs). Cores broadcast over the leading batch
    dimensions (one ``du`` or one point for all is not copied per point).

    Args: as the torch ``retract_point`` (``mod``: the loaded dense module); ``V``: the
        points' canonical right cores (``right_cores(U)``, ``V[0]`` unused) when the caller
        has them: the kernel's LQ sweep is skipped (the same result), else None.
    Returns: ``(*batch, size)``, the packed left-orthogonal cores of each result.
    Raises: ``RuntimeError`` when a result is NaN or infinite (a non-finite point or step).
    Cost: O(B d n r^3), one call."""
    return _simd_retract(mod.retract_batch_small, U, du, V)


def _simd_retract(fn, U: Sequence[torch.Tensor], du: Sequence[torch.Tensor],
                  V: Optional[Sequence[Optional[torch.Tensor]]]) -> torch.Tensor:
    """``fn(U, du, B, V=V[1:])`` of a SIMD batch retraction on ``(B or 1, r, n, r')`` views
    of the cores (one point or one step for all is not copied per point; ``V`` None: no
    right cores given), reshaped to the batch; the result allocated outside inference mode
    (see :func:`ordinary_outputs`)."""
    if V is None:
        bs = _batch_shape(U, du)
        Vv = []
    else:
        bs = _batch_shape(U, du, V[1:])
        Vv = _point_views(V[1:], bs)
    with ordinary_outputs():
        out = fn(_point_views(U, bs), _point_views(du, bs), bs.numel(), V=Vv)
    return out.reshape(bs + out.shape[1:])


def retract_batch_wide(mod, U: Sequence[torch.Tensor], du: Sequence[torch.Tensor],
                       ranks: Sequence[int],
                       V: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """The batched ``retract_point(U, du, ranks)`` for TT-ranks ``<= 12`` in one call,
    SIMD across blocks of points (``dense.cpp``'s ``retract_batch_wide``:
    :func:`retract_batch_small`'s algorithm with factorizations of runtime width, for the
    ``2 r``-column SVDs of ranks 5 to 12). Cores broadcast over the leading batch dimensions.

    Args: as :func:`retract_batch_small` (``V``: the right cores, or None).
    Returns: ``(*batch, size)``, the packed left-orthogonal cores of each result.
    Raises: ``RuntimeError`` when a result is NaN or infinite (a non-finite point or step).
    Cost: O(B d n r^3), one call."""
    return _simd_retract(mod.retract_batch_wide, U, du, V)


def _point_views(cores: Sequence[torch.Tensor], bs: torch.Size) -> List[torch.Tensor]:
    """The cores as ``(B or 1, r, n, r')`` for the SIMD batch kernels: views where the batch
    dimensions allow (a core shared by the batch is not copied per point)."""
    B = bs.numel()
    if len(bs) == 1 and all(c.dim() == 4 and c.shape[0] == B for c in cores):
        return list(cores)  # (the optimizer step's case: no view per core, ~5 us each)
    return [c.reshape((1,) + c.shape[-3:]) if c.shape[:-3].numel() == 1 else
            c.expand(bs + c.shape[-3:]).reshape((B,) + c.shape[-3:]) for c in cores]


def right_cores_batch_small(mod, U: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """The batched ``right_cores(U)`` for TT-ranks ``<= 16`` in one call that runs blocks of
    points together, SIMD across the points (``dense.cpp``'s ``right_cores_batch_small``:
    the LQ sweep of :func:`retract_batch_small` up to rank 8, of :func:`project_batch_small`
    above, Householder in the interleaved layout, the canonical signs applied as each core
    is written). Cores broadcast over the leading batch dimensions.

    Args: as the torch ``right_cores`` (``mod``: the loaded dense module).
    Returns: ``[None, V_1, ..., V_{d-1}]``, ``V_k`` ``(*batch, r_k, n_k, r_{k+1})``; NaN or
        infinite entries of a point give NaN in its own cores only.
    Cost: O(B d n r^3), one call."""
    bs = _batch_shape(U)
    V = mod.right_cores_batch_small(_point_views(U, bs), bs.numel())
    return [None] + [v.reshape(bs + v.shape[1:]) for v in V[1:]]


def transport_batch_small(mod, Uy: Sequence[torch.Tensor], U: Sequence[torch.Tensor],
                          V: Sequence[Optional[torch.Tensor]], dU: Sequence[torch.Tensor], *,
                          check: Optional[str] = None) -> torch.Tensor:
    """The vector transport by projection of a batch: ``P_Y(xi)`` packed and gauged at the
    points ``Uy`` of the tangent vectors ``xi = sum_k U_<k dU_k V_>k`` given at the points
    ``U`` (right cores ``V``, ``V[0]`` unused) by their deltas ``dU``, for TT-ranks
    ``<= 16``, in one call SIMD across the points (``dense.cpp``'s ``transport_batch_small``:
    :func:`project_batch_small`'s sweeps with ``xi``'s rank-2r block cores assembled per
    block of points in cache, never in memory). Cores broadcast over the leading batch
    dimensions (a point or deltas shared by the batch are not copied per point).

    Args: ``mod``: the loaded dense module; ``Uy``, ``U``, ``dU``: ``d >= 2`` cores of one
        shape per core; ``V``: ``d`` right cores, ``V[0]`` None; ``check``: if given, the
        message of the ``RuntimeError`` raised when a delta is NaN or infinite (a
        non-finite point or ``dU`` reaches them).
    Returns: ``(*batch, size)``, the packed gauged deltas at ``Uy``.
    Cost: O(B d n r^3), one call."""
    bs = _batch_shape(Uy, U, V[1:], dU)
    with ordinary_outputs():
        out = mod.transport_batch_small(_point_views(Uy, bs), _point_views(U, bs),
                                        _point_views(V[1:], bs), _point_views(dU, bs),
                                        bs.numel(), check or "")
    return out.reshape(bs + out.shape[1:])
