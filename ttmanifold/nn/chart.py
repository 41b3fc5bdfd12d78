"""STTP: the Spectral Tensor Train Parameterization (Obukhov et al., AISTATS 2021).

:class:`STTPChart` is a non-redundant, differentiable chart ``theta -> X`` of the manifold
of tensors of fixed TT-rank: with a spectral bond ``c``, ``X = U_0..U_{c-1} diag(s)
V_c..V_{d-1}`` with reduced Householder frames outside, full ones next to the spectrum and
``s`` learned, normalized (``"lipschitz"``) or fixed to 1 (``"identity"``). ``theta``
blocks, spectra, output convention, inverse and chart domain: ``docs/sttp.md``, section 2.

Devices and dtypes: float32/float64, every tensor on the input's device (``meta``
included; value checks needing a host synchronisation are skipped there). Costs: forward
and inverse ``O(d n r^3)`` with ``n = max n_k``, ``r = max r_k``.
"""
from __future__ import annotations

import itertools
import math
import numbers
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._checks import assert_finite_async, check_float_dtype
from ..householder import (
    frame_from_full,
    frame_from_reduced,
    full_dim,
    full_from_frame,
    full_from_frame_unsigned,
    reduced_dim,
    reduced_from_frame,
    reduced_in_full,
)
from ..manifold import FixedTTRank
from ..tt import TT, orthogonalize

__all__ = [
    "STTPChart",
    "d_optimal_penalty",
    "lipschitz_normalize",
    "Block",
    "covering_frame",
]

SPECTRA = ("learned", "identity", "lipschitz")
_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------
# spectral helpers
# ---------------------------------------------------------------------------------------

#: Floor of ``max|s|`` in :func:`lipschitz_normalize` (the reference code's value).
LIPSCHITZ_EPS = 1e-8


def lipschitz_normalize(s: Tensor, eps: float = LIPSCHITZ_EPS) -> Tensor:
    """``s / max(||s||_inf, eps)`` over the last dimension (shape preserved,
    differentiable).

    ``s``: ``(..., r)`` float tensor. The spectral norm of the resulting diagonal is
    exactly 1 when ``||s||_inf >= eps``; the floor keeps an all-zero ``s`` finite (zero).
    An empty last dimension is returned unchanged. Cost O(numel).
    """
    _check_spectrum(s)
    if s.shape[-1] == 0:
        return s
    return s / s.abs().amax(dim=-1, keepdim=True).clamp_min(eps)


def d_optimal_penalty(s: Tensor) -> Tensor:
    """The D-optimal regularizer ``-sum_i log|s_i|`` over the last dimension.

    ``s``: ``(..., r)``; returns ``(...)`` (a 0-d tensor for 1-D ``s``). Minimizing it pushes
    the spectrum away from zero (maximizes ``log |det diag(s)|``). ``+inf`` if some
    ``s_i = 0``. Differentiable.
    """
    _check_spectrum(s)
    return -torch.log(s.abs()).sum(dim=-1)


def _check_spectrum(s) -> None:
    """A real floating tensor of at least one dimension (an integer spectrum was cast to
    the default dtype, a complex one gave complex values, a bool one failed in torch)."""
    if not isinstance(s, Tensor):
        raise TypeError(f"s: expected a torch.Tensor, got {type(s).__name__}")
    if not s.is_floating_point():
        raise TypeError(f"s: expected a real floating tensor, got dtype {s.dtype}")
    if s.dim() == 0:
        raise ValueError("s: expected a tensor with at least one dimension")


def _check_dtype(dtype):
    dtype = dtype or torch.get_default_dtype()
    check_float_dtype(dtype, "dtype")
    return dtype


def covering_frame(p: int, n: int, r: int, *, outer_slow: bool, dtype=None,
                   device=None) -> Tensor:
    """An exactly orthonormal ``(p n) x r`` frame whose rows, grouped by an index ``a`` of
    size ``p`` (the core's outer bond, away from the spectrum), all take part: the
    ``p x (n r)`` matrix ``G[a, (i, j)] = Q[row(a, i), j]`` has full row rank ``p``.

    Construction (``docs/sttp.md``, section 7): ``I_{(p n) x r}``; every index ``a``
    without a row among the first ``r`` gets one entry 1 at a row ``row(a, i)`` and a
    column ``j``, the pairs ``(i, j)`` distinct and outside the positions of ``G`` the
    identity occupies (while there are such positions; then outside each covered index's
    first position), columns cycling fastest; finally every column is normalized. The
    columns have disjoint supports, so ``Q^T Q = I`` (up to the rounding of
    ``1/sqrt(k)``); the leading ``r x r`` block is a positive diagonal (inside the reduced
    Householder chart); ``G`` is block triangular with nonzero pivots. Where the identity
    covers every ``a`` the result is ``I_{(p n) x r}``. Deterministic.

    Args:
        p, n, r: outer bond size, mode size, number of columns (the inner bond); positive
            ints with ``r <= p n`` and ``p <= n r`` (attainable ranks), else ``ValueError``.
        outer_slow: ``True``: ``row(a, i) = a n + i`` (a left-orthogonal core's left
            unfolding, ``a`` its left bond); ``False``: ``row(a, i) = i p + a`` (a
            right-orthogonal core's transposed right unfolding, ``a`` its right bond).
        dtype, device: of the result (``dtype`` float32/float64, default torch's).

    Returns:
        ``Q`` of shape ``(p n, r)``.

    Cost: ``O(p n r)`` memory and time (Python work ``O(r + p)``).
    """
    for name, v in (("p", p), ("n", n), ("r", r)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if r > p * n or p > n * r:
        raise ValueError(f"r: a ({p} x {n}) x {r} frame cannot use every outer index "
                         f"(needs r <= p n and p <= n r)")
    dtype = _check_dtype(dtype)

    def split(row):  # row -> (a, i)
        return divmod(row, n) if outer_slow else (row % p, row // p)

    first, used = {}, set()
    for j in range(r):  # the identity's entry of column j is row j
        a, i = split(j)
        used.add((i, j))
        first.setdefault(a, (i, j))
    todo = [a for a in range(p) if a not in first]
    pivots = set(first.values())
    # lazily: only len(todo) <= p positions are taken
    free = itertools.chain(
        ((i, j) for i in range(n) for j in range(r) if (i, j) not in used),
        (pos for pos in sorted(used) if pos not in pivots))
    rows = list(range(r))
    cols = list(range(r))
    for a, (i, j) in zip(todo, free):
        rows.append(a * n + i if outer_slow else i * p + a)
        cols.append(j)
    Q = torch.zeros(p * n, r, dtype=dtype, device=device)
    ri = torch.tensor(rows, dtype=torch.long, device=device)
    ci = torch.tensor(cols, dtype=torch.long, device=device)
    Q[ri, ci] = 1.0
    # disjoint column supports: normalizing the columns makes the frame orthonormal
    count = [0] * r
    for j in cols:
        count[j] += 1
    return Q / torch.tensor(count, dtype=dtype, device=device).sqrt()


# ---------------------------------------------------------------------------------------
# the chart
# ---------------------------------------------------------------------------------------

class Block(NamedTuple):
    """One block of ``theta``: ``theta[start:start + size]``.

    ``kind`` is ``"reduced"`` / ``"full"`` (Householder parameters of an ``m x r`` frame),
    ``"spectrum"`` (``m = r = r_c``) or ``"dense"`` (d == 1). ``core`` is the core index.
    """

    name: str
    kind: str
    core: int
    m: int
    r: int
    start: int
    size: int


def _default_center(ranks: Sequence[int]) -> int:
    d = len(ranks) - 1
    best = max(ranks[1:d])
    cands = [c for c in range(1, d) if ranks[c] == best]
    return min(cands, key=lambda c: (abs(2 * c - d), c))


class STTPChart(torch.nn.Module):
    """The STTP chart ``theta -> X`` of a :class:`~ttmanifold.FixedTTRank` manifold.

    Parameters
    ----------
    manifold : FixedTTRank
        Gives ``shape``, ``ranks`` (must be attainable: ``r_{k+1} <= r_k n_k`` and
        ``r_k <= n_k r_{k+1}``; otherwise no TT has these ranks and ``ValueError`` is raised).
    center : int or None
        ``c``, the number of cores left of the spectrum, ``1 <= c <= d-1``. Default: the bond
        with the largest rank, ties broken towards the middle (``|2c - d|`` smallest, then
        the smaller ``c``). For ``d == 1`` it must be ``None`` (or 0) and is stored as 0.
    spectrum : {"learned", "identity", "lipschitz"}
        See ``docs/sttp.md``, section 2.

    Attributes
    ----------
    manifold, center, spectrum, dim (length of theta), layout (list of :class:`Block`),
    shape, ranks, d.

    The module holds no parameters or buffers; ``theta`` is owned by the caller.
    """

    def __init__(self, manifold: FixedTTRank, center: Optional[int] = None,
                 spectrum: str = "learned"):
        super().__init__()
        if not isinstance(manifold, FixedTTRank):
            raise TypeError(f"manifold: expected a FixedTTRank, got {type(manifold).__name__}")
        if spectrum not in SPECTRA:
            raise ValueError(f"spectrum: expected one of {SPECTRA}, got {spectrum!r}")
        shape, ranks, d = tuple(manifold.shape), tuple(manifold.ranks), manifold.d
        for k in range(d):
            if ranks[k + 1] > ranks[k] * shape[k] or ranks[k] > shape[k] * ranks[k + 1]:
                raise ValueError(
                    f"manifold: ranks {ranks} cannot be attained with shape {shape} (core {k} "
                    f"needs r_{k + 1} <= r_{k} n_{k} and r_{k} <= n_{k} r_{k + 1}); the manifold "
                    f"is empty"
                )
        if d == 1:
            if center not in (None, 0) or isinstance(center, bool):
                raise ValueError(f"center: a tensor of order d = 1 has no bond; pass center=None, "
                                 f"got {center!r}")
            center = 0
        elif center is None:
            center = _default_center(ranks)
        else:
            if not isinstance(center, numbers.Integral) or isinstance(center, bool) \
                    or not 1 <= center <= d - 1:
                raise ValueError(f"center: expected an int in [1, {d - 1}] (the number of cores "
                                 f"left of the spectrum), got {center!r}")
            center = int(center)
        self.manifold = manifold
        self.center = center
        self.spectrum = spectrum
        self.shape, self.ranks, self.d = shape, ranks, d
        self.layout = self._build_layout()
        self.dim = sum(b.size for b in self.layout)
        self._by_name = {b.name: b for b in self.layout}

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, ranks={self.ranks}, center={self.center}, "
                f"spectrum={self.spectrum!r}, dim={self.dim}")

    # -- structure ------------------------------------------------------------------------
    def _build_layout(self) -> List[Block]:
        n, r, d, c = self.shape, self.ranks, self.d, self.center
        blocks: List[Block] = []
        start = 0

        def add(name, kind, core, m, rr, size):
            nonlocal start
            blocks.append(Block(name, kind, core, m, rr, start, size))
            start += size

        if d == 1:
            add("core0", "dense", 0, n[0], 1, n[0])
            return blocks
        for k in range(c):
            m, rr = r[k] * n[k], r[k + 1]
            full = k == c - 1 and self.spectrum != "identity"
            add(f"U{k}", "full" if full else "reduced", k, m, rr,
                full_dim(m, rr) if full else reduced_dim(m, rr))
        if self.spectrum != "identity":
            add("s", "spectrum", c, r[c], r[c], r[c])
        for k in range(c, d):
            m, rr = n[k] * r[k + 1], r[k]
            full = k == c
            add(f"V{k}", "full" if full else "reduced", k, m, rr,
                full_dim(m, rr) if full else reduced_dim(m, rr))
        return blocks

    # -- validation -----------------------------------------------------------------------
    def _check_theta(self, theta, *, batched: bool) -> Tensor:
        if not isinstance(theta, Tensor):
            raise TypeError(f"theta: expected a torch.Tensor, got {type(theta).__name__}")
        if theta.dtype not in _DTYPES:
            raise TypeError(f"theta: expected dtype float32 or float64, got {theta.dtype}")
        ok = theta.dim() >= 1 if batched else theta.dim() == 1
        if not ok or theta.shape[-1] != self.dim:
            want = f"(..., {self.dim})" if batched else f"({self.dim},)"
            hint = "" if batched else " (use forward_cores for batches)"
            raise ValueError(f"theta: expected shape {want} for this chart (shape={self.shape}, "
                             f"ranks={self.ranks}, center={self.center}, spectrum="
                             f"{self.spectrum!r}){hint}, got {tuple(theta.shape)}")
        return theta

    # -- forward --------------------------------------------------------------------------
    def split(self, theta: Tensor) -> Dict[str, Tensor]:
        """Named views of ``theta`` (``(..., dim)``): ``"U0"``.. ``"U{c-1}"``, ``"s"`` (unless
        ``spectrum == "identity"``), ``"V{c}"``.. ``"V{d-1}"`` (``"core0"`` for d == 1), each
        ``(..., size)`` in the order of :attr:`layout`. No copy."""
        theta = self._check_theta(theta, batched=True)
        return {b.name: theta[..., b.start:b.start + b.size] for b in self.layout}

    def _spectrum_of(self, parts: Dict[str, Tensor], like: Tensor) -> Tensor:
        if self.d == 1:
            return like.new_zeros(like.shape[:-1] + (0,))
        if self.spectrum == "identity":
            return like.new_ones(like.shape[:-1] + (self.ranks[self.center],))
        s = parts["s"]
        return lipschitz_normalize(s) if self.spectrum == "lipschitz" else s

    def singular_values(self, theta: Tensor) -> Tensor:
        """The effective spectrum ``(..., r_c)``: signed ``s`` ("learned"),
        ``s / ||s||_inf`` ("lipschitz"), ones ("identity"); empty for d == 1. Up to signs and
        order these are the singular values of the c-th unfolding of ``forward(theta)``."""
        parts = self.split(theta)
        return self._spectrum_of(parts, theta)

    def forward_cores(self, theta: Tensor) -> Tuple[List[Tensor], Tensor, List[Tensor]]:
        """``(U_list, s, V_list)`` for ``theta`` of shape ``(..., dim)`` (batched).

        ``U_list[k]``: ``(..., r_k, n_k, r_{k+1})`` left-orthogonal, ``k = 0..c-1`` (without
        ``s``); ``s``: ``(..., r_c)`` the effective spectrum (:meth:`singular_values`);
        ``V_list[k - c]``: ``(..., r_k, n_k, r_{k+1})`` right-orthogonal, ``k = c..d-1``.
        For d == 1: ``([theta reshaped to (..., 1, n_0, 1)], empty, [])``.
        Cost ``O(d n r^3)``; differentiable.
        """
        parts = self.split(theta)
        batch = tuple(theta.shape[:-1])
        n, r = self.shape, self.ranks
        if self.d == 1:
            return [parts["core0"].reshape(batch + (1, n[0], 1))], \
                self._spectrum_of(parts, theta), []
        U, V = [], []
        for b in self.layout:
            if b.kind == "spectrum":
                continue
            make = frame_from_full if b.kind == "full" else frame_from_reduced
            F = make(parts[b.name], b.m, b.r)  # (..., m, r)
            k = b.core
            core_shape = batch + (r[k], n[k], r[k + 1])
            if b.name[0] == "U":
                U.append(F.reshape(core_shape))
            else:
                V.append(F.transpose(-2, -1).reshape(core_shape))
        return U, self._spectrum_of(parts, theta), V

    def forward(self, theta: Tensor) -> TT:
        """The TT ``[U_0, .., U_{c-1} diag(s), V_c, .., V_{d-1}]`` of ``theta`` (shape
        ``(dim,)``); mixed canonical with center core ``c-1``. A non-finite ``theta``
        raises ``RuntimeError`` (an on-device assert, no host sync) instead of giving a TT
        of NaNs. Cost ``O(d n r^3)``."""
        self._check_theta(theta, batched=False)
        assert_finite_async(theta, "theta")
        U, s, V = self.forward_cores(theta)
        if self.d > 1:
            U[-1] = U[-1] * s
        return TT(U + V, check=False)

    def point(self, theta: Tensor, *, check_rank: bool = True) -> Tensor:
        """``manifold.pack_point(self(theta), check_rank=check_rank)``: the packed
        (left-orthogonal) point of the manifold. ``ValueError`` when the TT of ``theta`` has
        a lower TT-rank than the chart's ranks (a zero entry of the spectrum; the
        :meth:`identity_init` of most layouts, whose identity frames meet in a smaller
        rank), unless ``check_rank=False``. Differentiable. Cost ``O(d n r^3)``."""
        return self.manifold.pack_point(self(theta), check_rank=check_rank)

    # -- initializations ------------------------------------------------------------------
    def random_theta(self, *, dtype=None, device=None,
                     generator: Optional[torch.Generator] = None) -> Tensor:
        """A random ``theta`` (shape ``(dim,)``): Householder parameters iid ``N(0, 1)``,
        ``s`` iid uniform in ``[0.5, 1.5)`` (well away from 0). ``dtype`` defaults to
        ``torch.get_default_dtype()``; ``generator`` must live on ``device``."""
        dtype = _check_dtype(dtype)
        theta = torch.randn(self.dim, dtype=dtype, device=device, generator=generator)
        if "s" in self._by_name:
            b = self._by_name["s"]
            u = torch.rand(b.size, dtype=dtype, device=device, generator=generator)
            theta = torch.cat([theta[:b.start], u + 0.5, theta[b.start + b.size:]])
        return theta

    def orthogonal_frames(self, *, dtype=None, device=None) -> Dict[str, Tensor]:
        """The frames of :meth:`orthogonal_init`: ``{block name: (m, r) frame}`` for every
        ``"reduced"``/``"full"`` block of :attr:`layout` (empty for d == 1).

        Each frame is ``I_{m x r}`` plus one entry in a row of every index of the core's
        outer bond (towards the train's end) that the identity leaves unused, columns
        normalized: its columns have disjoint supports, so it is exactly orthonormal, its
        leading ``r x r`` block is a positive diagonal (the reduced chart's domain), and
        the core's unfolding on the outer bond has full rank, so the frames together give
        a TT of exactly the chart's ranks (``docs/sttp.md``, section 7). Where the
        identity already uses every outer index the frame is ``I_{m x r}``. Deterministic.
        Cost ``O(d n r^2)``.
        """
        dtype = _check_dtype(dtype)
        n, r = self.shape, self.ranks
        frames = {}
        for b in self.layout:
            if b.kind not in ("reduced", "full"):
                continue
            k = b.core
            if b.name[0] == "U":  # rows (a, i) of the left unfolding: outer bond r_k slow
                frames[b.name] = covering_frame(r[k], n[k], b.r, outer_slow=True,
                                                dtype=dtype, device=device)
            else:  # rows (i, a) of the transposed right unfolding: outer bond r_{k+1} fast
                frames[b.name] = covering_frame(r[k + 1], n[k], b.r, outer_slow=False,
                                                dtype=dtype, device=device)
        return frames

    def orthogonal_init(self, *, dtype=None, device=None) -> Tensor:
        """``theta`` of a point of the manifold built from orthonormal frames, ``s = 1``.

        The frames are :meth:`orthogonal_frames` (up to the rotations and column signs of
        :func:`~ttmanifold.householder.reduced_from_frame` /
        :func:`~ttmanifold.householder.full_from_frame`, which change neither their span
        nor the ranks), so ``forward(theta)`` has exactly the chart's TT-ranks and its
        ``c``-th unfolding has all singular values 1 (a partial isometry). For d == 1 the
        vector ``e_0``. The paper's all-zero parameters are :meth:`identity_init`.
        Cost ``O(d n r^3)``.
        """
        dtype = _check_dtype(dtype)
        if self.d == 1:
            return self.identity_init(dtype=dtype, device=device)
        frames = self.orthogonal_frames(dtype=dtype, device=device)
        parts = []
        for b in self.layout:
            if b.kind == "spectrum":
                parts.append(torch.ones(b.size, dtype=dtype, device=device))
            elif b.kind == "full":
                parts.append(full_from_frame(frames[b.name])[0])
            else:  # exactly positive-diagonal leading block: no singularity check needed
                parts.append(reduced_from_frame(frames[b.name], tol=0)[0])
        return torch.cat(parts)

    def identity_init(self, *, dtype=None, device=None) -> Tensor:
        """``theta`` with all Householder parameters 0 (every frame is ``-I_{m x r}``, the
        leading identity frame up to sign) and ``s = 1`` (the paper-literal frames). For
        d == 1 the vector ``e_0``.

        Rank-deficient for most layouts: neighbouring identity frames meet only in the
        first indices of their bond, so the TT's true ranks are often below the chart's
        (e.g. ``(1, 1, 2, 4, ..)`` for declared ``(1, 2, 4, 4, ..)``), a point outside the
        manifold that :meth:`point` rejects; :meth:`orthogonal_init` is the full-rank
        counterpart. Cost ``O(dim)``.
        """
        dtype = _check_dtype(dtype)
        theta = torch.zeros(self.dim, dtype=dtype, device=device)
        if self.d == 1:
            theta[0] = 1.0
        elif "s" in self._by_name:
            b = self._by_name["s"]
            theta[b.start:b.start + b.size] = 1.0
        return theta

    # -- inverse --------------------------------------------------------------------------
    def _as_tt(self, x) -> TT:
        M = self.manifold
        if isinstance(x, TT):
            if x.shape != self.shape:
                raise ValueError(f"x: TT shape {x.shape} differs from the chart's {self.shape}")
            if x.ranks != self.ranks:
                raise ValueError(f"x: TT ranks {x.ranks} differ from the chart's {self.ranks} "
                                 f"(round it first, e.g. ttmanifold.round(x, ranks=...))")
        elif isinstance(x, Tensor):
            if x.dim() != 1 or x.shape[0] != M.size:
                raise ValueError(f"x: expected a TT or a packed point of size {M.size} "
                                 f"(cores {M.core_shapes}), got a tensor of shape "
                                 f"{tuple(x.shape)}")
            x = M.to_tt(x)
        else:
            raise TypeError(f"x: expected a TT or a packed point tensor, got {type(x).__name__}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"x: expected dtype float32 or float64, got {x.dtype}")
        if x.device.type != "meta":
            for k, g in enumerate(x.cores):
                if not bool(torch.isfinite(g).all()):
                    raise ValueError(f"x: core {k} contains NaN or Inf values")
        return x

    def _reduced(self, Q: Tensor, k: int, side: str):
        try:
            return reduced_from_frame(Q)
        except ValueError as e:
            if side == "left":
                # the identity spectrum has no full U frame: only V_k (center=k) is full
                kc = k + 1 if self.spectrum != "identity" else k
                hint = f"e.g. center={kc} (core {k} full)" if 1 <= kc <= self.d - 1 else \
                    f"or spectrum='learned': no center makes core {k} full"
                where = f"left-orthogonal core U_{k} (left unfolding)"
            else:
                hint = f"e.g. center={k} (core {k} full)"
                where = f"right-orthogonal core V_{k} (transposed right unfolding)"
            raise ValueError(
                f"x: outside the domain of the STTP chart with center={self.center}: the "
                f"leading {Q.shape[-1]}x{Q.shape[-1]} block of the {where} is singular, so its "
                f"reduced Householder parameters do not exist. Re-center: build the chart "
                f"with another center ({hint}), which changes the reduced cores, or "
                f"perturb x slightly. ({e})"
            ) from None

    def _flip_candidates(self) -> List[str]:
        """Non-square reduced frames whose column sign may be chosen (identity spectrum),
        nearest to the center first."""
        c, d = self.center, self.d
        names = [f"U{k}" for k in range(c - 1, -1, -1)] + [f"V{k}" for k in range(c + 1, d)]
        return [nm for nm in names if self._by_name[nm].m > self._by_name[nm].r]

    def _reduced_signed(self, Q: Tensor, k: int, side: str, flip: bool):
        """``(params, sg, O, ok)`` with ``frame_from_reduced(params) == Q @ O @ diag(sg)``.

        Canonical (``reduced_from_frame``, ``ok = None``) unless ``flip``: then column 0 of
        the frame gets the opposite sign (``sg[0]`` negated), the parameters come from a
        sign-free QR and ``ok`` tells whether they exist (finite).
        """
        p, sg, O = self._reduced(Q, k, side)
        if not flip:
            return p, sg, O, None
        one = torch.ones_like(sg)
        sg = sg * torch.cat([-one[:1], one[1:]])
        F = (Q @ O) * sg.unsqueeze(-2)
        m, rr = F.shape[-2], F.shape[-1]
        pfull, ok = full_from_frame_unsigned(F)
        return pfull.index_select(-1, reduced_in_full(m, rr, F.device)), sg, O, ok

    def _outer_sweeps(self, cores: List[Tensor], flip: Optional[str]):
        """Reduced inversions of the outer cores (left ``0..c-2``, right ``d-1..c+1``) with
        rotations/signs absorbed towards the center. Returns ``(params, cores, ok)``."""
        n, r, d, c = self.shape, self.ranks, self.d, self.center
        cores = list(cores)
        params: Dict[str, Tensor] = {}
        ok = None
        for k in range(c - 1):
            Q = cores[k].reshape(r[k] * n[k], r[k + 1])
            p, sg, O, ok_k = self._reduced_signed(Q, k, "left", flip == f"U{k}")
            ok = ok_k if ok_k is not None else ok
            params[f"U{k}"] = p
            M = sg.unsqueeze(-1) * O.transpose(-2, -1)  # Q = F diag(sg) O^T
            nxt = cores[k + 1]
            cores[k + 1] = (M @ nxt.reshape(r[k + 1], -1)).reshape(nxt.shape)
        for k in range(d - 1, c, -1):
            T = cores[k].reshape(r[k], n[k] * r[k + 1]).transpose(0, 1)
            p, sg, O, ok_k = self._reduced_signed(T, k, "right", flip == f"V{k}")
            ok = ok_k if ok_k is not None else ok
            params[f"V{k}"] = p
            N = O * sg.unsqueeze(-2)  # right unfolding = O diag(sg) F^T
            prv = cores[k - 1]
            cores[k - 1] = (prv.reshape(-1, r[k]) @ N).reshape(prv.shape)
        return params, cores, ok

    def inverse(self, x: Union[TT, Tensor], *, project: bool = False,
                tol: Optional[float] = None) -> Tensor:
        """A ``theta`` (shape ``(dim,)``, dtype/device of ``x``) with ``forward(theta) == x``.

        ``x``: a :class:`TT` with the manifold's shape and ranks (any gauge) or a packed
        point (``manifold.pack_point`` layout). Returns the canonical representative
        described in ``docs/sttp.md``, section 2.

        Spectrum constraints (checked on the singular values ``S`` of the c-th unfolding,
        skipped on ``meta``):

        - ``"lipschitz"``: requires ``|max S - 1| <= tol``, else ``ValueError``; with
          ``project=True`` x is rescaled to ``x / max S`` instead (its spectral projection).
        - ``"identity"``: requires ``|S_i - 1| <= tol`` for all i, else ``ValueError``; with
          ``project=True`` ``S`` is replaced by ones (the polar factor of the c-th unfolding).

        ``tol`` defaults to ``sqrt(eps(dtype))``. ``ValueError`` also for points outside the
        chart domain (singular leading block of a reduced frame; for ``"identity"`` also a
        ``V_c`` frame not reachable without signs, see ``docs/sttp.md``, section 2).

        Cost ``O(d n r^3)`` (for ``"identity"`` with a square ``V_c`` frame up to ``d`` times
        that, while searching for a reachable sign choice). Differentiable where the
        underlying inverses are (not needed for typical use; run it under
        ``torch.no_grad()``).
        """
        x = self._as_tt(x)
        dtype, device = x.dtype, x.device
        check = device.type != "meta"
        if tol is None:
            tol = math.sqrt(torch.finfo(dtype).eps)
        n, r, d, c = self.shape, self.ranks, self.d, self.center
        if d == 1:
            return x.cores[0].reshape(-1).clone()
        base = orthogonalize(x, center=c - 1).cores
        flips: List[Optional[str]] = [None]
        if self.spectrum == "identity":
            flips += self._flip_candidates()
        for attempt, flip in enumerate(flips):
            params, cores, ok = self._outer_sweeps(base, flip)
            # center: SVD of core c-1 (its left unfolding carries the unfolding's spectrum)
            G = cores[c - 1].reshape(r[c - 1] * n[c - 1], r[c])
            P, S, Wh = torch.linalg.svd(G, full_matrices=False)
            Rc = Wh @ cores[c].reshape(r[c], n[c] * r[c + 1])  # still orthonormal rows
            if attempt == 0:
                self._check_spectrum(S, project, tol, check)
            if self.spectrum != "identity":
                if self.spectrum == "lipschitz":
                    S = S / S[0]
                pU, sgU = full_from_frame(P)
                pV, sgV = full_from_frame(Rc.transpose(0, 1))
                params[f"U{c - 1}"] = pU
                params[f"V{c}"] = pV
                params["s"] = sgU * S * sgV
                break
            # identity: X_c = P Rc (S = 1). Rotate P into St_U, move the rotation into V_c
            # and invert V_c without signs (there is no spectrum to absorb them).
            pU, sgU, O, okU = self._reduced_signed(P, c - 1, "left", flip == f"U{c - 1}")
            B = (Rc.transpose(0, 1) @ O) * sgU.unsqueeze(-2)
            pV, okV = full_from_frame_unsigned(B)
            params[f"U{c - 1}"] = pU
            params[f"V{c}"] = pV
            for extra in (ok, okU):
                if extra is not None:
                    okV = okV & extra
            if not check or bool(okV):
                break
        else:
            raise ValueError(
                f"x: outside the domain of the 'identity' STTP chart with center={c}: the "
                f"frame of V_{c} (after moving the other cores' rotations into it) is not a "
                f"product of Householder reflections without column signs (a peeled column "
                f"equals +e_j, or V_{c} is square with a determinant sign that no admissible "
                f"sign choice of a reduced frame fixes); use spectrum='learned' or another "
                f"center")
        theta = torch.cat([params[b.name].reshape(-1) for b in self.layout])
        return theta.to(dtype=dtype, device=device)

    def _check_spectrum(self, S: Tensor, project: bool, tol: float, check: bool) -> None:
        if not check or self.spectrum == "learned":
            return
        c = self.center
        if self.spectrum == "lipschitz":
            sm = float(S[0])
            if sm == 0.0:
                raise ValueError("x: is zero; it has no Lipschitz-normalized spectrum")
            if not project and abs(sm - 1.0) > tol:
                raise ValueError(
                    f"x: the largest singular value of the unfolding at center={c} is "
                    f"{sm:.6g}, but the 'lipschitz' chart only reaches points where it is 1 "
                    f"(|max s - 1| <= tol={tol:.3g}); pass project=True to rescale x, or "
                    f"use spectrum='learned'")
        elif not project:
            dev = float((S - 1.0).abs().max())
            if dev > tol:
                raise ValueError(
                    f"x: the singular values of the unfolding at center={c} deviate from 1 "
                    f"by {dev:.3g} > tol={tol:.3g}; the 'identity' chart only reaches points "
                    f"with all of them equal to 1. Pass project=True (replace them by ones) "
                    f"or use spectrum='learned'")
