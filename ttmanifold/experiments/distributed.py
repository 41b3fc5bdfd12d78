"""Data-parallel Riemannian completion on ``torch.distributed``.

The observed entries are sharded over the processes of a process group (each process holds
only its shard); the point of the manifold is replicated. Each iteration every process

1. computes the loss and the Riemannian gradient of its shard (:meth:`Completion.cg_grad`
   of a per-shard problem, O(|shard| d r^2)) and all-reduces them in one message of
   ``dim M + 1`` numbers;
2. (CG) evaluates the search direction at its samples and all-reduces the one scalar of the
   exact line search's denominator;
3. retracts and transports locally (O(d n r^3), the same bits on every process).

So every process computes the same direction, step and next point, and the iterates equal
those of the single-process run on the same data to rounding (the sums over the samples
are grouped differently). The mathematics, the communication volume and the scaling model
are in ``docs/distributed.md``.

L-BFGS (:func:`distributed_lbfgs`) needs the summed loss and gradient only; the trust
region (:func:`distributed_trust_region`) also sums each Hessian-vector product of its
inner CG (one all-reduce of ``S`` numbers per product): the Riemannian Hessian is linear in
the data, curvature term included. Their direction and step rules run on every process on
the same bits.

The rank-adaptive search (:func:`distributed_rank_adaptive`) is the code of
:func:`ttmanifold.experiments.solvers.rank_adaptive_completion` with its sums over the
samples all-reduced (the greedy raise's bond matrices and line search, the rank-1 start's
slice means, the control error) and the data-parallel CG at each trial ranks; the rank-1
spectral start is computed by every process from the all-gathered training samples.

Entry points: :class:`ShardedCompletion` (the data of one process plus the reductions),
:func:`distributed_cg`, :func:`distributed_rsgd`, :func:`distributed_lbfgs`,
:func:`distributed_trust_region`, :func:`distributed_als` and
:func:`distributed_rank_adaptive` (the solvers, with checkpoints), and the
sharding helpers :func:`shard_mask` / :func:`validation_mask` / :func:`control_mask` (a
deterministic assignment of each multi-index to a process, to the validation set and to
the rank-adaptive search's control set, independent of the number of processes). Without
an initialized process group everything runs in one process.
"""
from __future__ import annotations

import datetime
import hashlib
import inspect
import math
import os
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch

from ..manifold import FixedTTRank, hessian_operator
from ..tt import TT, IndexSet
from ..tt.tensor_train import fro_norm
from .problems import Completion
from .solvers import (History, RankAdaptiveData, als_sweep, cg_direction,
                      check_solver_options, check_stop_options, lbfgs_direction,
                      lbfgs_first_length, lbfgs_update, problem_scale, rank_adaptive_completion, truncated_cg,
                      trust_region_update)

__all__ = [
    "PeerFailure",
    "Communicator",
    "ShardedCompletion",
    "distributed_cg",
    "distributed_rsgd",
    "distributed_lbfgs",
    "distributed_trust_region",
    "distributed_als",
    "distributed_rank_adaptive",
    "shard_mask",
    "validation_mask",
    "control_mask",
    "row_hash",
    "load_checkpoint",
    "init_from_env",
]

CHECKPOINT_FORMAT = "ttmanifold.distributed.checkpoint"
CHECKPOINT_VERSION = 1


class PeerFailure(RuntimeError):
    """A collective operation failed: a peer process died, or did not answer within the
    process group's timeout. Every surviving process raises it (no hang).

    After catching it, call ``torch.distributed.destroy_process_group()`` before the
    process exits: gloo's connections to the dead peer are then closed in order (left to
    the interpreter's shutdown, gloo sometimes aborts the process with "terminate called
    without an active exception"). ``ttmanifold complete`` does this."""


# ---------------------------------------------------------------------------------------
# communication
# ---------------------------------------------------------------------------------------

class Communicator:
    """The collectives of one process: ``torch.distributed`` when a process group with more
    than one process is initialized, plain local no-ops otherwise.

    Args:
        group: a process group (default: the default group, if initialized).

    Every collective names what it was doing in the :class:`PeerFailure` it raises when a
    peer is gone (gloo reports a closed connection at once; a silent peer is detected after
    the group's ``timeout``, set by ``init_process_group(timeout=...)`` or
    :func:`init_from_env`).
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist = dist
        active = dist.is_available() and dist.is_initialized()
        self.group = group
        self.world_size = dist.get_world_size(group) if active else 1
        self.rank = dist.get_rank(group) if active else 0
        self.distributed = active and self.world_size > 1
        self.backend = dist.get_backend(group) if active else None

    def _fail(self, what: str, exc: BaseException):
        raise PeerFailure(
            f"rank {self.rank} of {self.world_size}: {what} failed - a peer process "
            f"stopped or did not answer within the process group's timeout "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc

    def all_reduce(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Sum ``t`` in place over the processes (a no-op in one process). Returns ``t``."""
        if self.distributed:
            try:
                self._dist.all_reduce(t, group=self.group)
            except Exception as exc:  # noqa: BLE001  (DistBackendError, RuntimeError, ...)
                self._fail(what, exc)
        return t

    def broadcast(self, t: torch.Tensor, what: str, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``t`` on every process (in place). Returns ``t``."""
        if self.distributed:
            try:
                self._dist.broadcast(t, src=src, group=self.group)
            except Exception as exc:  # noqa: BLE001
                self._fail(what, exc)
        return t

    def gather_objects(self, obj, what: str) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every process (picklable objects)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        try:
            self._dist.all_gather_object(out, obj, group=self.group)
        except Exception as exc:  # noqa: BLE001
            self._fail(what, exc)
        return out

    def broadcast_object(self, obj, what: str, src: int = 0):
        """Rank ``src``'s ``obj`` on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        try:
            self._dist.broadcast_object_list(box, src=src, group=self.group)
        except Exception as exc:  # noqa: BLE001
            self._fail(what, exc)
        return box[0]

    def check_all(self, error: Optional[str], what: str) -> None:
        """Raise ``ValueError`` on every process when any process reports an error string
        (so one process's bad shard stops all of them, with its message)."""
        errors = self.gather_objects(error, what)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if bad:
            r, e = bad[0]
            raise ValueError(e if not self.distributed else f"(rank {r}) {e}")


def _process_rows(comm: Communicator, row, what: str) -> torch.Tensor:
    """Every process's ``row`` (a list of numbers) as the rows of a ``(world_size, k)``
    float64 table, by one all-reduce of zeros but this process's row: the norms of
    distributed vectors combine from their local norms by :func:`fro_norm` of a column,
    where a sum of squares underflows below ~1e-154 (overflows above ~1e154)."""
    table = torch.zeros(comm.world_size, len(row), dtype=torch.float64)
    table[comm.rank] = torch.tensor([float(v) for v in row], dtype=torch.float64)
    return comm.all_reduce(table, what)


def _local_norm(t: Optional[torch.Tensor]) -> float:
    return float(fro_norm(t.double())) if t is not None and t.numel() else 0.0


def _raise_disagreement(gathered, what: str) -> None:
    """Raise the same ``ValueError`` on every process when any process reports an error
    (the first, naming its rank) or when the processes' dicts of values that must agree
    differ (naming the first such key and the values on rank 0 and the other rank).

    Args:
        gathered: ``[(error or None, dict or None) of rank 0, of rank 1, ...]``, as
            :meth:`Communicator.gather_objects` returns them on every process.
        what: what every process must do alike, for the message.
    """
    for r, (error, _) in enumerate(gathered):
        if error:
            raise ValueError(f"(rank {r}) {error}")
    first = gathered[0][1]
    for r, (_, other) in enumerate(gathered[1:], 1):
        for key in first:
            # repr: NaN equals NaN, and x0 is compared by a digest of its bits
            if repr(first[key]) != repr(other.get(key)):
                raise ValueError(f"{key}: {first[key]!r} on rank 0, {other.get(key)!r} on "
                                 f"rank {r}; every process must {what}")


def _check_same_call(comm: Communicator, args: dict, x0: Optional[torch.Tensor],
                     error: Optional[str] = None) -> None:
    """Raise ``ValueError`` on every process when the processes called a solver with
    different arguments or starts (they would wait for each other's collectives, or
    drift apart silently), or when a process reports an ``error`` (e.g. rank 0's
    checkpoint path). Cost: one all-gather of ``args`` and a digest of ``x0``'s bits (one
    host copy of ``x0``); in one process none (only ``error`` is raised)."""
    if not comm.distributed:
        if error:
            raise ValueError(error)
        return
    mine = dict(args)
    if x0 is not None:
        bits = x0.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
        mine["x0"] = "bits " + hashlib.blake2b(bits, digest_size=16).hexdigest()
    _raise_disagreement(comm.gather_objects((error, mine), "the check of the arguments"),
                        "call with the same arguments and the same x0 (e.g. "
                        "ShardedCompletion.initial_point, which broadcasts rank 0's)")


def init_from_env(timeout: float = 300.0, backend: Optional[str] = None) -> bool:
    """Initialize the default process group from ``torchrun``'s environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1`` and no group
    exists yet.

    Args:
        timeout: seconds after which a collective waiting for a silent peer fails.
        backend: default ``"cpu:gloo,cuda:nccl"`` when CUDA is available (this module's
            metrics, counts and control errors are CPU tensors, which nccl does not
            serve), else ``"gloo"``.

    Returns True when this call initialized a group (destroy it with
    ``torch.distributed.destroy_process_group()``). Cost: one rendezvous.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if not (timeout > 0 and math.isfinite(timeout)):  # inf overflows the timedelta
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout)))
    return True


# ---------------------------------------------------------------------------------------
# deterministic assignment of entries to processes and to the validation set
# ---------------------------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = 0x9E3779B97F4A7C15


def _mix(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint64(30)
    h *= _M1
    h ^= h >> np.uint64(27)
    h *= _M2
    h ^= h >> np.uint64(31)
    return h


def row_hash(indices, seed: int = 0) -> np.ndarray:
    """A 64-bit hash of each multi-index (row of ``indices``), a function of the row and
    ``seed`` only (splitmix64 finalizer applied column by column).

    Args:
        indices: ``(N, d)`` non-negative integers (array or tensor).
        seed: selects an independent hash.

    Returns an ``(N,)`` ``uint64`` array. Cost: O(N d).
    """
    idx = indices.numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    if idx.ndim != 2:
        raise ValueError(f"indices: expected an (N, d) array, got shape {idx.shape}")
    with np.errstate(over="ignore"):
        h = np.full(idx.shape[0], np.uint64((_GOLD * (int(seed) + 1)) % 2 ** 64),
                    dtype=np.uint64)
        for k in range(idx.shape[1]):
            h ^= idx[:, k].astype(np.uint64)
            h = _mix(h)
    return h


def shard_mask(indices, rank: int, world_size: int) -> np.ndarray:
    """Which rows of ``indices`` belong to process ``rank`` of ``world_size``: the hash of
    the multi-index modulo ``world_size``. Equal multi-indices land on the same process,
    so per-shard duplicate checks are global ones. Returns an ``(N,)`` bool array; O(N d)."""
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank, world_size: expected 0 <= rank < world_size, got "
                         f"{rank!r}, {world_size!r}")
    return (row_hash(indices, seed=0x5EED) % np.uint64(world_size)) == np.uint64(rank)


def validation_mask(indices, fraction: float, seed: int = 0) -> np.ndarray:
    """Rows of ``indices`` held out for validation: those whose hash (seeded by ``seed``)
    falls below ``fraction`` of its range; about ``fraction * N`` rows, the same rows
    whatever the number of processes. Returns an ``(N,)`` bool array; O(N d)."""
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"fraction: expected a number in [0, 1), got {fraction!r}")
    u = (row_hash(indices, seed=1 + int(seed)) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return u < float(fraction)


#: offsets the hash seed of :func:`control_mask` from those of :func:`validation_mask`
_CONTROL_SEED = 0x5C0DE


def control_mask(indices, fraction: float, seed: int = 0) -> np.ndarray:
    """Rows of ``indices`` in the control set of the rank-adaptive search
    (:func:`distributed_rank_adaptive`): :func:`validation_mask` with a hash independent of
    the validation split's for every ``seed``, so about ``fraction`` of the training rows,
    the same rows whatever the number of processes. Returns an ``(N,)`` bool array; O(N d).
    """
    return validation_mask(indices, fraction, seed=_CONTROL_SEED + int(seed))


# ---------------------------------------------------------------------------------------
# the sharded problem
# ---------------------------------------------------------------------------------------

def _as_long(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer indices, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected an (N, d) array, got shape {tuple(t.shape)}")
    return t.to(torch.long)


class ShardedCompletion:
    """One process's share of a completion problem: the loss ``(w/2) sum_i (X[i] - a_i)^2``
    over *all* processes' samples (``w = n_1...n_d / N``, ``N`` the global sample count, as
    in :meth:`Completion.from_data`), with the reductions that make the gradient, the line
    search and the metrics global.

    Args:
        indices: ``(N_local, d)`` integer multi-indices of this process's training samples
            (distinct over all processes; :func:`shard_mask` guarantees it for per-shard
            checks). Every process needs at least one sample.
        values: ``(N_local,)`` finite values.
        shape: the tensor's shape (required: a shard does not know the global maximum).
        ranks: TT-ranks, as in :meth:`Completion.from_data` (an int is clipped).
        validation: optional ``(indices, values)`` of this process's held-out samples
            (in range, finite values).
        dtype, device: of the tensors (default float64, CPU).
        group: the process group (default: the default group when initialized, else one
            process).

    Raises ``ValueError`` on every process when any process's shard fails the checks of
    :meth:`Completion.from_data` (the message names that process) or when the processes
    disagree on the shape, ranks, dtype or device type.

    Cost: the per-shard checks of :meth:`Completion.from_data` (O(N_local log N_local)),
    one all-gather of their results with the shape, ranks and dtype, and one all-reduce
    of 2 numbers.
    """

    def __init__(self, indices, values, shape, ranks, *, validation=None, dtype=None,
                 device=None, group=None):
        if shape is None:
            raise TypeError("shape: give the tensor's shape (a shard cannot infer it)")
        self.comm = Communicator(group)
        try:
            idx = self._build(indices, values, shape, ranks, validation, dtype, device)
            error = None
        except (TypeError, ValueError) as exc:
            if not self.comm.distributed:
                raise
            error = str(exc)
        # the checks that can fail on one process only (its shard: empty, a duplicate, a
        # bad value) and what every process must agree on, in one message: every process
        # raises the same error instead of the others waiting for the failed one
        agreed = None if error else {"shape": tuple(self.manifold.shape),
                                     "ranks": tuple(self.manifold.ranks),
                                     "dtype": _dtype_name(self.dtype),
                                     "device": self.device.type}
        _raise_disagreement(self.comm.gather_objects((error, agreed),
                                                     "the check of the shards"),
                            "build the problem with the same shape, ranks and dtype")
        n_val = 0 if self.val is None else len(self.val)
        counts = torch.tensor([float(idx.shape[0]), float(n_val)], dtype=torch.float64)
        self.comm.all_reduce(counts, "the count of the samples")
        self.n_train = int(counts[0])
        self.n_val = int(counts[1])
        self.n_local = int(idx.shape[0])
        # the per-shard problem weighs its samples by n/N_local; the global loss by n/N
        self.scale = self.n_local / self.n_train
        self.weight = self.local.weight * self.scale
        self.grad_messages = 0

    def _build(self, indices, values, shape, ranks, validation, dtype, device):
        """This process's part of the problem (raises on a bad shard); returns the
        training indices."""
        idx = _as_long(indices, "indices")
        if idx.shape[0] == 0:
            raise ValueError(f"indices: process {self.comm.rank} of {self.comm.world_size} "
                             f"has no training samples; use fewer processes")
        import warnings

        with warnings.catch_warnings():
            # the clipping warning is issued once, by rank 0
            if self.comm.rank != 0:
                warnings.simplefilter("ignore")
            self.local = Completion.from_data(idx, values, shape, ranks, dtype=dtype,
                                              device=device)
        self.manifold: FixedTTRank = self.local.manifold
        self.dtype = self.local.dtype
        self.device = self.local.device
        self.val = None
        self.a_val = None
        if validation is not None:
            vi = _as_long(validation[0], "validation[0] (indices)")
            vv = torch.as_tensor(np.asarray(validation[1]) if not isinstance(
                validation[1], torch.Tensor) else validation[1]).to(self.dtype).reshape(-1)
            if vv.shape[0] != vi.shape[0]:
                raise ValueError(f"validation[1] (values): {vv.shape[0]} values for "
                                 f"{vi.shape[0]} indices")
            if not bool(torch.isfinite(vv).all()):  # (a NaN val_err, silently)
                raise ValueError("validation[1] (values): contains NaN or Inf")
            if vi.shape[0]:
                try:
                    self.val = IndexSet(vi.to(self.device), self.manifold.shape)
                except ValueError as exc:
                    raise ValueError(f"validation[0] (indices): {exc}") from None
                self.a_val = vv.to(self.device)
        return idx

    @property
    def shape(self):
        return self.manifold.shape

    @property
    def ranks(self):
        return self.manifold.ranks

    # -- the pieces of an iteration --------------------------------------------------------
    def grad(self, p: torch.Tensor):
        """Global loss and Riemannian gradient at the replicated point ``p``.

        Returns ``(loss, grad, ctx)`` (``ctx`` is this shard's context for
        :meth:`line_search`). Cost: O(N_local d r^2) plus one all-reduce of ``dim M + 1``
        numbers.
        """
        loss, g, ctx = self.local.cg_grad(p)
        with torch.no_grad():
            buf = torch.cat([g.reshape(-1), loss.reshape(1).to(g.dtype)])
            if self.scale != 1.0:
                buf.mul_(self.scale)
            self.comm.all_reduce(buf, "the all-reduce of the gradient")
        return buf[-1], buf[:-1].clone(), ctx

    def loss(self, p: torch.Tensor) -> torch.Tensor:
        """Global loss at the replicated point ``p`` (a 0-d tensor). Cost: O(N_local d r^2)
        and one all-reduce of one number."""
        with torch.no_grad():
            val = self.local.loss(self.manifold.to_tt(p)).reshape(1)
            if self.scale != 1.0:
                val = val * self.scale
            val = val.contiguous()
            self.comm.all_reduce(val, "the all-reduce of the loss")
        return val[0]

    def hessian(self, p: torch.Tensor):
        """Global loss, Riemannian gradient and Hessian operator at ``p``.

        The Riemannian Hessian of a sum is the sum of the shards' Hessians, each with its
        own curvature term (the Weingarten part is linear in the shard's Euclidean
        gradient), so ``hess(u)`` applies this shard's
        :func:`~ttmanifold.manifold.hessian_operator` and all-reduces the result.

        Returns ``(loss, grad, hess)``: ``grad`` gauge-projected once more (as in
        :func:`~ttmanifold.experiments.solvers.riemannian_trust_region`); ``hess`` maps a
        packed tangent vector to a packed tangent vector, the same on every process.
        Cost: as :meth:`grad` (one all-reduce of ``dim M + 1`` numbers); each ``hess``
        call one autodiff Hessian product on the shard (a few O(N_local d r^2) passes)
        plus one all-reduce of ``S`` numbers (``S = M.size``).
        """
        M = self.manifold
        with torch.no_grad():
            loss, g, _ = self.local.cg_grad(p)
            g_local = M.proju(p, g * self.scale if self.scale != 1.0 else g)
            buf = torch.cat([g_local.reshape(-1), (loss * self.scale).reshape(1).to(g.dtype)])
            self.comm.all_reduce(buf, "the all-reduce of the gradient")
        f_local = self.local.loss if self.scale == 1.0 else \
            (lambda x: self.local.loss(x) * self.scale)
        op = []

        def hess(u: torch.Tensor) -> torch.Tensor:
            if not op:  # built at the first product: a rejected trial point needs none
                op.append(hessian_operator(M, p, f_local, grad=g_local))
            v = op[0](u).detach().contiguous()
            return self.comm.all_reduce(v, "the all-reduce of the Hessian product")

        return buf[-1], buf[:-1].clone(), hess

    def line_search(self, p: torch.Tensor, g: torch.Tensor, eta: torch.Tensor, ctx):
        """The exact minimizer ``alpha = -<g, eta> / ||P_Omega eta||^2_w`` of the loss along
        the tangent line ``X + alpha eta`` (the numerator is ``<P_Omega(X - A), eta>_w``,
        which equals ``<g, eta>`` for a tangent ``eta``). Cost: O(N_local d r^2) and one
        all-reduce of one number."""
        with torch.no_grad():
            e = self.local.eval_tangent(p, eta, ctx)
            den = (e * e).sum().reshape(1).to(torch.float64 if e.dtype == torch.float64
                                                else e.dtype)
            if self.scale != 1.0:
                den.mul_(self.scale)
            self.comm.all_reduce(den, "the all-reduce of the line search")
            num = (g * eta).sum()
            return -num / den[0].to(num.dtype).clamp_min(torch.finfo(num.dtype).tiny)

    def metrics(self, p) -> Dict[str, float]:
        """``train_err`` / ``val_err`` (``||X - A|| / ||A||`` on the samples) and
        ``train_rmse`` / ``val_rmse`` over all processes. O(N_local d r^2) and one
        all-reduce of 6 numbers."""
        x = p if isinstance(p, TT) else self.manifold.to_tt(p)
        x = x.detach()
        row = [0.0] * 6  # ||X - A||, ||A||, count on the training and validation samples
        with torch.no_grad():
            sets = [(0, self.local.train, self.local.a_train)]
            if self.val is not None:
                sets.append((3, self.val, self.a_val))
            for j, iset, a in sets:
                row[j:j + 3] = [_local_norm(iset.gather(x) - a), _local_norm(a), len(iset)]
        # (sums of squares underflowed below ~1e-154: a NaN error, rmse 0)
        table = _process_rows(self.comm, row, "the all-reduce of the metrics")
        out = {}
        for name, j in (("train", 0), ("val", 3)):
            count = float(table[:, j + 2].sum())
            if count > 0:
                res, a_norm = float(fro_norm(table[:, j])), float(fro_norm(table[:, j + 1]))
                out[f"{name}_err"] = res / a_norm if a_norm > 0 else math.nan
                out[f"{name}_rmse"] = res / math.sqrt(count)
        return out

    def rank_adaptive_data(self, *, control_fraction: float, seed: int, generator=None,
                           control=None) -> RankAdaptiveData:
        """The data side of the rank-adaptive search on this process's shard (what
        :func:`~ttmanifold.experiments.solvers.rank_adaptive_completion` calls for a
        sharded problem): the control set is :func:`control_mask` of the samples (or the
        bool mask ``control`` over this shard's training samples); every sum over the
        samples is all-reduced. Cost: O(N_local d) and one all-reduce of 3 numbers."""
        return _ShardedRankAdaptive(self, control_fraction=control_fraction, seed=seed,
                                    control=control)

    def initial_point(self, seed: int = 0, kind: str = "random") -> torch.Tensor:
        """A start, the same on every process.

        - ``"random"``: :meth:`Completion.initial_point` (the same point for a seed as the
          single-process problem);
        - ``"spectral"``: rank-r TT-SVD of the zero-filled data times ``w`` (dense: at most
          2e7 entries); each process fills its samples, one all-reduce of the dense tensor,
          rank 0 decomposes and broadcasts.

        Returns a packed point (rank 0's, broadcast). Raises ``ValueError`` on every process
        when the processes ask for different kinds (a spectral start's all-reduce would
        meet the other's broadcast: a wait for the group's timeout).
        Cost: one all-gather of ``kind``, the start, one broadcast of ``M.size`` numbers.
        """
        error = None if kind in ("random", "spectral") else \
            f"kind: expected 'random' or 'spectral', got {kind!r}"
        if self.comm.distributed:
            _raise_disagreement(self.comm.gather_objects((error, {"kind": kind}),
                                                         "the check of the start's kind"),
                                "call initial_point with the same kind")
        if kind == "random":
            p = self.local.initial_point(seed)
        elif kind == "spectral":
            total = math.prod(self.shape)
            if total > 2 * 10 ** 7:
                raise ValueError(f"kind='spectral' forms the dense {self.shape} tensor "
                                 f"({total} entries > 2e7); use kind='random'")
            Z = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            Z[tuple(self.local.train.indices.t())] = self.local.a_train * self.weight
            self.comm.all_reduce(Z, "the all-reduce of the spectral start")
            if self.comm.rank == 0:
                # unchecked: sparse data can give a spectral start of lower rank
                p = self.manifold.pack_point(TT.from_dense(Z, ranks=self.ranks),
                                             check_rank=False)
            else:
                p = torch.empty(self.manifold.size, dtype=self.dtype, device=self.device)
            del Z
        else:
            raise ValueError(error)
        p = torch.as_tensor(p).detach().clone().contiguous()
        return self.comm.broadcast(p, "the broadcast of the start")


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by one of the solvers of this module.

    Returns a dict with ``format``, ``version``, ``method``, ``iteration``, ``shape``,
    ``ranks``, ``dtype`` (a name), ``n_train``, ``world_size`` (of the run that wrote
    it), ``state`` (tensors) and ``history`` (rows). Raises ``ValueError`` naming ``path``
    for a file of another kind.
    """
    path = os.fspath(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"checkpoint: {path!r} is not a readable checkpoint ({exc})") from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint: {path!r} is not a ttmanifold distributed checkpoint")
    return ck


def _save_checkpoint(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)  # atomic: a reader sees the old or the new checkpoint
    finally:
        if os.path.exists(tmp):  # (a failed write or replace leaves no stray file)
            os.remove(tmp)


def _checkpoint_error(comm: Communicator, checkpoint, checkpoint_every: int) -> Optional[str]:
    """On rank 0 (the writer), why the file ``checkpoint`` cannot be written (a directory,
    or a missing parent directory), else None: found before the first iteration instead
    of at the first save, where rank 0 failed while the others waited for it. O(1)."""
    if comm.rank != 0 or not checkpoint_every:
        return None
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        return f"checkpoint: {path!r} is a directory; give the path of a file"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"checkpoint: the directory {parent!r} of {path!r} does not exist"
    return None


def _check_resume(ck: dict, problem: ShardedCompletion, method: str, path: str) -> None:
    want = {"method": method, "shape": list(problem.shape), "ranks": list(problem.ranks),
            "dtype": _dtype_name(problem.dtype), "n_train": problem.n_train}
    for key, val in want.items():
        if ck.get(key) != val:
            raise ValueError(f"checkpoint: {path!r} has {key} = {ck.get(key)!r}, this run "
                             f"has {val!r}; it belongs to another run")


# ---------------------------------------------------------------------------------------
# solvers
# ---------------------------------------------------------------------------------------

class _CG:
    """Polak-Ribiere+ CG with exact line search, the rules of
    :func:`ttmanifold.experiments.solvers.riemannian_cg`."""

    method = "rcg"

    def __init__(self, problem: ShardedCompletion, p, beta: str, restart_tol: float,
                 restart_every: Optional[int]):
        check_solver_options("rcg", beta=beta, restart_tol=restart_tol,
                             restart_every=restart_every)
        self.problem, self.M = problem, problem.manifold
        self.p = p
        self.beta_rule, self.restart_tol, self.restart_every = beta, restart_tol, restart_every
        self.eta = None
        self.k = 0
        self.restarts = 0
        self.state = None

    def ensure_state(self):
        if self.state is None:
            self.state = self.problem.grad(self.p)
        return self.state

    def step(self) -> float:
        M, P = self.M, self.problem
        with torch.no_grad():
            loss, g, ctx = self.ensure_state()
            eta = -g if self.eta is None else self.eta
            alpha = P.line_search(self.p, g, eta, ctx)
            p_new, eta_tr = M.retr_transp(self.p, alpha * eta, eta)
            g_tr = M.transp(self.p, p_new, g)
            del ctx
            self.state = None
            loss_new, g_new, ctx_new = P.grad(p_new)
            self.k += 1
            eta_new, restart = cg_direction(g, g_new, g_tr, eta_tr, self.k,
                                            beta_rule=self.beta_rule,
                                            restart_tol=self.restart_tol,
                                            restart_every=self.restart_every)
            if restart:
                self.k = 0
                self.restarts += 1
            self.p, self.eta = torch.as_tensor(p_new), eta_new
            self.state = (loss_new, g_new, ctx_new)
        return float(loss)

    def loss_now(self) -> float:
        return float(self.ensure_state()[0])

    def state_dict(self) -> dict:
        return {"p": self.p.detach().clone(),
                "eta": None if self.eta is None else self.eta.detach().clone(),
                "k": self.k, "restarts": self.restarts}

    def load_state_dict(self, s: dict) -> None:
        self.p = s["p"].to(dtype=self.problem.dtype, device=self.problem.device)
        self.eta = None if s["eta"] is None else s["eta"].to(self.p)
        self.k, self.restarts = int(s["k"]), int(s["restarts"])
        self.state = None


class _SGD:
    """Riemannian gradient descent with a fixed step: ``X <- R_X(-lr grad)``."""

    method = "rsgd"

    def __init__(self, problem: ShardedCompletion, p, lr: float):
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr: expected a positive number, got {lr!r}")
        self.problem, self.M, self.p, self.lr = problem, problem.manifold, p, float(lr)
        self.state = None

    def ensure_state(self):
        if self.state is None:
            self.state = self.problem.grad(self.p)
        return self.state

    def step(self) -> float:
        with torch.no_grad():
            loss, g, _ = self.ensure_state()
            self.state = None
            self.p = torch.as_tensor(self.M.retr(self.p, -self.lr * g))
        return float(loss)

    def loss_now(self) -> float:
        return float(self.ensure_state()[0])

    def state_dict(self) -> dict:
        return {"p": self.p.detach().clone(), "lr": self.lr}

    def load_state_dict(self, s: dict) -> None:
        self.p = s["p"].to(dtype=self.problem.dtype, device=self.problem.device)
        self.state = None


class _LBFGS:
    """Riemannian L-BFGS with Armijo backtracking, the rules of
    :func:`ttmanifold.experiments.solvers.riemannian_lbfgs`. When the previous iteration
    accepted its unit step, the unit step's trial point gets its loss and gradient in one
    all-reduce (likely accepted again: one round trip and no separate loss); otherwise
    trials get the loss only (a backtracking phase: no wasted gradients)."""

    method = "rlbfgs"

    def __init__(self, problem: ShardedCompletion, p, memory: int, c1: float,
                 shrink: float = 0.5, max_backtracks: int = 30):
        check_solver_options("rlbfgs", memory=memory, c1=c1)
        self.memory = memory
        self.problem, self.M, self.p = problem, problem.manifold, p
        self.c1, self.shrink, self.max_backtracks = float(c1), float(shrink), max_backtracks
        self.pairs: list = []  # (s, y, 1/<s, y>) in the tangent space at p, oldest first
        self.state = None  # (loss, grad) at p
        self.fuse = True  # the previous iteration accepted its unit step
        self.info = {"backtracks": 0, "skipped_updates": 0, "grad_norms": []}

    def ensure_state(self):
        if self.state is None:
            loss, g, _ = self.problem.grad(self.p)
            self.state = (loss, g)
        return self.state

    def step(self) -> float:
        M, P = self.M, self.problem
        with torch.no_grad():
            fx, g = self.ensure_state()
            self.info["grad_norms"].append(math.sqrt(float(g @ g)))
            # without memory after the first step: the cap follows the problem's scale
            later = len(self.info["grad_norms"]) > 1
            first = lbfgs_first_length(M, self.p, fx) if later and not self.pairs else 1.0
            eta = lbfgs_direction(self.pairs, g, first)
            slope = float(g @ eta)
            if slope >= 0:  # not a descent direction: forget the memory
                self.pairs.clear()
                first = lbfgs_first_length(M, self.p, fx) if later else 1.0
                eta = lbfgs_direction(self.pairs, g, first)
                slope = float(g @ eta)
            t = 1.0
            g_new = None
            for j in range(self.max_backtracks):
                t_try = t
                p_new = torch.as_tensor(M.retr(self.p, t_try * eta))
                if j == 0 and self.fuse:
                    f_new, g_new, _ = P.grad(p_new)
                else:
                    f_new, g_new = P.loss(p_new), None
                if float(f_new) <= float(fx) + self.c1 * t_try * slope:
                    break
                t *= self.shrink
                self.info["backtracks"] += 1
            self.fuse = t_try == 1.0
            if g_new is None:
                f_new, g_new, _ = P.grad(p_new)
            self.pairs = lbfgs_update(M, self.p, p_new, self.pairs, t_try * eta, g, g_new,
                                      self.memory, self.info)
            self.p, self.state = p_new, (f_new, g_new)
        return float(fx)

    def loss_now(self) -> float:
        return float(self.ensure_state()[0])

    def state_dict(self) -> dict:
        empty = self.p.new_zeros(0, self.p.numel())
        return {"p": self.p.detach().clone(),
                "s": torch.stack([s_ for s_, _, _ in self.pairs]) if self.pairs else empty,
                "y": torch.stack([y_ for _, y_, _ in self.pairs]) if self.pairs else empty,
                "rho": [float(r) for _, _, r in self.pairs], "fuse": self.fuse,
                "backtracks": self.info["backtracks"],
                "skipped_updates": self.info["skipped_updates"],
                "grad_norms": list(self.info["grad_norms"])}

    def load_state_dict(self, s: dict) -> None:
        self.p = s["p"].to(dtype=self.problem.dtype, device=self.problem.device)
        S, Y = s["s"].to(self.p), s["y"].to(self.p)
        self.pairs = [(S[j].clone(), Y[j].clone(), float(r)) for j, r in enumerate(s["rho"])]
        self.fuse = bool(s["fuse"])
        self.info = {"backtracks": int(s["backtracks"]),
                     "skipped_updates": int(s["skipped_updates"]),
                     "grad_norms": [float(v) for v in s["grad_norms"]]}
        self.state = None


class _TR:
    """Riemannian trust region with the exact Hessian and truncated CG, the rules of
    :func:`ttmanifold.experiments.solvers.riemannian_trust_region`; each Hessian product
    is summed over the processes."""

    method = "rtr"

    def __init__(self, problem: ShardedCompletion, p, radius, max_radius, max_inner,
                 theta: float, kappa: float, max_backtracks: int, rho_accept: float = 0.1):
        check_solver_options("rtr", radius=radius, max_radius=max_radius,
                             max_inner=max_inner, max_backtracks=max_backtracks, theta=theta,
                             kappa=kappa, rho_accept=rho_accept)
        self.problem, self.M, self.p = problem, problem.manifold, p
        self.max_radius = None if max_radius is None else float(max_radius)
        self.radius = None if radius is None else float(radius)
        self.max_inner = self.M.dim if max_inner is None else max_inner
        self.theta, self.kappa, self.rho_accept = float(theta), float(kappa), float(rho_accept)
        self.max_backtracks = max_backtracks
        self.state = None  # (loss, grad, hess) at p
        self.info = {"inner_iters": 0, "hess_products": 0, "rejected": 0, "backtracked": 0,
                     "grad_norms": []}

    def ensure_state(self):
        if self.state is None:
            self.state = self.problem.hessian(self.p)
        return self.state

    def step(self) -> float:
        M, P = self.M, self.problem
        with torch.no_grad():
            fx, g, hess = self.ensure_state()
            if self.max_radius is None or self.radius is None:
                scale = problem_scale(M, self.p, fx)  # ||X_0|| or the distance to the data
                if self.max_radius is None:
                    self.max_radius = 2.0 * scale
                if self.radius is None:
                    self.radius = self.max_radius / 8
            self.info["grad_norms"].append(math.sqrt(float(g @ g)))
            eta, h_eta = truncated_cg(g, hess, self.radius, self.max_inner, self.theta,
                                       self.kappa, self.info)
            p_new = torch.as_tensor(M.retr(self.p, eta)).detach()
            trial = P.hessian(p_new)  # loss and gradient in one all-reduce
            p_next, self.radius, backtracked = trust_region_update(
                M, self.p, p_new, fx, trial[0], g, eta, h_eta, self.radius, self.max_radius,
                P.loss, rho_accept=self.rho_accept, max_backtracks=self.max_backtracks,
                info=self.info)
            if p_next is not None:
                # a backtracked point's gradient comes at the next step
                self.p, self.state = p_next, None if backtracked else trial
        return float(fx)

    def loss_now(self) -> float:
        return float(self.ensure_state()[0])

    def state_dict(self) -> dict:
        return {"p": self.p.detach().clone(), "radius": self.radius,
                "max_radius": self.max_radius,
                **{k: self.info[k] for k in ("inner_iters", "hess_products", "rejected",
                                             "backtracked")},
                "grad_norms": list(self.info["grad_norms"])}

    def load_state_dict(self, s: dict) -> None:
        self.p = s["p"].to(dtype=self.problem.dtype, device=self.problem.device)
        self.radius = None if s["radius"] is None else float(s["radius"])
        self.max_radius = None if s["max_radius"] is None else float(s["max_radius"])
        self.info = {k: int(s[k]) for k in ("inner_iters", "hess_products", "rejected",
                                            "backtracked")}
        self.info["grad_norms"] = [float(v) for v in s["grad_norms"]]
        self.state = None


class _ALS:
    """Alternating least squares: every process forms each core's normal equations from
    its shard, they are summed (one all-reduce per core), and every process solves the
    same system (:func:`~ttmanifold.experiments.solvers.als_sweep`)."""

    method = "als"

    def __init__(self, problem: ShardedCompletion, p, ridge: float):
        check_solver_options("als", ridge=ridge)
        self.problem, self.M, self.ridge = problem, problem.manifold, float(ridge)
        # the sweeps continue from these cores (not from a re-gauged split of the point)
        self.cores = [c.clone() for c in self.M.split(p, "x0")]
        self.p = p
        self.f = None

    def _reduce(self, A, rhs):
        n = A.shape[0]
        buf = torch.cat([A.reshape(-1), rhs.reshape(-1)])
        self.problem.comm.all_reduce(buf, "the all-reduce of the normal equations")
        return buf[:A.numel()].reshape(A.shape), buf[A.numel():].reshape(n, -1)

    def step(self) -> float:
        with torch.no_grad():
            fx = self.loss_now()
            local = self.problem.local
            als_sweep(self.cores, local.train.indices, local.a_train, None, ridge=self.ridge,
                      reduce=self._reduce if self.problem.comm.distributed else None)
            self.p = self.M.pack_point(TT(self.cores, check=False))
            self.f = None
        return fx

    def loss_now(self) -> float:
        if self.f is None:
            self.f = float(self.problem.loss(self.p))
        return self.f

    def state_dict(self) -> dict:
        return {"p": self.p.detach().clone(), "cores": [c.detach().clone() for c in self.cores],
                "ridge": self.ridge}

    def load_state_dict(self, s: dict) -> None:
        dt, dev = self.problem.dtype, self.problem.device
        self.p = s["p"].to(dtype=dt, device=dev)
        self.cores = [c.to(dtype=dt, device=dev) for c in s["cores"]]
        self.f = None


class _ShardedRankAdaptive(RankAdaptiveData):
    """The rank-adaptive search's data on one process of a :class:`ShardedCompletion`:
    this shard's training and control samples (the control set by :func:`control_mask`,
    independent of the number of processes), sub-problems that are
    :class:`ShardedCompletion` s at the trial ranks, the data-parallel CG inside, and the
    sums of the greedy raises, the start and the control error all-reduced."""

    distributed = True

    def __init__(self, problem: ShardedCompletion, *, control_fraction: float, seed: int,
                 control=None):
        self.problem, self.comm = problem, problem.comm
        idx, vals = problem.local.train.indices, problem.local.a_train
        if control is None:
            mask = torch.from_numpy(control_mask(idx.cpu(), control_fraction, seed))
        else:
            mask = torch.as_tensor(control)
            if mask.dtype != torch.bool or mask.shape != (idx.shape[0],):
                raise ValueError(f"control: expected a bool mask of shape ({idx.shape[0]},), "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.to(idx.device)
        self.name = "completion"
        self.shape = problem.shape
        self.dtype, self.device = problem.dtype, problem.device
        self.idx_tr, self.vals_tr, self.w_tr = idx[~mask], vals[~mask], None
        self.idx_ctrl, self.vals_ctrl = idx[mask], vals[mask]
        sums = torch.tensor([float(self.idx_tr.shape[0]), float(self.idx_ctrl.shape[0]),
                             float((self.vals_tr.double() ** 2).sum())], dtype=torch.float64)
        self.comm.all_reduce(sums, "the all-reduce of the control split")
        self.n_train, self.n_ctrl = int(sums[0]), int(sums[1])
        if not self.n_ctrl or not self.n_train:
            raise ValueError(f"control_fraction: {control_fraction!r} leaves {self.n_ctrl} "
                             f"control and {self.n_train} training samples; both must be "
                             f"non-empty")
        self.sq_sum, self.w_mean = float(sums[2]), None

    def sum(self, t, what):
        return self.comm.all_reduce(t, f"the all-reduce of {what}")

    def same(self, t, what):
        return self.comm.broadcast(t, f"the broadcast of {what}")

    def agree(self, flag):
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        return bool(self.comm.broadcast(t, "the broadcast of the time budget")[0] > 0)

    def gather(self, t, what):
        # one-time (the spectral start): pickled all-gather, any shard sizes
        parts = self.comm.gather_objects(t.detach().cpu(), f"the all-gather of {what}")
        return torch.cat(parts).to(t.device)

    def make(self, ranks):
        return ShardedCompletion(self.idx_tr, self.vals_tr, self.shape, tuple(ranks[1:-1]),
                                 validation=(self.idx_ctrl, self.vals_ctrl), dtype=self.dtype,
                                 device=self.device, group=self.comm.group)

    def cg(self, sub, x):
        return _CG(sub, torch.as_tensor(x).detach().clone(), "pr+", 0.1, None)

    def control_err(self, sub, x) -> float:
        row = [0.0, 0.0]
        with torch.no_grad():
            if sub.val is not None:
                row = [_local_norm(sub.val.gather(sub.manifold.to_tt(x)) - sub.a_val),
                       _local_norm(sub.a_val)]
        # scaled norms, as RankAdaptiveData.control_err's (sums of squares underflowed
        # below ~1e-154, and 0 / 1 read as an exact fit: "converged")
        table = _process_rows(self.comm, row, "the all-reduce of the control error")
        return float(fro_norm(table[:, 0])) / (float(fro_norm(table[:, 1])) or 1.0)

    def control_residual(self, sub, x):
        with torch.no_grad():
            if sub.val is None:  # no control samples on this process
                return torch.zeros(0, dtype=self.dtype, device=self.device)
            return sub.val.gather(sub.manifold.to_tt(x)) - sub.a_val

    def random_point(self, sub, generator):
        # drawn from the same seeded generator on every process: the same point
        return sub.local.initial_point(generator)


def _shared_checkpoint(comm, path: str, check: Callable[[dict], None]) -> dict:
    """Rank 0 reads the checkpoint at ``path`` and checks it (``check`` raises
    ``ValueError``); every process receives it, or raises rank 0's error (the others must
    not wait for a checkpoint that never comes)."""
    ck, error = None, None
    if comm.rank == 0:
        try:
            ck = load_checkpoint(path)
            check(ck)
        except (ValueError, FileNotFoundError) as exc:
            ck, error = None, (type(exc).__name__, str(exc))
    ck, error = comm.broadcast_object((ck, error), "the broadcast of the checkpoint")
    if error is not None:
        raise (FileNotFoundError if error[0] == "FileNotFoundError" else ValueError)(error[1])
    return ck


def _check_checkpoint_args(checkpoint, checkpoint_every, resume) -> None:
    """Raise ``ValueError`` naming the argument for inconsistent checkpoint options."""
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every: expected a non-negative int, got "
                         f"{checkpoint_every!r}")
    if checkpoint_every and checkpoint is None:
        raise ValueError("checkpoint: give a path when checkpoint_every > 0")
    if resume and checkpoint is None:
        raise ValueError("checkpoint: give the path to resume from")


def _start(problem: ShardedCompletion, x0) -> torch.Tensor:
    """A solver's start: a copy of ``x0`` in the problem's dtype and device; ``ValueError``
    naming ``x0`` unless it is one packed point (a batch failed deep in the sampled
    kernels, naming their ``index_set``)."""
    if not isinstance(problem, ShardedCompletion):
        raise TypeError(f"problem: expected a ShardedCompletion, got {type(problem).__name__}")
    x0 = torch.as_tensor(x0).detach().clone().to(dtype=problem.dtype, device=problem.device)
    size = problem.manifold.size
    if x0.shape != (size,):
        raise ValueError(f"x0: expected one packed point of shape ({size},), got shape "
                         f"{tuple(x0.shape)}")
    return x0


def _run(problem: ShardedCompletion, stepper, *, iters: int, metrics_every: int,
         checkpoint: Optional[str], checkpoint_every: int, resume: bool,
         callback: Optional[Callable], stop_metric: Optional[str],
         stop_tol: Optional[float], options: dict) -> History:
    if not isinstance(problem, ShardedCompletion):
        raise TypeError(f"problem: expected a ShardedCompletion, got {type(problem).__name__}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters: expected a non-negative int, got {iters!r}")
    _check_checkpoint_args(checkpoint, checkpoint_every, resume)
    check_stop_options(metrics_every, stop_metric, stop_tol)
    comm = problem.comm
    _check_same_call(comm, {"method": stepper.method, "iters": iters,
                            "metrics_every": metrics_every, "checkpoint": checkpoint is not None,
                            "checkpoint_every": checkpoint_every, "resume": resume,
                            "stop_metric": stop_metric, "stop_tol": stop_tol, **options},
                     stepper.p, _checkpoint_error(comm, checkpoint, checkpoint_every))
    if not resume:  # the steps assume a valid point (the same on every process: checked)
        try:
            problem.manifold.check_point(stepper.p, rtol=0.0)
        except ValueError as exc:
            raise ValueError(f"x0: {str(exc)[3:] if str(exc).startswith('p: ') else exc}") \
                from None
    hist = History(problem="completion", method=stepper.method + "-dp")
    hist.info.update(world_size=comm.world_size, n_train=problem.n_train,
                     n_val=problem.n_val, options=dict(options))
    start = 0
    elapsed = 0.0
    if resume:
        ck = _shared_checkpoint(comm, checkpoint,
                                lambda c: _check_resume(c, problem, stepper.method, checkpoint))
        start = int(ck["iteration"])
        if start > iters:  # (the same on every process: ck is rank 0's, iters agreed)
            raise ValueError(f"iters: {iters} is below the checkpoint's iteration {start} "
                             f"({checkpoint!r}); give iters >= {start} to resume from it")
        stepper.load_state_dict(ck["state"])
        for row in ck["history"]:
            hist.record(row["iter"], row["loss"], row["time"], row["metrics"])
        elapsed = float(ck["elapsed"])
        hist.info["resumed_from"] = start

    def save(t: int) -> None:
        if comm.rank != 0:
            return
        _save_checkpoint(checkpoint, {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "method": stepper.method, "iteration": t, "shape": list(problem.shape),
            "ranks": list(problem.ranks), "dtype": _dtype_name(problem.dtype),
            "n_train": problem.n_train, "world_size": comm.world_size, "elapsed": elapsed,
            "options": dict(options), "state": stepper.state_dict(),
            "history": [{"iter": i, "loss": l, "time": s, "metrics": m} for i, l, s, m in
                        zip(hist.iters, hist.loss, hist.time, hist.metrics)],
        })

    t = start
    # the iterate t (stepper.p before step t) and the iterate of the history's last row
    p_t = x_row = stepper.p
    try:
        for t in range(start, iters + 1):
            p_t = stepper.p
            want = metrics_every and (t % metrics_every == 0 or t == iters)
            m = problem.metrics(stepper.p) if want else {}
            if t == start:  # (the same dict on every process: a collective's result)
                check_stop_options(metrics_every, stop_metric, stop_tol, m)
            reached = stop_metric is not None and m.get(stop_metric, math.inf) <= stop_tol
            if t == iters or reached:
                hist.record(t, stepper.loss_now(), elapsed, m)
                x_row = p_t
                if reached:  # (also when met by the last iterate)
                    hist.status = "converged"
                if callback is not None:
                    callback(t, hist)
                break
            t0 = time.perf_counter()
            loss = stepper.step()
            hist.record(t, loss, elapsed, m)  # time: seconds spent reaching iterate t
            x_row = p_t
            elapsed += time.perf_counter() - t0
            if not math.isfinite(loss):
                hist.status = "diverged"
                break
            if callback is not None and callback(t, hist):
                hist.status = "stopped"
                # the row of the point returned, iterate t + 1, as run() records it (every
                # process stops here: the callback returns the same value on all of them)
                m = problem.metrics(stepper.p) if metrics_every else {}
                hist.record(t + 1, stepper.loss_now(), elapsed, m)
                x_row = stepper.p
                break
            if checkpoint_every and (t + 1) % checkpoint_every == 0:
                # the rows so far plus the iterate t + 1, so that a resumed run continues
                # exactly where this one would
                save(t + 1)
    except KeyboardInterrupt:
        hist.status = "interrupted"
        hist.info["interrupted_at"] = t
        # the last finished iterate: t + 1 once step t has replaced the point (an
        # interrupt in the callback or the checkpoint), else t
        at = t + (stepper.p is not p_t)
        if not comm.distributed and (not hist.iters or hist.iters[-1] < at):
            # its row (in one process: no peer to wait for)
            try:
                m = problem.metrics(stepper.p) if metrics_every else {}
                hist.record(at, stepper.loss_now(), elapsed, m)
            except KeyboardInterrupt:
                pass
        if hist.iters and hist.iters[-1] < at:
            # no row of it (the peers are not there for its metrics): the point of the
            # last row, so that the point and the history agree
            stepper.p = x_row
    hist.info["restarts"] = getattr(stepper, "restarts", 0)
    hist.info.update(getattr(stepper, "info", {}))
    hist.x = stepper.p
    return hist


def distributed_cg(problem: ShardedCompletion, x0: torch.Tensor, *, iters: int = 100,
                   beta: str = "pr+", restart_tol: float = 0.1,
                   restart_every: Optional[int] = None, metrics_every: int = 1,
                   checkpoint: Optional[str] = None, checkpoint_every: int = 0,
                   resume: bool = False, callback: Optional[Callable] = None,
                   stop_metric: Optional[str] = None,
                   stop_tol: Optional[float] = None) -> History:
    """Data-parallel Riemannian CG (Polak-Ribiere+ with Powell restarts, exact line search,
    transport by projection): the iteration of
    :func:`ttmanifold.experiments.solvers.riemannian_cg`, with the gradient and the line
    search's denominator summed over the processes.

    Args:
        problem: this process's :class:`ShardedCompletion` (every process of the group
            calls with its own shard and the same other arguments).
        x0: the start, the same on every process (:meth:`ShardedCompletion.initial_point`).
        iters: number of iterations (counting from 0, also when resuming: at least the
            checkpoint's iteration, else ``ValueError``).
        beta, restart_tol, restart_every: as in ``riemannian_cg``.
        metrics_every: global metrics every k iterations (0: never; one extra all-reduce).
        checkpoint: a file path; rank 0 writes it atomically every ``checkpoint_every``
            iterations (point, search direction, restart counter, iteration, shapes, ranks,
            dtype, history) and all processes resume from it with ``resume=True`` (rank 0
            reads it and broadcasts). A resumed run continues to the same iterates as an
            uninterrupted one (bitwise with the same number of processes).
        callback: ``callback(t, history) -> bool`` on every process after each iteration
            (True stops the run after recording the row of the point it returns, which
            takes the metrics' all-reduce: return the same value on every process).
        stop_metric, stop_tol: stop when ``metrics[stop_metric] <= stop_tol``.

    Returns a :class:`~ttmanifold.experiments.solvers.History` (``x`` the final packed
    point; ``status`` ``"ok"``, ``"converged"``, ``"stopped"``, ``"diverged"`` or
    ``"interrupted"`` (Ctrl-C: ``x`` is the iterate of the history's last row; in one
    process the last finished iterate, its row added)). Raises
    :class:`PeerFailure` when a peer process dies, and ``ValueError`` on every process
    when the processes were called with different arguments or ``x0`` (checked at the
    start by one all-gather of the arguments and a digest of ``x0``; the other solvers
    too).

    Cost per iteration and process: one :meth:`Completion.cg_grad` and one tangent
    evaluation on the shard (O(N_local d r^2)), the retraction and two transports
    (O(d n r^3), replicated), and two all-reduces (``dim M + 1`` numbers and 1 number).
    """
    x0 = _start(problem, x0)
    stepper = _CG(problem, x0, beta, restart_tol, restart_every)
    return _run(problem, stepper, iters=iters, metrics_every=metrics_every,
                checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
                callback=callback, stop_metric=stop_metric, stop_tol=stop_tol,
                options={"beta": beta, "restart_tol": restart_tol,
                         "restart_every": restart_every})


def distributed_rsgd(problem: ShardedCompletion, x0: torch.Tensor, *, lr: float,
                     iters: int = 100, metrics_every: int = 1,
                     checkpoint: Optional[str] = None, checkpoint_every: int = 0,
                     resume: bool = False, callback: Optional[Callable] = None,
                     stop_metric: Optional[str] = None,
                     stop_tol: Optional[float] = None) -> History:
    """Data-parallel Riemannian gradient descent with a fixed step ``lr``:
    ``X <- R_X(-lr grad f(X))``, the update of ``geoopt.optim.RiemannianSGD`` (no momentum)
    with the gradient summed over the processes. Arguments and result as in
    :func:`distributed_cg`. Cost per iteration: one ``cg_grad`` on the shard, one
    retraction, one all-reduce of ``dim M + 1`` numbers."""
    x0 = _start(problem, x0)
    stepper = _SGD(problem, x0, lr)
    return _run(problem, stepper, iters=iters, metrics_every=metrics_every,
                checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
                callback=callback, stop_metric=stop_metric, stop_tol=stop_tol,
                options={"lr": float(lr)})


def distributed_lbfgs(problem: ShardedCompletion, x0: torch.Tensor, *, iters: int = 100,
                      memory: int = 10, c1: float = 1e-4, metrics_every: int = 1,
                      checkpoint: Optional[str] = None, checkpoint_every: int = 0,
                      resume: bool = False, callback: Optional[Callable] = None,
                      stop_metric: Optional[str] = None,
                      stop_tol: Optional[float] = None) -> History:
    """Data-parallel Riemannian L-BFGS: the iteration of
    :func:`ttmanifold.experiments.solvers.riemannian_lbfgs` (two-loop recursion on the last
    ``memory`` pairs, kept in the current tangent space by projection; cautious updates;
    Armijo backtracking ``t = 1, 1/2, ...``), with the loss and gradient summed over the
    processes. The direction, the transports and the step rule run on every process on the
    same bits.

    Args:
        problem, x0, iters, metrics_every, callback, stop_metric, stop_tol: as in
            :func:`distributed_cg`.
        memory: number of ``(s, y)`` pairs; c1: the Armijo constant, in ``(0, 1)``.
        checkpoint, checkpoint_every, resume: as in :func:`distributed_cg`; the checkpoint
            holds the point and the whole memory (pairs and their ``1/<s, y>``), so a
            resumed run continues to the same iterates (bitwise with the same number of
            processes).

    Returns a :class:`~ttmanifold.experiments.solvers.History` (``info``: ``backtracks``,
    ``skipped_updates``, ``grad_norms``). Raises :class:`PeerFailure` when a peer dies.

    Cost per iteration and process: one ``cg_grad`` on the shard (O(N_local d r^2)) and
    one all-reduce of ``dim M + 1`` numbers; per trial that is not fused with it (the
    first after a backtracking iteration, and every backtrack) one loss on the shard and
    an all-reduce of 1 number; replicated: the retraction per trial and ``2 memory + 2``
    transports (O(d n r^3) each).
    """
    x0 = _start(problem, x0)
    stepper = _LBFGS(problem, x0, memory, c1)
    return _run(problem, stepper, iters=iters, metrics_every=metrics_every,
                checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
                callback=callback, stop_metric=stop_metric, stop_tol=stop_tol,
                options={"memory": memory, "c1": float(c1)})


def distributed_trust_region(problem: ShardedCompletion, x0: torch.Tensor, *,
                             iters: int = 50, radius: Optional[float] = None,
                             max_radius: Optional[float] = None,
                             max_inner: Optional[int] = None, theta: float = 1.0,
                             kappa: float = 0.1, max_backtracks: int = 4,
                             metrics_every: int = 1,
                             checkpoint: Optional[str] = None, checkpoint_every: int = 0,
                             resume: bool = False, callback: Optional[Callable] = None,
                             stop_metric: Optional[str] = None,
                             stop_tol: Optional[float] = None) -> History:
    """Data-parallel Riemannian trust region with the exact Hessian (curvature term
    included) and a truncated (Steihaug-Toint) CG inner solver: the iteration of
    :func:`ttmanifold.experiments.solvers.riemannian_trust_region`, with the loss, the
    gradient and every Hessian-vector product summed over the processes
    (:meth:`ShardedCompletion.hessian`); every process runs the same inner CG, ratio test
    and radius update.

    Args:
        problem, x0, iters, metrics_every, callback, stop_metric, stop_tol: as in
            :func:`distributed_cg`.
        radius, max_radius, max_inner, theta, kappa: as in ``riemannian_trust_region``
            (default ``max_radius``: twice the larger of ``||X_0||`` and
            ``sqrt(2 f(X_0))``; ``radius``: ``max_radius / 8``; ``max_inner``: ``dim M``).
        max_backtracks: before rejecting a step that fails the ratio test, try up to this
            many halvings ``t eta`` (``t = 1/2, 1/4, ...``) under the same test with the
            model decrease ``t <-g, eta> - t^2 <eta, H eta> / 2``; an accepted one sets the
            radius to ``t ||eta||`` (0: reject at once).
        checkpoint, checkpoint_every, resume: as in :func:`distributed_cg`; the checkpoint
            holds the point, the radius and the counters, so a resumed run continues to the
            same iterates.

    Returns a :class:`~ttmanifold.experiments.solvers.History` (``info``:
    ``inner_iters``, ``hess_products``, ``rejected``, ``backtracked``, ``grad_norms``).
    Raises
    :class:`PeerFailure` when a peer dies.

    Cost per outer iteration and process: one ``cg_grad`` on the shard at the trial point
    and one all-reduce of ``dim M + 1`` numbers (loss and gradient together); per inner
    iteration one Hessian product on the shard (autodiff, a few O(N_local d r^2) passes)
    and one all-reduce of ``S`` numbers; replicated: one retraction and O(S) vector work
    per inner iteration; per backtrack one loss on the shard and an all-reduce of 1 number.
    """
    x0 = _start(problem, x0)
    stepper = _TR(problem, x0, radius, max_radius, max_inner, theta, kappa, max_backtracks)
    return _run(problem, stepper, iters=iters, metrics_every=metrics_every,
                checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
                callback=callback, stop_metric=stop_metric, stop_tol=stop_tol,
                options={"radius": radius, "max_radius": max_radius,
                         "max_inner": max_inner, "theta": float(theta),
                         "kappa": float(kappa), "max_backtracks": max_backtracks})


def distributed_als(problem: ShardedCompletion, x0: torch.Tensor, *, iters: int = 50,
                    ridge: float = 1e-12, metrics_every: int = 1,
                    checkpoint: Optional[str] = None, checkpoint_every: int = 0,
                    resume: bool = False, callback: Optional[Callable] = None,
                    stop_metric: Optional[str] = None,
                    stop_tol: Optional[float] = None) -> History:
    """Data-parallel alternating least squares for completion: the sweeps of
    :func:`ttmanifold.experiments.solvers.als_completion`, each core's normal equations
    summed over the processes before every process solves the same system.

    Args:
        problem, x0, iters, metrics_every, callback, stop_metric, stop_tol: as in
            :func:`distributed_cg` (one iteration is one sweep, left to right and back).
        ridge: as in :func:`~ttmanifold.experiments.solvers.als_core_solve`.
        checkpoint, checkpoint_every, resume: as in :func:`distributed_cg`; the checkpoint
            holds the cores the sweeps continue from.

    Returns a :class:`~ttmanifold.experiments.solvers.History`. Raises :class:`PeerFailure`
    when a peer dies.

    Cost per sweep and process: O(N_local d r^4 + d n r^6) and ``2 d - 1`` all-reduces of
    ``n_k r_{k-1} r_k (r_{k-1} r_k + 1)`` numbers (the normal matrices and right-hand
    sides of core ``k``), plus the loss (one all-reduce of one number).
    """
    x0 = _start(problem, x0)
    stepper = _ALS(problem, x0, ridge)
    return _run(problem, stepper, iters=iters, metrics_every=metrics_every,
                checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
                callback=callback, stop_metric=stop_metric, stop_tol=stop_tol,
                options={"ridge": float(ridge)})


def distributed_rank_adaptive(problem: ShardedCompletion, *, max_rank: int,
                              checkpoint: Optional[str] = None, checkpoint_every: int = 0,
                              resume: bool = False, callback: Optional[Callable] = None,
                              **options) -> History:
    """Data-parallel rank-adaptive completion from rank 1: the search of
    :func:`ttmanifold.experiments.solvers.rank_adaptive_completion` (the same code: greedy
    raises, control-set acceptance, patience, rounding), with every sum over the samples
    all-reduced and the inner CG data-parallel, so every process takes the same decisions
    and ends at the same point.

    Per stage (one raise and the CG at the trial ranks) and process: the greedy raise
    all-reduces, per raised bond, its ``(r_{k-1} n_{k-1}) x (n_k r_{k+1})`` bond matrix
    and the ``m + m^2`` numbers of its line search (``2 m`` per bond for the choice of
    bonds); the CG all-reduces ``dim M + 1`` and 1 numbers per iteration; the control error
    2 numbers, the metrics 6; rebuilding the sharded problem at the trial ranks one
    gather of the shards' checks and an all-reduce of 2 numbers. The start: the slice
    means all-reduce ``2 (n_1 + ... + n_d) + 2`` numbers; the spectral start
    (``start="spectral"``, or ``"auto"``, the default, which fits from both) all-gathers
    the training samples once (``|Omega| (d + 1)`` numbers received by every process,
    held until the start is computed) and every process computes the same rank-1 point
    from them in one order, so 1 and N processes start alike; ``"auto"``'s choice
    all-reduces 2 more numbers. With ``time_budget``, rank 0's clock decides (one
    broadcast per CG iteration).

    Args:
        problem: this process's :class:`ShardedCompletion` (its ranks are not used; its
            training samples are split into this process's training and control samples
            by :func:`control_mask`, the same split for any number of processes).
        max_rank: the rank cap of every bond.
        options: the other options of ``rank_adaptive_completion`` (``control_fraction``,
            ``inner_iters``, ``seed``, ``patience``, ``time_budget``, ``max_iters``, ...);
            ``control``: a bool mask over this shard's training samples replacing the hash
            split.
        checkpoint, checkpoint_every: rank 0 writes the search's state to the file
            ``checkpoint`` at every ``checkpoint_every``-th accepted stage (the start
            counts); resume: continue from it (all processes; the same result as the
            uninterrupted run, bitwise with the same number of processes).
        callback: ``callback(t, history) -> bool`` on every process after every record
            (True stops; return the same value on every process).

    Returns a :class:`~ttmanifold.experiments.solvers.History` as
    ``rank_adaptive_completion``'s (method ``"rank_adaptive-dp"``; metrics ``train_err``,
    ``val_err``, ... of ``problem`` and ``control_err``). Raises :class:`PeerFailure` when
    a peer dies.

    Cost per process: the single-process search's on ``N_local`` samples (O(N_local d r^2)
    per CG iteration, O(N_local d r^2 + (r n)^3) per raised bond), plus the messages above.
    """
    if not isinstance(problem, ShardedCompletion):
        raise TypeError(f"problem: expected a ShardedCompletion, got {type(problem).__name__}")
    _check_checkpoint_args(checkpoint, checkpoint_every, resume)
    comm = problem.comm
    # the options that decide the search, defaults filled in (a time budget may change
    # between runs)
    skip = ("problem", "max_rank", "time_budget", "control", "callback", "stage_callback",
            "resume_state")
    kept = {"max_rank": max_rank,
            **{k: p.default for k, p in inspect.signature(
                rank_adaptive_completion).parameters.items() if k not in skip},
            **{k: v for k, v in options.items() if k not in skip}}
    # (a budget's value may differ; whether one is set may not: rank 0's clock is then
    # broadcast every CG iteration, and a process without one waited elsewhere)
    _check_same_call(comm, {"method": "rank_adaptive", **kept,
                            "time_budget (set)": options.get("time_budget") is not None,
                            "checkpoint": checkpoint is not None,
                            "checkpoint_every": checkpoint_every, "resume": resume}, None,
                     _checkpoint_error(comm, checkpoint, checkpoint_every))
    state = None
    if resume:
        want = {"method": "rank_adaptive", "shape": list(problem.shape),
                "dtype": _dtype_name(problem.dtype), "n_train": problem.n_train,
                "options": kept}

        def check(ck):
            for key, val in want.items():
                if ck.get(key) != val:
                    raise ValueError(f"checkpoint: {checkpoint!r} has {key} = "
                                     f"{ck.get(key)!r}, this run has {val!r}; it "
                                     f"belongs to another run")

        state = _shared_checkpoint(comm, checkpoint, check)["state"]

    def save(st: dict) -> None:
        if comm.rank != 0 or st["stage"] % checkpoint_every:
            return
        _save_checkpoint(checkpoint, {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "method": "rank_adaptive", "iteration": st["step"], "stage": st["stage"],
            "shape": list(problem.shape), "ranks": list(st["ranks"]),
            "dtype": _dtype_name(problem.dtype), "n_train": problem.n_train,
            "world_size": comm.world_size, "elapsed": st["elapsed"], "options": kept,
            "state": st,
            "history": [{"iter": t, "loss": l_, "time": s_, "metrics": m}
                        for t, l_, s_, m in st["rows"]],
        })

    hist = rank_adaptive_completion(problem, max_rank=max_rank, callback=callback,
                                    stage_callback=save if checkpoint_every else None,
                                    resume_state=state, **options)
    hist.method = "rank_adaptive-dp"
    hist.info.update(world_size=comm.world_size, n_train=problem.n_train,
                     n_val=problem.n_val, options=dict(kept))
    return hist
