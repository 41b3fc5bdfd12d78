"""The contraction planner: in which groups the cores of a tensorized weight meet the input.

A *plan* partitions the cores into groups of consecutive cores, applied from the input
side to the output side; each group is merged into one matrix (optimal matrix-chain order)
and applied with one GEMM (or, for the group holding a convolution's kernel modes, one
small convolution). One group holding every core is the dense path. The plan with the
smallest estimated multiply-add count (plus :data:`OP_OVERHEAD` per kernel call) wins;
``docs/sttp.md``, section "Forward and its cost", derives the estimates.

Index conventions: groups are intervals ``[k0, k1)`` of train cores; the state between
groups is a 2-D tensor whose rows are ``(bond, remaining input digits)`` with the slowest
input digit consumed first, which is why the engine works with *reversed* input modes
(a natural-order layer reverses its input digits first, or, for a convolution, applies all
input cores in one group).
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Sequence, Tuple

from torch import Tensor

__all__ = ["OP_OVERHEAD", "Plan", "chain_table", "make_plan", "merge_cores", "group_matrix",
           "apply_group"]

#: Multiply-adds charged per kernel call by the contraction planner (launch and Python
#: overhead of one small GEMM on a CPU, about 10 us at ~10 GMAC/s).
OP_OVERHEAD = 100_000


class Plan(NamedTuple):
    groups: Tuple[Tuple[int, int], ...]  # tensor-core intervals [k0, k1), application order
    split: Dict[Tuple[int, int], int]  # matrix-chain split points for merging
    cost: int  # estimated multiply-adds (forward)
    dense: bool  # a single group: the dense weight


def chain_table(shape, ranks):
    """Optimal matrix-chain merge of every interval of cores.

    Args: ``shape`` (``d`` mode sizes), ``ranks`` (``d + 1`` bond ranks).
    Returns: ``(cost, split)``, dicts keyed by ``(i, j)`` (cores ``i..j-1``): multiply-adds
    of the cheapest merge and its last split point. Cost ``O(d^3)`` (host integers only).
    """
    d = len(shape)
    pre = [1]
    for n in shape:
        pre.append(pre[-1] * n)
    cost: Dict[Tuple[int, int], int] = {(k, k + 1): 0 for k in range(d)}
    split: Dict[Tuple[int, int], int] = {}
    for length in range(2, d + 1):
        for i in range(0, d - length + 1):
            j = i + length
            best, arg = None, None
            for m in range(i + 1, j):
                v = (cost[(i, m)] + cost[(m, j)]
                     + ranks[i] * (pre[m] // pre[i]) * ranks[m] * (pre[j] // pre[m]) * ranks[j])
                if best is None or v < best:
                    best, arg = v, m
            cost[(i, j)] = best
            split[(i, j)] = arg
    return cost, split


def make_plan(shape, ranks, c: int, batch: int, mode: str, conv=None) -> Plan:
    """Cheapest partition of the cores into groups (DP over the interval ends).

    ``conv = (kc1, kend, pix_in, pix_out)``: the group holding core ``c`` must reach ``kc1``
    (it holds every kernel-mode core, tensor cores ``c..kend-1``, and runs as a
    convolution); groups right of it act on the ``pix_in`` input pixels (whose state holds
    channel modes only), the others on ``pix_out`` output pixels. ``mode``: ``"auto"``,
    ``"dense"`` (one group) or ``"tt"`` (never one group). Returns a :class:`Plan`; cost
    ``O(d^3)`` host integer operations (cached by the layers per input size).
    """
    d = len(shape)
    pre = [1]
    for n in shape:
        pre.append(pre[-1] * n)

    def N(a, b):
        return pre[b] // pre[a]

    merge, split = chain_table(shape, ranks)
    if conv is None:
        kc1, kend, pix_in, pix_out = c + 1, c, 1, 1
        need = 0  # core c's group: no constraint
    else:
        kc1, kend, pix_in, pix_out = conv
        need = kc1

    def apply_cost(k0, k1):
        NO = N(k0, min(k1, c)) if k0 < c else 1
        NI = N(max(k0, c), k1) if k1 > c else 1
        rows, cols = ranks[k0] * NO, ranks[k1] * NI
        holds_c = k0 <= c < k1
        if conv is not None and holds_c:
            return batch * pix_out * rows * cols
        rem_in = N(c, k1) if k1 > c else 1
        gen_out = N(k1, c) if k1 < c else 1
        pix = pix_out
        if conv is not None and k0 > c:  # before the convolution: no kernel modes yet
            pix, rem_in = pix_in, N(kend, k1)
        return batch * pix * rows * cols * (rem_in // NI) * gen_out

    INF = float("inf")
    best = [INF] * (d + 1)
    arg = [None] * (d + 1)
    best[d] = 0
    for k0 in range(d - 1, -1, -1):
        for k1 in range(k0 + 1, d + 1):
            if best[k1] == INF:
                continue
            if mode == "tt" and (k0, k1) == (0, d):
                continue
            if mode == "dense" and (k0, k1) != (0, d):
                continue
            if conv is not None:
                holds_c = k0 <= c < k1
                if holds_c and k1 < need:
                    continue
                if not holds_c and c < k0 < need:
                    continue
            v = best[k1] + merge[(k0, k1)] + apply_cost(k0, k1) + OP_OVERHEAD * (k1 - k0)
            if v < best[k0]:
                best[k0], arg[k0] = v, k1
    groups = []
    k = 0
    while k < d:
        groups.append((k, arg[k]))
        k = arg[k]
    groups = tuple(reversed(groups))  # application order: from the input side
    return Plan(groups, split, int(best[0]), groups == ((0, d),))


def merge_cores(cores: Sequence[Tensor], i: int, j: int, split) -> Tensor:
    """Product of cores ``i..j-1`` as one core ``(r_i, n_i...n_{j-1}, r_j)`` (train order),
    in the order given by ``split`` (:func:`chain_table`); dtype/device of the cores.
    Cost: ``cost[(i, j)]`` of :func:`chain_table`."""
    if j - i == 1:
        return cores[i]
    m = split[(i, j)]
    A = merge_cores(cores, i, m, split)
    B = merge_cores(cores, m, j, split)
    ri, na, rm = A.shape
    _, nb, rj = B.shape
    return (A.reshape(ri * na, rm) @ B.reshape(rm, nb * rj)).reshape(ri, na * nb, rj)


def group_matrix(cores, shape, c: int, k0: int, k1: int, split,
                 natural: bool = False) -> Tensor:
    """Group ``[k0, k1)`` as the matrix ``(r_k0 N_out, r_k1 N_in)`` acting on the state.

    Row index: ``(left bond, out modes in order)``; column index: ``(right bond, in modes
    with j_1 slowest)``, i.e. the group's input modes un-reversed. ``natural=True``: the
    train holds the input modes slowest first already (only for groups ending at the last
    core, whose right bond is 1), so no permutation is needed. Cost: the merge
    (:func:`merge_cores`) plus at most one permuted copy.
    """
    G = merge_cores(cores, k0, k1, split)
    r0, r1 = G.shape[0], G.shape[2]
    n_in = tuple(shape[max(k0, c):k1]) if k1 > c else ()
    NO = math.prod(shape[k0:min(k1, c)]) if k0 < c else 1
    NI = math.prod(n_in)
    if natural and n_in:
        if r1 != 1:
            raise ValueError("natural order: a group holding input modes must end at the last "
                             "core")
        return G.reshape(r0 * NO, NI)
    if len(n_in) <= 1:
        return G.reshape(r0 * NO, NI, r1).transpose(1, 2).reshape(r0 * NO, r1 * NI)
    G = G.reshape((r0 * NO,) + n_in + (r1,))
    e = len(n_in)
    perm = (0, e + 1) + tuple(range(e, 0, -1))
    return G.permute(perm).reshape(r0 * NO, r1 * NI)


def apply_group(Gm: Tensor, S: Tensor, r0: int) -> Tensor:
    """One group on the state ``S`` (2-D, rows = (bond, group's in modes) slowest): one GEMM
    of ``Gm`` (``rows x cols``) with ``S`` reshaped to ``(cols, -1)``; returns ``(r0, -1)``.
    Cost ``rows * cols * S.numel() / cols``."""
    rows, cols = Gm.shape
    out = Gm @ S.reshape(cols, -1)
    return out.reshape(r0, -1)
