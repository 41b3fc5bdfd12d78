"""Sampled entries of tensor trains: the kernels of tensor completion.

:class:`IndexSet` holds ``N`` multi-indices of a tensor of shape ``(n_1, ..., n_d)``. With it

- the values of a TT at the samples (:meth:`IndexSet.gather`),
- the left row vectors ``l_k = G_1[i_1] ... G_k[i_k]`` and right column vectors
  ``rho_k = G_k[i_k] ... G_d[i_d]`` (:meth:`IndexSet.left_vectors`,
  :meth:`IndexSet.right_vectors`),
- and the scatter ``D_k[:, i, :] = sum_{samples with i_k = i} z l_{k-1}^T rho_{k+1}^T``
  (:meth:`IndexSet.scatter`), the kernel of the Riemannian projection of a sparse tensor
  (Steinlechner 2016),

all cost O(N d r^2) flops and run as batched matrix products (``torch.bmm``).

Two implementations share the index set:

**Blocked layouts** (the fast path of :meth:`gather` without autograd, of
:meth:`~ttmanifold.FixedTTRank.project_sampled` and of Riemannian CG for completion,
:class:`SampledPoint`). Consecutive modes are merged into *blocks* while the mean number of
samples per merged index stays at least ``_MIN_GROUP`` (64): for ``n = 50`` and
``N = 10^6`` pairs of modes (2500 merged indices, ~400 samples each), which halves the
number of grouped products, because a product over a block uses the merged core
``G_k[i_k] G_{k+1}[i_{k+1}]`` (``P r^2`` numbers, P = merged indices). Per block the samples
are grouped by the merged index and stored in *segments* of a fixed width ``w`` (a group of
``c`` samples fills ``ceil(c / w)`` segments; ``w`` minimizes the padding plus a
per-segment cost), so any distribution of the indices, however unbalanced, pads at most
``w - 1`` rows per group; in row-major layouts the last segment of a group takes one of up
to ``_CLASSES`` widths (one ``bmm`` per width), which cuts the padding of balanced groups
from ~18% to ~2% of the slots. Groups are ordered by their last mode and the samples of a
group by the neighbouring blocks' last modes, which makes the layout changes more
cache-local. Per-sample vectors live in these layouts as ``(slots + 1, r)`` buffers
(row-major) or ``(r, slots + 1)`` (feature-major: float32 on one CPU thread, where its
faster ``bmm`` wins; with two threads its per-feature layout changes are slower, see
``_FEATURE_MAJOR_DTYPES``) whose extra slot is zero (padding slots point to it); going from one block's layout to the next is one ``index_select`` with a
precomputed map (one per feature in feature-major buffers, spread over Python threads
when torch may use several), a step is one ``bmm`` with the per-segment merged cores, and
the gradient scatter of a block is one ``bmm`` followed by small core contractions that
split it into the block's modes. The first left step and the first right step start from
ones, so they are a gather of merged-core rows straight into the next layout. Buffers are
allocated once and reused (``out=``; :class:`SampledPoint` takes them from a pool on the
index set), because fresh multi-hundred-megabyte tensors cost page faults that exceeded
the arithmetic.

**Per-mode sample-order kernels** (:meth:`left_vectors`, :meth:`right_vectors`,
:meth:`scatter`, and :meth:`gather` under autograd): samples grouped by their k-th index,
padded to the largest group, with a per-sample fallback (in chunks) when the groups are
very unbalanced.

Building the layouts sorts the indices once per block (a radix sort, O(N) per block) and
reads a few sizes on the host; reuse an :class:`IndexSet` across iterations.

**Compiled kernels** (:mod:`ttmanifold._native`, :mod:`ttmanifold._sampled_native`): on the
CPU in float32/float64, for index sets of at least ``_native.MIN_SAMPLES`` samples,
:meth:`IndexSet.sampled_point`, :meth:`IndexSet.gather` (with and without autograd) and the
blocked projection run on fused C++ kernels built on first use (same values, about 2x
faster); the torch kernels above serve every other case and any machine where the build
fails.
"""
from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import _native
from ._checks import check_shape

__all__ = ["IndexSet", "SampledPoint"]

_CHUNK = 1 << 16
_MIN_GROUP = 64  # merge consecutive modes while N / (merged index count) >= this
_SEG_COST = 64  # per-segment overhead in row equivalents (choice of the segment width)
_CLASSES = 8  # segment widths per block at most (row-major layouts)
_CLASS_MIN_SLOTS = 1 << 16  # several widths only for blocks at least this large
_CLASS_MIN_SAVING = 0.03  # ... and when they save at least this fraction of the slots


def _widths(counts: torch.Tensor, per_group: torch.Tensor, w: int, slots: int):
    """Width classes of the last segments: up to ``_CLASSES`` widths (quantiles of the
    last-segment lengths, the largest ``w``) and the class of every group's last segment.
    Returns ``([w], None)`` when they would not save ``_CLASS_MIN_SAVING`` of ``slots``."""
    nz = per_group > 0
    last = counts - (per_group - 1).clamp_min(0) * w  # length of the last segment
    lv = torch.sort(last[nz]).values
    m = lv.shape[0]
    qs = lv[[max(0, -(-j * m // _CLASSES) - 1) for j in range(1, _CLASSES)]].tolist()
    widths = sorted(set(int(v) for v in qs if 0 < v < w)) + [w]
    wt = torch.tensor(widths, device=counts.device, dtype=counts.dtype)
    jg = torch.searchsorted(wt, last.clamp_min(1))  # smallest width >= the last length
    new_slots = int(((per_group - 1).clamp_min(0) * w + wt[jg] * nz).sum())
    if len(widths) == 1 or new_slots > (1 - _CLASS_MIN_SAVING) * slots:
        return [w], None
    return widths, jg


def _index_dtype(bound: int) -> torch.dtype:
    return torch.int32 if bound < 2 ** 31 - 1 else torch.int64


class _ModePlan:
    """Per-mode grouping of the samples in sample order (the per-mode kernels)."""

    __slots__ = ("n", "maxc", "pad_map", "slot_of", "idx", "padded")

    def __init__(self, idx: torch.Tensor, n: int):
        N = idx.shape[0]
        self.n = n
        self.idx = idx
        counts = torch.bincount(idx, minlength=n)
        maxc = int(counts.max()) if N > 0 else 0  # host read, once per IndexSet
        self.maxc = maxc
        self.padded = N > 0 and n * maxc <= 4 * N + 4 * n
        if not self.padded:
            self.pad_map = None
            self.slot_of = None
            return
        order = torch.argsort(idx, stable=True)  # a radix sort for integer keys
        sorted_idx = idx[order]
        offsets = torch.cumsum(counts, 0) - counts
        pos = torch.arange(N, device=idx.device) - offsets[sorted_idx]
        slot = sorted_idx * maxc + pos
        itype = _index_dtype(max(N, n * maxc))
        pad_map = torch.full((n * maxc,), N, dtype=itype, device=idx.device)
        pad_map[slot] = order.to(itype)
        slot_of = torch.empty(N, dtype=itype, device=idx.device)
        slot_of[order] = slot.to(itype)
        self.pad_map = pad_map  # slot -> sample (N = padding)
        self.slot_of = slot_of  # sample -> slot

    def pad(self, a: torch.Tensor) -> torch.Tensor:
        """(N, m) per-sample rows -> (n, maxc, m) grouped, zero padded."""
        ext = torch.cat([a, a.new_zeros(1, a.shape[1])], 0)
        return ext.index_select(0, self.pad_map).view(self.n, self.maxc, a.shape[1])

    def unpad(self, a: torch.Tensor) -> torch.Tensor:
        """(n, maxc, m) grouped -> (N, m) per sample."""
        return a.reshape(-1, a.shape[-1]).index_select(0, self.slot_of)


# ---------------------------------------------------------------------------------------
# blocked layouts
# ---------------------------------------------------------------------------------------

class _Block:
    """The samples grouped by the merged index of modes ``lo..hi-1`` (row-major, ``P``
    values), in ``S`` segments (slot ``slots`` is the zero row of the buffers).

    A group of ``c`` samples fills ``ceil(c / w)`` segments: full ones of width ``w`` and a
    last one. With one width (``classes`` has one entry; ``w`` set) every segment has
    width ``w`` and ``slots = S w``. With several widths (``multi``, row-major layouts
    only; ``w`` is then ``None``) the last segment of a group gets the smallest of up to
    ``_CLASSES`` widths (quantiles of the last-segment lengths, and ``w``) that holds it:
    the layout is one run of segments per width (``classes``: ``(first slot, segments,
    width, merged index of each segment)``), and a grouped product is one ``bmm`` per
    width. That cuts the padding of balanced groups (e.g. ~400 +- 20 samples per group:
    ~18% padded slots with one width, ~2% with eight)."""

    __slots__ = ("lo", "hi", "P", "w", "S", "slots", "seg_group", "identity", "slot_of",
                 "sample_of", "mask", "ext_slot_of", "classes")

    def __init__(self, key: torch.Tensor, lo: int, hi: int, P: int,
                 gmap: Optional[torch.Tensor] = None, sec: Sequence[torch.Tensor] = (),
                 multi: bool = False):
        """``key``: the *order key* of every sample (values in ``[0, P)``; groups are laid
        out in increasing key); ``gmap[key]`` is the group's row-major merged index (the
        row of the merged core; ``None``: the key is that index). ``sec``: secondary sort
        keys inside a group (most significant first; then sample order). ``multi``: allow
        several segment widths."""
        N = key.shape[0]
        dev = key.device
        self.lo, self.hi, self.P = lo, hi, P
        counts = torch.bincount(key, minlength=P)
        if N == 0:
            w, S = 1, 0
        else:
            maxc = int(counts.max())  # host reads: once per block
            cands = [maxc] + [1 << j for j in range(3, 40) if (1 << j) < maxc]
            segs = torch.stack([torch.div(counts + (c - 1), c, rounding_mode="floor").sum()
                                for c in cands]).tolist()
            costs = [s * (c + _SEG_COST) for s, c in zip(segs, cands)]
            best = min(range(len(cands)), key=lambda j: (costs[j], -cands[j]))
            w, S = cands[best], int(segs[best])
        per_group = torch.div(counts + (w - 1), w, rounding_mode="floor")
        widths, jg = [w], None
        if multi and S and S * w >= _CLASS_MIN_SLOTS:
            widths, jg = _widths(counts, per_group, w, S * w)
        K = len(widths)
        # segments of every group in every width class (the full ones have width w)
        if K == 1:
            cnt = per_group.unsqueeze(1)
        else:
            cnt = torch.nn.functional.one_hot(jg, K) * (per_group > 0).unsqueeze(1)
            cnt[:, K - 1] += (per_group - 1).clamp_min(0)
        Sj = cnt.sum(0).tolist()  # host read, once per block
        offs = [0]
        for j in range(K):
            offs.append(offs[-1] + Sj[j] * widths[j])
        self.S, self.slots = S, offs[-1]
        self.w = w if K == 1 else None
        itype = _index_dtype(max(N, self.slots) + 1)
        order = None  # stable radix sorts, least significant key first
        for k in list(sec)[::-1] + [key]:
            order = (torch.argsort(k, stable=True) if order is None
                     else order[torch.argsort(k[order], stable=True)])
        sorted_key = key[order]
        start = torch.cumsum(counts, 0) - counts
        pos = torch.arange(N, device=dev) - start[sorted_key]
        seg = torch.div(pos, w, rounding_mode="floor")
        seg_start = torch.cumsum(cnt, 0) - cnt  # (P, K): first segment in each class
        if K == 1:
            slot = (seg_start[sorted_key, 0] + seg) * w + pos % w
        else:
            full = seg < (per_group - 1)[sorted_key]
            c = torch.where(full, K - 1, jg[sorted_key])
            segidx = seg_start[sorted_key, c] + torch.where(c == K - 1, seg, 0)
            wt = torch.tensor(widths, device=dev)
            ot = torch.tensor(offs[:-1], device=dev)
            slot = ot[c] + segidx * wt[c] + pos % w
        sample_of = torch.full((self.slots,), N, dtype=itype, device=dev)
        sample_of[slot] = order.to(itype)
        slot_of = torch.empty(N, dtype=itype, device=dev)
        slot_of[order] = slot.to(itype)
        self.sample_of = sample_of  # slot -> sample (N = padding)
        self.slot_of = slot_of  # sample -> slot
        self.ext_slot_of = torch.cat([slot_of, torch.full((1,), self.slots, dtype=itype,
                                                          device=dev)])
        groups = torch.arange(P, device=dev) if gmap is None else gmap
        self.classes = [(offs[j], Sj[j], widths[j], torch.repeat_interleave(groups, cnt[:, j]))
                        for j in range(K) if Sj[j] > 0 or K == 1]
        # the merged index of every segment, in slot order
        self.seg_group = (torch.cat([cl[3] for cl in self.classes]) if self.classes
                          else groups[:0])
        # one width, every group exactly one segment, in merged-index order
        self.identity = (K == 1 and gmap is None and S == P
                         and bool((per_group == 1).all()))
        self.mask = sample_of < N  # real slots

    def slot_segment(self) -> torch.Tensor:
        """The segment number (an index into ``seg_group``) of every slot."""
        parts = [torch.arange(n * wj, device=self.sample_of.device) // wj + sum(
            cl[1] for cl in self.classes[:j]) for j, (_, n, wj, _) in enumerate(self.classes)]
        return torch.cat(parts) if parts else self.sample_of.new_zeros(0).long()

    def layout_vector(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) per sample -> (slots,) in this layout, zero padding."""
        return torch.cat([x, x.new_zeros(1)]).index_select(0, self.sample_of)

    def to_samples(self, y: torch.Tensor) -> torch.Tensor:
        """(slots,) in this layout -> (N,) in sample order."""
        return y.index_select(0, self.slot_of)

    def seg(self, m: torch.Tensor):
        """(P, a, b) per merged index -> (S, a, b) per segment (contiguous); with several
        widths a list of them, one per width class."""
        if self.identity:
            return m.contiguous()
        if len(self.classes) == 1:
            return m.index_select(0, self.seg_group)
        return [m.index_select(0, cl[3]) for cl in self.classes]

    def seg_sum(self, c) -> torch.Tensor:
        """(S, a, b) per segment (a list per class with several widths) -> (P, a, b)
        summed per merged index."""
        if self.identity:
            return c
        cs = c if isinstance(c, list) else [c]
        out = cs[0].new_zeros((self.P,) + tuple(cs[0].shape[1:]))
        for cj, cl in zip(cs, self.classes):
            out.index_add_(0, cl[3], cj)
        return out


class _Orient:
    """Storage of per-sample vectors in a block layout: row-major ``(slots + 1, r)``
    buffers (a sample's vector is a row) or feature-major ``(r, slots + 1)`` (a column).
    The extra row (column) is zero: padding slots of the maps point to it. Feature-major
    (opt-in, ``_FEATURE_MAJOR_DTYPES``; one segment width per block): ``torch.bmm`` on the
    (S, r, w) segment views is ~1.7x faster than on row-major (S, w, r) for float32, but
    its per-feature transitions are slower with two threads and it has no width
    classes; see ``_FEATURE_MAJOR_DTYPES``."""

    def __init__(self, fm: bool):
        self.fm = fm
        self.fdim = 0 if fm else 1  # the feature dimension of a buffer

    def shape(self, slots: int, r: int) -> Tuple[int, int]:
        return (r, slots + 1) if self.fm else (slots + 1, r)

    def zero_last(self, t: torch.Tensor, slots: int) -> None:
        (t[:, slots] if self.fm else t[slots]).zero_()

    def col(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """The first ``n`` slots of a width-1 buffer as a 1-D view."""
        return t[0, :n] if self.fm else t[:n, 0]

    def _seg_view(self, blk: _Block, t: torch.Tensor) -> torch.Tensor:
        """(S, w, r) (row-major) or (S, r, w) (feature-major) view of a buffer's slots."""
        if self.fm:
            return t[:, :blk.slots].unflatten(1, (blk.S, blk.w)).permute(1, 0, 2)
        return t[:blk.slots].view(blk.S, blk.w, t.shape[1])

    @staticmethod
    def _rm_views(blk: _Block, t: torch.Tensor) -> List[torch.Tensor]:
        """Row-major: the (S_j, w_j, r) views of a buffer's slots, one per width class."""
        return [t[o0:o0 + n * wj].view(n, wj, t.shape[1]) for o0, n, wj, _ in blk.classes]

    def step_out(self, ws: "_Workspace", blk: _Block, rb: int, name="scratch") -> torch.Tensor:
        """The output buffer of :meth:`step`: ``(slots + 1, rb)`` (row-major) or a
        contiguous ``(S + 1, rb, w)`` (feature-major: torch's batched ``bmm`` path needs a
        contiguous output, a strided one falls back to a serial per-matrix loop). The extra
        slot / segment is zeroed by :meth:`step`."""
        if self.fm:
            return ws._flat(name, (blk.S + 1) * rb * blk.w).view(blk.S + 1, rb, blk.w)
        return ws._flat(name, (blk.slots + 1) * rb).view(blk.slots + 1, rb)

    def step(self, blk: _Block, a: torch.Tensor, mats: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
        """``out[s] = a[s] @ mats[segment(s)]`` for every slot of buffer ``a`` (padding
        slots give 0), ``out`` from :meth:`step_out`."""
        if self.fm:
            if blk.S:
                torch.bmm(mats.transpose(1, 2).contiguous(), self._seg_view(blk, a),
                          out=out[:blk.S])
            out[blk.S].zero_()
        else:
            ms = mats if isinstance(mats, list) else [mats]
            for av, ov, m in zip(self._rm_views(blk, a), self._rm_views(blk, out), ms):
                torch.bmm(av, m, out=ov)
            out[blk.slots].zero_()
        return out

    def step_col(self, blk: _Block, out: torch.Tensor) -> torch.Tensor:
        """A width-1 :meth:`step` result as a 1-D (slots,) view."""
        return out[:blk.S].reshape(-1) if self.fm else out[:blk.slots, 0]

    def move_step(self, part: "_Partition", kind: str, b: int, out: torch.Tensor,
                  dst: torch.Tensor) -> torch.Tensor:
        """:meth:`move` with map ``part.fwd[b]`` / ``part.bwd[b]`` from a :meth:`step`
        result ``out`` of block ``b``."""
        if not self.fm:
            return self.move(getattr(part, kind)[b], out, dst)
        rb, w = out.shape[1], out.shape[2]
        off = part.offset_map(kind, b, rb, w)
        n = off.numel()
        if n:
            flat = out.view(-1)  # feature f of slot (seg, j) is at seg*rb*w + f*w + j
            _per_feature(lambda f: torch.index_select(flat[f * w:], 0, off, out=dst[f, :n]),
                         rb, n, dst.device)
        return dst

    def rowdot(self, blk: _Block, t: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """``sum_f t[s, f] R[s, f]`` for every slot, ``t`` from :meth:`step` (overwritten),
        ``R`` a buffer; returns (slots,). Row-major: one fused ``einsum`` pass (it reduces
        the products without writing them, ~1.3x faster than mul + sum); feature-major:
        mul + sum (``einsum`` is several times slower on that layout)."""
        if self.fm:
            tv = t[:blk.S]
            torch.mul(tv, self._seg_view(blk, R), out=tv)
            return tv.sum(1).view(-1)
        return torch.einsum("sf,sf->s", t[:blk.slots], R[:blk.slots])

    def outer(self, blk: _Block, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``C[g] = sum_{slots s of group g} left[s]^T right[s]``, (P, a, b)."""
        a, b = left.shape[self.fdim], right.shape[self.fdim]
        if not blk.S:
            return left.new_zeros(blk.P, a, b)
        if self.fm:
            lv, rv = self._seg_view(blk, left), self._seg_view(blk, right)
            return blk.seg_sum(torch.bmm(lv, rv.transpose(1, 2)))
        c = [torch.bmm(lv.transpose(1, 2), rv)
             for lv, rv in zip(self._rm_views(blk, left), self._rm_views(blk, right))]
        return blk.seg_sum(c if len(c) > 1 else c[0])

    def table(self, rows: torch.Tensor) -> torch.Tensor:
        """(P, r) rows -> a source buffer for :meth:`move` (a zero row appended)."""
        t = torch.cat([rows, rows.new_zeros(1, rows.shape[1])], 0)
        return t.t().contiguous() if self.fm else t

    def move(self, m: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """``dst[s] = src[m[s]]`` for the first ``len(m)`` slots of ``dst`` (``src``'s zero
        slot is the target of padding). One ``index_select`` (row-major) or one per
        feature (feature-major: each a 1-D gather)."""
        n = m.numel()
        if n:
            if self.fm:
                _per_feature(lambda f: torch.index_select(src[f], 0, m, out=dst[f, :n]),
                             src.shape[0], n, dst.device)
            elif src.shape[1] == 1:  # 1-D gather: ~3x faster than on (slots, 1) rows
                torch.index_select(src.view(-1), 0, m, out=dst.view(-1)[:n])
            else:
                torch.index_select(src, 0, m, out=dst[:n])
        return dst


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_SIZE = 0
_POOL_MIN = 1 << 17  # gathers of fewer elements per feature stay on the calling thread


def _per_feature(fn, nfeat: int, numel: int, device: torch.device) -> None:
    """``fn(f)`` for every feature ``f``. The feature-major transitions are one 1-D
    ``index_select`` per feature, which torch runs on one thread; when torch may use
    several CPU threads (``torch.get_num_threads()``), the features are spread over that
    many Python threads (torch releases the GIL inside the op): about 2x faster
    transitions on 2 idle cores."""
    global _POOL, _POOL_SIZE
    k = min(torch.get_num_threads(), nfeat)
    if device.type != "cpu" or k < 2 or numel < _POOL_MIN:
        for f in range(nfeat):
            fn(f)
        return
    if _POOL is None or _POOL_SIZE < k - 1:
        _POOL, _POOL_SIZE = ThreadPoolExecutor(max_workers=k - 1,
                                               thread_name_prefix="ttmanifold"), k - 1

    def share(j):
        for f in range(j, nfeat, k):
            fn(f)

    futures = [_POOL.submit(share, j) for j in range(1, k)]
    try:
        share(0)
    finally:
        for fut in futures:
            fut.result()


_RM, _FM = _Orient(False), _Orient(True)
# Orientation (measured at d=20, n=50, r=10, 1e6 samples; sweeps + projection + tangent):
# float32 with 2 threads 0.60 s feature-major vs 0.50 s row-major (the per-feature
# gathers are slow there; the width classes are row-major only), with 1 thread 0.89 s vs
# 0.95 s; float64 row-major in both cases. Feature-major for the dtypes of
# _FEATURE_MAJOR_DTYPES, and on the CPU for those of _FEATURE_MAJOR_1T_DTYPES when torch
# uses one thread (read when a workspace is created: a workspace keeps its orientation,
# and the layouts follow the workspace's).
_FEATURE_MAJOR_DTYPES: Tuple[torch.dtype, ...] = ()
_FEATURE_MAJOR_1T_DTYPES: Tuple[torch.dtype, ...] = (torch.float32,)


def _orient(dtype: torch.dtype, device: Optional[torch.device] = None) -> _Orient:
    if dtype in _FEATURE_MAJOR_DTYPES:
        return _FM
    if (dtype in _FEATURE_MAJOR_1T_DTYPES and torch.get_num_threads() == 1
            and (device is None or torch.device(device).type == "cpu")):
        return _FM
    return _RM


class _Partition:
    """Blocks of consecutive modes and the maps between their layouts.

    ``fwd[b]`` (b < B-1): for every slot of block b+1 the row of block b's buffer holding
    the same sample (padding -> block b's zero row); ``bwd[b]`` (b > 0): the same from
    block b to block b-1. ``first_map`` (``last_map``): for every slot of block 1 (B-2) the
    merged index of its sample in block 0 (B-1), ``P`` for padding: the first left (right)
    step starts from ones, so its result is a row of the merged core, gathered directly
    into the next layout."""

    def __init__(self, blocks: List[_Block], keys):
        self.blocks = blocks
        B = len(blocks)
        self.fwd: List[Optional[torch.Tensor]] = [None] * B
        self.bwd: List[Optional[torch.Tensor]] = [None] * B
        for b in range(B - 1):
            self.fwd[b] = blocks[b].ext_slot_of.index_select(0, blocks[b + 1].sample_of)
        for b in range(1, B):
            self.bwd[b] = blocks[b].ext_slot_of.index_select(0, blocks[b - 1].sample_of)
        self.first_map = self.last_map = None
        if B > 1:
            for j, nb in ((0, 1), (B - 1, B - 2)):
                key = keys(blocks[j].lo, blocks[j].hi)
                ext = torch.cat([key, key.new_full((1,), blocks[j].P)])
                ext = ext.to(_index_dtype(blocks[j].P + 1))
                m = ext.index_select(0, blocks[nb].sample_of)
                if j == 0:
                    self.first_map = m
                else:
                    self.last_map = m
        self._offsets: Dict[tuple, torch.Tensor] = {}

    def offset_map(self, kind: str, b: int, rb: int, w: int) -> torch.Tensor:
        """Map ``kind`` ("fwd" or "bwd") of block ``b`` as element offsets into a
        feature-major step result (S + 1, rb, w) of block b: slot ``s = seg w + j`` ->
        ``seg rb w + j`` (the zero slot -> the zeroed extra segment). Cached."""
        key = (kind, b, rb)
        off = self._offsets.get(key)
        if off is None:
            m = getattr(self, kind)[b].long()
            S = self.blocks[b].S
            off = (m + torch.div(m, w, rounding_mode="floor") * ((rb - 1) * w))
            off = off.to(_index_dtype((S + 1) * rb * w))
            self._offsets[key] = off
        return off


def _cols(mats) -> int:
    """Columns of segmented matrices (:meth:`_Block.seg`: a tensor or a list)."""
    return int((mats[0] if isinstance(mats, list) else mats).shape[2])


def _merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(ra, n1, rb) x (rb, n2, rc) -> (ra, n1 n2, rc), the merged core (row-major index)."""
    ra, n1, rb = a.shape
    n2, rc = b.shape[1], b.shape[2]
    return (a.reshape(ra * n1, rb) @ b.reshape(rb, n2 * rc)).reshape(ra, n1 * n2, rc)


def _merged(cores: Sequence[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    c = cores[lo]
    for k in range(lo + 1, hi):
        c = _merge(c, cores[k])
    return c


def _tangent_block(U, V, dU, lo: int, hi: int) -> torch.Tensor:
    """Merged core of ``sum_{k in lo..hi-1} U_lo..U_{k-1} dU_k V_{k+1}..V_{hi-1}``."""
    s, pu = dU[lo], U[lo]
    for k in range(lo + 1, hi):
        s = _merge(s, V[k]) + _merge(pu, dU[k])
        pu = _merge(pu, U[k])
    return s


def _split_block_grad(C: torch.Tensor, U, V, lo: int, hi: int, shape) -> List[torch.Tensor]:
    """``D_k`` for k in lo..hi-1 from the block scatter ``C`` (r_lo, P, r_hi):
    contract C with ``U_lo..U_{k-1}`` on the left and ``V_{k+1}..V_{hi-1}`` on the right."""
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


class _Workspace:
    """Reusable buffers of one dtype and device (allocated once, reused with ``out=``),
    oriented by :func:`_orient`."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.o = _orient(dtype, device)
        self.bufs: Dict[object, torch.Tensor] = {}

    def ext(self, name, slots: int, r: int) -> torch.Tensor:
        """A persistent buffer for ``slots`` slots of width ``r`` plus the zero slot."""
        shape = self.o.shape(slots, r)
        t = self.bufs.get(name)
        if t is None or tuple(t.shape) != shape:
            t = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.o.zero_last(t, slots)
            self.bufs[name] = t
        return t

    def _flat(self, name, numel: int) -> torch.Tensor:
        t = self.bufs.get(name)
        if t is None or t.numel() < numel:
            t = torch.empty(numel, dtype=self.dtype, device=self.device)
            self.bufs[name] = t
        return t[:numel]

    def scratch(self, slots: int, r: int) -> torch.Tensor:
        """A view of the shared scratch buffer (zero slot NOT zeroed)."""
        return self._flat("scratch", (slots + 1) * r).view(self.o.shape(slots, r))

    def view(self, name, slots: int, r: int) -> torch.Tensor:
        """A view of a flat buffer shared by all sizes, with the zero slot zeroed."""
        t = self._flat(name, (slots + 1) * r).view(self.o.shape(slots, r))
        self.o.zero_last(t, slots)
        return t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.bufs.values())


class IndexSet:
    """``N`` multi-indices into a tensor of shape ``shape``, grouped per mode.

    Parameters
    ----------
    indices : LongTensor of shape ``(N, d)``
        The multi-indices (duplicates allowed; they are summed in :meth:`scatter`).
    shape : sequence of ints
        The tensor's mode sizes.

    The blocked layouts and reusable buffers are built lazily on first use and kept;
    :meth:`release_buffers` frees the buffers.
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
            indices = indices.long()
            if indices.device.type != "meta" and indices.numel() > 0:
                bound = torch.tensor(shape, device=indices.device)
                if bool(((indices < 0) | (indices >= bound)).any()):
                    raise ValueError(f"indices: out of range for shape {shape}")
        self.indices = indices.long()
        self.shape = shape
        self._plans: List[Optional[_ModePlan]] = [None] * len(shape)
        self._blocks: Dict[Tuple[int, int], _Block] = {}
        self._partitions: Dict[tuple, _Partition] = {}
        self._free: List[_Workspace] = []  # idle workspaces of SampledPoint contexts
        self._tmp: Dict[tuple, _Workspace] = {}  # workspaces of synchronous kernels
        self._native_plans: Dict[tuple, object] = {}  # layouts of the compiled kernels
        self.min_group = _MIN_GROUP

    @classmethod
    def from_sparse(cls, z: torch.Tensor) -> "IndexSet":
        """The index set of a ``torch.sparse_coo_tensor`` (coalesced or not)."""
        return cls(z._indices().t(), tuple(z.shape))

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def plan(self, k: int) -> _ModePlan:
        if self._plans[k] is None:
            self._plans[k] = _ModePlan(self.indices[:, k], self.shape[k])
        return self._plans[k]

    def release_buffers(self) -> None:
        """Free the cached work buffers (the index layouts are kept)."""
        self._free.clear()
        self._tmp.clear()
        for plan in self._native_plans.values():
            plan.free.clear()

    def _check_cores(self, cores: Sequence[torch.Tensor]) -> None:
        if len(cores) != len(self.shape) or any(
            int(c.shape[1]) != n for c, n in zip(cores, self.shape)
        ):
            raise ValueError(
                f"tt: shape {tuple(int(c.shape[1]) for c in cores)} does not match the "
                f"index set's shape {self.shape}"
            )
        if cores[0].device != self.device:
            raise ValueError(f"tt: on device {cores[0].device}, indices on {self.device}")

    # -- blocked layouts ------------------------------------------------------------------
    def _block_key(self, lo: int, hi: int) -> torch.Tensor:
        """The merged index of modes lo..hi-1 of every sample (row-major)."""
        key = self.indices[:, lo]
        for k in range(lo + 1, hi):
            key = key * self.shape[k] + self.indices[:, k]
        return key

    def _block(self, lo: int, hi: int, prev: Optional[int] = None,
               nxt: Optional[int] = None, multi: bool = False) -> _Block:
        """The layout of block ``lo..hi-1`` whose neighbours in the partition end with
        modes ``prev`` and ``nxt`` (``None``: no neighbour).

        Orders chosen for the cache behaviour of the layout changes (a gather of every
        slot of one layout from the other): groups are ordered by their *last* mode
        first (within a width class), and inside a group the samples are sorted by mode
        ``nxt``, then by mode ``prev``. A change to the next layout then reads, for a run
        of consecutive destination groups (same last mode ``nxt``), one short run of rows
        per source group; a change to the previous layout reads positions that advance
        monotonically inside each (group, ``nxt``) run. Measured gain: ~10% on the
        row gathers at n = 50, 1e6 samples (they stay latency-bound: even a gather in
        the destination's order of the source groups is only ~15% faster than a random
        one). Any order is correct: only speed depends on it."""
        ck = (lo, hi, prev, nxt, bool(multi))
        blk = self._blocks.get(ck)
        if blk is None:
            P = 1
            for k in range(lo, hi):
                P *= self.shape[k]
            idx = self.indices
            gmap = None
            key = self._block_key(lo, hi)
            if hi - lo > 1:  # order key: last mode major, then modes lo..hi-2 row-major
                n_last = self.shape[hi - 1]
                Q = P // n_last
                key = idx[:, hi - 1] * Q + torch.div(key, n_last, rounding_mode="floor")
                o = torch.arange(P, device=idx.device)
                gmap = (o % Q) * n_last + torch.div(o, Q, rounding_mode="floor")
            sec = [idx[:, m] for m in (nxt, prev) if m is not None]
            blk = _Block(key, lo, hi, P, gmap, sec, multi)
            self._blocks[ck] = blk
        return blk

    def _partition(self, ranks: Sequence[int], multi: bool = False) -> _Partition:
        """Blocks for TT-ranks ``ranks`` (``d + 1`` values): modes are merged while the
        merged index count ``P`` satisfies ``P * max(min_group, 4 r) <= N`` (``r`` the
        largest rank involved), so the merged cores stay small next to the samples.
        ``multi``: layouts with several segment widths (row-major buffers only; see
        :class:`_Block`)."""
        bounds = self._bounds(ranks)
        key = (tuple(bounds), bool(multi))
        part = self._partitions.get(key)
        if part is None:
            B = len(bounds)
            blocks = [self._block(lo, hi, bounds[j - 1][1] - 1 if j > 0 else None,
                                  bounds[j + 1][1] - 1 if j + 1 < B else None, multi)
                      for j, (lo, hi) in enumerate(bounds)]
            part = _Partition(blocks, self._block_key)
            self._partitions[key] = part
        return part

    def _bounds(self, ranks: Sequence[int]) -> List[Tuple[int, int]]:
        """The blocks ``[lo, hi)`` of merged modes for TT-ranks ``ranks`` (see
        :meth:`_partition`)."""
        N, d = len(self), len(self.shape)
        bounds = []
        k = 0
        while k < d:
            hi, P, r = k + 1, self.shape[k], max(ranks[k], ranks[k + 1])
            while hi < d:
                P2, r2 = P * self.shape[hi], max(r, ranks[hi + 1])
                if P2 * max(self.min_group, 4 * r2) > N:
                    break
                P, r, hi = P2, r2, hi + 1
            bounds.append((k, hi))
            k = hi
        return bounds

    def _native_plan(self, ranks: Sequence[int]):
        """The sorted-group layouts of the compiled kernels (:mod:`ttmanifold._sampled_native`)
        for TT-ranks ``ranks``, built once per block partition."""
        from ._sampled_native import NativePlan

        bounds = tuple(self._bounds(ranks))
        plan = self._native_plans.get(bounds)
        if plan is None:
            plan = NativePlan(self, bounds)
            self._native_plans[bounds] = plan
        return plan

    def _tmp_workspace(self, dtype, device) -> _Workspace:
        key = (dtype, str(device), _orient(dtype, device).fm)
        ws = self._tmp.get(key)
        if ws is None:
            ws = _Workspace(dtype, device)
            self._tmp[key] = ws
        return ws

    def _acquire(self, dtype, device) -> _Workspace:
        o = _orient(dtype, device)
        for j, ws in enumerate(self._free):
            if ws.dtype == dtype and ws.device == device and ws.o is o:
                return self._free.pop(j)
        return _Workspace(dtype, device)

    def _release(self, ws: _Workspace) -> None:
        """Keep one idle workspace per dtype, device and orientation (the last released)."""
        self._free = [w for w in self._free
                      if (w.dtype, w.device, w.o) != (ws.dtype, ws.device, ws.o)] + [ws]

    @staticmethod
    def _ranks(cores) -> List[int]:
        return [int(c.shape[0]) for c in cores] + [int(cores[-1].shape[2])]

    def _use_native(self, t: torch.Tensor) -> bool:
        """Whether the compiled kernels serve this index set for tensors like ``t``."""
        return max(1, _native.MIN_SAMPLES) <= len(self) < 2 ** 31 - 1 and _native.usable(t)

    def _gather_blocked(self, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        """Values at the samples, blocked layouts with reused buffers (no autograd)."""
        N = len(self)
        if N == 0:
            return cores[0].new_zeros(0)
        if self._use_native(cores[0]):
            from ._sampled_native import native_values

            return native_values(self._native_plan(self._ranks(cores)), cores)
        ws = self._tmp_workspace(cores[0].dtype, cores[0].device)
        o = ws.o
        part = self._partition(self._ranks(cores), not o.fm)
        blocks = part.blocks
        if len(blocks) == 1:
            a, b0 = _ones(ws, blocks[0], "ones"), 0
        else:  # first step from ones: rows of the first merged core
            w0 = _merged(cores, blocks[0].lo, blocks[0].hi)[0]
            a = o.move(part.first_map, o.table(w0), ws.view(("pingpong", 1), blocks[1].slots,
                                                            w0.shape[1]))
            b0 = 1
        for b in range(b0, len(blocks)):
            blk = blocks[b]
            mats = blk.seg(_merged(cores, blk.lo, blk.hi).permute(1, 0, 2))
            out = o.step(blk, a, mats, o.step_out(ws, blk, _cols(mats)))
            if b + 1 < len(blocks):
                a = o.move_step(part, "fwd", b, out, ws.view(("pingpong", (b + 1) % 2),
                                                             blocks[b + 1].slots, _cols(mats)))
        return blocks[-1].to_samples(o.step_col(blocks[-1], out))

    def _project_blocked(self, U, V, values: torch.Tensor) -> List[torch.Tensor]:
        """``D_k`` of the sparse projection (before the gauge projection), blocked: one
        left sweep (kept), then the right sweep started from the values (so the right
        vectors are ``values * rho``) with one grouped scatter per block."""
        if self._use_native(values):
            return self.sampled_point(U, V).project(values)
        ws = self._tmp_workspace(values.dtype, values.device)
        o = ws.o
        part = self._partition(self._ranks(U), not o.fm)
        blocks = part.blocks
        B = len(blocks)
        L = _left_sweep(part, U, ws, "L")
        last = blocks[-1]
        rt = ws.view(("rt", (B - 1) % 2), last.slots, 1)
        o.col(rt, last.slots).copy_(last.layout_vector(values))
        D: List[Optional[torch.Tensor]] = [None] * len(self.shape)
        for b in range(B - 1, -1, -1):
            blk = blocks[b]
            C = o.outer(blk, L[b], rt).permute(1, 0, 2)
            D[blk.lo:blk.hi] = _split_block_grad(C, U, V, blk.lo, blk.hi, self.shape)
            if b > 0:
                mats = blk.seg(_merged(V, blk.lo, blk.hi).permute(1, 2, 0))
                out = o.step(blk, rt, mats, o.step_out(ws, blk, _cols(mats)))
                rt = o.move_step(part, "bwd", b, out, ws.view(("rt", (b - 1) % 2),
                                                              blocks[b - 1].slots, _cols(mats)))
        return D

    def sampled_point(self, U: Sequence[torch.Tensor], V: Sequence[torch.Tensor]) -> "SampledPoint":
        """The per-sample left and right vectors of the TT with left-orthogonal cores ``U``
        and right-orthogonal cores ``V`` (``V[0]`` unused), see :class:`SampledPoint`.

        On the CPU in float32/float64 this is a
        :class:`~ttmanifold._sampled_native.NativeSampledPoint` (same interface and values,
        compiled fused kernels, about 2x faster; see :mod:`ttmanifold._native`) when the
        index set has at least ``_native.MIN_SAMPLES`` samples and the kernels could be
        built; otherwise a :class:`SampledPoint` (torch kernels)."""
        self._check_cores(U)
        if self._use_native(U[0]):
            from ._sampled_native import NativeSampledPoint

            return NativeSampledPoint(self._native_plan(self._ranks(U)), U, V)
        return SampledPoint(self, U, V)

    # -- per-mode kernels (sample order) ------------------------------------------------
    def left_step(self, k: int, a: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        """One step of the left sweep in sample order: ``a_i @ core[:, i_k, :]`` for every
        sample i, ``a`` of shape ``(N, r_{k-1})``, result ``(N, r_k)``. O(N r_{k-1} r_k)."""
        return self._left_step(k, a, core)

    def _left_step(self, k: int, a: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        """a (N, r_{k-1}) -> a_e @ core[:, i_k(e), :]  (N, r_k)."""
        p = self.plan(k)
        if p.padded:
            out = torch.bmm(p.pad(a), core.permute(1, 0, 2))
            return p.unpad(out)
        return _chunked(a, core.permute(1, 0, 2), p.idx, left=True)

    def _right_step(self, k: int, b: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        """b (N, r_k) -> core[:, i_k(e), :] @ b_e  (N, r_{k-1})."""
        p = self.plan(k)
        if p.padded:
            out = torch.bmm(p.pad(b), core.permute(1, 2, 0))
            return p.unpad(out)
        return _chunked(b, core.permute(1, 2, 0), p.idx, left=True)

    def left_vectors(self, cores: Sequence[torch.Tensor], upto: Optional[int] = None):
        """``[l_0, l_1, ..., l_upto]``, ``l_k`` of shape ``(N, r_k)``, ``l_0 = 1``."""
        self._check_cores(cores)
        d = len(cores)
        upto = d - 1 if upto is None else upto
        N = len(self)
        out = [cores[0].new_ones(N, 1)]
        for k in range(upto):
            out.append(self._left_step(k, out[-1], cores[k]))
        return out

    def right_vectors(self, cores: Sequence[torch.Tensor], downto: int = 1):
        """``{k: rho_k}`` for ``k = downto..d`` (0-based core k, ``rho_d = 1``).

        ``rho_k`` has shape ``(N, r_{k})`` in the 0-based convention: the product of cores
        ``k..d-1`` applied to the sample's indices, i.e. the column ``G_k[i_k]...G_{d-1}[i_{d-1}]``
        (of length ``r_k`` where ``r_k`` is the rank left of core ``k``).
        """
        self._check_cores(cores)
        d = len(cores)
        N = len(self)
        out = {d: cores[-1].new_ones(N, 1)}
        for k in range(d - 1, downto - 1, -1):
            out[k] = self._right_step(k, out[k + 1], cores[k])
        return out

    def gather(self, tt) -> torch.Tensor:
        """The ``N`` entries of a TT (or list of cores) at the samples. O(N d r^2).

        Runs on the blocked layouts with reused buffers. Under autograd the backward is the
        blocked scatter (``dL/dG_k[:, i, :] = sum_{e: i_k(e) = i} g_e l_k(e)^T
        rho_{k+1}(e)^T``); a backward with ``create_graph=True`` or with batched (functorch)
        gradients differentiates the per-mode kernels instead. For the tangent TT of
        Riemannian autodiff (:class:`~ttmanifold.tangent.TangentTT`) the entries are
        evaluated at rank r from the point's left and right sample vectors."""
        from .tangent import TangentTT

        if (isinstance(tt, TangentTT) and torch.is_grad_enabled()
                and any(c.requires_grad for c in tt._deltas) and tt.device.type != "meta"
                and not any(c is not None and c.requires_grad for c in tt._U + tt._V)):
            self._check_cores(tt._U)
            return _TangentGather.apply(self, tt._U, tt._V, *tt._deltas)
        cores = tt.cores if hasattr(tt, "cores") else list(tt)
        self._check_cores(cores)
        if cores[0].device.type != "meta":
            if not (torch.is_grad_enabled() and any(c.requires_grad for c in cores)):
                return self._gather_blocked(cores)
            return _TTGather.apply(self, *cores)
        return _per_mode_values(self, cores)

    def scatter(self, k: int, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``D[:, i, :] = sum_{e: i_k(e) = i} left_e^T right_e`` of shape ``(a, n_k, b)``.

        ``left``: (N, a), ``right``: (N, b). O(N a b).
        """
        p = self.plan(k)
        if p.padded:
            lp, rp = p.pad(left), p.pad(right)
            out = torch.bmm(lp.transpose(1, 2), rp)  # (n, a, b)
            return out.permute(1, 0, 2)
        n = self.shape[k]
        out = left.new_zeros(n, left.shape[1] * right.shape[1])
        for s in range(0, len(self), _CHUNK):
            l, r = left[s:s + _CHUNK], right[s:s + _CHUNK]
            outer = (l.unsqueeze(2) * r.unsqueeze(1)).reshape(l.shape[0], -1)
            out.index_add_(0, p.idx[s:s + _CHUNK], outer)
        return out.view(n, left.shape[1], right.shape[1]).permute(1, 0, 2)


def _functorch_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a functorch (vmap/grad) wrapper or a legacy batched tensor (the
    batched gradients of ``torch.autograd.functional.jacobian(..., vectorize=True)``):
    those cannot be written into the reused buffers of the blocked kernels."""
    ft = getattr(torch._C, "_functorch", None)
    for name in ("is_functorch_wrapped_tensor", "is_legacy_batchedtensor"):
        fn = getattr(ft, name, None)
        if fn is not None and fn(t):
            return True
    return False


def _per_mode_values(iset, cores) -> torch.Tensor:
    """Entries of the TT ``cores`` by the per-mode kernels (autograd-friendly)."""
    a = cores[0].new_ones(len(iset), 1)
    for k in range(len(cores)):
        a = iset._left_step(k, a, cores[k])
    return a[:, 0]


class _TTGather(torch.autograd.Function):
    """Entries of a TT at the samples, differentiable in its cores, on the blocked kernels:
    forward = a :class:`SampledPoint` with ``U = V = cores`` (its left sweep gives the
    values), backward = its scatter, ``dL/dG_k[:, i, :] = sum_{e: i_k(e) = i} g_e
    l_k(e)^T rho_{k+1}(e)^T``. A backward with ``create_graph=True`` (or with batched
    gradients from functorch) differentiates the per-mode kernels instead."""

    @staticmethod
    def forward(ctx, iset, *cores):
        point = iset.sampled_point(list(cores), list(cores))
        ctx.iset = iset
        ctx.point = point  # (its buffers go back to the pool when the graph is freed)
        ctx.save_for_backward(*cores)
        return point.to_samples(point.values)

    @staticmethod
    def backward(ctx, g):
        cores = ctx.saved_tensors
        create = torch.is_grad_enabled()
        if create or _functorch_wrapped(g):
            with torch.enable_grad():
                cs = list(cores) if create else [c.detach().requires_grad_() for c in cores]
                vals = _per_mode_values(ctx.iset, cs)
                D = torch.autograd.grad(vals, cs, g, create_graph=create, allow_unused=True)
            D = [torch.zeros_like(c) if d is None else d for d, c in zip(D, cores)]
        else:
            point = ctx.point
            D = point.project(point.from_samples(g.contiguous()))
        return (None, *D)


class _TangentGather(torch.autograd.Function):
    """Entries of the tangent TT ``sum_k U_<k dU_k V_>k`` at the samples, as a function
    of the deltas (``U``, ``V`` constant), at rank r: ``sum_k l_k(e) dU_k[:, i_k(e), :]
    rho_{k+1}(e)`` with the left vectors of ``U`` and the right vectors of ``V``.

    Forward: one :class:`SampledPoint` (left and right sweeps on the blocked layouts) and
    its tangent evaluation; backward: its scatter (``SampledPoint.project``), i.e. the
    kernels of one Riemannian CG iteration. The map is linear in the deltas, so a backward
    with ``create_graph=True`` (Hessian-vector products) only needs to be differentiable in
    the incoming gradient: then (and for batched functorch gradients) the per-mode kernels
    are differentiated."""

    @staticmethod
    def forward(ctx, iset, U, V, *dU):
        point = iset.sampled_point(list(U), list(V))
        ctx.iset, ctx.U, ctx.V = iset, list(U), list(V)
        ctx.point = point  # (its buffers go back to the pool when the graph is freed)
        return point.to_samples(point.tangent(dU))

    @staticmethod
    def backward(ctx, g):
        create = torch.is_grad_enabled()
        if create or _functorch_wrapped(g):  # differentiable in g / batched g
            iset, U, V = ctx.iset, ctx.U, ctx.V
            with torch.no_grad():
                left = iset.left_vectors(U)
                rights = iset.right_vectors([U[0]] + V[1:], downto=1)
            with torch.enable_grad():
                dU = [u.new_zeros(u.shape).requires_grad_() for u in U]
                e = sum((iset._left_step(k, left[k], dU[k]) * rights[k + 1]).sum(1)
                        for k in range(len(U)))
                D = torch.autograd.grad(e, dU, g, create_graph=create)
        else:
            point = ctx.point
            D = point.project(point.from_samples(g.contiguous()))
        return (None, None, None, *D)


def _ones(ws: _Workspace, blk: _Block, name) -> torch.Tensor:
    """A width-1 buffer holding 1 at the real slots of ``blk`` and 0 elsewhere."""
    t = ws.ext((name, blk.lo, blk.hi), blk.slots, 1)
    ws.o.col(t, blk.slots).copy_(blk.mask)
    return t


def _left_sweep(part: _Partition, U, ws: _Workspace, tag) -> List[torch.Tensor]:
    """Left vectors ``l_lo`` of every block in its layout (kept in ``ws``); the values of
    the TT at the samples are left in ``ws`` under ``(tag, "values")`` (last layout, a
    :meth:`_Orient.step_out` buffer)."""
    blocks = part.blocks
    o = ws.o
    L = [_ones(ws, blocks[0], "ones")]
    if len(blocks) > 1:  # first step from ones: rows of the first merged core
        w0 = _merged(U, blocks[0].lo, blocks[0].hi)[0]
        L.append(o.move(part.first_map, o.table(w0), ws.ext((tag, 1), blocks[1].slots,
                                                             w0.shape[1])))
    for b in range(len(L) - 1, len(blocks)):
        blk = blocks[b]
        mats = blk.seg(_merged(U, blk.lo, blk.hi).permute(1, 0, 2))
        if b + 1 < len(blocks):
            out = o.step(blk, L[b], mats, o.step_out(ws, blk, _cols(mats)))
            L.append(o.move_step(part, "fwd", b, out, ws.ext((tag, b + 1), blocks[b + 1].slots,
                                                             _cols(mats))))
        else:
            o.step(blk, L[b], mats, o.step_out(ws, blk, 1, (tag, "values")))
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

    def __init__(self, iset: IndexSet, U: Sequence[torch.Tensor], V: Sequence[torch.Tensor]):
        self.iset = iset
        self.U, self.V = list(U), list(V)
        dtype, device = U[0].dtype, U[0].device
        ws = iset._acquire(dtype, device)
        self._ws = ws
        weakref.finalize(self, iset._release, ws)
        o = ws.o
        self.part = part = iset._partition(iset._ranks(U), not o.fm)
        blocks = part.blocks
        B = len(blocks)
        with torch.no_grad():
            self.L = _left_sweep(part, U, ws, "L")
            last = blocks[-1]
            self.values = o.step_col(last, o.step_out(ws, last, 1, ("L", "values")))
            R: List[Optional[torch.Tensor]] = [None] * B
            R[B - 1] = _ones(ws, last, "onesR")
            top = B - 1
            if B > 1:  # first right step from ones: columns of the last merged core
                wl = _merged(V, last.lo, last.hi)[:, :, 0].t()
                R[B - 2] = o.move(part.last_map, o.table(wl),
                                  ws.ext(("R", B - 2), blocks[B - 2].slots, wl.shape[1]))
                top = B - 2
            for b in range(top, 0, -1):
                blk = blocks[b]
                mats = blk.seg(_merged(V, blk.lo, blk.hi).permute(1, 2, 0))
                out = o.step(blk, R[b], mats, o.step_out(ws, blk, _cols(mats)))
                R[b - 1] = o.move_step(part, "bwd", b, out, ws.ext(("R", b - 1),
                                                                   blocks[b - 1].slots,
                                                                   _cols(mats)))
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
        return self.part.blocks[-1].to_samples(v)

    def from_samples(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) in sample order -> (slots,) in the last layout (zero padding)."""
        return self.part.blocks[-1].layout_vector(x)

    def project(self, z: torch.Tensor) -> List[torch.Tensor]:
        """``D_k[:, i, :] = sum_{e: i_k(e) = i} z_e l_k(e)^T rho_{k+1}(e)^T`` for every k,
        ``z`` in the last layout (slots,) with zero padding. Gauge projection not applied."""
        iset, part, ws = self.iset, self.part, self._ws
        o = ws.o
        blocks = part.blocks
        B = len(blocks)
        D: List[Optional[torch.Tensor]] = [None] * len(iset.shape)
        with torch.no_grad():
            zb = ws.view(("z", (B - 1) % 2), blocks[-1].slots, 1)
            o.col(zb, blocks[-1].slots).copy_(z)
            for b in range(B - 1, -1, -1):
                blk = blocks[b]
                if b < B - 1:
                    zb = o.move(part.bwd[b + 1], zb, ws.view(("z", b % 2), blk.slots, 1))
                wgt = ws.scratch(blk.slots, self.R[b].shape[o.fdim])
                torch.mul(self.R[b], zb, out=wgt)
                C = o.outer(blk, self.L[b], wgt).permute(1, 0, 2)
                D[blk.lo:blk.hi] = _split_block_grad(C, self.U, self.V, blk.lo, blk.hi,
                                                     iset.shape)
        return D

    def tangent(self, dU: Sequence[torch.Tensor]) -> torch.Tensor:
        """``xi(i_e) = sum_k l_k(e)^T dU_k[i_k(e)] rho_{k+1}(e)`` (the tangent vector with
        deltas ``dU`` at the samples), in the last layout (slots,), zero padding."""
        part, ws = self.part, self._ws
        o = ws.o
        blocks = part.blocks
        with torch.no_grad():
            acc = None
            for b, blk in enumerate(blocks):
                mats = blk.seg(_tangent_block(self.U, self.V, dU, blk.lo, blk.hi)
                               .permute(1, 0, 2))
                t = o.step(blk, self.L[b], mats, o.step_out(ws, blk, _cols(mats)))
                eb = o.rowdot(blk, t, self.R[b])  # (slots,)
                e = ws.view(("e", b % 2), blk.slots, 1)
                if acc is None:
                    o.col(e, blk.slots).copy_(eb)
                else:
                    o.move(part.fwd[b - 1], acc, e)
                    o.col(e, blk.slots).add_(eb)
                acc = e
            return o.col(acc, blocks[-1].slots).clone()


def _chunked(a: torch.Tensor, mats: torch.Tensor, idx: torch.Tensor, left: bool) -> torch.Tensor:
    """Per-sample ``a_e @ mats[idx_e]`` in chunks (fallback for unbalanced groups)."""
    outs = []
    for s in range(0, a.shape[0], _CHUNK):
        m = mats.index_select(0, idx[s:s + _CHUNK])
        outs.append(torch.bmm(a[s:s + _CHUNK].unsqueeze(1), m).squeeze(1))
    if not outs:
        return a.new_zeros(0, mats.shape[2])
    return torch.cat(outs, 0)
