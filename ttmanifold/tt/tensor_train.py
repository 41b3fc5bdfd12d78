"""Tensor-train algebra in PyTorch.

A tensor train (TT) of shape ``(n_1, ..., n_d)`` and ranks ``(r_0, ..., r_d)`` with
``r_0 = r_d = 1`` is stored as ``d`` cores ``G_k`` of shape ``(r_{k-1}, n_k, r_k)``:

    X[i_1, ..., i_d] = G_1[:, i_1, :] G_2[:, i_2, :] ... G_d[:, i_d, :].

Every operation here works on the cores only (cost polynomial in d, n, r; see each
docstring) and never forms the ``n^d`` dense tensor unless asked (:meth:`TT.full`,
:meth:`TT.from_dense`). Everything is device- and dtype-agnostic and differentiable with
autograd, except that gradients through :func:`round` and :meth:`TT.from_dense` are those
of the truncated SVDs (defined when the kept singular values are distinct and nonzero;
not guaranteed otherwise).

Conventions (the mathematics: ``docs/tt_algebra.md``):

- QR sweeps fix the sign convention ``diag(R) >= 0``, so orthogonalization is a
  deterministic function of the input cores, and re-orthogonalizing an orthogonal TT
  returns the same cores (to rounding).
- Core indices in the Python API are 0-based: ``center=k`` means cores ``0..k-1`` are
  left-orthogonal and cores ``k+1..d-1`` right-orthogonal.
- Explicitly given cores may carry redundant ranks (sums of TTs do), but they must be
  structurally consistent. Functions that take a rank *request* (:meth:`TT.random`,
  :meth:`TT.zeros`, :meth:`TT.from_dense`, :func:`round`) clip infeasible requests to
  ``min(n_1..n_k, n_{k+1}..n_d)`` with a warning.
"""
from __future__ import annotations

import functools
import math
import numbers
import operator
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from .. import kernels
from ..kernels import dense as compiled_dense
from .index_set import IndexSet
from .._checks import (
    SUPPORTED_DTYPES,
    assert_finite_async,
    check_finite,
    check_float_dtype,
    check_positive_float,
    check_shape,
    feasible_ranks,
    functorch_wrapped,
    normalize_ranks,
)

__all__ = ["TT", "inner", "pairwise_inner", "stack", "orthogonalize", "round", "feasible_ranks",
           "qr_pos", "lq_pos"]


# ---------------------------------------------------------------------------------------
# small dense kernels
# ---------------------------------------------------------------------------------------

_GROUPED_GATHER_MIN = 4096
# default relative accuracy of round/from_dense, in machine epsilons (times sqrt(d-1)):
# each bond discards singular values below ~256 eps ||x||, above the rounding noise of
# QR/SVD sweeps over redundant sums (observed up to ~40 eps ||x||)
_DEFAULT_EPS_FACTOR = 256
_GATHER_CHUNK = 1 << 14


def qr_pos(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR ``a = q r`` with the sign convention ``diag(r) >= 0``.

    ``a`` has shape ``(..., m, n)``; ``q`` is ``(..., m, k)``, ``r`` is ``(..., k, n)``,
    ``k = min(m, n)``. Cost O(m n k). Deterministic: the QR of a matrix with orthonormal
    columns returns that matrix (to rounding).
    """
    q, r = torch.linalg.qr(a, mode="reduced")
    diag = torch.diagonal(r, dim1=-2, dim2=-1)
    # s = +-1 with the sign bit of diag(r) (so +0 -> +1); one fused kernel
    s = torch.ones_like(diag).copysign_(diag)
    return q * s.unsqueeze(-2), r * s.unsqueeze(-1)


def lq_pos(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reduced LQ ``a = l q`` (``q`` with orthonormal rows), ``diag(l) >= 0``.

    Computed as the transpose of :func:`qr_pos` of ``a^T``. ``a``: ``(..., m, n)``,
    ``l``: ``(..., m, k)``, ``q``: ``(..., k, n)``.
    """
    q, r = qr_pos(a.transpose(-2, -1))
    return r.transpose(-2, -1), q.transpose(-2, -1)


def _svd(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``a = u diag(s) vh``. A wide row-major matrix is passed to LAPACK as its
    transpose (a column-major view, no copy): 1.5-2.5x faster on CPU for the
    ``r x (n r)`` unfoldings of rounding."""
    if a.shape[-2] < a.shape[-1]:
        v, s, uh = torch.linalg.svd(a.mT, full_matrices=False)
        return uh.mT, s, v.mT
    return torch.linalg.svd(a, full_matrices=False)


def _choose_rank(s: torch.Tensor, max_rank: Optional[int], delta: Optional[torch.Tensor]) -> int:
    """Smallest rank whose discarded singular values have 2-norm <= delta, capped."""
    k = s.shape[-1]
    if max_rank is not None:
        k = min(k, max_rank)
    if delta is None or s.shape[-1] == 0 or s.device.type == "meta":
        # on the meta device values are unknown: keep the caps (documented)
        return max(k, 1)
    # on the host, where the rank is read anyway (one copy of the singular values): CUDA's
    # cumsum of floats has no deterministic kernel (torch.use_deterministic_algorithms)
    s, delta = s.detach().cpu(), delta.detach().cpu()
    if s.dim() > 1:  # a batch: each point's needed rank, the largest over the batch
        if s.numel() == 0:  # an empty batch: no TT needs any rank (as a zero TT: rank 1)
            return 1
        top = s.amax(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        s, dl = s / top, delta.unsqueeze(-1) / top
        sq = s * s
        tail = torch.flip(torch.cumsum(torch.flip(sq, (-1,)), -1), (-1,))
        needed = int((tail > dl * dl).sum(-1).max())  # host sync: data-dependent rank
        return max(1, min(k, needed))
    # compare relative to the largest singular value, so that squaring neither
    # overflows nor underflows for tensors of norm ~1e+-154 and beyond (float64)
    top = s.max().clamp_min(torch.finfo(s.dtype).tiny)
    s, delta = s / top, delta / top
    sq = s * s
    # tail[j] = sum_{i >= j} s_i^2, j = 0..len-1
    tail = torch.flip(torch.cumsum(torch.flip(sq, (0,)), 0), (0,))
    # number of j with tail[j] > delta^2 is the rank needed (tail is non-increasing)
    needed = int((tail > delta * delta).sum())  # host sync: data-dependent rank
    return max(1, min(k, needed))


def fro_norm(t: torch.Tensor, nb: int = 0) -> torch.Tensor:
    """Frobenius norm of a dense tensor, safe from overflow/underflow of the squares;
    with ``nb`` leading batch dimensions, one norm per point (shape ``t.shape[:nb]``).
    Cost O(numel).

    ``torch.linalg.vector_norm`` squares without scaling (inf above ~1e154, 0 below
    ~1e-154 in float64); scaling by a detached max leaves the value and gradient unchanged.
    """
    if nb:
        dims = tuple(range(nb, t.dim()))
        scale = t.detach().abs().amax(dims, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)
        return torch.linalg.vector_norm(t / scale, dim=dims) * scale.reshape(t.shape[:nb])
    scale = t.detach().abs().amax().clamp_min(torch.finfo(t.dtype).tiny)
    return torch.linalg.vector_norm(t / scale) * scale


# ---------------------------------------------------------------------------------------
# the TT class
# ---------------------------------------------------------------------------------------

def _check_cores(cores, name: str = "cores") -> List[torch.Tensor]:
    if isinstance(cores, torch.Tensor) or not isinstance(cores, (list, tuple)):
        raise TypeError(f"{name}: expected a list of 3-D tensors, got {type(cores).__name__}")
    cores = list(cores)
    if not _single_cores_ok(cores):  # else find the first fault and name it
        _check_structure(cores, name)
    _assert_cores_finite(cores, name)
    return cores


def _single_cores_ok(cores: List[torch.Tensor]) -> bool:
    """Whether ``cores`` are the valid 3-D cores of one TT (dtype, device, boundary and
    matching ranks, positive sizes), finiteness aside: one short pass (about 0.3 us per
    core; every TT built from user cores runs it). False for batches too: the full checks
    then decide."""
    if not cores:
        return False
    c0 = cores[0]
    if not isinstance(c0, torch.Tensor):
        return False
    dt, on_cpu = c0.dtype, c0.is_cpu
    if dt not in SUPPORTED_DTYPES:
        return False
    dev = None if on_cpu else c0.device
    prev = 1
    for c in cores:
        if type(c) is not torch.Tensor and not isinstance(c, torch.Tensor):
            return False
        shp = c.shape
        if (len(shp) != 3 or shp[0] != prev or shp[1] < 1 or c.dtype is not dt
                or (c.is_cpu if on_cpu else c.device == dev) is not True):
            return False
        prev = shp[2]
        if prev < 1:
            return False
    return prev == 1


def _check_structure(cores: List[torch.Tensor], name: str) -> None:
    """The checks of :func:`_check_cores` but finiteness, each fault named (also batches)."""
    if len(cores) == 0:
        raise ValueError(f"{name}: expected at least one core")
    for k, c in enumerate(cores):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"{name}[{k}]: expected a torch.Tensor, got {type(c).__name__}")
        if c.dim() < 3:
            raise ValueError(
                f"{name}[{k}]: expected a 3-D core of shape (r_{k}, n_{k + 1}, r_{k + 1}) (or a "
                f"batch of them, (*batch, r_{k}, n_{k + 1}, r_{k + 1})), got shape {tuple(c.shape)}"
            )
    batch = tuple(cores[0].shape[:-3])
    for k, c in enumerate(cores):
        if tuple(c.shape[:-3]) != batch:
            what = "a 3-D core like" if not batch else f"batch shape {batch} like"
            raise ValueError(
                f"{name}[{k}]: expected {what} {name}[0], got shape {tuple(c.shape)} (all "
                f"cores of a batched TT share the leading batch dimensions)"
            )
    dtype, device = cores[0].dtype, cores[0].device
    if dtype.is_complex:
        raise TypeError(f"{name}: complex dtypes are not supported, got {dtype}")
    check_float_dtype(dtype, f"{name}[0]")
    for k, c in enumerate(cores):
        if c.dtype != dtype:
            raise TypeError(f"{name}[{k}]: dtype {c.dtype} differs from {name}[0]'s {dtype}")
        if c.device != device:
            raise ValueError(f"{name}[{k}]: device {c.device} differs from {name}[0]'s {device}")
    if cores[0].shape[-3] != 1:
        raise ValueError(f"{name}[0]: boundary rank r_0 must be 1, got shape {tuple(cores[0].shape)}")
    if cores[-1].shape[-1] != 1:
        raise ValueError(
            f"{name}[{len(cores) - 1}]: boundary rank r_d must be 1, got shape "
            f"{tuple(cores[-1].shape)}"
        )
    for k in range(len(cores) - 1):
        if cores[k].shape[-1] != cores[k + 1].shape[-3]:
            raise ValueError(
                f"{name}[{k}] and {name}[{k + 1}]: ranks do not match "
                f"({tuple(cores[k].shape)} then {tuple(cores[k + 1].shape)})"
            )
    for k, c in enumerate(cores):
        if c.shape[-2] < 1 or c.shape[-3] < 1 or c.shape[-1] < 1:
            raise ValueError(f"{name}[{k}]: every dimension must be positive, got {tuple(c.shape)}")


def _assert_cores_finite(cores: List[torch.Tensor], name: str) -> None:
    """Raise ``RuntimeError("<name>[k]: contains NaN or Inf")`` for the first non-finite core,
    without a host sync off the CPU. Detached: the check adds no autograd nodes. On the CPU
    one quick test of all cores first (a read there is free); only when it fails does the
    per-core test run to name the core."""
    if (cores[0].is_cpu and len(cores) > 1 and not torch.compiler.is_compiling()
            and not functorch_wrapped(cores) and _cores_finite(cores)):
        return
    for k, c in enumerate(cores):  # asynchronous on a GPU (immediate on the CPU)
        assert_finite_async(c.detach(), f"{name}[{k}]")


@kernels.dispatch("dense", compiled=compiled_dense.all_finite, grad_free=True)
def _cores_finite(cores: List[torch.Tensor]) -> bool:
    """Whether the CPU tensors ``cores`` hold only finite values, possibly False for huge
    finite ones: one sum per core (NaN and Inf propagate; a third of the per-core test's
    operations and memory passes), or the compiled single pass (exact). Reads values only
    (no graph: cores requiring grad need no detached copies)."""
    with torch.no_grad():
        return math.isfinite(float(torch.stack([c.sum() for c in cores]).sum()))


class TT:
    """A tensor in tensor-train format.

    Parameters
    ----------
    cores : list of tensors
        ``d`` cores, the k-th of shape ``(r_{k-1}, n_k, r_k)``, ``r_0 = r_d = 1``, all of
        one real floating dtype and one device. A **batch** of TTs of one shape and ranks
        has cores ``(*batch, r_{k-1}, n_k, r_k)`` with the same leading dimensions on every
        core (``docs/tt_algebra.md#batches``): every operation then acts point by point
        and returns one value per TT (``inner``, ``norm``: shape ``batch``).
    check : bool
        Validate the cores (default). Internal callers that build consistent cores may skip.

    Attributes
    ----------
    cores, shape, ranks, ndim, batch_shape, dtype, device

    Arithmetic: ``x + y``, ``x - y``, ``-x``, ``a * x``, ``x * a``, ``x / a`` for scalars
    ``a`` (numbers or 0-d tensors). Ranks add under ``+`` and ``-``.
    """

    __slots__ = ("_cores",)

    def __init__(self, cores: Sequence[torch.Tensor], *, check: bool = True):
        self._cores = _check_cores(cores) if check else list(cores)

    # -- properties ---------------------------------------------------------------------
    @property
    def cores(self) -> List[torch.Tensor]:
        """The list of cores (the list is a copy, the tensors are shared)."""
        return list(self._cores)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple([int(c.shape[-2]) for c in self._cores])  # a list: faster than a generator

    @property
    def ranks(self) -> Tuple[int, ...]:
        return (1, *[int(c.shape[-1]) for c in self._cores])

    @property
    def batch_shape(self) -> Tuple[int, ...]:
        """The leading batch dimensions of the cores (``()`` for a single TT)."""
        return tuple(self._cores[0].shape[:-3])

    @property
    def ndim(self) -> int:
        return len(self._cores)

    @property
    def dtype(self) -> torch.dtype:
        return self._cores[0].dtype

    @property
    def device(self) -> torch.device:
        return self._cores[0].device

    @property
    def requires_grad(self) -> bool:
        return any(c.requires_grad for c in self._cores)

    @property
    def num_params(self) -> int:
        """Number of stored entries, ``sum_k r_{k-1} n_k r_k``."""
        return sum(c.numel() for c in self._cores)

    def is_feasible(self) -> bool:
        """Whether every rank is within ``min(n_1..n_k, n_{k+1}..n_d)``."""
        return all(r <= f for r, f in zip(self.ranks, feasible_ranks(self.shape)))

    # -- conversions --------------------------------------------------------------------
    def to(self, *args, **kwargs) -> "TT":
        """Like :meth:`torch.Tensor.to`, applied to every core."""
        return TT([c.to(*args, **kwargs) for c in self._cores])

    def clone(self) -> "TT":
        return TT([c.clone() for c in self._cores], check=False)

    def detach(self) -> "TT":
        return TT([c.detach() for c in self._cores], check=False)

    def requires_grad_(self, flag: bool = True) -> "TT":
        for c in self._cores:
            c.requires_grad_(flag)
        return self

    def __repr__(self) -> str:
        dev = "" if self.device.type == "cpu" else f", device={self.device}"
        bs = self.batch_shape
        batch = f", batch_shape={bs}" if bs else ""
        return (
            f"TT(shape={self.shape}, ranks={self.ranks}{batch}, dtype={self.dtype}{dev}, "
            f"params={self.num_params})"
        )

    # -- batches ------------------------------------------------------------------------
    def __getitem__(self, index) -> "TT":
        """Index the batch dimensions (``x[i]``, ``x[2:5]``, ``x[mask]``, ``x[i, j]``): the
        TT(s) selected, cores indexed alike (views where torch indexing gives views).
        Raises ``IndexError`` for a single TT or an index past the batch dimensions.
        Cost: that of indexing the cores."""
        bs = self.batch_shape
        if not bs:
            raise IndexError("TT: a single TT has no batch dimension to index (batch_shape ())")
        idx = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis or i is None for i in idx):
            raise IndexError("TT: index the batch dimensions explicitly (no ... or None)")
        nidx = sum(i.dim() if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1
                   for i in idx)
        if nidx > len(bs):
            raise IndexError(f"TT: {nidx} indices for batch_shape {bs}")
        cores = [c[idx] for c in self._cores]
        if cores[0].dim() < 3 or any(tuple(c.shape[-3:]) != tuple(o.shape[-3:])
                                     for c, o in zip(cores, self._cores)):
            raise IndexError(f"TT: the index {index!r} reaches past batch_shape {bs}")
        return TT(cores, check=False)

    def unbind(self, dim: int = 0) -> Tuple["TT", ...]:
        """The TTs along batch dimension ``dim`` (views of the cores), like
        :func:`torch.unbind`. Cost: none (views)."""
        bs = self.batch_shape
        if not -len(bs) <= dim < len(bs):
            raise IndexError(f"dim: {dim} is not a batch dimension of batch_shape {bs}")
        dim = dim % len(bs)
        parts = [c.unbind(dim) for c in self._cores]
        return tuple(TT(list(cs), check=False) for cs in zip(*parts))

    @staticmethod
    def stack(tts: Sequence["TT"], dim: int = 0) -> "TT":
        """A batch of TTs of one shape, ranks and batch shape, stacked on a new batch
        dimension ``dim`` (:func:`stack`)."""
        return stack(tts, dim)

    def pairwise_inner(self, other: "TT") -> torch.Tensor:
        """All pairs of inner products (:func:`pairwise_inner`)."""
        return pairwise_inner(self, other)

    def __len__(self) -> int:
        return self.ndim

    # -- construction -------------------------------------------------------------------
    @classmethod
    def random(
        cls,
        shape: Sequence[int],
        ranks,
        *,
        dtype: Optional[torch.dtype] = None,
        device=None,
        generator: Optional[torch.Generator] = None,
        normalize: bool = True,
        batch: Sequence[int] = (),
    ) -> "TT":
        """A random TT of exactly the given ranks (generically), well conditioned.

        Cores ``0..d-2`` are random left-orthogonal frames (QR of Gaussian matrices), the
        last core is Gaussian; with ``normalize`` (default) the result has unit norm.
        Orthonormal frames keep the interface matrices well conditioned, unlike products
        of plain Gaussian cores whose norm grows or decays exponentially in d.

        ``ranks``: an int, ``d - 1`` inner ranks or ``d + 1`` ranks; clipped to the feasible
        bound, and to ``r_k <= min(r_{k-1} n_k, n_{k+1} r_{k+1})``, with a warning.
        ``batch``: leading batch dimensions (default ``()``, one TT): independent draws,
        every QR batched. Cost O(d n r^3) per TT.
        """
        shape = check_shape(shape)
        batch = _check_batch(batch)
        ranks = normalize_ranks(shape, ranks)
        dtype = dtype or torch.get_default_dtype()
        check_float_dtype(dtype, "dtype")
        d = len(shape)
        # Feasible ranks can still be unattainable by neighbouring cores: a TT has
        # r_k <= r_{k-1} n_k and r_k <= n_{k+1} r_{k+1}. Clip to that too (else the QR
        # frame below cannot be reshaped, or the result has redundant, inexact ranks).
        att = list(ranks)
        for k in range(1, d):
            att[k] = min(att[k], att[k - 1] * shape[k - 1])
        for k in range(d - 1, 0, -1):
            att[k] = min(att[k], shape[k] * att[k + 1])
        if tuple(att) != ranks:
            warnings.warn(
                f"ranks: requested ranks {ranks} cannot be attained by shape {shape} (each "
                f"r_k must be at most r_(k-1) n_k and n_(k+1) r_(k+1)); clipped to "
                f"{tuple(att)}",
                UserWarning,
                stacklevel=2,
            )
            ranks = tuple(att)
        cores = []
        for k in range(d):
            m, r = ranks[k] * shape[k], ranks[k + 1]
            g = torch.randn(batch + (m, r), dtype=dtype, device=device, generator=generator)
            if k < d - 1:
                # LAPACK's Q is column-major: made contiguous once here, not by every use
                g = qr_pos(g)[0].contiguous()
            cores.append(g.reshape(batch + (ranks[k], shape[k], r)))
        if normalize:
            if batch:
                nrm = torch.linalg.vector_norm(cores[-1], dim=(-3, -2, -1), keepdim=True)
                cores[-1] = cores[-1] / nrm
            else:
                cores[-1] = cores[-1] / torch.linalg.vector_norm(cores[-1])
        return cls(cores, check=False)

    @classmethod
    def zeros(cls, shape: Sequence[int], ranks=1, *, dtype=None, device=None,
              batch: Sequence[int] = ()) -> "TT":
        """The zero tensor as a TT with the given ranks (default 1); ``batch``: leading
        batch dimensions (a batch of zeros)."""
        shape = check_shape(shape)
        batch = _check_batch(batch)
        ranks = normalize_ranks(shape, ranks)
        dtype = dtype or torch.get_default_dtype()
        check_float_dtype(dtype, "dtype")
        return cls(
            [torch.zeros(batch + (ranks[k], n, ranks[k + 1]), dtype=dtype, device=device)
             for k, n in enumerate(shape)],
            check=False,
        )

    @classmethod
    def from_dense(
        cls,
        x: torch.Tensor,
        *,
        max_rank: Optional[int] = None,
        ranks=None,
        rel_eps: Optional[float] = None,
    ) -> "TT":
        """TT-SVD of a dense tensor (Oseledets 2011, Alg. 1).

        Left-to-right sweep of truncated SVDs. With ``rel_eps`` each of the ``d - 1``
        truncations discards at most ``rel_eps ||x|| / sqrt(d - 1)`` in Frobenius norm, so
        ``||x - TT|| <= rel_eps ||x||``. ``max_rank`` and ``ranks`` cap the ranks (both may
        be combined with ``rel_eps``; then the error bound holds only if no cap binds).
        With none of them the decomposition is exact to rounding: ``rel_eps`` defaults to
        ``256 eps sqrt(d-1)``, so the ranks are the numerical ranks of the unfoldings. Cost O(n^{d+1}) for the first SVD. Choosing ranks from
        ``rel_eps`` reads singular values on the host.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype.is_complex or not x.dtype.is_floating_point:
            raise TypeError(f"x: expected a real floating tensor, got dtype {x.dtype}")
        check_float_dtype(x.dtype, "x")
        if x.dim() == 0:
            raise ValueError("x: expected a tensor with at least one dimension")
        shape = check_shape(tuple(x.shape), "x.shape")
        check_finite(x, "x")
        rel_eps = check_positive_float(rel_eps, "rel_eps")
        d = len(shape)
        if ranks is None and max_rank is None and rel_eps is None:
            rel_eps = _DEFAULT_EPS_FACTOR * torch.finfo(x.dtype).eps * math.sqrt(max(d - 1, 1))
        if ranks is None and max_rank is None:
            caps = feasible_ranks(shape)
        else:
            caps = normalize_ranks(shape, ranks, max_rank, stacklevel=3)
        delta = None
        if rel_eps is not None and d > 1:
            delta = rel_eps * fro_norm(x.detach()) / math.sqrt(d - 1)
        cores = []
        c = x.reshape(shape[0], -1)
        r_prev = 1
        for k in range(d - 1):
            c = c.reshape(r_prev * shape[k], -1)
            u, s, vh = _svd(c)
            r = _choose_rank(s, caps[k + 1], delta)
            cores.append(u[:, :r].reshape(r_prev, shape[k], r))
            c = s[:r, None] * vh[:r]
            r_prev = r
        cores.append(c.reshape(r_prev, shape[-1], 1))
        return cls(cores, check=False)

    # -- evaluation ---------------------------------------------------------------------
    def full(self) -> torch.Tensor:
        """The dense tensor of shape ``self.shape`` (``batch_shape + shape`` for a batch).
        Cost O(n^d r) per TT: small tensors only."""
        bs = self.batch_shape
        if bs:
            c0 = self._cores[0]
            res = c0.reshape(bs + (c0.shape[-2], c0.shape[-1]))
            for c in self._cores[1:]:
                a, n, b = c.shape[-3:]
                res = (res @ c.reshape(bs + (a, n * b))).reshape(bs + (res.shape[-2] * n, b))
            return res.reshape(bs + self.shape)
        res = self._cores[0].reshape(self.shape[0], -1)
        for c in self._cores[1:]:
            res = (res @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[2])
        return res.reshape(self.shape)

    def norm(self) -> torch.Tensor:
        """Frobenius norm. Its value comes from a QR sweep (no squaring: accurate even when
        ``||X||`` is far below the norms of the terms of a sum). Under autograd its
        derivatives, of every order, are those of ``sqrt(<X, X>)`` at that value: the QR
        sweep's own backward is undefined where a core's unfolding is rank deficient, as in
        sums and in the tangent TTs of Riemannian autodiff. Cost O(d n r^3) (plus one inner
        product sweep under autograd). A batch gives one norm per TT (shape
        ``batch_shape``)."""
        if not (torch.is_grad_enabled() and self.requires_grad):
            return self._qr_norm()
        # detach outside no_grad: structured subclasses build their cores lazily, and cores
        # built under no_grad would be cached without their graph
        x = self.detach()
        with torch.no_grad():
            left = []
            val = x._qr_norm(left)
        if (val.device.type == "cpu" and not self.batch_shape
                and not torch.compiler.is_compiling() and not functorch_wrapped(val)):
            # on the CPU reading the values is free: the plain Gram sweep unless its squares
            # over- or underflow (then the scaled sweep below)
            s = inner(self, self)
            v, fin = float(val), torch.finfo(self.dtype)
            if fin.tiny / fin.eps <= v * v <= fin.max and math.isfinite(float(s.detach())):
                # value: val; derivatives: those of sqrt(<X, X>) (val^2, <X, X> differ by rounding)
                return val * torch.sqrt(1 + (s - s.detach()) / (val * val))
        return _norm_with_gram_derivatives(self, val, left)

    def _qr_norm(self, left: Optional[list] = None) -> torch.Tensor:
        """``||X||`` by the QR sweep; ``left``, if given, receives the sweep's matrices
        ``c_k`` for k < d (``c_k`` has the singular values of the interface ``X_{<=k}``)."""
        bs = self.batch_shape
        if bs:
            c0 = self._cores[0]
            c = c0.reshape(bs + (c0.shape[-2], c0.shape[-1]))
            for nxt in self._cores[1:]:
                if left is not None:
                    left.append(c)
                r = torch.linalg.qr(c, mode="reduced")[1] if c.shape[-2] > c.shape[-1] else c
                a, n, b = nxt.shape[-3:]
                c = (r @ nxt.reshape(bs + (a, n * b))).reshape(bs + (r.shape[-2] * n, b))
            return fro_norm(c, len(bs))
        c = self._cores[0].reshape(-1, self._cores[0].shape[2])
        for k in range(1, self.ndim):
            if left is not None:
                left.append(c)
            # only the R factor matters: ||X|| = ||R_k G_{k+1} ... ||
            r = torch.linalg.qr(c, mode="reduced")[1] if c.shape[0] > c.shape[1] else c
            nxt = self._cores[k]
            c = (r @ nxt.reshape(nxt.shape[0], -1)).reshape(-1, nxt.shape[2])
        return fro_norm(c)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Entries at ``N`` multi-indices.

        ``indices``: integer tensor of shape ``(N, d)`` on the TT's device. Returns the
        ``N`` entries as a 1-D tensor. Cost O(N d r^2); the dense tensor is never formed.
        For large ``N`` the samples are grouped by their index in each mode
        (:class:`ttmanifold.IndexSet`) so that every step is one batched matrix product per
        mode with O(N r) memory; small ``N`` (and the meta device) use per-sample products
        in chunks. Reuse an :class:`~ttmanifold.IndexSet` to gather many TTs at the same
        indices. A batch of TTs gives ``batch_shape + (N,)``: the same indices in every TT,
        per-sample products batched over the TTs (O(B N d r^2)).
        """
        idx = self._check_indices(indices)
        bs = self.batch_shape
        if bs:
            outs = []
            for s in range(0, max(idx.shape[0], 1), _GATHER_CHUNK):
                part = idx[s:s + _GATHER_CHUNK]
                v = self._cores[0][..., 0, :, :].index_select(-2, part[:, 0])  # (*B, N, r_1)
                for k in range(1, self.ndim):
                    # (*B, r_{k-1}, N, r_k) -> (*B, N, r_{k-1}, r_k)
                    m = self._cores[k].index_select(-2, part[:, k]).movedim(-2, -3)
                    v = (v.unsqueeze(-2) @ m).squeeze(-2)
                outs.append(v[..., 0])
            return outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        if idx.shape[0] >= _GROUPED_GATHER_MIN and idx.device.type != "meta":
            return IndexSet(idx, self.shape, check=False).gather(self)
        outs = []
        for s in range(0, max(idx.shape[0], 1), _GATHER_CHUNK):
            part = idx[s:s + _GATHER_CHUNK]
            v = self._cores[0][0].index_select(0, part[:, 0])  # (N, r_1)
            for k in range(1, self.ndim):
                c = self._cores[k]
                m = c.permute(1, 0, 2).index_select(0, part[:, k])  # (N, r_{k-1}, r_k)
                v = torch.bmm(v.unsqueeze(1), m).squeeze(1)
            outs.append(v[:, 0])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _check_indices(self, indices) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices: expected a torch.Tensor of shape (N, {self.ndim}), "
                            f"got {type(indices).__name__}")
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"indices: expected an integer tensor, got dtype {indices.dtype}")
        if indices.dim() != 2 or indices.shape[1] != self.ndim:
            raise ValueError(
                f"indices: expected shape (N, {self.ndim}), got {tuple(indices.shape)}"
            )
        if indices.device != self.device:
            raise ValueError(f"indices: on device {indices.device}, the TT is on {self.device}")
        indices = indices.long()
        if indices.device.type != "meta" and indices.numel() > 0:
            bound = torch.tensor(self.shape, device=indices.device)
            if bool(((indices < 0) | (indices >= bound)).any()):
                raise ValueError(f"indices: out of range for shape {self.shape}")
        return indices

    # -- arithmetic ---------------------------------------------------------------------
    def __add__(self, other):
        if isinstance(other, TT):
            return add(self, other)
        return NotImplemented

    def __sub__(self, other):
        if isinstance(other, TT):
            return add(self, -other)
        return NotImplemented

    def __neg__(self):
        return self.scaled(-1.0)

    def __mul__(self, a):
        if _is_scalar(a):
            return self.scaled(a)
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, a):
        if not _is_scalar(a):
            return NotImplemented
        if isinstance(a, torch.Tensor):
            # 1/a overflows for a subnormal a: 1/a = p * 1/(a p) with p = 2^-h, h half of
            # a's binary exponent (no host read); both factors are finite, p exact, and the
            # first core's intermediate lies between its value and the result's
            h = torch.frexp(a.detach().to(self.dtype))[1].div(2, rounding_mode="floor")
            p = torch.exp2(-h.to(self.dtype))
            return self.scaled(p).scaled(1.0 / (a * p))
        inv = 1.0 / a
        if abs(inv) <= torch.finfo(self.dtype).max:
            return self.scaled(inv)
        # 1/a overflows the dtype (|a| tiny, e.g. 1e-310) although x / a may not: scale by
        # 1/m, then by 2^-e in power-of-two steps that fit the dtype (exact)
        m, e = math.frexp(a)
        out, step = self.scaled(1.0 / m), int(math.log2(torch.finfo(self.dtype).max)) - 1
        for part in range(-e, 0, -step):
            out = out.scaled(math.ldexp(1.0, min(part, step)))
        return out

    def structured_inner(self, other: "TT") -> Optional[torch.Tensor]:
        """Extension point for structured subclasses (the tangent TT of
        :mod:`ttmanifold.manifold`): ``<self, other>`` computed from the structure, or None
        to use the generic sweep of :func:`inner`."""
        return None

    def values_at(self, index_set: "IndexSet") -> torch.Tensor:
        """The entries at the samples of ``index_set`` (:meth:`IndexSet.gather
        <ttmanifold.IndexSet.gather>` calls this; structured subclasses override it).
        O(N d r^2). A single TT only (``gather`` evaluates a batch at shared indices)."""
        if self.batch_shape:
            raise ValueError(f"index_set: sampled entries of a batch of TTs (batch_shape "
                             f"{self.batch_shape}) are not supported; use x.gather(indices)")
        return index_set.gather_cores(self._cores)

    def scaled(self, a) -> "TT":
        """``a * self`` for a real scalar ``a`` (first core scaled; subclasses may keep
        their structure); for a batch, ``a`` may also be a tensor of shape ``batch_shape``
        (one scalar per TT). O(n r^2)."""
        cores = list(self._cores)
        if type(a) is float and a == -1.0:  # x - y: negation (no scalar to convert, exact)
            cores[0] = torch.neg(cores[0])
        else:
            cores[0] = cores[0] * per_point_scalars(a, self.batch_shape, cores[0])
        return TT(cores, check=False)


def _norm_with_gram_derivatives(x: TT, val: torch.Tensor,
                                left: List[torch.Tensor]) -> torch.Tensor:
    """``val`` (``||X||`` from the QR sweep) with the derivatives, of every order, of
    ``sqrt(<X, X>)`` (zero where ``X = 0``: the value is then 0, as without autograd).
    ``<X, X>`` itself over- or underflows beyond ``||X|| ~ 1e154`` (float64; ``~1e19`` in
    float32), which made the value NaN; so the Gram sweep runs on the cores scaled by
    powers of two (exact): core k by ``2^(e_{k-1} - e_k)``, with ``e_k`` the binary
    exponent of the largest entry of ``left[k]`` (the QR sweep's matrix with the singular
    values of ``X_{<=k}``), so every left interface of the scaled TT has a norm between 1/2
    and ``sqrt(numel)``. At the last core ``e_d`` is that of ``||X||``, but at most
    ``nmant`` bits below that of ``||X_{<=d-1}|| ||G_d||``: a TT that cancels to (near)
    zero is not blown up. Cost: one Gram sweep and about ``2 d`` elementwise operations."""
    fin = torch.finfo(val.dtype)
    nmant = int(-math.log2(fin.eps))  # 52 or 23 (exact powers of two)
    cores = x.cores
    nb = len(val.shape)
    mats = left + [cores[-1].detach()]
    if nb == 0 and not torch.compiler.is_compiling() and not functorch_wrapped(mats):
        amax = torch.stack(torch._foreach_norm(mats, float("inf")))  # one operation for all
    else:
        amax = torch.stack([m.abs().flatten(nb).amax(-1) for m in mats], -1)
    e = torch.frexp(amax)[1]  # (*batch, d)
    # a subnormal norm keeps its own exponent (clamping it to tiny broke val = mant 2^e_val)
    mant, e_val = torch.frexp(torch.where(val > 0, val, fin.tiny))
    e_prev = e[..., -2] if len(cores) > 1 else torch.zeros_like(e_val)
    e_last = torch.maximum(e_val, e_prev + e[..., -1] - nmant)
    exps = torch.cat([e[..., :-1], e_last.unsqueeze(-1)], -1)
    steps = torch.cat([torch.zeros_like(e_last).unsqueeze(-1), exps[..., :-1]], -1) - exps
    # each power of two applied as two halves: a step beyond the normal exponent range
    # (an interface of subnormal or near-overflow norm next to one of norm ~1) would
    # overflow 2^step or lose bits as a subnormal; the halves are exact and the scaled
    # core's magnitude lies between the core's and the result's
    half = torch.div(steps, 2, rounding_mode="floor")
    s1, s2 = torch.exp2(half.to(val.dtype)), torch.exp2((steps - half).to(val.dtype))
    shp = steps.shape[:-1] + (1, 1, 1)
    y = TT([c * s1[..., k].reshape(shp) * s2[..., k].reshape(shp)
            for k, c in enumerate(cores)], check=False)
    s = inner(y, y)  # <X, X> / 2^(2 e_d)
    # <X, X> = 2^(2 e_d) <y, y> and val = mant 2^e_val: the derivatives of sqrt(<X, X>) are
    # those of val sqrt(1 + (<y, y> - s0) k2) with k2 = 2^(2 (e_d - e_val)) / mant^2
    # (clamped: it only multiplies the zero s - s0 and, for X = 0, a zero val)
    k2 = (torch.exp2(2 * (e_last - e_val).to(val.dtype)) / (mant * mant)).clamp_max(fin.max)
    return val * torch.sqrt(1 + (s - s.detach()) * k2)


def per_point_scalars(a, batch_shape, like: torch.Tensor):
    """The factor ``a`` of :meth:`TT.scaled`, checked.

    Args:
        a: a scalar (number or 0-d tensor), or a tensor of shape ``batch_shape`` (one
            scalar per TT of a batch).
        batch_shape: the TT's batch shape.
        like: a core of the TT (its dtype and device).
    Returns:
        a scalar as is; a tensor as ``(*batch, 1, 1, 1)`` (to scale cores
        ``(*batch, r, n, r')``) in ``like``'s dtype. Raises ``ValueError`` for another
        shape or device and ``TypeError`` for a floating (or complex) dtype other than
        ``like``'s: the product would promote one core alone and leave a TT of mixed
        dtypes (a 0-d tensor keeps the TT's dtype, as torch's scalars do). A complex or
        non-numeric scalar is a ``TypeError`` and a 0-d tensor on another device than
        ``like``'s (other than the CPU, whose 0-d tensors torch takes as scalars) a
        ``ValueError``: they made a complex first core or failed inside torch.
    Cost: O(|batch|)."""
    if not isinstance(a, torch.Tensor):
        if not isinstance(a, numbers.Real):
            raise TypeError(f"a: expected a real scalar or a tensor, got {type(a).__name__}")
        return a
    if a.dim() == 0:
        if a.dtype.is_complex:
            raise TypeError(f"a: expected a real scalar, got a tensor of dtype {a.dtype}")
        if a.device != like.device and a.device.type != "cpu":
            raise ValueError(f"a: on {a.device}, the TT on {like.device}")
        return a
    if tuple(a.shape) != tuple(batch_shape):
        raise ValueError(f"a: expected a scalar or a tensor of the batch shape "
                         f"{tuple(batch_shape)}, got shape {tuple(a.shape)}")
    if a.dtype != like.dtype and (a.dtype.is_floating_point or a.dtype.is_complex):
        raise TypeError(f"a: dtype {a.dtype} differs from the TT's {like.dtype}")
    if a.device != like.device:
        raise ValueError(f"a: on {a.device}, the TT on {like.device}")
    return a.to(like.dtype)[..., None, None, None]


def _check_batch(batch) -> Tuple[int, ...]:
    if isinstance(batch, numbers.Integral) and not isinstance(batch, bool):
        batch = (int(batch),)
    if not isinstance(batch, (tuple, list, torch.Size)) or not all(
            isinstance(b, numbers.Integral) and not isinstance(b, bool) and b >= 0 for b in batch):
        raise ValueError(f"batch: expected a tuple of non-negative ints, got {batch!r}")
    return tuple(int(b) for b in batch)


def _is_scalar(a) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dim() == 0 and not a.dtype.is_complex
    return isinstance(a, numbers.Real)


def _check_pair(a, b, op: str, broadcast: bool = True) -> None:
    """Raise unless ``a`` and ``b`` are TTs of one shape, dtype and device and (with
    ``broadcast``) broadcastable batch shapes."""
    if not isinstance(a, TT) or not isinstance(b, TT):
        raise TypeError(f"{op}: expected two TT objects, got {type(a).__name__} and "
                        f"{type(b).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"{op}: shapes differ, {a.shape} and {b.shape}")
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: dtypes differ, {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{op}: devices differ, {a.device} and {b.device}")
    ba, bb = a.batch_shape, b.batch_shape
    if not broadcast or ba == bb:  # the common case: skip the broadcast check (~25 us)
        return
    try:
        torch.broadcast_shapes(ba, bb)
    except RuntimeError:
        raise ValueError(f"{op}: batch shapes {a.batch_shape} and {b.batch_shape} do not "
                         f"broadcast") from None


def add(a: TT, b: TT) -> TT:
    """``a + b`` with block cores; ranks add (except r_0 = r_d = 1). Cost O(d n r^2).
    Batches broadcast (``batch_shape`` of the result: the broadcast of both).

    A sum of a few single TTs (``d >= 2``, at most 4 terms) keeps its terms until its
    cores are first read: :func:`inner` and :meth:`TT.norm` (on the CPU, where the terms
    do not nearly cancel) then expand it into inner products of the terms, which skip the
    zero blocks of the concatenated cores (``docs/tt_algebra.md#sums``). Every other
    operation sees the block cores."""
    _check_pair(a, b, "add")
    if a.ndim > 1 and not a.batch_shape and not b.batch_shape:
        terms = _sum_terms(a) + _sum_terms(b)
        if len(terms) <= _SUM_MAX_TERMS:
            return _SumTT(terms)
    return _add_dense(a, b)


def _sum_terms(x: TT) -> List[TT]:
    if isinstance(x, _SumTT) and x._dense is None:
        return list(x._terms)
    return [x]


def _add_dense(a: TT, b: TT) -> TT:
    """The block cores of ``a + b`` (inputs checked by :func:`add`)."""
    d = a.ndim
    if a.batch_shape or b.batch_shape:
        bs = torch.broadcast_shapes(a.batch_shape, b.batch_shape)
        xs = [c.expand(bs + c.shape[-3:]) for c in a._cores]
        ys = [c.expand(bs + c.shape[-3:]) for c in b._cores]
        if d == 1:
            return TT([xs[0] + ys[0]], check=False)
        cores = [torch.cat([xs[0], ys[0]], -1)]
        for x, y in zip(xs[1:-1], ys[1:-1]):
            top = torch.nn.functional.pad(x, (0, y.shape[-1]))
            bot = torch.nn.functional.pad(y, (x.shape[-1], 0))
            cores.append(torch.cat([top, bot], -3))
        cores.append(torch.cat([xs[-1], ys[-1]], -3))
        return TT(cores, check=False)
    if d == 1:
        return TT([a._cores[0] + b._cores[0]], check=False)
    cores = []
    for k, (x, y) in enumerate(zip(a._cores, b._cores)):
        if k == 0:
            cores.append(torch.cat([x, y], dim=2))
        elif k == d - 1:
            cores.append(torch.cat([x, y], dim=0))
        else:
            top = torch.nn.functional.pad(x, (0, y.shape[2]))
            bot = torch.nn.functional.pad(y, (x.shape[2], 0))
            cores.append(torch.cat([top, bot], dim=0))
    return TT(cores, check=False)


_SUM_MAX_TERMS = 4  # beyond, the k^2 pairwise sweeps of a sum cost more than one dense sweep
# a sum's norm under autograd takes its value from the Gram sweep when the squared norm is
# at least this fraction of (sum of the terms' norms)^2: the rounding of the Gram value is
# then at most 1 / _GRAM_NORM_TAU times that of a sum without cancellation
_GRAM_NORM_TAU = 0.25


class _SumTT(TT):
    """``t_1 + ... + t_k`` kept as its terms (single TTs, ``d >= 2``) until its block cores
    are first read; from then on it is the plain TT of those cores (so in-place changes of
    the cores, or ``requires_grad_`` on them, are never bypassed). :func:`inner` with it
    sums the inner products of the terms (``O(d n sum_ij r_i r_j (r_i + r_j))`` instead of
    ``O(d n R^3)`` for the concatenated rank ``R = sum_i r_i``), and so does
    :meth:`norm` where that is accurate."""

    __slots__ = ("_terms", "_dense")

    def __init__(self, terms: Sequence[TT]):
        self._terms = list(terms)
        self._dense: Optional[List[torch.Tensor]] = None

    def __reduce__(self):  # copy / deepcopy / pickle: the plain TT of the block cores
        return (TT, (self.cores,))

    @property
    def _cores(self) -> List[torch.Tensor]:  # type: ignore[override]
        if self._dense is None:
            # cached, so built with the graph even when first read under no_grad
            with torch.enable_grad():
                cores = self._terms[0]._cores
                for t in self._terms[1:]:
                    cores = _add_dense(TT(cores, check=False), t)._cores
            self._dense = cores
        return self._dense

    @property
    def shape(self) -> Tuple[int, ...]:
        return self._terms[0].shape

    @property
    def ranks(self) -> Tuple[int, ...]:
        rs = [t.ranks for t in self._terms]
        d = len(rs[0]) - 1
        return (1,) + tuple(sum(r[k] for r in rs) for k in range(1, d)) + (1,)

    @property
    def batch_shape(self) -> Tuple[int, ...]:
        return ()

    @property
    def ndim(self) -> int:
        return self._terms[0].ndim

    @property
    def dtype(self) -> torch.dtype:
        return self._terms[0].dtype

    @property
    def device(self) -> torch.device:
        return self._terms[0].device

    @property
    def requires_grad(self) -> bool:
        if self._dense is not None:
            return any(c.requires_grad for c in self._dense)
        return any(t.requires_grad for t in self._terms)

    @property
    def num_params(self) -> int:
        rs, ns = self.ranks, self.shape
        return sum(rs[k] * n * rs[k + 1] for k, n in enumerate(ns))

    def scaled(self, a) -> TT:
        if self._dense is not None:
            return super().scaled(a)
        return _SumTT([t.scaled(a) for t in self._terms])

    def _pairwise_ok(self) -> bool:
        """Whether ``<self, self>`` may come from the terms: the accuracy check below reads a
        value, free on the CPU only (elsewhere, and under functorch or tracing, the
        concatenated cores are used as for any TT)."""
        return (self._dense is None and self.device.type == "cpu"
                and not torch.compiler.is_compiling()
                and not functorch_wrapped([c for t in self._terms for c in t._cores]))

    def _gram(self, fallback: bool = True) -> Tuple[Optional[torch.Tensor], bool]:
        """``<self, self>`` and whether it came from the terms: ``sum_ij <t_i, t_j>`` when
        that is at least ``_GRAM_NORM_TAU (sum_i ||t_i||)^2`` (the terms do not nearly
        cancel, so its rounding, and that of its gradient, is within a small factor of a
        single TT's) and the squares neither over- nor underflow; else the sweep of the
        concatenated cores (near-equal terms, ``x - y`` for ``x ~ y``: that sweep's
        gradient is up to ~6x more accurate in float32 than the sum of the terms')."""
        ts = self._terms
        live = [t for t in ts if t.requires_grad]
        if (len(live) == 1 and torch.is_grad_enabled() and all(type(t) is TT for t in ts)
                and _sweep_ok(live[0], live[0])):
            # one varying term x (a loss against fixed TTs): <x, t_j> for all j in one
            # sweep whose backward is one reverse sweep; the constant pairs apart
            x = live[0]
            rest = [t for t in ts if t is not x]
            k = len(ts)
            s, p = _OneVsSum.apply(k, tuple(c for t in rest for c in t._cores),
                                   _packed_source(x._cores), *x._cores)
            # the check's values in Python floats from one read (no sync on the CPU)
            vals = p.tolist()
            pairs = [(i, j) for i in range(1, k) for j in range(i, k)]
            diag = [vals[0]] + [v for (i, j), v in zip(pairs, vals[k:]) if i == j]
            vals = diag + [math.fsum(c * v for c, v in zip(_one_vs_sum_weights(k), vals))]
        else:
            diag = [inner(t, t) for t in ts]
            s = sum(diag[1:], diag[0])
            for i in range(len(ts)):
                for j in range(i + 1, len(ts)):
                    s = s + 2 * inner(ts[i], ts[j])
            # the check in Python floats from one read (no sync on the CPU)
            vals = torch.stack([v.detach() for v in diag] + [s.detach()]).tolist()
        scale = sum(math.sqrt(max(v, 0.0)) for v in vals[:-1]) ** 2
        fin = torch.finfo(self.dtype)
        if fin.tiny / fin.eps <= scale <= fin.max / 16 and vals[-1] >= _GRAM_NORM_TAU * scale:
            return s, True
        if not fallback:
            return None, False
        return inner(TT(self._cores, check=False), TT(self._cores, check=False)), False

    def structured_inner(self, other: TT) -> Optional[torch.Tensor]:
        if self._dense is not None:
            return None
        if other is self:
            return self._gram()[0] if self._pairwise_ok() else None
        return sum(inner(t, other) for t in self._terms)

    def norm(self) -> torch.Tensor:
        """Frobenius norm. On the CPU, when the terms do not nearly cancel, ``sqrt(<X, X>)``
        from the inner products of the terms (in value and derivatives); else, and on other
        devices, :meth:`TT.norm` of the block cores (the value by a QR sweep: accurate for
        near-equal terms, ``||x - y||`` with ``x ~ y``; the derivatives of
        ``sqrt(<X, X>)``). Cost O(d n sum_ij r_i r_j (r_i + r_j)), or that of
        :meth:`TT.norm` at rank ``R = sum_i r_i``, O(d n R^3), plus the former."""
        if not self._pairwise_ok():
            return super().norm()
        s, ok = self._gram(fallback=False)
        if ok:  # s > 0: value sqrt(s), derivatives those of sqrt(<X, X>)
            return torch.sqrt(s)
        return TT(self._cores, check=False).norm()


def inner(a: TT, b: TT) -> torch.Tensor:
    """Frobenius inner product ``<a, b>`` by a sweep of ``r_a x r_b`` matrices.

    Cost O(d n r_a r_b (r_a + r_b)). Returns a 0-d tensor; for batches, the inner products
    of corresponding TTs (batch shapes broadcast), shape the broadcast batch shape
    (:func:`pairwise_inner` for all pairs).
    """
    _check_pair(a, b, "inner")
    ba, bb = a.batch_shape, b.batch_shape
    bs = ba if ba == bb else torch.broadcast_shapes(ba, bb)
    if type(a) is not TT or type(b) is not TT:  # structured TTs (tangent vectors)
        res = a.structured_inner(b)
        if res is None:
            res = b.structured_inner(a)
        if res is not None:
            return res.reshape(bs) if bs else res
    if bs:
        return _inner_batched(a, b, bs)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad) and _sweep_ok(a, b):
        # one reverse sweep for the backward instead of autograd's per-matmul graph
        if a._cores is b._cores or all(x is y for x, y in zip(a._cores, b._cores)):
            return _GramSweep.apply(True, *a._cores)
        return _GramSweep.apply(False, *a._cores, *b._cores)
    return _inner_sweep(a._cores, b._cores)


@kernels.dispatch("dense", compiled=compiled_dense.inner)
def _inner_sweep(xs, ys) -> torch.Tensor:
    """The plain sweep of :func:`inner` (single TTs), differentiable by autograd (the
    compiled sweep serves calls that need no graph)."""
    w = None
    for x, y in zip(xs, ys):  # torch.mm: less dispatch than @ for these small products
        ra, n, rc = x.shape
        rb, _, rd = y.shape
        if w is None:
            w = torch.mm(x.reshape(n, rc).t(), y.reshape(n, rd))  # ra == rb == 1
            continue
        t = torch.mm(w.t(), x.reshape(ra, n * rc)).reshape(rb * n, rc)
        w = torch.mm(t.t(), y.reshape(rb * n, rd))
    return w.reshape(())


def _sweep_ok(a: TT, b: TT) -> bool:
    """Whether the custom-backward sweep applies: not under functorch transforms or
    torch.compile tracing (they differentiate the plain sweep themselves)."""
    if torch.compiler.is_compiling():
        return False
    return not functorch_wrapped(a._cores + b._cores)


class _GramSweep(torch.autograd.Function):
    """``<a, b>`` of two single TTs by the left sweep of :func:`inner`, with a backward
    that is one right-to-left sweep (4 products per core instead of the 6 of autograd's
    graph of the sweep, and a third of its operations; 3 products when ``a is b``).

    Inputs: ``sym`` then the cores of ``a`` (and, unless ``sym``, those of ``b``).
    Forward saves the half products ``t_k = w_{k-1}^T x_k`` and the left environments
    ``w_k``; backward, with the right environment ``z`` (starting at the incoming
    gradient), gives ``dy_k = t_k z``, ``dx_k = w_{k-1} (y_k z^T)`` and
    ``z <- x_k (y_k z^T)^T`` (for ``a is b``: ``dx_k = 2 t_k z``, w and z symmetric).
    With ``create_graph`` (second derivatives) the backward differentiates the plain
    sweep again from the inputs instead, so that it is itself differentiable."""

    @staticmethod
    def forward(ctx, sym, *cores):
        d = len(cores) if sym else len(cores) // 2
        xs, ys = cores[:d], (cores[:d] if sym else cores[d:])
        ws, ts = [], []
        w = None
        for x, y in zip(xs, ys):
            ra, n, rc = x.shape
            rb, _, rd = y.shape
            if w is None:
                t = x.reshape(n, rc)
            elif sym:  # w symmetric
                t = torch.mm(w, x.reshape(ra, n * rc)).view(rb * n, rc)
            else:
                t = torch.mm(w.t(), x.reshape(ra, n * rc)).view(rb * n, rc)
            ws.append(w)
            ts.append(t)
            w = torch.mm(t.t(), y.reshape(rb * n, rd))
        ctx.sym, ctx.d = sym, d
        ctx.ws, ctx.ts = ws, ts
        ctx.save_for_backward(*cores)
        return w.view(())

    @staticmethod
    def backward(ctx, g):
        cores = ctx.saved_tensors
        sym, d = ctx.sym, ctx.d
        xs, ys = cores[:d], (cores[:d] if sym else cores[d:])
        need = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():  # create_graph: a differentiable backward
            with torch.enable_grad():
                val = _inner_sweep(xs, ys)
            wanted = [c for c, nd in zip(cores, need) if nd]
            gs = iter(torch.autograd.grad(val, wanted, g, create_graph=True, allow_unused=True))
            return (None, *[next(gs) if nd else None for nd in need])
        ws, ts = ctx.ws, ctx.ts
        dxs: List[Optional[torch.Tensor]] = [None] * d
        if sym:
            z = (2 * g).view(1, 1)  # d<x, x>/dx = 2 w x z: the 2 carried by z
            for k in range(d - 1, -1, -1):
                x = xs[k]
                ra, n, rc = x.shape
                dxs[k] = torch.mm(ts[k], z).view(x.shape) if need[k] else None
                if k > 0:
                    z = torch.mm(torch.mm(x.reshape(ra * n, rc), z).view(ra, n * rc),
                                 x.reshape(ra, n * rc).t())
            return (None, *dxs)
        need_x = any(need[:d])
        dys: List[Optional[torch.Tensor]] = [None] * d
        z = g.view(1, 1)
        for k in range(d - 1, -1, -1):
            x, y, w = xs[k], ys[k], ws[k]
            ra, n, rc = x.shape
            rb, _, rd = y.shape
            if need[d + k]:
                dys[k] = torch.mm(ts[k], z).view(y.shape)
            if need_x or k > 0:
                u = torch.mm(y.reshape(rb * n, rd), z.t()).view(rb, n * rc)
                if need[k]:
                    dxs[k] = (u if w is None else torch.mm(w, u)).view(x.shape)
                if k > 0:
                    z = torch.mm(x.reshape(ra, n * rc), u.t())
        return (None, *dxs, *dys)



def _inner_batched(a: TT, b: TT, bs) -> torch.Tensor:
    """:func:`inner` sweep with leading batch dimensions (broadcast by the products)."""
    w = None
    for x, y in zip(a._cores, b._cores):
        ra, n, rc = x.shape[-3:]
        rb, _, rd = y.shape[-3:]
        if w is None:
            t = x.reshape(x.shape[:-3] + (n, rc))
            w = t.mT @ y.reshape(y.shape[:-3] + (n, rd))
            continue
        t = w.mT @ x.reshape(x.shape[:-3] + (ra, n * rc))
        t = t.reshape(t.shape[:-2] + (rb * n, rc))
        w = t.mT @ y.reshape(y.shape[:-3] + (rb * n, rd))
    return w.reshape(bs)


def pairwise_inner(a: TT, b: TT) -> torch.Tensor:
    """All pairs of inner products of two batches (t3f's ``pairwise_flat_inner``):
    ``out[i, j] = <a[i], b[j]>`` with multi-indices ``i`` over ``a.batch_shape`` and ``j``
    over ``b.batch_shape``.

    Args:
        a, b: TTs of one shape, dtype and device (batches or single TTs).
    Returns:
        a tensor of shape ``a.batch_shape + b.batch_shape``.
    Cost: O(|A| |B| d n r_a r_b (r_a + r_b)): the sweep of :func:`inner`, broadcast over
    the pairs (memory O(|A| |B| n r_a r_b)).
    """
    _check_pair(a, b, "pairwise_inner", broadcast=False)  # every pair: any two batch shapes
    na, nb_ = len(a.batch_shape), len(b.batch_shape)
    xa = TT([c.reshape(c.shape[:na] + (1,) * nb_ + c.shape[na:]) for c in a.cores], check=False)
    xb = TT([c.reshape((1,) * na + c.shape) for c in b.cores], check=False)
    return inner(xa, xb)


def stack(tts: Sequence[TT], dim: int = 0) -> TT:
    """Stack TTs of one shape, ranks, batch shape, dtype and device on a new batch
    dimension ``dim`` (like :func:`torch.stack`; ``x[i]`` and :meth:`TT.unbind` undo it).

    Args:
        tts: a non-empty sequence of :class:`TT`.
        dim: position of the new dimension among the batch dimensions.
    Returns:
        a batched TT, ``batch_shape`` = the common one with ``len(tts)`` inserted at ``dim``.
    Cost: one copy of the cores.
    """
    tts = list(tts)
    if not tts or not all(isinstance(t, TT) for t in tts):
        raise TypeError("tts: expected a non-empty sequence of TT objects")
    ref = tts[0]
    for i, t in enumerate(tts[1:], 1):
        _check_pair(ref, t, "stack")
        if t.ranks != ref.ranks or t.batch_shape != ref.batch_shape:
            raise ValueError(f"tts[{i}]: ranks {t.ranks} and batch shape {t.batch_shape} differ "
                             f"from tts[0]'s {ref.ranks} and {ref.batch_shape}")
    nb = len(ref.batch_shape)
    if not -(nb + 1) <= dim <= nb:
        raise IndexError(f"dim: {dim} out of range for {nb + 1} batch dimensions")
    dim = dim % (nb + 1)
    return TT([torch.stack(cs, dim) for cs in zip(*[t.cores for t in tts])], check=False)


def orthogonalize(x: TT, side: str = "left", *, center: Optional[int] = None) -> TT:
    """Orthogonal form of a TT by QR sweeps (sign convention ``diag(R) >= 0``).

    - ``side="left"``: cores ``0..d-2`` left-orthogonal (``(G^L)^T G^L = I``), the norm in
      the last core.
    - ``side="right"``: cores ``1..d-1`` right-orthogonal, the norm in the first core.
    - ``center=k`` (0-based, overrides ``side``): cores ``< k`` left-, ``> k`` right-
      orthogonal; core ``k`` carries the norm.

    Redundant ranks shrink to the QR's rank in the sweep direction only: a left sweep
    enforces ``r_k <= r_{k-1} n_k`` on the cores it passes, a right sweep
    ``r_{k-1} <= n_k r_k``. Re-orthogonalizing an
    orthogonal TT returns the same cores (to rounding). Cost O(d n r^3).
    """
    if not isinstance(x, TT):
        raise TypeError(f"x: expected a TT, got {type(x).__name__}")
    d = x.ndim
    if center is None:
        if side == "left":
            center = d - 1
        elif side == "right":
            center = 0
        else:
            raise ValueError(f"side: expected 'left' or 'right', got {side!r}")
    if not isinstance(center, numbers.Integral) or isinstance(center, bool) or not 0 <= center < d:
        raise ValueError(f"center: expected an int in [0, {d - 1}], got {center!r}")
    cores = list(x._cores)
    if x.batch_shape:
        return TT(_orthogonalize_batched(cores, center), check=False)
    for k in range(center):
        c = cores[k]
        q, r = qr_pos(c.reshape(-1, c.shape[2]))
        cores[k] = q.reshape(c.shape[0], c.shape[1], q.shape[1])
        nxt = cores[k + 1]
        cores[k + 1] = (r @ nxt.reshape(nxt.shape[0], -1)).reshape(r.shape[0], nxt.shape[1], -1)
    for k in range(d - 1, center, -1):
        c = cores[k]
        l, q = lq_pos(c.reshape(c.shape[0], -1))
        cores[k] = q.reshape(q.shape[0], c.shape[1], c.shape[2])
        prv = cores[k - 1]
        cores[k - 1] = (prv.reshape(-1, prv.shape[2]) @ l).reshape(prv.shape[0], prv.shape[1], -1)
    return TT(cores, check=False)


def _orthogonalize_batched(cores: List[torch.Tensor], center: int) -> List[torch.Tensor]:
    """The sweeps of :func:`orthogonalize` on cores ``(*B, r, n, r')``, batched over B."""
    d = len(cores)
    bs = tuple(cores[0].shape[:-3])
    for k in range(center):
        a, n, b = cores[k].shape[-3:]
        q, r = qr_pos(cores[k].reshape(bs + (a * n, b)))
        cores[k] = q.reshape(bs + (a, n, q.shape[-1]))
        na, nn, nb = cores[k + 1].shape[-3:]
        cores[k + 1] = (r @ cores[k + 1].reshape(bs + (na, nn * nb))).reshape(
            bs + (r.shape[-2], nn, nb))
    for k in range(d - 1, center, -1):
        a, n, b = cores[k].shape[-3:]
        l, q = lq_pos(cores[k].reshape(bs + (a, n * b)))
        cores[k] = q.reshape(bs + (q.shape[-2], n, b))
        pa, pn, pb = cores[k - 1].shape[-3:]
        cores[k - 1] = (cores[k - 1].reshape(bs + (pa * pn, pb)) @ l).reshape(
            bs + (pa, pn, l.shape[-1]))
    return cores


def round(
    x: TT,
    *,
    max_rank: Optional[int] = None,
    ranks=None,
    rel_eps: Optional[float] = None,
) -> TT:
    """TT rounding (Oseledets 2011, Alg. 2): left-orthogonalize, then truncated SVDs
    from right to left.

    - ``max_rank``: cap on every inner rank; ``ranks``: per-bond caps (int, ``d - 1`` or
      ``d + 1`` values); ``rel_eps``: relative accuracy. All given arguments are honoured:
      each bond keeps the smallest rank meeting ``rel_eps`` and no cap is exceeded.
    - Error bound: with ``rel_eps`` alone, ``||x - round(x)|| <= rel_eps ||x||`` (each of the
      ``d - 1`` truncations discards at most ``rel_eps ||x|| / sqrt(d-1)``). With caps only,
      ``||x - round(x)||^2 <= sum_k eps_k^2`` where ``eps_k`` is the best rank-``r_k``
      error of the k-th unfolding (quasi-optimal: at most ``sqrt(d-1)`` times the best TT
      approximation of those ranks).
    - With no argument, the ranks are reduced to the exact TT-ranks up to rounding
      (``rel_eps`` defaults to ``256 eps sqrt(d-1)``: each bond drops singular values
      below ``256 eps ||x||``).

    The output has cores ``1..d-1`` right-orthogonal and the norm in core 0. Cost O(d n R^3) for input rank R.
    Choosing ranks from ``rel_eps`` reads singular values on the host (one sync per bond).
    Gradients flow through the SVDs where torch defines them.

    A batch is rounded with every SVD batched; its TTs share the ranks, so each bond keeps
    the largest rank any TT of the batch needs for ``rel_eps`` (capped as above): the
    error bound holds for every TT, some keep more rank than they alone would need
    (``docs/tt_algebra.md#batches``).
    """
    if not isinstance(x, TT):
        raise TypeError(f"x: expected a TT, got {type(x).__name__}")
    rel_eps = check_positive_float(rel_eps, "rel_eps")
    d = x.ndim
    if ranks is None and max_rank is None and rel_eps is None:
        rel_eps = _DEFAULT_EPS_FACTOR * torch.finfo(x.dtype).eps * math.sqrt(max(d - 1, 1))
    if ranks is None and max_rank is None:
        caps = feasible_ranks(x.shape)
    else:
        caps = normalize_ranks(x.shape, ranks, max_rank, stacklevel=3)
    x = orthogonalize(x, "left")
    cores = list(x._cores)
    delta = None
    bs = x.batch_shape
    if rel_eps is not None and d > 1:
        delta = rel_eps * fro_norm(cores[-1].detach(), len(bs)) / math.sqrt(d - 1)
    if bs:
        for k in range(d - 1, 0, -1):
            a, n, b = cores[k].shape[-3:]
            u, s, vh = _svd(cores[k].reshape(bs + (a, n * b)))
            r = _choose_rank(s, caps[k], delta)
            cores[k] = vh[..., :r, :].reshape(bs + (r, n, b))
            pa, pn, pb = cores[k - 1].shape[-3:]
            us = u[..., :r] * s[..., :r].unsqueeze(-2)
            cores[k - 1] = (cores[k - 1].reshape(bs + (pa * pn, pb)) @ us).reshape(
                bs + (pa, pn, r))
        return TT(cores, check=False)
    for k in range(d - 1, 0, -1):
        c = cores[k]
        mat = c.reshape(c.shape[0], -1)
        u, s, vh = _svd(mat)
        r = _choose_rank(s, caps[k], delta)
        cores[k] = vh[:r].reshape(r, c.shape[1], c.shape[2])
        prv = cores[k - 1]
        us = u[:, :r] * s[:r]
        cores[k - 1] = (prv.reshape(-1, prv.shape[2]) @ us).reshape(prv.shape[0], prv.shape[1], r)
    return TT(cores, check=False)


@functools.lru_cache(maxsize=None)
def _one_vs_sum_weights(k: int) -> Tuple[float, ...]:
    """The weights of ``||x + t_1 + ... + t_{k-1}||^2`` in the values of
    :func:`_one_vs_blocks` with ``pairs``: ``<x, x>``, ``2 <x, t_j>``, ``<t_i, t_i>``,
    ``2 <t_i, t_j>`` (``i < j``)."""
    return tuple([1.0] + [2.0] * (k - 1) + [1.0 if i == j else 2.0
                                            for i in range(1, k) for j in range(i, k)])


class _OneVsSum(torch.autograd.Function):
    """``||x + t_1 + ... + t_m||^2`` from the inner products of the terms, for a TT ``x``
    and constant TTs ``t_j`` of one shape, and the values ``(<x, x>, <x, t_1>, ...,
    <x, t_m>, <t_i, t_j> for 1 <= i <= j <= m)`` as a second, non-differentiable output.
    One left sweep whose environment is ``[W_0 | W_1 | ... ]`` (``x`` against each term,
    the terms side by side: ``x`` itself is block 0): per core one product ``W^T x_k`` for
    all blocks, then one per block; the constant pairs by their own sweeps. The backward is
    one right sweep for ``x``: with block weights ``g_0`` doubled (``x`` is both arguments
    of block 0) it gives ``d/dx sum_j g_j <x, t_j>``, two products per core plus one per
    block (the pairwise sweeps: 10 products per core for two terms, here 7). Inputs: the
    number of blocks ``k``, the constant terms' cores (a tuple: no gradient), then the cores
    of ``x``. Both sweeps run compiled on the CPU when the dense kernels are loaded (one
    call each instead of about 4 products and their dispatch per core). With
    ``create_graph`` the backward differentiates the plain sweeps instead (second
    derivatives). ``src``: None, or the packed deltas of which ``x``'s cores are the tangent
    block cores (:func:`mark_tangent_block_cores`); then, in a reverse pass for ``src``
    inside :func:`packed_grads_only(src) <packed_grads_only>`, the backward gives ``src``
    its gradient directly (only the delta blocks of the cores' gradients are computed) and
    the cores none."""

    @staticmethod
    def forward(ctx, k, consts, src, *xcores):
        # contiguous once for both sweeps (the kernels need it)
        cc = [c.contiguous() for c in xcores + consts]
        # one dispatch decision for both sweeps: the backward's cores and environments are
        # these (only its incoming gradient is checked again)
        mod = _one_vs_blocks.module_for(k, cc, True)
        vals, ws = _one_vs_blocks.call_with(mod, k, cc, True)
        ctx.set_materialize_grads(False)  # no zeros made up for vals (never differentiated)
        w = _weights_like(k, vals)
        ctx.k, ctx.consts, ctx.mod = k, consts, mod
        ctx.ws, ctx.w, ctx.cc = ws, w[:k], cc
        ctx.src = src
        if src is not None:  # to see, at backward time, whether something else reads their gradients
            ctx.xcores = xcores
        ctx.save_for_backward(*xcores)
        ctx.mark_non_differentiable(vals)
        return torch.dot(w, vals), vals

    @staticmethod
    def backward(ctx, g, _g_vals):
        xs = ctx.saved_tensors
        k, d = ctx.k, len(xs)
        if g is None:  # not materialized: no gradient reached the value
            return (None,) * (3 + d)
        g = g * ctx.w  # the weights of <x, x>, <x, t_1>, ...
        if torch.is_grad_enabled():  # create_graph: a differentiable backward
            cs = ctx.consts
            blocks = [xs] + [cs[d * j:d * (j + 1)] for j in range(k - 1)]
            with torch.enable_grad():
                val = torch.stack([_inner_sweep(xs, b) for b in blocks])
            gx = torch.autograd.grad(val, xs, g, create_graph=True)
            return (None, None, None, *gx)
        mod = ctx.mod if ctx.mod is not None and kernels.usable("dense", g) else None
        if ctx.src is not None and _deltas_only(ctx.src, ctx.xcores):
            # only the packed deltas are asked for: their blocks alone, no core gradients
            return (None, None,
                    _one_vs_blocks_backward_deltas.call_with(mod, k, ctx.cc, ctx.ws, g),
                    *([None] * d))
        return (None, None, None, *_one_vs_blocks_backward.call_with(mod, k, ctx.cc, ctx.ws, g))


_WEIGHTS = {}  # (k, dtype, device) -> the weights tensor of _one_vs_sum_weights(k), read only


def _weights_like(k: int, like: torch.Tensor) -> torch.Tensor:
    """:func:`_one_vs_sum_weights` as a tensor of ``like``'s dtype and device, made once for
    plain tensors outside inference mode (a constant: never written to)."""
    if type(like) is not torch.Tensor or torch.is_inference_mode_enabled():
        return like.new_tensor(_one_vs_sum_weights(k))  # fake, wrapped or inference tensors
    key = (k, like.dtype, like.device)
    w = _WEIGHTS.get(key)
    if w is None:
        w = _WEIGHTS[key] = like.new_tensor(_one_vs_sum_weights(k))
    return w


@kernels.dispatch("dense", compiled=compiled_dense.one_vs_blocks)
def _one_vs_blocks(k: int, cores: Sequence[torch.Tensor], pairs: bool = False):
    """The forward sweep of :class:`_OneVsSum` (``cores``: ``x``'s, then each term's): the
    ``k`` values ``<x, x>, <x, t_j>`` (with ``pairs`` followed by the constant pairs
    ``<t_i, t_j>``, ``1 <= i <= j < k``, row by row) and the left environments ``ws``
    (``ws[m]``: before core ``m``)."""
    d = len(cores) // k
    xs = cores[:d]
    blocks = [xs] + [cores[d * j:d * (j + 1)] for j in range(1, k)]
    ws = []
    w = xs[0].new_ones(1, k)
    for m in range(d):
        x = xs[m]
        ra, n, rc = x.shape
        t = torch.mm(w.t(), x.reshape(ra, n * rc))  # (R_S, n rc): rows by block
        ws.append(w)
        parts, row = [], 0
        for b in blocks:
            y = b[m]
            rb, _, rd = y.shape
            parts.append(torch.mm(t[row:row + rb].reshape(rb * n, rc).t(),
                                  y.reshape(rb * n, rd)))
            row += rb
        w = torch.cat(parts, 1)
    vals = w.reshape(k)
    if pairs and k > 1:
        vals = torch.cat([vals, torch.stack([_inner_sweep.torch_impl(blocks[i], blocks[j])
                                             for i in range(1, k) for j in range(i, k)])])
    return vals, ws


@kernels.dispatch("dense", compiled=compiled_dense.one_vs_blocks_backward)
def _one_vs_blocks_backward(k: int, cores: Sequence[torch.Tensor], ws: Sequence[torch.Tensor],
                            g: torch.Tensor) -> List[torch.Tensor]:
    """The reverse sweep of :class:`_OneVsSum`: the cores of ``d/dx sum_j g_j <x, block_j>``
    from the environments ``ws`` of :func:`_one_vs_blocks`."""
    d = len(cores) // k
    xs = cores[:d]
    blocks = [xs] + [cores[d * j:d * (j + 1)] for j in range(1, k)]
    z = torch.cat([2 * g[:1], g[1:]]).reshape(1, k)  # block 0: x on both sides
    dxs = [None] * d
    for m in range(d - 1, -1, -1):
        x = xs[m]
        ra, n, rc = x.shape
        rows = sum(b[m].shape[0] for b in blocks)
        u = x.new_empty(rows * n, rc)
        row = col = 0
        for b in blocks:  # u = (y_k z^T) per block, written into its rows (no copy)
            y = b[m]
            rb, _, rd = y.shape
            torch.mm(y.reshape(rb * n, rd), z[:, col:col + rd].t(),
                     out=u[row * n:(row + rb) * n])
            row, col = row + rb, col + rd
        u = u.view(rows, n * rc)
        dxs[m] = torch.mm(ws[m], u).reshape(x.shape)
        if m > 0:
            z = torch.mm(x.reshape(ra, n * rc), u.t())
    return dxs


@kernels.dispatch("dense", compiled=compiled_dense.one_vs_blocks_backward_deltas)
def _one_vs_blocks_backward_deltas(k: int, cores: Sequence[torch.Tensor],
                                   ws: Sequence[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """:func:`_one_vs_blocks_backward` for an ``x`` of tangent block cores, reduced to the
    packed gradient of the deltas (:func:`tangent_block_deltas`); compiled, only the bottom
    rows of each core's gradient are computed (half of those products) and the zero blocks
    of ``x``'s cores are skipped."""
    return tangent_block_deltas(_one_vs_blocks_backward.torch_impl(k, cores, ws, g))


def tangent_block_deltas(gs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The packed delta blocks of tensors ``gs`` laid out as the block cores of a tangent
    TT, ``[dU_1, U_1]``, ``[[V_k, 0], [dU_k, U_k]]``, ``[[V_d], [dU_d]]`` (``d >= 2``): the left
    columns of the first, the bottom-left block of the middle ones, the bottom rows of the
    last, flattened and concatenated (the gradient of the deltas from the cores' gradients).
    Differentiable (slices and one concatenation). Cost: one copy of the deltas' size."""
    d = len(gs)
    parts = [(g[g.shape[0] // 2:] if k == d - 1 else
              g[g.shape[0] // 2 if k else 0:, :, :g.shape[2] // 2]).reshape(-1)
             for k, g in enumerate(gs)]
    return torch.cat(parts)


_SOURCE_ATTR = "_ttm_packed_source"
_WANTED_ATTR = "_ttm_packed_wanted"
_VERSION = operator.attrgetter("_version")
# whether the engine's current reverse pass executes a node (False if torch lacks the test:
# then the deltas-only reverse pass is never taken)
_will_execute = getattr(torch._C, "_will_engine_execute_node", None) or (lambda node: False)


class packed_grads_only:
    """Context manager for a reverse pass that asks for the gradient of the packed deltas
    ``flat`` alone (a Riemannian gradient), not for the gradients of the tangent block cores
    built from them (:func:`mark_tangent_block_cores`): then the norm of a sum of one such
    TT and fixed TTs hands ``flat`` its gradient directly and skips the blocks of the
    cores' gradients nobody reads.

    Only reverse passes that differentiate with respect to ``flat`` (the engine executes
    its node) take that route; any other pass meanwhile (e.g. an ``autograd.grad`` of the
    block cores nested in a hook, on this thread or another) gets the cores' whole
    gradients, and so do cores with a hook or ``retain_grad``.

    Args:
        flat: the packed deltas, a non-leaf tensor (e.g. ``leaf.view_as(leaf)``: the test
            of whether a pass differentiates with respect to it reads its node). The
            caller promises that no pass in the block asks for ``flat``'s gradient and
            the block cores' own together (``riemannian_grad`` keeps ``flat`` private).
    Cost: O(1).
    """

    __slots__ = ("_flat",)

    def __init__(self, flat: torch.Tensor):
        if not isinstance(flat, torch.Tensor) or flat.grad_fn is None:
            raise ValueError("flat: expected a non-leaf tensor requiring grad (the packed "
                             "deltas, e.g. leaf.view_as(leaf))")
        self._flat = flat

    def __enter__(self):
        d = self._flat.__dict__
        d[_WANTED_ATTR] = d.get(_WANTED_ATTR, 0) + 1
        return self

    def __exit__(self, *exc):
        d = self._flat.__dict__
        d[_WANTED_ATTR] -= 1
        if not d[_WANTED_ATTR]:
            del d[_WANTED_ATTR]
        return False


def _deltas_only(src: torch.Tensor, cores: Sequence[torch.Tensor]) -> bool:
    """Whether the current reverse pass may give the packed deltas ``src`` their gradient
    directly and the block ``cores`` none: ``src`` is in a :class:`packed_grads_only` block,
    the pass differentiates with respect to it, and no hook reads a core's gradient."""
    if not src.__dict__.get(_WANTED_ATTR, 0):
        return False
    try:
        wanted = _will_execute(src.grad_fn)
    except RuntimeError:  # a pass the engine cannot tell about (e.g. a leaf under grad())
        return False
    return wanted and not any(c._backward_hooks or c.retains_grad for c in cores)


def mark_tangent_block_cores(cores: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Record that ``cores`` (single TT, ``d >= 2``) are the tangent block cores of the
    packed deltas ``flat`` (a linear function of them, the deltas at the blocks read by
    :func:`tangent_block_deltas`), so that :func:`packed_grads_only` reverse passes may
    differentiate with respect to ``flat`` directly. Cost O(d)."""
    cores[0].__dict__[_SOURCE_ATTR] = (flat, list(map(id, cores)), list(map(_VERSION, cores)))


def _packed_source(cores: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The packed deltas recorded by :func:`mark_tangent_block_cores` for exactly these
    cores, else None."""
    src = cores[0].__dict__.get(_SOURCE_ATTR) if cores else None
    # the same tensors, not modified in place since (their zero blocks are relied on)
    if src is None or src[1] != list(map(id, cores)) or src[2] != list(map(_VERSION, cores)):
        return None
    return src[0]
