"""The manifold of tensors of fixed TT-rank, as a :class:`geoopt.Manifold`.

``M_r = {X of shape (n_1..n_d) : TT-rank(X) = r}`` is a smooth embedded submanifold of
dimension ``sum_k r_{k-1} n_k r_k - sum_{k<d} r_k^2`` (Holtz, Rohwedder, Schneider 2012).
Formulas and costs: ``../shared/MATH.md`` sections 2 and 5.

Representation (what geoopt stores in a :class:`geoopt.ManifoldParameter`):

- a **point** ``p`` is one flat tensor of ``sum_k r_{k-1} n_k r_k`` entries packing the cores
  ``U_1..U_d`` of X in left-orthogonal form (``U_k^L`` orthonormal columns for ``k < d``,
  the norm in ``U_d``);
- a **tangent vector** at p is a flat tensor of the same size packing delta cores
  ``dU_1..dU_d``, representing ``xi = sum_k U_1..U_{k-1} dU_k V_{k+1}..V_d`` where ``V_k``
  are right-orthogonal cores of the same X. Under the gauge conditions
  ``(U_k^L)^T dU_k^L = 0`` (``k < d``) the deltas are unique and the map is an isometry, so
  the Riemannian metric is the Euclidean inner product of packed gauged deltas.
  :meth:`FixedTTRank.retr` and :meth:`FixedTTRank.transp` also accept non-gauged deltas
  (they represent the tangent vector given by the formula above).

The gradient path: :meth:`FixedTTRank.unpack_tensor` returns a TT whose value is X and
whose gradient with respect to ``p`` is the packed, gauge-projected
``D_k = X_{<k}^T (df/dX) X_{>k}^T`` (the Riemannian autodiff of Novikov, Rakhuba and
Oseledets 2021). So after ``loss(M.unpack_tensor(p)).backward()``, ``p.grad`` already is
the Riemannian gradient, and :meth:`FixedTTRank.egrad2rgrad` (a gauge projection) leaves
it unchanged (it is still applied by geoopt, e.g. after weight decay). No interface matrix
is ever inverted, so this is accurate in float32 at badly conditioned points.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Sequence

import geoopt
import torch

from . import _native
from ._checks import check_float_dtype, check_shape, normalize_ranks
from .sparse import IndexSet
from .tangent import (TangentTT, core_runs, gauge_project_flat, project_D, right_cores,
                      right_sweep)
from .tt import TT, orthogonalize, qr_pos

__all__ = ["FixedTTRank"]


def _all_finite(u: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: no NaN or Inf in ``u``. ``sum(0 * u)`` is 0 for finite entries and
    NaN as soon as one entry is NaN or +-Inf (``0 * inf = nan``); two passes over ``u``
    instead of the four of ``isfinite(u).all()``, and no overflow (every term is 0)."""
    return torch.isfinite((u * 0).sum())


def _needs_grad(a) -> bool:
    return isinstance(a, (torch.Tensor, TT)) and a.requires_grad


def _no_autograd_fast_path(fn):
    """Run ``fn`` under ``torch.inference_mode`` when no gradient can flow through it
    (grad mode off, or no argument requires grad), then return ordinary tensors (one
    copy of each output). Skipping autograd and version-counter bookkeeping saves about
    10-15 % of these overhead-bound small-matrix sweeps; with gradients the plain
    (differentiable) path runs."""

    @functools.wraps(fn)
    def wrapper(self, *args):
        if torch.is_inference_mode_enabled() or (
                torch.is_grad_enabled() and any(_needs_grad(a) for a in args)):
            return fn(self, *args)
        with torch.inference_mode():
            out = fn(self, *args)
        if isinstance(out, tuple):
            return tuple(o.clone() for o in out)
        return out.clone()

    return wrapper


class _DeltaFromPoint(torch.autograd.Function):
    """The packed deltas ``(0, ..., 0, U_d)`` of the point ``p`` (value X), with the
    gradient path of ``dU_k = p_k - p_k.detach()``: the incoming gradient, gauge
    projected on the cores ``k < d``, goes to ``p``."""

    @staticmethod
    def forward(ctx, p, runs):
        ctx.runs = runs
        ctx.save_for_backward(p)
        out = torch.zeros_like(p)
        last = runs[1]
        out[last:] = p[last:]
        return out

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return gauge_project_flat(ctx.runs, p.detach(), g), None


class FixedTTRank(geoopt.Manifold):
    """The manifold of tensors of shape ``shape`` with TT-rank exactly ``ranks``.

    Parameters
    ----------
    shape : sequence of ints ``(n_1, ..., n_d)``
    ranks : int, or ``d - 1`` inner ranks, or ``d + 1`` ranks with ``r_0 = r_d = 1``.
        Infeasible ranks (``r_k > min(n_1..n_k, n_{k+1}..n_d)``) raise ``ValueError``.

    Attributes
    ----------
    shape, ranks, d, dim (manifold dimension), size (packed length),
    core_shapes, name = "FixedTTRank", ndim = 1, reversible = False.

    Costs below: ``n = max n_k``, ``r = max r_k``; every method is O(d n r^3) or better
    unless stated, and no method forms the dense tensor (except :meth:`project` of a dense
    ``Z``, which must read it).
    """

    name = "FixedTTRank"
    ndim = 1
    reversible = False

    def __init__(self, shape: Sequence[int], ranks):
        super().__init__()
        self.shape = check_shape(shape)
        if isinstance(ranks, (list, tuple)) and len(ranks) not in (len(self.shape) - 1,
                                                                    len(self.shape) + 1):
            raise ValueError(
                f"ranks: expected {len(self.shape) - 1} inner ranks or {len(self.shape) + 1} "
                f"ranks for shape {self.shape}, got {len(ranks)}"
            )
        self.ranks = normalize_ranks(self.shape, ranks, clip=False)
        self.d = len(self.shape)
        # Within the feasible bound, neighbouring ranks must also be attainable
        # (r_k <= r_{k-1} n_k and r_k <= n_{k+1} r_{k+1}); otherwise M_r is empty.
        for k in range(1, self.d):
            r, lo, hi = self.ranks[k], self.ranks[k - 1] * self.shape[k - 1], \
                self.shape[k] * self.ranks[k + 1]
            if r > lo or r > hi:
                raise ValueError(
                    f"ranks: {self.ranks} cannot be attained by shape {self.shape}: r_{k} = {r} "
                    f"exceeds r_{k - 1} n_{k} = {lo} or n_{k + 1} r_{k + 1} = {hi}, so no "
                    f"tensor has exactly these TT-ranks"
                )
        self.core_shapes = [(self.ranks[k], n, self.ranks[k + 1]) for k, n in enumerate(self.shape)]
        self._sizes = [a * b * c for a, b, c in self.core_shapes]
        offsets = [0]
        for sz in self._sizes:
            offsets.append(offsets[-1] + sz)
        # runs of equal core shapes among cores 0..d-2 for the batched gauge projection
        self._gauge_runs = (
            [(offsets[k0], k1 - k0, self.core_shapes[k0][0] * self.core_shapes[k0][1],
              self.core_shapes[k0][2]) for k0, k1 in core_runs(self.core_shapes[:-1])],
            offsets[-2],
        )
        self.size = sum(self._sizes)
        self.dim = self.size - sum(r * r for r in self.ranks[1:-1])

    def extra_repr(self) -> str:
        return f"shape={self.shape}, ranks={self.ranks}, dim={self.dim}"

    # ------------------------------------------------------------------------------------
    # packing
    # ------------------------------------------------------------------------------------
    @property
    def core_sizes(self) -> List[int]:
        """Number of entries of each core in the packed layout (``r_{k-1} n_k r_k``)."""
        return list(self._sizes)

    def split(self, x: torch.Tensor, name: str = "x") -> List[torch.Tensor]:
        """Views of the ``d`` cores (or deltas) packed in the flat tensor ``x`` (no copy);
        ``name`` is the argument named in errors."""
        return self._split(x, name)

    def point_as_tangent(self, p: torch.Tensor) -> torch.Tensor:
        """The point X itself as a tangent vector at ``p``: packed gauged deltas
        ``(0, ..., 0, U_d)``. O(size)."""
        self._check_flat(p, "p")
        out = torch.zeros_like(p)
        out[-self._sizes[-1]:] = p[-self._sizes[-1]:]
        return out

    def _split(self, x: torch.Tensor, name: str = "x") -> List[torch.Tensor]:
        self._check_flat(x, name)
        return [c.view(s) for c, s in zip(torch.split(x, self._sizes), self.core_shapes)]

    def _check_flat(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a packed torch.Tensor of size {self.size}")
        if x.dim() != 1 or x.shape[0] != self.size:
            raise ValueError(
                f"{name}: expected a flat tensor of size {self.size} (packed cores of shapes "
                f"{self.core_shapes}), got shape {tuple(x.shape)}"
            )
        check_float_dtype(x.dtype, name)

    @staticmethod
    def _cat(cores: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([c.reshape(-1) for c in cores])

    def pack_point(self, *tensors) -> torch.Tensor:
        """Pack a :class:`TT` (or its cores) into a point.

        The TT is brought to left-orthogonal form (QR sweep, ``diag(R) >= 0``). A TT of
        higher ranks is first rounded to the manifold's ranks; lower ranks or another
        shape raise ``ValueError``. Cost O(d n r^3).
        """
        if len(tensors) == 1 and isinstance(tensors[0], TT):
            x = tensors[0]
        elif len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
            x = TT(tensors[0])
        else:
            x = TT(list(tensors))
        if x.shape != self.shape:
            raise ValueError(f"tt: shape {x.shape} differs from the manifold's {self.shape}")
        if x.ranks != self.ranks:
            if any(a < b for a, b in zip(x.ranks, self.ranks)):
                raise ValueError(
                    f"tt: ranks {x.ranks} are below the manifold's {self.ranks}; such a TT is "
                    f"not a point of M_r"
                )
            from .tt import round as tt_round

            x = tt_round(x, ranks=self.ranks)
        x = orthogonalize(x, "left")
        return self._cat(x.cores)

    def to_tt(self, p: torch.Tensor) -> TT:
        """The rank-r TT of a point (a view of its cores; no copy)."""
        return TT(self._split(p, "p"), check=False)

    def unpack_tensor(self, p: torch.Tensor) -> TT:
        """The TT of a point, to be used in a differentiable loss (the gradient path).

        When ``p`` requires grad (and grad mode is on) the result is the rank-2r TT
        ``sum_k U_<k delta_k V_>k`` evaluated at ``delta = (0, ..., 0, U_d)`` (its value is
        X) with ``delta_k`` tied to ``p``'s k-th core: backpropagating a loss ``f`` gives
        ``p.grad`` = packed gauge-projected ``X_{<k}^T grad f X_{>k}^T``, the Riemannian
        gradient in this manifold's tangent representation. The result is a
        :class:`~ttmanifold.tangent.TangentTT`: ``inner`` with itself is the dot product
        of the packed deltas, ``inner`` with a TT of rank R one projection sweep
        (O(d n r R (r + R))), ``norm`` and scalar multiples stay structured; any other
        operation runs on the rank-2r block cores (about 4x the rank-r cost of a sweep,
        8x for terms cubic in the rank). Plus one LQ sweep (O(d n r^3)). Otherwise (no
        gradient needed, or d = 1) the plain rank-r TT is returned.
        """
        cores = self._split(p, "p")
        if not (torch.is_grad_enabled() and p.requires_grad) or self.d == 1:
            return TT(cores, check=False)
        U = [c.detach() for c in cores]
        V = self._right_cores(U)
        flat = _DeltaFromPoint.apply(p, self._gauge_runs)
        return TangentTT(U, V, self._split(flat, "p"), flat=flat, gauged=True, check=False)

    # ------------------------------------------------------------------------------------
    # internal helpers
    # ------------------------------------------------------------------------------------
    def _right_cores(self, U: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Right-orthogonal cores V_2..V_d of the TT with left-orthogonal cores U (LQ
        sweep, no inversion). V[0] is None."""
        return right_cores(U)

    def _tangent_tt(self, U, V, deltas, *, add_point: bool, gauged: bool = False) -> TT:
        """The rank-2r TT of ``sum_k U_<k delta_k V_>k`` (plus X if ``add_point``), as a
        :class:`~ttmanifold.tangent.TangentTT` (a plain TT for d = 1)."""
        deltas = list(deltas)
        if add_point:
            deltas[-1] = deltas[-1] + U[-1]
        if self.d == 1:
            return TT(deltas, check=False)
        return TangentTT(U, V, deltas, gauged=gauged, check=False)

    def _gauge_packed(self, x: torch.Tensor, D) -> torch.Tensor:
        """Packed gauge projection of ``D`` (a flat tensor or a list of cores) at the
        packed point ``x`` (batched over runs of equal core shapes)."""
        if not isinstance(D, torch.Tensor):
            D = self._cat(D)
        if self.d == 1:
            return D.clone()
        return gauge_project_flat(self._gauge_runs, x, D)

    def _check_vector(self, u: torch.Tensor, p: torch.Tensor, name: str = "u") -> List[torch.Tensor]:
        parts = self._split(u, name)
        if u.dtype != p.dtype:
            raise TypeError(f"{name}: dtype {u.dtype} differs from the point's {p.dtype}")
        if u.device != p.device:
            raise ValueError(f"{name}: device {u.device} differs from the point's {p.device}")
        return parts

    # ------------------------------------------------------------------------------------
    # projections
    # ------------------------------------------------------------------------------------
    @_no_autograd_fast_path
    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Gauge projection: ``dU_k - U_k (U_k^T dU_k)`` for ``k < d``. O(d n r^2).

        Applied to packed ``D_k`` (the adjoint of the delta map applied to an ambient
        gradient), it returns the Riemannian gradient; on a gauged tangent vector it is the
        identity. Returns a new tensor.
        """
        self._split(x, "x")
        self._check_vector(u, x)
        return self._gauge_packed(x, u)

    @_no_autograd_fast_path
    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Riemannian gradient from ``p.grad`` as produced through :meth:`unpack_tensor`
        (the gauge projection :meth:`proju`; never an alias of ``u``).

        Non-finite gradients raise ``RuntimeError`` ("u: gradient contains NaN or Inf")
        through ``torch._assert_async``: no host sync, asynchronous on CUDA."""
        self._split(u, "u")
        if u.device.type != "meta":
            torch._assert_async(_all_finite(u), "u: gradient contains NaN or Inf")
        return self.proju(x, u)

    def project(self, p: torch.Tensor, Z) -> torch.Tensor:
        """Orthogonal projection of an ambient tensor onto the tangent space at ``p``.

        ``Z``: a dense tensor of the manifold's shape (cost O(n^d r)), a :class:`TT` of rank
        R (O(d n r R (r + R))) or a ``torch.sparse_coo_tensor`` of the manifold's shape with
        N stored entries (O(N d r^2); duplicates are summed; for repeated projections on one
        sampling pattern use :meth:`project_sampled` with a reusable
        :class:`~ttmanifold.IndexSet`). Returns packed gauged deltas.
        """
        self._check_flat(p, "p")
        if isinstance(Z, TT):
            self._check_ambient(Z, p, "Z")
            return self._project_nonsparse(p, Z)
        if isinstance(Z, torch.Tensor) and Z.is_sparse:
            if tuple(Z.shape) != self.shape:
                raise ValueError(f"Z: sparse shape {tuple(Z.shape)} differs from {self.shape}")
            if Z.layout != torch.sparse_coo or Z.sparse_dim() != self.d:
                raise ValueError(
                    f"Z: expected a torch.sparse_coo_tensor with all {self.d} dimensions sparse "
                    f"(no hybrid dense dimensions), got layout {Z.layout} with sparse_dim "
                    f"{Z.sparse_dim() if Z.layout == torch.sparse_coo else 'n/a'}"
                )
            self._check_ambient(Z, p, "Z")
            idx = IndexSet.from_sparse(Z)
            return self.project_sampled(p, idx, Z._values())
        if isinstance(Z, torch.Tensor):
            if tuple(Z.shape) != self.shape:
                raise ValueError(f"Z: shape {tuple(Z.shape)} differs from the manifold's {self.shape}")
            self._check_ambient(Z, p, "Z")
            return self._project_nonsparse(p, Z)
        raise TypeError(f"Z: expected a dense tensor, a TT or a sparse COO tensor, got "
                        f"{type(Z).__name__}")

    @_no_autograd_fast_path
    def _project_nonsparse(self, p: torch.Tensor, Z) -> torch.Tensor:
        U = self._split(p, "p")
        if isinstance(Z, TT):
            return project_D(U, None, Z._cores, packed=True, gauge=True)
        return self._gauge_packed(p, self._project_dense_D(U, self._right_cores(U), Z))

    def _check_ambient(self, Z, p, name):
        if Z.dtype != p.dtype:
            raise TypeError(f"{name}: dtype {Z.dtype} differs from the point's {p.dtype}")
        if Z.device != p.device:
            raise ValueError(f"{name}: device {Z.device} differs from the point's {p.device}")
        if isinstance(Z, TT) and Z.shape != self.shape:
            raise ValueError(f"{name}: shape {Z.shape} differs from the manifold's {self.shape}")

    def project_sampled(self, p: torch.Tensor, index_set: IndexSet, values: torch.Tensor,
                        *, V=None) -> torch.Tensor:
        """Projection of the sparse tensor with ``values`` at ``index_set``. O(N d r^2)."""
        U = self._split(p, "p")
        if values.shape != (len(index_set),):
            raise ValueError(f"values: expected shape ({len(index_set)},), got {tuple(values.shape)}")
        if tuple(index_set.shape) != self.shape:
            raise ValueError(f"index_set: shape {index_set.shape} differs from {self.shape}")
        V = self._right_cores(U) if V is None else V
        return self._gauge_packed(p, self._project_sparse_D(U, V, index_set, values))

    def _project_sparse_D(self, U, V, index_set, values, left=None):
        """``D_k`` of the projection of the sparse tensor (before the gauge projection).

        Without ``left`` (per-sample left vectors in sample order) and without autograd:
        the blocked layouts of the index set with reused buffers, the values folded into
        the right sweep (one grouped product per block for the scatter). Otherwise the
        per-mode sample-order kernels."""
        d = self.d
        if left is None and not (torch.is_grad_enabled() and (
                values.requires_grad or any(u.requires_grad for u in U)
                or any(v is not None and v.requires_grad for v in V))):
            if values.device.type != "meta":
                with torch.no_grad():
                    return index_set._project_blocked(U, V, values)
        left = index_set.left_vectors(U) if left is None else left
        N = len(index_set)
        D = []
        rho = values.new_ones(N, 1)
        rights = [None] * d
        rights[d - 1] = rho
        for k in range(d - 1, 0, -1):
            rights[k - 1] = index_set._right_step(k, rights[k], V[k])
        for k in range(d):
            D.append(index_set.scatter(k, left[k] * values.unsqueeze(1), rights[k]))
        return D

    def _project_dense_D(self, U, V, Z: torch.Tensor) -> List[torch.Tensor]:
        d = self.d
        # right interfaces as dense (r_k, n_{k+1} ... n_d) matrices
        right = [None] * d
        right[d - 1] = Z.new_ones(1, 1)
        for k in range(d - 1, 0, -1):
            v = V[k]
            right[k - 1] = (v.reshape(-1, v.shape[2]) @ right[k]).reshape(v.shape[0], -1)
        D = []
        left = Z.reshape(1, -1)  # U_{<k}^T Z as (r_{k-1}, n_k ... n_d)
        for k in range(d):
            n, r = self.shape[k], self.ranks[k]
            lk = left.reshape(r * n, -1)
            D.append((lk @ right[k].transpose(0, 1)).reshape(self.core_shapes[k]))
            if k < d - 1:
                u = U[k]
                left = u.reshape(-1, u.shape[2]).transpose(0, 1) @ lk
        return D

    # ------------------------------------------------------------------------------------
    # tangent vectors
    # ------------------------------------------------------------------------------------
    def tangent_to_tt(self, p: torch.Tensor, u: torch.Tensor) -> TT:
        """The rank-2r TT of the tangent vector ``u`` at ``p`` (gauged or not)."""
        U = self._split(p, "p")
        du = self._check_vector(u, p)
        return self._tangent_tt(U, self._right_cores(U), du, add_point=False)

    @_no_autograd_fast_path
    def gauge(self, p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Gauged deltas of the tangent vector represented by arbitrary deltas ``u``.

        Unlike :meth:`proju` (which drops the non-gauged parts, the right thing for
        gradients), this moves ``U_k (U_k^T dU_k)`` into core ``k+1`` so that the tangent
        vector is unchanged. O(d n r^3).
        """
        U = self._split(p, "p")
        du = list(self._check_vector(u, p))
        V = self._right_cores(U)
        for k in range(self.d - 1):
            ul = U[k].reshape(-1, U[k].shape[2])
            dl = du[k].reshape(-1, du[k].shape[2])
            a = ul.transpose(0, 1) @ dl
            du[k] = (dl - ul @ a).reshape(du[k].shape)
            v = V[k + 1]
            du[k + 1] = du[k + 1] + (a @ v.reshape(v.shape[0], -1)).reshape(v.shape)
        return self._cat(du)

    def inner(self, x: torch.Tensor, u: torch.Tensor, v: Optional[torch.Tensor] = None, *,
              keepdim: bool = False) -> torch.Tensor:
        """Riemannian metric: Euclidean inner product of packed gauged deltas."""
        if v is None:
            v = u
        if u.shape[-1:] != (self.size,) or v.shape[-1:] != (self.size,):
            raise ValueError(
                f"u, v: expected packed tangent vectors of size {self.size}, got shapes "
                f"{tuple(u.shape)} and {tuple(v.shape)}"
            )
        out = (u * v).sum(-1, keepdim=keepdim)
        return out

    def component_inner(self, x: torch.Tensor, u: torch.Tensor,
                        v: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Second-moment statistic for RiemannianAdam: ``<u, v>`` broadcast over the whole
        packed vector (constant on every core, so Adam's direction stays tangent).

        Why not one value per core: geoopt transports Adam's first moment but not its
        second; how a tangent vector's mass splits among the cores depends on the point's
        gauge, so per-core second moments go stale and transported momentum that leaks
        into a core with a tiny second moment takes a huge step (observed: divergence on
        a rank-4 approximation). A single value per point is gauge invariant.
        """
        if v is None:
            v = u
        val = (u * v).sum(-1, keepdim=True)
        return val.expand(u.shape).clone()

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        return self.inner(x, u, keepdim=keepdim).clamp_min(0).sqrt()

    # ------------------------------------------------------------------------------------
    # retraction and transport
    # ------------------------------------------------------------------------------------
    def _retract(self, U, V, du) -> torch.Tensor:
        """Packed left-orthogonal cores of ``round_r(X + xi)``, ``xi = sum_k U_<k du_k V_>k``.

        TT-SVD of the rank-2r TT with block cores ``[[V_k, 0], [du_k, U_k]]`` (last core
        ``[[V_d], [U_d + du_d]]``), using the structure: the rows ``[V_k, 0]`` already are
        right-orthonormal, so the right-to-left orthogonalization only removes their
        component from the bottom block ``B_k`` and QR-factorizes what is left,
        ``B_k - C_k [V_k, 0] = L_k Q_k`` (an ``r x n (r + r')`` LQ instead of a
        ``2r x 2 n r`` one); ``[[I, 0], [C_k, L_k]]`` is merged into core ``k - 1``, whose
        bottom block becomes ``[du_{k-1} + U_{k-1} C_k, U_{k-1} L_k]``. The columns of
        ``B_k`` are kept as two blocks (the V part and the rest), which an orthogonal
        column permutation does not change. Then truncated SVDs from left to right.
        O(d n r^3); no sign conventions in the sweep (the SVD sweep fixes the gauge). On the
        CPU without autograd the same algorithm runs in the compiled dense sweeps
        (:func:`ttmanifold._native.get_dense`) once they are built."""
        d = self.d
        if d == 1:
            return (U[0] + du[0]).reshape(-1)
        if _native.dense_usable(U, V[1:], du):  # the same algorithm, direct LAPACK calls
            return _native.get_dense().retract(
                [u.contiguous() for u in U], [U[0].new_empty(0)] + [v.contiguous() for v in V[1:]],
                [e.contiguous() for e in du], list(self.ranks))
        QV: List[Optional[torch.Tensor]] = [None] * d
        QW: List[Optional[torch.Tensor]] = [None] * d
        rows = U[-1].shape[0]
        left = (U[-1] + du[-1]).reshape(rows, -1)  # bottom block, columns of the V part
        right = None  # bottom block, the other columns
        for k in range(d - 1, 0, -1):
            vm = V[k].reshape(V[k].shape[0], -1)
            C = left @ vm.transpose(0, 1)
            w = torch.addmm(left, C, vm, alpha=-1)
            W = w if right is None else torch.cat([w, right], 1)
            q, r = torch.linalg.qr(W.transpose(0, 1))
            qt = q.transpose(0, 1)
            QV[k] = qt[:, :w.shape[1]]
            QW[k] = None if right is None else qt[:, w.shape[1]:]
            ul = U[k - 1].reshape(-1, U[k - 1].shape[2])
            rows = U[k - 1].shape[0]
            left = torch.addmm(du[k - 1].reshape(ul.shape), ul, C).reshape(rows, -1)
            right = (ul @ r.transpose(0, 1)).reshape(rows, -1)
        n = self.shape[0]
        c = torch.cat([left.reshape(n, -1), right.reshape(n, -1)], 1)
        out = U[0].new_empty(self.size)
        off = 0
        for k in range(d - 1):
            u, s, vh = torch.linalg.svd(c, full_matrices=False)
            r = self.ranks[k + 1]
            if u.shape[1] < r:  # rank collapsed below r: pad with an orthonormal complement
                u, s, vh = self._pad_svd(u, s, vh, r)
            out[off:off + u.shape[0] * r].view(u.shape[0], r).copy_(u[:, :r])
            off += u.shape[0] * r
            sv = s[:r, None] * vh[:r]
            a, nk, b = V[k + 1].shape
            top = torch.addmm(sv[:, a:] @ QV[k + 1], sv[:, :a], V[k + 1].reshape(a, -1))
            if QW[k + 1] is None:
                c = top
            else:
                c = torch.cat([top.reshape(r * nk, b), (sv[:, a:] @ QW[k + 1]).reshape(r * nk, -1)], 1)
        out[off:].view(c.shape).copy_(c)
        return out

    @staticmethod
    def _pad_svd(u, s, vh, r):
        m, k = u.shape
        extra = torch.eye(m, r - k, dtype=u.dtype, device=u.device)
        q, _ = qr_pos(torch.cat([u, extra], 1))
        u = torch.cat([u, q[:, k:r]], 1)
        s = torch.cat([s, s.new_zeros(r - k)])
        vh = torch.cat([vh, vh.new_zeros(r - k, vh.shape[1])], 0)
        return u, s, vh

    @_no_autograd_fast_path
    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Retraction ``R_X(xi) = round_r(X + xi)`` (TT-SVD of the rank-2r TT). O(d n r^3).

        ``u`` may be non-gauged deltas. The result is left-orthogonal.
        """
        U = self._split(x, "x")
        du = self._check_vector(u, x)
        if self.d > 1 and _native.dense_usable(U, du):  # one compiled call: V and the sweeps
            return _native.get_dense().retract_point(
                [c.contiguous() for c in U], [e.contiguous() for e in du], list(self.ranks))
        return self._retract(U, self._right_cores(U), du)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Not the exponential map: the retraction :meth:`retr` (second order)."""
        return self.retr(x, u)

    @_no_autograd_fast_path
    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Vector transport by projection ``P_Y(xi)`` of ``v`` at ``x`` to ``y``.
        ``v`` may be non-gauged. O(d n r^3)."""
        Ux = self._split(x, "x")
        dv = self._check_vector(v, x, "v")
        Uy = self._split(y, "y")
        xi = self._tangent_tt(Ux, self._right_cores(Ux), dv, add_point=False)
        Vy = self._right_cores(Uy)
        return project_D(Uy, Vy, xi._cores, packed=True, gauge=True)

    @_no_autograd_fast_path
    def retr_transp(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
        """``(retr(x, u), transp(x, retr(x, u), v))`` sharing the work at ``x``."""
        U = self._split(x, "x")
        du = self._check_vector(u, x)
        dv = self._check_vector(v, x, "v")
        V = self._right_cores(U)
        y = self._retract(U, V, du)
        ycores = self._split(y, "y")
        xi = self._tangent_tt(U, V, dv, add_point=False)
        Vy = self._right_cores(ycores)
        return y, project_D(ycores, Vy, xi._cores, packed=True, gauge=True)

    def transp_follow_retr(self, x, u, v):
        return self.retr_transp(x, u, v)[1]

    def expmap_transp(self, x, u, v):
        return self.retr_transp(x, u, v)

    def transp_follow_expmap(self, x, u, v):
        return self.retr_transp(x, u, v)[1]

    def logmap(self, x, y):
        raise NotImplementedError("FixedTTRank has no closed-form logarithmic map")

    def dist(self, x, y, *, keepdim=False):
        """Euclidean (chordal) distance ``||X - Y||_F`` of the embedded tensors."""
        out = (self.to_tt(x) - self.to_tt(y)).norm()
        return out.reshape((1,)) if keepdim else out

    # ------------------------------------------------------------------------------------
    # points
    # ------------------------------------------------------------------------------------
    def _orth_defect(self, U: Sequence[torch.Tensor]) -> torch.Tensor:
        """max_k ||U_k^T U_k - I||_max over k < d (0-d tensor)."""
        out = U[-1].new_zeros(())
        for u in U[:-1]:
            ul = u.reshape(-1, u.shape[2])
            g = ul.transpose(0, 1) @ ul
            out = torch.maximum(out, (g - torch.eye(g.shape[0], dtype=g.dtype, device=g.device)).abs().max())
        return out

    def _orth_tol(self, dtype) -> float:
        return 64 * torch.finfo(dtype).eps * math.sqrt(max(self.ranks) * max(self.shape))

    @_no_autograd_fast_path
    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Put a packed tensor on the manifold (left-orthogonal QR sweep).

        A point that already is left-orthogonal to a dtype-dependent tolerance is returned
        unchanged bit for bit (``torch.where`` on the device, no host sync), so calling
        ``projx`` on every step, as recent geoopt optimizers do, costs one Gram matrix
        per core and never perturbs valid points. A tensor whose cores are rank
        deficient stays rank deficient: projx does not restore the rank.
        """
        U = self._split(x, "x")
        reorth = self._cat(orthogonalize(TT(U, check=False), "left").cores)
        ok = self._orth_defect(U) <= self._orth_tol(x.dtype)
        return torch.where(ok, x, reorth)

    def _check_shape(self, shape, name):
        if len(shape) != 1 or shape[0] != self.size:
            return False, (
                f"`{name}` should be a flat tensor of size {self.size} (packed cores "
                f"{self.core_shapes}), got shape {tuple(shape)}"
            )
        return True, None

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        x = x.detach()
        U = self._split(x, "x")
        if x.device.type == "meta":
            return True, None
        if not bool(torch.isfinite(x).all()):
            return False, "point has non-finite entries"
        defect = float(self._orth_defect(U))
        if defect > max(atol, self._orth_tol(x.dtype)):
            return False, f"cores 1..d-1 are not left-orthogonal (defect {defect:.3g})"
        # exact rank: the interface factors L_k of the right sweep must be nonsingular
        for k, _, r in right_sweep(U):  # (unsigned factors: same singular values)
            sv = torch.linalg.svdvals(r)
            if float(sv.min()) <= rtol * float(sv.max()) or float(sv.max()) == 0:
                return False, f"TT-rank at bond {k} is below {self.ranks[k]}"
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        U = self._split(x, "x")
        du = self._split(u, "u")
        if u.device.type == "meta":
            return True, None
        if not bool(torch.isfinite(u).all()):
            return False, "vector has non-finite entries"
        scale = max(float(u.abs().max()), 1.0)
        for k in range(self.d - 1):
            ul = U[k].reshape(-1, U[k].shape[2])
            g = ul.transpose(0, 1) @ du[k].reshape(-1, du[k].shape[2])
            err = float(g.abs().max()) if g.numel() else 0.0
            if err > atol + rtol * scale:
                return False, f"core {k} violates the gauge condition U^T dU = 0 (max {err:.3g})"
        return True, None

    def random(self, *size, dtype=None, device=None, generator=None, **kwargs) -> torch.Tensor:
        """A random point: :meth:`TT.random` (unit norm, well conditioned), packed.

        ``size`` is accepted for geoopt compatibility and must be empty or ``(self.size,)``.
        """
        if size not in ((), (self.size,)) and not (len(size) == 1 and tuple(size[0]) in ((), (self.size,))):
            raise ValueError(f"size: a point of {self.name} is a flat tensor of size {self.size}")
        x = TT.random(self.shape, self.ranks, dtype=dtype, device=device, generator=generator)
        return self._cat(x.cores)

    random_normal = random

    def origin(self, *size, dtype=None, device=None, seed=None) -> torch.Tensor:
        """A fixed, deterministic point: :meth:`TT.random` (orthonormal frames, unit norm)
        drawn in float64 on the CPU from a generator seeded with ``seed`` (default 0), then
        cast to ``dtype`` and moved to ``device``. Same point for every dtype and device.

        (Structured frames such as DCT columns are not used: reshaped into cores they can
        have low-rank unfoldings, e.g. a cosine of a linear phase is a rank-2 matrix, which
        gave tensors of lower TT-rank, i.e. not points of M_r.)
        """
        dtype = dtype or torch.get_default_dtype()
        check_float_dtype(dtype, "dtype")
        gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
        x = TT.random(self.shape, self.ranks, dtype=torch.float64, generator=gen)
        return self._cat(x.cores).to(dtype=dtype, device=device)

    # ------------------------------------------------------------------------------------
    # Riemannian autodiff
    # ------------------------------------------------------------------------------------
    def riemannian_grad(self, p: torch.Tensor, f: Callable[[TT], torch.Tensor]) -> torch.Tensor:
        """Riemannian gradient of ``f`` (a differentiable function of a TT) at ``p``.

        One reverse pass of ``g(delta) = f(sum_k U_<k delta_k V_>k)`` at
        ``delta = (0, .., 0, U_d)`` gives all ``D_k``; the gauge projection finishes it
        (Novikov, Rakhuba, Oseledets 2021). ``f`` receives a
        :class:`~ttmanifold.tangent.TangentTT` (inner products and norms at rank r, other
        operations on the rank-2r cores). Cost: ``f`` and its backward on it plus
        O(d n r^3). Returns packed gauged deltas (detached).
        """
        p = p.detach()
        U = self._split(p, "p")
        V = self._right_cores(U)
        with torch.enable_grad():
            flat, T = self._delta_tt(p, U, V)
            val = f(T)
            _check_loss(val)
            (D,) = torch.autograd.grad(val, flat, allow_unused=True)
        out = torch.zeros_like(p) if D is None else self._gauge_packed(p, D)
        if out.device.type != "meta":
            torch._assert_async(_all_finite(out), "f: gradient contains NaN or Inf")
        return out

    def riemannian_hvp(self, p: torch.Tensor, f: Callable[[TT], torch.Tensor],
                       u: torch.Tensor) -> torch.Tensor:
        """Projected Hessian-vector product ``P_X (nabla^2 f) [xi]`` at ``p``.

        Second reverse pass through the delta map (linear in delta), so this is the
        Euclidean Hessian of ``f`` restricted to the tangent space. The curvature term of
        the Riemannian Hessian (``P_X D_xi P_X (nabla f)``, which vanishes at critical points)
        is **not** included. Returns packed gauged deltas. Cost: about twice
        :meth:`riemannian_grad`.
        """
        p = p.detach()
        U = self._split(p, "p")
        self._check_vector(u, p)
        V = self._right_cores(U)
        with torch.enable_grad():
            flat, T = self._delta_tt(p, U, V)
            val = f(T)
            _check_loss(val)
            (D,) = torch.autograd.grad(val, flat, create_graph=True, allow_unused=True)
            if D is None or not D.requires_grad:  # f at most linear in X
                return torch.zeros_like(p)
            (H,) = torch.autograd.grad(torch.dot(D, u), flat, allow_unused=True)
        return torch.zeros_like(p) if H is None else self._gauge_packed(p, H)

    def _delta_tt(self, p, U, V):
        """Packed deltas ``(0, .., 0, U_d)`` requiring grad, and the TT they define (X)."""
        flat = torch.zeros_like(p)
        last = self._gauge_runs[1]
        flat[last:] = p[last:]
        flat.requires_grad_()
        deltas = self._split(flat, "p")
        if self.d == 1:
            return flat, TT(deltas, check=False)
        return flat, TangentTT(U, V, deltas, flat=flat, gauged=True, check=False)


def _check_loss(val):
    if not isinstance(val, torch.Tensor) or val.numel() != 1:
        raise ValueError("f: expected a function returning a scalar tensor")
    if not val.requires_grad:
        raise ValueError("f: the returned scalar does not depend on the TT (no grad)")
