"""Tangent vectors of the fixed-TT-rank manifold as structured TTs, and the sweeps behind
the tangent-space projection (Riemannian autodiff, ``../shared/MATH.md`` section 2).

A tangent vector at ``X`` (left-orthogonal cores ``U_k``, right-orthogonal cores ``V_k``)
is ``xi = sum_k U_<k dU_k V_>k``; as a TT it has rank ``2r`` and block cores
``[dU_1, U_1]``, ``[[V_k, 0], [dU_k, U_k]]``, ``[[V_d], [dU_d]]``.
:class:`TangentTT` keeps the factors ``(U, V, dU)`` and builds those block cores only when
an operation needs them, so that the operations which know the structure run at rank r:

- ``inner(xi, eta)`` of two gauged tangent TTs of one point is ``sum_k <dU_k, dV_k>``
  (the tangent map is an isometry), O(d n r^2) instead of O(d n r^3) at rank 2r;
- ``inner(xi, A)`` with any other TT ``A`` of rank R is ``sum_k <dU_k, P_k A_k Q_k>``
  with the interfaces ``P_k = U_<k^T A_<k`` and ``Q_k = A_>k V_>k^T`` (the projection
  sweeps, O(d n r R (r + R))), instead of a rank-2r by rank-R sweep and its backward;
- ``norm`` of a gauged tangent TT is the norm of its packed deltas; ``a * xi`` stays
  structured;
- :meth:`IndexSet.gather <ttmanifold.IndexSet.gather>` (entries at sampled indices, the
  tensor-completion loss) uses the left vectors of ``U`` and the right vectors of ``V`` at
  rank r and one grouped product per block of modes with the deltas, when gradients are
  needed (the kernels of one Riemannian CG iteration: forward = sweeps + tangent values,
  backward = the scatter).

Everything else (``full``, ``gather``, ``+`` with a plain TT, ...) uses the rank-2r block
cores. All of it is differentiable (autograd) in the deltas and in the other operand.

The Riemannian gradient of a loss ``f(TT)`` built from ``inner``/``norm`` (e.g.
``0.5 ||X - A||^2`` written with inner products, or any quadratic form in X given by TTs)
therefore costs about one tangent-space projection, no matter that ``f`` is evaluated at
the rank-2r TT of the autodiff scheme; a loss of sampled entries costs about what one
Riemannian CG iteration of tensor completion costs.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import _native
from .tt import TT

__all__ = ["TangentTT", "core_runs", "right_sweep", "right_cores", "project_D",
           "gauge_project_flat"]


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
    fix all signs at the end, batched (:func:`right_cores`, :func:`project_D`)."""
    c = U[-1]
    for k in range(len(U) - 1, 0, -1):
        q, r = torch.linalg.qr(c.reshape(c.shape[0], -1).transpose(0, 1))
        yield k, q, r
        if k > 1:
            prv = U[k - 1]
            c = (prv.reshape(-1, prv.shape[2]) @ r.transpose(0, 1)).reshape(prv.shape)


def _signs(dg: Sequence[torch.Tensor]) -> torch.Tensor:
    """``copysign(1, .)`` of the concatenated diagonals (one kernel each way)."""
    g = torch.cat(list(dg)) if len(dg) > 1 else dg[0]
    return torch.ones_like(g).copysign_(g)


def right_cores(U: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """The right-orthogonal cores ``V_1..V_{d-1}`` (``V[0]`` is None) of the TT with
    left-orthogonal cores ``U``, in the canonical gauge ``diag(L_k) >= 0``, computed by the
    unsigned sweep :func:`right_sweep` and one batched sign fix per run of equal core shapes
    (instead of four small kernels per core).
    No inversion; O(d n r^3). On the CPU without autograd, the compiled sweep of
    :func:`ttmanifold._native.get_dense` (the same LAPACK calls, bitwise equal) when built."""
    d = len(U)
    V: List[Optional[torch.Tensor]] = [None] * d
    if d == 1:
        return V
    if _native.dense_usable(U):
        V = list(_native.get_dense().right_cores([u.contiguous() for u in U]))
        V[0] = None
        return V
    Q: List[Optional[torch.Tensor]] = [None] * d
    dg: List[Optional[torch.Tensor]] = [None] * d
    for k, q, r in right_sweep(U):
        Q[k], dg[k] = q, torch.diagonal(r)
    S = _signs(dg[1:]).split([g.shape[0] for g in dg[1:]])  # S[k-1]: signs of bond k-1
    for k0, k1 in core_runs([tuple(U[k].shape) + (k == d - 1,) for k in range(1, d)]):
        k0, k1 = k0 + 1, k1 + 1
        a, n, b = U[k0].shape
        if k1 - k0 == 1:
            q = Q[k0].reshape(n, b, a)
            q = q * S[k0 - 1] if k0 == d - 1 else q * S[k0 - 1] * S[k0].unsqueeze(1)
            V[k0] = q.permute(2, 0, 1).contiguous()
            continue
        q = torch.stack(Q[k0:k1]).reshape(k1 - k0, n, b, a)
        rs = torch.stack(S[k0 - 1:k1 - 1]).unsqueeze(1).unsqueeze(1)  # (m, 1, 1, a)
        cs = torch.stack(S[k0:k1]).unsqueeze(1).unsqueeze(3)  # (m, 1, b, 1)
        V[k0:k1] = (q * rs * cs).permute(0, 3, 1, 2).contiguous().unbind(0)
    return V


def project_D(U: Sequence[torch.Tensor], V: Optional[Sequence[Optional[torch.Tensor]]],
              Z: Sequence[torch.Tensor], *, packed: bool = False, gauge: bool = False):
    """``D_k = U_<k^T Z V_>k^T`` (cores of shape ``U[k].shape``) for a TT ``Z``.

    ``U``: left-orthogonal cores of the point; ``V``: its right-orthogonal cores
    (``V[0]`` unused), or None to compute them here (the unsigned :func:`right_sweep`,
    interleaved with the right interface sweep below, signs fixed per run at the end).

    On the CPU without autograd and with ``packed=True`` this runs the compiled sweeps of
    :func:`ttmanifold._native.get_dense` (the same products, direct BLAS/LAPACK calls) once
    they are built.

    Left sweep ``t_k = P_k Z_k`` with ``P_k = U_<k^T Z_<k`` (``r_{k-1} x R_{k-1}``), right
    sweep ``Q_k = Z_>k V_>k^T`` (``R_k x r_k``), then ``D_k = t_k Q_k``, batched over runs
    of cores of equal shapes. Cost O(d n r R (r + R)); differentiable. Returns the list of
    cores, or with ``packed=True`` one flat tensor (cores concatenated).

    ``gauge=True`` returns the gauge-projected ``D_k - U_k (U_k^T D_k)`` (k < d) instead, at
    almost no extra cost: ``U_k^T t_k = P_{k+1}`` is a product of the left sweep, so the
    projection is ``(t_k - U_k P_{k+1}) Q_k``, one batched product per run.
    """
    d = len(U)
    if packed and _native.dense_usable(U, Z, [v for v in (V or []) if v is not None]):
        mod = _native.get_dense()
        Uc = [u.contiguous() for u in U]
        Vc = mod.right_cores(Uc) if V is None else (
            [U[0].new_empty(0)] + [v.contiguous() for v in V[1:]])
        return mod.project(Uc, list(Vc), [z.contiguous() for z in Z], bool(gauge))
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
    # interfaces are Q'_k = Q_k S_{k+1}, fixed below with one product per run
    sweep = right_sweep(U) if V is None else None
    dg: List[torch.Tensor] = []
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
    S: Optional[List[torch.Tensor]] = None
    if sweep is not None and dg:
        S = list(_signs(dg[::-1]).split([g.shape[0] for g in dg[::-1]]))  # S[k]: bond k
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
            if S is not None:
                qs = qs * torch.stack(S[k0:k1]).unsqueeze(1)
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


def gauge_project_flat(runs, U_flat: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g_k - U_k (U_k^T g_k)`` on the left unfoldings of the packed cores ``k < d``; the
    last core unchanged. ``runs``: ``(offset, m, rows, cols)`` per run of equal core shapes
    (cores ``0..d-2``), then the offset of the last core. One batched product pair per
    run; differentiable. Returns a new flat tensor."""
    blocks, last = runs
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


class TangentTT(TT):
    """The rank-2r TT of a tangent vector ``sum_k U_<k dU_k V_>k``, kept as its factors.

    Built by :class:`~ttmanifold.FixedTTRank` (``unpack_tensor``, ``riemannian_grad``,
    ``tangent_to_tt``); it is a :class:`~ttmanifold.TT` (shape, ranks ``2r``, cores), and
    :func:`~ttmanifold.inner`, :meth:`norm` and scalar multiples use the structure (see
    the module docstring). ``gauged=True`` promises that the deltas satisfy the gauge
    conditions ``(U_k^L)^T dU_k^L = 0`` (k < d) in value, and that gradients with respect
    to them are used only after the gauge projection (as the manifold does); then inner
    products of two such TTs of one point reduce to the packed deltas.
    """

    __slots__ = ("_U", "_V", "_deltas", "_flat", "_gauged", "_dense")

    def __init__(self, U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
                 deltas: Sequence[torch.Tensor], *, flat: Optional[torch.Tensor] = None,
                 gauged: bool = False, check: bool = True):
        if len(U) < 2:
            raise ValueError("TangentTT needs d >= 2 cores")
        if check:
            _check_factors(U, V, deltas)
        self._U = U
        self._V = V
        self._deltas = list(deltas)
        self._flat = flat
        self._gauged = bool(gauged)
        self._dense: Optional[List[torch.Tensor]] = None

    def __reduce__(self):  # copy / deepcopy / pickle (deltas stay views of the flat tensor)
        if self._flat is not None:
            return (_rebuild_tangent, (list(self._U), list(self._V), None, self._flat, self._gauged))
        return (_rebuild_tangent, (list(self._U), list(self._V), self._deltas, None, self._gauged))

    # the block cores, built on first use ----------------------------------------------
    @property
    def _cores(self) -> List[torch.Tensor]:  # type: ignore[override]
        if self._dense is None:
            self._dense = self._block_cores()
        return self._dense

    def _block_cores(self) -> List[torch.Tensor]:
        U, V, dU = self._U, self._V, self._deltas
        d = len(U)
        cores = [torch.cat([dU[0], U[0]], dim=2)]
        for k in range(1, d - 1):
            a, n, b = V[k].shape
            c = U[k].new_zeros(a + U[k].shape[0], n, b + U[k].shape[2])
            c[:a, :, :b] = V[k]
            c[a:, :, :b] = dU[k]
            c[a:, :, b:] = U[k]
            cores.append(c)
        cores.append(torch.cat([V[d - 1], dU[d - 1]], dim=0))
        return cores

    # metadata without building the cores ----------------------------------------------
    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(int(u.shape[1]) for u in self._U)

    @property
    def ranks(self) -> Tuple[int, ...]:
        return (1,) + tuple(2 * int(u.shape[2]) for u in self._U[:-1]) + (1,)

    @property
    def ndim(self) -> int:
        return len(self._U)

    @property
    def dtype(self) -> torch.dtype:
        return self._U[0].dtype

    @property
    def device(self) -> torch.device:
        return self._U[0].device

    @property
    def requires_grad(self) -> bool:
        return any(c.requires_grad for c in self._deltas) or any(u.requires_grad for u in self._U)

    @property
    def deltas(self) -> List[torch.Tensor]:
        """The delta cores ``dU_k`` (shapes of the point's cores)."""
        return list(self._deltas)

    def __repr__(self) -> str:
        return "Tangent" + super().__repr__()

    # structure-aware operations -------------------------------------------------------
    def _same_gauged_point(self, other) -> bool:
        return (isinstance(other, TangentTT) and self._gauged and other._gauged
                and (other._U is self._U or all(a is b for a, b in zip(other._U, self._U))))

    def _delta_dot(self, other: "TangentTT") -> torch.Tensor:
        if self._flat is not None and other._flat is not None:
            return torch.dot(self._flat, other._flat)
        return sum((a * b).sum() for a, b in zip(self._deltas, other._deltas))

    def _inner_special(self, other: TT) -> Optional[torch.Tensor]:
        if self._same_gauged_point(other):
            return self._delta_dot(other)
        if self._flat is not None:
            return torch.dot(self._flat, project_D(self._U, self._V, other._cores, packed=True))
        D = project_D(self._U, self._V, other._cores)
        return sum((a * b).sum() for a, b in zip(self._deltas, D))

    def norm(self) -> torch.Tensor:
        """Frobenius norm; for a gauged tangent TT, the norm of the deltas."""
        if not self._gauged:
            return super().norm()
        if self._flat is not None:
            return torch.linalg.vector_norm(self._flat)
        return torch.linalg.vector_norm(torch.cat([c.reshape(-1) for c in self._deltas]))

    def _scale(self, a) -> TT:
        flat = None if self._flat is None else self._flat * a
        if flat is not None:
            sizes = [c.numel() for c in self._deltas]
            deltas = [c.view(s.shape) for c, s in zip(torch.split(flat, sizes), self._deltas)]
        else:
            deltas = [c * a for c in self._deltas]
        return TangentTT(self._U, self._V, deltas, flat=flat, gauged=self._gauged, check=False)


def _rebuild_tangent(U, V, deltas, flat, gauged):
    if deltas is None:
        sizes = [u.numel() for u in U]
        deltas = [c.view(u.shape) for c, u in zip(torch.split(flat, sizes), U)]
    return TangentTT(U, V, deltas, flat=flat, gauged=gauged, check=False)


def _check_factors(U, V, deltas) -> None:
    """U: TT cores (left-orthogonal for the meaning), V: cores of the same shapes from
    index 1 on (V[0] unused, may be None), deltas: cores of U's shapes; one dtype/device."""
    d = len(U)
    if len(V) != d or len(deltas) != d:
        raise ValueError(f"TangentTT: expected {d} cores in U, V and deltas, got "
                         f"{len(U)}, {len(V)} and {len(deltas)}")
    ref = U[0]
    for name, cores, first in (("U", U, 0), ("V", V, 1), ("deltas", deltas, 0)):
        for k in range(first, d):
            c = cores[k]
            if not isinstance(c, torch.Tensor) or c.dim() != 3:
                raise ValueError(f"TangentTT: {name}[{k}] must be a 3-D tensor")
            if tuple(c.shape) != tuple(U[k].shape):
                raise ValueError(f"TangentTT: {name}[{k}] has shape {tuple(c.shape)}, "
                                 f"expected U[{k}]'s {tuple(U[k].shape)}")
            if c.dtype != ref.dtype or c.device != ref.device:
                raise TypeError(f"TangentTT: {name}[{k}] is {c.dtype} on {c.device}, "
                                f"expected {ref.dtype} on {ref.device}")
    if U[0].shape[0] != 1 or U[-1].shape[2] != 1 or any(
            U[k].shape[2] != U[k + 1].shape[0] for k in range(d - 1)):
        raise ValueError("TangentTT: U's ranks must chain with r_0 = r_d = 1")
