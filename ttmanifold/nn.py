r"""Neural-network layers with STTP- and SVD-parameterized weights.

The layers here hold their weight matrix ``W`` (``d_out x d_in``) in compressed form and
train it either through a non-redundant chart (any ``torch.optim`` optimizer) or on the
fixed-TT-rank manifold (``geoopt`` optimizers). Formulas: ``../shared/MATH.md`` sections 3-4
and Obukhov et al., *Spectral Tensor Train Parameterization of Deep Learning Layers*
(AISTATS 2021, arXiv 2103.04217).

Tensorization (paper, Sec. 3.3)
-------------------------------
``d_out = prod(out_modes)``, ``d_in = prod(in_modes)`` (default: :func:`factorize`, prime
factors in ascending order). ``W`` is viewed as the order-``d`` tensor

    T[i_1, ..., i_D, j_E, ..., j_1] = W[i, j],      d = D + E,

where ``i = (i_1, ..., i_D)`` and ``j = (j_1, ..., j_E)`` are the row-major multi-indices of
the row and the column (``i_1``, ``j_1`` the slowest digits). The input modes are *reversed*
so that the spectral position sits between the output and the input modes: the TT bond
number ``c = D`` (``center``) separates them and the c-th unfolding of ``T`` is ``W`` itself
(up to a column permutation). In the STTP chart ``T = U_0..U_{c-1} diag(s) V_c..V_{d-1}``,
``s`` are therefore exactly the (signed) singular values of ``W``. Ranks follow the paper,
``R_k = min(rank, R_k^max)`` with ``R_k^max = min(n_1..n_k, n_{k+1}..n_d)``
(:func:`ttmanifold.feasible_ranks`); ``rank > min(d_out, d_in)`` is an error.

Paper example (tested): ``W`` of size 16 x 72, ``rank = 4``, ``n = (2,2,2,2, 3,3,2,2,2)``,
``R = (1,2,4,4,4,4,4,4,2,1)``: :func:`sttp_dof` gives **128** parameters. The rank-4
compact SVD ``U diag(s) V^T`` has :func:`svdp_dof` ``= r (d_out + d_in - r) = 336`` degrees of
freedom, counted as ``dim St(16, 4) + dim St(72, 4) + 4 = 54 + 278 + 4`` (the naive storage
``16*4 + 72*4 + 4 = 356`` of ``U``, ``V``, ``s`` exceeds it by the ``r(r+1) = 20`` orthonormality
constraints of ``U`` and ``V``); the dense matrix has ``16 * 72 = 1152``.

Convolutions treat the weight ``(out, in, kh, kw)`` as the matrix ``out x (in kh kw)`` (the
row-major flattening torch uses): ``in_modes`` defaults to ``factorize(in) +
factorize(kh) + factorize(kw)``, so the kernel modes belong to the input side and, after the
reversal, sit right next to the spectral position while the channel modes are outermost.

Training routes
---------------
``param="chart"`` (default) stores ``theta`` (an ``nn.Parameter`` of :attr:`STTPChart.dim`
entries) and any Euclidean optimizer works::

    layer = STTPLinear(256, 128, rank=8)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    loss = layer(x).square().mean() + 1e-4 * spectral_penalty(layer)
    loss.backward(); opt.step()

``param="manifold"`` stores a :class:`geoopt.ManifoldParameter` ``point`` on
:class:`~ttmanifold.FixedTTRank`; the forward uses :meth:`FixedTTRank.unpack_tensor`, so
``point.grad`` is the Riemannian gradient and geoopt's optimizers retract::

    layer = STTPLinear(256, 128, rank=8, param="manifold")   # or layer.to_manifold()
    opt = geoopt.optim.RiemannianAdam(layer.parameters(), lr=1e-1)

(``FixedTTRank`` keeps one Adam second moment per point, so a step moves the weight by
about ``lr`` in Frobenius norm: learning rates of 0.1..1 are typical there, much larger than
the chart's ``1e-3``; on the digits notebook 3e-3 gave 0.72 validation accuracy, 0.1..3
gave 0.93..0.95.)

:meth:`STTPLinear.to_manifold` / :meth:`STTPLinear.to_chart` switch in place and keep the
weight (build a new optimizer afterwards: the parameter objects change). The manifold mode
supports the ``"learned"`` and ``"lipschitz"`` spectra (the latter divides by the spectral
norm computed from the cores), not ``"identity"`` (a submanifold of ``FixedTTRank``).

Forward and its cost
--------------------
The cores are contracted with the input by a *plan* chosen from a flop estimate (cached
per batch size). The cores are applied from the input side to the output side in groups
of consecutive cores; each group is first merged into one matrix (optimal matrix-chain
order), then applied to the activations with one GEMM. One group holding every core is
the dense path (:meth:`_forward_dense`: ``F.linear``/``F.conv2d`` with :attr:`weight`,
cost ``merge(W) + B d_out d_in``); all other plans never form ``W``
(:meth:`_forward_tt`, e.g. singletons = sequential core contraction with the batch,
``sum_k B r_{k-1} n_k r_k (remaining)``, or two groups = the low-rank product
``B r (d_in + d_out)``). ``contraction="auto"`` takes the cheapest plan, ``"dense"`` and
``"tt"`` force one side; the estimate adds :data:`OP_OVERHEAD` multiply-adds per kernel
call. For ``Conv2d`` the group that holds the kernel modes is applied with
:func:`torch.nn.functional.conv2d` (its merged matrix is a ``(r', c', kh, kw)`` kernel, no
im2col): groups of channel cores before it are per-pixel maps of the input (they commute
with every padding mode), groups after it are per-pixel maps of the output.

Initialization
--------------
``init="orthogonal"`` (default) is :meth:`STTPChart.orthogonal_init`: every Householder
parameter is 0 (each frame is ``-I_{m x r}``), so ``W`` is a signed partial identity of
rank ``r`` with equal singular values. With the learned spectrum these are set to
``sqrt(d_out / (3 r))`` so that ``||W||_F^2 = d_out / 3``, the expected value under torch's
default ``kaiming_uniform_(a=sqrt(5))`` init (entry variance ``1 / (3 fan_in)``); for
``"lipschitz"`` and ``"identity"`` they are 1. Caveat: this ``W`` touches only ``r`` input
coordinates; ``init="random"`` (random Householder vectors, :meth:`STTPChart.random_theta`,
spectrum rescaled to the same Frobenius norm) spreads it out. ``from_dense`` initializes
from a trained weight through TT-SVD and the inverse chart.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import feasible_ranks
from .manifold import FixedTTRank
from .tt import TT, orthogonalize

__all__ = [
    "factorize",
    "sttp_ranks",
    "sttp_dof",
    "svdp_dof",
    "STTPLinear",
    "STTPConv2d",
    "SVDPLinear",
    "SVDPConv2d",
    "compression_ratio",
    "spectral_penalty",
    "replace_layers",
    "OP_OVERHEAD",
]

#: Multiply-adds charged per kernel call by the contraction planner (launch and Python
#: overhead of one small GEMM on a CPU, about 10 us at ~10 GMAC/s).
OP_OVERHEAD = 100_000

_SPECTRA = ("learned", "identity", "lipschitz")
_CONTRACTIONS = ("auto", "dense", "tt")
_INITS = ("orthogonal", "random")


def _chart_module():
    # imported lazily: ttmanifold.chart imports householder, which is optional at import
    from . import chart

    return chart


def _prod(xs) -> int:
    out = 1
    for v in xs:
        out *= int(v)
    return out


# ---------------------------------------------------------------------------------------
# tensorization helpers
# ---------------------------------------------------------------------------------------

def factorize(n: int, max_factor: Optional[int] = None) -> Tuple[int, ...]:
    """Factor sizes of a mode: the prime factors of ``n`` in **ascending** order.

    ``factorize(72) == (2, 2, 2, 3, 3)``; ``factorize(1) == (1,)``; a prime is its own
    single factor (``factorize(97) == (97,)``). Ascending order is the paper's: with the
    input modes reversed (module docstring) small modes sit at the ends of the train, where
    the feasible ranks are small, and large ones next to the spectral position.

    ``max_factor``: merge factors while possible: repeatedly multiply the two smallest
    factors as long as the product is ``<= max_factor`` (fewer, larger modes: fewer cores,
    larger ranks reachable near the ends). Primes above ``max_factor`` stay as they are.
    ``factorize(1024, max_factor=4) == (4, 4, 4, 4, 4)``. Cost O(sqrt(n)).
    """
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if max_factor is not None and (not isinstance(max_factor, numbers.Integral)
                                   or isinstance(max_factor, bool) or max_factor < 2):
        raise ValueError(f"max_factor: expected an int >= 2 or None, got {max_factor!r}")
    n = int(n)
    if n == 1:
        return (1,)
    out: List[int] = []
    p, m = 2, n
    while p * p <= m:
        while m % p == 0:
            out.append(p)
            m //= p
        p += 1
    if m > 1:
        out.append(m)
    if max_factor is not None:
        out.sort()
        while len(out) > 1 and out[0] * out[1] <= max_factor:
            a, b = out.pop(0), out.pop(0)
            out.append(a * b)
            out.sort()
    return tuple(sorted(out))


def _check_modes(modes, size: Optional[int], name: str, what: str) -> Tuple[int, ...]:
    try:
        modes = tuple(modes)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of positive ints, got {modes!r}") from None
    if len(modes) == 0 or not all(isinstance(m, numbers.Integral) and not isinstance(m, bool)
                                  and m >= 1 for m in modes):
        raise ValueError(f"{name}: expected a non-empty sequence of positive ints, got {modes!r}")
    modes = tuple(int(m) for m in modes)
    if size is not None and _prod(modes) != size:
        raise ValueError(f"{name}: the modes {modes} multiply to {_prod(modes)}, but {what} is "
                         f"{size}")
    return modes


def _check_rank(rank, d_out: int, d_in: int) -> int:
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool):
        raise TypeError(f"rank: expected a positive int, got {rank!r}")
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank}")
    if rank > min(d_out, d_in):
        raise ValueError(
            f"rank: {rank} exceeds min(d_out, d_in) = min({d_out}, {d_in}) = {min(d_out, d_in)},"
            f" the largest rank a {d_out} x {d_in} weight can have")
    return rank


def sttp_ranks(out_modes: Sequence[int], in_modes: Sequence[int], rank: int) -> Tuple[int, ...]:
    """The paper's TT-ranks ``R_k = min(rank, R_k^max)`` of the tensorized weight.

    The tensor shape is ``out_modes + reversed(in_modes)``; returns the ``d + 1`` ranks with
    ``R_0 = R_d = 1``. ``ValueError`` if ``rank > min(d_out, d_in)``. Cost O(d).
    """
    out_modes = _check_modes(out_modes, None, "out_modes", "d_out")
    in_modes = _check_modes(in_modes, None, "in_modes", "d_in")
    rank = _check_rank(rank, _prod(out_modes), _prod(in_modes))
    shape = out_modes + in_modes[::-1]
    return tuple(min(rank, f) if 0 < k < len(shape) else 1
                 for k, f in enumerate(feasible_ranks(shape)))


def sttp_dof(out_modes: Sequence[int], in_modes: Sequence[int], rank: int) -> int:
    """Degrees of freedom of an STTP weight with the learned spectrum (paper, Sec. 3.3).

    ``sum_k R_{k-1} n_k R_k - sum_{0<k<d} R_k^2`` with :func:`sttp_ranks`; equals
    ``FixedTTRank(shape, ranks).dim`` and the length of ``theta``. (The ``"identity"``
    spectrum has ``R_c (R_c + 1) / 2`` fewer, see :class:`~ttmanifold.chart.STTPChart`.)
    ``sttp_dof((2,2,2,2), (2,2,2,3,3), 4) == 128``.
    """
    ranks = sttp_ranks(out_modes, in_modes, rank)
    shape = tuple(out_modes) + tuple(in_modes)[::-1]
    return (sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape))
            - sum(r * r for r in ranks[1:-1]))


def svdp_dof(d_out: int, d_in: int, rank: int) -> int:
    """Degrees of freedom ``r (d_out + d_in - r)`` of the rank-r compact SVD ``U diag(s) V^T``
    with a learned spectrum (the dimension of the fixed-rank matrix manifold): full
    Householder frames ``d_out r - r(r+1)/2`` and ``d_in r - r(r+1)/2`` plus ``r`` values.
    ``svdp_dof(16, 72, 4) == 336``."""
    for v, nm in ((d_out, "d_out"), (d_in, "d_in")):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{nm}: expected a positive int, got {v!r}")
    rank = _check_rank(rank, int(d_out), int(d_in))
    return rank * (int(d_out) + int(d_in) - rank)


# ---------------------------------------------------------------------------------------
# contraction planning
# ---------------------------------------------------------------------------------------

class _Plan(NamedTuple):
    groups: Tuple[Tuple[int, int], ...]  # tensor-core intervals [k0, k1), application order
    split: Dict[Tuple[int, int], int]  # matrix-chain split points for merging
    cost: int  # estimated multiply-adds (forward)
    dense: bool  # a single group: the dense weight


def _chain_table(shape, ranks):
    """Optimal matrix-chain merge cost/split for every interval of cores. O(d^3)."""
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


def _make_plan(shape, ranks, c: int, batch: int, mode: str, conv=None) -> _Plan:
    """Cheapest partition of the cores into groups (DP over the interval ends).

    ``conv = (kc1, kend, pix_in, pix_out)``: the group holding core ``c`` must reach ``kc1``
    (it holds every kernel-mode core, tensor cores ``c..kend-1``, and runs as a
    convolution); groups right of it act on the ``pix_in`` input pixels (whose state holds
    channel modes only), the others on ``pix_out`` output pixels.
    """
    d = len(shape)
    pre = [1]
    for n in shape:
        pre.append(pre[-1] * n)

    def N(a, b):
        return pre[b] // pre[a]

    merge, split = _chain_table(shape, ranks)
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
    return _Plan(groups, split, int(best[0]), groups == ((0, d),))


def _merge(cores: Sequence[Tensor], i: int, j: int, split) -> Tensor:
    """Product of cores ``i..j-1`` as one core ``(r_i, n_i...n_{j-1}, r_j)`` (tensor order)."""
    if j - i == 1:
        return cores[i]
    m = split[(i, j)]
    A = _merge(cores, i, m, split)
    B = _merge(cores, m, j, split)
    ri, na, rm = A.shape
    _, nb, rj = B.shape
    return (A.reshape(ri * na, rm) @ B.reshape(rm, nb * rj)).reshape(ri, na * nb, rj)


def _group_matrix(cores, shape, c: int, k0: int, k1: int, split) -> Tensor:
    """Group ``[k0, k1)`` as the matrix ``(r_k0 N_out, r_k1 N_in)`` acting on the state.

    Row index: ``(left bond, out modes in order)``; column index: ``(right bond, in modes
    with j_1 slowest)``, i.e. the group's input modes un-reversed.
    """
    G = _merge(cores, k0, k1, split)
    r0, r1 = G.shape[0], G.shape[2]
    n_in = tuple(shape[max(k0, c):k1]) if k1 > c else ()
    NO = _prod(shape[k0:min(k1, c)]) if k0 < c else 1
    NI = _prod(n_in)
    if len(n_in) <= 1:
        return G.reshape(r0 * NO, NI, r1).transpose(1, 2).reshape(r0 * NO, r1 * NI)
    G = G.reshape((r0 * NO,) + n_in + (r1,))
    e = len(n_in)
    perm = (0, e + 1) + tuple(range(e, 0, -1))
    return G.permute(perm).reshape(r0 * NO, r1 * NI)


def _apply(Gm: Tensor, S: Tensor, r0: int) -> Tensor:
    """One group on the state ``S`` (2-D, rows = (bond, group's in modes) slowest)."""
    rows, cols = Gm.shape
    out = Gm @ S.reshape(cols, -1)
    return out.reshape(r0, -1)


def _interface_singular_values(tt: TT, point_tt: TT, c: int) -> Tensor:
    """Singular values of the c-th unfolding of ``tt``, differentiable through ``tt``.

    ``point_tt`` is a (detached) TT with the same value whose cores ``0..c-1`` are
    left-orthogonal: with ``V`` right-orthogonal cores of it, ``M = U_{<c}^T X V_{>=c}^T``
    is ``r_c x r_c`` and has the singular values of ``X``; to first order around the current
    point (the gradient) also ``d sigma(M) = d sigma(X)``. So the gradient through ``tt`` is
    exact without QR of ``tt``'s (possibly redundant) cores. Cost O(d n r^3).
    """
    U = point_tt.cores
    V = orthogonalize(point_tt, center=c - 1).cores
    X = tt.cores
    L = X[0].new_ones(1, 1)
    for k in range(c):
        L = torch.einsum("ab,anc,bnd->cd", L, X[k], U[k])
    R = X[-1].new_ones(1, 1)
    for k in range(len(X) - 1, c - 1, -1):
        R = torch.einsum("anc,bnd,cd->ab", X[k], V[k], R)
    M = L.transpose(0, 1) @ R
    return torch.linalg.svdvals(M)


# ---------------------------------------------------------------------------------------
# the common base of all layers
# ---------------------------------------------------------------------------------------

class _FactorizedLayer(nn.Module):
    """Shared machinery: a weight ``d_out x d_in`` given by TT cores ``(r_{k-1}, n_k, r_k)``
    of the tensorization ``out_modes + reversed(in_modes)`` (``self._cores()``)."""

    out_modes: Tuple[int, ...]
    in_modes: Tuple[int, ...]

    # -- geometry (set by subclasses) ------------------------------------------------------
    def _init_geometry(self, d_out: int, d_in: int, out_modes, in_modes, contraction):
        self.d_out, self.d_in = d_out, d_in
        self.out_modes = _check_modes(out_modes, d_out, "out_modes", "d_out (out_features/"
                                      "out_channels)")
        self.in_modes = _check_modes(in_modes, d_in, "in_modes", "d_in (in_features, or "
                                     "in_channels*kh*kw for a convolution)")
        self.tensor_shape = self.out_modes + self.in_modes[::-1]
        self.center = len(self.out_modes)
        self.contraction = contraction
        self._plans: Dict[tuple, _Plan] = {}

    @property
    def contraction(self) -> str:
        """``"auto"`` (cheapest estimated plan), ``"dense"`` or ``"tt"`` (never forms W)."""
        return self._contraction

    @contraction.setter
    def contraction(self, value: str) -> None:
        if value not in _CONTRACTIONS:
            raise ValueError(f"contraction: expected one of {_CONTRACTIONS}, got {value!r}")
        self._contraction = value

    # -- abstract --------------------------------------------------------------------------
    def _cores(self) -> List[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _weight_shape(self) -> Tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- weight ----------------------------------------------------------------------------
    def _plan(self, ranks, batch: int, mode: str, conv=None) -> _Plan:
        key = (tuple(ranks), batch, mode, conv)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 64:
                self._plans.clear()
            plan = _make_plan(self.tensor_shape, ranks, self.center, batch, mode, conv)
            self._plans[key] = plan
        return plan

    @staticmethod
    def _ranks_of(cores) -> Tuple[int, ...]:
        return (1,) + tuple(int(g.shape[2]) for g in cores)

    def _matrix_from_cores(self, cores) -> Tensor:
        d = len(cores)
        plan = self._plan(self._ranks_of(cores), 1, "dense")
        return _group_matrix(cores, self.tensor_shape, self.center, 0, d, plan.split)

    def weight_matrix(self) -> Tensor:
        """The dense ``d_out x d_in`` matrix (differentiable). Cost: the optimal
        matrix-chain merge of the cores, about ``d_out d_in r``."""
        return self._matrix_from_cores(self._cores())

    @property
    def weight(self) -> Tensor:
        """Dense weight in torch's shape (``(out, in)`` or ``(out, in, kh, kw)``), built from
        the cores on each access (differentiable)."""
        return self.weight_matrix().reshape(self._weight_shape())

    def tt(self) -> TT:
        """The rank-R TT of the tensorized weight (``out_modes + reversed(in_modes)``)."""
        return TT(self._value_cores(), check=False)

    def _value_cores(self) -> List[Tensor]:
        return self._cores()

    def num_weight_params(self) -> int:
        """Entries stored for the weight (bias excluded)."""
        return sum(p.numel() for n, p in self.named_parameters(recurse=False) if n != "bias")

    def plan(self, *input_shape) -> Tuple[Tuple[int, int], ...]:
        """The groups of cores (tensor-core intervals, input side first) that ``forward``
        would use for an input of ``input_shape``; ``((0, d),)`` is the dense path."""
        return self._plan_for_input(torch.Size(input_shape), self._ranks_of(self._cores()))[0].groups

    # -- helpers for subclasses ------------------------------------------------------------
    def _spectrum_scale(self, r: int) -> float:
        """Singular value giving ``||W||_F^2 = d_out / 3`` (torch's default init)."""
        return math.sqrt(self.d_out / (3.0 * r))

    def _reset_bias(self) -> None:
        if self.bias is not None and self.bias.device.type != "meta":
            bound = 1.0 / math.sqrt(self.d_in) if self.d_in > 0 else 0.0
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    def _check_input_dtype(self, x: Tensor, ref: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype != ref.dtype:
            raise TypeError(f"input: dtype {x.dtype} differs from the layer's {ref.dtype}")


class _LinearBase(_FactorizedLayer):
    """A linear layer ``y = x W^T + b`` with a factorized ``W``."""

    def _init_linear(self, in_features, out_features, bias, device, dtype):
        for v, nm in ((in_features, "in_features"), (out_features, "out_features")):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{nm}: expected a positive int, got {v!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def _default_modes(self, out_modes, in_modes):
        return (factorize(self.out_features) if out_modes is None else out_modes,
                factorize(self.in_features) if in_modes is None else in_modes)

    def _weight_shape(self):
        return (self.out_features, self.in_features)

    def _plan_for_input(self, shape: torch.Size, ranks):
        batch = _prod(shape[:-1]) if len(shape) > 1 else 1
        mode = self.contraction
        plan = self._plan(ranks, max(batch, 1), mode)
        return plan, batch

    def _check_input(self, x: Tensor, ref: Tensor) -> None:
        self._check_input_dtype(x, ref)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input: expected shape (..., {self.in_features}) (in_features="
                             f"{self.in_features}), got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(..., in_features)`` -> ``(..., out_features)``; equals
        ``F.linear(x, self.weight, self.bias)`` to rounding. Cost: see the module docstring."""
        cores = self._cores()
        self._check_input(x, cores[0])
        plan, _ = self._plan_for_input(x.shape, self._ranks_of(cores))
        if plan.dense or x.numel() == 0:
            return self._forward_dense(x, cores, plan)
        return self._forward_tt(x, cores, plan)

    def _forward_dense(self, x: Tensor, cores=None, plan=None) -> Tensor:
        """``F.linear`` with the dense weight (merged from the cores)."""
        cores = self._cores() if cores is None else cores
        W = self._matrix_from_cores(cores)
        return F.linear(x, W, self.bias)

    def _forward_tt(self, x: Tensor, cores=None, plan=None) -> Tensor:
        """Group-wise contraction of the cores with the batch (never forms ``W``)."""
        cores = self._cores() if cores is None else cores
        if plan is None or plan.dense:
            plan = self._plan(self._ranks_of(cores), max(_prod(x.shape[:-1]), 1), "tt")
        lead = x.shape[:-1]
        S = x.reshape(-1, self.in_features).transpose(0, 1)  # (d_in, B): batch fastest
        for k0, k1 in plan.groups:
            Gm = _group_matrix(cores, self.tensor_shape, self.center, k0, k1, plan.split)
            S = _apply(Gm, S, int(cores[k0].shape[0]))
        y = S.reshape(self.out_features, -1).transpose(0, 1).reshape(lead + (self.out_features,))
        if self.bias is not None:
            y = y + self.bias
        return y

    def decompress(self) -> nn.Linear:
        """A plain :class:`torch.nn.Linear` with the current dense weight and bias."""
        ref = self._cores()[0]
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, " + self._param_repr())

    @staticmethod
    def _config_of(layer: nn.Linear) -> dict:
        return dict(in_features=layer.in_features, out_features=layer.out_features,
                    bias=layer.bias is not None)

    @staticmethod
    def _weight_of(layer) -> Tensor:
        return layer.weight


def _pair(v, name: str) -> Tuple[int, int]:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = (int(v), int(v))
    try:
        v = tuple(int(a) for a in v)
    except TypeError:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}") from None
    if len(v) != 2:
        raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")
    return v


class _Conv2dBase(_FactorizedLayer):
    """A 2-D convolution whose weight matrix ``out x (in kh kw)`` is factorized."""

    def _init_conv(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                   groups, bias, padding_mode, device, dtype):
        for v, nm in ((in_channels, "in_channels"), (out_channels, "out_channels")):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{nm}: expected a positive int, got {v!r}")
        if groups != 1:
            raise ValueError(f"groups: only groups=1 is supported (the weight is factorized as "
                             f"one out x (in*kh*kw) matrix), got groups={groups!r}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode: expected 'zeros', 'reflect', 'replicate' or "
                             f"'circular', got {padding_mode!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        if min(self.kernel_size) < 1:
            raise ValueError(f"kernel_size: expected positive sizes, got {kernel_size!r}")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError("stride and dilation must be positive")
        self.groups = 1
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"padding: expected 'valid', 'same', an int or a pair, got "
                                 f"{padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
            if padding == "valid":
                self._pads = (0, 0, 0, 0)
            else:
                pads = []
                for k, dl in zip(self.kernel_size[::-1], self.dilation[::-1]):
                    tot = dl * (k - 1)
                    pads += [tot // 2, tot - tot // 2]
                self._pads = tuple(pads)
        else:
            self.padding = _pair(padding, "padding")
            if min(self.padding) < 0:
                raise ValueError(f"padding: expected non-negative sizes, got {padding!r}")
            ph, pw = self.padding
            self._pads = (pw, pw, ph, ph)  # F.pad order: (left, right, top, bottom)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def _default_modes(self, out_modes, in_modes):
        kh, kw = self.kernel_size
        if in_modes is None:
            kern = tuple(f for f in factorize(kh) + factorize(kw) if f > 1)
            in_modes = tuple(f for f in factorize(self.in_channels) if f > 1) + kern or (1,)
        return (factorize(self.out_channels) if out_modes is None else out_modes, in_modes)

    def _weight_shape(self):
        return (self.out_channels, self.in_channels) + self.kernel_size

    def _kernel_range(self) -> Tuple[int, int]:
        """``(kc1, kend)``: tensor cores ``c..kend-1`` hold the kernel modes (``kend = d - p``,
        ``p`` the number of channel modes, ``prod(in_modes[:p]) == in_channels``, 0 if no
        prefix matches); the convolution group must contain cores ``c..kc1-1``,
        ``kc1 = max(kend, c + 1)``."""
        E = len(self.in_modes)
        p = 0
        acc = 1
        for q in range(E + 1):
            if acc == self.in_channels:
                p = q
            if q < E:
                acc *= self.in_modes[q]
        d = len(self.tensor_shape)
        return max(d - p, self.center + 1), d - p

    def _kernel_boundary(self) -> int:
        return self._kernel_range()[0]

    def _out_size(self, H: int, W: int) -> Tuple[int, int]:
        pl, pr, pt, pb = self._pads
        kh, kw = self.kernel_size
        dh, dw = self.dilation
        sh, sw = self.stride
        Ho = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
        return Ho, Wo

    def _plan_for_input(self, shape: torch.Size, ranks):
        B = shape[0] if len(shape) == 4 else 1
        H, W = int(shape[-2]), int(shape[-1])
        Ho, Wo = self._out_size(H, W)
        conv = self._kernel_range() + (H * W, Ho * Wo)
        return self._plan(ranks, max(int(B), 1), self.contraction, conv), B

    def _check_input(self, x: Tensor, ref: Tensor) -> None:
        self._check_input_dtype(x, ref)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"input: expected shape (B, {self.in_channels}, H, W) or "
                             f"({self.in_channels}, H, W) (in_channels={self.in_channels}), got "
                             f"{tuple(x.shape)}")
        Ho, Wo = self._out_size(int(x.shape[-2]), int(x.shape[-1]))
        if Ho < 1 or Wo < 1:
            raise ValueError(f"input: spatial size {tuple(x.shape[-2:])} is smaller than the "
                             f"dilated kernel {self.kernel_size} (dilation {self.dilation}) after "
                             f"padding {self._pads}")

    def _conv(self, x: Tensor, kernel: Tensor) -> Tensor:
        """``F.conv2d`` with this layer's stride/padding/dilation/padding_mode, no bias."""
        pl, pr, pt, pb = self._pads
        if self.padding_mode == "zeros" and pl == pr and pt == pb:
            return F.conv2d(x, kernel, None, self.stride, (pt, pl), self.dilation)
        if any(self._pads):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pads, mode=mode)
        return F.conv2d(x, kernel, None, self.stride, 0, self.dilation)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, in, H, W)`` or ``(in, H, W)`` -> ``(B, out, Ho, Wo)`` (or unbatched);
        equals ``F.conv2d`` with :attr:`weight` (same stride/padding/...) to rounding."""
        cores = self._cores()
        self._check_input(x, cores[0])
        plan, _ = self._plan_for_input(x.shape, self._ranks_of(cores))
        if plan.dense or x.numel() == 0:
            return self._forward_dense(x, cores, plan)
        return self._forward_tt(x, cores, plan)

    def _forward_dense(self, x: Tensor, cores=None, plan=None) -> Tensor:
        """``F.conv2d`` with the dense weight."""
        cores = self._cores() if cores is None else cores
        W = self._matrix_from_cores(cores).reshape(self._weight_shape())
        y = self._conv(x, W)
        if self.bias is not None:
            y = y + self.bias.reshape(-1, 1, 1)
        return y

    def _forward_tt(self, x: Tensor, cores=None, plan=None) -> Tensor:
        """Channel groups as per-pixel GEMMs, the kernel group as ``F.conv2d`` with a small
        ``(r', c', kh, kw)`` kernel, output groups as per-pixel GEMMs. Never forms W."""
        cores = self._cores() if cores is None else cores
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if plan is None or plan.dense:
            plan = self._plan_for_input(x.shape, self._ranks_of(cores))[0]
            if plan.dense:
                conv = self._kernel_range() + (x.shape[-2] * x.shape[-1],
                                               _prod(self._out_size(x.shape[-2], x.shape[-1])))
                plan = self._plan(self._ranks_of(cores), x.shape[0], "tt", conv)
        B, C, H, W = x.shape
        c, shape = self.center, self.tensor_shape
        kh, kw = self.kernel_size
        S = None  # state (rows, B*pixels) with batch before pixels
        y = None
        after = False
        for k0, k1 in plan.groups:
            Gm = _group_matrix(cores, shape, c, k0, k1, plan.split)
            r0 = int(cores[k0].shape[0])
            if k0 <= c < k1:  # the convolution group
                rows, cols = Gm.shape
                if S is None:
                    inp = x
                else:
                    inp = S.reshape(-1, B, H, W).transpose(0, 1)
                kernel = Gm.reshape(rows, cols // (kh * kw), kh, kw)
                out = self._conv(inp, kernel)  # (B, rows, Ho, Wo)
                Ho, Wo = out.shape[-2:]
                after = True
                y = out
                S = None
                continue
            if S is None:
                if after:
                    S = y.transpose(0, 1).reshape(y.shape[1], -1)
                else:
                    S = x.transpose(0, 1).reshape(C, -1)
            S = _apply(Gm, S, r0)
            y = None
        if y is None:
            y = S.reshape(self.out_channels, B, Ho, Wo).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias.reshape(-1, 1, 1)
        return y.squeeze(0) if unbatched else y

    def decompress(self) -> nn.Conv2d:
        """A plain :class:`torch.nn.Conv2d` with the current dense weight and bias."""
        ref = self._cores()[0]
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, 1, self.bias is not None,
                         self.padding_mode, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.bias is None:
            s += ", bias=False"
        return s + ", " + self._param_repr()

    @staticmethod
    def _config_of(layer: nn.Conv2d) -> dict:
        if layer.groups != 1:
            raise ValueError(f"groups: only groups=1 is supported, the layer has groups="
                             f"{layer.groups}")
        return dict(in_channels=layer.in_channels, out_channels=layer.out_channels,
                    kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                    dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
                    padding_mode=layer.padding_mode)

    @staticmethod
    def _weight_of(layer) -> Tensor:
        return layer.weight


# ---------------------------------------------------------------------------------------
# STTP parameterization
# ---------------------------------------------------------------------------------------

class _STTPMixin:
    """STTP weight: ``theta`` (chart mode) or a :class:`geoopt.ManifoldParameter` (manifold
    mode). Requires ``_init_geometry`` to have run."""

    def _init_sttp(self, rank, spectrum, param, init, device, dtype):
        if spectrum not in _SPECTRA:
            raise ValueError(f"spectrum: expected one of {_SPECTRA}, got {spectrum!r}")
        if param not in ("chart", "manifold"):
            raise ValueError(f"param: expected 'chart' or 'manifold', got {param!r}")
        if init not in _INITS:
            raise ValueError(f"init: expected one of {_INITS}, got {init!r}")
        chart = _chart_module()
        self.rank = _check_rank(rank, self.d_out, self.d_in)
        self.spectrum = spectrum
        self.init = init
        ranks = sttp_ranks(self.out_modes, self.in_modes, self.rank)
        self.ranks = ranks
        manifold = FixedTTRank(self.tensor_shape, ranks)
        self.chart = chart.STTPChart(manifold, center=self.center, spectrum=spectrum)
        self.param = "chart"
        dtype = dtype or torch.get_default_dtype()
        self.theta = nn.Parameter(torch.empty(self.chart.dim, device=device, dtype=dtype))
        self.register_parameter("point", None)
        self.reset_parameters()
        if param == "manifold":
            self.to_manifold()

    @property
    def manifold(self) -> FixedTTRank:
        """The :class:`~ttmanifold.FixedTTRank` of the tensorized weight."""
        return self.chart.manifold

    def _param_repr(self) -> str:
        return (f"rank={self.rank}, spectrum={self.spectrum!r}, param={self.param!r}, "
                f"modes={self.out_modes}|{self.in_modes}, ranks={self.ranks}, "
                f"dof={self.chart.dim}")

    def reset_parameters(self) -> None:
        """Re-initialize (``self.init``) the weight in the current mode, and the bias like
        torch (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``). A no-op for the values on ``meta``."""
        ref = self.theta if self.param == "chart" else self.point
        dtype, device = ref.dtype, ref.device
        if self.init == "orthogonal":
            theta = self.chart.orthogonal_init(dtype=dtype, device=device)
        else:
            theta = self.chart.random_theta(dtype=dtype, device=device)
        if self.spectrum == "learned" and device.type != "meta":
            b = next(blk for blk in self.chart.layout if blk.name == "s")
            s = theta[b.start:b.start + b.size]
            s = s * (math.sqrt(self.d_out / 3.0) / torch.linalg.vector_norm(s))
            theta = torch.cat([theta[:b.start], s, theta[b.start + b.size:]])
        with torch.no_grad():
            if self.param == "chart":
                self.theta.copy_(theta)
            else:
                self.point.copy_(self.manifold.pack_point(self.chart(theta)))
        self._reset_bias()

    # -- cores -----------------------------------------------------------------------------
    def _point_tt(self) -> TT:
        return self.manifold.to_tt(self.point)

    def _cores(self) -> List[Tensor]:
        if self.param == "chart":
            return self.chart(self.theta).cores
        tt = self.manifold.unpack_tensor(self.point)
        if self.spectrum == "lipschitz":
            smax = _interface_singular_values(tt, self._point_tt().detach(), self.center)[0]
            cores = tt.cores
            cores[self.center] = cores[self.center] / smax
            return cores
        return tt.cores

    def _value_cores(self) -> List[Tensor]:
        if self.param == "chart":
            return self.chart(self.theta).cores
        tt = self._point_tt()
        cores = tt.cores
        if self.spectrum == "lipschitz":
            smax = _interface_singular_values(tt, tt.detach(), self.center)[0]
            cores[self.center] = cores[self.center] / smax
        return cores

    def singular_values(self) -> Tensor:
        """The spectrum of ``W`` (``R_c`` values): chart mode the chart's effective signed
        ``s`` (:meth:`STTPChart.singular_values`), manifold mode the singular values of the
        point's c-th unfolding (descending; divided by the largest for ``"lipschitz"``).
        Differentiable; cost O(d n r^3)."""
        if self.param == "chart":
            return self.chart.singular_values(self.theta)
        tt = self.manifold.unpack_tensor(self.point)
        sv = _interface_singular_values(tt, self._point_tt().detach(), self.center)
        sv = sv[: self.ranks[self.center]]
        if self.spectrum == "lipschitz":
            sv = sv / sv[0]
        return sv

    # -- conversions -----------------------------------------------------------------------
    def to_manifold(self):
        """Switch to manifold mode in place (``theta`` -> ``point``, same weight). Returns
        ``self``. Re-create the optimizer afterwards. ``ValueError`` for ``"identity"``."""
        if self.param == "manifold":
            return self
        if self.spectrum == "identity":
            raise ValueError("to_manifold: the 'identity' spectrum is a submanifold of "
                             "FixedTTRank that the manifold mode cannot keep; use the chart "
                             "mode or spectrum='learned'/'lipschitz'")
        import geoopt

        theta = self.theta
        with torch.no_grad():
            point = self.manifold.pack_point(self.chart(theta.detach()))
        self.theta = None
        self.point = geoopt.ManifoldParameter(point, manifold=self.manifold,
                                              requires_grad=theta.requires_grad)
        self.param = "manifold"
        self._plans.clear()
        return self

    def to_chart(self):
        """Switch to chart mode in place (``point`` -> ``theta = chart.inverse(point)``, same
        weight up to rounding). Returns ``self``. Re-create the optimizer afterwards."""
        if self.param == "chart":
            return self
        point = self.point
        with torch.no_grad():
            theta = self.chart.inverse(self.manifold.to_tt(point.detach()), project=True)
        self.point = None
        self.theta = nn.Parameter(theta.contiguous(), requires_grad=point.requires_grad)
        self.param = "chart"
        self._plans.clear()
        return self

    def spectral_penalty(self) -> Tensor:
        """``d_optimal_penalty`` (``-sum log|s_i|``) of :meth:`singular_values`."""
        return _chart_module().d_optimal_penalty(self.singular_values())

    # -- construction from a dense weight --------------------------------------------------
    def _load_dense(self, W: Tensor) -> None:
        """Set the weight to the TT-SVD (paper ranks) of the matrix ``W``, projected onto the
        spectrum constraint (``chart.inverse(project=True)``)."""
        W = W.detach().to(dtype=self._ref().dtype, device=self._ref().device)
        T = W.reshape(self.out_modes + self.in_modes)
        e, D = len(self.in_modes), len(self.out_modes)
        T = T.permute(tuple(range(D)) + tuple(range(D + e - 1, D - 1, -1)))
        with torch.no_grad():
            x = TT.from_dense(T.contiguous(), ranks=self.ranks)
            theta = self.chart.inverse(x, project=True)
            if self.param == "chart":
                self.theta.copy_(theta)
            else:
                self.point.copy_(self.manifold.pack_point(self.chart(theta)))

    def _ref(self) -> Tensor:
        return self.theta if self.param == "chart" else self.point


# ---------------------------------------------------------------------------------------
# SVDP parameterization (compact SVD baseline)
# ---------------------------------------------------------------------------------------

class _SVDPMixin:
    """``W = U diag(s) V^T`` with full Householder frames ``U = frame_from_full(u_params)``
    (``d_out x r``), ``V = frame_from_full(v_params)`` (``d_in x r``) and a spectrum ``s``
    (parameter ``s`` for "learned"/"lipschitz", absent for "identity")."""

    def _init_svdp(self, rank, spectrum, init, device, dtype):
        if spectrum not in _SPECTRA:
            raise ValueError(f"spectrum: expected one of {_SPECTRA}, got {spectrum!r}")
        if init not in _INITS:
            raise ValueError(f"init: expected one of {_INITS}, got {init!r}")
        from .householder import full_dim

        self.rank = _check_rank(rank, self.d_out, self.d_in)
        self.spectrum = spectrum
        self.init = init
        self.param = "chart"
        dtype = dtype or torch.get_default_dtype()
        r = self.rank
        self.u_params = nn.Parameter(torch.empty(full_dim(self.d_out, r), device=device,
                                                 dtype=dtype))
        if spectrum == "identity":
            self.register_parameter("s", None)
        else:
            self.s = nn.Parameter(torch.empty(r, device=device, dtype=dtype))
        self.v_params = nn.Parameter(torch.empty(full_dim(self.d_in, r), device=device,
                                                 dtype=dtype))
        self.reset_parameters()

    def _param_repr(self) -> str:
        return f"rank={self.rank}, spectrum={self.spectrum!r}, dof={self.num_weight_params()}"

    def reset_parameters(self) -> None:
        """``init="orthogonal"``: Householder parameters 0 (``U = -I``, ``V = -I``), ``s``
        equal to :meth:`_spectrum_scale` (learned) or 1; ``"random"``: parameters N(0, 1), ``s``
        uniform in [0.5, 1.5) rescaled to ``||s|| = sqrt(d_out / 3)``. Bias as torch."""
        with torch.no_grad():
            if self.u_params.device.type != "meta":
                if self.init == "orthogonal":
                    self.u_params.zero_()
                    self.v_params.zero_()
                else:
                    self.u_params.normal_()
                    self.v_params.normal_()
                if self.s is not None:
                    if self.init == "orthogonal":
                        self.s.fill_(1.0)
                    else:
                        self.s.uniform_(0.5, 1.5)
                    if self.spectrum == "learned":
                        self.s.mul_(math.sqrt(self.d_out / 3.0) / torch.linalg.vector_norm(self.s))
        self._reset_bias()

    def _frames(self):
        from .householder import frame_from_full

        U = frame_from_full(self.u_params, self.d_out, self.rank)
        V = frame_from_full(self.v_params, self.d_in, self.rank)
        return U, V

    def singular_values(self) -> Tensor:
        """The effective (signed) spectrum: ``s``, ``s / max|s|`` or ones."""
        if self.spectrum == "identity":
            return self.u_params.new_ones(self.rank)
        if self.spectrum == "lipschitz":
            return _chart_module().lipschitz_normalize(self.s)
        return self.s

    def _cores(self) -> List[Tensor]:
        U, V = self._frames()
        s = self.singular_values()
        return [U.reshape(1, self.d_out, self.rank),
                (s.unsqueeze(0) * V).transpose(0, 1).reshape(self.rank, self.d_in, 1)]

    def spectral_penalty(self) -> Tensor:
        """``d_optimal_penalty`` (``-sum log|s_i|``) of :meth:`singular_values`."""
        return _chart_module().d_optimal_penalty(self.singular_values())

    def _load_dense(self, W: Tensor) -> None:
        """Truncated SVD of ``W``; "lipschitz" keeps ``s`` (normalized in the forward),
        "identity" replaces ``s`` by ones (the polar factor of the truncation)."""
        from .householder import full_from_frame

        ref = self.u_params
        W = W.detach().to(dtype=ref.dtype, device=ref.device)
        r = self.rank
        with torch.no_grad():
            P, S, Qh = torch.linalg.svd(W, full_matrices=False)
            U, S, V = P[:, :r], S[:r], Qh[:r].transpose(0, 1)
            pu, su = full_from_frame(U)
            if self.spectrum == "identity":
                pv, ok = _chart_module()._full_from_frame_unsigned(V * su)
                if not bool(ok):
                    raise ValueError("W: the right singular frame is outside the domain of the "
                                     "sign-free Householder inverse ('identity' spectrum); use "
                                     "spectrum='learned'")
            else:
                pv, sv = full_from_frame(V)
                self.s.copy_(su * S * sv)
            self.u_params.copy_(pu)
            self.v_params.copy_(pv)

    def _ref(self) -> Tensor:
        return self.u_params

    def to_manifold(self):
        raise NotImplementedError("SVDP layers have only the chart mode (use STTP layers with "
                                  "out_modes=(d_out,), in_modes=(d_in,) for the fixed-rank "
                                  "matrix manifold)")

    def to_chart(self):
        return self


# ---------------------------------------------------------------------------------------
# public layers
# ---------------------------------------------------------------------------------------

def _from_dense(cls, kind_base, layer_or_weight, rank, kw):
    if isinstance(layer_or_weight, nn.Module):
        cfg = kind_base._config_of(layer_or_weight)
        W = kind_base._weight_of(layer_or_weight).detach()
        bias = layer_or_weight.bias
        kw = dict(kw)
        kw.setdefault("device", W.device)
        kw.setdefault("dtype", W.dtype)
        layer = cls(**cfg, rank=rank, **kw)
    elif isinstance(layer_or_weight, Tensor):
        W = layer_or_weight.detach()
        kw = dict(kw)
        bias = kw.pop("bias", None)
        kw.setdefault("device", W.device)
        kw.setdefault("dtype", W.dtype)
        if issubclass(cls, _LinearBase):
            if W.dim() != 2:
                raise ValueError(f"weight: expected shape (out_features, in_features), got "
                                 f"{tuple(W.shape)}")
            cfg = dict(in_features=W.shape[1], out_features=W.shape[0])
        else:
            if W.dim() != 4:
                raise ValueError(f"weight: expected shape (out, in, kh, kw), got "
                                 f"{tuple(W.shape)}")
            cfg = dict(in_channels=W.shape[1], out_channels=W.shape[0],
                       kernel_size=tuple(W.shape[2:]))
        has_bias = bias is not None and bias is not False
        layer = cls(**cfg, bias=has_bias, rank=rank, **kw)
        if isinstance(bias, Tensor):
            pass
        elif has_bias:
            bias = torch.zeros(layer.d_out)
        else:
            bias = None
    else:
        raise TypeError(f"layer_or_weight: expected an nn.Module or a weight tensor, got "
                        f"{type(layer_or_weight).__name__}")
    layer._load_dense(W.reshape(W.shape[0], -1))
    if bias is not None:
        if tuple(bias.shape) != (layer.d_out,):
            raise ValueError(f"bias: expected shape ({layer.d_out},), got {tuple(bias.shape)}")
        with torch.no_grad():
            layer.bias.copy_(bias.detach())
    return layer


class STTPLinear(_STTPMixin, _LinearBase):
    """``nn.Linear`` with an STTP weight (Obukhov et al. 2021).

    Parameters
    ----------
    in_features, out_features, bias, device, dtype : as :class:`torch.nn.Linear` (dtype
        float32 or float64).
    rank : int
        Maximal TT-rank ``r``; bond ranks are ``R_k = min(r, R_k^max)``. ``1 <= rank <=
        min(out_features, in_features)`` else ``ValueError``.
    spectrum : ``"learned"`` | ``"lipschitz"`` | ``"identity"``
        Learned signed singular values; ``s / ||s||_inf`` (spectral norm of ``W`` exactly 1);
        all ones.
    out_modes, in_modes : sequences of ints
        Tensorization of ``out_features`` / ``in_features`` (row-major digits of the row /
        column index). Default :func:`factorize`. ``ValueError`` if the product is wrong.
    param : ``"chart"`` | ``"manifold"``
        Which parameter is trained, ``theta`` (``(dof,)``) or ``point`` (packed cores).
    init : ``"orthogonal"`` | ``"random"``
        See the module docstring.
    contraction : ``"auto"`` | ``"dense"`` | ``"tt"``
        Forward path (module docstring); may be changed at any time.

    Attributes: ``tensor_shape``, ``ranks``, ``center`` (number of out modes), ``chart``
    (:class:`~ttmanifold.chart.STTPChart`), ``manifold``, ``theta`` or ``point``, ``bias``.
    Number of weight parameters: ``chart.dim`` = :func:`sttp_dof` (learned/lipschitz) in
    chart mode, ``manifold.size`` (packed cores; ``manifold.dim`` degrees of freedom) in
    manifold mode.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int,
                 spectrum: str = "learned", out_modes: Optional[Sequence[int]] = None,
                 in_modes: Optional[Sequence[int]] = None, param: str = "chart",
                 init: str = "orthogonal", contraction: str = "auto", device=None, dtype=None):
        super().__init__()
        self._init_linear(in_features, out_features, bias, device, dtype)
        out_modes, in_modes = self._default_modes(out_modes, in_modes)
        self._init_geometry(self.out_features, self.in_features, out_modes, in_modes,
                            contraction)
        self._init_sttp(rank, spectrum, param, init, device, dtype)

    @classmethod
    def from_dense(cls, layer_or_weight: Union[nn.Linear, Tensor], rank: int, **kw) -> "STTPLinear":
        """Build from an ``nn.Linear`` (weight, bias, dtype, device copied) or a weight
        tensor ``(out, in)`` (``bias=`` a tensor to copy, ``True`` for zeros, default none).
        The weight is TT-SVD-truncated to the paper ranks (exact if its TT-ranks are
        within them) and mapped through ``chart.inverse(project=True)``. ``**kw``: the
        constructor's keyword arguments."""
        return _from_dense(cls, _LinearBase, layer_or_weight, rank, kw)


class STTPConv2d(_STTPMixin, _Conv2dBase):
    """``nn.Conv2d`` with an STTP weight; the weight matrix is ``out x (in kh kw)``.

    Arguments as :class:`torch.nn.Conv2d` (``groups`` must be 1; ``padding`` may be an int,
    a pair, ``"valid"`` or ``"same"``) plus the keyword arguments of :class:`STTPLinear`.
    Default ``in_modes = factorize(in) + factorize(kh) + factorize(kw)`` (size-1 factors
    dropped), so the kernel modes are the innermost input modes (next to the spectrum).
    The forward's kernel group runs as a small convolution (module docstring).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 *, rank: int, spectrum: str = "learned",
                 out_modes: Optional[Sequence[int]] = None,
                 in_modes: Optional[Sequence[int]] = None, param: str = "chart",
                 init: str = "orthogonal", contraction: str = "auto", device=None, dtype=None):
        super().__init__()
        self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation,
                        groups, bias, padding_mode, device, dtype)
        out_modes, in_modes = self._default_modes(out_modes, in_modes)
        kh, kw = self.kernel_size
        self._init_geometry(self.out_channels, self.in_channels * kh * kw, out_modes, in_modes,
                            contraction)
        self._init_sttp(rank, spectrum, param, init, device, dtype)

    @classmethod
    def from_dense(cls, layer_or_weight: Union[nn.Conv2d, Tensor], rank: int, **kw) -> "STTPConv2d":
        """As :meth:`STTPLinear.from_dense`, from an ``nn.Conv2d`` (its configuration is
        copied) or a weight ``(out, in, kh, kw)`` (pass stride/padding/... in ``kw``)."""
        return _from_dense(cls, _Conv2dBase, layer_or_weight, rank, kw)


class SVDPLinear(_SVDPMixin, _LinearBase):
    """``nn.Linear`` with ``W = U diag(s) V^T`` (rank ``r`` compact SVD, Householder frames).

    Weight parameters: ``u_params`` (``d_out r - r(r+1)/2``), ``s`` (``r``, absent for
    ``"identity"``), ``v_params`` (``d_in r - r(r+1)/2``): :func:`svdp_dof` in total for the
    learned spectrum. The forward is ``(x V) diag(s) U^T`` or dense, whichever the flop
    estimate prefers. Arguments as :class:`STTPLinear` (no modes, no ``param``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int,
                 spectrum: str = "learned", init: str = "orthogonal", contraction: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        self._init_linear(in_features, out_features, bias, device, dtype)
        self._init_geometry(self.out_features, self.in_features, (self.out_features,),
                            (self.in_features,), contraction)
        self._init_svdp(rank, spectrum, init, device, dtype)

    @classmethod
    def from_dense(cls, layer_or_weight, rank: int, **kw) -> "SVDPLinear":
        """Truncated SVD of the weight (exact for a rank-``r`` weight); as
        :meth:`STTPLinear.from_dense` otherwise."""
        return _from_dense(cls, _LinearBase, layer_or_weight, rank, kw)


class SVDPConv2d(_SVDPMixin, _Conv2dBase):
    """``nn.Conv2d`` with ``W = U diag(s) V^T`` on the ``out x (in kh kw)`` matrix. The
    factored forward is a convolution with the ``r`` filters ``diag(s) V^T`` followed by
    the 1x1 map ``U``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 *, rank: int, spectrum: str = "learned", init: str = "orthogonal",
                 contraction: str = "auto", device=None, dtype=None):
        super().__init__()
        self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation,
                        groups, bias, padding_mode, device, dtype)
        kh, kw = self.kernel_size
        d_in = self.in_channels * kh * kw
        self._init_geometry(self.out_channels, d_in, (self.out_channels,), (d_in,), contraction)
        self._init_svdp(rank, spectrum, init, device, dtype)

    @classmethod
    def from_dense(cls, layer_or_weight, rank: int, **kw) -> "SVDPConv2d":
        """As :meth:`SVDPLinear.from_dense` for convolutions."""
        return _from_dense(cls, _Conv2dBase, layer_or_weight, rank, kw)


_LAYER_TYPES = (STTPLinear, STTPConv2d, SVDPLinear, SVDPConv2d)


# ---------------------------------------------------------------------------------------
# model-level utilities
# ---------------------------------------------------------------------------------------

def _dense_count(layer: _FactorizedLayer) -> int:
    return layer.d_out * layer.d_in + (layer.bias.numel() if layer.bias is not None else 0)


def compression_ratio(model: nn.Module) -> Dict[str, object]:
    """Parameter counts of the factorized layers against their dense equivalents.

    Returns a dict with

    - ``"layers"``: ``{name: dense / actual}`` per STTP/SVDP layer, counting weight plus
      bias (dense: ``d_out d_in + bias``; actual: the stored parameters, ``theta`` or the
      packed ``point``, plus bias);
    - ``"replaced"``: the same ratio summed over those layers;
    - ``"model"``: ``(all parameters if these layers were dense) / (all parameters)``;
    - ``"dense_params"``, ``"params"``: the two totals of the model.

    A ratio of 1.0 is returned when the model has no such layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers, dense_sum, actual_sum = {}, 0, 0
    for name, m in model.named_modules():
        if isinstance(m, _FactorizedLayer):
            dn = _dense_count(m)
            ac = sum(p.numel() for p in m.parameters(recurse=False))
            layers[name] = dn / ac
            dense_sum += dn
            actual_sum += ac
    total = sum(p.numel() for p in model.parameters())
    dense_total = total - actual_sum + dense_sum
    return {
        "layers": layers,
        "replaced": dense_sum / actual_sum if actual_sum else 1.0,
        "model": dense_total / total if total else 1.0,
        "dense_params": dense_total,
        "params": total,
    }


def spectral_penalty(model: nn.Module) -> Tensor:
    """Sum of the D-optimal penalties ``-sum_i log|s_i|`` over every STTP/SVDP layer of
    ``model`` (``model`` itself included) with ``spectrum="learned"``. A 0-d tensor
    (0. without such layers). Differentiable; cost O(d n r^3) per layer."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    total = None
    for m in model.modules():
        if isinstance(m, _FactorizedLayer) and m.spectrum == "learned":
            v = m.spectral_penalty()
            total = v if total is None else total + v
    if total is None:
        ref = next(iter(model.parameters()), None)
        return torch.zeros((), dtype=ref.dtype if ref is not None else None,
                           device=ref.device if ref is not None else None)
    return total


def replace_layers(model: nn.Module, rank: int, kinds: Sequence[str] = ("linear", "conv2d"),
                   names: Optional[Sequence[str]] = None, method: str = "sttp",
                   init: str = "from_dense", **kw) -> List[str]:
    """Replace ``nn.Linear`` / ``nn.Conv2d`` submodules of ``model`` in place.

    - ``kinds``: subset of ``("linear", "conv2d")``; ``names``: qualified module names to
      replace (default: every module of those kinds). Exact types only (subclasses of
      ``nn.Linear`` such as ``NonDynamicallyQuantizableLinear`` inside attention are left
      alone unless named).
    - ``method``: ``"sttp"`` (:class:`STTPLinear` / :class:`STTPConv2d`) or ``"svdp"``.
    - ``init``: ``"from_dense"`` (TT-SVD / SVD of the current weight) or ``"orthogonal"``
      (fresh :meth:`reset_parameters` init); the bias is copied in both cases.
    - ``**kw``: keyword arguments of the new layers (``spectrum``, ``param``,
      ``contraction``, ...).

    Layers that cannot take ``rank`` (``rank > min(d_out, d_in)``) or are grouped
    convolutions are skipped with a warning when ``names`` is None and raise
    ``ValueError`` when named. Returns the replaced names, in module order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in ("linear", "conv2d")]
    if bad:
        raise ValueError(f"kinds: expected a subset of ('linear', 'conv2d'), got {kinds!r}")
    if method not in ("sttp", "svdp"):
        raise ValueError(f"method: expected 'sttp' or 'svdp', got {method!r}")
    if init not in ("from_dense", "orthogonal"):
        raise ValueError(f"init: expected 'from_dense' or 'orthogonal', got {init!r}")
    modules = dict(model.named_modules())
    classes = {"linear": (nn.Linear, STTPLinear if method == "sttp" else SVDPLinear, _LinearBase),
               "conv2d": (nn.Conv2d, STTPConv2d if method == "sttp" else SVDPConv2d, _Conv2dBase)}
    if names is not None:
        names = list(names)
        for n in names:
            if n not in modules:
                raise ValueError(f"names: model has no submodule {n!r}")
        targets = names
    else:
        targets = [n for n, m in modules.items()
                   if any(type(m) is classes[k][0] for k in kinds)]
    replaced = []
    for name in targets:
        m = modules[name]
        kind = next((k for k in kinds if isinstance(m, classes[k][0])), None)
        if kind is None:
            raise ValueError(f"names: {name!r} is a {type(m).__name__}, not one of the kinds "
                             f"{kinds}")
        _, cls, base = classes[kind]
        try:
            cfg = base._config_of(m)
            d_out = m.weight.shape[0]
            d_in = m.weight[0].numel()
            _check_rank(rank, d_out, d_in)
        except ValueError as e:
            if names is not None:
                raise ValueError(f"{name}: {e}") from None
            warnings.warn(f"replace_layers: skipping {name!r}: {e}", UserWarning, stacklevel=2)
            continue
        if init == "from_dense":
            new = cls.from_dense(m, rank, **kw)
        else:
            kw2 = dict(kw)
            kw2.setdefault("device", m.weight.device)
            kw2.setdefault("dtype", m.weight.dtype)
            new = cls(**cfg, rank=rank, init="orthogonal", **kw2)
            if m.bias is not None:
                with torch.no_grad():
                    new.bias.copy_(m.bias)
        new.train(m.training)
        if name == "":
            raise ValueError("names: cannot replace the model itself")
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, attr, new)
        replaced.append(name)
    return replaced
