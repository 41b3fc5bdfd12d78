"""Many completion problems in one call: :class:`BatchedCompletion` (``B`` problems of one
shape and TT-rank, each with its own samples, ragged counts) and
:func:`batched_riemannian_cg`, Riemannian CG over the batch with a per-problem exact line
search and per-problem convergence.

Every iteration is the work of one iteration of :func:`~.solvers.riemannian_cg` done once
for the whole batch: the sampled kernels run once on the stacked TT of the batch
(:class:`~ttmanifold.tt.BatchIndexSet`), the retraction, the transports and the gauge
projection are batched over the points, and the CG scalars (step, ``beta``, restarts) are
per problem. Design: ``docs/sampled_entries.md#batches-of-index-sets``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .._checks import check_float_dtype
from ..manifold import FixedTTRank, right_cores
from ..tt import BatchIndexSet
from ..tt.tensor_train import fro_norm
from .problems import (Completion, check_distinct, check_train_and_test,
                       power_of_two_scale)
from .solvers import cg_direction, check_solver_options

__all__ = ["BatchedCompletion", "BatchedCGResult", "batched_cg_direction",
           "batched_riemannian_cg"]

#: status codes of :class:`BatchedCGResult` (per problem)
STATUS = ("running", "converged", "max_iters", "diverged")


def _norm_per_problem(x: torch.Tensor, problem: torch.Tensor, B: int) -> torch.Tensor:
    """Per problem the 2-norm of ``x`` (one entry per sample or layout slot; ``problem``
    the problem of each entry, ``B`` for entries of none), ``(B,)``, scaled by the
    problem's largest entry: a sum of squares underflowed below ~1e-154 in float64
    (~1e-19 in float32), so the relative errors were 0 / 0 = NaN. O(N)."""
    a = x.abs()
    m = a.new_zeros(B + 1).scatter_reduce_(0, problem, a, "amax")
    m = m.clamp_min(torch.finfo(x.dtype).tiny)
    sq = a.new_zeros(B + 1).index_add_(0, problem, (x / m[problem]) ** 2)
    return (sq.sqrt() * m)[:B]


def _per_problem_scale(x: torch.Tensor, problem: torch.Tensor, B: int) -> torch.Tensor:
    """Per problem the power of two at or above its entries' largest magnitude (1 for none
    or all zero), ``(B,)``: :func:`~.problems.power_of_two_scale` per problem. O(N)."""
    m = x.abs().new_zeros(B + 1).scatter_reduce_(0, problem, x.detach().abs(), "amax")[:B]
    return power_of_two_scale(m.unsqueeze(-1), dim=-1).squeeze(-1)


class BatchedCompletion:
    """``B`` tensor-completion problems of one shape and TT-rank, each with its own sample
    set (ragged counts; an empty set is allowed: its problem is solved by any point).

    Args:
        problems: a list of :class:`~.problems.Completion` of one shape, ranks, dtype and
            device (their samples, data, weights and ``reg`` are taken as they are now).

    Problem ``b`` has the loss of ``problems[b]`` (``(w_b/2) ||P_Omega_b(X_b - A_b)||^2``,
    plus ``(reg_b/2) ||X_b||^2``) and its test set (an empty one, test error NaN, for a
    problem without one, when some problem has one); the batch's points are ``(B, size)`` tensors of
    :attr:`manifold`. :meth:`cg_grad` and :meth:`exact_step` give what
    :func:`batched_riemannian_cg` needs, one value (or gradient) per problem, from one
    sweep of the sampled kernels over all problems. :meth:`from_data` builds a batch from
    raw samples.
    """

    name = "batched_completion"

    def __init__(self, problems: Sequence[Completion]):
        if isinstance(problems, Completion) or not isinstance(problems, (list, tuple)):
            raise TypeError(f"problems: expected a list of Completion problems, got "
                            f"{type(problems).__name__}")
        if not problems:
            raise ValueError("problems: expected at least one problem")
        first = problems[0]
        for b, pr in enumerate(problems):
            if not isinstance(pr, Completion):
                raise TypeError(f"problems[{b}]: expected a Completion, got {type(pr).__name__}")
            M = pr.manifold
            if M.shape != first.manifold.shape or M.ranks != first.manifold.ranks:
                raise ValueError(f"problems[{b}]: shape {M.shape} and ranks {M.ranks}, "
                                 f"problems[0] has {first.manifold.shape} and "
                                 f"{first.manifold.ranks}")
            if pr.dtype != first.dtype or pr.device != first.device:
                raise ValueError(f"problems[{b}]: dtype {pr.dtype} on {pr.device}, problems[0] "
                                 f"{first.dtype} on {first.device}")
        sw = [torch.full((len(pr.train),), math.sqrt(pr.weight), dtype=first.dtype,
                         device=first.device) if pr.weights is None
              else (pr.weight * pr.weights).sqrt() for pr in problems]
        tests = None
        if any(pr.test is not None for pr in problems):
            # a problem without a test set gets an empty one (test_err NaN), the others
            # keep theirs
            none = (torch.zeros(0, len(first.manifold.shape), dtype=torch.long,
                                device=first.device), first.a_train[:0])
            tests = ([none[0] if pr.test is None else pr.test.indices for pr in problems],
                     [none[1] if pr.test is None else pr.a_test for pr in problems])
        self._setup(first.manifold.shape, first.manifold.ranks,
                    [pr.train.indices for pr in problems], [pr.a_train for pr in problems],
                    sw, tests, [float(pr.reg) for pr in problems])

    @classmethod
    def from_data(cls, indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                  shape, ranks, *, test=None, dtype=None,
                  device=None) -> "BatchedCompletion":
        """``B`` problems from raw samples.

        Args:
            indices: ``B`` integer tensors ``(N_b, d)`` or nested lists (``N_b`` may be 0:
                an empty list too), distinct multi-indices within each problem (a repeated
                one raises ``ValueError`` naming ``indices[b]``, as
                :meth:`Completion.from_data` does).
            values: ``B`` tensors ``(N_b,)``, the observed entries.
            shape, ranks: the tensors' shape and the TT-ranks (a tuple of ``d + 1`` values,
                boundary ones included; or an int, every inner rank).
            test: optional held-out sets ``(test_indices, test_values)``, two lists of ``B``
                (test samples of problem ``b`` that are also its training samples warn
                naming ``test[0][b]``: its ``test_err`` would measure the fit there, as
                :meth:`Completion.from_data` warns).
            dtype, device: of the problems' tensors (default float64, CPU).
        Returns:
            a :class:`BatchedCompletion`; problem ``b`` has the loss
            ``(w_b/2) sum_i (X_b[i] - values_b[i])^2``, ``w_b = n_1...n_d / N_b`` (as
            :meth:`Completion.from_data <ttmanifold.experiments.problems.Completion.from_data>`
            without weights).
        Cost: O(N d) checks, O((N + M) log(N + M)) for the duplicate and overlap checks (on
        the host), and the layouts of the stacked index set.
        """
        dtype = torch.float64 if dtype is None else dtype
        check_float_dtype(dtype, "dtype")  # (an int dtype truncated the values silently)
        device = torch.device("cpu") if device is None else torch.device(device)
        M = FixedTTRank(shape, ranks)
        self = cls.__new__(cls)
        if not isinstance(values, (list, tuple)) or not isinstance(indices, (list, tuple)) \
                or len(values) != len(indices):
            raise ValueError("values: expected a list of one tensor per index set")
        vals = []
        # (lists of multi-indices too, as Completion.from_data takes them)
        indices = [torch.as_tensor(i) for i in indices]
        indices = [i.reshape(0, len(M.shape)).long() if i.numel() == 0 else i for i in indices]
        for b, (i, v) in enumerate(zip(indices, values)):
            if i.dim() != 2 or i.shape[1] != len(M.shape):
                raise ValueError(f"indices[{b}]: expected shape (N_{b}, {len(M.shape)}), got "
                                 f"{tuple(i.shape)}")
            v = torch.as_tensor(v, dtype=dtype, device=device)
            if v.shape != (int(i.shape[0]),):
                raise ValueError(f"values[{b}]: expected shape ({int(i.shape[0])},), got "
                                 f"{tuple(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"values[{b}]: not all finite")
            vals.append(v)
        total = math.prod(M.shape)
        sw = [torch.full((len(v),), math.sqrt(total / max(len(v), 1)), dtype=dtype,
                         device=device) for v in vals]
        tests = None
        if test is not None:
            if not (isinstance(test, (list, tuple)) and len(test) == 2):
                raise TypeError("test: expected (list of test indices, list of test values)")
            tests = ([torch.as_tensor(t).to(device) for t in test[0]],
                     [torch.as_tensor(t, dtype=dtype, device=device) for t in test[1]])
            for b, v in enumerate(tests[1]):  # (a NaN gave a NaN test_err silently)
                if not bool(torch.isfinite(v).all()):
                    raise ValueError(f"test[1][{b}]: contains NaN or Inf")
        self._setup(M.shape, M.ranks, [torch.as_tensor(i).to(device) for i in indices], vals,
                    sw, tests, [0.0] * len(vals))
        for b, idx in enumerate(self.train.indices):  # (in range: checked by the sets)
            if tests is None:
                check_distinct(idx, M.shape, f"indices[{b}]")
            else:  # (test samples that are training samples warn, as Completion.from_data)
                check_train_and_test(idx, self.test.indices[b], M.shape,
                                     (f"indices[{b}]", f"test[0][{b}]"))
        return self

    def _setup(self, shape, ranks, indices, values, sw, tests, reg) -> None:
        self.manifold = FixedTTRank(shape, ranks)
        self.train = BatchIndexSet(list(indices), shape)
        self.batch_size = B = self.train.batch_size
        self.a_train = torch.cat(list(values))
        self.dtype, self.device = self.a_train.dtype, self.a_train.device
        self._sw = torch.cat(list(sw))  # sqrt of the per-sample weights, sample order
        self.reg = torch.tensor(reg, dtype=self.dtype, device=self.device)
        self._has_reg = any(r != 0 for r in reg)
        self.a_train_norm = _norm_per_problem(self.a_train, self.train.problem, B)
        self.test = self.a_test = self.a_test_norm = None
        if tests is not None:
            if len(tests[0]) != B or len(tests[1]) != B:
                raise ValueError(f"test: expected {B} test sets and {B} value tensors")
            self.test = BatchIndexSet(list(tests[0]), shape)
            self.a_test = torch.cat(list(tests[1]))
            if self.a_test.shape != (len(self.test),):
                raise ValueError("test: the test values do not match the test indices")
            self.a_test_norm = _norm_per_problem(self.a_test, self.test.problem, B)
        self._layout_cache: Dict[int, tuple] = {}

    def __repr__(self) -> str:
        M = self.manifold
        return (f"BatchedCompletion(B={self.batch_size}, shape={M.shape}, ranks={M.ranks}, "
                f"N={list(self.train.counts)})")

    # -- points ---------------------------------------------------------------------------
    def initial_point(self, generator=None) -> torch.Tensor:
        """``B`` random unit-norm points ``(B, size)`` (drawn in float64 on the CPU, then
        cast). ``generator``: a ``torch.Generator`` or a seed."""
        if not isinstance(generator, torch.Generator):
            generator = torch.Generator().manual_seed(0 if generator is None else int(generator))
        p = self.manifold.random(self.batch_size, dtype=torch.float64, generator=generator)
        return p.to(dtype=self.dtype, device=self.device)

    def _check_points(self, p: torch.Tensor, name: str = "p") -> None:
        B, size = self.batch_size, self.manifold.size
        if not isinstance(p, torch.Tensor) or p.shape != (B, size):
            got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"{name}: expected {B} points of shape ({B}, {size}), got {got}")
        if p.dtype != self.dtype or p.device != self.device:
            raise ValueError(f"{name}: dtype {p.dtype} on {p.device}, the problems' "
                             f"{self.dtype} on {self.device}")

    def loss(self, p: torch.Tensor) -> torch.Tensor:
        """The ``B`` losses ``(B,)`` at the points ``p`` ``(B, size)``. O(N d r^2)."""
        self._check_points(p)
        with torch.no_grad():
            z = (self.train.gather(self.manifold.split(p)) - self.a_train) * self._sw
            out = 0.5 * self.train.sum_per_problem(z * z)
            if self._has_reg:
                xt = self.manifold.point_as_tangent(p)
                out = out + 0.5 * self.reg * (xt * xt).sum(-1)
        return out

    def metrics(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per problem ``(B,)``: ``train_err`` (and ``test_err`` with test sets),
        ``||X_b - A_b|| / ||A_b||`` on the samples (NaN for an empty set). O(N d r^2)."""
        self._check_points(p)
        cores = self.manifold.split(p)
        out = {}
        with torch.no_grad():
            sets = [("train", self.train, self.a_train, self.a_train_norm)]
            if self.test is not None:
                sets.append(("test", self.test, self.a_test, self.a_test_norm))
            for name, bset, a, a_norm in sets:
                res = _norm_per_problem(bset.gather(cores) - a, bset.problem, bset.batch_size)
                out[f"{name}_err"] = res / a_norm
        return out

    # -- CG pieces ------------------------------------------------------------------------
    def _layout(self, point):
        """The data and the weights in ``point``'s last layout (cached per layout)."""
        key = id(point.layout)
        hit = self._layout_cache.get(key)
        if hit is None or hit[0] is not point.layout:
            hit = (point.layout, point.from_samples(self.a_train), point.from_samples(self._sw))
            self._layout_cache[key] = hit
        return hit[1], hit[2]

    def cg_grad(self, p: torch.Tensor):
        """``(loss, rgrad, ctx)`` at the points ``p`` ``(B, size)``: the losses ``(B,)``,
        the Riemannian gradients ``(B, size)`` (packed gauged deltas) and a context for
        :meth:`exact_step` (it also holds ``train_err``, ``(B,)``). One sampled point of the
        stacked TT (O(N d r^2)), batched right cores and gauge projection (O(B d n r^3))."""
        M, I = self.manifold, self.train
        B = self.batch_size
        with torch.no_grad():
            U = M.split(p, "p")
            point = I.sampled_point(U, right_cores(U))
            a, sw = self._layout(point)
            r = torch.where(point.mask, point.values - a, 0.0)
            z = r * sw
            D = point.project(z * sw)
            grad = M.proju(p, torch.cat([c.reshape(B, -1) for c in D], -1))
            loss = 0.5 * I.layout_sum(point, z * z)
            train_err = _norm_per_problem(r, I.layout_problem(point), B) / self.a_train_norm
            xt = None
            if self._has_reg:
                xt = M.point_as_tangent(p)
                loss = loss + 0.5 * self.reg * (xt * xt).sum(-1)
                grad = grad + self.reg.unsqueeze(1) * xt
        return loss, grad, BatchedCompletionContext(point, z, xt, train_err)

    def exact_step(self, p: torch.Tensor, eta: torch.Tensor, ctx) -> torch.Tensor:
        """Per problem ``alpha_b = -<P_Omega_b(X_b - A_b), P_Omega_b eta_b> / ||P_Omega_b
        eta_b||^2`` (weighted; plus the ``reg`` terms), ``(B,)``; 0 where ``eta_b``
        vanishes on the samples. ``ctx``: from :meth:`cg_grad` at ``p``. O(N d r^2)."""
        I = self.train
        with torch.no_grad():
            point = ctx.point
            _, sw = self._layout(point)
            e = point.tangent(self.manifold.split(eta, "eta")) * sw
            # per problem on vectors rescaled by powers of two (exact; see
            # problems.power_of_two_scale): the products underflowed for tiny data
            prob = I.layout_problem(point)
            B = self.batch_size
            ce = _per_problem_scale(e, prob, B)
            cz = _per_problem_scale(ctx.z, prob, B)
            if ctx.xt is not None:
                ce = torch.maximum(ce, power_of_two_scale(eta, dim=-1).squeeze(-1))
                cz = torch.maximum(cz, power_of_two_scale(ctx.xt, dim=-1).squeeze(-1))
            es = e / torch.cat([ce, ce.new_ones(1)])[prob]
            num = I.layout_sum(point, ctx.z / torch.cat([cz, cz.new_ones(1)])[prob] * es)
            den = I.layout_sum(point, es * es)
            if ctx.xt is not None:
                etas = eta / ce.unsqueeze(-1)
                num = num + self.reg * (ctx.xt / cz.unsqueeze(-1) * etas).sum(-1)
                den = den + self.reg * (etas * etas).sum(-1)
            return -num / den.clamp_min(torch.finfo(e.dtype).tiny) * (cz / ce)


class BatchedCompletionContext:
    """What :meth:`BatchedCompletion.exact_step` reuses at the points: the sampled point of
    the stacked TT, the weighted residual ``z`` (its last layout), ``X`` as tangent vectors
    (regularized problems) and the relative training residuals ``(B,)``."""

    __slots__ = ("point", "z", "xt", "train_err")

    def __init__(self, point, z, xt, train_err):
        self.point, self.z, self.xt, self.train_err = point, z, xt, train_err


def batched_cg_direction(g, g_new, g_tr, eta_tr, k, *, beta_rule: str, restart_tol: float,
                         restart_every: Optional[int]):
    """Per problem, the next CG direction ``-g_new + beta * eta_tr``: the rule of
    :func:`~.solvers.cg_direction` applied to every row of ``(B, size)`` tensors.

    Args:
        g, g_new, g_tr, eta_tr: ``(B, size)`` old and new gradients, old gradient and
            direction transported to the new points; k: ``(B,)`` iterations since each
            problem's last restart (this one counted); beta_rule, restart_tol,
            restart_every: as for :func:`~.solvers.cg_direction`.
    Returns:
        ``(eta_new, restarted)`` with ``restarted`` a ``(B,)`` bool tensor. No host sync.
    Cost: O(B size).
    """
    return cg_direction(g, g_new, g_tr, eta_tr, k, beta_rule=beta_rule,
                        restart_tol=restart_tol, restart_every=restart_every)


@dataclass
class BatchedCGResult:
    """The outcome of :func:`batched_riemannian_cg`, per problem.

    Attributes:
        x: ``(B, size)`` final points.
        iterations: ``(B,)`` CG iterations each problem took.
        status: ``B`` strings: ``"converged"`` (met ``tol``/``gtol``, or a zero gradient),
            ``"max_iters"``, ``"diverged"`` (a non-finite step or loss: the last finite
            point is kept).
        loss: ``(T + 1, B)`` the losses after every iteration of the batch (a finished
            problem's loss stays constant).
        train_err: ``(T + 1, B)`` the relative training residuals likewise.
        restarts: ``(B,)`` CG restarts per problem.
        time: wall time of the iterations (seconds, CUDA-synchronized).
        metrics: final :meth:`BatchedCompletion.metrics` (``(B,)`` tensors).
    """

    x: torch.Tensor
    iterations: torch.Tensor
    status: List[str]
    loss: torch.Tensor
    train_err: torch.Tensor
    restarts: torch.Tensor
    time: float
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def batched_riemannian_cg(problem: BatchedCompletion, x0: Optional[torch.Tensor] = None, *,
                          iters: int = 100, beta: str = "pr+",
                          restart_every: Optional[int] = None, restart_tol: float = 0.1,
                          tol: Optional[float] = None, gtol: Optional[float] = None,
                          metrics: bool = True) -> BatchedCGResult:
    """Riemannian CG with exact line search on ``B`` completion problems at once.

    Every iteration is :func:`~.solvers.riemannian_cg`'s for every active problem: the
    exact step ``alpha_b`` from per-problem scalars, the retraction and the transports of
    all points in one batched call, the direction by :func:`batched_cg_direction`. For the
    same starting points the iterates equal ``B`` independent runs of
    :func:`~.solvers.riemannian_cg` (to rounding).

    Args:
        problem: a :class:`BatchedCompletion`.
        x0: ``(B, size)`` starting points (default :meth:`BatchedCompletion.initial_point`).
        iters: at most this many iterations per problem.
        beta, restart_every, restart_tol: as for :func:`~.solvers.riemannian_cg`.
        tol: a problem stops once its relative training residual ``||P_Omega(X - A)|| /
            ||P_Omega A||`` is at most ``tol``;
        gtol: ... or once its Riemannian gradient norm is at most ``gtol``. A problem with
            an exactly zero gradient (e.g. an empty sample set) stops at once.
        metrics: evaluate :meth:`BatchedCompletion.metrics` at the final points.
    Returns:
        a :class:`BatchedCGResult`. A finished problem keeps its point (its step is 0 and
        its state is not updated) while the others go on; the loop ends when all are done.
    Cost per iteration: one ``cg_grad`` and one ``exact_step`` of the batch (O(N d r^2)
    over all samples, one kernel call each) plus O(B d n r^3) batched; one host read
    (whether any problem is still active).
    """
    if not isinstance(problem, BatchedCompletion):
        raise TypeError(f"problem: expected a BatchedCompletion, got {type(problem).__name__}")
    check_solver_options("rcg", beta=beta, restart_tol=restart_tol,
                         restart_every=restart_every)
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters: expected a non-negative int, got {iters!r}")
    for name, v in (("tol", tol), ("gtol", gtol)):
        if v is not None and not v >= 0:
            raise ValueError(f"{name}: expected a non-negative number or None, got {v!r}")
    M = problem.manifold
    p = problem.initial_point() if x0 is None else x0
    problem._check_points(p, "x0")
    if x0 is not None:  # the steps assume valid points (one host read, O(B d n r^3))
        try:
            M.check_point(p, rtol=0.0)
        except ValueError as exc:
            raise ValueError(f"x0: {str(exc)[3:] if str(exc).startswith('p: ') else exc}") \
                from None
    p = p.detach().clone()
    B = problem.batch_size
    dev = p.device
    running, converged, max_iters, diverged = range(4)
    with torch.no_grad():
        loss, g, ctx = problem.cg_grad(p)

        def done(loss_, g_, err_):
            gn = fro_norm(g_, 1)  # (scaled: a tiny gradient's norm underflowed to 0)
            out = gn == 0
            if gtol is not None:
                out = out | (gn <= gtol)
            if tol is not None:
                out = out | (err_ <= tol)
            return out

        status = torch.full((B,), running, dtype=torch.long, device=dev)
        status = torch.where(done(loss, g, ctx.train_err), converged, status)
        status = torch.where(torch.isfinite(loss), status, diverged)
        eta = -g
        k = torch.zeros(B, dtype=torch.long, device=dev)
        its = torch.zeros(B, dtype=torch.long, device=dev)
        restarts = torch.zeros(B, dtype=torch.long, device=dev)
        losses, errs = [loss], [ctx.train_err]
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            active = status == running
            if not bool(active.any()):  # the one host read per iteration
                break
            alpha = problem.exact_step(p, eta, ctx)
            ok = torch.isfinite(alpha)
            status = torch.where(active & ~ok, diverged, status)
            active = active & ok
            alpha = torch.where(active, alpha, torch.zeros_like(alpha))
            p_new, eta_tr = M.retr_transp(p, alpha.unsqueeze(1) * eta, eta)
            g_tr = M.transp(p, p_new, g)
            del ctx
            loss_new, g_new, ctx = problem.cg_grad(p_new)
            ok = torch.isfinite(loss_new) & torch.isfinite(g_new).all(-1)
            status = torch.where(active & ~ok, diverged, status)
            active = active & ok
            k = torch.where(active, k + 1, k)
            eta_new, restart = batched_cg_direction(g, g_new, g_tr, eta_tr, k, beta_rule=beta,
                                                    restart_tol=restart_tol,
                                                    restart_every=restart_every)
            restart = restart & active
            k = torch.where(restart, 0, k)
            restarts = restarts + restart
            its = its + active
            a1 = active.unsqueeze(1)
            # finished problems keep their point and state (their step was 0 anyway)
            p = torch.where(a1, p_new, p)
            eta = torch.where(a1, eta_new, eta)
            g = torch.where(a1, g_new, g)
            loss = torch.where(active, loss_new, loss)
            err = torch.where(active, ctx.train_err, errs[-1])
            status = torch.where(active & done(loss, g, err), converged, status)
            losses.append(loss)
            errs.append(err)
        _sync(dev)
        elapsed = time.perf_counter() - t0
        status = torch.where(status == running, max_iters, status)
    names = [STATUS[s] for s in status.tolist()]
    return BatchedCGResult(x=p, iterations=its, status=names, loss=torch.stack(losses),
                           train_err=torch.stack(errs), restarts=restarts, time=elapsed,
                           metrics=problem.metrics(p) if metrics else {})
