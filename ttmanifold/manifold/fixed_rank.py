"""The fixed-TT-rank manifold as a ``geoopt.Manifold``: :class:`FixedTTRank`, a thin
adapter over the pure functions of :mod:`.sweeps`, :mod:`.retraction` and
:mod:`.autodiff` (as geoopt's own manifolds are thin layers over their math modules).

Points are packed tensors: the left-orthogonal cores concatenated (flat, ``size`` numbers);
tangent vectors are packed gauged deltas of the same size. Batches of points and vectors
are tensors ``(*batch, size)``, broadcast over the leading dimensions as geoopt's own
manifolds do (``docs/manifold.md#batches``). The mathematics: ``docs/manifold.md``.
"""
from __future__ import annotations

import functools
import importlib
import math
import numbers
import sys
import weakref
from typing import Callable, List, Optional, Sequence

import geoopt
import torch

from .. import kernels
from ..kernels import dense as compiled_dense
from ..kernels.memory import packed_dot
from .._checks import (assert_each_finite_async, assert_finite_async, check_float_dtype,
                       check_right_cores, check_shape, functorch_wrapped, normalize_ranks)
from ..tt import TT, BatchIndexSet, IndexSet, orthogonalize
from ..tt import round as tt_round
from ..tt.tensor_train import fro_norm
from . import autodiff, hessian
from .retraction import (block_cores, retract, retract_point, retract_small,
                         retract_transport_cores, retract_wide, small_retract_module,
                         wide_retract_module)
from .sampled_batch import project_sampled_batch
from .sweeps import (core_runs, gauge_deltas, gauge_project_flat, orth_defect,
                     prefer_fewer_launches, project_dense, project_sampled, project_tt,
                     project_tt_at_point, right_cores, right_sweep)
from . import sweeps
from .tangent import TangentTT

__all__ = ["FixedTTRank"]


def _let_aot_runtime_take_manifold_tensors() -> None:
    """Let graphs compiled through AOTAutograd (the ``aot_eager`` and ``cudagraphs``
    backends) run on the points this manifold hands out, ``geoopt.ManifoldTensor``s.

    torch 2.13 runs a compiled graph's first call under a dispatch mode (the custom-op
    aliasing check) that passes on every op with an input whose exact type is not in
    ``proxy_tensor.HANDLED_TYPES``, leaving it to that type's own ``__torch_dispatch__``.
    ManifoldTensor has none (and geoopt disables its ``__torch_function__``), so nothing
    takes the op and the first operation on the point fails with "Multiple dispatch
    failed" (pytorch/pytorch#193932; ``nn.Parameter`` is special-cased there, so
    ``ManifoldParameter`` is unaffected). The class is a plain tensor to the dispatcher,
    so it is listed with the handled types (``make_fx`` then also traces it as a plain
    tensor). The runtime module binds the tuple by name when ``torch._dynamo`` is first
    imported (about 0.9 s CPU, not forced here): the tuple is extended where it is defined
    (loaded with torch) and, if already loaded, in the runtime module. Idempotent."""
    tp = geoopt.ManifoldTensor
    if getattr(tp, "__torch_dispatch__", None) is not torch.Tensor.__torch_dispatch__:
        return  # a class with its own dispatch must keep being deferred to
    try:
        importlib.import_module("torch.fx.experimental.proxy_tensor")  # (loaded by torch)
    except ImportError:
        return
    for name in ("torch.fx.experimental.proxy_tensor",
                 "torch._functorch._aot_autograd.runtime_wrappers"):
        mod = sys.modules.get(name)
        handled = getattr(mod, "HANDLED_TYPES", None)
        if isinstance(handled, tuple) and tp not in handled:
            mod.HANDLED_TYPES = handled + (tp,)


_let_aot_runtime_take_manifold_tensors()


def _needs_grad(a) -> bool:
    return isinstance(a, (torch.Tensor, TT)) and a.requires_grad


def _plain_path(args) -> bool:
    """Whether to run without the inference-mode fast path: already in inference mode,
    tracing for torch.compile, a gradient to propagate, or functorch-wrapped tensors."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return True  # (is_compiling first: dynamo then never reaches the other checks)
    if torch.is_grad_enabled() and any(_needs_grad(a) for a in args):
        return True
    return any(isinstance(a, torch.Tensor) and functorch_wrapped(a) for a in args)


def _no_autograd_fast_path(fn=None, *, fresh_outputs: bool = False):
    """Run ``fn`` under ``torch.inference_mode`` when no gradient can flow through it,
    then return ordinary tensors (one copy of each output): skipping autograd and
    version-counter bookkeeping saves about 10-15 % of these overhead-bound small-matrix
    sweeps. The whole call runs with one intra-op thread (:class:`kernels.serial_small_ops`:
    small per-core matrices gain nothing from more, and stall when another process holds a
    core). Keyword arguments and the signature (``inspect.signature``) are kept.
    ``fresh_outputs``: ``fn`` returns only new tensors (never an argument or a view of
    one), so an output already built outside inference mode is returned without a copy
    (the retraction's packed result, :func:`~.retraction.retract`)."""
    if fn is None:
        return functools.partial(_no_autograd_fast_path, fresh_outputs=fresh_outputs)

    def ordinary(o):
        return o if fresh_outputs and not o.is_inference() else o.clone()

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(self, *args, **kwargs)
        with kernels.serial_small_ops():
            if _plain_path(list(args) + list(kwargs.values())):
                return fn(self, *args, **kwargs)
            with torch.inference_mode():
                out = fn(self, *args, **kwargs)
        if isinstance(out, tuple):
            return tuple(ordinary(o) for o in out)
        return ordinary(out)

    return wrapper


# a NaN point would spread into every delta of a projection as silently as a NaN Z
_NONFINITE_Z = "Z: contains NaN or Inf (or the point p does)"
_NONFINITE_V = "v: contains NaN or Inf (or the points x, y do)"
_NONFINITE_EGRAD = "u: gradient contains NaN or Inf"

#: Large CPU batches of the per-step methods (``retr``, ``transp``, ``retr_transp``,
#: ``proju``, ``gauge``, ``project`` of a TT or dense ``Z``) run in chunks of about this many
#: bytes per packed argument (None: one call for the whole batch), so that one chunk's
#: intermediates stay in the cache. Measured at d = 10, n = 20, B = 256, per point:
#: ``retr`` 1.30 -> 0.98 ms at r = 10 and 0.19 -> 0.15 ms at r = 4, ``project`` at one
#: point 0.49 -> 0.29 ms, ``retr_transp`` 2.27 -> 1.59 ms (r = 10); chunks of 2-8 MB did
#: about equally well. Off the CPU a batch stays one call (there, launches count).
CPU_BATCH_CHUNK_BYTES: Optional[int] = 2 << 20

#: :meth:`FixedTTRank.project` of a batch of TTs at one point runs on the CPU in slices of
#: about this many bytes of the ambient TTs (None: one pass; no slicing either when
#: :data:`CPU_BATCH_CHUNK_BYTES` is None). Its intermediates are smaller than the
#: general path's (the point's cores are not broadcast), so its slices are larger.
CPU_PROJECT_CHUNK_BYTES: Optional[int] = 8 << 20


def _chunked_on_cpu(fn):
    """Run ``fn`` on slices of a large CPU batch (:data:`CPU_BATCH_CHUNK_BYTES`) and
    concatenate the results. Only on the inference fast path of
    :func:`_no_autograd_fast_path` (no autograd graph to keep), only for one batch
    dimension, and only when every argument is recognisably batched (``(B, size)``
    packed, ``(B, *shape)`` dense, a TT of batch shape ``(B,)``, a list of cores
    ``(B, r, n, r')`` with None entries) or unbatched (None too). The concatenations are
    ordinary tensors (built outside inference mode), which the fast path of a method with
    ``fresh_outputs`` returns without copying them out."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        budget = CPU_BATCH_CHUNK_BYTES
        # (is_compiling first: dynamo cannot trace is_inference_mode_enabled)
        if (budget is None or kwargs or torch.compiler.is_compiling()
                or not torch.is_inference_mode_enabled()):
            return fn(self, *args, **kwargs)
        B, kinds = None, []
        for a in args:
            if a is None:
                kind, n = "one", None
            elif isinstance(a, TT):
                bs = a.batch_shape
                kind = "tt" if len(bs) == 1 else ("one" if not bs else None)
                n = bs[0] if len(bs) == 1 else None
            elif isinstance(a, list):  # cores (the point's right cores): one dimension each
                cs = [c for c in a if c is not None]
                lead = {c.shape[0] if c.dim() == 4 else None if c.dim() == 3 else -1 for c in cs}
                kind, n = (("one", None) if lead <= {None} else ("cores", lead.pop())
                           if len(lead) == 1 and -1 not in lead else (None, None))
            elif isinstance(a, torch.Tensor) and a.device.type == "cpu" and not a.is_sparse:
                # packed (last dimension: size; for d >= 2 no n_d equals size) or dense
                # (trailing dimensions: the shape); the leading ones are its batch
                lead = (a.dim() - 1 if a.shape[-1:] == (self.size,) else
                        a.dim() - self.d if tuple(a.shape[a.dim() - self.d:]) == self.shape
                        else -1)
                kind, n = (("one", None) if lead == 0 else ("batch", a.shape[0]) if lead == 1
                           else (None, None))
            else:
                kind, n = None, None
            if kind is None or (n is not None and B is not None and n != B):
                return fn(self, *args)
            B = n if n is not None else B
            kinds.append(kind)
        ref = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if B is None or ref is None:
            return fn(self, *args)
        step = max(1, budget // (self.size * ref.element_size()))
        if B <= step:
            return fn(self, *args)
        def part(a, k, i):
            if k == "cores":
                return [None if c is None else c[i:i + step] for c in a]
            return a if k == "one" else a[i:i + step]

        outs = [fn(self, *[part(a, k, i) for a, k in zip(args, kinds)])
                for i in range(0, B, step)]
        with compiled_dense.ordinary_outputs():
            if isinstance(outs[0], tuple):
                return tuple(torch.cat(parts) for parts in zip(*outs))
            return torch.cat(outs)

    return wrapper


_NONFINITE_METRIC = {"u": "u: contains NaN or Inf (or the metric overflows)",
                     "u, v": "u, v: contain NaN or Inf (or the metric overflows)"}


def _assert_finite_result(out: torch.Tensor, name: str) -> None:
    """The metric's check of its vectors, on its per-point result: a sum of products (or a
    scaled norm) is NaN or Inf whenever an entry is (NaN propagates, Inf times anything is
    Inf or NaN), and so is the sum over a batch, so one scalar tells what a pass over the
    vectors would: O(batch), two operations and an on-device assert (no host sync;
    ``assert_finite_async``'s four would double the cost of ``inner``)."""
    if out.device.type == "meta" or functorch_wrapped(out):
        return
    d = out.detach()
    if d.dim():
        d = d.sum()
    torch._assert_async(d * 0 == 0, _NONFINITE_METRIC[name])


def _svd_of_nonfinite_named(fn, x: torch.Tensor, u: torch.Tensor):
    """``fn()``, a retraction on the torch path. torch's SVD of a NaN/Inf matrix on the CPU
    fails with "failed to converge"; that error is said as what it is, the compiled
    kernels' message. Checked only on that error (no cost on the normal path; on a GPU the
    SVD returns NaN instead of raising); traced as ``fn()`` alone."""
    if torch.compiler.is_compiling():
        return fn()
    try:
        return fn()
    except torch.linalg.LinAlgError:
        if bool(torch.isfinite(x).all()) and bool(torch.isfinite(u).all()):
            raise
        raise RuntimeError(_NONFINITE_RETR) from None


_NONFINITE_RETR = "retr: X + u is not finite (X or u contains NaN or Inf)"


def _svd_may_pass_nonfinite(x: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether the torch path's SVDs may return NaN for a non-finite ``X + u`` instead of
    raising: off the CPU (a GPU's batched SVD returns NaN) and, on the CPU, for a batch the
    compiled batched SVD may factor (NaN in, NaN out: ``sweeps.batched_svd``). LAPACK's SVD
    on the CPU raises (said by :func:`_svd_of_nonfinite_named`), so no check runs there."""
    if x.device.type != "cpu":
        return True
    batch = math.prod(torch.broadcast_shapes(x.shape[:-1], u.shape[:-1]))
    return kernels.enabled() and batch >= sweeps.BATCHED_SVD_MIN_BATCH


def _assert_retr_finite(x, u, y, v=None, *, d: int) -> None:
    """The torch path's checks after a retraction ``y = R_x(u)`` (and of the vector ``v`` it
    transports): where the SVDs may return NaN (:func:`_svd_may_pass_nonfinite`; for
    ``d = 1`` no SVD runs, ``y = x + u``), the result ``y`` says a non-finite ``X + u`` with
    the CPU's message, before ``v``'s (as the kernels check, and as the CPU's SVD raises
    before); one fused on-device check, no host sync (``y`` alone: 3 operations; with
    ``v``: 5, one more than ``v`` alone)."""
    if d == 1 or _svd_may_pass_nonfinite(x, u):
        assert_each_finite_async([y] if v is None else [y, v],
                                 [_NONFINITE_RETR] if v is None else [_NONFINITE_RETR, _NONFINITE_V])
    elif v is not None:
        assert_finite_async(v, "v", _NONFINITE_V)


class FixedTTRank(geoopt.Manifold):
    """The manifold of tensors of shape ``shape`` with TT-rank exactly ``ranks``.

    Parameters
    ----------
    shape : sequence of ints ``(n_1, ..., n_d)``
    ranks : int, or ``d - 1`` inner ranks, or ``d + 1`` ranks with ``r_0 = r_d = 1``.
        An int above the feasible bound ``min(n_1..n_k, n_{k+1}..n_d)`` of a bond is
        clipped to it with a ``UserWarning`` (as :meth:`TT.random` does); an explicit
        rank sequence stays exact and infeasible ranks in it raise ``ValueError``.

    Attributes
    ----------
    shape, ranks, d, dim (manifold dimension), size (packed length),
    core_shapes, name = "FixedTTRank", ndim = 1, reversible = False.

    Costs below: ``n = max n_k``, ``r = max r_k``; every method is O(d n r^3) or better
    unless stated, and no method forms the dense tensor (except :meth:`project` of a dense
    ``Z``, which must read it).
    """

    name = "FixedTTRank"
    ndim = 1
    reversible = False

    def __init__(self, shape: Sequence[int], ranks):
        super().__init__()
        self.shape = check_shape(shape)
        if isinstance(ranks, (list, tuple)) and len(ranks) not in (len(self.shape) - 1,
                                                                    len(self.shape) + 1):
            raise ValueError(
                f"ranks: expected {len(self.shape) - 1} inner ranks or {len(self.shape) + 1} "
                f"ranks for shape {self.shape}, got {len(ranks)}"
            )
        self.ranks = normalize_ranks(self.shape, ranks, clip=isinstance(ranks, numbers.Integral)
                                     and not isinstance(ranks, bool))
        self.d = len(self.shape)
        # Within the feasible bound, neighbouring ranks must also be attainable
        # (r_k <= r_{k-1} n_k and r_k <= n_{k+1} r_{k+1}); otherwise M_r is empty.
        for k in range(1, self.d):
            r, lo, hi = self.ranks[k], self.ranks[k - 1] * self.shape[k - 1], \
                self.shape[k] * self.ranks[k + 1]
            if r > lo or r > hi:
                raise ValueError(
                    f"ranks: {self.ranks} cannot be attained by shape {self.shape}: r_{k} = {r} "
                    f"exceeds r_{k - 1} n_{k} = {lo} or n_{k + 1} r_{k + 1} = {hi}, so no "
                    f"tensor has exactly these TT-ranks"
                )
        self.core_shapes = [(self.ranks[k], n, self.ranks[k + 1]) for k, n in enumerate(self.shape)]
        self._sizes = [a * b * c for a, b, c in self.core_shapes]
        offsets = [0]
        for sz in self._sizes:
            offsets.append(offsets[-1] + sz)
        # runs of equal core shapes among cores 0..d-2 for the batched gauge projection:
        # ((offset, count, rows, cols) per run, offset of the last core)
        self.gauge_runs = (
            [(offsets[k0], k1 - k0, self.core_shapes[k0][0] * self.core_shapes[k0][1],
              self.core_shapes[k0][2]) for k0, k1 in core_runs(self.core_shapes[:-1])],
            offsets[-2],
        )
        self.size = sum(self._sizes)
        self._verified = {}  # id -> weakref of point tensors already checked (egrad2rgrad)
        # id -> (weakref, version, V): right cores from unpack_tensor, for the step's retr
        self._right_memo = {}
        self.dim = self.size - sum(r * r for r in self.ranks[1:-1])

    def extra_repr(self) -> str:
        return f"shape={self.shape}, ranks={self.ranks}, dim={self.dim}"

    # ------------------------------------------------------------------------------------
    # packing
    # ------------------------------------------------------------------------------------
    @property
    def core_sizes(self) -> List[int]:
        """Number of entries of each core in the packed layout (``r_{k-1} n_k r_k``)."""
        return list(self._sizes)

    def split(self, x: torch.Tensor, name: str = "x") -> List[torch.Tensor]:
        """Views of the ``d`` cores (or deltas) packed in the flat tensor ``x`` (no copy);
        for a batch ``(*batch, size)`` the cores are ``(*batch, r, n, r')``. ``name`` is
        the argument named in errors."""
        return self._split(x, name)

    def point_as_tangent(self, p: torch.Tensor) -> torch.Tensor:
        """The point X itself as a tangent vector at ``p``: packed gauged deltas
        ``(0, ..., 0, U_d)`` (per point for a batch). O(size)."""
        self._check_flat(p, "p")
        # one zero padding (one kernel) instead of zeros plus a copy into a slice
        return torch.nn.functional.pad(p[..., -self._sizes[-1]:], (self.size - self._sizes[-1], 0))

    def _small_batch(self, p: torch.Tensor, Z: TT) -> bool:
        """A cheap first test for the compiled small-rank batched projection: points in a
        batch of at least ``sweeps.SMALL_PROJECT_MIN_BATCH`` on the CPU, TT-ranks of the
        manifold at most ``sweeps.SMALL_PROJECT_MAX_RANK`` and of ``Z`` at most
        ``sweeps.SMALL_PROJECT_MAX_Z_RANK``, plain tensors (the dispatch decides the rest)."""
        mr, mz = sweeps.SMALL_PROJECT_MAX_RANK, sweeps.SMALL_PROJECT_MAX_Z_RANK
        return (p.dim() >= 2 and p.device.type == "cpu" and not torch.compiler.is_compiling()
                and math.prod(p.shape[:-1]) >= sweeps.SMALL_PROJECT_MIN_BATCH
                and max(self.ranks) <= mr and max(Z.ranks) <= mz)

    @_no_autograd_fast_path(fresh_outputs=True)
    def _project_small(self, mod, p: torch.Tensor, Z: TT) -> torch.Tensor:
        """:meth:`project` of a batch by the compiled small-rank kernel in one call (no CPU
        chunks: its intermediates live per block of points), a non-finite point or ``Z``
        detected in its result as it is written (no pass over the inputs)."""
        return sweeps.project_small(mod, self._split(p, "p"), Z.cores, check=_NONFINITE_Z)

    def _split(self, x: torch.Tensor, name: str = "x", batch: bool = True) -> List[torch.Tensor]:
        self._check_flat(x, name, batch)
        if x.dim() == 1:
            return [c.view(s) for c, s in zip(torch.split(x, self._sizes), self.core_shapes)]
        # (split_with_sizes: torch.split's Python wrapper skipped, ~1.5 us a call)
        return [c.unflatten(-1, s) for c, s in zip(x.split_with_sizes(self._sizes, -1),
                                                   self.core_shapes)]

    def _check_flat(self, x: torch.Tensor, name: str, batch: bool = True) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a packed torch.Tensor of size {self.size}")
        if x.dim() == 0 or x.shape[-1] != self.size or (x.dim() > 1 and not batch):
            also = " or a batch of them, shape (*batch, size)," if batch else ""
            raise ValueError(
                f"{name}: expected a flat tensor of size {self.size} (packed cores of shapes "
                f"{self.core_shapes}){also} got shape {tuple(x.shape)}"
            )
        check_float_dtype(x.dtype, name)

    @staticmethod
    def _cat(cores: Sequence[torch.Tensor]) -> torch.Tensor:
        if cores[0].dim() > 3 or cores[-1].dim() > 3:  # a batch: (*batch, size)
            bs = torch.broadcast_shapes(*[c.shape[:-3] for c in cores])
            return torch.cat([c.expand(bs + c.shape[-3:]).flatten(-3) for c in cores], -1)
        return torch.cat([c.reshape(-1) for c in cores])

    def pack_point(self, *tensors, check_rank: bool = True,
                   rtol: Optional[float] = None) -> torch.Tensor:
        """Pack a :class:`TT` (or its cores) into a point.

        The TT is brought to left-orthogonal form (QR sweep, ``diag(R) >= 0``). A TT of
        higher ranks is first rounded to the manifold's ranks; lower ranks or another
        shape raise ``ValueError``, non-finite cores ``RuntimeError`` (an on-device assert).

        Args:
            tensors: a :class:`TT`, a list of its cores, or the cores as arguments (plain
                or batched: a batched TT packs into ``(*batch, size)``).
            check_rank: check that the TT-rank is the manifold's: a TT whose nominal ranks
                match but whose true rank is lower (zero cores, the zero tensor, linearly
                dependent slices) represents a tensor *outside* the fixed-rank manifold; its
                packed cores would look like a point but the tangent space, projection and
                retraction are not defined there. ``ValueError`` naming the first deficient
                bond. ``False`` packs it anyway (no check, no host synchronisation).
            rtol: a bond ``k`` is deficient when the smallest singular value of the
                unfolding ``X^{<k>}`` is ``<= rtol`` times its largest; ``None`` means
                ``100 * eps(dtype)`` (numerically deficient, to rounding).

        Returns:
            the packed point ``(M.size,)`` (or ``(*batch, M.size)``), dtype/device of the cores.

        Cost: O(d n r^3); the rank check (:meth:`check_point`'s) adds an LQ sweep, ``d - 1``
        ``r x r`` singular value decompositions (O(d n r^3)) and host synchronisations
        (skipped on ``meta``).
        """
        if rtol is not None and (not isinstance(rtol, numbers.Real) or isinstance(rtol, bool)
                                 or not 0 <= rtol < 1):
            raise ValueError(f"rtol: expected a float in [0, 1) or None, got {rtol!r}")
        if not isinstance(check_rank, bool):  # ("no", None: read as true / false silently)
            raise TypeError(f"check_rank: expected True or False, got {check_rank!r}")
        if len(tensors) == 1 and isinstance(tensors[0], TT):
            x = tensors[0]
        elif len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
            x = TT(tensors[0])
        else:
            x = TT(list(tensors))
        if x.shape != self.shape:
            raise ValueError(f"tt: shape {x.shape} differs from the manifold's {self.shape}")
        # (a TT from arithmetic or to_tt skipped the constructor's check)
        assert_finite_async(x.cores, "tt")
        # a batched TT packs into a batch of points (*batch, size), every sweep batched
        if x.ranks != self.ranks:
            if any(a < b for a, b in zip(x.ranks, self.ranks)):
                raise ValueError(
                    f"tt: ranks {x.ranks} are below the manifold's {self.ranks}; such a TT is "
                    f"not a point of M_r"
                )
            x = tt_round(x, ranks=self.ranks)
        x = orthogonalize(x, "left")
        p = self._cat(x.cores)
        if check_rank:
            if rtol is None:
                rtol = 100 * torch.finfo(p.dtype).eps
            ok, why = self._check_point_on_manifold(p, atol=0.0, rtol=rtol)
            if not ok:  # (one host synchronisation per bond when it passes)
                raise ValueError(
                    f"tt: not a point of the fixed-rank manifold: {why} (an unfolding's "
                    f"smallest singular value <= rtol={rtol:.3g} times its largest; zero "
                    f"cores and the zero tensor have rank 0). Round it to lower ranks "
                    f"(ttmanifold.round) for a smaller manifold, perturb it, or pass "
                    f"check_rank=False to pack it anyway (the manifold's operations are not "
                    f"defined at it)")
        return p

    def to_tt(self, p: torch.Tensor) -> TT:
        """The rank-r TT of a point (a view of its cores; no copy); for a batch of points
        ``(*batch, size)`` a batched TT (``batch_shape`` = ``batch``)."""
        return TT(self._split(p, "p"), check=False)

    def unpack_tensor(self, p: torch.Tensor) -> TT:
        """The TT of a point, to be used in a differentiable loss (the gradient path).

        When ``p`` requires grad (and grad mode is on) the result is the rank-2r TT
        ``sum_k U_<k delta_k V_>k`` evaluated at ``delta = (0, ..., 0, U_d)`` (its value is
        X) with ``delta_k`` tied to ``p``'s k-th core: backpropagating a loss ``f`` gives
        ``p.grad`` = packed gauge-projected ``U_<k^T grad f V_>k^T`` (``U``, ``V`` the left-
        and right-orthogonal cores of X), the Riemannian
        gradient in this manifold's tangent representation. The result is a
        :class:`~ttmanifold.manifold.tangent.TangentTT`: ``inner`` with itself is the dot product
        of the packed deltas, ``inner`` with a TT of rank R one projection sweep
        (O(d n r R (r + R))), ``norm`` and scalar multiples stay structured; any other
        operation runs on the rank-2r block cores (about 4x the rank-r cost of a sweep,
        8x for terms cubic in the rank). Plus one LQ sweep (O(d n r^3)). Otherwise (no
        gradient needed, or d = 1) the plain rank-r TT is returned. A batch of points gives
        a batched TT; a loss summed over its points gives every point its own gradient.
        """
        cores = self._split(p, "p")
        if not (torch.is_grad_enabled() and p.requires_grad) or self.d == 1:
            return TT(cores, check=False)
        T = autodiff.tangent_at_point(self, p, cores)
        self._remember_right_cores(p, T.point_cores[1])
        return T

    # ------------------------------------------------------------------------------------
    # the point's right cores, shared between the loss and the optimizer step
    # ------------------------------------------------------------------------------------
    def _memo_off(self, p: torch.Tensor) -> bool:
        return (torch.compiler.is_compiling() or p.device.type == "meta"
                or functorch_wrapped(p))

    def _remember_right_cores(self, p: torch.Tensor, V) -> None:
        """Keep the right cores the loss computed at the parameter ``p`` for the optimizer
        step that follows (its ``retr``/``retr_transp`` needs them at the same point: one
        LQ sweep, ~2 operations per core, saved). Keyed by the tensor itself (a weak
        reference) and its version counter, so any in-place change of ``p`` (``copy_``,
        ``add_``, writes through views) invalidates it. Not seen: writes through
        ``p.data``, which bypass the version counter (as they bypass autograd's checks)."""
        if self._memo_off(p):
            return
        if len(self._right_memo) > 64:  # forget dead entries
            self._right_memo = {k: m for k, m in self._right_memo.items() if m[0]() is not None}
        self._right_memo[id(p)] = (weakref.ref(p), p._version, V)

    def _kept_right_cores(self, x: torch.Tensor, consume: bool = False):
        """The right cores kept by :meth:`unpack_tensor` if ``x`` is that tensor, unchanged
        since (``consume``: forget them, the step's retraction uses them once), else None."""
        if self._memo_off(x) or not self._right_memo:
            return None
        if torch.is_grad_enabled() and x.requires_grad:
            return None  # they were computed without a graph: the gradient through V needs one
        memo = (self._right_memo.pop if consume else self._right_memo.get)(id(x), None)
        if memo is not None and memo[0]() is x and memo[1] == x._version:
            return memo[2]
        return None

    def _right_cores(self, x: torch.Tensor, U, consume: bool = False):
        """The right cores of the point ``x`` (cores ``U``): the kept ones
        (:meth:`_kept_right_cores`), else one LQ sweep."""
        V = self._kept_right_cores(x, consume)
        return right_cores(U) if V is None else V

    # ------------------------------------------------------------------------------------
    # internal helpers
    # ------------------------------------------------------------------------------------
    def _tangent_tt(self, U, V, deltas, *, add_point: bool, gauged: bool = False) -> TT:
        """The rank-2r TT of ``sum_k U_<k delta_k V_>k`` (plus X if ``add_point``), as a
        :class:`~ttmanifold.manifold.tangent.TangentTT` (a plain TT for d = 1)."""
        deltas = list(deltas)
        if add_point:
            deltas[-1] = deltas[-1] + U[-1]
        if self.d == 1:  # the deltas are the tensor (broadcast with the points' batch)
            return TT([deltas[0].expand(torch.broadcast_shapes(deltas[0].shape, U[0].shape))],
                      check=False)
        return TangentTT(U, V, deltas, gauged=gauged, check=False)

    def _transport_cores(self, x, U, V, v, dv) -> List[torch.Tensor]:
        """The block cores of the tangent vector ``v`` at ``x`` for the transport: built per
        run (:func:`~.retraction.block_cores`, fewer operations) where launches dominate,
        per core (:class:`TangentTT`, cache-friendly: 4x faster on the CPU for 256
        points) else."""
        if self._fewer_launches(x, v):
            bs = tuple(torch.broadcast_shapes(x.shape[:-1], v.shape[:-1]))
            return block_cores(*[[c if c is None or tuple(c.shape[:-3]) == bs
                                  else c.expand(bs + c.shape[-3:]) for c in cores]
                                 for cores in (U, V)], [[c.expand(bs + c.shape[-3:])
                                                         for c in dv]])[0]
        return self._tangent_tt(U, V, dv, add_point=False).cores

    def _fewer_launches(self, *packed) -> bool:
        """Whether to build the rank-2r block cores per run (copies ~4x the data)."""
        return prefer_fewer_launches(packed[0].device, 4 * max(t.numel() for t in packed))

    def _gauge_packed(self, x: torch.Tensor, D) -> torch.Tensor:
        """Packed gauge projection of ``D`` (a flat tensor or a list of cores) at the
        packed point ``x`` (batched over runs of equal core shapes)."""
        if not isinstance(D, torch.Tensor):
            D = self._cat(D)
        if self.d == 1:  # no gauge: the identity, broadcast with the points' batch
            return D.expand(torch.broadcast_shapes(x.shape, D.shape)).clone()
        return gauge_project_flat(self.gauge_runs, x, D)

    def _check_vector(self, u: torch.Tensor, p: torch.Tensor, name: str = "u",
                      split: bool = True) -> Optional[List[torch.Tensor]]:
        # split=False: the checks only (callers that use the packed u)
        parts = self._split(u, name) if split else self._check_flat(u, name)
        if (u.dim() > 1 or p.dim() > 1) and u.shape[:-1] != p.shape[:-1]:
            try:
                torch.broadcast_shapes(u.shape[:-1], p.shape[:-1])
            except RuntimeError:
                raise ValueError(f"{name}: batch shape {tuple(u.shape[:-1])} does not broadcast "
                                 f"with the point's {tuple(p.shape[:-1])}") from None
        if u.dtype != p.dtype:
            raise TypeError(f"{name}: dtype {u.dtype} differs from the point's {p.dtype}")
        if u.device != p.device:
            raise ValueError(f"{name}: device {u.device} differs from the point's {p.device}")
        return parts

    # ------------------------------------------------------------------------------------
    # projections
    # ------------------------------------------------------------------------------------
    @_no_autograd_fast_path
    @_chunked_on_cpu
    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Gauge projection: ``dU_k - U_k (U_k^T dU_k)`` for ``k < d``. O(d n r^3).

        Applied to packed ``D_k`` (the adjoint of the delta map applied to an ambient
        gradient), it returns the Riemannian gradient; on a gauged tangent vector it is the
        identity. Returns a new tensor.
        """
        self._check_flat(x, "x")
        self._check_vector(u, x, split=False)
        assert_finite_async([u, x], "u", "u: contains NaN or Inf (or the point x does)")
        return self._gauge_packed(x, u)

    @_no_autograd_fast_path(fresh_outputs=True)
    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Riemannian gradient from ``p.grad`` as produced through :meth:`unpack_tensor`
        (the gauge projection :meth:`proju`; never an alias of ``u``).

        Non-finite gradients raise ``RuntimeError`` ("u: gradient contains NaN or Inf")
        through ``torch._assert_async``: no host sync, asynchronous on CUDA."""
        self._check_flat(x, "x")
        self._check_vector(u, x, split=False)
        self._verify_once(x)
        if (not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
                and (x.dim() > 1 or u.dim() > 1)):
            # the fast path (no gradient wanted) of a batch: the result allocated as an
            # ordinary tensor, returned without the fast path's copy (which cost as much as
            # the projection's kernel); no_grad, as inference mode was
            with torch.inference_mode(False), torch.no_grad():
                return self._egrad_gauged(x, u)
        return self._egrad_gauged(x, u)

    def _egrad_gauged(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """:meth:`egrad2rgrad`'s projection and check of ``u`` (proju would check again):
        on the compiled kernel its test of the result (finite whenever ``u`` is, unless it
        overflows: no pass over ``u`` on the normal path), else an assert on ``u``."""
        if self.d == 1:
            assert_finite_async(u, "u", _NONFINITE_EGRAD)
            return self._gauge_packed(x, u)
        G, finite = autodiff.gauge_project_checked(self.gauge_runs, x, u)
        if not finite:  # the torch path, or a non-finite result: then the pass over u
            # (a finite u whose projection overflows is returned as before, unflagged)
            assert_finite_async(u, "u", _NONFINITE_EGRAD)
        return G

    def _verify_once(self, x: torch.Tensor) -> None:
        """On the first Riemannian gradient at a given point tensor (an optimizer's first
        step on a ``ManifoldParameter``), assert without a host sync that its cores are
        left-orthogonal: packed cores that are not give wrong gradients silently."""
        if x.device.type == "meta" or functorch_wrapped(x) or torch.compiler.is_compiling():
            return
        key = id(x)
        ref = self._verified.get(key)
        if ref is not None and ref() is x:
            return
        if len(self._verified) > 64:  # forget dead entries
            self._verified = {k: r for k, r in self._verified.items() if r() is not None}
        self._verified[key] = weakref.ref(x)
        U = self._split(x.detach(), "x")
        defect = orth_defect(U)
        torch._assert_async(
            (defect <= max(1e-5, self._orth_tol(x.dtype))).all(),  # (an empty batch passes)
            "x: the packed cores 1..d-1 are not left-orthogonal (or not finite), so this "
            "tensor is not a point of FixedTTRank's representation (its Riemannian gradient "
            "would be wrong); "
            "build points with M.pack_point(tt), M.random() or M.projx(x)")

    def check_point(self, p: torch.Tensor, *, explain: Optional[bool] = None,
                    atol: float = 1e-5, rtol: float = 1e-5):
        """Whether ``p`` is a valid packed point: the manifold's size, finite, cores 1..d-1
        left-orthogonal (to ``max(atol, ~eps)``) and of full TT-rank (interface singular
        values above ``rtol`` times the largest).

        By default returns True for a valid point and raises ``ValueError`` (with the
        reason) otherwise. With geoopt's ``explain=False`` / ``explain=True`` it returns
        ``ok`` / ``(ok, reason)`` instead of raising (geoopt's own ``check_point`` checks
        the shape only; this one checks the point). Reads values on the host: call it on
        data you bring, not in a loop. O(d n r^3)."""
        ok, why = self._check_point_on_manifold(p, atol=atol, rtol=rtol, name="p")
        if explain is not None:
            return (ok, why) if explain else ok
        if not ok:
            raise ValueError(f"p: not a point of {self!r}: {why}")
        return True

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_verified"] = {}  # weak references do not pickle
        state["_right_memo"] = {}
        return state

    def project(self, p: torch.Tensor, Z) -> torch.Tensor:
        """Orthogonal projection of an ambient tensor onto the tangent space at ``p``.

        ``Z``: a dense tensor of the manifold's shape (cost O(n^d r)), a :class:`TT` of rank
        R (O(d n r R (r + R))) or a ``torch.sparse_coo_tensor`` of the manifold's shape with
        N stored entries (O(N d r^2); duplicates are summed; for repeated projections on one
        sampling pattern use :meth:`project_sampled` with a reusable
        :class:`~ttmanifold.IndexSet`). Returns packed gauged deltas.

        Batches: a batch of points ``(*B, size)`` and/or a batched TT ``Z`` or a batch of
        dense tensors ``(*B, *shape)`` (batch shapes broadcast) give ``(*B, size)``; a sparse
        ``Z`` needs a single point.
        """
        self._check_flat(p, "p")
        if isinstance(Z, torch.Tensor) and Z.is_sparse and p.dim() > 1:
            raise ValueError(f"Z: a sparse Z is projected at a single point, p has batch "
                             f"shape {tuple(p.shape[:-1])}; use a batched TT or dense Z")
        if isinstance(Z, TT):
            self._check_ambient(Z, p, "Z")
            self._check_batches(p.shape[:-1], Z.batch_shape, "Z")
            if self._small_batch(p, Z):
                mod = sweeps.small_project_module(self._split(p, "p"), Z.cores)
                if mod is not None:  # the SIMD kernel: one call, the result tested in it
                    return self._project_small(mod, p, Z)
            # all cores and the point at once (a fixed number of operations)
            assert_finite_async(Z.cores + [p], "Z", _NONFINITE_Z)
            if p.dim() == 1 and math.prod(Z.batch_shape) > 1 and not prefer_fewer_launches(
                    p.device, sum(c.numel() for c in Z.cores)) and (
                    not _plain_path([p, Z, Z.cores[0]])
                    or (not torch.compiler.is_compiling() and torch.is_inference_mode_enabled())):
                return self._project_tt_at_point(p, Z)
            return self._project_nonsparse(p, Z)
        if isinstance(Z, torch.Tensor) and Z.is_sparse:
            if tuple(Z.shape) != self.shape:
                raise ValueError(f"Z: sparse shape {tuple(Z.shape)} differs from {self.shape}")
            if Z.layout != torch.sparse_coo or Z.sparse_dim() != self.d:
                raise ValueError(
                    f"Z: expected a torch.sparse_coo_tensor with all {self.d} dimensions sparse "
                    f"(no hybrid dense dimensions), got layout {Z.layout} with sparse_dim "
                    f"{Z.sparse_dim() if Z.layout == torch.sparse_coo else 'n/a'}"
                )
            self._check_ambient(Z, p, "Z")
            if torch.is_grad_enabled() and Z.requires_grad:
                # _values() drops the graph; values() keeps it but needs a coalesced Z
                Z = Z.coalesce()
                vals = Z.values()
            else:
                vals = Z._values()
            idx = IndexSet.from_sparse(Z)
            assert_finite_async(vals, "Z")
            return self.project_sampled(p, idx, vals)
        if isinstance(Z, torch.Tensor):
            if tuple(Z.shape[Z.dim() - self.d:]) != self.shape:
                raise ValueError(f"Z: shape {tuple(Z.shape)} differs from the manifold's {self.shape}"
                                 f" (or a batch of them, (*batch, *shape))")
            self._check_batches(p.shape[:-1], Z.shape[:Z.dim() - self.d], "Z")
            self._check_ambient(Z, p, "Z")
            assert_finite_async([Z, p], "Z", _NONFINITE_Z)
            return self._project_nonsparse(p, Z)
        raise TypeError(f"Z: expected a dense tensor, a TT or a sparse COO tensor, got "
                        f"{type(Z).__name__}")

    @_no_autograd_fast_path(fresh_outputs=True)
    @_chunked_on_cpu
    def _project_nonsparse(self, p: torch.Tensor, Z) -> torch.Tensor:
        U = self._split(p, "p")
        if isinstance(Z, TT):
            return project_tt(U, None, Z.cores, packed=True, gauge=True)
        return self._gauge_packed(p, project_dense(U, right_cores(U), Z))

    def _project_tt_at_point(self, p: torch.Tensor, Z: TT) -> torch.Tensor:
        """:meth:`project` of a batch of TTs at one point, no gradient to keep: the batch
        folded into the products with the point's cores
        (:func:`~.sweeps.project_tt_at_point`), written into one output allocated here
        (outside inference mode, so it is returned without a copy), on the CPU in slices
        of about :data:`CPU_PROJECT_CHUNK_BYTES` of ``Z``."""
        bs = torch.broadcast_shapes(*[c.shape[:-3] for c in Z.cores])
        out = p.new_empty(tuple(bs) + (self.size,))
        B = out.numel() // max(1, self.size)
        chunk = None
        budget = CPU_PROJECT_CHUNK_BYTES
        if p.device.type == "cpu" and budget is not None and CPU_BATCH_CHUNK_BYTES is not None:
            per_tt = sum(c[(0,) * len(bs)].numel() for c in Z.cores) * p.element_size()
            chunk = max(1, budget // max(1, per_tt))
        with kernels.serial_small_ops(), torch.inference_mode():
            U = self._split(p, "p")
            cores = [c.expand(bs + c.shape[-3:]).reshape((B,) + c.shape[-3:]) for c in Z.cores]
            project_tt_at_point(U, self._right_cores(p, U), cores, gauge=True,
                                out=out.view(B, self.size), chunk=chunk)
        return out

    @staticmethod
    def _check_batches(point_batch, batch, name: str) -> None:
        """Raise ``ValueError`` naming ``name`` unless ``batch`` broadcasts with the point's."""
        if not point_batch or not batch or tuple(point_batch) == tuple(batch):
            return  # broadcasts (torch.broadcast_shapes costs ~10 us per call)
        try:
            torch.broadcast_shapes(point_batch, batch)
        except RuntimeError:
            raise ValueError(f"{name}: batch shape {tuple(batch)} does not broadcast with the "
                             f"point's {tuple(point_batch)}") from None

    def _check_ambient(self, Z, p, name):
        if Z.dtype != p.dtype:
            raise TypeError(f"{name}: dtype {Z.dtype} differs from the point's {p.dtype}")
        if Z.device != p.device:
            raise ValueError(f"{name}: device {Z.device} differs from the point's {p.device}")
        if isinstance(Z, TT) and Z.shape != self.shape:
            raise ValueError(f"{name}: shape {Z.shape} differs from the manifold's {self.shape}")

    def project_sampled(self, p: torch.Tensor, index_set: IndexSet, values: torch.Tensor,
                        *, V=None) -> torch.Tensor:
        """Projection onto the tangent space at ``p`` of the sparse tensor with ``values``
        (shape ``(N,)``, the point's dtype and device) at the samples of ``index_set``;
        ``V``: the point's right-orthogonal cores if already known. Returns packed gauged
        deltas. O(N d r^2). Non-finite ``values`` raise ``RuntimeError`` (an on-device
        assert, no host sync). For a batch of points ``(B, size)`` pass a
        :class:`~ttmanifold.tt.BatchIndexSet` (each point its own samples, ``values``
        concatenated in its order): one kernel call for the batch
        (:func:`~ttmanifold.manifold.sampled_batch.project_sampled_batch`)."""
        if isinstance(index_set, BatchIndexSet):
            return project_sampled_batch(self, p, index_set, values, V=V)
        U = self._split(p, "p", batch=False)
        if not isinstance(index_set, IndexSet):
            raise TypeError(f"index_set: expected a ttmanifold.IndexSet, got {type(index_set).__name__}")
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values: expected a tensor of shape ({len(index_set)},), got "
                            f"{type(values).__name__}")
        if values.shape != (len(index_set),):
            raise ValueError(f"values: expected shape ({len(index_set)},), got {tuple(values.shape)}")
        if values.dtype != p.dtype:
            raise TypeError(f"values: dtype {values.dtype} differs from the point's {p.dtype}")
        if values.device != p.device or index_set.device != p.device:
            raise ValueError(f"values, index_set: on {values.device} and {index_set.device}, "
                             f"the point on {p.device}")
        if tuple(index_set.shape) != self.shape:
            raise ValueError(f"index_set: shape {index_set.shape} differs from {self.shape}")
        # as project of a sparse Z: never a silent NaN (nor from a NaN point)
        assert_finite_async([values, p], "values",
                            "values: contains NaN or Inf (or the point p does)")
        V = right_cores(U) if V is None else check_right_cores(V, U)
        return self._gauge_packed(p, project_sampled(U, V, index_set, values))

    # ------------------------------------------------------------------------------------
    # tangent vectors
    # ------------------------------------------------------------------------------------
    def tangent_to_tt(self, p: torch.Tensor, u: torch.Tensor) -> TT:
        """The rank-2r TT of the tangent vector ``u`` at ``p`` (gauged or not). Non-finite
        ``p`` or ``u`` raise ``RuntimeError`` naming it (an on-device assert)."""
        U = self._split(p, "p")
        du = self._check_vector(u, p)
        assert_finite_async(p, "p")
        assert_finite_async(u, "u")
        return self._tangent_tt(U, right_cores(U), du, add_point=False)

    @_no_autograd_fast_path
    @_chunked_on_cpu
    def gauge(self, p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Gauged deltas of the tangent vector represented by arbitrary deltas ``u``.

        Unlike :meth:`proju` (which drops the non-gauged parts, the right thing for
        gradients), this moves ``U_k (U_k^T dU_k)`` into core ``k+1`` so that the tangent
        vector is unchanged. Non-finite ``p`` or ``u`` raise ``RuntimeError`` naming it (an
        on-device assert). O(d n r^3).
        """
        U = self._split(p, "p")
        du = self._check_vector(u, p)
        assert_finite_async(p, "p")
        assert_finite_async(u, "u")
        if self.d == 1:
            return self._gauge_packed(p, u)
        return self._cat(gauge_deltas(U, right_cores(U), du))

    def inner(self, x: torch.Tensor, u: torch.Tensor, v: Optional[torch.Tensor] = None, *,
              keepdim: bool = False) -> torch.Tensor:
        """Riemannian metric: Euclidean inner product of packed gauged deltas; one value
        per point for batches (shape ``batch``, or ``(*batch, 1)`` with ``keepdim``). As in
        geoopt's manifolds, ``batch`` broadcasts the batch shapes of ``x``, ``u`` and
        ``v`` (a batch of points and one vector: one value per point).

        A non-finite ``u`` or ``v`` raises ``RuntimeError`` (an on-device assert on the
        per-point results, which are non-finite exactly then: O(batch), no pass over the
        vectors, no host sync; also when a finite product overflows). The point is not read.
        Cost O(size) per point."""
        name = "u" if v is None else "u, v"
        if v is None:
            v = u
        shape = self._metric_shape(x, u, v)
        out = (u * v).sum(-1, keepdim=keepdim)
        _assert_finite_result(out, name)
        shape = shape[:-1] + (1,) * keepdim
        return out if out.shape == shape else out.expand(shape)

    def _metric_shape(self, x, u, v) -> tuple:
        """The broadcast shape ``(*batch, size)`` of the point ``x`` and the vectors ``u``,
        ``v`` of :meth:`inner` and :meth:`component_inner` (checked by :meth:`_check_pair`);
        ``ValueError`` naming ``x`` when its batch shape does not broadcast with theirs, and
        naming ``u`` when its dtype or device is not the point's (the metric does not read
        the point, so such a mix passed silently)."""
        self._check_pair(u, v)
        self._check_flat(x, "x")
        if u.dtype != x.dtype:
            raise TypeError(f"u: dtype {u.dtype} differs from the point's {x.dtype}")
        if u.device != x.device:
            raise ValueError(f"u: device {u.device} differs from the point's {x.device}")
        if x.shape == u.shape == v.shape:
            return tuple(u.shape)
        try:
            return tuple(torch.broadcast_shapes(x.shape, u.shape, v.shape))
        except RuntimeError:
            raise ValueError(f"x: batch shape {tuple(x.shape[:-1])} does not broadcast with "
                             f"the vectors' {tuple(torch.broadcast_shapes(u.shape, v.shape)[:-1])}"
                             ) from None

    def _check_pair(self, u, v) -> None:
        """Raise naming ``u, v`` unless both are packed tensors of one dtype and device
        whose batches broadcast."""
        if v is u and not (isinstance(u, torch.Tensor) and u.shape[-1:] == (self.size,)):
            # one vector (norm, inner(x, u)): named alone
            self._check_flat(u, "u")
        if not isinstance(u, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise TypeError(f"u, v: expected packed tangent vectors (tensors), got "
                            f"{type(u).__name__} and {type(v).__name__}")
        if u.dtype != v.dtype or u.device != v.device:
            raise TypeError(f"u, v: {u.dtype} on {u.device} and {v.dtype} on {v.device}; "
                            f"expected one dtype and device")
        if u.shape[-1:] != (self.size,) or v.shape[-1:] != (self.size,):
            raise ValueError(
                f"u, v: expected packed tangent vectors of size {self.size}, got shapes "
                f"{tuple(u.shape)} and {tuple(v.shape)}"
            )
        if u.shape != v.shape:
            try:
                torch.broadcast_shapes(u.shape, v.shape)
            except RuntimeError:
                raise ValueError(f"u, v: batch shapes {tuple(u.shape[:-1])} and "
                                 f"{tuple(v.shape[:-1])} do not broadcast") from None

    def component_inner(self, x: torch.Tensor, u: torch.Tensor,
                        v: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Second-moment statistic for RiemannianAdam: ``<u, v>`` broadcast over the whole
        packed vector (constant on every core, so Adam's direction stays tangent).

        Why not one value per core: geoopt transports Adam's first moment but not its
        second; how a tangent vector's mass splits among the cores depends on the point's
        gauge, so per-core second moments go stale and transported momentum that leaks
        into a core with a tiny second moment takes a huge step (observed: divergence on
        a rank-4 approximation). A single value per point is gauge invariant; for a batch,
        one value per point (never pooled over the batch), so every point's Adam step is
        the one it takes alone.

        A non-finite ``u`` or ``v`` raises ``RuntimeError`` as in :meth:`inner` (checked on
        the per-point values). Returns a broadcast view of the per-point values (shape
        ``(*batch, size)``, stride 0 along the packed vector): read-only, as the optimizers
        use it (``clone`` it to write into it). Cost O(size) per point.
        """
        name = "u" if v is None else "u, v"
        if v is None:
            v = u
        shape = self._metric_shape(x, u, v)
        # (a large CPU batch: products in cache-sized slices). Not materialized: Adam's
        # add_ reads the view; a (B, size) copy cost a fresh write and a read every step
        val = packed_dot(u, v).unsqueeze(-1)
        _assert_finite_result(val, name)
        return val.expand(shape)

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """Riemannian norm ``sqrt(<u, u>)``, one per point for batches; scaled, so it neither
        overflows nor underflows where ``<u, u>`` would (``||u||`` beyond ~1e154 or below
        ~1e-154 in float64, 1e19 and 1e-19 in float32). A non-finite ``u`` raises
        ``RuntimeError`` as in :meth:`inner`. O(size)."""
        shape = self._metric_shape(x, u, u)[:-1] + (1,) * keepdim
        out = fro_norm(u, u.dim() - 1)
        _assert_finite_result(out, "u")
        out = out.unsqueeze(-1) if keepdim else out
        return out if out.shape == shape else out.expand(shape)

    # ------------------------------------------------------------------------------------
    # retraction and transport
    # ------------------------------------------------------------------------------------
    @_no_autograd_fast_path(fresh_outputs=True)
    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Retraction ``R_X(xi) = round_r(X + xi)`` (TT-SVD of the rank-2r TT). O(d n r^3).

        ``u`` may be non-gauged deltas. The result is left-orthogonal. A NaN or Inf in
        ``x`` or ``u`` raises ``RuntimeError`` ("retr: X + u is not finite ...") on every
        device: the compiled kernels test their results and the CPU's SVD fails on them;
        where the SVD returns NaN instead (a GPU's, the compiled batched SVD of a CPU
        batch) one on-device assert tests the result (no host sync; 3 operations).
        """
        if x.dim() > 1 or u.dim() > 1:
            U, du = self._split(x, "x"), self._check_vector(u, x)
            mod = small_retract_module(U, du, self.ranks)
            if mod is not None:  # the small-rank SIMD kernel: the whole batch, one call
                # (the kept right cores skip its LQ sweep; else it runs its own)
                return retract_small(mod, U, du, self.ranks,
                                     self._kept_right_cores(x, consume=True))
            mod = wide_retract_module(U, du, self.ranks)
            if mod is not None:  # ranks up to 12: the SIMD kernel of runtime width (as above)
                return retract_wide(mod, U, du, self.ranks,
                                    self._kept_right_cores(x, consume=True))
        # the kept right cores taken here: the CPU chunks are slices the memo does not know
        return self._retr(x, u, self._kept_right_cores(x, consume=True))

    @_chunked_on_cpu
    def _retr(self, x: torch.Tensor, u: torch.Tensor, V) -> torch.Tensor:
        U = self._split(x, "x")
        du = self._check_vector(u, x)
        if V is None:
            y = _svd_of_nonfinite_named(lambda: retract_point(U, du, self.ranks), x, u)
        else:
            y = _svd_of_nonfinite_named(lambda: retract(U, V, du, self.ranks), x, u)
        _assert_retr_finite(x, u, y, d=self.d)
        return y

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Not available: the fixed-TT-rank manifold has no closed-form exponential map
        (geoopt's convention: an exact map or ``NotImplementedError``). Use :meth:`retr`, a
        second-order retraction; geoopt's optimizers call ``retr``/``retr_transp``."""
        raise NotImplementedError(
            "FixedTTRank has no closed-form exponential map; use retr (a second-order "
            "retraction), as geoopt's optimizers do")

    @_no_autograd_fast_path(fresh_outputs=True)
    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Vector transport by projection ``P_Y(xi)`` of ``v`` at ``x`` to ``y``.
        ``v`` may be non-gauged. Non-finite ``v`` (or points) raise ``RuntimeError`` (an
        on-device assert, no host sync). O(d n r^3). A CPU batch of small TT-ranks
        projects in one compiled call (:meth:`retr_transp`)."""
        if x.dim() > 1 or y.dim() > 1 or v.dim() > 1:
            Ux, dv = self._split(x, "x"), self._check_vector(v, x, "v")
            Uy = self._check_vector(y, x, "y")
            out = self._transport_small(x, Ux, None, v, dv, Uy)
            if out is not None:
                return out
        return self._transp(x, y, v)

    @_chunked_on_cpu
    def _transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        Ux = self._split(x, "x")
        dv = self._check_vector(v, x, "v")
        Uy = self._check_vector(y, x, "y")  # (shape, batch, dtype and device)
        # one fused check (a fixed number of operations)
        assert_finite_async([v, x, y], "v", _NONFINITE_V)
        if self.d == 1:
            return v.expand(torch.broadcast_shapes(x.shape, v.shape, y.shape)).clone()
        xi = self._transport_cores(x, Ux, self._right_cores(x, Ux), v, dv)
        return project_tt(Uy, None, xi, packed=True, gauge=True)  # its LQ sweep inside

    @_no_autograd_fast_path(fresh_outputs=True)
    def retr_transp(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
        """``(retr(x, u), transp(x, retr(x, u), v))`` sharing the work at ``x``.

        A CPU batch of TT-rank at most 12 (``retraction.WIDE_RETRACT_MAX_RANK``; the
        rank-2r TT of ``v`` at most ``sweeps.SMALL_PROJECT_MAX_Z_RANK``) runs as two compiled
        calls over the whole batch, SIMD across the points: the retraction
        (:func:`~.retraction.retract_small`, above rank 4
        :func:`~.retraction.retract_wide`) and the projection of ``v`` at the new points
        (:func:`~.sweeps.transport_small`, ``v``'s rank-2r block cores assembled in cache);
        other batches run in CPU chunks.
        Non-finite ``v`` raise ``RuntimeError`` ("v: contains NaN or Inf"); a non-finite
        point or ``u`` raises ``RuntimeError`` ("retr: X + u is not finite") on every
        device, as in :meth:`retr` (checked before ``v``). O(d n r^3)."""
        if x.dim() > 1 or u.dim() > 1 or v.dim() > 1:
            out = self._retr_transp_small(x, u, v)
            if out is not None:
                return out
        # the right cores kept by the loss, taken here: the CPU chunks below are slices
        # of x, which the memo does not know (each chunk ran the LQ sweep again)
        return self._retr_transp(x, u, v, self._kept_right_cores(x, consume=True))

    @_chunked_on_cpu
    def _retr_transp(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, V):
        U = self._split(x, "x")
        du = self._check_vector(u, x)
        dv = self._check_vector(v, x, "v")
        # (a non-finite x or u fails the retraction's SVD, said by _svd_of_nonfinite_named,
        # or gives a non-finite y: both checked with v's after the retraction)
        V = right_cores(U) if V is None else V
        if self.d > 2 and self._fewer_launches(x, u, v):  # both block-core sets at once
            y, xi = _svd_of_nonfinite_named(
                lambda: retract_transport_cores(U, V, du, dv, self.ranks), x, u)
            _assert_retr_finite(x, u, y, v, d=self.d)
            return y, project_tt(self._split(y, "y"), None, xi, packed=True, gauge=True)
        y = _svd_of_nonfinite_named(lambda: retract(U, V, du, self.ranks), x, u)
        _assert_retr_finite(x, u, y, v, d=self.d)
        ycores = self._split(y, "y")
        if self.d == 1:
            return y, v.expand(torch.broadcast_shapes(v.shape, y.shape)).clone()
        xi = self._transport_cores(x, U, V, v, dv)
        return y, project_tt(ycores, None, xi, packed=True, gauge=True)

    def _retr_transp_small(self, x, u, v):
        """:meth:`retr_transp` of a batch by the compiled small-rank kernels, or None (before
        any work) when the retraction's kernel does not take it (its dispatch decides on
        shapes, dtype, device and grad)."""
        U = self._split(x, "x")
        du = self._check_vector(u, x)
        dv = self._check_vector(v, x, "v")
        mod = small_retract_module(U, du, self.ranks)  # (None for d = 1)
        wide = mod is None
        if wide:  # ranks 5-12: the kernel of runtime width
            mod = wide_retract_module(U, du, self.ranks)
            if mod is None:
                return None
        # the right cores kept by the loss (unpack_tensor), else one LQ sweep: the
        # retraction's and the transport's (the kernel skips its own; a non-finite point
        # gives non-finite cores, and the retraction raises)
        V = self._right_cores(x, U, consume=True)
        # (raises on a non-finite x or u)
        y = (retract_wide if wide else retract_small)(mod, U, du, self.ranks, V)
        Uy = self._split(y, "y")
        t = self._transport_small(x, U, V, v, dv, Uy)
        if t is None:  # the projection's kernel declines (its limits): the torch sweeps
            assert_finite_async(v, "v", _NONFINITE_V)
            t = project_tt(Uy, None, self._transport_cores(x, U, V, v, dv), packed=True,
                           gauge=True)
        return y, t

    def _transport_small(self, x, U, V, v, dv, Uy) -> Optional[torch.Tensor]:
        """``P_Y`` of the tangent vector ``v`` at ``x`` (cores ``U``; right cores ``V``, or
        None: computed here) at the points ``Uy``: the compiled batched transport
        (:func:`~.sweeps.transport_small`: its rank-2r block cores assembled in cache, never
        in memory), else those block cores built and projected by the compiled small-rank
        batched projection; one call for the batch, which detects a non-finite ``v`` or
        point in the result as it writes it. None (before any work)
        unless the points ``Uy`` hold the whole batch (at least
        ``sweeps.SMALL_PROJECT_MIN_BATCH`` of them) on the CPU with ``r`` within
        ``sweeps.SMALL_PROJECT_MAX_RANK`` and ``2 r`` within ``SMALL_PROJECT_MAX_Z_RANK``."""
        bs = Uy[0].shape[:-3]
        if (self.d < 2 or Uy[0].device.type != "cpu" or torch.compiler.is_compiling()
                or bs.numel() < sweeps.SMALL_PROJECT_MIN_BATCH
                or max(self.ranks) > sweeps.SMALL_PROJECT_MAX_RANK
                or 2 * max(self.ranks) > sweeps.SMALL_PROJECT_MAX_Z_RANK
                or ((x.shape[:-1] != bs or v.shape[:-1] != bs)
                    and torch.broadcast_shapes(bs, x.shape[:-1], v.shape[:-1]) != bs)):
            return None
        V = self._right_cores(x, U) if V is None else V
        mod = sweeps.small_transport_module(Uy, U, V, dv)
        if mod is not None:  # xi's block cores assembled inside, never in memory
            return sweeps.transport_small(mod, Uy, U, V, dv, check=_NONFINITE_V)
        xi = self._transport_cores(x, U, V, v, dv)
        mod = sweeps.small_project_module(Uy, xi)
        if mod is None:  # (grad, dtype: the dispatch's other conditions) the torch sweeps
            assert_finite_async([v, x] + list(Uy), "v", _NONFINITE_V)
            return project_tt(Uy, None, xi, packed=True, gauge=True)
        return sweeps.project_small(mod, Uy, xi, check=_NONFINITE_V)

    def transp_follow_retr(self, x, u, v):
        return self.retr_transp(x, u, v)[1]

    def expmap_transp(self, x, u, v):
        """Not available: raises ``NotImplementedError`` as :meth:`expmap` does; use
        :meth:`retr_transp`."""
        return self.expmap(x, u)

    def transp_follow_expmap(self, x, u, v):
        """Not available: raises ``NotImplementedError`` as :meth:`expmap` does; use
        :meth:`transp_follow_retr`."""
        return self.expmap(x, u)

    def logmap(self, x, y):
        """Not available: the inverse of the retraction has no closed form
        (``NotImplementedError``); :meth:`dist` gives the chordal distance."""
        raise NotImplementedError("FixedTTRank has no closed-form logarithmic map")

    def dist(self, x, y, *, keepdim=False):
        """Euclidean (chordal) distance ``||X - Y||_F`` of the embedded tensors (not the
        geodesic distance, which has no closed form here); one per point for batches.
        O(d n r^3)."""
        X = self.to_tt(x)
        self._check_vector(y, x, "y")
        assert_finite_async([x, y], "x, y")
        out = (X - self.to_tt(y)).norm()
        return out.unsqueeze(-1) if keepdim else out

    # ------------------------------------------------------------------------------------
    # points
    # ------------------------------------------------------------------------------------
    def _orth_tol(self, dtype) -> float:
        return 64 * torch.finfo(dtype).eps * math.sqrt(max(self.ranks) * max(self.shape))

    @_no_autograd_fast_path
    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Put a packed tensor on the manifold (left-orthogonal QR sweep).

        A point that already is left-orthogonal to a dtype-dependent tolerance is returned
        unchanged bit for bit (a new tensor), so calling ``projx`` on every step, as recent
        geoopt optimizers do, never perturbs valid points. On the CPU (eager) that costs
        one Gram matrix per core: the QR sweep runs only when some point needs it. On
        other devices, under ``torch.compile`` and under ``vmap`` the choice is a
        ``torch.where`` on the device (no host sync), and the sweep always runs. A tensor
        whose cores are rank deficient stays rank deficient: projx does not restore the
        rank.
        """
        U = self._split(x, "x")
        assert_finite_async(x, "x")
        ok = orth_defect(U) <= self._orth_tol(x.dtype)
        if (x.device.type == "cpu" and not prefer_fewer_launches(x.device, 0)
                and not torch.compiler.is_compiling() and not functorch_wrapped(x)
                and bool(ok.all())):
            # reading the flags on the CPU waits for no device, and the sweep was 5-13 % of
            # ttmanifold.optim's Adam step at r = 4-10; the GPU's path (forced for
            # counting) keeps the where
            return x.clone()
        reorth = self._cat(orthogonalize(TT(U, check=False), "left").cores)
        return torch.where(ok if ok.dim() == 0 else ok.unsqueeze(-1), x, reorth)

    def _check_shape(self, shape, name):
        if len(shape) < 1 or shape[-1] != self.size:
            return False, (
                f"`{name}` should be a flat tensor of size {self.size} (packed cores "
                f"{self.core_shapes}), got shape {tuple(shape)}"
            )
        return True, None

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5, name: str = "x"):
        self._check_flat(x, name)  # (a list read .detach: AttributeError)
        x = x.detach()
        U = self._split(x, name)
        if x.device.type == "meta":
            return True, None
        def at(bad):  # which point of a batch fails first (per-point mask ``bad``)
            return "" if bad.dim() == 0 else f" at point {tuple(bad.nonzero()[0].tolist())}"

        bad = ~torch.isfinite(x).all(-1)
        if bool(bad.any()):
            return False, "point has non-finite entries" + at(bad)
        defect = orth_defect(U)
        bad = defect > max(atol, self._orth_tol(x.dtype))
        if bool(bad.any()):
            return False, (f"cores 1..d-1 are not left-orthogonal (defect "
                           f"{float(defect.max()):.3g}){at(bad)}")
        # exact rank: the interface factors L_k of the right sweep must be nonsingular
        for k, _, r in right_sweep(U):  # (unsigned factors: same singular values)
            sv = torch.linalg.svdvals(r)  # per point for a batch
            mx = sv.amax(-1)
            bad = (sv.amin(-1) <= rtol * mx) | (mx == 0)
            if bool(bad.any()):
                return False, f"TT-rank at bond {k} is below {self.ranks[k]}{at(bad)}"
        return True, None

    # geoopt's checks read the arguments' ``.shape`` first: a list gave an AttributeError;
    # these say which argument is not a tensor (TypeError), then run geoopt's check
    def _require_tensors(self, **args) -> None:
        for name, t in args.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a packed torch.Tensor of size {self.size}, "
                                f"got {type(t).__name__}")

    def assert_check_point(self, x):
        """geoopt's shape check of a point; ``TypeError`` naming ``x`` if not a tensor."""
        self._require_tensors(x=x)
        return super().assert_check_point(x)

    def check_vector(self, u, *, explain=False):
        """geoopt's shape check of a vector; ``TypeError`` naming ``u`` if not a tensor."""
        self._require_tensors(u=u)
        return super().check_vector(u, explain=explain)

    def assert_check_vector(self, u):
        """geoopt's shape check of a vector; ``TypeError`` naming ``u`` if not a tensor."""
        self._require_tensors(u=u)
        return super().assert_check_vector(u)

    def check_point_on_manifold(self, x, *, explain=False, atol=1e-5, rtol=1e-5):
        """geoopt's check of a point (:meth:`check_point` says what is checked);
        ``TypeError`` naming ``x`` if not a tensor."""
        self._require_tensors(x=x)
        return super().check_point_on_manifold(x, explain=explain, atol=atol, rtol=rtol)

    def check_vector_on_tangent(self, x, u, *, ok_point=False, explain=False, atol=1e-5,
                                rtol=1e-5):
        """geoopt's check of a tangent vector ``u`` at ``x`` (the gauge condition, finite
        entries, the point's batch, dtype and device); ``TypeError`` naming ``x`` or ``u``
        if not a tensor."""
        self._require_tensors(x=x, u=u)
        return super().check_vector_on_tangent(x, u, ok_point=ok_point, explain=explain,
                                               atol=atol, rtol=rtol)

    def assert_check_vector_on_tangent(self, x, u, *, ok_point=False, atol=1e-5, rtol=1e-5):
        """As :meth:`check_vector_on_tangent`, raising ``ValueError`` with the reason."""
        self._require_tensors(x=x, u=u)
        return super().assert_check_vector_on_tangent(x, u, ok_point=ok_point, atol=atol,
                                                      rtol=rtol)

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        U = self._split(x, "x")
        try:  # a vector of another batch, dtype or device is not tangent at x: say why
            du = self._check_vector(u, x)
        except (TypeError, ValueError) as exc:
            return False, str(exc)
        if u.device.type == "meta":
            return True, None
        def at(bad):  # which point of a batch fails first (per-point mask ``bad``)
            return "" if bad.dim() == 0 else f" at point {tuple(bad.nonzero()[0].tolist())}"

        bad = ~torch.isfinite(u).all(-1)
        if bool(bad.any()):
            return False, "vector has non-finite entries" + at(bad)
        # per point: a batch passes exactly when every point passes alone (one scale for
        # the whole batch let a large vector loosen the test of a small one)
        scale = u.abs().amax(-1).clamp_min(1.0)
        for k in range(self.d - 1):
            a, n, b = self.core_shapes[k]
            ul = U[k].reshape(U[k].shape[:-3] + (a * n, b))
            g = ul.mT @ du[k].reshape(du[k].shape[:-3] + (a * n, b))
            err = g.abs().amax((-2, -1))
            bad = err > atol + rtol * scale
            if bool(bad.any()):
                return False, (f"core {k} violates the gauge condition U^T dU = 0 (max "
                               f"{float(err.max()):.3g}){at(bad)}")
        return True, None

    def _batch_size(self, size) -> tuple:
        """The batch shape requested by geoopt's ``*size``: ``()`` or ``(size,)`` one point;
        ``(*batch, size)`` (geoopt's convention) or one int ``B`` a batch."""
        explicit = len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size))
        if explicit:
            size = tuple(size[0])
        ok = all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in size)
        if ok and size and size[-1] == self.size:
            return tuple(size[:-1])
        if ok and len(size) == 1:
            return tuple(size)
        if not explicit and size == ():
            return ()
        raise ValueError(
            f"size: a point of {self.name} is one flat tensor of size {self.size}; a batch is "
            f"(*batch, {self.size}) or one int (the number of points); got size {size}")

    def random(self, *size, dtype=None, device=None, generator=None, **kwargs) -> torch.Tensor:
        """A random point: :meth:`TT.random` (unit norm, well conditioned), packed.

        ``size``: empty or ``(self.size,)`` for one point; ``(*batch, self.size)`` (geoopt's
        convention) or one int ``B`` for a batch of independent points ``(*batch, size)``
        (one batched draw: every QR batched). Other keyword arguments (geoopt's signature
        has ``**kwargs``) are a ``TypeError``: a misspelt ``dtype`` drew float32 silently,
        and geoopt's ``std``/``mean`` do not apply (points have unit norm).
        """
        if kwargs:
            raise TypeError(f"random: unexpected keyword argument(s) {', '.join(sorted(kwargs))} "
                            f"(takes dtype, device, generator)")
        batch = self._batch_size(size)
        x = TT.random(self.shape, self.ranks, dtype=dtype, device=device, generator=generator,
                      batch=batch)
        return geoopt.ManifoldTensor(self._cat(x.cores), manifold=self)

    random_normal = random

    def origin(self, *size, dtype=None, device=None, seed=None) -> torch.Tensor:
        """A fixed, deterministic point: :meth:`TT.random` (orthonormal frames, unit norm)
        drawn in float64 on the CPU from a generator seeded with ``seed`` (default 0), then
        cast to ``dtype`` and moved to ``device`` (default: torch's default device). Same
        point for every dtype and device.
        ``size`` as for :meth:`random`: a batch repeats this point.

        (Structured frames such as DCT columns are not used: reshaped into cores they can
        have low-rank unfoldings, e.g. a cosine of a linear phase is a rank-2 matrix, which
        gave tensors of lower TT-rank, i.e. not points of M_r.)
        """
        batch = self._batch_size(size) if size else ()
        dtype = dtype or torch.get_default_dtype()
        check_float_dtype(dtype, "dtype")
        gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
        # on the CPU explicitly: in a default-device context (``with torch.device(...)``)
        # the draw moved there (another point; on CUDA a generator mismatch)
        x = TT.random(self.shape, self.ranks, dtype=torch.float64, device="cpu", generator=gen)
        device = torch.get_default_device() if device is None else device
        p = self._cat(x.cores).to(dtype=dtype, device=device)
        if batch:  # the same point at every position of the batch (a copy each)
            p = p.expand(batch + (self.size,)).clone()
        return geoopt.ManifoldTensor(p, manifold=self)

    # ------------------------------------------------------------------------------------
    # Riemannian autodiff
    # ------------------------------------------------------------------------------------
    def riemannian_grad(self, p: torch.Tensor, f: Callable[[TT], torch.Tensor]) -> torch.Tensor:
        """Riemannian gradient of ``f`` (a differentiable function of a TT) at ``p``;
        see :func:`ttmanifold.manifold.autodiff.riemannian_grad`. Returns packed gauged
        deltas (detached). Cost: ``f`` and its backward at the tangent TT plus O(d n r^3)."""
        return autodiff.riemannian_grad(self, p, f)

    def riemannian_hvp(self, p: torch.Tensor, f: Callable[[TT], torch.Tensor],
                       u: torch.Tensor) -> torch.Tensor:
        """Projected Hessian-vector product ``P_X (nabla^2 f) [xi]`` at ``p``, without the
        curvature term (which vanishes only where the normal part of the Euclidean gradient
        does); see :func:`ttmanifold.manifold.autodiff.riemannian_hvp`."""
        return autodiff.riemannian_hvp(self, p, f, u)

    def riemannian_hess(self, p: torch.Tensor, f: Callable[[TT], torch.Tensor],
                        u: torch.Tensor) -> torch.Tensor:
        """Exact Riemannian Hessian ``Hess f(X)[xi]`` at ``p``, curvature term included;
        see :func:`ttmanifold.manifold.hessian.riemannian_hess`. Returns packed gauged
        deltas. Cost: about :meth:`riemannian_hvp` + :meth:`riemannian_grad` + ``f`` and
        its backward on a rank-4r TT."""
        return hessian.riemannian_hess(self, p, f, u)
