"""Layouts of sampled entries: how the samples of an index set are grouped.

- :class:`ModePlan`: the samples grouped by their index in one mode, in sample order (the
  per-mode kernels);
- :class:`Block`: the samples grouped by the merged index of consecutive modes, in
  fixed-width segments (the blocked kernels), and :class:`Partition`, the blocks of one
  TT and the maps between their layouts;
- :class:`Workspace`: reusable buffers for per-sample vectors in these layouts.

Design and costs: ``docs/sampled_entries.md``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

CHUNK = 1 << 16
MIN_GROUP = 64  # merge consecutive modes while N / (merged index count) >= this
SEG_COST = 64  # per-segment overhead in row equivalents (choice of the segment width)
CLASSES = 8  # segment widths per block at most (row-major layouts)
CLASS_MIN_SLOTS = 1 << 16  # several widths only for blocks at least this large
CLASS_MIN_SAVING = 0.03  # ... and when they save at least this fraction of the slots


def width_classes(counts: torch.Tensor, per_group: torch.Tensor, w: int, slots: int):
    """Width classes of the last segments: up to ``CLASSES`` widths (quantiles of the
    last-segment lengths, the largest ``w``) and the class of every group's last segment.
    Returns ``([w], None)`` when they would not save ``CLASS_MIN_SAVING`` of ``slots``."""
    nz = per_group > 0
    last = counts - (per_group - 1).clamp_min(0) * w  # length of the last segment
    lv = torch.sort(last[nz]).values
    m = lv.shape[0]
    qs = lv[[max(0, -(-j * m // CLASSES) - 1) for j in range(1, CLASSES)]].tolist()
    widths = sorted(set(int(v) for v in qs if 0 < v < w)) + [w]
    wt = torch.tensor(widths, device=counts.device, dtype=counts.dtype)
    jg = torch.searchsorted(wt, last.clamp_min(1))  # smallest width >= the last length
    new_slots = int(((per_group - 1).clamp_min(0) * w + wt[jg] * nz).sum())
    if len(widths) == 1 or new_slots > (1 - CLASS_MIN_SAVING) * slots:
        return [w], None
    return widths, jg


def index_dtype(bound: int) -> torch.dtype:
    return torch.int32 if bound < 2 ** 31 - 1 else torch.int64


class ModePlan:
    """Per-mode grouping of the samples in sample order (the per-mode kernels)."""

    __slots__ = ("n", "maxc", "pad_map", "slot_of", "idx", "padded")

    def __init__(self, idx: torch.Tensor, n: int):
        N = idx.shape[0]
        self.n = n
        self.idx = idx
        if idx.device.type == "meta":  # no values to group (and no bincount): per sample
            self.maxc, self.padded, self.pad_map, self.slot_of = 0, False, None, None
            return
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
        itype = index_dtype(max(N, n * maxc))
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




class Block:
    """The samples grouped by the merged index of modes ``lo..hi-1`` (row-major, ``P``
    values), in ``S`` segments (slot ``slots`` is the zero row of the buffers).

    A group of ``c`` samples fills ``ceil(c / w)`` segments: full ones of width ``w`` and a
    last one. With one width (``classes`` has one entry; ``w`` set) every segment has
    width ``w`` and ``slots = S w``. With several widths (``multi``, row-major layouts
    only; ``w`` is then ``None``) the last segment of a group gets the smallest of up to
    ``CLASSES`` widths (quantiles of the last-segment lengths, and ``w``) that holds it:
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
            costs = [s * (c + SEG_COST) for s, c in zip(segs, cands)]
            best = min(range(len(cands)), key=lambda j: (costs[j], -cands[j]))
            w, S = cands[best], int(segs[best])
        per_group = torch.div(counts + (w - 1), w, rounding_mode="floor")
        widths, jg = [w], None
        if multi and S and S * w >= CLASS_MIN_SLOTS:
            widths, jg = width_classes(counts, per_group, w, S * w)
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
        itype = index_dtype(max(N, self.slots) + 1)
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



class Partition:
    """Blocks of consecutive modes and the maps between their layouts.

    ``fwd[b]`` (b < B-1): for every slot of block b+1 the row of block b's buffer holding
    the same sample (padding -> block b's zero row); ``bwd[b]`` (b > 0): the same from
    block b to block b-1. ``first_map`` (``last_map``): for every slot of block 1 (B-2) the
    merged index of its sample in block 0 (B-1), ``P`` for padding: the first left (right)
    step starts from ones, so its result is a row of the merged core, gathered directly
    into the next layout."""

    def __init__(self, blocks: List[Block], keys):
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
                ext = ext.to(index_dtype(blocks[j].P + 1))
                m = ext.index_select(0, blocks[nb].sample_of)
                if j == 0:
                    self.first_map = m
                else:
                    self.last_map = m


class Workspace:
    """Reusable buffers of one dtype and device (allocated once, reused with ``out=``):
    per-sample vectors of a layout are ``(slots + 1, r)`` row-major buffers whose extra
    row is zero (padding slots of the maps point to it)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.bufs: Dict[object, torch.Tensor] = {}

    def ext(self, name, slots: int, r: int) -> torch.Tensor:
        """A persistent buffer for ``slots`` slots of width ``r`` plus the zero slot."""
        shape = (slots + 1, r)
        t = self.bufs.get(name)
        if t is None or tuple(t.shape) != shape:
            t = torch.empty(shape, dtype=self.dtype, device=self.device)
            t[slots].zero_()
            self.bufs[name] = t
        return t

    def flat(self, name, numel: int) -> torch.Tensor:
        t = self.bufs.get(name)
        if t is None or t.numel() < numel:
            t = torch.empty(numel, dtype=self.dtype, device=self.device)
            self.bufs[name] = t
        return t[:numel]

    def scratch(self, slots: int, r: int) -> torch.Tensor:
        """A view of the shared scratch buffer (zero slot NOT zeroed)."""
        return self.flat("scratch", (slots + 1) * r).view((slots + 1, r))

    def view(self, name, slots: int, r: int) -> torch.Tensor:
        """A view of a flat buffer shared by all sizes, with the zero slot zeroed."""
        t = self.flat(name, (slots + 1) * r).view((slots + 1, r))
        t[slots].zero_()
        return t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.bufs.values())

