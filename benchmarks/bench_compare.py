"""Chart vs Riemannian benchmark (issue 5).

Part 1 - the full default comparison on tensor completion, d = 10, n = 20, r = 6,
|Omega| = 10 dim M, float64: every method of :mod:`ttmanifold.experiments.solvers` with the common
step-size rule (log grid 1e-3..1, 7 values, 10 tuning iterations) from one start; reports
iterations and seconds to test error 1e-6. The start is ``kind="perturbed"`` (the target
plus 30% noise, rounded: an oracle start inside the basin of attraction) because from a
random start no method recovers the tensor at this sampling rate (shown by one
random-start CG run, also reported).

Part 2 - seconds per Riemannian CG iteration at d = 20, n = 50, r = 10, |Omega| = 10^6
(target < 0.5 s): the median time of the iterations of a running CG (the first iteration
of a run also computes the gradient at its start point and is reported separately), with a
per-phase profile of the kernels the CG loop runs (sweeps on Omega, scatters, gauge,
tangent evaluation for the line search, retraction + transports).

Run:  python benchmarks/bench_compare.py [--skip-part1] [--skip-part2] [--threads T]
      [--dtype float64|float32] [--budget SECONDS_PER_RUN] [--methods rcg,rtr,rlbfgs,als,...]
Total runtime about 5 minutes on a 2-core CPU (RESULTS.md numbers: ``--threads 1``; on a
shared machine torch's OpenMP threads contend and slow everything down several-fold).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from ttmanifold.experiments.problems import Completion
from ttmanifold.experiments.solvers import ALL_METHODS, METHODS, run
from ttmanifold.manifold import right_cores


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def part1(args):
    print("\n## Part 1: completion d=10, n=20, r=6, |Omega| = 10 dim M, "
          f"{args.dtype}, start = perturbed(0.3)")
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    P = Completion((20,) * 10, 6, oversampling=10, seed=0, dtype=dtype)
    x0 = P.initial_point(0, kind="perturbed", distance=0.3)
    print(P.describe(), f"(built in {time.perf_counter() - t0:.1f} s); start test_err "
          f"{P.metrics(x0)['test_err']:.3f}")
    rows = []
    for method in args.methods:
        t = time.perf_counter()
        h = run(P, method, x0, iters=args.iters, time_budget=args.budget, metrics_every=1,
                stop_metric="test_err", stop_tol=1e-6, seed=0)
        wall = time.perf_counter() - t
        r = h.reach("test_err", 1e-6)
        m = h.final_metrics()
        rows.append((method, h.lr, r, h.n_iters, h.time_per_iter, m["train_err"],
                     m["test_err"], h.status, h.info.get("tune_seconds", 0.0), wall))
        print(f"  {method:15s} lr={h.lr!s:8.8s} reach={r} iters={h.n_iters} "
              f"{1e3 * h.time_per_iter:.1f} ms/it test_err={m['test_err']:.2e} "
              f"status={h.status} (tuning {h.info.get('tune_seconds', 0.0):.1f} s, "
              f"wall {wall:.1f} s)", flush=True)
    # the random start, for the record
    t = time.perf_counter()
    h = run(P, "rcg", P.initial_point(0), iters=args.random_iters, metrics_every=10,
            stop_metric="test_err", stop_tol=1e-6)
    print(f"  rcg from a random start: {h.n_iters} iterations, final test_err "
          f"{h.final_metrics()['test_err']:.2e}, train_err {h.final_metrics()['train_err']:.2e} "
          f"({time.perf_counter() - t:.1f} s)")
    print("\n| method | lr | iters to test_err<=1e-6 | s to 1e-6 | ms/iter | final test_err | status |")
    print("|---|---|---|---|---|---|---|")
    for method, lr, r, n, tpi, tr, te, st, tune, wall in rows:
        print(f"| {method} | {'-' if lr is None else f'{lr:.3g}'} | {r[0] if r else '-'} | "
              f"{f'{r[1]:.2f}' if r else '-'} | {1e3 * tpi:.1f} | {te:.2e} | {st} |")


def part2(args):
    print(f"\n## Part 2: RCG iteration at d=20, n=50, r=10, |Omega|=1e6, {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    P = Completion((50,) * 20, 10, train_size=10 ** 6, test_size=10 ** 4, seed=0, dtype=dtype)
    t_build = time.perf_counter() - t0
    M, I = P.manifold, P.train
    print(f"{P.describe()}; built in {t_build:.1f} s (sampling, IndexSet plans, gathers)")
    p = P.initial_point(0)
    # warm up: plans are built lazily on first use
    t = time.perf_counter()
    h = run(P, "rcg", p, iters=1, metrics_every=0, measure_memory=False)
    print(f"first iteration (incl. lazy plan construction): {time.perf_counter() - t:.2f} s")
    h = run(P, "rcg", h.x, iters=args.cg_iters, metrics_every=0)
    steps = [b - a for a, b in zip(h.time[:-1], h.time[1:])]
    steady = sorted(steps[1:]) if len(steps) > 1 else steps
    med = steady[len(steady) // 2]
    print(f"RCG: {1e3 * med:.0f} ms per iteration (median of iterations 2..{len(steps)} of a "
          f"run; each = gradient + line search + retraction/transports) | first iteration of "
          f"the run {1e3 * steps[0]:.0f} ms (also computes the gradient at the start) | mean "
          f"over the run {1e3 * h.time_per_iter:.0f} ms | peak RSS increase "
          f"{h.info['peak_mem_mb']:.0f} MB")
    print("per-iteration ms: " + ", ".join(f"{1e3 * t:.0f}" for t in steps))
    # profile of one iteration by phase: the kernels the CG loop runs (Completion.cg_grad,
    # Completion.exact_step, the CG update with retr_transp and transp)
    p = h.x
    tm = {}

    def tick(name, t):
        tm[name] = tm.get(name, 0.0) + time.perf_counter() - t

    reps = 3
    g_prev = None
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            U = M.split(p, "p")
            V = right_cores(U)
            tick("right-orthogonal cores (LQ sweep)", t)
            t = time.perf_counter()
            point = I.sampled_point(U, V)
            vals = point.values
            tick("left + right sweeps on Omega (SampledPoint)", t)
            t = time.perf_counter()
            a = P._a_train_layout(point)
            z = torch.where(point.mask, vals - a, 0.0) * P._sw
            D = point.project(z * P._sw)
            tick("residual + scatters (SampledPoint.project)", t)
            t = time.perf_counter()
            g = M.proju(p, torch.cat([c.reshape(-1) for c in D]))
            tick("gauge projection", t)
            t = time.perf_counter()
            e = point.tangent(M.split(-g, "eta")) * P._sw
            alpha = -(z * e).sum() / (e * e).sum()
            tick("line search: tangent on Omega (SampledPoint.tangent)", t)
            t = time.perf_counter()
            q, _ = M.retr_transp(p, -alpha * g, -g)
            M.transp(p, q, g if g_prev is None else g_prev)
            tick("retraction + 2 transports", t)
            g_prev = g
            del point, D, z, e
    total = sum(tm.values()) / reps
    print(f"\nper-phase profile (mean of {reps}; total {1e3 * total:.0f} ms):")
    print("| phase | ms | share |")
    print("|---|---|---|")
    for k, v in tm.items():
        print(f"| {k} | {1e3 * v / reps:.0f} | {100 * v / reps / total:.0f}% |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-part1", action="store_true")
    ap.add_argument("--skip-part2", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--budget", type=float, default=40.0, help="seconds per run (part 1)")
    ap.add_argument("--methods", type=lambda v: [m.strip() for m in v.split(",")],
                    default=list(METHODS),
                    help=f"part 1's methods, comma-separated from {','.join(ALL_METHODS)} "
                         f"(default {','.join(METHODS)}; the second-order, line-search and "
                         f"ALS methods of issue 17 on request)")
    ap.add_argument("--random-iters", type=int, default=150)
    ap.add_argument("--cg-iters", type=int, default=6)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # build (or load) the compiled dense sweeps before timing, so that every timed call runs
    # the same code and none shares the CPU with a compiler (TTMANIFOLD_NATIVE=0: torch path)
    from ttmanifold import kernels
    if kernels.enabled():
        print("compiled dense sweeps: building or loading (`ttmanifold build-kernels`; a build "
              "takes 20-60 s, once per machine)", flush=True)
        kernels.build(["dense"], verbose=False)
    print(f"compiled dense sweeps: "
          f"{'in use' if kernels.module('dense') is not None else 'not in use (torch path)'}")
    print(f"# bench_compare: {datetime.datetime.now().isoformat(timespec='seconds')}, "
          f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()}")
    t = time.perf_counter()
    if not args.skip_part1:
        part1(args)
    if not args.skip_part2:
        part2(args)
    print(f"\ntotal {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
