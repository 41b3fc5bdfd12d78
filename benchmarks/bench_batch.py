"""Batches of manifold points (issue 12): time per point of one batched call against a
Python loop over the points, and the aten operations each call dispatches.

    python benchmarks/bench_batch.py            # d = 10, n = 20, r = 4 and 10 (a few minutes)
    python benchmarks/bench_batch.py --quick    # smoke run on small sizes

At d = 10, n = 20, float64, 1 torch thread, for B = 1, 16, 256, 1024 points:

- ``retr``: ``M.retr(p, u)`` of a batch ``(B, size)`` of points and tangent vectors;
- ``project``: ``M.project(p, Z)`` of a batch of rank-r TTs ``Z`` (cores ``(B, r, n, r')``);
- ``adam``: one ``geoopt.optim.RiemannianAdam`` step on one ``ManifoldParameter`` holding the
  batch (zero_grad, per-point loss ``0.5 <X, X> - <X, A>`` from ``p.unpack_tensor()`` summed
  over the points, backward, step), against B parameters in one optimizer (the loop).

``batch``: the batched call, per point (ms); ``loop``: the same work as a Python loop of
single-point calls, per point (measured on min(B, 32) points: its per-point cost does not
depend on B), with the compiled CPU kernels when they are built (``loop_torch`` without);
``speedup`` = loop / batch. Each time is the median of the rounds after one warmup call.

Then the number of aten operations dispatched (``TorchDispatchMode`` counter; what runs on
a GPU as kernel launches) by the torch path for one point and for a batch of 256 points
(d = 10, r = 10), as ``non-view operations + QR/SVD calls (all operations, views
included)``: with the fewer-launch variants a batched call dispatches the operations of a
single-point call whatever B (retr, project), plus one copy per gauge projection of a
batch (riemannian_grad +1; the Adam step +2, and +1 for the loss's sum over the points,
which the one-point loop does not have). Counted twice: with the CPU's choices (interface sweeps one core at a time,
the structured retraction) and with the fewer-launch variants a GPU runs for small inputs
(paired interface sweeps, retraction and transport on block cores built per run; forced
with ``sweeps.PAIRED_SWEEPS``). Copies made by view-like composites (``reshape`` of a
non-contiguous tensor under inference mode) count; profiler markers do not.

    python benchmarks/bench_batch.py --counts-only [--d 50]   # the counts only (seconds)

``--flop-bound`` asks whether the issue's per-point targets at B = 256 (1/10 of the
single-point call at r = 4, 1/3 at r = 10) are excluded by arithmetic: for one point it
times the single-point call (compiled kernels as shipped, median CPU time), counts the
floating-point operations of the same call on the torch path (``FlopCounterMode`` for the
products; QR and SVD calls, which it does not see, counted as Householder QR with the thin Q
formed, ``4 m k^2 - 4 k^3 / 3`` for an ``m x k`` matrix, a lower bound for an SVD) and divides
them by this machine's 2000 x 2000 GEMM rate at one thread: the time the call's arithmetic
takes at the best rate the CPU reaches. ``bound / target`` below 1 means the target is
arithmetically possible, and ``1 / (bound / target)`` is the fraction of the GEMM rate a
batched implementation must sustain to meet it.

    python benchmarks/bench_batch.py --flop-bound              # seconds

``--targets`` prints issue 12's per-point table: for float64 and float32, r = 4 and 10, the
single-point call (median CPU time of ``--single-rounds`` calls) and the batch of 256 (median
of ``--batch-rounds`` calls, per point) of ``retr``, ``project`` and one Adam step (as
above), measured in one process and alternated three times; the middle of the three
``batch / single`` ratios is reported against the target (1/10 at r = 4, 1/3 at r = 10).

    python benchmarks/bench_batch.py --targets                 # under a minute
    python benchmarks/bench_batch.py --targets --keep-freed-memory

``--keep-freed-memory`` first calls ``ttmanifold.kernels.memory.keep_freed_memory()`` (the
opt-in, process-wide glibc setting that reuses large freed blocks instead of faulting
them in afresh; see its docstring), and says so in the header line.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time

import geoopt
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ttmanifold import TT, FixedTTRank, inner, kernels
from ttmanifold.kernels.memory import keep_freed_memory
from ttmanifold.manifold import fixed_rank, sweeps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_manifold import cpu_model, gemm_gflops  # noqa: E402

F64 = torch.float64


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active: all of them (``n``), those that
    are not views (``compute``: what launches a kernel on a GPU; ``_unsafe_view``, a
    metadata-only reshape, counts as a view) and QR/SVD calls (``factor``)."""

    def __init__(self):
        super().__init__()
        self.n = self.compute = self.factor = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        out = func(*args, **(kwargs or {}))
        if launches(func, args, out):
            self.compute += 1
        name = str(func)
        if "linalg_qr" in name or "linalg_svd" in name:
            self.factor += 1
        return out


def launches(func, args, out) -> bool:
    """Whether an operation launches a kernel: any operation but profiler markers
    (``record_function`` of the optimizers' ``zero_grad``/``step``: host bookkeeping) and
    views; a view-like composite (``reshape`` under inference mode dispatches unexpanded)
    counts when its result is a copy (a new storage), as for a non-contiguous tensor."""
    if str(func).startswith("profiler."):
        return False
    if not getattr(func, "is_view", False) and "_unsafe_view" not in str(func):
        return True
    if isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
        return out.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr()
    return False


def median_time(fn, rounds: int) -> float:
    fn()  # warmup
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def loss_fn(A):
    def f(T):
        return 0.5 * inner(T, T) - inner(T, A)
    return f


def setup(M, B, r, gen):
    p = torch.Tensor(M.random(B, dtype=F64, generator=gen))
    Z = TT.random(M.shape, r, dtype=F64, generator=gen, batch=(B,))
    u = M.project(p, Z)
    u = u * (0.5 / M.norm(p, u)).unsqueeze(-1)
    A = TT.random(M.shape, r, dtype=F64, generator=gen, batch=(B,))
    return p, Z, u, A


def adam_batched(M, p, A):
    par = geoopt.ManifoldParameter(p.clone(), manifold=M)
    opt = geoopt.optim.RiemannianAdam([par], lr=1e-3)
    f = loss_fn(A)

    def step():
        opt.zero_grad()
        f(par.unpack_tensor()).sum().backward()
        opt.step()
    return step


def adam_loop(M, p, A):
    pars = [geoopt.ManifoldParameter(p[b].clone(), manifold=M) for b in range(p.shape[0])]
    opt = geoopt.optim.RiemannianAdam(pars, lr=1e-3)
    fs = [loss_fn(A[b]) for b in range(p.shape[0])]

    def step():
        opt.zero_grad()
        for par, f in zip(pars, fs):
            f(par.unpack_tensor()).backward()
        opt.step()
    return step


def time_table(d, n, ranks, Bs, rounds, loop_max):
    rows = []
    gen = torch.Generator().manual_seed(0)
    for r in ranks:
        M = FixedTTRank((n,) * d, r)
        for B in Bs:
            p, Z, u, A = setup(M, B, r, gen)
            m = min(B, loop_max)
            ps, Zs, us, As = p[:m], Z[:m], u[:m], A[:m]
            ops = {
                "retr": (lambda: M.retr(p, u),
                         lambda: [M.retr(ps[b], us[b]) for b in range(m)]),
                "project": (lambda: M.project(p, Z),
                            lambda: [M.project(ps[b], Zs[b]) for b in range(m)]),
                "adam": (adam_batched(M, p, A), adam_loop(M, ps, As)),
            }
            for name, (batched, loop) in ops.items():
                rb = max(1, rounds if B <= 256 else rounds // 3)
                tb = median_time(batched, rb) / B
                tl = median_time(loop, max(1, rounds // 2)) / m
                kernels.set_enabled(False)
                try:
                    tt = median_time(loop, max(1, rounds // 2)) / m
                finally:
                    kernels.set_enabled(True)
                rows.append(dict(r=r, B=B, op=name, batch=tb * 1e3, loop=tl * 1e3,
                                 loop_torch=tt * 1e3, speedup=tl / tb))
                print(f"r={r:3d} B={B:5d} {name:8s} batch {tb * 1e3:8.4f} ms/pt  "
                      f"loop {tl * 1e3:8.4f}  loop_torch {tt * 1e3:8.4f}  "
                      f"speedup {tl / tb:6.1f}x", flush=True)
    return rows


def count_ops(d, n, r, B):
    out = []
    for paired in (False, True):
        old = sweeps.PAIRED_SWEEPS
        sweeps.PAIRED_SWEEPS = paired
        try:
            how = ("fewer-launch variants (forced; chosen off the CPU for small inputs)"
                   if paired else "CPU choices")
            out += count_ops_once(d, n, r, B, how)
        finally:
            sweeps.PAIRED_SWEEPS = old
    return out


def count_ops_once(d, n, r, B, how):
    gen = torch.Generator().manual_seed(1)
    M = FixedTTRank((n,) * d, r)
    out = []
    kernels.set_enabled(False)  # the torch path: what runs on a GPU
    chunk = fixed_rank.CPU_BATCH_CHUNK_BYTES
    fixed_rank.CPU_BATCH_CHUNK_BYTES = None  # a GPU runs a batch as one call
    try:
        for label, b in (("1 point", None), (f"batch {B}", B)):
            if b is None:
                p, Z, u, A = setup(M, 1, r, gen)
                p, Z, u, A = p[0], Z[0], u[0], A[0]
                adam = adam_loop(M, p.unsqueeze(0), TT.stack([A]))
            else:
                p, Z, u, A = setup(M, b, r, gen)
                adam = adam_batched(M, p, A)
            f = loss_fn(A)
            calls = {"retr": lambda: M.retr(p, u), "project": lambda: M.project(p, Z),
                     "riemannian_grad": lambda: M.riemannian_grad(p, f), "adam step": adam}
            row = {"label": f"{label}, {how}"}
            for name, fn in calls.items():
                fn()
                with OpCounter() as c:
                    fn()
                row[name] = f"{c.compute} + {c.factor} ({c.n})"
            out.append(row)
            print(row, flush=True)
    finally:
        fixed_rank.CPU_BATCH_CHUNK_BYTES = chunk
        kernels.set_enabled(True)
    return out


class FactorFlops(TorchDispatchMode):
    """Adds the flops of the QR and SVD calls dispatched while active (``flops``), which
    ``FlopCounterMode`` does not count: Householder QR of each ``m x k`` matrix (``m >= k``,
    or its transpose) with the thin Q formed, ``4 m k^2 - 4 k^3 / 3``; an SVD counts as that
    QR only (a lower bound: its bidiagonalization costs more)."""

    def __init__(self):
        super().__init__()
        self.flops = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if "linalg_qr" in name or "linalg_svd" in name:
            a = args[0]
            m, k = max(a.shape[-2:]), min(a.shape[-2:])
            nb = a.numel() // max(1, m * k)
            self.flops += nb * (4 * m * k * k - 4 * k ** 3 / 3)
        return out


def cpu_median(fn, rounds: int) -> float:
    """Median CPU time of ``rounds`` calls after one warmup call (seconds)."""
    fn()
    ts = []
    for _ in range(rounds):
        t = time.process_time()
        fn()
        ts.append(time.process_time() - t)
    return statistics.median(ts)


def flop_bound(d=10, n=20, rounds=31, ranks=(4, 10)):
    """The per-point targets against the arithmetic of one point (see the module doc)."""
    torch.set_num_threads(1)
    kernels.build("dense", verbose=False)
    print(f"# bench_batch --flop-bound {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{cpu_model()}, torch {torch.__version__}, 1 thread, d={d}, n={n}, compiled kernels "
          f"{'loaded' if kernels.module('dense') is not None else 'not loaded'}")
    print("| dtype | r | call | single-point ms | target ms/point at B = 256 | matmul Mflop "
          "| QR/SVD Mflop | GEMM GFLOP/s | bound ms | bound / target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float64, torch.float32):
        rate = gemm_gflops(dtype, timer=time.process_time) * 1e9
        for r, share in zip(ranks, (10, 3)):
            gen = torch.Generator().manual_seed(0)
            M = FixedTTRank((n,) * d, r)
            p = torch.Tensor(M.random(dtype=dtype, generator=gen))
            Z = TT.random(M.shape, r, dtype=dtype, generator=gen)
            u = M.project(p, Z)
            u = u * (0.5 / M.norm(p, u))
            A = TT.random(M.shape, r, dtype=dtype, generator=gen)
            adam = adam_loop(M, p.unsqueeze(0), TT.stack([A]))
            calls = {"retr": lambda: M.retr(p, u), "project": lambda: M.project(p, Z),
                     "adam step": adam}
            for name, fn in calls.items():
                single = cpu_median(fn, rounds)
                kernels.set_enabled(False)  # the torch path: every product is visible
                try:
                    fc, ff = FlopCounterMode(display=False), FactorFlops()
                    with fc, ff:
                        fn()
                finally:
                    kernels.set_enabled(True)
                mm, fact = fc.get_total_flops(), ff.flops
                bound, target = (mm + fact) / rate, single / share
                print(f"| {str(dtype)[6:]} | {r} | {name} | {single * 1e3:.3f} | "
                      f"{target * 1e3:.4f} | {mm / 1e6:.2f} | {fact / 1e6:.2f} | {rate / 1e9:.0f} | "
                      f"{bound * 1e3:.4f} | {bound / target:.2f} |", flush=True)


def targets(d=10, n=20, B=256, ranks=(4, 10), single_rounds=41, batch_rounds=11, alternations=3):
    """Issue 12's per-point targets at B = 256 (see the module doc)."""
    torch.set_num_threads(1)
    kernels.build("dense", verbose=False)
    print(f"# bench_batch --targets {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{cpu_model()}, torch {torch.__version__}, 1 thread, d={d}, n={n}, B={B}, CPU time, "
          f"compiled kernels {'loaded' if kernels.module('dense') is not None else 'not loaded'}")
    print("| dtype | r | op | single ms | batch ms/pt | batch / single (each alternation) "
          "| middle | target | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float64, torch.float32):
        for r, share in zip(ranks, (10, 3)):
            gen = torch.Generator().manual_seed(0)
            M = FixedTTRank((n,) * d, r)
            p, Z, u, A = (x.to(dtype) if isinstance(x, torch.Tensor) else x.to(dtype=dtype)
                          for x in setup(M, B, r, gen))
            # the single point's inputs taken once (indexing a batched TT builds a TT)
            p1, u1, Z1 = p[0].clone(), u[0].clone(), TT([c[0].clone() for c in Z.cores])
            calls = {
                "retr": (lambda: M.retr(p1, u1), lambda: M.retr(p, u)),
                "project": (lambda: M.project(p1, Z1), lambda: M.project(p, Z)),
                "adam step": (adam_loop(M, p[:1], A[:1]), adam_batched(M, p, A)),
            }
            for name, (one, many) in calls.items():
                singles, batches, ratios = [], [], []
                for _ in range(alternations):
                    s1 = cpu_median(one, single_rounds)
                    sb = cpu_median(many, batch_rounds) / B
                    singles.append(s1)
                    batches.append(sb)
                    ratios.append(sb / s1)
                mid = sorted(ratios)[len(ratios) // 2]
                k = ratios.index(mid)
                goal = 1 / share
                print(f"| {str(dtype)[6:]} | {r} | {name} | {singles[k] * 1e3:.4f} | "
                      f"{batches[k] * 1e3:.4f} | {', '.join(f'{x:.3f}' for x in ratios)} | "
                      f"{mid:.3f} | {goal:.3f} | {'yes' if mid <= goal else 'no'} |", flush=True)


def main_counts_only(d=10, n=20, r=10, B=256):
    """Only the operation counts (seconds, not minutes)."""
    torch.set_num_threads(1)
    print(f"# aten operations per call (torch path, d={d}, n={n}, r={r}, float64)")
    count_ops(d, n, r, B)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--counts-only", action="store_true", help="only the operation counts")
    ap.add_argument("--d", type=int, default=10, help="order d for --counts-only")
    ap.add_argument("--flop-bound", action="store_true",
                    help="the per-point targets against the arithmetic of one point")
    ap.add_argument("--targets", action="store_true",
                    help="issue 12's per-point targets at B = 256: batch / single-point call")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="with --targets: call ttmanifold.kernels.memory.keep_freed_memory() first")
    args = ap.parse_args()
    if args.keep_freed_memory:
        if not args.targets:
            ap.error("--keep-freed-memory: only with --targets")
        applied = keep_freed_memory()
        print(f"# keep_freed_memory(): {'applied' if applied else 'not available here'}")
    if args.targets:
        return targets(*((4, 5, 8, (2, 3), 3, 2, 1) if args.quick else ()))
    if args.flop_bound:
        return flop_bound(*((4, 5, 3, (2, 3)) if args.quick else ()))
    if args.counts_only:
        return main_counts_only(*((4, 5, 2, 8) if args.quick else (args.d,)))
    torch.set_num_threads(1)
    if args.quick:
        d, n, ranks, Bs, rounds, cnt_B = 4, 5, (2,), (1, 4), 2, 8
    else:
        d, n, ranks, Bs, rounds, cnt_B = 10, 20, (4, 10), (1, 16, 256, 1024), args.rounds, 256
    kernels.build("dense", verbose=False)
    print(f"# bench_batch {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"torch {torch.__version__}, 1 thread, d={d}, n={n}, float64, compiled kernels "
          f"{'loaded' if kernels.module('dense') is not None else 'not loaded'}")
    time_table(d, n, ranks, Bs, rounds, loop_max=32 if not args.quick else 4)
    print(f"# aten operations per call (torch path, d={d}, r={ranks[-1]})")
    count_ops(d, n, ranks[-1], cnt_B)


if __name__ == "__main__":
    main()
