"""Sampled entries on the compiled CPU kernels (the ``"sampled"`` set of
:mod:`ttmanifold.kernels`): the same interface and values as the torch kernels of
:mod:`.blocked`, different layouts.

Per block of merged modes (the partition of :meth:`IndexSet.bounds
<ttmanifold.IndexSet.bounds>`) the samples are sorted by their merged index, without
padding. A sweep step reads one block's rows in order, multiplies each by its group's
merged core and writes the result straight into the next block's order, one fused pass;
the right sweep runs inside the first gradient scatter (one pass per block for both), and
the tangent values are one pass per block. The first block's left vectors and the
next-to-last block's right vectors are rows of the first / last merged core: the kernels
read them from that table by index instead of a stored ``(N, r)`` array. Per-sample
scalars are in sample order. Design and measured costs: ``docs/sampled_entries.md``.

The functions :func:`values`, :func:`sampled_point` and :func:`project` take the compiled
module first; :mod:`ttmanifold.kernels` calls them (see :mod:`.index_set`).
"""
from __future__ import annotations

import threading
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import kernels
from .blocked import (check_deltas, check_per_sample, merged, ranks_of, split_block_grad,
                      tangent_block)

__all__ = ["MIN_SAMPLES", "applies", "values", "sampled_point", "project", "CompiledPlan",
           "CompiledSampledPoint"]

# Index sets smaller than this stay on the torch kernels. The compiled ones are 2.4-3x
# faster from a few hundred samples on (Riemannian gradient of a sampled loss, r = 4 and
# 10, measured); the bound only keeps tiny runs (most tests, the quick comparison) from
# starting the background build, which competes with what they time.
MIN_SAMPLES = 1 << 11

# The first / last merged core is read in place by the kernels (rows by index) when it has
# at most this many bytes (it then stays in the per-core cache); a larger one is gathered
# into an (N, r) array once, as its irregular reads would miss the cache in every pass.
TABLE_BYTES = 1 << 19


def _small_table(t: torch.Tensor) -> bool:
    return t.numel() * t.element_size() <= TABLE_BYTES


def applies(iset, *args, **kwargs) -> bool:
    """Whether the compiled kernels are meant for this index set (its size)."""
    return MIN_SAMPLES <= len(iset) < 2 ** 31 - 1


def plan_for(iset, ranks: Sequence[int]) -> "CompiledPlan":
    """The sorted-group layouts of ``iset`` for TT-ranks ``ranks``, built once per block
    partition and kept on the index set."""
    bounds = tuple(iset.bounds(ranks))
    plans = iset.compiled_plans
    plan = plans.get(bounds)
    if plan is None:
        plan = CompiledPlan(iset, bounds)
        plans[bounds] = plan
    return plan


def values(mod, iset, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The entries of the TT with ``cores`` at the samples (sample order). O(N d r^2)."""
    if len(iset) == 0:
        return cores[0].new_zeros(0)
    return _values(mod, plan_for(iset, ranks_of(cores)), cores)


def sampled_point(mod, iset, U: Sequence[torch.Tensor], V: Sequence[torch.Tensor]):
    """A :class:`CompiledSampledPoint` (the interface of :class:`~.blocked.SampledPoint`)."""
    return CompiledSampledPoint(mod, plan_for(iset, ranks_of(U)), U, V)


def project(mod, iset, U, V, vals: torch.Tensor) -> List[torch.Tensor]:
    """``D_k`` of the sparse projection (before the gauge projection), see
    :func:`~.blocked.blocked_project`."""
    return sampled_point(mod, iset, U, V).project(vals)


class CompiledPlan:
    """Sorted-group layouts of the samples of an index set for one block partition."""

    def __init__(self, iset, bounds: Tuple[Tuple[int, int], ...]):
        self.iset = iset
        self.bounds = bounds
        N = len(iset)
        dev = iset.indices.device
        B = len(bounds)
        self.off: List[torch.Tensor] = []
        self.perm: List[torch.Tensor] = []  # order position -> sample
        inv: List[torch.Tensor] = []  # sample -> order position
        ar = torch.arange(N, device=dev, dtype=torch.int32)
        prev_key, prev_P = None, 1
        keys = []
        for lo, hi in bounds:
            P = iset.merged_count(lo, hi)
            key = iset.block_key(lo, hi)
            keys.append(key)
            # inside a group, samples in the order of their previous block's group: a left
            # step then fills every destination group front to back (cache-friendly writes)
            order = torch.argsort(key if prev_key is None else key * prev_P + prev_key,
                                  stable=True)
            prev_key, prev_P = key, P
            counts = torch.bincount(key, minlength=P)
            self.off.append(torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]))
            self.perm.append(order.to(torch.int32))
            iv = torch.empty(N, dtype=torch.int32, device=dev)
            iv[order] = ar
            inv.append(iv)
        # left sweep: block b's rows go to block b+1's order; the last step to sample order
        self.dst_left = [inv[b + 1].index_select(0, self.perm[b]) for b in range(B - 1)]
        self.dst_left.append(self.perm[B - 1])
        # right sweep: block b's rows go to block b-1's order
        self.dst_right: List[Optional[torch.Tensor]] = [None] + [
            inv[b - 1].index_select(0, self.perm[b]) for b in range(1, B)]
        self.inv = inv
        # The first left step and the last right step start from ones: their results are
        # rows of the first / last merged core, picked by the first / last block's group.
        # The kernels read them from that small table by these indices (no (N, r) array
        # of them is written, nor streamed by the passes that use them).
        self.first_groups = self.last_groups = None
        if B > 1:
            self.first_groups = keys[0].index_select(0, self.perm[1]).to(torch.int32)
            self.last_groups = keys[B - 1].index_select(0, self.perm[B - 2]).to(torch.int32)
        self.mask = torch.ones(N, dtype=torch.bool, device=dev)
        self.free: List[Dict] = []  # idle workspaces
        self._lock = threading.Lock()  # the pool is shared by threads
        self._ones: Dict[torch.dtype, torch.Tensor] = {}

    def ones(self, dtype) -> torch.Tensor:
        t = self._ones.get(dtype)
        if t is None:
            t = torch.ones(len(self.iset), 1, dtype=dtype, device=self.iset.indices.device)
            self._ones[dtype] = t
        return t

    def acquire(self, dtype, ranks) -> Dict:
        key = (dtype, tuple(ranks))
        with self._lock:
            for j, ws in enumerate(self.free):
                if ws["key"] == key:
                    return self.free.pop(j)
        return {"key": key}

    def release(self, ws: Dict) -> None:
        """Keep one idle workspace per dtype and ranks (the last released)."""
        with self._lock:
            self.free = [w for w in self.free if w["key"] != ws["key"]] + [ws]


def _buf(ws: Dict, name, rows: int, cols: int, dtype, device) -> torch.Tensor:
    """A persistent (rows, cols) buffer of the workspace (fresh large tensors cost page
    faults that exceed the arithmetic)."""
    t = ws.get(name)
    if t is None or tuple(t.shape) != (rows, cols):
        t = torch.empty(rows, cols, dtype=dtype, device=device)
        ws[name] = t
    return t


def _left_sweep(mod, plan: CompiledPlan, cores: Sequence[torch.Tensor], ws: Dict, ranks):
    """The left vectors of every block in its order, ``L = [ones, l_1, ...]`` with their
    row indices ``Lidx`` (None: ``L[b]`` holds the rows in order; else ``L[b]`` is a table
    and row i is ``L[b][Lidx[b][i]]``), and the values at the samples (sample order, a new
    tensor: callers may keep it, e.g. the output of :meth:`IndexSet.gather`).

    The first block's left vectors are rows of the first merged core: the kernels read
    them from that table (in cache) by the first block's group, so no ``(N, r)`` array of
    them is written or streamed. The others are pooled buffers of ``ws``."""
    N = len(plan.iset)
    dtype, device = cores[0].dtype, cores[0].device
    B = len(plan.bounds)
    L: List[torch.Tensor] = [plan.ones(dtype)]
    Lidx: List[Optional[torch.Tensor]] = [None]
    for b, (lo, hi) in enumerate(plan.bounds):
        with kernels.serial_small_ops():  # small products: no OpenMP team to wait for
            M = merged(cores, lo, hi).permute(1, 0, 2).contiguous()
        if b == 0 and B > 1 and _small_table(M):
            L.append(M.view(M.shape[0], -1))
            Lidx.append(plan.first_groups)
            continue
        out = (_buf(ws, ("L", b + 1), N, ranks[hi], dtype, device) if b + 1 < B
               else torch.empty(N, 1, dtype=dtype, device=device))
        if b == 0 and B > 1:
            mod.gather(M.view(M.shape[0], -1), plan.first_groups, out)
        else:
            mod.step(L[b], M, plan.off[b], plan.dst_left[b], out, Lidx[b])
        if b + 1 < B:
            L.append(out)
            Lidx.append(None)
    return L, Lidx, out.view(-1)


def _values(mod, plan: CompiledPlan, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The entries of the TT with ``cores`` at the samples (sample order): the left sweep
    alone, on a pooled workspace. Returns a new tensor."""
    ranks = ranks_of(cores)
    ws = plan.acquire(cores[0].dtype, ranks)
    try:
        with torch.no_grad():
            return _left_sweep(mod, plan, cores, ws, ranks)[2]
    finally:
        plan.release(ws)


class CompiledSampledPoint:
    """:class:`~ttmanifold.tt.SampledPoint` on the compiled kernels (CPU, float32 or
    float64). Per-sample scalars are in sample order: :meth:`to_samples` and
    :meth:`from_samples` are the identity and :attr:`mask` is all true.

    The left sweep runs at construction (it gives :attr:`values`); the right sweep runs
    with the first :meth:`project`, fused with its scatter (one read of each block's right
    vectors for both), or on first use of :attr:`R`."""

    def __init__(self, mod, plan: CompiledPlan, U: Sequence[torch.Tensor],
                 V: Sequence[torch.Tensor]):
        self.mod = mod
        self.plan = plan
        self.U, self.V = list(U), list(V)
        ranks = ranks_of(U)
        self._ranks = ranks
        ws = plan.acquire(U[0].dtype, ranks)
        self._ws = ws
        weakref.finalize(self, plan.release, ws)
        with torch.no_grad():
            self.L, self.Lidx, self.values = _left_sweep(mod, plan, self.U, ws, ranks)
        self._R: Optional[List[torch.Tensor]] = None
        # row indices of the right vectors, as Lidx: the next-to-last block's are rows of
        # the last merged core, read from it by the last block's group (a small core)
        B = len(plan.bounds)
        self.Ridx: List[Optional[torch.Tensor]] = [None] * B
        if B > 1:
            self.Ridx[B - 2] = plan.last_groups

    def _right_buffers(self) -> List[torch.Tensor]:
        """``[R_0, ..., R_{B-1}]``: pooled buffers for blocks 0..B-3, for block B-2 the last
        merged core as a table (its rows picked by :attr:`Ridx`; a large core is gathered
        into a pooled buffer instead, and ``Ridx[B-2]`` becomes None), ones for the last."""
        plan = self.plan
        N = len(plan.iset)
        dtype, device = self.values.dtype, self.values.device
        B = len(plan.bounds)
        R = [_buf(self._ws, ("R", b), N, self._ranks[plan.bounds[b][1]], dtype, device)
             for b in range(B - 2)]
        if B > 1:
            Mt = self._right_core(B - 1)
            table = Mt.view(Mt.shape[0], -1)
            if not _small_table(table):
                out = _buf(self._ws, ("R", B - 2), N, table.shape[1], dtype, device)
                self.mod.gather(table, plan.last_groups, out)
                table = out
                self.Ridx[B - 2] = None
            R.append(table)
        return R + [plan.ones(dtype)]

    def _right_core(self, b: int) -> torch.Tensor:
        lo, hi = self.plan.bounds[b]
        with kernels.serial_small_ops(), torch.no_grad():
            return merged(self.V, lo, hi).permute(1, 2, 0).contiguous()

    @property
    def R(self) -> List[torch.Tensor]:
        """The right vectors of every block in its order (the right sweep, run once)."""
        if self._R is None:
            plan = self.plan
            R = self._right_buffers()
            B = len(plan.bounds)
            with torch.no_grad():
                for b in range(B - 2, 0, -1):
                    self.mod.step(R[b], self._right_core(b), plan.off[b], plan.dst_right[b],
                                  R[b - 1], self.Ridx[b])
            self._R = R
        return self._R

    @property
    def layout(self):
        """Identifies the order of :attr:`values` (here: sample order, per plan)."""
        return self.plan

    @property
    def mask(self) -> torch.Tensor:
        return self.plan.mask

    def to_samples(self, v: torch.Tensor) -> torch.Tensor:
        check_per_sample(v, self.values.shape[0], self.values, "v", False)
        return v

    def from_samples(self, x: torch.Tensor) -> torch.Tensor:
        check_per_sample(x, self.values.shape[0], self.values, "x", False)
        return x

    def project(self, z: torch.Tensor) -> List[torch.Tensor]:
        """``D_k`` of the projection of the sparse tensor with values ``z`` (sample order),
        before the gauge projection. The first call also runs the right sweep, fused with
        the scatter (``step_outer``: per block, one pass over its right vectors)."""
        check_per_sample(z, self.values.shape[0], self.values, "z")
        nat = self.mod
        plan = self.plan
        shape = plan.iset.shape
        D: List[Optional[torch.Tensor]] = [None] * len(shape)
        z = z.contiguous()
        fused = self._R is None
        R = self._right_buffers() if fused else self._R
        B = len(plan.bounds)
        zb = _buf(self._ws, "zb", len(z), 1, z.dtype, z.device).view(-1)
        with torch.no_grad():
            for b in range(B - 1, -1, -1):
                lo, hi = plan.bounds[b]
                P = plan.off[b].numel() - 1
                C = z.new_empty(P, self.L[b].shape[1], R[b].shape[1])
                # the weights in the block's order: one gather here is cheaper than the
                # same scattered reads inside the kernel
                nat.gather(z, plan.perm[b], zb)
                if fused and 0 < b < B - 1:  # (the last block's step is the table R[B-2])
                    nat.step_outer(R[b], self._right_core(b), plan.dst_right[b], R[b - 1],
                                   self.L[b], zb, plan.off[b], None, C, self.Lidx[b],
                                   self.Ridx[b])
                else:
                    nat.outer(self.L[b], R[b], zb, plan.off[b], None, C, self.Lidx[b],
                              self.Ridx[b])
                with kernels.serial_small_ops():
                    D[lo:hi] = split_block_grad(C.permute(1, 0, 2), self.U, self.V, lo, hi,
                                                shape)
        self._R = R
        return D

    def tangent(self, dU: Sequence[torch.Tensor]) -> torch.Tensor:
        """The tangent vector with deltas ``dU`` at the samples (sample order): per block,
        the row-wise products ``l T r`` with its merged tangent core (block order), then
        gathered into sample order and summed (one kernel call for both)."""
        check_deltas(dU, self.U)
        nat = self.mod
        plan = self.plan
        N = len(plan.iset)
        R = self.R
        dtype, device = self.values.dtype, self.values.device
        with torch.no_grad():
            e = torch.empty(N, dtype=dtype, device=device)  # sample order, a new tensor
            t = _buf(self._ws, "t", N, 1, dtype, device).view(-1)
            for b, (lo, hi) in enumerate(plan.bounds):
                with kernels.serial_small_ops():
                    T = tangent_block(self.U, self.V, dU, lo, hi).permute(1, 0, 2).contiguous()
                nat.rowdot(self.L[b], T, R[b], plan.off[b], t, self.Lidx[b], self.Ridx[b])
                nat.gather(t, plan.inv[b], e, b > 0)
        return e
