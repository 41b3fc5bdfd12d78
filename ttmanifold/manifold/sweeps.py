"""Pure functions over sequences of TT cores: the sweeps behind the fixed-TT-rank manifold.

A point is given by its left-orthogonal cores ``U`` (``U_k`` of shape
``(r_{k-1}, n_k, r_k)``, cores ``0..d-2`` left-orthogonal); :func:`right_cores` gives the
right-orthogonal cores ``V`` of the same tensor; a tangent vector is given by its deltas
``dU`` (cores of ``U``'s shapes), ``xi = sum_k U_<k dU_k V_>k``. Here: the right cores,
the projection of a TT onto the tangent space (:func:`project_tt`), of a dense tensor
(:func:`project_dense`) and of sampled entries (:func:`project_sampled`), the gauge
projection (:func:`gauge_project_flat`) and the gauge change (:func:`gauge_deltas`).

Costs: ``n = max n_k``, ``r = max r_k``, ``R`` the rank of an ambient TT. Functions that
have a compiled CPU version are dispatched by :mod:`ttmanifold.kernels`.
The mathematics: ``docs/manifold.md#tangent-space-and-gauge`` and
``docs/manifold.md#projection``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from .. import kernels
from ..kernels import dense as compiled_dense
from ..tt import IndexSet

__all__ = ["compiled_batch", "has_bonds", "unbatched", "core_runs", "contiguous_runs",
           "right_sweep", "right_cores", "project_tt", "project_dense",
           "project_tt_at_point", "small_project_module", "project_small",
           "small_transport_module", "transport_small",
           "prefer_fewer_launches", "stack_pays", "one_point_batch", "squeeze_cores", "batched_mm",
           "batched_dot", "batched_qr", "batched_svd",
           "project_sampled", "gauge_project_flat", "gauge_deltas", "orth_defect"]


def core_runs(shapes: Sequence[Tuple[int, ...]]) -> List[Tuple[int, int]]:
    """Maximal runs ``[k0, k1)`` of consecutive equal shapes (for batched products)."""
    runs: List[Tuple[int, int]] = []
    k0 = 0
    for k in range(1, len(shapes) + 1):
        if k == len(shapes) or tuple(shapes[k]) != tuple(shapes[k0]):
            runs.append((k0, k))
            k0 = k
    return runs


def right_sweep(U: Sequence[torch.Tensor]):
    """The LQ sweep of the TT with left-orthogonal cores ``U``, without a sign convention:
    yields ``(k, q_k, r_k)`` for ``k = d-1, ..., 1``, where ``q_k`` (``n_k r_k x r_{k-1}``,
    the transposed right unfolding) holds ``V'_k`` and ``r_k^T = L'_k`` with
    ``U_k L'_{k+1} = L'_k V'_k`` (Householder QR of the transpose: LAPACK's signs). No
    inversion; O(d n r^3).

    With ``S_k = sign(diag(L'_k))`` (``+0 -> +1``) the canonical factors (``diag(L_k) >= 0``,
    :func:`~ttmanifold.tt.lq_pos`) are ``L_k = L'_k S_k`` and
    ``V_k = S_k V'_k (I (x) S_{k+1})``: by induction, the input of step k is the canonical
    one times ``I (x) S_{k+1}`` on its columns, and an LQ of ``A D`` (D diagonal, orthogonal)
    is ``(L S) (S Q D)``. So the interfaces satisfy ``V'_>k = S_k V_>k``, which lets callers
    fix all signs at the end, batched (:func:`right_cores`, :func:`project_tt`)."""
    c = U[-1]
    if c.dim() > 3:  # leading batch dimensions: the same sweep, batched
        yield from _right_sweep_batched(U)
        return
    for k in range(len(U) - 1, 0, -1):
        q, r = torch.linalg.qr(c.reshape(c.shape[0], -1).transpose(0, 1))
        yield k, q, r
        if k > 1:
            prv = U[k - 1]
            c = (prv.reshape(-1, prv.shape[2]) @ r.transpose(0, 1)).reshape(prv.shape)


def _right_sweep_batched(U: Sequence[torch.Tensor]):
    """:func:`right_sweep` of cores with leading batch dimensions ``(*B, r, n, r')``:
    ``q_k`` is ``(*B, n_k r_k, r_{k-1})``, ``r_k`` is ``(*B, r_{k-1}, r_{k-1})``."""
    c = U[-1]
    for k in range(len(U) - 1, 0, -1):
        a, n, b = c.shape[-3:]
        q, r = batched_qr(c.reshape(c.shape[:-3] + (a, n * b)).mT)  # compiled when small
        yield k, q, r
        if k > 1:
            prv = U[k - 1]
            pa, pn, pb = prv.shape[-3:]
            c = (prv.reshape(prv.shape[:-3] + (pa * pn, pb)) @ r.mT).reshape(prv.shape)


def _signs(dg: Sequence[torch.Tensor]) -> torch.Tensor:
    """``copysign(1, .)`` of the concatenated diagonals (one kernel each way)."""
    g = torch.cat(list(dg)) if len(dg) > 1 else dg[0]
    return torch.ones_like(g).copysign_(g)


#: The compiled kernels take a batch (one call, a loop over the points in C++) from this
#: TT-rank on; below it torch's batched factorizations of the whole batch are as fast or
#: faster (measured at d = 10, n = 20, 256 points: the right-core sweep 1.4-1.6x faster on
#: torch at r = 4; at r = 10 the compiled batch takes 0.5-0.96 of torch's time).
COMPILED_BATCH_MIN_RANK = 8


def compiled_batch(U, *seqs) -> bool:
    """Whether the compiled kernels take the batch with cores ``U`` (and the core
    sequences in ``seqs``; other arguments and None entries skipped) in one call: a TT-rank
    of at least :data:`COMPILED_BATCH_MIN_RANK` and leading batch dimensions that broadcast
    (a mismatch is left to the torch path's error)."""
    if len(U) < 2 or max(c.shape[-1] for c in U[:-1]) < COMPILED_BATCH_MIN_RANK:
        return False
    if U[0].numel() == 0:  # an empty batch: nothing to loop over (torch handles it)
        return False
    shapes = [c.shape[:-3] for seq in (U,) + seqs if isinstance(seq, (list, tuple))
              for c in seq if isinstance(c, torch.Tensor)]
    try:
        torch.broadcast_shapes(*shapes)
    except RuntimeError:
        return False
    return True


def has_bonds(U, *args, **kwargs) -> bool:
    """The compiled dense kernels take TTs with bonds, ``d > 1``: one point (every core of
    ``U`` and of the core sequences among ``args`` is 3-D), or a batch that they take in
    one call (:func:`compiled_batch`). The ``when=`` predicate of their dispatch."""
    return len(U) > 1 and (unbatched(U, *args) or compiled_batch(U, *args))


def one_point_batch(*seqs):
    """The batch shape when the cores of ``seqs`` carry batch dimensions that hold a single
    point in all (e.g. ``(1,)``): such calls run the single-point path (compiled kernels
    included) on the squeezed cores. None otherwise."""
    shapes = [c.shape[:-3] for seq in seqs if seq is not None for c in seq if c is not None]
    try:
        bs = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        return None
    return bs if len(bs) and bs.numel() == 1 else None


def squeeze_cores(seq):
    """The cores of a one-point batch without their batch dimensions (None stays None)."""
    return None if seq is None else [None if c is None else c.reshape(c.shape[-3:])
                                     for c in seq]


def contiguous_runs(cores: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The cores with every run of two or more equal-shaped cores that holds a
    non-contiguous one (e.g. the column-major frames of a QR) copied by one ``stack``
    (their views are contiguous); other cores unchanged. The sweeps reshape cores into
    unfoldings, which copies each non-contiguous core separately: this is one operation
    (a kernel launch on a GPU) per run instead of one per core, the same bytes. Done for
    runs of at most :data:`STACK_MAX_NUMEL` numbers (in cache) or where launches dominate
    (:func:`prefer_fewer_launches`); a large run on the CPU keeps the per-core copies,
    each used while still in cache."""
    cores = list(cores)
    if all(c.is_contiguous() for c in cores):
        return cores
    for k0, k1 in core_runs([tuple(c.shape) for c in cores]):
        if k1 - k0 > 1 and not all(c.is_contiguous() for c in cores[k0:k1]):
            numel = sum(c.numel() for c in cores[k0:k1])
            if stack_pays(cores[k0].device, numel):
                cores[k0:k1] = torch.stack(cores[k0:k1], -4).unbind(-4)
    return cores


STACK_MAX_NUMEL = 1 << 16


def stack_pays(device: torch.device, numel: int) -> bool:
    """Whether to copy ``numel`` numbers together into one batch (one operation, a launch on
    a GPU) rather than work on them piece by piece: runs of at most
    :data:`STACK_MAX_NUMEL` numbers (in cache), or where launches dominate
    (:func:`prefer_fewer_launches`). Read at call time (tests lower the bound)."""
    return numel <= STACK_MAX_NUMEL or prefer_fewer_launches(device, numel)


def unbatched(*seqs) -> bool:
    """Whether every core of the core sequences (lists or tuples; other arguments and None
    entries skipped) is a single 3-D core, i.e. no batch dimension."""
    return all(not isinstance(c, torch.Tensor) or c.dim() == 3
               for seq in seqs if isinstance(seq, (list, tuple)) for c in seq)


#: The batched factorizations (:func:`batched_qr`, :func:`batched_svd`) run the compiled
#: kernels (SIMD across the matrices, no per-matrix LAPACK call) for at least
#: ``BATCHED_QR_MIN_BATCH`` / ``BATCHED_SVD_MIN_BATCH`` matrices of at most
#: :data:`BATCHED_FACTOR_MAX_COLS` columns (rows for a wide SVD) and at most
#: ``BATCHED_QR_MAX_NUMEL`` / ``BATCHED_SVD_MAX_NUMEL`` entries each. Measured at 1 thread
#: per call, dispatch included (about 7 us of it), on the sweeps' transposed inputs: the SVD
#: 2.3-5.7x faster than ``torch.linalg.svd`` from 16 matrices (20 x 8, 80 x 8); the QR
#: 1.3-1.9x at 20 x 4 and 1.0-1.3x at 80 x 4 from 32 matrices, but 0.7-0.9x at 16 matrices
#: and at 160 x 4 (there LAPACK's own cost per matrix is as low). Set
#: ``BATCHED_QR_MIN_BATCH`` / ``BATCHED_SVD_MIN_BATCH`` to e.g. ``10**9`` to keep torch's
#: factorizations.
BATCHED_QR_MIN_BATCH = 32
BATCHED_SVD_MIN_BATCH = 16
BATCHED_FACTOR_MAX_COLS = 8
BATCHED_QR_MAX_NUMEL = 320
BATCHED_SVD_MAX_NUMEL = 2560


def _small_batch(a, min_batch: int, max_numel: int, wide: bool) -> bool:
    """Whether the compiled batched factorizations take ``a``: a tensor ``(*B, m, n)`` of at
    least ``min_batch`` matrices, ``min(m, n) <= BATCHED_FACTOR_MAX_COLS`` (``m >= n``
    unless ``wide``) and ``m n <= max_numel``. Shapes only."""
    if not isinstance(a, torch.Tensor) or a.dim() < 3:
        return False
    m, n = a.shape[-2:]
    if not wide and m < n:
        return False
    return (1 <= min(m, n) <= BATCHED_FACTOR_MAX_COLS and m * n <= max_numel
            and a.shape[:-2].numel() >= min_batch)


def _small_qr(a) -> bool:
    return _small_batch(a, BATCHED_QR_MIN_BATCH, BATCHED_QR_MAX_NUMEL, False)


def _small_svd(a) -> bool:
    return _small_batch(a, BATCHED_SVD_MIN_BATCH, BATCHED_SVD_MAX_NUMEL, True)


@kernels.dispatch("dense", compiled=compiled_dense.batched_qr, when=_small_qr)
def batched_qr(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reduced QR of every matrix of a batch: ``torch.linalg.qr(a)``, or on the CPU for
    many small matrices one compiled call that factors them together.

    Args:
        a: ``(*B, m, n)``.
    Returns:
        ``(Q, R)``: ``Q`` ``(*B, m, k)`` with orthonormal columns, ``R`` ``(*B, k, n)``
        upper triangular, ``Q R = a``, ``k = min(m, n)``; no sign convention promised
        (callers that need one fix it with ``sign(diag R)``).
    Cost: O(B m n^2). The compiled path (Householder in an interleaved layout, SIMD across
    the matrices; LAPACK's signs) runs where :func:`ttmanifold.kernels.usable` holds (CPU,
    float32/float64, no input requiring grad: autograd needs torch's backward) for at least
    :data:`BATCHED_QR_MIN_BATCH` matrices with ``m >= n``, ``n <= 8`` and
    ``m n <= BATCHED_QR_MAX_NUMEL``; everything else calls ``torch.linalg.qr``.
    """
    return torch.linalg.qr(a)


@kernels.dispatch("dense", compiled=compiled_dense.batched_svd, when=_small_svd)
def batched_svd(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of every matrix of a batch: ``torch.linalg.svd(a, full_matrices=False)``,
    or on the CPU for many small matrices one compiled call that factors them together.

    Args:
        a: ``(*B, m, n)``.
    Returns:
        ``(U, S, Vh)``: ``U`` ``(*B, m, k)`` and ``Vh^T`` ``(*B, n, k)`` with orthonormal
        columns (also where ``a`` is rank-deficient or zero), ``S`` ``(*B, k)`` descending
        and ``>= 0``, ``U diag(S) Vh = a``, ``k = min(m, n)``; singular vectors are defined
        up to the usual signs (and rotations within repeated singular values).
    Cost: O(B m n^2). The compiled path (Householder QR, then one-sided Jacobi sweeps on
    ``R^T`` until every matrix's columns are orthogonal to ``n eps`` relative, at most 40
    sweeps; NaN input gives NaN output) runs where
    :func:`ttmanifold.kernels.usable` holds (CPU, float32/float64, no input requiring grad)
    for at least :data:`BATCHED_SVD_MIN_BATCH` matrices with ``min(m, n) <= 8`` and
    ``m n <= BATCHED_SVD_MAX_NUMEL``; everything else calls ``torch.linalg.svd``.
    """
    return torch.linalg.svd(a, full_matrices=False)


#: The compiled SIMD right-core sweep (``dense.cpp``'s ``right_cores_batch_small``: blocks of
#: 8-16 float64 / 16 float32 points through the LQ sweep together, SIMD across the points)
#: takes a batch of at least ``SMALL_RIGHT_MIN_BATCH`` points whose TT-ranks are at most
#: ``SMALL_RIGHT_MAX_RANK``; other batches keep the per-point compiled loop (ranks from
#: :data:`COMPILED_BATCH_MIN_RANK`) or torch's batched QRs. Measured: see docs/kernels.md.
SMALL_RIGHT_MIN_BATCH = 16
SMALL_RIGHT_MAX_RANK = 16


def _small_right(U) -> bool:
    """Whether the compiled SIMD right-core sweep takes the batch with cores ``U`` (shapes
    only): every core batched over the same number of points, at least
    :data:`SMALL_RIGHT_MIN_BATCH` of them, ranks at most :data:`SMALL_RIGHT_MAX_RANK` and
    ``n_k r_{k+1} >= r_k`` (an LQ per core)."""
    if len(U) < 2 or any(c.dim() < 4 for c in U):
        return False
    B = U[0].shape[:-3].numel()
    if B < SMALL_RIGHT_MIN_BATCH or any(c.shape[:-3].numel() != B for c in U):
        return False
    mr = SMALL_RIGHT_MAX_RANK
    return all(a <= mr and b <= mr and (k == 0 or n * b >= a)
               for k, (a, n, b) in enumerate(c.shape[-3:] for c in U))


def _per_point_right(U) -> bool:
    """The ``when=`` of :func:`right_cores`' dispatch: :func:`has_bonds`, except batches
    that the SIMD sweep takes (:func:`_small_right`, dispatched by the batch path)."""
    return has_bonds(U) and not _small_right(U)


@kernels.dispatch("dense", compiled=compiled_dense.right_cores, when=_per_point_right)
def right_cores(U: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """The right-orthogonal cores of the TT with left-orthogonal cores ``U``.

    Args:
        U: ``d`` cores, ``U[k]`` of shape ``(r_k, n_k, r_{k+1})``, cores ``0..d-2``
            left-orthogonal.
    Returns:
        ``V``: a list of ``d`` cores of ``U``'s shapes, ``V[0]`` is None; ``V[1:]`` are
        right-orthogonal and represent the same tensor, in the canonical gauge
        ``diag(L_k) >= 0`` (an unsigned LQ sweep, :func:`right_sweep`, then one batched
        sign fix per run of equal core shapes).
    Cost: O(d n r^3); no inversion. Compiled CPU version (bitwise equal) via
    :mod:`ttmanifold.kernels`; a batch of at least :data:`SMALL_RIGHT_MIN_BATCH` points of
    ranks at most :data:`SMALL_RIGHT_MAX_RANK` runs the SIMD sweep (equal up to rounding).
    """
    d = len(U)
    V: List[Optional[torch.Tensor]] = [None] * d
    if d == 1:
        return V
    if U[0].dim() > 3:
        bs = one_point_batch(U)
        if bs is not None:  # one point: the single-point path, compiled kernels included
            return [None] + [v.reshape(bs + v.shape) for v in right_cores(squeeze_cores(U))[1:]]
        return _right_cores_batched(U)
    Q: List[Optional[torch.Tensor]] = [None] * d
    dg: List[Optional[torch.Tensor]] = [None] * d
    for k, q, r in right_sweep(U):
        Q[k], dg[k] = q, torch.diagonal(r)
    sizes = [g.shape[0] for g in dg[1:]]
    sgn = _signs(dg[1:])
    S = sgn.split(sizes)  # S[k-1]: signs of bond k-1
    offs = [sum(sizes[:i]) for i in range(len(sizes))]  # offset of S[i] in sgn
    for k0, k1 in core_runs([tuple(U[k].shape) + (k == d - 1,) for k in range(1, d)]):
        k0, k1 = k0 + 1, k1 + 1
        a, n, b = U[k0].shape
        if k1 - k0 == 1:
            q = Q[k0].reshape(n, b, a)
            q = q * S[k0 - 1] if k0 == d - 1 else q * S[k0 - 1] * S[k0].unsqueeze(1)
            V[k0] = q.permute(2, 0, 1).contiguous()
            continue
        m = k1 - k0
        # the stack copies the factors straight into the cores' layout (m, a, n, b); the
        # signs multiply it in place (a fresh tensor; the result keeps its layout)
        q = torch.stack([Q[k].reshape(n, b, a).permute(2, 0, 1) for k in range(k0, k1)])
        V[k0:k1] = q.mul_(_run_signs(sgn, offs[k0 - 1], m, a).permute(0, 3, 1, 2)).unbind(0)
    return V


def _run_signs(sgn: torch.Tensor, off: int, m: int, a: int) -> torch.Tensor:
    """The sign factors ``(*B, m, 1, a, a)`` of a run of ``m >= 2`` equal cores
    ``(a, n, a)`` (equal shapes in a run of two or more force equal bond ranks): row signs
    of its ``m`` left bonds times column signs of its ``m`` right bonds. Those ``m + 1``
    bonds' signs are consecutive in ``sgn`` (all signs concatenated; the run's first left
    bond at ``off``), so both factors are views and their outer product is one small
    multiplication (instead of two stacks and a second full-size product)."""
    rows = sgn[..., off:off + m * a].unflatten(-1, (m, a))
    cols = sgn[..., off + a:off + (m + 1) * a].unflatten(-1, (m, a))
    return (rows.unsqueeze(-2) * cols.unsqueeze(-1)).unsqueeze(-3)


@kernels.dispatch("dense", compiled=compiled_dense.right_cores_batch_small, when=_small_right)
def _right_cores_batched(U: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """:func:`right_cores` of cores with leading batch dimensions ``B``: the same sweep and
    sign fix, every operation batched over ``B`` (runs of equal core shapes stacked on a
    new dimension after ``B``); compiled, SIMD across the points, for batches of small
    ranks (:func:`_small_right`)."""
    d = len(U)
    bs = tuple(U[0].shape[:-3])
    nb = len(bs)
    V: List[Optional[torch.Tensor]] = [None] * d
    Q: List[Optional[torch.Tensor]] = [None] * d
    dg: List[Optional[torch.Tensor]] = [None] * d
    for k, q, r in _right_sweep_batched(U):
        Q[k], dg[k] = q, torch.diagonal(r, dim1=-2, dim2=-1)
    g = torch.cat(dg[1:], -1) if d > 2 else dg[1]
    sizes = [t.shape[-1] for t in dg[1:]]
    sgn = torch.ones_like(g).copysign_(g)
    S = sgn.split(sizes, -1)
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    for k0, k1 in core_runs([tuple(U[k].shape[-3:]) + (k == d - 1,) for k in range(1, d)]):
        k0, k1 = k0 + 1, k1 + 1
        m = k1 - k0
        a, n, b = U[k0].shape[-3:]
        stack = (lambda ts: ts[0].unsqueeze(nb)) if m == 1 else (lambda ts: torch.stack(ts, nb))
        if m > 1:  # a run of middle cores: stacked in the cores' layout (*B, m, a, n, b),
            # then one product with views of the signs
            q = torch.stack([Q[k].reshape(bs + (n, b, a)).movedim(-1, -3)
                             for k in range(k0, k1)], nb)
            V[k0:k1] = q.mul_(_run_signs(sgn, offs[k0 - 1], m, a).movedim(-1, -3)).unbind(nb)
            continue
        q = stack(Q[k0:k1]).reshape(bs + (m, n, b, a))
        q = q * stack(S[k0 - 1:k1 - 1]).unsqueeze(-2).unsqueeze(-2)  # rows (.., 1, 1, a)
        if k1 <= d - 1:  # column signs (.., 1, b, 1); the last core has none
            q = q * stack(S[k0:k1]).unsqueeze(-2).unsqueeze(-1)
        V[k0:k1] = q.movedim(-1, -3).contiguous().unbind(nb)
    return V


def _lead_flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(*L, p, q)`` as ``(prod L, p, q)``: a view when the leading dimensions merge
    (contiguous, e.g. a fresh stack or product), else a copy."""
    return x.reshape((math.prod(x.shape[:-2]),) + tuple(x.shape[-2:]))


def batched_mm(a: torch.Tensor, b: torch.Tensor, acc: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """``a @ b`` (or, with ``acc``, ``acc - a @ b``) for equal leading dimensions ``L``, as
    one ``bmm`` (``baddbmm``) over the leading dimensions flattened into one.

    ``baddbmm`` takes exactly one batch dimension, so ``acc - a @ b`` on a batch of runs
    ``(B, m, p, q)`` would dispatch a product and a subtraction; flattened, it is one
    operation, as ``addmm``/``baddbmm`` for one point (``(p, q)`` or ``(m, p, q)``).

    Args:
        a: ``(*L, p, k)``; b: ``(*L, k, q)``; acc: None or ``(*L, p, q)``.
    Returns:
        ``(*L, p, q)``, a new tensor; differentiable.
    Cost: the product's flops; no copy when the leading dimensions merge (contiguous
    stacks and products: the sweeps' intermediates).
    """
    lead = tuple(a.shape[:-2])
    if acc is None:
        out = torch.bmm(_lead_flat(a), _lead_flat(b))
    else:
        out = torch.baddbmm(_lead_flat(acc), _lead_flat(a), _lead_flat(b), alpha=-1)
    return out.view(lead + tuple(out.shape[-2:]))


def batched_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)``: the inner products of the last dimension, one per point of the
    leading (broadcast) dimensions.

    Where launches dominate (:func:`prefer_fewer_launches`) one batched product
    ``a_i^T b_i`` (one operation, as ``torch.dot`` for one point); on the CPU the product
    and the sum (two operations, measured ~2.5x faster than the batched product for 256
    vectors of 3000 numbers).

    Args:
        a, b: ``(*A, n)`` and ``(*B, n)``, ``A`` and ``B`` broadcastable.
    Returns:
        the ``broadcast(A, B)`` inner products; differentiable.
    Cost: O(n) per point.
    """
    if not prefer_fewer_launches(a.device, max(a.numel(), b.numel())):
        return (a * b).sum(-1)
    bs = tuple(torch.broadcast_shapes(a.shape[:-1], b.shape[:-1]))
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).view(bs)


def _packed(U, V, Z, *, packed: bool = False, gauge: bool = False) -> bool:
    # a batch of small ranks goes on to the batch path's own kernel (SIMD across points)
    return packed and (unbatched(U, V, Z) or (compiled_batch(U, V, Z) and not _small_project(
        U, V, Z, packed=packed, gauge=gauge)))


# The paired interface sweeps (:func:`_paired_interfaces`: 2 batched products per middle
# core instead of 4) pay a copy of the middle cores (Z twice, U and V once): a gain where
# every operation is a kernel launch and the copy is small (GPU, small batches), a loss
# where bytes dominate (CPU, torch path: measured 10-20 % slower for one point and up to
# ~50 % for a batch of 256 at d = 10, n = 20, r = 10). None (auto): paired off the CPU
# when Z's middle cores hold at most PAIRED_MAX_NUMEL numbers (copying 2^18 float64 is
# about the time of a few launches); True/False force it (tests; counting the GPU path).
PAIRED_SWEEPS: Optional[bool] = None
PAIRED_MAX_NUMEL = 1 << 18


def prefer_fewer_launches(device: torch.device, numel: int) -> bool:
    """Whether to run the variants that dispatch fewer operations at the price of extra
    copies (the paired interface sweeps here, the transport's block cores built per run in
    :class:`~ttmanifold.FixedTTRank`): :data:`PAIRED_SWEEPS` if set, else off the CPU when
    the data to copy holds at most :data:`PAIRED_MAX_NUMEL` numbers. On the CPU both
    variants measured slower (large fused copies leave the cache; per-core work stays in
    it), so the CPU keeps the sequential versions."""
    if PAIRED_SWEEPS is not None:
        return bool(PAIRED_SWEEPS)
    return device.type != "cpu" and numel <= PAIRED_MAX_NUMEL


def _pairable(U, Z) -> bool:
    """Whether :func:`_paired_interfaces` runs: chosen (:data:`PAIRED_SWEEPS`), ``d >= 3``
    and the middle cores of the point and of ``Z`` all of one shape each, ``(r, n, r)`` and
    ``(R, n, R)`` (the usual case of uniform ranks)."""
    d = len(U)
    if d < 3 or not prefer_fewer_launches(U[0].device, (d - 2) * max(Z[1].numel(),
                                                                      U[1].numel())):
        return False
    a, n, b = U[1].shape[-3:]
    A, nz, B = Z[1].shape[-3:]
    return a == b and A == B and nz == n and all(
        tuple(U[k].shape[-3:]) == (a, n, a) and tuple(Z[k].shape[-3:]) == (A, n, A)
        for k in range(2, d - 1))


def _paired_interfaces(U, Vt, Z, bs):
    """The left and right interface sweeps of :func:`project_tt` run together: step ``i``
    advances the left sweep over middle core ``1 + i`` and the right sweep over middle core
    ``d - 2 - i`` with one pair of batched products (the right sweep, transposed, has the
    left sweep's shapes), so the ``d - 2`` middle cores cost 2 operations each instead of
    4 (each operation is a kernel launch on a GPU); the same flops, plus one copy of the
    cores (see :data:`PAIRED_SWEEPS`).

    ``Vt[k]`` (k >= 1): right core ``k`` with its last two modes swapped,
    ``(*B, r_{k-1}, r_k, n_k)`` (a view); ``bs``: the batch shape of all cores (expanded).
    Returns ``(T, Ps, Q)`` as the sequential sweeps compute them: ``T[k]`` the products
    ``P_k Z_k`` ``(*B, r_{k-1} n_k, R_k)``, ``Ps[k]`` the left interfaces (``Ps[0]``
    None), ``Q[k]`` the right interfaces ``(*B, R_k, r_k)`` (``Q[d-1]`` None)."""
    d = len(U)
    m = d - 2
    bs = tuple(bs)
    a, n, _ = U[1].shape[-3:]
    R = Z[1].shape[-3]
    n0, nl = U[0].shape[-2], U[-1].shape[-2]
    T: List[Optional[torch.Tensor]] = [None] * d
    Ps: List[Optional[torch.Tensor]] = [None] * d
    Q: List[Optional[torch.Tensor]] = [None] * d
    T[0] = Z[0].reshape(bs + (n0, R))
    Ps[1] = U[0].reshape(bs + (n0, a)).mT @ T[0]  # (*B, a, R)
    Q[d - 2] = Z[-1].reshape(bs + (R, nl)) @ Vt[-1].reshape(bs + (a, nl)).mT  # (*B, R, a)
    # step i multiplies X = [P_{1+i}; Q_{d-2-i}^T] by Y_i = [Z_{1+i}; Z_{d-2-i} reversed],
    # then by Wt_i = [U_{1+i}^T; V_{d-2-i} as (r, r' n)]: the pairs are stacked once, the
    # pair dimension leading, so every step reads contiguous blocks
    Y = torch.stack([c for i in range(m) for c in (Z[1 + i], Z[d - 2 - i].transpose(-3, -1))])
    Y = Y.reshape((m, 2) + bs + (R, n * R))
    Wt = torch.stack([c for i in range(m) for c in (U[1 + i].movedim(-1, -3), Vt[d - 2 - i])])
    Wt = Wt.reshape((m, 2) + bs + (a, a * n))
    X = torch.stack([Ps[1], Q[d - 2].mT])
    for i in range(m):
        t = (X @ Y[i]).reshape((2,) + bs + (a * n, R))
        X = Wt[i] @ t
        T[1 + i] = t[0]
        Ps[2 + i] = X[0]
        Q[d - 3 - i] = X[1].mT
    T[d - 1] = (Ps[d - 1] @ Z[-1].reshape(bs + (R, nl))).reshape(bs + (a * nl, 1))
    return T, Ps, Q


def _sequential_interfaces(U, V, Z, sweep, dg):
    """The interface sweeps of :func:`project_tt` one core at a time (any ranks): the left
    sweep ``t_k = P_k Z_k``, ``P_{k+1} = U_k^T t_k``, then the right sweep, with the
    unsigned LQ sweep ``sweep`` interleaved when V is None (its diagonals appended to
    ``dg``). Returns ``(T, Ps, Q)`` as :func:`_paired_interfaces`."""
    d = len(U)
    T: List[torch.Tensor] = []
    Ps: List[Optional[torch.Tensor]] = [None] * d  # P_k; P_0 = 1
    P: Optional[torch.Tensor] = None
    for k in range(d):
        z = Z[k]
        if P is None:  # P_0 = 1
            t = z.reshape(-1, z.shape[2])
        else:
            t = (P @ z.reshape(z.shape[0], -1)).reshape(-1, z.shape[2])  # (r n, R)
        T.append(t)
        if k < d - 1:
            P = U[k].reshape(-1, U[k].shape[2]).transpose(0, 1) @ t
            Ps[k + 1] = P
    Q: List[Optional[torch.Tensor]] = [None] * d  # Q[d-1] = 1
    # without V: the unsigned LQ sweep, interleaved (V'_k computed while in cache); its
    # interfaces are Q'_k = Q_k S_{k+1}, fixed by the caller with one product per run
    for k in range(d - 1, 0, -1):
        z = Z[k]
        if Q[k] is None:
            s = z.reshape(z.shape[0], -1)
        else:
            s = (z.reshape(-1, z.shape[2]) @ Q[k]).reshape(z.shape[0], -1)  # (R, n r)
        if sweep is not None:
            _, q, r = next(sweep)
            dg.append(torch.diagonal(r))
            Q[k - 1] = s @ q  # (R, r) with the unsigned V'_k (q = V'_k^T)
        else:
            v = V[k]
            Q[k - 1] = s @ v.reshape(v.shape[0], -1).transpose(0, 1)
    return T, Ps, Q


@kernels.dispatch("dense", compiled=compiled_dense.project_tt, when=_packed)
def project_tt(U: Sequence[torch.Tensor], V: Optional[Sequence[Optional[torch.Tensor]]],
               Z: Sequence[torch.Tensor], *, packed: bool = False, gauge: bool = False):
    """``D_k = U_<k^T Z V_>k^T`` (cores of shape ``U[k].shape``) for a TT ``Z``: the
    tangent-space projection of ``Z`` before (or, with ``gauge=True``, after) the gauge
    projection.

    Args:
        U: left-orthogonal cores of the point.
        V: its right-orthogonal cores (``V[0]`` unused), or None to compute them here (the
            unsigned :func:`right_sweep`, interleaved with the right interface sweep,
            signs fixed per run at the end).
        Z: the cores of a TT of the same shape, ranks ``R_k``.
        packed: return one flat tensor (cores concatenated) instead of a list.
        gauge: return the gauge-projected deltas (below).
    Returns:
        the ``d`` cores ``D_k`` (or one flat tensor); differentiable.
    Cost: O(d n r R (r + R)). Compiled CPU version for ``packed=True`` via
    :mod:`ttmanifold.kernels`.

    Left sweep ``t_k = P_k Z_k`` with ``P_k = U_<k^T Z_<k`` (``r_{k-1} x R_{k-1}``), right
    sweep ``Q_k = Z_>k V_>k^T`` (``R_k x r_k``), then ``D_k = t_k Q_k``, batched over runs
    of cores of equal shapes. Cost O(d n r R (r + R)); differentiable. Returns the list of
    cores, or with ``packed=True`` one flat tensor (cores concatenated).

    ``gauge=True`` returns the gauge-projected ``D_k - U_k (U_k^T D_k)`` (k < d) instead, at
    almost no extra cost: ``U_k^T t_k = P_{k+1}`` is a product of the left sweep, so the
    projection is ``(t_k - U_k P_{k+1}) Q_k``, one batched product per run.
    """
    if not unbatched(U, V, Z):
        bs = one_point_batch(U, V, Z)
        if bs is not None:  # one point: the single-point path, compiled kernels included
            out = project_tt(squeeze_cores(U), squeeze_cores(V), squeeze_cores(Z), packed=packed, gauge=gauge)
            return out.reshape(bs + out.shape) if packed else [c.reshape(bs + c.shape) for c in out]
        return _project_tt_batched(U, V, Z, packed=packed, gauge=gauge)
    d = len(U)
    dg: List[torch.Tensor] = []
    sweep = right_sweep(U) if V is None else None
    if _pairable(U, Z):  # both interface sweeps at once (after the LQ sweep, without V)
        if sweep is not None:
            Vr: List[Optional[torch.Tensor]] = [None] * d
            for k, q, r in sweep:  # q: (n_k r_k, r_{k-1}), the unsigned V'_k transposed
                dg.append(torch.diagonal(r))
                Vr[k] = q.reshape(U[k].shape[1], U[k].shape[2], -1).permute(2, 1, 0)
        else:
            Vr = [None] + [v.transpose(1, 2) for v in V[1:]]
        T, Ps, Q = _paired_interfaces(U, Vr, Z, ())
    else:
        T, Ps, Q = _sequential_interfaces(U, V, contiguous_runs(Z), sweep, dg)
    S: Optional[List[torch.Tensor]] = None
    if sweep is not None and dg:
        sgn = _signs(dg[::-1])
        S = list(sgn.split([g.shape[0] for g in dg[::-1]]))  # S[k]: bond k
    pieces: List[torch.Tensor] = []
    for k0, k1 in core_runs([tuple(U[k].shape) + tuple(Z[k].shape) + (k == d - 1,)
                             for k in range(d)]):
        if k1 - k0 == 1:
            t = T[k0]
            if gauge and k0 < d - 1:
                t = torch.addmm(t, U[k0].reshape(t.shape[0], -1), Ps[k0 + 1], alpha=-1)
            if Q[k0] is None:
                pieces.append(t)
            else:
                pieces.append(t @ (Q[k0] if S is None else Q[k0] * S[k0]))
        else:
            t = torch.stack(T[k0:k1])
            if gauge:  # the run holds no last core
                us = torch.stack([U[k].reshape(t.shape[1], -1) for k in range(k0, k1)])
                t = torch.baddbmm(t, us, torch.stack(Ps[k0 + 1:k1 + 1]), alpha=-1)
            qs = torch.stack(Q[k0:k1])
            if S is not None:  # the run's bonds are consecutive in sgn: a view, no stack
                off = sum(int(c.shape[0]) for c in S[:k0])
                qs = qs * sgn[off:off + (k1 - k0) * qs.shape[-1]].view(k1 - k0, 1, -1)
            pieces.append(torch.bmm(t, qs))
    if packed:
        return torch.cat([g.reshape(-1) for g in pieces])
    D: List[torch.Tensor] = []
    k = 0
    for g in pieces:
        if g.dim() == 2:
            D.append(g.reshape(U[k].shape))
            k += 1
        else:
            D.extend(g.reshape((g.shape[0],) + tuple(U[k].shape)).unbind(0))
            k += g.shape[0]
    return D


def _sequential_interfaces_batched(U, V, Z, bs):
    """:func:`_sequential_interfaces` with leading batch dimensions ``bs`` (any ranks);
    also returns the LQ sweep (None with V) and its diagonals."""
    d = len(U)
    T: List[torch.Tensor] = []
    Ps: List[Optional[torch.Tensor]] = [None] * d
    P: Optional[torch.Tensor] = None
    for k in range(d):
        z = Z[k]
        a, n, R = z.shape[-3:]
        if P is None:
            t = z.reshape(bs + (a * n, R))
        else:
            t = (P @ z.reshape(bs + (a, n * R))).reshape(bs + (P.shape[-2] * n, R))
        T.append(t)
        if k < d - 1:
            ua, un, ub = U[k].shape[-3:]
            P = U[k].reshape(bs + (ua * un, ub)).mT @ t
            Ps[k + 1] = P
    Q: List[Optional[torch.Tensor]] = [None] * d
    sweep = _right_sweep_batched(U) if V is None else None
    dg: List[torch.Tensor] = []
    for k in range(d - 1, 0, -1):
        z = Z[k]
        a, n, R = z.shape[-3:]
        if Q[k] is None:
            s = z.reshape(bs + (a, n * R))
        else:
            s = (z.reshape(bs + (a * n, R)) @ Q[k]).reshape(bs + (a, n * Q[k].shape[-1]))
        if sweep is not None:
            _, q, r = next(sweep)
            dg.append(torch.diagonal(r, dim1=-2, dim2=-1))
            Q[k - 1] = s @ q
        else:
            v = V[k]
            va, vn, vb = v.shape[-3:]
            Q[k - 1] = s @ v.reshape(bs + (va, vn * vb)).mT
    return T, Ps, Q, sweep, dg


#: The compiled batched projection for small ranks (``dense.cpp``'s ``project_batch_small``:
#: blocks of points through the whole computation, SIMD across the points) takes a batch
#: of at least ``SMALL_PROJECT_MIN_BATCH`` points whose TT-ranks are at most
#: ``SMALL_PROJECT_MAX_RANK`` and those of ``Z`` at most ``SMALL_PROJECT_MAX_Z_RANK`` (the
#: rank-2r block cores of a transported tangent vector), with ``V`` None and the points batched (one point
#: shared by the batch keeps the torch path, whose products run the batch in their matrix
#: dimensions). Measured: see docs/kernels.md.
SMALL_PROJECT_MIN_BATCH = 16
SMALL_PROJECT_MAX_RANK = 16
SMALL_PROJECT_MAX_Z_RANK = 32


def _small_project(U, V, Z, *, packed: bool, gauge: bool, check=None) -> bool:
    """Whether the compiled small-rank batched projection takes the call (shapes only)."""
    if V is not None or len(U) < 2 or len(Z) != len(U):
        return False
    if any(c.dim() < 3 for c in U) or any(c.dim() < 3 for c in Z):
        return False
    shapes = [c.shape[:-3] for c in list(U) + list(Z)]
    try:  # (one batch shape for all, the usual case: no torch.broadcast_shapes, ~50 us)
        bs = shapes[0] if all(s == shapes[0] for s in shapes) else torch.broadcast_shapes(*shapes)
    except RuntimeError:
        return False
    B = bs.numel()
    if B < SMALL_PROJECT_MIN_BATCH or any(c.shape[:-3].numel() != B for c in U):
        return False
    mr, mz = SMALL_PROJECT_MAX_RANK, SMALL_PROJECT_MAX_Z_RANK
    for k, (u, z) in enumerate(zip(U, Z)):
        a, n, b = u.shape[-3:]
        if (max(a, b) > mr or max(z.shape[-3], z.shape[-1]) > mz or z.shape[-2] != n
                or (k > 0 and n * b < a)):
            return False
    return True


def small_project_module(U, Z, *, gauge: bool = True):
    """The loaded dense module when the compiled small-rank batched projection takes
    ``project_tt(U, None, Z, packed=True, gauge=gauge)`` (shapes, dtypes, grad and device
    as its dispatch decides), else None. A caller that routes such a call itself passes the
    module to :func:`project_small`."""
    return _project_tt_batched.module_for(U, None, Z, packed=True, gauge=gauge)


#: float32 below this TT-rank: :func:`project_small` ignores given right cores (the
#: kernel's own LQ sweep at 32 lanes costs less than reading ``V`` from memory: 1.0-1.1x
#: at r = 2-4; given ``V`` is 1.02-2.1x faster at r = 5-10 in float32, 1.2-1.6x at every
#: rank in float64; d = 10, n = 20, 256 points).
SMALL_PROJECT_V_MIN_RANK_F32 = 5


def project_small(mod, U, Z, *, check: str, gauge: bool = True, V=None) -> torch.Tensor:
    """``project_tt(U, V, Z, packed=True, gauge=gauge)`` of a batch by the compiled
    small-rank kernel ``mod`` (from :func:`small_project_module`), raising
    ``RuntimeError(check)`` when a delta is NaN or infinite (tested while they are
    written: no separate pass over the inputs; ``check=""``: not tested, a NaN result as
    on the torch path). ``V``: None, or the points' canonical right cores (of ``U``'s batch
    shape or one point's), which the kernel then uses instead of its own LQ sweep (not in
    float32 below :data:`SMALL_PROJECT_V_MIN_RANK_F32`). Cost: that of :func:`project_tt`."""
    if (V is not None and mod is not None and U[0].dtype == torch.float32
            and max(c.shape[-1] for c in U) < SMALL_PROJECT_V_MIN_RANK_F32):
        V = None
    return _project_tt_batched.call_with(mod, U, V, Z, packed=True, gauge=gauge, check=check)


#: The compiled transport takes TT-ranks up to this (above: the block cores built and
#: projected by :func:`project_small`; the kernel's own bound is 16). Measured at d = 10,
#: n = 20, r = 10, 256 points, fresh processes: geoopt's Adam step 0.92-1.05 ms per point
#: in float64 with the kernel against 0.88-1.02 without it, 0.35-0.37 against 0.40-0.46 in
#: float32. Before the optimizer step's large outputs were given huge pages (main's
#: ``kernels.memory``) the float64 step was slower with the kernel (1.4-1.6 against
#: 1.1-1.4: without the block cores' 16 MB temporaries glibc left more of the step's 34 MB
#: tensors to fresh 4 KB pages); lower this if that comes back.
SMALL_TRANSPORT_MAX_RANK = 16


def small_transport_module(Uy, U, V, dU):
    """The loaded dense module when the compiled batched transport (:func:`transport_small`)
    takes ``(Uy, U, V, dU)``, else None (before any work; a build may start, as for every
    dispatched call): at least :data:`SMALL_PROJECT_MIN_BATCH` points ``Uy``, each its own
    (``U``, ``V``, ``dU`` of their batch shape or one for all), TT-ranks within
    :data:`SMALL_TRANSPORT_MAX_RANK` (the kernel takes up to 16), and
    the compiled kernels usable on all of them (:func:`ttmanifold.kernels.usable`: CPU,
    one float dtype, no grad)."""
    d = len(Uy)
    if d < 2 or not (len(U) == len(V) == len(dU) == d) or any(c.dim() < 3 for c in Uy):
        return None
    bs = Uy[0].shape[:-3]
    if bs.numel() < SMALL_PROJECT_MIN_BATCH or any(c.shape[:-3] != bs for c in Uy):
        return None
    for k in range(d):
        a, n, b = Uy[k].shape[-3:]
        if max(a, b) > SMALL_TRANSPORT_MAX_RANK or 2 * max(a, b) > SMALL_PROJECT_MAX_Z_RANK or (
                k > 0 and n * b < a):
            return None
        for c in (U[k], dU[k]) + ((V[k],) if k > 0 else ()):
            if c.dim() < 3 or c.shape[-3:] != Uy[k].shape[-3:] or (
                    c.shape[:-3] != bs and c.shape[:-3].numel() != 1):
                return None
    if not kernels.usable("dense", Uy, U, V[1:], dU):
        return None
    return kernels.module("dense")


def transport_small(mod, Uy, U, V, dU, *, check: str) -> torch.Tensor:
    """The vector transport by projection of a batch, ``P_Y(xi)`` packed and gauged at the
    points ``Uy``, of the tangent vectors ``xi = sum_k U_<k dU_k V_>k`` at the points ``U``
    (right cores ``V``, ``V[0]`` unused), by the compiled kernel ``mod`` (from
    :func:`small_transport_module`): :func:`project_tt` of ``xi``'s rank-2r block cores
    without building them (assembled per block of points in cache).

    Args: as above; ``check``: the message of the ``RuntimeError`` raised when a delta is
        NaN or infinite (a non-finite ``dU`` or point reaches them; ``""``: not tested).
    Returns: ``(*batch, size)``, ``batch`` that of ``Uy``.
    Cost: O(B d n r^3), one call (that of :func:`project_tt` on the block cores)."""
    return compiled_dense.transport_batch_small(mod, Uy, U, V, dU, check=check)


@kernels.dispatch("dense", compiled=compiled_dense.project_batch_small, when=_small_project)
def _project_tt_batched(U, V, Z, *, packed: bool, gauge: bool, check=None):
    """:func:`project_tt` with leading batch dimensions: the batch shape is the broadcast
    of those of ``U`` and ``Z`` (and ``V``); the same sweeps, batched (compiled, SIMD across
    the points, for batches of small ranks: :data:`SMALL_PROJECT_MAX_RANK`)."""
    d = len(U)
    bs = torch.broadcast_shapes(*[c.shape[:-3] for c in (U[0], Z[0])
                                  + (() if V is None else (V[-1],))])
    nb = len(bs)
    if (one_point_batch(U, V) is not None or unbatched(U, V)) and not prefer_fewer_launches(
            U[0].device, sum(z.numel() for z in Z)):
        # one point shared by the batch (many Z at one point): the batch goes into the
        # matrix dimensions of the products with the point's cores (about 9 operations per
        # core: where launches dominate, the sweeps below on the broadcast point dispatch
        # fewer)
        U, V = squeeze_cores(U), squeeze_cores(V)
        zs = torch.broadcast_shapes(*[z.shape[:-3] for z in Z])
        flat = project_tt_at_point(U, V, [z.expand(zs + z.shape[-3:]).reshape((-1,) + z.shape[-3:])
                                          for z in Z], gauge=gauge)
        flat = flat.reshape(tuple(bs) + flat.shape[-1:])
        if packed:
            return flat
        sizes = [u.numel() for u in U]
        return [c.unflatten(-1, u.shape) for c, u in zip(flat.split(sizes, -1), U)]
    if V is None and tuple(U[0].shape[:-3]) != tuple(bs):
        # a point shared by the batch: its right cores once, not once per batch element
        # after the expansion below
        V = right_cores(U)

    def ex(c):
        return c if c is None or tuple(c.shape[:-3]) == tuple(bs) else c.expand(bs + c.shape[-3:])

    U = [ex(u) for u in U]
    Z = [ex(z) for z in Z]
    V = None if V is None else [ex(v) for v in V]
    if _pairable(U, Z):  # both interface sweeps at once (after the LQ sweep, without V)
        dg: List[torch.Tensor] = []
        if V is None:
            Vr: List[Optional[torch.Tensor]] = [None] * d
            for k, q, r in _right_sweep_batched(U):
                dg.append(torch.diagonal(r, dim1=-2, dim2=-1))
                Vr[k] = q.unflatten(-2, tuple(U[k].shape[-2:])).movedim(-1, -3).transpose(-2, -1)
            sweep = True
        else:
            Vr = [None] + [v.transpose(-2, -1) for v in V[1:]]
            sweep = None
        T, Ps, Q = _paired_interfaces(U, Vr, Z, bs)
    else:
        T, Ps, Q, sweep, dg = _sequential_interfaces_batched(U, V, contiguous_runs(Z), bs)
    S: Optional[List[torch.Tensor]] = None
    if sweep is not None and dg:
        g = torch.cat(dg[::-1], -1)
        sgn = torch.ones_like(g).copysign_(g)
        S = list(sgn.split([t.shape[-1] for t in dg[::-1]], -1))
    pieces: List[torch.Tensor] = []
    counts: List[int] = []
    for k0, k1 in core_runs([tuple(U[k].shape[-3:]) + tuple(Z[k].shape[-3:]) + (k == d - 1,)
                             for k in range(d)]):
        m = k1 - k0
        stack = (lambda ts: ts[0].unsqueeze(nb)) if m == 1 else (lambda ts: torch.stack(ts, nb))
        t = stack(T[k0:k1])  # (*B, m, r n, R)
        if gauge and k0 < d - 1:
            ua, un, ub = U[k0].shape[-3:]
            us = stack([U[k].reshape(bs + (ua * un, ub)) for k in range(k0, k1)])
            t = batched_mm(us, stack(Ps[k0 + 1:k1 + 1]), acc=t)  # t - us P: one baddbmm
        if Q[k0] is not None:
            qs = stack(Q[k0:k1])
            if S is not None and m > 1:  # the run's bonds are consecutive in sgn: a view
                off = sum(int(c.shape[-1]) for c in S[:k0])
                qs = qs * sgn[..., off:off + m * qs.shape[-1]].unflatten(-1, (m, -1)).unsqueeze(-2)
            elif S is not None:
                qs = qs * stack(S[k0:k1]).unsqueeze(-2)
            t = batched_mm(t, qs)
        pieces.append(t)
        counts.append(m)
    if packed:
        return torch.cat([g.flatten(nb) for g in pieces], -1)
    D: List[torch.Tensor] = []
    k = 0
    for g, m in zip(pieces, counts):
        D.extend(g.reshape(bs + (m,) + tuple(U[k].shape[-3:])).unbind(nb))
        k += m
    return D


def project_tt_at_point(U: Sequence[torch.Tensor], V: Optional[Sequence[Optional[torch.Tensor]]],
                        Z: Sequence[torch.Tensor], *, gauge: bool = True,
                        out: Optional[torch.Tensor] = None,
                        chunk: Optional[int] = None) -> torch.Tensor:
    """:func:`project_tt` (packed) of a batch of TTs at one point: ``D_k = U_<k^T Z V_>k^T``
    for every TT of the batch, with the batch folded into the matrix dimensions of the
    products with the point's cores (one large product each) instead of broadcasting the
    point over the batch.

    Args:
        U: the point's left-orthogonal cores ``(r_{k-1}, n_k, r_k)`` (no batch dimension).
        V: its right-orthogonal cores (``V[0]`` unused), or None to compute them here
            (:func:`right_cores`, once for the batch).
        Z: the cores of B TTs, ``(B, R_{k-1}, n_k, R_k)`` (one batch dimension).
        gauge: return the gauge-projected deltas ``D_k - U_k (U_k^T D_k)`` (k < d).
        out: a ``(B, size)`` tensor to write the result into (no autograd through it), or
            None to return a new tensor (differentiable).
        chunk: with ``out``: run the batch in slices of this many TTs (their intermediates
            stay in the cache; the point's cores are shared); None: one pass.
    Returns:
        ``(B, size)``: the packed deltas (``out`` if given).
    Cost: O(d n r R (r + R)) per TT, as :func:`project_tt`: per core two products with the
    point's cores of the whole batch (``(B R, r) x (r, n r)`` and ``(B R, n r) x (n r, r)``),
    three batched products between the batch's interfaces and ``Z_k``, and for the gauge
    one more with ``U_k``.

    The left interfaces are kept transposed, ``L_k = P_k^T`` ``(B, R_{k-1}, r_{k-1})``, so
    that ``L_k U_k`` is one product over the batch and ``L_{k+1} = Z_k^T (L_k U_k)`` one
    batched product; the right sweep ``s_k = Z_k Q_k``, ``Q_{k-1} = s_k V_k^T`` (one
    product over the batch) runs last and gives ``D_k = P_k s_k`` while ``s_k`` is in the
    cache; the gauge part is ``U_k (U_k^T D_k) = U_k (P_{k+1} Q_k)``.
    """
    if U[0].dim() != 3 or any(z.dim() != 4 for z in Z) or len(Z) != len(U):
        raise ValueError("project_tt_at_point: U and V take one point (3-D cores), Z one "
                         "batch dimension (4-D cores), as many cores as U")
    if V is None:
        V = right_cores(U)
    B = Z[0].shape[0]
    if out is None:
        return _project_at_point_pass(U, V, Z, gauge, None)
    step = B if chunk is None else max(1, int(chunk))
    for i in range(0, B, step):
        _project_at_point_pass(U, V, [z[i:i + step] for z in Z], gauge, out[i:i + step])
    return out


def _project_at_point_pass(U, V, Z, gauge: bool, out: Optional[torch.Tensor]):
    """One pass of :func:`project_tt_at_point` over the batch of ``Z``: written into
    ``out`` (strided slices, in place) or, with None, returned as a new tensor built from
    the pieces (the autograd path)."""
    d = len(U)
    B = Z[0].shape[0]
    L: List[Optional[torch.Tensor]] = [None] * d  # L[k] = P_k^T: (B, R_{k-1}, r_{k-1})
    if d > 1:
        _, n0, C = Z[0].shape[-3:]
        L[1] = torch.matmul(Z[0].reshape(B, n0, C).mT, U[0].reshape(n0, -1))
    for k in range(1, d - 1):
        a, n, c = U[k].shape
        A, C = Z[k].shape[-3], Z[k].shape[-1]
        Y = (L[k].reshape(B * A, a) @ U[k].reshape(a, n * c)).view(B, A * n, c)
        L[k + 1] = Z[k].reshape(B, A * n, C).mT @ Y
    pieces: List[torch.Tensor] = []
    end = sum(u.numel() for u in U)
    Q: Optional[torch.Tensor] = None  # Q_k = Z_>k V_>k^T: (B, R_k, r_k); Q_{d-1} = 1
    for k in range(d - 1, -1, -1):
        a, n, c = U[k].shape
        A, C = Z[k].shape[-3], Z[k].shape[-1]
        if Q is None:
            s = Z[k].reshape(B, A, n * C)
        else:
            # Q_k^T Z_k^T then one transposing copy: MKL's batched products are several
            # times faster with long rows (n R columns) than with r columns
            s = torch.bmm(Q.mT, Z[k].reshape(B, A * n, C).mT).mT.contiguous().view(B, A, n * c)
        Dk = s if k == 0 else torch.bmm(L[k].mT, s)  # P_k s_k: (B, a, n c)
        Dk = Dk.reshape(B, a * n, c)
        UW = None
        if gauge and k < d - 1:  # U_k (P_{k+1} Q_k): the batch in the rows of one product
            Wt = Q.mT @ L[k + 1]  # (P_{k+1} Q_k)^T: (B, c, c)
            UW = (Wt.reshape(B * c, c) @ U[k].reshape(a * n, c).mT).view(B, c, a * n).mT
        if out is not None:
            o = out[:, end - a * n * c:end].view(B, a * n, c)
            if UW is None:
                o.copy_(Dk)
            else:
                torch.sub(Dk, UW, out=o)
        else:
            pieces.append(Dk.flatten(1) if UW is None else (Dk - UW).flatten(1))  # (B may be 0)
        end -= a * n * c
        if k > 0:
            Q = (s.reshape(B * A, n * c) @ V[k].reshape(a, n * c).mT).view(B, A, a)
    if out is not None:
        return out
    return torch.cat(pieces[::-1], -1)


def _batched_gauge(runs, U_flat: torch.Tensor, g: torch.Tensor) -> bool:
    """The compiled gauge projection takes batches (a single point goes through
    ``autodiff``'s checked call, or stays on this torch code)."""
    return U_flat.dim() > 1 or g.dim() > 1


@kernels.dispatch("dense", compiled=compiled_dense.gauge_project_flat, when=_batched_gauge)
def gauge_project_flat(runs, U_flat: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g_k - U_k (U_k^T g_k)`` on the left unfoldings of the packed cores ``k < d``; the
    last core unchanged. ``runs``: ``(offset, m, rows, cols)`` per run of equal core shapes
    (cores ``0..d-2``), then the offset of the last core. One batched product pair per
    run; differentiable. Returns a new flat tensor.

    With leading batch dimensions (``U_flat`` and ``g`` broadcast): a single core is a
    batch of strided views (one product pair, as for one point); the cores of a run are not
    one stride apart across points, so a run is copied once (one stack of both operands)
    where it is small or launches dominate (:func:`prefer_fewer_launches`), and projected
    core by core on views otherwise (large, on the CPU: no copy). Cost O(size r) per point.
    """
    blocks, last = runs
    if U_flat.dim() > 1 or g.dim() > 1:  # leading batch dimensions (broadcast)
        bs = tuple(torch.broadcast_shapes(U_flat.shape[:-1], g.shape[:-1]))
        npts = math.prod(bs)
        U_flat = U_flat.expand(bs + U_flat.shape[-1:])
        g = g.expand(bs + g.shape[-1:])
        pieces = []
        for off, m, rows, cols in blocks:
            sz = m * rows * cols
            Ub, Gb = U_flat[..., off:off + sz], g[..., off:off + sz]
            numel = 2 * npts * sz
            if m > 1 and stack_pays(g.device, numel):
                # a run of several cores: in the packed layout (point, core) is no single
                # stride, so one copy of both makes them one batch of matrices (one
                # operation; the products would copy each operand otherwise)
                Ub, Gb = torch.stack([Ub, Gb]).view((2, npts * m, rows, cols)).unbind(0)
            elif m > 1:  # large, on the CPU: core by core on strided views, no copy
                # (measured 1.2-1.5x faster than copying at d = 10, r = 10, B = 256)
                for j in range(m):
                    o = j * rows * cols
                    Uj = Ub[..., o:o + rows * cols].reshape(npts, rows, cols)
                    Gj = Gb[..., o:o + rows * cols].reshape(npts, rows, cols)
                    out = torch.baddbmm(Gj, Uj, torch.bmm(Uj.mT, Gj), alpha=-1)
                    pieces.append(out.view(bs + (rows * cols,)))
                continue
            else:  # one core: (point) is a single stride, views
                Ub, Gb = Ub.reshape(npts, rows, cols), Gb.reshape(npts, rows, cols)
            out = torch.baddbmm(Gb, Ub, torch.bmm(Ub.mT, Gb), alpha=-1)
            pieces.append(out.view(bs + (sz,)))
        pieces.append(g[..., last:])
        return torch.cat(pieces, -1)
    pieces = []
    for off, m, rows, cols in blocks:
        sz = m * rows * cols
        if m == 1:
            Ub = U_flat[off:off + sz].view(rows, cols)
            Gb = g[off:off + sz].view(rows, cols)
            pieces.append(torch.addmm(Gb, Ub, Ub.transpose(0, 1) @ Gb, alpha=-1).reshape(-1))
            continue
        Ub = U_flat[off:off + sz].view(m, rows, cols)
        Gb = g[off:off + sz].view(m, rows, cols)
        pieces.append(torch.baddbmm(Gb, Ub, Ub.transpose(1, 2) @ Gb, alpha=-1).reshape(-1))
    pieces.append(g[last:])
    return torch.cat(pieces)


def gauge_deltas(U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
                 du: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Gauged deltas of the tangent vector with arbitrary deltas ``du``: the parts
    ``U_k (U_k^T dU_k)`` (k < d) move into core ``k + 1`` (through ``V_{k+1}``), so the
    tangent vector is unchanged (unlike the gauge projection, which drops them).

    Returns the ``d`` new delta cores. Cost O(d n r^3); differentiable.
    """
    du = list(du)
    for k in range(len(U) - 1):  # leading batch dimensions broadcast
        ra, n, rb = U[k].shape[-3:]
        ul = U[k].reshape(U[k].shape[:-3] + (ra * n, rb))
        dl = du[k].reshape(du[k].shape[:-3] + (ra * n, rb))
        a = ul.mT @ dl
        res = dl - ul @ a
        du[k] = res.reshape(res.shape[:-2] + (ra, n, rb))
        v = V[k + 1]
        va, vn, vb = v.shape[-3:]
        du[k + 1] = du[k + 1] + (a @ v.reshape(v.shape[:-3] + (va, vn * vb))).reshape(
            a.shape[:-2] + (va, vn, vb))
    return du


def project_dense(U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
                  Z: torch.Tensor) -> List[torch.Tensor]:
    """``D_k = U_<k^T Z V_>k^T`` for a dense tensor ``Z`` of the point's shape (before the
    gauge projection): one left sweep over ``Z`` and the right interfaces as dense
    ``(r_k, n_{k+1} ... n_d)`` matrices. Cost O(n^d r); differentiable. With leading batch
    dimensions on the cores and/or ``Z`` (``(*B, n_1, ..., n_d)``; broadcast), one
    projection per point."""
    d = len(U)
    if U[0].dim() > 3 or Z.dim() > d:
        return _project_dense_batched(U, V, Z)
    shape = [int(u.shape[1]) for u in U]
    right = [None] * d
    right[d - 1] = Z.new_ones(1, 1)
    for k in range(d - 1, 0, -1):
        v = V[k]
        right[k - 1] = (v.reshape(-1, v.shape[2]) @ right[k]).reshape(v.shape[0], -1)
    D = []
    left = Z.reshape(1, -1)  # U_{<k}^T Z as (r_{k-1}, n_k ... n_d)
    for k in range(d):
        lk = left.reshape(U[k].shape[0] * shape[k], -1)
        D.append((lk @ right[k].transpose(0, 1)).reshape(U[k].shape))
        if k < d - 1:
            u = U[k]
            left = u.reshape(-1, u.shape[2]).transpose(0, 1) @ lk
    return D


def _project_dense_batched(U, V, Z):
    """:func:`project_dense` with leading batch dimensions (broadcast between the cores and
    ``Z``), every product batched."""
    d = len(U)
    shape = tuple(int(u.shape[-2]) for u in U)
    bs = tuple(torch.broadcast_shapes(U[0].shape[:-3], Z.shape[:Z.dim() - d]))
    U = [u.expand(bs + u.shape[-3:]) for u in U]
    V = [None] + [v.expand(bs + v.shape[-3:]) for v in V[1:]]
    right: List[Optional[torch.Tensor]] = [None] * d
    right[d - 1] = Z.new_ones(bs + (1, 1))
    for k in range(d - 1, 0, -1):
        a, n, b = V[k].shape[-3:]
        t = V[k].reshape(bs + (a * n, b)) @ right[k]
        right[k - 1] = t.reshape(bs + (a, n * t.shape[-1]))
    total = 1
    for n in shape:
        total *= n
    left = Z.expand(bs + shape).reshape(bs + (1, total))
    D = []
    for k in range(d):
        a, n, b = U[k].shape[-3:]
        lk = left.reshape(bs + (a * n, left.shape[-1] // n))
        D.append((lk @ right[k].mT).reshape(bs + (a, n, b)))
        if k < d - 1:
            left = U[k].reshape(bs + (a * n, b)).mT @ lk
    return D


def project_sampled(U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
                    index_set: IndexSet, values: torch.Tensor) -> List[torch.Tensor]:
    """``D_k`` of the projection of the sparse tensor with ``values`` at ``index_set``
    (before the gauge projection). Without autograd: the blocked (or compiled) kernels of
    the index set; otherwise the per-mode kernels, differentiable in ``values``, ``U``
    and ``V``. Cost O(N d r^2)."""
    d = len(U)
    grad = torch.is_grad_enabled() and (
        values.requires_grad or any(u.requires_grad for u in U)
        or any(v is not None and v.requires_grad for v in V))
    if not grad and values.device.type != "meta":
        with torch.no_grad():
            return index_set.project(U, V, values)
    left = index_set.left_vectors(U)
    rights = [None] * d
    rights[d - 1] = values.new_ones(len(index_set), 1)
    for k in range(d - 1, 0, -1):
        rights[k - 1] = index_set.right_step(k, rights[k], V[k])
    return [index_set.scatter(k, left[k] * values.unsqueeze(1), rights[k]) for k in range(d)]


def orth_defect(U: Sequence[torch.Tensor]) -> torch.Tensor:
    """``max_k ||U_k^T U_k - I||_max`` over the left unfoldings of cores ``k < d`` (a 0-d
    tensor on the cores' device, or one value per point for cores with leading batch
    dimensions ``B``: shape ``B``; no host sync). O(d n r^3) per point. A few operations
    per run of equal core shapes (stack, Gram minus identity, max-norm), not six per core:
    :meth:`~ttmanifold.FixedTTRank.projx` runs it on every optimizer step."""
    bs = tuple(U[-1].shape[:-3])
    nb = len(bs)
    out: Optional[torch.Tensor] = None
    eyes = {}
    for k0, k1 in core_runs([tuple(u.shape[-3:]) for u in U[:-1]]):
        a, n, b = U[k0].shape[-3:]
        ul = (U[k0].unsqueeze(nb) if k1 - k0 == 1 else torch.stack(list(U[k0:k1]), nb))
        ul = ul.reshape(bs + (k1 - k0, a * n, b))
        if b not in eyes:
            eyes[b] = torch.eye(b, dtype=ul.dtype, device=ul.device)
        # U^T U - I in one fused product, the batch's leading dimensions flattened
        g = torch.baddbmm(eyes[b], _lead_flat(ul.mT), _lead_flat(ul), beta=-1)
        g = g.view(ul.shape[:-2] + (b, b))
        # (an empty batch: zeros; the meta kernel of the inf-norm refuses it)
        e = (torch.linalg.vector_norm(g, float("inf"), dim=(-3, -2, -1)) if g.numel()
             else g.new_zeros(g.shape[:-3]))
        out = e if out is None else torch.maximum(out, e)
    return U[-1].new_zeros(bs) if out is None else out
