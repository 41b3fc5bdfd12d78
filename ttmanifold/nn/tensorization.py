"""How a weight matrix becomes a tensor train: modes, their order, ranks and DOF counts.

One convention for every STTP weight in ttmanifold (layers, adapters and
:class:`~ttmanifold.nn.STTPParametrization`): a :class:`Tensorization` lists the row digits
(``out_modes``) and column digits (``in_modes``) of ``W`` (``d_out x d_in``), slowest digit
first, and an ``order`` that says how the column digits follow the row digits in the
train. The spectral position (``center``) always sits between the two groups, so the
spectrum of the chart is the spectrum of ``W``. Mathematics and the two published
conventions: ``docs/sttp.md``, section "Tensorization".
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple

from torch import Tensor

from .._checks import feasible_ranks

__all__ = [
    "ORDERS",
    "SCHEMES",
    "Tensorization",
    "factorize",
    "check_modes",
    "check_rank",
    "sttp_ranks",
    "sttp_dof",
    "svdp_dof",
    "svdp_rank",
]

#: ``"natural"``: the train holds ``out_modes + in_modes`` (``W`` reshaped row-major, the
#: reference code's layout); ``"reversed"``: ``out_modes + reversed(in_modes)`` (the
#: paper's section 8 example).
ORDERS = ("natural", "reversed")
#: Default mode choices: ``"reference"`` (prime factors of C_out, then of C_in, the kernel
#: ``kh*kw*..`` as one mode, natural order; reproduces the paper's tables) and
#: ``"section8"`` (prime factors, kernel sizes factorized too, reversed order).
SCHEMES = ("reference", "section8")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def factorize(n: int, max_factor: Optional[int] = None) -> Tuple[int, ...]:
    """The prime factors of ``n`` in ascending order (``factorize(72) == (2, 2, 2, 3, 3)``,
    ``factorize(1) == (1,)``, a prime is its own factor).

    Args:
        n: positive int.
        max_factor: if given (int >= 2), repeatedly merge the two smallest factors while
            their product is ``<= max_factor`` (fewer, larger modes);
            ``factorize(1024, max_factor=4) == (4, 4, 4, 4, 4)``. Primes above it stay.

    Returns:
        tuple of ints, product ``n``. Cost ``O(sqrt(n))``.
    """
    if not _is_int(n) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if max_factor is not None and (not _is_int(max_factor) or max_factor < 2):
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


def check_modes(modes, size: Optional[int], name: str, what: str) -> Tuple[int, ...]:
    """``modes`` as a tuple of positive ints multiplying to ``size`` (unless None), else
    ``TypeError``/``ValueError`` naming ``name``."""
    try:
        modes = tuple(modes)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of positive ints, got {modes!r}") from None
    if len(modes) == 0 or not all(_is_int(m) and m >= 1 for m in modes):
        raise ValueError(f"{name}: expected a non-empty sequence of positive ints, got {modes!r}")
    modes = tuple(int(m) for m in modes)
    if size is not None and math.prod(modes) != size:
        raise ValueError(f"{name}: the modes {modes} multiply to {math.prod(modes)}, but {what} "
                         f"is {size}")
    return modes


def check_rank(rank) -> int:
    """``rank`` as a positive int (``TypeError``/``ValueError`` naming ``rank`` otherwise).
    Ranks above what a weight can hold are clamped per bond, never an error (the reference
    code's rule, ``docs/sttp.md``)."""
    if not _is_int(rank):
        raise TypeError(f"rank: expected a positive int, got {rank!r}")
    if rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank}")
    return int(rank)


class Tensorization:
    """The tensorization of a ``d_out x d_in`` matrix.

    Args:
        out_modes: row digits of ``W``, slowest first (``prod == d_out``).
        in_modes: column digits, slowest first (``prod == d_in``; for a convolution the
            column index is ``(c_in, k_1, .., k_N)`` row-major, as torch flattens it).
        order: ``"natural"`` (train modes ``out_modes + in_modes``) or ``"reversed"``
            (``out_modes + in_modes[::-1]``).

    Attributes: ``out_modes``, ``in_modes``, ``order``, ``d_out``, ``d_in``,
    ``tensor_shape`` (the train's modes), ``center`` (``len(out_modes)``, the spectral bond).
    """

    __slots__ = ("out_modes", "in_modes", "order")

    def __init__(self, out_modes: Sequence[int], in_modes: Sequence[int], order: str = "natural"):
        if order not in ORDERS:
            raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
        self.out_modes = check_modes(out_modes, None, "out_modes", "d_out")
        self.in_modes = check_modes(in_modes, None, "in_modes", "d_in")
        self.order = order

    @classmethod
    def default(cls, d_out: int, in_channels: int, kernel_size: Sequence[int] = (),
                scheme: str = "reference", out_modes=None, in_modes=None,
                order: Optional[str] = None) -> "Tensorization":
        """The default tensorization of a layer (``d_in = in_channels * prod(kernel_size)``).

        ``scheme="reference"``: out modes ``factorize(d_out)``, in modes
        ``factorize(in_channels)`` then ``prod(kernel_size)`` as one mode, natural order.
        ``scheme="section8"``: in modes ``factorize(in_channels)`` then the factors of each
        kernel size, reversed order. Size-1 factors are dropped (they add no parameter)
        unless a side would be empty. Explicit ``out_modes``/``in_modes`` replace the
        defaults; ``order`` defaults to the scheme's, except that explicit ``in_modes``
        keep their documented reversed meaning unless ``order`` is given. Cost O(sqrt(n)).
        """
        if scheme not in SCHEMES:
            raise ValueError(f"tensorization: expected one of {SCHEMES}, got {scheme!r}")
        d_in = in_channels * math.prod(kernel_size)
        kern: Tuple[int, ...]
        if scheme == "reference":
            kern = (math.prod(kernel_size),) if kernel_size else ()
        else:
            kern = tuple(f for k in kernel_size for f in factorize(k))
        if order is None:
            order = "reversed" if (scheme == "section8" or in_modes is not None) else "natural"
        if out_modes is None:
            out_modes = factorize(d_out)
        else:
            out_modes = check_modes(out_modes, d_out, "out_modes", "d_out (out_features/"
                                    "out_channels/num_embeddings)")
        if in_modes is None:
            in_modes = tuple(f for f in factorize(in_channels) + kern if f > 1) or (1,)
        else:
            in_modes = check_modes(in_modes, d_in, "in_modes", "d_in (in_features, or "
                                   "in_channels*prod(kernel_size) for a convolution)")
        return cls(out_modes, in_modes, order)

    # -- derived ---------------------------------------------------------------------------
    @property
    def d_out(self) -> int:
        return math.prod(self.out_modes)

    @property
    def d_in(self) -> int:
        return math.prod(self.in_modes)

    @property
    def in_tensor_modes(self) -> Tuple[int, ...]:
        """The input modes in train order."""
        return self.in_modes if self.order == "natural" else self.in_modes[::-1]

    @property
    def tensor_shape(self) -> Tuple[int, ...]:
        return self.out_modes + self.in_tensor_modes

    @property
    def center(self) -> int:
        return len(self.out_modes)

    def __eq__(self, other) -> bool:
        return (isinstance(other, Tensorization) and self.out_modes == other.out_modes
                and self.in_modes == other.in_modes and self.order == other.order)

    def __hash__(self) -> int:
        return hash((self.out_modes, self.in_modes, self.order))

    def __repr__(self) -> str:
        return (f"Tensorization(out_modes={self.out_modes}, in_modes={self.in_modes}, "
                f"order={self.order!r})")

    def _in_perm(self) -> Tuple[int, ...]:
        D, E = len(self.out_modes), len(self.in_modes)
        if self.order == "natural":
            return tuple(range(D + E))
        return tuple(range(D)) + tuple(range(D + E - 1, D - 1, -1))

    def matrix_to_tensor(self, W: Tensor) -> Tensor:
        """``(..., d_out, d_in)`` -> ``(..., *tensor_shape)`` (a view for natural order, a
        permuted copy for reversed). Cost O(numel) at most."""
        lead = tuple(W.shape[:-2])
        T = W.reshape(lead + self.out_modes + self.in_modes)
        if self.order == "natural":
            return T
        nb = len(lead)
        perm = tuple(range(nb)) + tuple(nb + p for p in self._in_perm())
        return T.permute(perm).contiguous()

    def tensor_to_matrix(self, T: Tensor) -> Tensor:
        """Inverse of :meth:`matrix_to_tensor`: ``(..., *tensor_shape)`` -> ``(..., d_out,
        d_in)``."""
        nb = T.dim() - len(self.tensor_shape)
        lead = tuple(T.shape[:nb])
        if self.order == "reversed":
            perm = tuple(range(nb)) + tuple(nb + p for p in self._in_perm())
            T = T.permute(perm)  # the reversal is its own inverse
        return T.reshape(lead + (self.d_out, self.d_in))


def sttp_ranks(out_modes: Sequence[int], in_modes: Sequence[int], rank: int,
               order: str = "reversed") -> Tuple[int, ...]:
    """The TT-ranks ``R_k = min(rank, R_k^max)`` of a tensorized weight (``d + 1`` values,
    ``R_0 = R_d = 1``; ``R_k^max`` from :func:`ttmanifold.feasible_ranks`).

    ``rank`` may exceed ``min(d_out, d_in)``: the spectral bond is then ``min(d_out, d_in)``
    and inner bonds may be larger than it (the reference code's rule). ``order`` as in
    :class:`Tensorization` (default ``"reversed"``, this function's historical meaning).
    Cost O(d).
    """
    t = Tensorization(out_modes, in_modes, order)
    rank = check_rank(rank)
    shape = t.tensor_shape
    return tuple(min(rank, f) if 0 < k < len(shape) else 1
                 for k, f in enumerate(feasible_ranks(shape)))


def sttp_dof(out_modes: Sequence[int], in_modes: Sequence[int], rank: int,
             order: str = "reversed", spectrum: str = "learned") -> int:
    """Degrees of freedom of an STTP weight: ``sum_k R_{k-1} n_k R_k - sum_{0<k<d} R_k^2``
    (= the dimension of the fixed-TT-rank manifold and the length of ``theta``), minus
    ``R_c (R_c + 1) / 2`` for ``spectrum="identity"``. Ranks from :func:`sttp_ranks`.
    ``sttp_dof((2,2,2,2), (2,2,2,3,3), 4) == 128`` (the paper's example). Cost O(d)."""
    t = Tensorization(out_modes, in_modes, order)
    ranks = sttp_ranks(out_modes, in_modes, rank, order)
    shape = t.tensor_shape
    dof = (sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape))
           - sum(r * r for r in ranks[1:-1]))
    if spectrum == "identity":
        rc = ranks[t.center]
        dof -= rc * (rc + 1) // 2
    return dof


def svdp_rank(d_out: int, d_in: int, rank: int) -> int:
    """``min(rank, d_out, d_in)``, the rank an SVDP weight actually has."""
    return min(check_rank(rank), int(d_out), int(d_in))


def svdp_dof(d_out: int, d_in: int, rank: int, spectrum: str = "learned") -> int:
    """Degrees of freedom of ``U diag(s) V^T`` at rank ``r = min(rank, d_out, d_in)``:
    ``r (d_out + d_in - r)`` for a learned spectrum (full frames ``d r - r(r+1)/2`` each plus
    ``r`` values); ``spectrum="identity"`` drops the ``r`` values and reduces ``U``
    (``r (d_out - r)``), ``r (d_out + d_in) - r^2 - r (r + 1) / 2`` in all.
    ``svdp_dof(16, 72, 4) == 336``. Cost O(1)."""
    for v, nm in ((d_out, "d_out"), (d_in, "d_in")):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{nm}: expected a positive int, got {v!r}")
    r = svdp_rank(d_out, d_in, rank)
    if spectrum == "identity":
        return r * (int(d_out) - r) + r * int(d_in) - r * (r + 1) // 2
    return r * (int(d_out) + int(d_in) - r)
