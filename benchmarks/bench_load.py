"""Small manifold operations with and without a competing busy process (issue 16, item 3).

    python benchmarks/bench_load.py                 # d = 10, n = 20, r = 10, float64
    python benchmarks/bench_load.py --quick         # smoke run

Times ``M.retr``, ``M.project`` (rank-r TT onto the tangent space) and one geoopt
``RiemannianSGD`` step (gradient given, ``opt.step()``) at torch's default thread count
(no ``torch.set_num_threads``), in alternating phases: quiet, then with one competing
busy process that this script starts itself (a pure-Python spin loop, bounded in time by
``--busy-seconds`` per phase and killed at the end of the phase and at exit), repeated
``--phases`` times so both conditions see the same background load. Each operation is
timed three ways: as shipped (the kernel seam runs the dispatched small-matrix calls of
the ``dense`` set with one intra-op thread, ``kernels.set_serial_small_ops``), with that
turned off (every call at torch's thread count, the previous behaviour), and with the
whole operation inside a one-thread context (``torch.set_num_threads(1)`` around the
call, restored after): the remedies for OpenMP/BLAS worker threads that wait for a core
the competitor holds. A fourth mode measures a proposed change in
``ttmanifold/manifold/fixed_rank.py`` (not made here): every per-step method of
``FixedTTRank`` inside ``kernels.serial_small_ops()``, applied at run time.

Reports per operation and condition the median and the 90th percentile of single calls
(wall ms) and the slowdown busy / quiet (target <= 3x); the header names the CPU, the
measured GEMM GFLOP/s, torch's threads and the load average.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import os
import signal
import subprocess
import sys
import time

import torch
import geoopt

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_manifold import cpu_model, gemm_gflops  # noqa: E402

from ttmanifold import FixedTTRank, TT, kernels  # noqa: E402

_CHILDREN = []


def start_busy(seconds: float) -> subprocess.Popen:
    """One competing process: a pure-Python spin loop that ends by itself after
    ``seconds`` (and is killed by :func:`stop_busy` / at exit before that)."""
    code = ("import time\nend = time.monotonic() + %f\nx = 0\n"
            "while time.monotonic() < end:\n    x += 1\n" % seconds)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _CHILDREN.append(p)
    time.sleep(0.2)  # let it reach its loop
    return p


def stop_busy(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()
    if p in _CHILDREN:
        _CHILDREN.remove(p)


@atexit.register
def _cleanup():
    for p in list(_CHILDREN):
        stop_busy(p)


class one_thread:
    """torch.set_num_threads(1) for the duration of the block (process-wide), restored
    after."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        if self.n != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.n != 1:
            torch.set_num_threads(self.n)


def in_one_thread(fn):
    def g():
        with one_thread():
            return fn()
    return g


PER_STEP = ("retr", "proju", "egrad2rgrad", "project", "transp", "retr_transp")


def method_serial(fn):
    """The proposed change outside this file: every per-step method of FixedTTRank run
    inside ``kernels.serial_small_ops()`` (in fixed_rank.py's ``_no_autograd_fast_path``
    wrapper, after its is_compiling branch); applied here at run time by wrapping the
    class's methods for the duration of the call."""
    def wrap(m):
        def g(self, *a, **k):
            with kernels.serial_small_ops():
                return m(self, *a, **k)
        return g

    def g():
        orig = {name: getattr(FixedTTRank, name) for name in PER_STEP}
        for name, m in orig.items():
            setattr(FixedTTRank, name, wrap(m))
        try:
            return fn()
        finally:
            for name, m in orig.items():
                setattr(FixedTTRank, name, m)
    return g


def seam_serial(flag, fn):
    def g():
        kernels.set_serial_small_ops(flag)
        try:
            return fn()
        finally:
            kernels.set_serial_small_ops(True)
    return g


def pct(samples, q):
    s = sorted(samples)
    return 1e3 * s[min(len(s) - 1, int(q * len(s)))]


def main(argv=None):
    ap = argparse.ArgumentParser(description="small operations under a competing process")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calls", type=int, default=40, help="calls per operation per phase")
    ap.add_argument("--phases", type=int, default=3, help="quiet/busy phase pairs")
    ap.add_argument("--busy-seconds", type=float, default=120.0,
                    help="upper bound on the life of each competitor (killed earlier)")
    ap.add_argument("--budget-s", type=float, default=8.0,
                    help="stop an operation's phase early once its calls took this long "
                         "(stalled calls take up to seconds each)")
    ap.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    d, n, r = (6, 8, 4) if args.quick else (10, 20, 10)
    calls = 5 if args.quick else args.calls
    phases = 1 if args.quick else args.phases
    load0 = os.getloadavg()
    g64 = gemm_gflops(torch.float64)

    from ttmanifold import kernels as _k
    if _k.enabled():
        _k.build(["dense"], verbose=False)
    native = _k.module("dense") is not None

    M = FixedTTRank([n] * d, r)
    gen = torch.Generator().manual_seed(0)
    p = M.random(dtype=dtype, generator=gen)
    Z = TT.random([n] * d, r, dtype=dtype, generator=gen)
    xi = M.project(p, Z)
    xi = xi * (0.5 * float(M.to_tt(p).norm()) / float(torch.linalg.vector_norm(xi)))
    egrad = torch.randn(p.shape, dtype=dtype, generator=gen) * 1e-3
    P = geoopt.ManifoldParameter(p.clone(), manifold=M)
    opt = geoopt.optim.RiemannianSGD([P], lr=0.1)

    def sgd_step():
        P.grad = egrad
        opt.step()

    base = [("retr", lambda: M.retr(p, xi)), ("project", lambda: M.project(p, Z)),
            ("RiemannianSGD step", sgd_step)]
    ops = []
    for name, fn in base:
        ops.append((name, "as shipped (serial seam)", seam_serial(True, fn)))
        ops.append((name, "seam at default threads", seam_serial(False, fn)))
        ops.append((name, "proposed: per-step methods in serial_small_ops", method_serial(fn)))
        ops.append((name, "whole op in 1-thread context", in_one_thread(fn)))
    for _, _, fn in ops:  # warm up
        for _ in range(3):
            fn()

    samples = {(name, mode, cond): [] for name, mode, _ in ops for cond in ("quiet", "busy")}
    t0 = time.perf_counter()
    for ph in range(phases):
        for cond in ("quiet", "busy"):
            comp = start_busy(args.busy_seconds) if cond == "busy" else None
            try:
                for name, mode, fn in ops:
                    spent = 0.0
                    for _ in range(calls):
                        s = time.perf_counter()
                        fn()
                        dt = time.perf_counter() - s
                        samples[(name, mode, cond)].append(dt)
                        spent += dt
                        if spent > args.budget_s:
                            break
            finally:
                if comp is not None:
                    stop_busy(comp)
            print(f"# [{time.perf_counter() - t0:6.1f}s] phase {ph + 1}/{phases} {cond} done",
                  file=sys.stderr, flush=True)

    print(f"Small operations under load, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
          f"{cpu_model()}, {os.cpu_count()} CPUs, GEMM 2000x2000 {g64:.0f} GFLOP/s float64 "
          f"({torch.get_num_threads()} threads); torch {torch.__version__} at its default "
          f"{torch.get_num_threads()} threads; compiled dense kernels "
          f"{'in use' if native else 'not in use (torch path)'}; d = {d}, n = {n}, r = {r}, "
          f"{args.dtype}; competitor: one pure-Python busy process; {phases} quiet/busy "
          f"phase pairs x {calls} calls (at most {args.budget_s:g} s per operation and "
          f"phase), wall ms; load average at start "
          f"{load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}, at end "
          f"{os.getloadavg()[0]:.1f}.")
    print()
    print("| operation | mode | quiet median | quiet p90 | busy median | busy p90 | "
          "slowdown (median) | slowdown (p90) | target ≤ 3x |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, mode, _ in ops:
        q, b = samples[(name, mode, "quiet")], samples[(name, mode, "busy")]
        qm, qp, bm, bp = pct(q, 0.5), pct(q, 0.9), pct(b, 0.5), pct(b, 0.9)
        met = "yes" if bm / qm <= 3 else "**no**"
        print(f"| {name} | {mode} ({len(q)}/{len(b)} calls) | {qm:.3f} | {qp:.3f} | {bm:.3f} | {bp:.3f} | "
              f"{bm / qm:.2f} | {bp / qp:.2f} | {met} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
