"""Sampled entries of tensor trains: :class:`IndexSet`, the kernels of tensor completion.

An :class:`IndexSet` holds ``N`` multi-indices of a tensor of shape ``(n_1, ..., n_d)``
and the layouts that group them (:mod:`.layout`). With it the values of a TT at the
samples (:meth:`IndexSet.gather`), the left and right sample vectors
(:meth:`IndexSet.left_vectors`, :meth:`IndexSet.right_vectors`), the scatter of the
sparse projection (:meth:`IndexSet.scatter`) and the per-sample state of Riemannian CG
(:meth:`IndexSet.sampled_point`) all cost O(N d r^2).

Two sets of kernels serve them: the torch kernels (:mod:`.blocked`, any device) and the
compiled CPU kernels (:mod:`.sampled_compiled`); :mod:`ttmanifold.kernels` chooses.
Design and costs: ``docs/sampled_entries.md``.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import kernels
from .._checks import check_float_dtype, check_right_cores, check_shape, functorch_wrapped
from . import sampled_compiled
from .blocked import SampledPoint, blocked_project, blocked_values, stacked
from .layout import CHUNK, MIN_GROUP, Block, ModePlan, Partition, Workspace

__all__ = ["IndexSet", "BatchIndexSet", "StackedIndexSet", "SampledPoint", "sampled_values",
           "sampled_project"]

# The blocked-kernel operations; :mod:`ttmanifold.kernels` runs the compiled version when it
# is built and applies (CPU, float32/float64, no autograd, large enough index set).
sampled_values = kernels.dispatch("sampled", compiled=sampled_compiled.values,
                                  when=sampled_compiled.applies)(blocked_values)
sampled_project = kernels.dispatch("sampled", compiled=sampled_compiled.project,
                                   when=sampled_compiled.applies)(blocked_project)
new_sampled_point = kernels.dispatch("sampled", compiled=sampled_compiled.sampled_point,
                                     when=sampled_compiled.applies)(SampledPoint)


class IndexSet:
    """``N`` multi-indices into a tensor of shape ``shape``, grouped per mode.

    Args:
        indices: integer tensor of shape ``(N, d)`` (duplicates allowed; they are summed
            in :meth:`scatter`). It is copied: changing it later does not change the set.
        shape: the tensor's mode sizes ``(n_1, ..., n_d)``.

    The layouts are built lazily on first use and kept (one sort of the indices per block
    of modes, a few host reads); reuse an index set across iterations. Work buffers are
    per thread (and pooled per :class:`SampledPoint`), so one index set may serve several
    threads at once; :meth:`release_buffers` frees them.
    """

    def __init__(self, indices: torch.Tensor, shape: Sequence[int], *, check: bool = True):
        shape = check_shape(shape)
        if check:
            if not isinstance(indices, torch.Tensor):
                raise TypeError(f"indices: expected a LongTensor of shape (N, {len(shape)})")
            if indices.dtype.is_floating_point or indices.dtype.is_complex or \
                    indices.dtype == torch.bool:
                raise TypeError(f"indices: expected an integer tensor, got dtype {indices.dtype}")
            if indices.dim() != 2 or indices.shape[1] != len(shape):
                raise ValueError(
                    f"indices: expected shape (N, {len(shape)}) for a tensor of order "
                    f"{len(shape)}, got {tuple(indices.shape)}"
                )
            if indices.device.type != "meta" and indices.numel() > 0:
                bound = torch.tensor(shape, device=indices.device)
                if bool(((indices < 0) | (indices >= bound)).any()):
                    raise ValueError(f"indices: out of range for shape {shape}")
        # a private copy: the layouts are derived from it and must not go stale
        self.indices = indices.to(torch.long, copy=True)
        self.shape = shape
        self.min_group = MIN_GROUP
        self._new_caches()

    def _new_caches(self) -> None:
        """The layouts and work buffers, built on first use."""
        self.compiled_plans: Dict[tuple, object] = {}  # layouts of the compiled kernels
        self._plans: List[Optional[ModePlan]] = [None] * len(self.shape)
        self._blocks: Dict[tuple, Block] = {}
        self._partitions: Dict[tuple, Partition] = {}
        self._pool: List[Workspace] = []  # idle workspaces of SampledPoint objects
        self._pool_lock = threading.Lock()
        self._local = threading.local()  # per-thread workspaces of the one-shot kernels

    def __getstate__(self) -> dict:
        """copy / deepcopy / pickle: the samples and settings without the caches (the
        pool's lock and thread-local buffers cannot be pickled; a copy rebuilds its
        layouts on first use)."""
        state = dict(self.__dict__)
        for k in ("compiled_plans", "_plans", "_blocks", "_partitions", "_pool",
                  "_pool_lock", "_local"):
            del state[k]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._new_caches()

    @classmethod
    def from_sparse(cls, z: torch.Tensor) -> "IndexSet":
        """The index set of a ``torch.sparse_coo_tensor`` (coalesced or not)."""
        if not isinstance(z, torch.Tensor) or z.layout != torch.sparse_coo:
            got = z.layout if isinstance(z, torch.Tensor) else type(z).__name__
            raise TypeError(f"z: expected a sparse COO tensor, got {got}")
        return cls(z._indices().t(), tuple(z.shape))

    @classmethod
    def batched(cls, indices: Sequence[torch.Tensor], shape: Sequence[int]) -> "BatchIndexSet":
        """``B`` index sets of one shape with their own (ragged) sample counts, for a batch
        of ``B`` TTs: a :class:`BatchIndexSet`."""
        return BatchIndexSet(indices, shape)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __repr__(self) -> str:
        return f"IndexSet(N={len(self)}, shape={self.shape})"

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def plan(self, k: int) -> ModePlan:
        """The samples grouped by their index in mode ``k`` (built once)."""
        if self._plans[k] is None:
            self._plans[k] = ModePlan(self.indices[:, k], self.shape[k])
        return self._plans[k]

    def release_buffers(self) -> None:
        """Free the cached work buffers (the index layouts are kept)."""
        with self._pool_lock:
            self._pool.clear()
        self._local = threading.local()
        for plan in self.compiled_plans.values():
            plan.free.clear()

    def check_cores(self, cores: Sequence[torch.Tensor], name: str = "tt") -> None:
        """Validate the cores of a TT to be evaluated at the samples: ``d`` floating
        3-D cores of one dtype and device (the index set's), mode sizes equal to the
        index set's shape, consecutive ranks that match, boundary ranks 1."""
        if len(cores) != len(self.shape):
            raise ValueError(f"{name}: {len(cores)} cores, the index set has order "
                             f"{len(self.shape)}")
        for k, c in enumerate(cores):
            if not isinstance(c, torch.Tensor) or c.dim() != 3:
                raise ValueError(f"{name}: core {k} must be a 3-D tensor (r, n, r'), got "
                                 f"{type(c).__name__ if not isinstance(c, torch.Tensor) else tuple(c.shape)}")
            check_float_dtype(c.dtype, f"{name} (core {k})")
            if c.dtype != cores[0].dtype:
                raise TypeError(f"{name}: core {k} has dtype {c.dtype}, core 0 {cores[0].dtype}")
        if tuple(int(c.shape[1]) for c in cores) != tuple(self.shape):
            raise ValueError(
                f"{name}: shape {tuple(int(c.shape[1]) for c in cores)} does not match the "
                f"index set's shape {self.shape}")
        for k in range(len(cores) - 1):
            if cores[k].shape[2] != cores[k + 1].shape[0]:
                raise ValueError(f"{name}: rank mismatch between cores {k} and {k + 1}: "
                                 f"{tuple(cores[k].shape)} and {tuple(cores[k + 1].shape)}")
        if cores[0].shape[0] != 1 or cores[-1].shape[2] != 1:
            raise ValueError(f"{name}: boundary ranks must be 1, got {cores[0].shape[0]} "
                             f"and {cores[-1].shape[2]}")
        for k, c in enumerate(cores):
            if c.device != self.device:
                raise ValueError(f"{name}: core {k} on device {c.device}, indices on "
                                 f"{self.device}")

    def check_point_cores(self, U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
                          values: Optional[torch.Tensor] = None) -> None:
        """Validate the cores of a point for :meth:`sampled_point` and :meth:`project`.

        Args:
            U: left-orthogonal cores, checked by :meth:`check_cores`.
            V: right-orthogonal cores, ``d`` entries, ``V[0]`` unused (may be None),
                ``V[k]`` of ``U[k]``'s shape, dtype and device.
            values: if given, one value per sample, ``(N,)``, of ``U``'s dtype and device.
        Raises ``ValueError`` / ``TypeError`` naming the argument (the kernels would read
        cores of other ranks silently or fail deep inside). Cost O(d), no host sync."""
        self.check_cores(U, "U")
        check_right_cores(V, U, "V")
        for k, v in enumerate(V[1:], 1):
            if v.dtype != U[0].dtype or v.device != U[0].device:
                raise TypeError(f"V: core {k} has dtype {v.dtype} on {v.device}, U has "
                                f"{U[0].dtype} on {U[0].device}")
        if values is not None:
            if not isinstance(values, torch.Tensor) or values.shape != (len(self),):
                got = (tuple(values.shape) if isinstance(values, torch.Tensor)
                       else type(values).__name__)
                raise ValueError(f"values: expected shape ({len(self)},) (one per sample), "
                                 f"got {got}")
            if values.dtype != U[0].dtype or values.device != U[0].device:
                raise TypeError(f"values: dtype {values.dtype} on {values.device}, U has "
                                f"{U[0].dtype} on {U[0].device}")

    # -- blocked layouts ------------------------------------------------------------------
    def block_key(self, lo: int, hi: int) -> torch.Tensor:
        """The merged index of modes ``lo..hi-1`` of every sample (row-major), ``(N,)``."""
        key = self.indices[:, lo]
        for k in range(lo + 1, hi):
            key = key * self.shape[k] + self.indices[:, k]
        return key

    def _block(self, lo: int, hi: int, prev: Optional[int], nxt: Optional[int]) -> Block:
        """The layout of block ``lo..hi-1`` whose neighbours in the partition end with
        modes ``prev`` and ``nxt`` (``None``: no neighbour). Groups are ordered by their
        last mode, samples inside a group by ``nxt`` then ``prev``: the layout changes
        then read short runs of rows (about 10% faster gathers; any order is correct)."""
        ck = (lo, hi, prev, nxt)
        blk = self._blocks.get(ck)
        if blk is None:
            P = self.merged_count(lo, hi)
            idx = self.indices
            gmap = None
            key = self.block_key(lo, hi)
            if hi - lo > 1:  # order key: last mode major, then modes lo..hi-2 row-major
                n_last = self.shape[hi - 1]
                Q = P // n_last
                key = idx[:, hi - 1] * Q + torch.div(key, n_last, rounding_mode="floor")
                o = torch.arange(P, device=idx.device)
                gmap = (o % Q) * n_last + torch.div(o, Q, rounding_mode="floor")
            sec = [idx[:, m] for m in (nxt, prev) if m is not None]
            blk = Block(key, lo, hi, P, gmap, sec, multi=True)
            self._blocks[ck] = blk
        return blk

    def bounds(self, ranks: Sequence[int]) -> List[Tuple[int, int]]:
        """The blocks ``[lo, hi)`` of merged modes for TT-ranks ``ranks`` (``d + 1``
        values): modes are merged while the merged index count ``P`` satisfies
        ``P * max(min_group, 4 r) <= N`` (``r`` the largest rank involved), so the merged
        cores stay small next to the samples."""
        N, d = len(self), len(self.shape)
        out = []
        k = 0
        while k < d:
            hi, r = k + 1, max(ranks[k], ranks[k + 1])
            while hi < d:
                P2, r2 = self.merged_count(k, hi + 1), max(r, ranks[hi + 1])
                if P2 * max(self.min_group, 4 * r2) > N:
                    break
                r, hi = r2, hi + 1
            out.append((k, hi))
            k = hi
        return out

    def merged_count(self, lo: int, hi: int) -> int:
        """``P``, the number of merged indices of modes ``lo..hi-1`` (rows of the merged
        core of a block)."""
        P = 1
        for k in range(lo, hi):
            P *= self.shape[k]
        return P

    def partition(self, ranks: Sequence[int]) -> Partition:
        """The blocks of :meth:`bounds` and the maps between their layouts (built once
        per partition)."""
        bounds = self.bounds(ranks)
        key = tuple(bounds)
        part = self._partitions.get(key)
        if part is None:
            B = len(bounds)
            blocks = [self._block(lo, hi, bounds[j - 1][1] - 1 if j > 0 else None,
                                  bounds[j + 1][1] - 1 if j + 1 < B else None)
                      for j, (lo, hi) in enumerate(bounds)]
            part = Partition(blocks, self.block_key)
            self._partitions[key] = part
        return part

    def workspace(self, dtype: torch.dtype, device) -> Workspace:
        """This thread's buffers for the one-shot blocked kernels (values, projection)."""
        table = getattr(self._local, "ws", None)
        if table is None:
            table = self._local.ws = {}
        key = (dtype, str(device))
        ws = table.get(key)
        if ws is None:
            ws = table[key] = Workspace(dtype, device)
        return ws

    def acquire_workspace(self, dtype: torch.dtype, device) -> Workspace:
        """An idle pooled workspace (or a new one) for a :class:`SampledPoint`."""
        with self._pool_lock:
            for j, ws in enumerate(self._pool):
                if ws.dtype == dtype and ws.device == device:
                    return self._pool.pop(j)
        return Workspace(dtype, device)

    def release_workspace(self, ws: Workspace) -> None:
        """Return a workspace to the pool (one idle workspace per dtype and device kept)."""
        with self._pool_lock:
            self._pool = [w for w in self._pool
                          if (w.dtype, w.device) != (ws.dtype, ws.device)] + [ws]

    def sampled_point(self, U: Sequence[torch.Tensor], V: Sequence[torch.Tensor]):
        """The per-sample left and right vectors of the TT with left-orthogonal cores ``U``
        and right-orthogonal cores ``V`` (``V[0]`` unused): a :class:`SampledPoint`, or
        its compiled counterpart (same interface and values) where
        :mod:`ttmanifold.kernels` serves. O(N d r^2)."""
        self.check_point_cores(U, V)
        return new_sampled_point(self, list(U), list(V))

    # -- per-mode kernels (sample order) ------------------------------------------------
    def left_step(self, k: int, a: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        """One step of the left sweep in sample order: ``a_e @ core[:, i_k(e), :]`` for
        every sample e; ``a`` ``(N, r_{k-1})`` -> ``(N, r_k)``. O(N r_{k-1} r_k);
        differentiable."""
        p = self.plan(k)
        if p.padded:
            out = torch.bmm(p.pad(a), core.permute(1, 0, 2))
            return p.unpad(out)
        return _chunked(a, core.permute(1, 0, 2), p.idx)

    def right_step(self, k: int, b: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        """One step of the right sweep: ``core[:, i_k(e), :] @ b_e``; ``b`` ``(N, r_k)`` ->
        ``(N, r_{k-1})``. O(N r_{k-1} r_k); differentiable."""
        p = self.plan(k)
        if p.padded:
            out = torch.bmm(p.pad(b), core.permute(1, 2, 0))
            return p.unpad(out)
        return _chunked(b, core.permute(1, 2, 0), p.idx)

    def left_vectors(self, cores: Sequence[torch.Tensor], upto: Optional[int] = None):
        """``[l_0, l_1, ..., l_upto]``, ``l_k`` of shape ``(N, r_k)`` the product of cores
        ``0..k-1`` at the sample's indices, ``l_0 = 1``; ``upto`` defaults to ``d - 1`` (the
        vectors a projection needs; ``l_d``, the values, is :meth:`gather`)."""
        self.check_cores(cores, "cores")
        d = len(cores)
        upto = d - 1 if upto is None else upto
        out = [cores[0].new_ones(len(self), 1)]
        for k in range(upto):
            out.append(self.left_step(k, out[-1], cores[k]))
        return out

    def right_vectors(self, cores: Sequence[torch.Tensor], downto: int = 1):
        """``{k: rho_k}`` for ``k = downto..d`` (0-based core k, ``rho_d = 1``): ``rho_k``
        ``(N, r_k)`` is the product of cores ``k..d-1`` at the sample's indices."""
        self.check_cores(cores, "cores")
        d = len(cores)
        out = {d: cores[-1].new_ones(len(self), 1)}
        for k in range(d - 1, downto - 1, -1):
            out[k] = self.right_step(k, out[k + 1], cores[k])
        return out

    def gather(self, tt) -> torch.Tensor:
        """The ``N`` entries of a TT (or a list of its cores) at the samples. O(N d r^2).

        Blocked kernels with reused buffers; under autograd the backward is the blocked
        scatter (a backward with ``create_graph=True`` or with batched functorch gradients
        differentiates the per-mode kernels instead). A TT may evaluate itself in its own
        way (:meth:`TT.values_at <ttmanifold.TT.values_at>`; the tangent TT of Riemannian
        autodiff works at rank r)."""
        if hasattr(tt, "values_at"):
            return tt.values_at(self)
        return self.gather_cores(list(tt))

    def gather_cores(self, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        """:meth:`gather` for a list of cores (validated, see :meth:`check_cores`)."""
        cores = list(cores)
        self.check_cores(cores)
        if cores[0].device.type == "meta" or any(functorch_wrapped(c) for c in cores):
            return per_mode_values(self, cores)  # no reused buffers for these
        if torch.is_grad_enabled() and any(c.requires_grad for c in cores):
            return _TTGather.apply(self, *cores)
        return sampled_values(self, cores)

    def scatter(self, k: int, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``D[:, i, :] = sum_{e: i_k(e) = i} left_e^T right_e`` of shape ``(a, n_k, b)``;
        ``left`` ``(N, a)``, ``right`` ``(N, b)``. O(N a b); differentiable."""
        p = self.plan(k)
        if p.padded:
            lp, rp = p.pad(left), p.pad(right)
            out = torch.bmm(lp.transpose(1, 2), rp)  # (n, a, b)
            return out.permute(1, 0, 2)
        n = self.shape[k]
        out = left.new_zeros(n, left.shape[1] * right.shape[1])
        for s in range(0, len(self), CHUNK):
            lc, rc = left[s:s + CHUNK], right[s:s + CHUNK]
            prod = (lc.unsqueeze(2) * rc.unsqueeze(1)).reshape(lc.shape[0], -1)
            out.index_add_(0, p.idx[s:s + CHUNK], prod)
        return out.view(n, left.shape[1], right.shape[1]).permute(1, 0, 2)

    def project(self, U, V, values: torch.Tensor) -> List[torch.Tensor]:
        """``D_k`` of the projection of the sparse tensor with ``values`` at the samples
        onto the tangent space at the TT with left-orthogonal cores ``U`` and
        right-orthogonal cores ``V`` (before the gauge projection). No autograd: the
        blocked kernels (or the compiled ones). O(N d r^2)."""
        self.check_point_cores(U, V, values)
        return sampled_project(self, list(U), list(V), values)


def per_mode_values(iset: IndexSet, cores) -> torch.Tensor:
    """Entries of the TT ``cores`` by the per-mode kernels (autograd-friendly)."""
    a = cores[0].new_ones(len(iset), 1)
    for k in range(len(cores)):
        a = iset.left_step(k, a, cores[k])
    return a[:, 0]


class _TTGather(torch.autograd.Function):
    """Entries of a TT at the samples, differentiable in its cores, on the blocked kernels:
    forward = a sampled point with ``U = V = cores`` (its left sweep gives the values),
    backward = its scatter. A backward with ``create_graph=True`` (or with batched
    gradients from functorch) differentiates the per-mode kernels instead."""

    @staticmethod
    def forward(ctx, iset, *cores):
        point = new_sampled_point(iset, list(cores), list(cores))
        ctx.iset = iset
        ctx.point = point  # (its buffers go back to the pool when the graph is freed)
        ctx.save_for_backward(*cores)
        return point.to_samples(point.values)

    @staticmethod
    def backward(ctx, g):
        cores = ctx.saved_tensors
        create = torch.is_grad_enabled()
        if create or functorch_wrapped(g):
            with torch.enable_grad():
                cs = list(cores) if create else [c.detach().requires_grad_() for c in cores]
                vals = per_mode_values(ctx.iset, cs)
                D = torch.autograd.grad(vals, cs, g, create_graph=create, allow_unused=True)
            D = [torch.zeros_like(c) if d is None else d for d, c in zip(D, cores)]
        else:
            point = ctx.point
            D = point.project(point.from_samples(g.contiguous()))
        return (None, *D)


def _chunked(a: torch.Tensor, mats: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-sample ``a_e @ mats[idx_e]`` in chunks (fallback for unbalanced groups)."""
    outs = []
    for s in range(0, a.shape[0], CHUNK):
        m = mats.index_select(0, idx[s:s + CHUNK])
        outs.append(torch.bmm(a[s:s + CHUNK].unsqueeze(1), m).squeeze(1))
    if not outs:
        return a.new_zeros(0, mats.shape[2])
    return torch.cat(outs, 0)


class StackedIndexSet(IndexSet):
    """The samples of ``B`` problems as one index set of the stacked TT (mode sizes
    ``B n_k``; sample ``i`` of problem ``b`` at ``(b n_1 + i_1, ..., b n_d + i_d)``), built
    by :class:`BatchIndexSet`. Its blocked and compiled kernels take the batched cores
    ``(B, r, n_k, r')`` of the ``B`` TTs and merge modes per TT: the merged index of a
    block is ``b P + i`` (``P`` merged indices per TT, so a block has ``B P`` groups, as
    many per sample as for one problem) and a merged core is the ``B`` merged cores
    stacked (:func:`~.blocked.merged`). The per-mode kernels take the cores of the stacked
    TT (batched cores are stacked on the fly)."""

    def __init__(self, local: torch.Tensor, problem: torch.Tensor, batch_size: int,
                 shape: Tuple[int, ...]):
        n = torch.tensor(shape, device=local.device, dtype=torch.long)
        super().__init__(local + problem.unsqueeze(1) * n,
                         tuple(batch_size * s for s in shape), check=False)
        self.local = local
        self.problem = problem
        self.batch_size = batch_size
        self.local_shape = shape

    def __repr__(self) -> str:
        return f"StackedIndexSet(B={self.batch_size}, N={len(self)}, shape={self.local_shape})"

    def merged_count(self, lo: int, hi: int) -> int:
        P = self.batch_size
        for k in range(lo, hi):
            P *= self.local_shape[k]
        return P

    def block_key(self, lo: int, hi: int) -> torch.Tensor:
        """``b P + i``: the problem, then its merged index ``i`` of modes ``lo..hi-1``."""
        if hi - lo == 1:
            return self.indices[:, lo]
        key = self.problem
        for k in range(lo, hi):
            key = key * self.local_shape[k] + self.local[:, k]
        return key

    def _block(self, lo: int, hi: int, prev: Optional[int], nxt: Optional[int]) -> Block:
        if hi - lo == 1:
            return super()._block(lo, hi, prev, nxt)
        ck = (lo, hi, prev, nxt)
        blk = self._blocks.get(ck)
        if blk is None:  # groups in merged-index order (the merged cores' row order)
            sec = [self.indices[:, m] for m in (nxt, prev) if m is not None]
            blk = Block(self.block_key(lo, hi), lo, hi, self.merged_count(lo, hi), None, sec,
                        multi=True)
            self._blocks[ck] = blk
        return blk

    def check_cores(self, cores: Sequence[torch.Tensor], name: str = "tt") -> None:
        """Batched cores ``(B, r, n_k, r')`` of the ``B`` TTs (or the stacked TT's cores,
        checked as for :class:`IndexSet`)."""
        if not (len(cores) and isinstance(cores[0], torch.Tensor) and cores[0].dim() == 4):
            return super().check_cores(cores, name)
        d, B = len(self.local_shape), self.batch_size
        if len(cores) != d:
            raise ValueError(f"{name}: {len(cores)} cores, the index set has order {d}")
        for k, c in enumerate(cores):
            if not isinstance(c, torch.Tensor) or c.dim() != 4 or c.shape[0] != B \
                    or c.shape[2] != self.local_shape[k]:
                got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                raise ValueError(f"{name}: core {k} must have shape ({B}, r, "
                                 f"{self.local_shape[k]}, r'), got {got}")
            check_float_dtype(c.dtype, f"{name} (core {k})")
            if c.dtype != cores[0].dtype:
                raise TypeError(f"{name}: core {k} has dtype {c.dtype}, core 0 {cores[0].dtype}")
            if c.device != self.device:
                raise ValueError(f"{name}: core {k} on device {c.device}, indices on "
                                 f"{self.device}")
            if k + 1 < d and c.shape[3] != cores[k + 1].shape[1]:
                raise ValueError(f"{name}: rank mismatch between cores {k} and {k + 1}: "
                                 f"{tuple(c.shape)} and {tuple(cores[k + 1].shape)}")
        if cores[0].shape[1] != 1 or cores[-1].shape[3] != 1:
            raise ValueError(f"{name}: boundary ranks must be 1, got {cores[0].shape[1]} "
                             f"and {cores[-1].shape[3]}")

    def left_step(self, k: int, a: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        return super().left_step(k, a, stacked(core))

    def right_step(self, k: int, b: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        return super().right_step(k, b, stacked(core))


class BatchIndexSet:
    """``B`` index sets of one tensor shape (ragged sample counts; empty sets allowed) for a
    batch of ``B`` TTs of equal ranks: problem ``b``'s samples are evaluated in TT ``b``.

    Args:
        indices: a list of ``B`` integer tensors, ``indices[b]`` of shape ``(N_b, d)``
            (``N_b`` may be 0), on one device. They are copied.
        shape: the tensors' mode sizes ``(n_1, ..., n_d)``.

    Design: a batch of TTs with cores ``G_k^b`` ``(r, n_k, r')`` is one TT of shape
    ``(B n_1, ..., B n_d)`` whose core ``k`` holds ``G_k^b`` in its ``b``-th block of mode
    indices; sample ``(i_1, ..., i_d)`` of problem ``b`` is entry ``(b n_1 + i_1, ...,
    b n_d + i_d)`` of it, where every core contributes its block ``b``. So the ``B``
    problems are one index set (:attr:`stacked`, a :class:`StackedIndexSet`) and every
    kernel of it (blocked or compiled) runs once for the whole batch: the values, the
    sampled point of CG and the sparse projection, whose ``D_k`` accumulates sample ``e`` of
    problem ``b`` into block ``b`` only. Consecutive modes are merged per TT (``B P``
    merged indices, never the ``(B n)^2`` cross terms of the stacked TT), so a block
    partition is that of one problem with the batch's samples. The kernels only contract
    cores with per-sample vectors and never rely on the orthogonality of the stacked cores:
    the orthogonality of every point is all the projection needs, as for one point. The
    cores go in and the deltas come out batched, ``(B, r, n_k, r')``. Samples are kept in
    the order of the concatenated ``indices`` (:attr:`offsets`).
    """

    def __init__(self, indices: Sequence[torch.Tensor], shape: Sequence[int], *,
                 check: bool = True):
        shape = check_shape(shape)
        d = len(shape)
        if isinstance(indices, torch.Tensor) or not isinstance(indices, (list, tuple)):
            raise TypeError("indices: expected a list of B integer tensors of shape (N_b, "
                            f"{d}), got {type(indices).__name__}")
        if len(indices) == 0:
            raise ValueError("indices: expected at least one index set (B >= 1)")
        for b, idx in enumerate(indices):
            if not isinstance(idx, torch.Tensor):
                raise TypeError(f"indices[{b}]: expected a LongTensor of shape (N, {d}), got "
                                f"{type(idx).__name__}")
            if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
                raise TypeError(f"indices[{b}]: expected an integer tensor, got dtype {idx.dtype}")
            if idx.dim() != 2 or idx.shape[1] != d:
                raise ValueError(f"indices[{b}]: expected shape (N, {d}) for a tensor of order "
                                 f"{d}, got {tuple(idx.shape)}")
            if idx.device != indices[0].device:
                raise ValueError(f"indices[{b}]: on {idx.device}, indices[0] on "
                                 f"{indices[0].device}")
            if check and idx.device.type != "meta" and idx.numel() > 0:
                bound = torch.tensor(shape, device=idx.device)
                if bool(((idx < 0) | (idx >= bound)).any()):
                    raise ValueError(f"indices[{b}]: out of range for shape {shape}")
        B = len(indices)
        dev = indices[0].device
        self.shape = shape
        self.batch_size = B
        self.counts = tuple(int(idx.shape[0]) for idx in indices)
        offs = [0]
        for c in self.counts:
            offs.append(offs[-1] + c)
        self.offsets = tuple(offs)
        #: the problem of every sample, ``(N,)`` (concatenated order)
        self.problem = torch.repeat_interleave(
            torch.arange(B, device=dev), torch.tensor(self.counts, device=dev))
        local = torch.cat([idx.to(torch.long) for idx in indices], 0)
        #: one index set over the stacked TT (mode sizes ``B n_k``)
        self.stacked = StackedIndexSet(local, self.problem, B, shape)
        self._slot_problem: Dict[int, Tuple[object, torch.Tensor]] = {}

    @classmethod
    def from_index_sets(cls, sets: Sequence[IndexSet]) -> "BatchIndexSet":
        """The batch of the given :class:`IndexSet` objects (all of one shape)."""
        sets = list(sets)
        if not sets or not all(isinstance(s, IndexSet) for s in sets):
            raise TypeError("sets: expected a non-empty list of IndexSet")
        for b, s in enumerate(sets):
            if s.shape != sets[0].shape:
                raise ValueError(f"sets[{b}]: shape {s.shape}, sets[0] has {sets[0].shape}")
        return cls([s.indices for s in sets], sets[0].shape, check=False)

    def __len__(self) -> int:
        return self.offsets[-1]

    def __repr__(self) -> str:
        return f"BatchIndexSet(B={self.batch_size}, N={len(self)}, shape={self.shape})"

    @property
    def device(self) -> torch.device:
        return self.stacked.device

    @property
    def indices(self) -> List[torch.Tensor]:
        """Problem ``b``'s multi-indices ``(N_b, d)`` for every ``b`` (views)."""
        return list(self.stacked.local.split(self.counts))

    def split(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Per-sample data ``(N, ...)`` in concatenated order -> one tensor per problem."""
        if x.shape[:1] != (len(self),):
            raise ValueError(f"x: expected leading size {len(self)} (the samples), got "
                             f"{tuple(x.shape)}")
        return tuple(x.split(self.counts))

    def sum_per_problem(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, ...)`` per sample (concatenated order) -> ``(B, ...)`` summed per problem
        (0 for an empty set). O(N)."""
        if x.shape[:1] != (len(self),):
            raise ValueError(f"x: expected leading size {len(self)} (the samples), got "
                             f"{tuple(x.shape)}")
        out = x.new_zeros((self.batch_size,) + tuple(x.shape[1:]))
        return out.index_add_(0, self.problem, x)

    # -- batched cores -------------------------------------------------------------------
    def check_batch_cores(self, cores: Sequence[torch.Tensor], name: str = "tt") -> None:
        """Validate the cores of a batch of ``B`` TTs: ``d`` floating cores of shape
        ``(B, r, n_k, r')`` (batch of the index set's size, its mode sizes)."""
        B = self.batch_size
        if isinstance(cores, torch.Tensor) or len(cores) != len(self.shape):
            raise ValueError(f"{name}: expected {len(self.shape)} cores of shape (B={B}, r, n, "
                             f"r')")
        for k, c in enumerate(cores):
            if not isinstance(c, torch.Tensor) or c.dim() != 4 or c.shape[0] != B:
                got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                raise ValueError(f"{name}: core {k} must have shape (B={B}, r, n, r') (a batch "
                                 f"of B TTs, one per index set), got {got}")
            if c.shape[2] != self.shape[k]:
                raise ValueError(f"{name}: core {k} has mode size {c.shape[2]}, the index "
                                 f"set's shape is {self.shape}")
        # dtypes, ranks and device: checked on the stacked cores by the stacked index set

    # -- kernels --------------------------------------------------------------------------
    def gather(self, tt) -> torch.Tensor:
        """The entries of TT ``b`` at problem ``b``'s samples for every ``b``, concatenated
        ``(N,)`` (:meth:`split` separates them). ``tt``: a batched :class:`TT` with
        ``batch_shape (B,)`` or its cores ``(B, r, n_k, r')``. Differentiable in the
        cores. One gather of the stacked TT: O(N d r^2)."""
        cores = list(tt.cores) if hasattr(tt, "cores") else list(tt)
        self.check_batch_cores(cores, "tt")
        if len(self) == 0:
            return cores[0].new_zeros(0)
        return self.stacked.gather_cores(cores)

    def project(self, U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
                values: torch.Tensor) -> List[torch.Tensor]:
        """Per point ``b``, the ``D_k`` ``(B, r, n_k, r')`` of the projection of the sparse
        tensor with ``values`` (concatenated order, ``(N,)``) at problem ``b``'s samples onto
        the tangent space at TT ``b`` (left-orthogonal cores ``U``, right-orthogonal ``V``,
        ``V[0]`` unused), before the gauge projection. One sparse projection of the stacked
        TT (blocked or compiled kernels), no autograd. O(N d r^2)."""
        self.check_batch_cores(U, "U")
        if not isinstance(values, torch.Tensor) or values.shape != (len(self),):
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"values: expected shape ({len(self)},), got {got}")
        if len(self) == 0:
            return [torch.zeros_like(u) for u in U]
        return self.stacked.project(list(U), list(V), values)

    def sampled_point(self, U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]]):
        """The :class:`SampledPoint` (or its compiled counterpart) of the ``B`` points with
        batched cores ``U``, ``V`` ``(B, r, n_k, r')``: the per-sample vectors of all points,
        for Riemannian CG over the batch. Its :meth:`~SampledPoint.project` returns batched
        ``D_k`` and its :meth:`~SampledPoint.tangent` takes batched deltas; sum per problem
        in its layout with :meth:`layout_sum`. O(N d r^2)."""
        self.check_batch_cores(U, "U")
        return self.stacked.sampled_point(list(U), list(V))

    def layout_problem(self, point) -> torch.Tensor:
        """The problem of every slot of ``point``'s last layout (``B`` for padding slots),
        cached per layout."""
        key = id(point.layout)
        hit = self._slot_problem.get(key)
        if hit is not None and hit[0] is point.layout:
            return hit[1]
        lay = point.from_samples(self.problem + 1)  # padding slots read 0
        out = torch.where(lay > 0, lay - 1, self.batch_size)
        self._slot_problem[key] = (point.layout, out)
        return out

    def layout_sum(self, point, x: torch.Tensor) -> torch.Tensor:
        """``(slots,)`` in ``point``'s last layout -> ``(B,)`` summed per problem. O(N)."""
        out = x.new_zeros(self.batch_size + 1)
        return out.index_add_(0, self.layout_problem(point), x)[:self.batch_size]
