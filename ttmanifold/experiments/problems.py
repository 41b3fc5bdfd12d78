"""Benchmark problems of the comparison: a loss of a tensor train plus its data.

- :class:`Approximation`: ``0.5 ||X - A||^2`` for a target TT ``A`` of higher rank;
- :class:`Completion`: ``(w/2) ||P_Omega(X - A)||^2`` on sampled entries, a random rank-r
  target (Steinlechner 2016) or the user's data (:meth:`Completion.from_data`);
- :class:`LayerTraining`: an MLP on scikit-learn's digits with one STTP layer.

Interface (:class:`Problem`): ``manifold``, ``loss(x)`` (``x`` a TT; never dense),
``metrics(x)``, ``initial_point(seed)`` (a packed point), ``target_metric`` /
``default_tol``; the quadratic problems add ``cg_grad`` / ``exact_step`` for Riemannian CG.
Data are drawn in float64 on the CPU from ``seed``, then cast and moved. Scaling, starting
points and metrics: ``docs/comparison.md``.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Dict, Optional, Tuple

import torch

from .._checks import check_float_dtype, check_shape, normalize_ranks
from ..manifold import FixedTTRank, right_cores
from ..tt import IndexSet
from ..tt import TT, inner
from ..tt import round as tt_round
from ..tt.tensor_train import fro_norm

__all__ = [
    "Problem",
    "QuadraticProblem",
    "Approximation",
    "Completion",
    "LayerTraining",
    "sample_distinct_indices",
    "power_of_two_scale",
    "inverse_sum_tt",
    "random_tt",
]


def _as_generator(seed_or_gen) -> torch.Generator:
    if isinstance(seed_or_gen, torch.Generator):
        return seed_or_gen
    g = torch.Generator(device="cpu")
    g.manual_seed(0 if seed_or_gen is None else int(seed_or_gen))
    return g


def _start_generator(generator) -> torch.Generator:
    """The generator of a start: ``generator`` itself, or for a seed (or None = 0) a stream
    distinct from the data's (which use the seed directly)."""
    if isinstance(generator, torch.Generator):
        return generator
    return _as_generator(1_000_003 * (0 if generator is None else int(generator)) + 7919)


def _resolve_dtype(dtype) -> torch.dtype:
    dtype = dtype or torch.float64
    check_float_dtype(dtype, "dtype")
    return dtype


# ---------------------------------------------------------------------------------------
# data generators
# ---------------------------------------------------------------------------------------

def random_tt(shape, ranks, *, core_dist: str = "gaussian", generator=None,
              dtype=torch.float64, device=None) -> TT:
    """A TT with i.i.d. cores (Steinlechner 2016's test tensors), normalized to unit norm.

    ``core_dist="gaussian"``: standard normal entries; ``"uniform"``: uniform on [0, 1]
    (TTeMPS's random TT: a tensor dominated by its rank-one mean part). Cores are drawn in
    float64 on the CPU, each divided by ``sqrt(r_{k-1} n_k)`` (gaussian) or ``r_{k-1} n_k / 2``
    (uniform) to keep intermediate norms O(1) for large ``d``, the tensor is scaled to
    ``||A|| = 1`` (spread evenly over the cores), then cast and moved. Ranks are clipped to
    the feasible bound with a warning. Cost O(d n r^3).
    """
    shape = check_shape(shape)
    ranks = normalize_ranks(shape, ranks, stacklevel=3)
    if core_dist not in ("gaussian", "uniform"):
        raise ValueError(f"core_dist: expected 'gaussian' or 'uniform', got {core_dist!r}")
    g = _as_generator(generator)
    cores = []
    for k, n in enumerate(shape):
        size = (ranks[k], n, ranks[k + 1])
        if core_dist == "gaussian":
            c = torch.randn(size, generator=g, dtype=torch.float64)
            c = c / math.sqrt(ranks[k] * n)
        else:
            c = torch.rand(size, generator=g, dtype=torch.float64)
            c = c / (0.5 * ranks[k] * n)
        cores.append(c)
    x = TT(cores, check=False)
    nrm = float(x.norm())
    if not math.isfinite(nrm) or nrm == 0.0:
        raise FloatingPointError("random_tt: the generated tensor has zero or non-finite norm")
    s = nrm ** (-1.0 / len(shape))
    return TT([(c * s).to(dtype=dtype, device=device) for c in cores], check=False)


def inverse_sum_tt(shape, *, rel_eps: float = 1e-12, h: float = 0.3,
                   dtype=torch.float64, device=None) -> TT:
    """The function-related tensor ``A[i] = 1 / (1 + x_1(i_1) + ... + x_d(i_d))`` in TT form,
    ``x_k(i) = i / (n_k - 1)`` a uniform grid on [0, 1], built without the dense tensor.

    Uses the exponential sum ``1/s = int_R exp(u - e^u s) du`` discretized by the trapezoidal
    rule with step ``h`` on ``u in [log(1e-14 / (1 + d)), log 45]``: a sum of about 110
    separable (rank-one) terms, assembled as a TT with diagonal cores and rounded with
    ``rel_eps``. Relative accuracy about 1e-10 for ``h = 0.3`` (checked against the dense
    tensor at small sizes in the tests); the TT-ranks after rounding grow slowly with d
    (roughly 6-12 for d <= 20, n <= 50). Cost O(d n R^3) with R ~ 110; the dense tensor is
    never formed, so any size works (e.g. d = 20, n = 50).
    """
    shape = check_shape(shape)
    d = len(shape)
    u_min = math.log(1e-14 / (1 + d))
    u_max = math.log(45.0)
    u = torch.arange(u_min, u_max + h, h, dtype=torch.float64)
    t = torch.exp(u)  # exponents
    w = h * t * torch.exp(-t)  # includes the constant 1 of s
    R = t.numel()
    cores = []
    for k, n in enumerate(shape):
        x = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
        f = torch.exp(-t.unsqueeze(1) * x.unsqueeze(0))  # (R, n)
        if k == 0:
            f = f * w.unsqueeze(1)
        if d == 1:
            cores.append(f.sum(0).reshape(1, n, 1))
        elif k == 0:
            cores.append(f.t().reshape(1, n, R))
        elif k == d - 1:
            cores.append(f.reshape(R, n, 1))
        else:
            c = torch.zeros(R, n, R, dtype=torch.float64)
            idx = torch.arange(R)
            c[idx, :, idx] = f
            cores.append(c)
    x = TT(cores, check=False)
    if d > 1:
        x = tt_round(x, rel_eps=rel_eps)
    return x.to(dtype=dtype, device=device)


def _num_entries(shape) -> int:
    out = 1
    for n in shape:
        out *= int(n)
    return out


_P1, _B1 = 2147483647, 1000003  # 2^31 - 1 and a multiplier below 2^31
_P2, _B2 = 2147483629, 999983


def _hash_rows(idx: torch.Tensor) -> torch.Tensor:
    """A 62-bit key of each row: two polynomial hashes mod primes below 2^31 (no int64
    overflow: every product stays below 2^62)."""
    h1 = torch.zeros(idx.shape[0], dtype=torch.int64)
    h2 = torch.zeros(idx.shape[0], dtype=torch.int64)
    for k in range(idx.shape[1]):
        h1 = (h1 * _B1 + idx[:, k] + 1) % _P1
        h2 = (h2 * _B2 + idx[:, k] + 1) % _P2
    return h1 * (1 << 31) + h2


def power_of_two_scale(*ts: torch.Tensor, dim=None) -> torch.Tensor:
    """The power of two at or just above the largest magnitude of the tensors ``ts`` (1 where
    they are all zero), to divide them by before sums of products: a product of entries
    of data scaled by ~1e-170 underflows to 0 in float64 (by ~1e+170 overflows), and the
    line searches and CG coefficients of such data were 0 (no progress) or NaN. Dividing by
    a power of two is exact, so ratios of the rescaled sums are bitwise those of the
    unscaled ones wherever those did not underflow or overflow.

    Args:
        ts: tensors of one dtype and device (broadcast over ``dim``'s complement).
        dim: None (one scale for all) or the dimension reduced (``-1``: one scale per row,
            kept as a trailing dimension of size 1).
    Returns:
        a tensor, 0-dim for ``dim=None``, else each tensor's shape with ``dim`` of size 1.
    Cost: one pass over each tensor; no host sync."""
    if dim is None:
        m = torch.stack([t.detach().abs().amax() for t in ts]).amax()
    else:
        m = torch.stack(torch.broadcast_tensors(
            *[t.detach().abs().amax(dim, keepdim=True) for t in ts])).amax(0)
    _, e = torch.frexp(m)  # m = f 2^e, f in [0.5, 1) (0 for m = 0: e = 0, the scale 1)
    e = e.clamp_max(int(math.log2(torch.finfo(m.dtype).max)))  # (2^1024 is inf in float64)
    return torch.ldexp(torch.ones_like(m), e)


def check_distinct(idx: torch.Tensor, shape: Tuple[int, ...], name: str = "indices") -> None:
    """Refuse repeated samples: a completion loss counts every sample once.

    Args:
        idx: ``(N, d)`` integer multi-indices within ``shape`` (any device; read on the
            host).
        shape: the tensor's shape.
        name: the argument named in the error.
    Returns:
        None; raises ``ValueError`` naming ``name`` if a multi-index repeats.
    Cost: O(N log N) (:func:`_dedupe`)."""
    idx = idx.to("cpu", torch.int64)
    if _dedupe(idx, shape).shape[0] != idx.shape[0]:
        raise ValueError(f"{name}: repeated multi-indices; average (or sum) the values "
                         "of each entry first")


def check_train_and_test(train: torch.Tensor, test: torch.Tensor, shape: Tuple[int, ...],
                         names: Tuple[str, str] = ("indices", "test")) -> None:
    """:func:`check_distinct` of the training samples, and a warning when test samples are
    also training samples (a held-out set given by hand that leaks into the training set:
    ``test_err`` would measure the fit there).

    Args:
        train: ``(N, d)`` training multi-indices (in range).
        test: ``(M, d)`` test multi-indices (in range).
        shape: the tensor's shape.
        names: how the error and the warning name the two sets (one problem of a batch:
            ``("indices[b]", "test[0][b]")``).
    Raises ``ValueError`` naming ``names[0]`` for repeated training samples; warns
    (``UserWarning``, naming ``names[1]`` and the caller of the caller) for test samples
    that are training samples.
    Cost: one sort of all samples when both hold, as the duplicate check alone;
    O((N + M) log(N + M)) on the host."""
    train, test = train.to("cpu", torch.int64), test.to("cpu", torch.int64)
    n_test = _dedupe(test, shape).shape[0]
    both = _dedupe(torch.cat([train, test]), shape).shape[0]
    if both == train.shape[0] + n_test:
        return  # distinct training samples, disjoint from the test samples
    check_distinct(train, shape, names[0])
    warnings.warn(f"{names[1]}: {train.shape[0] + n_test - both} of the {test.shape[0]} test "
                  f"samples are also training samples, so test_err measures the fit there, "
                  f"not generalization", UserWarning, stacklevel=3)


def _dedupe(idx: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """Distinct rows of ``idx`` (N, d) (sorted by key). Exact: linear indices when the
    tensor has fewer than 2^62 entries, else a 62-bit hash whose collisions (equal keys
    of different rows) are resolved by an exact ``unique(dim=0)`` on the few rows involved."""
    total = _num_entries(shape)
    if total < (1 << 62):
        strides = []
        s = 1
        for n in reversed(shape):
            strides.append(s)
            s *= n
        strides = torch.tensor(strides[::-1], dtype=torch.int64)
        key = (idx * strides).sum(1)
        _, first = _unique_first(key)
        return idx[first]
    key = _hash_rows(idx)
    uniq, first, counts = _unique_first(key, return_counts=True)
    shared = counts > 1
    if not bool(shared.any()):
        return idx[first]
    # rows whose key is shared: duplicates or genuine collisions; resolve exactly
    keep = idx[first[~shared]]
    in_shared = torch.isin(key, uniq[shared])
    exact = torch.unique(idx[in_shared], dim=0)
    return torch.cat([keep, exact], 0)


def _unique_first(key: torch.Tensor, return_counts: bool = False):
    uniq, inv, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    first = torch.full((uniq.numel(),), key.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inv, torch.arange(key.numel()), reduce="amin")
    if return_counts:
        return uniq, first, counts
    return uniq, first


def sample_distinct_indices(shape, count: int, *, generator=None) -> torch.Tensor:
    """``count`` distinct multi-indices drawn uniformly at random (an int64 tensor
    ``(count, d)`` on the CPU, in random order), without forming the ``n^d`` tensor.

    Draws i.i.d. uniform multi-indices, removes duplicates (:func:`_dedupe`: exact linear
    indices when ``n^d < 2^62``, else a 62-bit hash with an exact collision check), tops up
    until there are enough, and keeps a random subset of size ``count``. The result is a
    uniformly random ``count``-subset. When ``count`` is more than a third of all entries
    (small tensors) it takes the first ``count`` of a random permutation instead.
    Cost O(count d log count).
    """
    shape = check_shape(shape)
    g = _as_generator(generator)
    total = _num_entries(shape)
    count = int(count)
    if count < 0:
        raise ValueError(f"count: expected a non-negative int, got {count}")
    if count > total:
        raise ValueError(
            f"count: cannot draw {count} distinct entries from a tensor of shape {shape} "
            f"({total} entries)"
        )
    d = len(shape)
    if count == 0:
        return torch.zeros(0, d, dtype=torch.int64)
    if 3 * count > total:
        lin = torch.randperm(total, generator=g)[:count]
        out = torch.empty(count, d, dtype=torch.int64)
        for k in range(d - 1, -1, -1):
            out[:, k] = lin % shape[k]
            lin = lin // shape[k]
        return out
    sizes = torch.tensor(shape, dtype=torch.float64)
    have = torch.zeros(0, d, dtype=torch.int64)
    while have.shape[0] < count:
        missing = count - have.shape[0]
        # expected duplicates are about m^2 / (2 total); ask a little more than missing
        m = int(missing * (1.0 + 2.0 * count / total)) + 16
        new = (torch.rand(m, d, generator=g, dtype=torch.float64) * sizes).long()
        new = torch.minimum(new, torch.tensor(shape, dtype=torch.int64) - 1)
        have = _dedupe(torch.cat([have, new], 0), shape)
    perm = torch.randperm(have.shape[0], generator=g)[:count]
    return have[perm]


def _as_indices(x, name: str) -> torch.Tensor:
    """``x`` as an int64 ``(N, d)`` CPU tensor (a copy), or a ``TypeError``/``ValueError``
    naming ``name``."""
    t = torch.as_tensor(x).detach().to("cpu")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer multi-indices, got dtype {t.dtype}")
    if t.dim() != 2 or t.shape[1] < 1:
        raise ValueError(f"{name}: expected shape (N, d), got {tuple(t.shape)}")
    return t.to(torch.int64).clone()


def _as_values(x, n: int, name: str) -> torch.Tensor:
    """``x`` as a float64 ``(n,)`` CPU tensor of finite values."""
    t = torch.as_tensor(x).detach().to("cpu")
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64, torch.int16,
                                                      torch.int8, torch.uint8)):
        raise TypeError(f"{name}: expected real values, got dtype {t.dtype}")
    t = t.to(torch.float64).reshape(-1) if t.dim() <= 1 else t
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(torch.as_tensor(x).shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return t.clone()


def _check_in_range(idx: torch.Tensor, shape, name: str) -> None:
    lo = idx.min(0).values if idx.shape[0] else None
    if lo is not None and bool((lo < 0).any()):
        raise ValueError(f"{name}: negative index in mode {int(torch.nonzero(lo < 0)[0])}")
    if idx.shape[0]:
        hi = idx.max(0).values
        bad = hi >= torch.tensor(shape, dtype=torch.int64)
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0])
            raise ValueError(f"{name}: index {int(hi[k])} in mode {k} is out of range for "
                             f"shape {tuple(shape)}")


# ---------------------------------------------------------------------------------------
# base classes
# ---------------------------------------------------------------------------------------

class Problem:
    """A loss of a fixed-TT-rank tensor plus its data.

    Attributes
    ----------
    name : str
    manifold : FixedTTRank
    target_metric : str
        Key of :meth:`metrics` compared with a tolerance ("iterations to tol").
    default_tol : float
    quadratic : bool
        Whether :meth:`cg_grad` / :meth:`exact_step` are available (Riemannian CG).
    """

    name = "problem"
    target_metric = "loss"
    default_tol = 1e-6
    quadratic = False

    manifold: FixedTTRank

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def loss(self, x: TT) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def metrics(self, x) -> Dict[str, float]:
        return {}

    def initial_point(self, generator=None) -> torch.Tensor:
        """A random unit-norm point of :attr:`manifold` (:meth:`FixedTTRank.random`, drawn
        in float64 on the CPU from ``generator`` (a torch.Generator, or a seed mapped to a
        stream independent of the data's), then cast)."""
        p = self.manifold.random(dtype=torch.float64, generator=_start_generator(generator))
        return p.to(dtype=self.dtype, device=self.device)

    def _tt(self, x) -> TT:
        if isinstance(x, TT):
            return x
        if isinstance(x, torch.Tensor):
            return self.manifold.to_tt(x)
        raise TypeError(f"x: expected a TT or a packed point, got {type(x).__name__}")

    def dense_loss(self, full: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The loss of a dense tensor (small sizes only; a test oracle)."""
        raise NotImplementedError

    def describe(self) -> str:
        M = self.manifold
        return f"{self.name}: shape={M.shape}, ranks={M.ranks}, dim={M.dim}"


class QuadraticProblem(Problem):
    """A problem whose loss is quadratic in the ambient tensor, ``0.5 ||L(X) - b||^2``;
    provides the pieces of Riemannian CG with exact line search."""

    quadratic = True

    def cg_grad(self, p: torch.Tensor):
        """``(loss, rgrad, ctx)`` at the packed point ``p``: the loss value (0-d tensor), the
        Riemannian gradient (packed gauged deltas) computed without autodiff, and a context
        reused by :meth:`exact_step` at the same point."""
        raise NotImplementedError  # pragma: no cover

    def exact_step(self, p: torch.Tensor, eta: torch.Tensor, ctx) -> torch.Tensor:
        """The minimizer ``alpha`` of ``t -> loss(X + t eta)`` on the tangent line."""
        raise NotImplementedError  # pragma: no cover


# ---------------------------------------------------------------------------------------
# 1. approximation
# ---------------------------------------------------------------------------------------

class Approximation(QuadraticProblem):
    """``min 0.5 ||X - A||_F^2`` over TT-rank-``ranks`` tensors X, for a target TT ``A``.

    Parameters
    ----------
    target : TT
        The tensor to approximate (any ranks; normalized by the constructors below, not
        here). Its dtype and device are the problem's.
    ranks : int or sequence
        The manifold's ranks (infeasible ranks raise ``ValueError``).

    Metrics: ``rel_err = ||X - A|| / ||A||``; ``rel_err_svd``, the same for the TT-SVD
    truncation ``round(A, ranks=r)`` (computed once; quasi-optimal); ``gap = rel_err -
    rel_err_svd`` (the target metric; can be slightly negative: TT-SVD is not optimal).
    Loss: ``0.5 (||X||^2 - 2 <X, A> + ||A||^2)`` by TT inner products, O(d n r R (r + R)).
    """

    name = "approximation"
    target_metric = "gap"
    default_tol = 1e-4

    def __init__(self, target: TT, ranks):
        if not isinstance(target, TT):
            raise TypeError(f"target: expected a TT, got {type(target).__name__}")
        self.target = target
        self.manifold = FixedTTRank(target.shape, ranks)
        self._dtype = target.dtype
        self._device = target.device
        self.target_sq = inner(target, target).detach()
        self.target_norm = float(target.norm())
        if not (math.isfinite(self.target_norm) and self.target_norm > 0):
            # (a ZeroDivisionError below; the zero tensor's best fit 0 is not on M_r)
            raise ValueError(f"target: expected a nonzero finite tensor, got norm "
                             f"{self.target_norm}")
        best = tt_round(target, ranks=self.manifold.ranks)
        self.rel_err_svd = float((best - target).norm()) / self.target_norm
        self.svd_point = best

    @classmethod
    def random(cls, shape, target_rank, rank, *, noise: float = 0.1, seed=0,
               dtype=None, device=None) -> "Approximation":
        """``A = (B + noise * C) / ||.||`` with ``B`` a random unit-norm TT of rank ``rank``
        and ``C`` one of rank ``target_rank - rank`` (so A has rank ``target_rank``; the
        best rank-``rank`` error is about ``noise``). Drawn with :meth:`TT.random` in
        float64 on the CPU from ``seed``."""
        dtype = _resolve_dtype(dtype)
        shape = check_shape(shape)
        ranks = normalize_ranks(shape, rank, clip=False)
        tr = normalize_ranks(shape, target_rank, stacklevel=3)
        extra = [max(a - b, 1) for a, b in zip(tr, ranks)]
        extra[0] = extra[-1] = 1
        g = _as_generator(seed)
        B = TT.random(shape, ranks, dtype=torch.float64, generator=g)
        C = TT.random(shape, extra, dtype=torch.float64, generator=g)
        A = B + float(noise) * C
        A = A / float(A.norm())
        return cls(A.to(dtype=dtype, device=device), ranks)

    @classmethod
    def function(cls, shape, rank, *, dtype=None, device=None, rel_eps: float = 1e-12
                 ) -> "Approximation":
        """Approximate ``A[i] = 1 / (1 + sum_k x_k(i_k))`` (:func:`inverse_sum_tt`,
        normalized to ``||A|| = 1``) at rank ``rank``. Any size (no dense tensor)."""
        dtype = _resolve_dtype(dtype)
        A = inverse_sum_tt(shape, rel_eps=rel_eps, dtype=torch.float64)
        A = A / float(A.norm())
        return cls(A.to(dtype=dtype, device=device), rank)

    def loss(self, x: TT) -> torch.Tensor:
        x = self._tt(x)
        return 0.5 * (inner(x, x) - 2.0 * inner(x, self.target) + self.target_sq)

    def distance_to_data(self, x) -> float:
        """``sqrt(2 loss(x)) = ||X - A||`` without squaring (a TT norm: no underflow for
        data far below unit scale, where the loss is 0). O(d n (r + R)^3)."""
        with torch.no_grad():
            return float((self._tt(x).detach() - self.target).norm())

    def dense_loss(self, full: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((full - self.target.full()) ** 2).sum()

    def metrics(self, x) -> Dict[str, float]:
        x = self._tt(x)
        with torch.no_grad():
            rel = float((x.detach() - self.target).norm()) / self.target_norm
        return {"rel_err": rel, "rel_err_svd": self.rel_err_svd, "gap": rel - self.rel_err_svd}

    # -- CG pieces ------------------------------------------------------------------------
    def cg_grad(self, p: torch.Tensor):
        """``P_X(X - A) = X - P_X(A)``: X is the tangent vector with deltas
        ``(0, ..., 0, U_d)``; ``P_X(A)`` by two interface sweeps, O(d n r R (r + R))."""
        M = self.manifold
        with torch.no_grad():
            U = M.split(p, "p")
            grad = M.point_as_tangent(p) - M.project(p, self.target)
            x_sq = (U[-1] * U[-1]).sum()  # ||X||^2, U_1..U_{d-1} left-orthogonal
            loss = 0.5 * (x_sq - 2.0 * inner(M.to_tt(p), self.target) + self.target_sq)
        return loss, grad, grad

    def exact_step(self, p, eta, ctx) -> torch.Tensor:
        """``alpha = -<X - A, eta> / ||eta||^2 = -<grad, eta> / ||eta||^2`` (eta tangent; the
        gauged deltas are an isometry, so both inner products are of packed vectors)."""
        grad = ctx
        # on rescaled vectors: the products underflowed for data far below unit scale
        cg, ce = power_of_two_scale(grad), power_of_two_scale(eta)
        e = eta / ce
        den = (e * e).sum().clamp_min(torch.finfo(eta.dtype).tiny)
        return -((grad / cg) * e).sum() / den * (cg / ce)


# ---------------------------------------------------------------------------------------
# 2. completion
# ---------------------------------------------------------------------------------------

class Completion(QuadraticProblem):
    """Tensor completion (Steinlechner 2016): recover a random rank-r TT ``A`` from its
    entries on a random set ``Omega`` of distinct indices.

    Parameters
    ----------
    shape, rank : the tensor's shape and the TT-rank (of A and of the manifold).
    core_dist : "gaussian" or "uniform" (:func:`random_tt`); A is normalized to unit norm.
    oversampling : float
        ``|Omega| = ceil(oversampling * dim M_r)``.
    train_size : int, optional
        Overrides ``|Omega|`` (e.g. ``10**6``).
    test_size : int, optional
        ``|Gamma|``, a disjoint random test set; default ``min(|Omega|, 10000)``; 0: no
        test set (the target metric is then ``train_err``).
    seed : int
        Seeds A, Omega and Gamma (drawn on the CPU).
    dtype, device : of the problem's tensors (default float64, CPU).

    Loss ``(w/2) ||P_Omega(X - A)||^2`` with ``w = n_1...n_d / |Omega|`` (an unbiased estimate
    of ``0.5 ||X - A||^2``; the weight only rescales, the minimizers and CG's steps are
    those of the unweighted loss), evaluated by :meth:`IndexSet.gather` in O(|Omega| d r^2);
    with the Riemannian autodiff path (:meth:`FixedTTRank.unpack_tensor`) the gather of the
    tangent TT also runs at rank r on the blocked kernels of :meth:`cg_grad` (forward: left
    and right sweeps and the tangent values; backward: the scatter), about one Riemannian
    CG iteration. Metrics: ``train_err = ||P_Omega(X - A)|| / ||P_Omega A||`` and
    ``test_err`` the same on Gamma (the target metric).

    ``reg`` (default 0): an optional Tikhonov term ``(reg/2) ||X||^2`` added to the loss,
    its gradient and the exact line search (used by
    :func:`ttmanifold.experiments.solvers.homotopy_point`).
    """

    name = "completion"
    target_metric = "test_err"
    default_tol = 1e-6

    def __init__(self, shape, rank, *, core_dist: str = "gaussian", oversampling: float = 10,
                 train_size: Optional[int] = None, test_size: Optional[int] = None, seed=0,
                 dtype=None, device=None):
        dtype = _resolve_dtype(dtype)
        shape = check_shape(shape)
        self.manifold = FixedTTRank(shape, rank)
        self._dtype = dtype
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        if train_size is None:
            if not oversampling > 0:
                raise ValueError(f"oversampling: expected a positive number, got {oversampling!r}")
            train_size = int(math.ceil(oversampling * self.manifold.dim))
        train_size = int(train_size)
        if train_size < 1:
            raise ValueError(f"train_size: expected a positive int, got {train_size}")
        if test_size is None:
            test_size = min(train_size, 10000)
        test_size = int(test_size)
        if test_size < 0:
            raise ValueError(f"test_size: expected a non-negative int, got {test_size}")
        total = _num_entries(shape)
        if train_size + test_size > total:
            raise ValueError(
                f"Completion: |Omega| + |Gamma| = {train_size} + {test_size} exceeds the "
                f"{total} entries of a tensor of shape {shape}; lower oversampling or test_size"
            )
        self.core_dist = core_dist
        self.oversampling = train_size / self.manifold.dim
        g = _as_generator(seed)
        self.target = random_tt(shape, self.manifold.ranks, core_dist=core_dist, generator=g,
                                dtype=dtype, device=self._device)
        idx = sample_distinct_indices(shape, train_size + test_size, generator=g)
        train = IndexSet(idx[:train_size].to(self._device), shape)
        # test_size = 0: no test set (an empty one would report a NaN error and MSE 0)
        test = IndexSet(idx[train_size:].to(self._device), shape) if test_size else None
        with torch.no_grad():
            a_train = train.gather(self.target)
            a_test = test.gather(self.target) if test is not None else None
        self._set_data(train, a_train, test, a_test, None)

    def _set_data(self, train: IndexSet, a_train, test: Optional[IndexSet], a_test,
                  weights: Optional[torch.Tensor]) -> None:
        self.train, self.a_train = train, a_train
        self.test, self.a_test = test, a_test
        self.reg = 0.0  # optional Tikhonov weight: + (reg/2) ||X||^2 (solvers.homotopy_point)
        self.weight = _num_entries(self.manifold.shape) / len(train)
        # sqrt of the per-sample weights: a float, or (N,) in sample order
        self._sw = math.sqrt(self.weight) if weights is None else (self.weight * weights).sqrt()
        self.weights = weights
        self._a_train_norm = float(fro_norm(a_train)) if a_train.numel() else 0.0
        self._a_test_norm = (float(fro_norm(a_test)) if a_test.numel() else 0.0) \
            if test is not None else None
        if test is None:
            self.target_metric = "train_err"

    @classmethod
    def from_data(cls, indices, values, shape=None, ranks=None, *, test=None,
                  weights=None, seed=0, dtype=None, device=None) -> "Completion":
        """A completion problem on the user's data: the entries ``values[i]`` of an unknown
        tensor at the multi-indices ``indices[i]``.

        Args:
            indices: ``(N, d)`` integer multi-indices (tensor or array-like), distinct,
                ``0 <= indices[:, k] < shape[k]``.
            values: ``(N,)`` finite real values.
            shape: the tensor's shape; default ``indices.max(0) + 1``.
            ranks: the TT-ranks (required): an int (clipped to the feasible ranks of
                ``shape`` with a ``UserWarning``) or an exact tuple (``d - 1`` inner ranks
                or ``d + 1`` with the boundary ones; infeasible ranks raise ``ValueError``).
            test: a held-out set, either ``(test_indices, test_values)`` or a fraction in
                ``(0, 1)`` of the given samples drawn at random (from ``seed``) and kept out
                of training; default none (then the target metric is ``train_err``).
            weights: optional ``(N,)`` positive per-sample weights of the loss (rescaled
                to mean 1; with ``test`` a fraction, the held-out samples' weights are
                dropped).
            seed: seeds the test split and :meth:`initial_point`.
            dtype, device: of the problem's tensors (default float64, CPU).

        Returns a :class:`Completion` with ``target = None``: loss ``(w/2) sum_i
        weights_i (X[i] - values_i)^2`` (``w = n_1...n_d / N``, as for generated
        problems), metrics ``train_err`` / ``test_err`` (relative), ``train_mse`` /
        ``train_rmse`` / ``test_mse`` / ``test_rmse`` (unweighted means over the samples).
        Cost: O(N d) to check the data, O(N log N) for the duplicate check (and for a
        given test set, the check that none of its samples is a training sample: a
        ``UserWarning`` names how many are, as ``test_err`` then measures the fit, not
        generalization); the ``"perturbed"`` start is not available (it needs the true
        tensor).
        """
        dtype = _resolve_dtype(dtype)
        device = torch.device(device) if device is not None else torch.device("cpu")
        idx = _as_indices(indices, "indices")
        vals = _as_values(values, idx.shape[0], "values")
        d = idx.shape[1]
        if shape is None:
            if idx.shape[0] == 0:
                raise ValueError("shape: give the shape when there are no samples")
            shape = tuple(int(v) + 1 for v in idx.max(0).values)
        shape = check_shape(shape)
        if len(shape) != d:
            raise ValueError(f"indices: {d} columns for a tensor of order {len(shape)} "
                             f"(shape {shape})")
        _check_in_range(idx, shape, "indices")
        w = None
        if weights is not None:
            w = _as_values(weights, idx.shape[0], "weights")
            if bool((w <= 0).any()):
                raise ValueError("weights: expected positive weights")
        test_idx = test_vals = None
        if isinstance(test, (tuple, list)) and len(test) == 2:
            test_idx = _as_indices(test[0], "test[0] (indices)")
            test_vals = _as_values(test[1], test_idx.shape[0], "test[1] (values)")
            if test_idx.shape[1] != d:
                raise ValueError(f"test[0] (indices): {test_idx.shape[1]} columns, the "
                                 f"training indices have {d}")
            _check_in_range(test_idx, shape, "test[0] (indices)")
            if test_idx.shape[0] == 0:
                raise ValueError("test[0] (indices): no test samples; pass test=None for "
                                 "no test set")
        elif isinstance(test, numbers.Real) and not isinstance(test, bool):
            frac = float(test)
            if not 0.0 < frac < 1.0:
                raise ValueError(f"test: expected a fraction in (0, 1), got {test!r}")
            n = idx.shape[0]
            if n < 2:
                raise ValueError("test: a held-out fraction needs at least 2 samples")
            n_test = min(max(int(round(frac * n)), 1), n - 1)
            perm = torch.randperm(n, generator=_as_generator(seed))
            te, tr = perm[:n_test], perm[n_test:]
            test_idx, test_vals = idx[te], vals[te]
            idx, vals = idx[tr], vals[tr]
            if w is not None:
                w = w[tr]
        elif test is not None:
            raise TypeError(f"test: expected (indices, values) or a fraction in (0, 1), got "
                            f"{type(test).__name__}")
        if idx.shape[0] == 0:
            raise ValueError("indices: no training samples")
        if isinstance(test, (tuple, list)):
            check_train_and_test(idx, test_idx, shape)
        else:
            check_distinct(idx, shape, "indices")
        if ranks is None:
            raise TypeError("ranks: give the TT-ranks (an int, clipped to the feasible ranks, "
                            "or an exact tuple)")
        clip = isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool)
        full_ranks = normalize_ranks(shape, ranks, clip=clip, stacklevel=3)
        self = cls.__new__(cls)
        self.manifold = FixedTTRank(shape, full_ranks)
        self._dtype = dtype
        self._device = device
        self.core_dist = "data"
        self.target = None
        self.oversampling = idx.shape[0] / self.manifold.dim
        if w is not None:
            w = (w / w.mean()).to(dtype=dtype, device=device)
        train = IndexSet(idx.to(device), shape)
        test_set = None if test_idx is None else IndexSet(test_idx.to(device), shape)
        self._set_data(train, vals.to(dtype=dtype, device=device), test_set,
                       None if test_vals is None else test_vals.to(dtype=dtype, device=device),
                       w)
        return self

    def describe(self) -> str:
        n_test = len(self.test) if self.test is not None else 0
        return (super().describe() + f", |Omega|={len(self.train)} "
                f"({self.oversampling:.3g} x dim), |Gamma|={n_test}, "
                f"cores={self.core_dist}" + (", weighted" if self.weights is not None else ""))

    def _sw_layout(self, point):
        """sqrt of the sample weights in the last layout of ``point`` (a float when the
        samples are unweighted; cached per layout)."""
        if not isinstance(self._sw, torch.Tensor):
            return self._sw
        blk = point.layout
        cache = getattr(self, "_sw_cache", None)
        if cache is None or cache[0] is not blk or cache[1] is not self._sw:
            cache = (blk, self._sw, point.from_samples(self._sw))
            self._sw_cache = cache
        return cache[2]

    def loss(self, x: TT) -> torch.Tensor:
        x = self._tt(x)
        z = (self.train.gather(x) - self.a_train) * self._sw
        out = 0.5 * (z * z).sum()
        if self.reg:
            out = out + 0.5 * self.reg * inner(x, x)
        return out

    def distance_to_data(self, x) -> float:
        """``sqrt(2 loss(x))`` (the weighted residual's norm, with the ``reg`` term) without
        squaring: no underflow for data far below unit scale, where the loss is 0.
        O(N d r^2)."""
        x = self._tt(x).detach()
        with torch.no_grad():
            z = (self.train.gather(x) - self.a_train) * self._sw
            out = fro_norm(z) if z.numel() else z.new_zeros(())
            if self.reg:
                out = torch.hypot(out, math.sqrt(self.reg) * x.norm())
        return float(out)

    def dense_loss(self, full: torch.Tensor) -> torch.Tensor:
        idx = self.train.indices
        z = (full[tuple(idx.t())] - self.a_train) * self._sw
        out = 0.5 * (z * z).sum()
        if self.reg:
            out = out + 0.5 * self.reg * (full * full).sum()
        return out

    # -- initial points -------------------------------------------------------------------
    def initial_point(self, generator=None, kind: str = "random", **kwargs) -> torch.Tensor:
        """A starting point.

        - ``"random"``: a random unit-norm point (:meth:`Problem.initial_point`); ``||A|| = 1``.
          With ``core_dist="uniform"`` (or ``"gaussian"``): a unit-norm :func:`random_tt`
          of the manifold's ranks with cores of that law, drawn from ``generator``, as
          TTeMPS's examples start from another random TT of the same kind as the data.
        - ``"spectral"``: the TT-SVD truncation to rank r of the zero-filled, rescaled data
          ``w P_Omega(A)`` (whose expectation is A). Dense: only for tensors with at most
          ``2e7`` entries.
        - ``"homotopy"`` is not a kind here (it runs a solver): use
          :func:`ttmanifold.experiments.solvers.homotopy_point` from a random point
          (scalable; only sampled operations).
        - ``"perturbed"``: ``A + distance * ||A|| R / ||R||`` (``R`` a random rank-r TT,
          ``distance`` default 0.3) rounded to rank r (which removes part of the noise: the
          start's relative error is below ``distance``): an *oracle* start inside the basin
          of attraction, for local-convergence comparisons (uses the unknown A; say so).

        At 10 x dim M samples the random start is below the phase transition of Riemannian
        CG (d = 5, n = 10, r = 3: 1 seed in 8 recovers A, 8 in 8 at 40 x dim; d = 10,
        n = 20, r = 6: none of 3 seeds, even at 30 x dim within 300 iterations), the
        spectral start recovers A for every seed we tried at d = 5 (see the tests); the
        homotopy start recovers 6 of 8 at d = 5 and none at d = 10, n = 20 (there the
        sampled unfoldings carry almost no spectral information). From a start at relative
        distance 0.3 (``"perturbed"``) CG converges to 1e-6 in about 50 iterations at
        d = 10, n = 20, r = 6.
        """
        if kind == "random":
            core_dist = kwargs.pop("core_dist", None)
            if kwargs:
                raise TypeError(f"unexpected arguments {sorted(kwargs)}")
            if core_dist is None:
                return super().initial_point(generator)
            x = random_tt(self.manifold.shape, self.manifold.ranks, core_dist=core_dist,
                          generator=_start_generator(generator))
            return self.manifold.pack_point(x).to(dtype=self.dtype, device=self.device)
        if kind == "spectral":
            total = _num_entries(self.manifold.shape)
            if total > 2 * 10 ** 7:
                raise ValueError(
                    f"kind='spectral' forms the dense {self.manifold.shape} tensor "
                    f"({total} entries > 2e7); use solvers.homotopy_point or kind='random'"
                )
            Z = torch.zeros(self.manifold.shape, dtype=self.dtype, device=self.device)
            Z[tuple(self.train.indices.t())] = self.a_train * self.weight
            x = TT.from_dense(Z, ranks=self.manifold.ranks)
            # unchecked: sparse data can give a spectral start of lower rank
            return self.manifold.pack_point(x, check_rank=False)
        if kind == "homotopy":
            raise ValueError(
                "kind='homotopy' runs a solver: use "
                "ttmanifold.experiments.solvers.homotopy_point(problem, "
                "problem.initial_point(seed))"
            )
        if kind == "perturbed":
            if self.target is None:
                raise ValueError("kind='perturbed' needs the true tensor; a problem from data "
                                 "has none (use 'spectral' or 'random')")
            distance = float(kwargs.pop("distance", 0.3))
            if kwargs:
                raise TypeError(f"unexpected arguments {sorted(kwargs)}")
            R = self.manifold.to_tt(super().initial_point(generator))
            x = self.target + (distance * float(self.target.norm()) / float(R.norm())) * R
            return self.manifold.pack_point(x)
        raise ValueError(f"kind: expected 'random', 'spectral' or 'perturbed', "
                         f"got {kind!r}")

    def metrics(self, x) -> Dict[str, float]:
        """``train_err`` / ``test_err``: ``||X - A|| / ||A||`` on Omega / Gamma (relative);
        ``train_mse``, ``train_rmse``, ``test_mse``, ``test_rmse``: the mean squared error
        ``sum (X[i] - A[i])^2 / N`` (unweighted) and its square root (the errors and
        RMSEs by scaled norms, finite for data of any magnitude; the MSE underflows to 0
        below ~1e-308). The test entries are absent without a test set. O(N d r^2)."""
        x = self._tt(x).detach()
        out = {}
        with torch.no_grad():
            sets = [("train", self.train, self.a_train, self._a_train_norm)]
            if self.test is not None:
                sets.append(("test", self.test, self.a_test, self._a_test_norm))
            for name, iset, a, a_norm in sets:
                res = iset.gather(x) - a
                # scaled norms: the squares underflow to 0 below ~1e-154 in float64 (1e-19
                # in float32), and 0 / 0 gave a NaN error
                res_norm = float(fro_norm(res)) if res.numel() else 0.0
                n = max(len(iset), 1)
                out[f"{name}_err"] = res_norm / a_norm if a_norm else math.nan
                out[f"{name}_mse"] = float((res * res).sum()) / n
                out[f"{name}_rmse"] = res_norm / math.sqrt(n)
        order = ("train_err", "test_err", "train_mse", "train_rmse", "test_mse", "test_rmse")
        return {k: out[k] for k in order if k in out}

    # -- CG pieces ------------------------------------------------------------------------
    def _a_train_layout(self, point) -> torch.Tensor:
        """The data ``A`` on Omega in the last layout of ``point`` (cached per layout)."""
        blk = point.layout
        cache = getattr(self, "_a_layout", None)
        if cache is None or cache[0] is not blk or cache[1] is not self.a_train:
            cache = (blk, self.a_train, point.from_samples(self.a_train))
            self._a_layout = cache
        return cache[2]

    def cg_grad(self, p: torch.Tensor):
        """Loss and Riemannian gradient by the sparse projection (Steinlechner 2016), with
        the per-sample left vectors ``l_k`` (of the left-orthogonal cores U) and right
        vectors ``rho_k`` (of the right-orthogonal cores V) kept for :meth:`exact_step`.

        Kernels (:class:`~ttmanifold.tt.SampledPoint`, blocked layouts, O(|Omega| d r^2)
        each sweep): one left sweep (the last step gives the values of X), one right sweep,
        one grouped scatter per block of merged modes. Memory: the kept vectors,
        ``2 |Omega| sum_b r_b`` numbers over the blocks (plus padding), in buffers reused
        from one iteration to the next once the returned context is released."""
        M = self.manifold
        I = self.train
        with torch.no_grad():
            U = M.split(p, "p")
            V = right_cores(U)
            point = I.sampled_point(U, V)
            a = self._a_train_layout(point)
            sw = self._sw_layout(point)
            # weighted residual in the last layout; padding slots forced to 0
            z = torch.where(point.mask, point.values - a, 0.0) * sw
            D = point.project(z * sw)  # d loss / d X_Omega = w (X - A)
            grad = M.proju(p, torch.cat([c.reshape(-1) for c in D]))
            loss = 0.5 * (z * z).sum()
            xt = None
            if self.reg:
                xt = M.point_as_tangent(p)  # X as a tangent vector: deltas (0, .., 0, U_d)
                loss = loss + 0.5 * self.reg * (xt * xt).sum()
                grad = grad + self.reg * xt
        return loss, grad, _CompletionContext(point, z, xt)

    def eval_tangent(self, p: torch.Tensor, eta: torch.Tensor, ctx) -> torch.Tensor:
        """The weighted values ``sqrt(w) eta[i]``, ``i`` in Omega (in the order of
        ``train.indices``), of the tangent vector ``eta`` (packed deltas) at ``p``:
        ``sum_k l_{k-1} dU_k[i_k] rho_{k+1}`` from the kept vectors, O(|Omega| d r^2).
        ``ctx`` is the context of :meth:`cg_grad` at ``p`` (or a legacy tuple
        ``(left, rights, z, xt)`` of per-sample vector lists in sample order)."""
        M = self.manifold
        dU = M.split(eta, "eta")
        with torch.no_grad():
            if isinstance(ctx, _CompletionContext):
                return ctx.point.to_samples(ctx.point.tangent(dU)) * self._sw
            I = self.train
            left, rights = ctx[0], ctx[1]
            out = None
            for k in range(M.d):
                t = (I.left_step(k, left[k], dU[k]) * rights[k]).sum(1)
                out = t if out is None else out + t
            return out * self._sw

    def exact_step(self, p, eta, ctx) -> torch.Tensor:
        """``alpha = -<P_Omega(X - A), P_Omega eta> / ||P_Omega eta||^2`` (weighted)."""
        with torch.no_grad():
            if isinstance(ctx, _CompletionContext):
                e = ctx.point.tangent(self.manifold.split(eta, "eta")) * self._sw_layout(ctx.point)
            else:
                e = self.eval_tangent(p, eta, ctx)
            z, xt = ctx[2], ctx[3]
            # the sums on vectors rescaled by powers of two (exact): their products
            # underflowed for data far below unit scale (alpha = 0: no progress at 1e-170)
            vec, res = (e,) if xt is None else (e, eta), (z,) if xt is None else (z, xt)
            ce, cz = power_of_two_scale(*vec), power_of_two_scale(*res)
            es = e / ce
            num = ((z / cz) * es).sum()
            den = (es * es).sum()
            if xt is not None:  # regularized: + lam <X, eta>, + lam ||eta||^2
                etas = eta / ce
                num = num + self.reg * ((xt / cz) * etas).sum()
                den = den + self.reg * (etas * etas).sum()
            return -num / den.clamp_min(torch.finfo(e.dtype).tiny) * (cz / ce)


class _CompletionContext:
    """What :meth:`Completion.exact_step` reuses at a point: the sampled vectors
    (:class:`~ttmanifold.tt.SampledPoint`), the weighted residual ``z`` (in the
    point's last layout) and ``X`` as a tangent vector (regularized problems). Indexable
    like the former tuple: ``ctx[2]`` is ``z``, ``ctx[3]`` is ``xt``."""

    __slots__ = ("point", "z", "xt")

    def __init__(self, point, z, xt):
        self.point, self.z, self.xt = point, z, xt

    def __getitem__(self, i):
        return (self.point, self.point, self.z, self.xt)[i]


# ---------------------------------------------------------------------------------------
# 3. layer training (digits)
# ---------------------------------------------------------------------------------------

class LayerTraining(Problem):
    """An MLP ``64 -> hidden (STTP layer) -> ReLU -> 10`` on scikit-learn's bundled 8x8
    digits (``load_digits``, no download; pixels standardized with the training split's
    statistics), full-batch cross-entropy.

    The STTP layer (:class:`ttmanifold.nn.STTPLinear`, imported lazily: constructing this
    problem raises ``ImportError`` if :mod:`ttmanifold.nn` is absent) is trained through the
    chart (``param="chart"``, ``theta``) or on the manifold (``param="manifold"``, a geoopt
    ``ManifoldParameter``); its bias and the dense output layer are Euclidean parameters
    trained by the same optimizer. Every run starts from the same model state
    (:meth:`build_model`; the chart model is the manifold model converted by
    ``to_chart()``, the same weight).

    ``manifold`` is the layer's :class:`FixedTTRank` (the tensorized 256 x 64 weight);
    ``loss(x)`` is the training cross-entropy with the weight given by the TT ``x`` and the
    bias and output layer at their initial values; the solvers train the whole model
    (:meth:`model_loss`). Metrics: ``train_loss``, ``test_acc`` and ``test_err = 1 -
    test_acc`` (the target metric).
    """

    name = "layer"
    target_metric = "test_err"
    default_tol = 0.05

    def __init__(self, hidden: int = 256, rank: int = 4, *, test_fraction: float = 0.25,
                 spectrum: str = "learned", init: str = "random", seed=0, dtype=None,
                 device=None):
        from .. import nn as ttnn  # lazy: ImportError if the module is absent

        self._nn = ttnn
        dtype = _resolve_dtype(dtype or torch.float32)
        self._dtype = dtype
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.hidden = int(hidden)
        self.rank = int(rank)
        self.spectrum = spectrum
        self.init = init
        self.seed = 0 if seed is None else int(seed)
        from sklearn.datasets import load_digits

        data = load_digits()
        X = torch.tensor(data.data, dtype=torch.float64)
        y = torch.tensor(data.target, dtype=torch.int64)
        g = _as_generator(self.seed)
        perm = torch.randperm(X.shape[0], generator=g)
        n_test = int(round(test_fraction * X.shape[0]))
        te, tr = perm[:n_test], perm[n_test:]
        mean = X[tr].mean(0)
        std = X[tr].std(0).clamp_min(1.0)
        X = (X - mean) / std
        self.X_train = X[tr].to(dtype=dtype, device=self._device)
        self.y_train = y[tr].to(self._device)
        self.X_test = X[te].to(dtype=dtype, device=self._device)
        self.y_test = y[te].to(self._device)
        # the reference model fixes the initial state (manifold mode)
        torch.manual_seed(self.seed)
        layer = ttnn.STTPLinear(64, self.hidden, bias=True, rank=self.rank,
                                spectrum=spectrum, param="manifold", init=init,
                                dtype=dtype, device=self._device)
        head = torch.nn.Linear(self.hidden, 10, dtype=dtype, device=self._device)
        self._ref = torch.nn.Sequential(layer, torch.nn.ReLU(), head)
        self._init_state = {k: v.detach().clone() for k, v in self._ref.state_dict().items()}
        self.manifold = layer.manifold

    # -- models -----------------------------------------------------------------------------
    def build_model(self, param: str = "manifold") -> torch.nn.Module:
        """A fresh ``Sequential(STTPLinear(64, hidden, rank, param=param), ReLU,
        Linear(hidden, 10))`` at the initial state (the same function for both
        parameterizations)."""
        if param not in ("chart", "manifold"):
            raise ValueError(f"param: expected 'chart' or 'manifold', got {param!r}")
        layer = self._nn.STTPLinear(64, self.hidden, bias=True, rank=self.rank,
                                    spectrum=self.spectrum, param="manifold", init=self.init,
                                    dtype=self._dtype, device=self._device)
        head = torch.nn.Linear(self.hidden, 10, dtype=self._dtype, device=self._device)
        model = torch.nn.Sequential(layer, torch.nn.ReLU(), head)
        model.load_state_dict(self._init_state)
        if param == "chart":
            model[0].to_chart()
        return model

    def initial_point(self, generator=None) -> torch.Tensor:
        """The packed point of the STTP layer's initial weight (``generator`` is ignored:
        the initialization is fixed by the problem's seed)."""
        return self._init_state["0.point"].clone()

    def model_loss(self, model, split: str = "train") -> torch.Tensor:
        X, y = (self.X_train, self.y_train) if split == "train" else (self.X_test, self.y_test)
        return torch.nn.functional.cross_entropy(model(X), y)

    def _head(self, W: torch.Tensor) -> torch.Tensor:
        st = self._init_state
        h = torch.relu(torch.nn.functional.linear(self.X_train, W, st["0.bias"]))
        out = torch.nn.functional.linear(h, st["2.weight"], st["2.bias"])
        return torch.nn.functional.cross_entropy(out, self.y_train)

    def weight_of(self, x) -> torch.Tensor:
        """The ``hidden x 64`` weight matrix of a TT (or packed point) of the layer's
        tensorization (differentiable; through the dense tensorized weight, ``64 hidden``
        entries)."""
        return self._ref[0].tensorization.tensor_to_matrix(self._tt(x).full())

    def loss(self, x: TT) -> torch.Tensor:
        """Training cross-entropy with the layer's weight given by the TT ``x``
        (differentiable in x), the bias and the output layer at their initial values."""
        return self._head(self.weight_of(x))

    def dense_loss(self, full: torch.Tensor) -> torch.Tensor:
        """:meth:`loss` of the dense tensorized weight (the layer's ``tensor_shape``)."""
        return self._head(self._ref[0].tensorization.tensor_to_matrix(full))

    def metrics(self, x) -> Dict[str, float]:
        """``train_loss``, ``test_acc``, ``test_err`` of a model, or of a TT weight (with the
        initial bias and head)."""
        with torch.no_grad():
            if isinstance(x, torch.nn.Module):
                train_loss = float(self.model_loss(x, "train"))
                logits = x(self.X_test)
            else:
                W = self.weight_of(x)
                train_loss = float(self._head(W))
                st = self._init_state
                h = torch.relu(torch.nn.functional.linear(self.X_test, W, st["0.bias"]))
                logits = torch.nn.functional.linear(h, st["2.weight"], st["2.bias"])
            acc = float((logits.argmax(1) == self.y_test).to(torch.float64).mean())
        return {"train_loss": train_loss, "test_acc": acc, "test_err": 1.0 - acc}

    def describe(self) -> str:
        return (f"{self.name}: digits MLP 64 -> {self.hidden} (STTP rank {self.rank}, "
                f"TT ranks {self.manifold.ranks}, dim {self.manifold.dim}) -> 10, "
                f"{len(self.y_train)} train / {len(self.y_test)} test")
