"""The torch kernels of sampled entries on the blocked layouts (:mod:`.layout`): the
values of a TT at the samples, the sparse tangent-space projection and
:class:`SampledPoint`, the per-sample vectors that Riemannian CG for completion keeps.

Every step is a grouped ``torch.bmm`` per width class of a block plus one
``index_select`` to change layouts; buffers come from a :class:`~.layout.Workspace` and
are reused. All of it runs without autograd. Design and costs:
``docs/sampled_entries.md``.
"""
from __future__ import annotations

import weakref
from typing import List, Optional, Sequence

import torch

from .layout import Block, Partition, Workspace

__all__ = ["SampledPoint", "blocked_values", "blocked_project", "merged", "tangent_block",
           "split_block_grad", "ranks_of", "stacked", "check_per_sample", "check_deltas"]


def ranks_of(cores: Sequence[torch.Tensor]) -> List[int]:
    """The ``d + 1`` TT-ranks of a list of cores (or of batched cores ``(B, r, n, r')``)."""
    return [int(c.shape[-3]) for c in cores] + [int(cores[-1].shape[-1])]


def check_per_sample(x, n: int, like: torch.Tensor, name: str, dtype: bool = True) -> None:
    """Raise ``ValueError`` / ``TypeError`` naming ``name`` unless ``x`` is a tensor of shape
    ``(n,)`` with ``like``'s device and (with ``dtype``) dtype: per-sample scalars of a
    sampled point (the kernels would fail inside, or read a shorter vector silently; layout
    changes take any dtype). Cost O(1), no sync."""
    if not isinstance(x, torch.Tensor) or x.shape != (n,):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected shape ({n},), got {got}")
    if (dtype and x.dtype != like.dtype) or x.device != like.device:
        raise TypeError(f"{name}: dtype {x.dtype} on {x.device}, the point's values are "
                        f"{like.dtype} on {like.device}")


def check_deltas(dU, U: Sequence[torch.Tensor], name: str = "dU") -> None:
    """Raise naming ``name`` unless ``dU`` are ``len(U)`` tensors of ``U``'s shapes, dtype
    and device (the deltas of a tangent vector at the point with cores ``U``). Cost O(d)."""
    if (isinstance(dU, torch.Tensor) or not isinstance(dU, (list, tuple)) or len(dU) != len(U)
            or any(not isinstance(g, torch.Tensor) or g.shape != u.shape
                   for g, u in zip(dU, U))):
        raise ValueError(f"{name}: expected {len(U)} deltas of the point's core shapes "
                         f"{[tuple(u.shape) for u in U]}")
    for k, g in enumerate(dU):
        if g.dtype != U[0].dtype or g.device != U[0].device:
            raise TypeError(f"{name}: delta {k} has dtype {g.dtype} on {g.device}, the point "
                            f"{U[0].dtype} on {U[0].device}")


# -- row-major buffer operations ---------------------------------------------------------
# A per-sample buffer of a layout is (slots + 1, r); its extra row is zero and padding
# slots of the layout maps point to it.

def col(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` slots of a width-1 buffer as a 1-D view."""
    return t[:n, 0]


def seg_views(blk: Block, t: torch.Tensor) -> List[torch.Tensor]:
    """The ``(S_j, w_j, r)`` views of a buffer's slots, one per width class of ``blk``."""
    return [t[o0:o0 + n * wj].view(n, wj, t.shape[1]) for o0, n, wj, _ in blk.classes]


def step_out(ws: Workspace, blk: Block, rb: int, name="scratch") -> torch.Tensor:
    """The ``(slots + 1, rb)`` output buffer of :func:`step` (named buffer of ``ws``)."""
    return ws.flat(name, (blk.slots + 1) * rb).view(blk.slots + 1, rb)


def step(blk: Block, a: torch.Tensor, mats, out: torch.Tensor) -> torch.Tensor:
    """``out[s] = a[s] @ mats[segment(s)]`` for every slot (padding slots give 0)."""
    ms = mats if isinstance(mats, list) else [mats]
    for av, ov, m in zip(seg_views(blk, a), seg_views(blk, out), ms):
        torch.bmm(av, m, out=ov)
    out[blk.slots].zero_()
    return out


def step_col(blk: Block, out: torch.Tensor) -> torch.Tensor:
    """A width-1 :func:`step` result as a 1-D ``(slots,)`` view."""
    return out[:blk.slots, 0]


def rowdot(blk: Block, t: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``sum_f t[s, f] R[s, f]`` for every slot, ``(slots,)``. One fused ``einsum`` pass: it
    reduces the products without writing them (about 1.3x faster than mul + sum)."""
    return torch.einsum("sf,sf->s", t[:blk.slots], R[:blk.slots])


def outer(blk: Block, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``C[g] = sum_{slots s of group g} left[s]^T right[s]``, ``(P, a, b)``."""
    a, b = left.shape[1], right.shape[1]
    if not blk.S:
        return left.new_zeros(blk.P, a, b)
    c = [torch.bmm(lv.transpose(1, 2), rv)
         for lv, rv in zip(seg_views(blk, left), seg_views(blk, right))]
    return blk.seg_sum(c if len(c) > 1 else c[0])


def table(rows: torch.Tensor) -> torch.Tensor:
    """``(P, r)`` rows -> a source buffer for :func:`move` (a zero row appended)."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[1])], 0)


def move(m: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``dst[s] = src[m[s]]`` for the first ``len(m)`` slots of ``dst`` (``src``'s zero slot
    is the target of padding)."""
    n = m.numel()
    if n:
        if src.shape[1] == 1:  # a 1-D gather is about 3x faster than one on (slots, 1) rows
            torch.index_select(src.view(-1), 0, m, out=dst.view(-1)[:n])
        else:
            torch.index_select(src, 0, m, out=dst[:n])
    return dst


def move_step(part: Partition, kind: str, b: int, out: torch.Tensor,
              dst: torch.Tensor) -> torch.Tensor:
    """:func:`move` with map ``part.fwd[b]`` (``kind="fwd"``) or ``part.bwd[b]``."""
    return move(getattr(part, kind)[b], out, dst)


def cols(mats) -> int:
    """Columns of segmented matrices (:meth:`Block.seg`: a tensor or a list)."""
    return int((mats[0] if isinstance(mats, list) else mats).shape[2])


# -- merged cores ------------------------------------------------------------------------
# Batched cores (B, r, n, r') are the cores of a batch of B TTs evaluated at the samples of
# a stacked index set (index_set.StackedIndexSet): merged index b P + i of a block is the
# merged index i of TT b, so a merged core is merged per TT (batched products) and stacked.

def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(ra, n1, rb) x (rb, n2, rc) -> (ra, n1 n2, rc), the merged core (row-major index);
    leading batch dimensions are kept."""
    ra, n1, rb = a.shape[-3:]
    n2, rc = b.shape[-2], b.shape[-1]
    bs = tuple(a.shape[:-3])
    return (a.reshape(bs + (ra * n1, rb)) @ b.reshape(bs + (rb, n2 * rc))).reshape(
        bs + (ra, n1 * n2, rc))


def stacked(c: torch.Tensor) -> torch.Tensor:
    """A batched merged core (B, r, P, r') -> (r, B P, r'), TT b's rows at b P + i; a 3-D
    core is returned as it is."""
    if c.dim() == 3:
        return c
    return c.permute(1, 0, 2, 3).reshape(c.shape[1], -1, c.shape[3])


def merged(cores: Sequence[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    c = cores[lo]
    for k in range(lo + 1, hi):
        c = merge(c, cores[k])
    return stacked(c)


def tangent_block(U, V, dU, lo: int, hi: int) -> torch.Tensor:
    """Merged core of ``sum_{k in lo..hi-1} U_lo..U_{k-1} dU_k V_{k+1}..V_{hi-1}``."""
    s, pu = dU[lo], U[lo]
    for k in range(lo + 1, hi):
        s = merge(s, V[k]) + merge(pu, dU[k])
        pu = merge(pu, U[k])
    return stacked(s)


def split_block_grad(C: torch.Tensor, U, V, lo: int, hi: int, shape) -> List[torch.Tensor]:
    """``D_k`` for k in lo..hi-1 from the block scatter ``C`` (r_lo, P, r_hi):
    contract C with ``U_lo..U_{k-1}`` on the left and ``V_{k+1}..V_{hi-1}`` on the right.
    For batched cores ``(B, r, n, r')`` (``C`` stacked, ``(r_lo, B P, r_hi)``) the ``D_k``
    are batched too, ``(B, r, n_k, r')``, and ``shape`` is not used."""
    if U[lo].dim() == 4:
        return split_batched(C, U, V, lo, hi)
    if hi - lo == 1:
        return [C]
    out = []
    r_hi = C.shape[2]
    for k in range(lo, hi):
        X = C
        a = C.shape[0]
        for j in range(lo, k):
            u = U[j]
            X = u.reshape(a * shape[j], u.shape[2]).transpose(0, 1) @ X.reshape(a * shape[j], -1)
            a = u.shape[2]
        bdim = r_hi
        for j in range(hi - 1, k, -1):
            v = V[j]
            X = X.reshape(-1, shape[j] * bdim) @ v.reshape(v.shape[0], -1).transpose(0, 1)
            bdim = v.shape[0]
        out.append(X.reshape(a, shape[k], bdim))
    return out


def split_batched(C: torch.Tensor, U, V, lo: int, hi: int) -> List[torch.Tensor]:
    """:func:`split_block_grad` for batched cores: per TT, one batched product per step."""
    nb = U[lo].shape[0]
    C = C.reshape(C.shape[0], nb, -1, C.shape[2]).permute(1, 0, 2, 3)  # (B, r_lo, P, r_hi)
    if hi - lo == 1:
        return [C.contiguous()]
    out = []
    r_hi = C.shape[3]
    for k in range(lo, hi):
        X = C
        a = C.shape[1]
        for j in range(lo, k):
            u = U[j]
            n = u.shape[2]
            X = u.reshape(nb, a * n, u.shape[3]).transpose(1, 2) @ X.reshape(nb, a * n, -1)
            a = u.shape[3]
        bdim = r_hi
        for j in range(hi - 1, k, -1):
            v = V[j]
            vt = v.reshape(nb, v.shape[1], -1).transpose(1, 2)
            X = X.reshape(nb, -1, v.shape[2] * bdim) @ vt
            bdim = v.shape[1]
        out.append(X.reshape(nb, a, U[k].shape[2], bdim))
    return out


def ones(ws: Workspace, blk: Block, name) -> torch.Tensor:
    """A width-1 buffer holding 1 at the real slots of ``blk`` and 0 elsewhere."""
    t = ws.ext((name, blk.lo, blk.hi), blk.slots, 1)
    col(t, blk.slots).copy_(blk.mask)
    return t


def left_sweep(part: Partition, U, ws: Workspace, tag) -> List[torch.Tensor]:
    """Left vectors ``l_lo`` of every block in its layout (kept in ``ws``); the values of
    the TT at the samples are left in ``ws`` under ``(tag, "values")`` (last layout, a
    :func:`step_out` buffer)."""
    blocks = part.blocks
    L = [ones(ws, blocks[0], "ones")]
    if len(blocks) > 1:  # first step from ones: rows of the first merged core
        w0 = merged(U, blocks[0].lo, blocks[0].hi)[0]
        L.append(move(part.first_map, table(w0), ws.ext((tag, 1), blocks[1].slots,
                                                             w0.shape[1])))
    for b in range(len(L) - 1, len(blocks)):
        blk = blocks[b]
        mats = blk.seg(merged(U, blk.lo, blk.hi).permute(1, 0, 2))
        if b + 1 < len(blocks):
            out = step(blk, L[b], mats, step_out(ws, blk, cols(mats)))
            L.append(move_step(part, "fwd", b, out, ws.ext((tag, b + 1), blocks[b + 1].slots,
                                                             cols(mats))))
        else:
            step(blk, L[b], mats, step_out(ws, blk, 1, (tag, "values")))
    return L


class SampledPoint:
    """The per-sample left and right vectors of one TT point ``X`` (left-orthogonal cores
    ``U``, right-orthogonal cores ``V``) at an :class:`IndexSet`, in the blocked layouts:
    what Riemannian CG for completion needs at ``X``.

    Built by :meth:`IndexSet.sampled_point` with one left and one right sweep
    (O(N d r^2), one grouped product and one layout change per block); then

    - :attr:`values`: ``X`` at the samples (in the last block's layout, zero padding; a
      view of the point's buffers, valid while the point lives);
    - :meth:`project` ``(z)``: the ``D_k`` of the Riemannian projection of the sparse tensor
      with values ``z`` (given in the last layout), one grouped product per block;
    - :meth:`tangent` ``(dU)``: the tangent vector ``sum_k U_<k dU_k V_>k`` at the samples
      (last layout), one grouped product per block with the kept vectors;
    - :meth:`to_samples` / :meth:`from_samples`: last layout <-> sample order.

    The buffers (``2 sum_b slots_b r_b`` numbers, ``slots_b`` about ``1.1-1.2 N``) come
    from a pool on the index set and go back to it when this object is garbage collected,
    so a CG iteration allocates nothing large once the pool is warm. Runs without autograd.
    """

    def __init__(self, iset, U: Sequence[torch.Tensor], V: Sequence[torch.Tensor]):
        self.iset = iset
        self.U, self.V = list(U), list(V)
        dtype, device = U[0].dtype, U[0].device
        ws = iset.acquire_workspace(dtype, device)
        self._ws = ws
        weakref.finalize(self, iset.release_workspace, ws)
        self.part = part = iset.partition(ranks_of(U))
        blocks = part.blocks
        B = len(blocks)
        with torch.no_grad():
            self.L = left_sweep(part, U, ws, "L")
            last = blocks[-1]
            self.values = step_col(last, step_out(ws, last, 1, ("L", "values")))
            R: List[Optional[torch.Tensor]] = [None] * B
            R[B - 1] = ones(ws, last, "onesR")
            top = B - 1
            if B > 1:  # first right step from ones: columns of the last merged core
                wl = merged(V, last.lo, last.hi)[:, :, 0].t()
                R[B - 2] = move(part.last_map, table(wl),
                                  ws.ext(("R", B - 2), blocks[B - 2].slots, wl.shape[1]))
                top = B - 2
            for b in range(top, 0, -1):
                blk = blocks[b]
                mats = blk.seg(merged(V, blk.lo, blk.hi).permute(1, 2, 0))
                out = step(blk, R[b], mats, step_out(ws, blk, cols(mats)))
                R[b - 1] = move_step(part, "bwd", b, out, ws.ext(("R", b - 1),
                                                                   blocks[b - 1].slots,
                                                                   cols(mats)))
            self.R = R

    @property
    def layout(self):
        """Identifies the last layout (the order of :attr:`values`)."""
        return self.part.blocks[-1]

    @property
    def mask(self) -> torch.Tensor:
        """Real (non-padding) slots of the last layout."""
        return self.part.blocks[-1].mask

    def to_samples(self, v: torch.Tensor) -> torch.Tensor:
        """Last-layout values (slots,) -> (N,) in sample order."""
        check_per_sample(v, self.values.shape[0], self.values, "v", False)
        return self.part.blocks[-1].to_samples(v)

    def from_samples(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) in sample order -> (slots,) in the last layout (zero padding)."""
        check_per_sample(x, len(self.iset), self.values, "x", False)
        return self.part.blocks[-1].layout_vector(x)

    def project(self, z: torch.Tensor) -> List[torch.Tensor]:
        """``D_k[:, i, :] = sum_{e: i_k(e) = i} z_e l_k(e)^T rho_{k+1}(e)^T`` for every k,
        ``z`` in the last layout (slots,) with zero padding. Gauge projection not applied."""
        check_per_sample(z, self.values.shape[0], self.values, "z")
        iset, part, ws = self.iset, self.part, self._ws
        blocks = part.blocks
        B = len(blocks)
        D: List[Optional[torch.Tensor]] = [None] * len(iset.shape)
        with torch.no_grad():
            zb = ws.view(("z", (B - 1) % 2), blocks[-1].slots, 1)
            col(zb, blocks[-1].slots).copy_(z)
            for b in range(B - 1, -1, -1):
                blk = blocks[b]
                if b < B - 1:
                    zb = move(part.bwd[b + 1], zb, ws.view(("z", b % 2), blk.slots, 1))
                wgt = ws.scratch(blk.slots, self.R[b].shape[1])
                torch.mul(self.R[b], zb, out=wgt)
                C = outer(blk, self.L[b], wgt).permute(1, 0, 2)
                D[blk.lo:blk.hi] = split_block_grad(C, self.U, self.V, blk.lo, blk.hi,
                                                     iset.shape)
        return D

    def tangent(self, dU: Sequence[torch.Tensor]) -> torch.Tensor:
        """``xi(i_e) = sum_k l_k(e)^T dU_k[i_k(e)] rho_{k+1}(e)`` (the tangent vector with
        deltas ``dU`` at the samples), in the last layout (slots,), zero padding."""
        check_deltas(dU, self.U)
        part, ws = self.part, self._ws
        blocks = part.blocks
        with torch.no_grad():
            acc = None
            for b, blk in enumerate(blocks):
                mats = blk.seg(tangent_block(self.U, self.V, dU, blk.lo, blk.hi)
                               .permute(1, 0, 2))
                t = step(blk, self.L[b], mats, step_out(ws, blk, cols(mats)))
                eb = rowdot(blk, t, self.R[b])  # (slots,)
                e = ws.view(("e", b % 2), blk.slots, 1)
                if acc is None:
                    col(e, blk.slots).copy_(eb)
                else:
                    move(part.fwd[b - 1], acc, e)
                    col(e, blk.slots).add_(eb)
                acc = e
            return col(acc, blocks[-1].slots).clone()


def blocked_values(iset, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The entries of the TT with ``cores`` at the samples of ``iset`` (sample order), on
    the blocked layouts with reused buffers; no autograd. O(N d r^2)."""
    N = len(iset)
    if N == 0:
        return cores[0].new_zeros(0)
    ws = iset.workspace(cores[0].dtype, cores[0].device)
    part = iset.partition(ranks_of(cores))
    blocks = part.blocks
    if len(blocks) == 1:
        a, b0 = ones(ws, blocks[0], "ones"), 0
    else:  # first step from ones: rows of the first merged core
        w0 = merged(cores, blocks[0].lo, blocks[0].hi)[0]
        a = move(part.first_map, table(w0), ws.view(("pingpong", 1), blocks[1].slots,
                                                    w0.shape[1]))
        b0 = 1
    for b in range(b0, len(blocks)):
        blk = blocks[b]
        mats = blk.seg(merged(cores, blk.lo, blk.hi).permute(1, 0, 2))
        out = step(blk, a, mats, step_out(ws, blk, cols(mats)))
        if b + 1 < len(blocks):
            a = move_step(part, "fwd", b, out, ws.view(("pingpong", (b + 1) % 2),
                                                       blocks[b + 1].slots, cols(mats)))
    return blocks[-1].to_samples(step_col(blocks[-1], out))


def blocked_project(iset, U, V, values: torch.Tensor) -> List[torch.Tensor]:
    """``D_k`` of the projection of the sparse tensor with ``values`` at the samples of
    ``iset`` onto the tangent space at the TT with left-orthogonal cores ``U`` and
    right-orthogonal cores ``V`` (before the gauge projection): one left sweep (kept), then
    the right sweep started from the values (so the right vectors are ``values * rho``)
    with one grouped scatter per block. No autograd. O(N d r^2)."""
    ws = iset.workspace(values.dtype, values.device)
    part = iset.partition(ranks_of(U))
    blocks = part.blocks
    B = len(blocks)
    L = left_sweep(part, U, ws, "L")
    last = blocks[-1]
    rt = ws.view(("rt", (B - 1) % 2), last.slots, 1)
    col(rt, last.slots).copy_(last.layout_vector(values))
    D: List[Optional[torch.Tensor]] = [None] * len(iset.shape)
    for b in range(B - 1, -1, -1):
        blk = blocks[b]
        C = outer(blk, L[b], rt).permute(1, 0, 2)
        D[blk.lo:blk.hi] = split_block_grad(C, U, V, blk.lo, blk.hi, iset.shape)
        if b > 0:
            mats = blk.seg(merged(V, blk.lo, blk.hi).permute(1, 2, 0))
            out = step(blk, rt, mats, step_out(ws, blk, cols(mats)))
            rt = move_step(part, "bwd", b, out, ws.view(("rt", (b - 1) % 2),
                                                        blocks[b - 1].slots, cols(mats)))
    return D
