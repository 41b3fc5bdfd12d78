"""Batched completion (issue 12): Riemannian CG on B completion problems in one call
(:func:`ttmanifold.experiments.batched.batched_riemannian_cg`) against a Python loop of
:func:`~ttmanifold.experiments.solvers.riemannian_cg` over the problems.

    python benchmarks/bench_batch_completion.py           # B = 1, 16, 64 (a few minutes)
    python benchmarks/bench_batch_completion.py --quick   # smoke run on small sizes

Two settings: small problems (d = 5, n = 8, r = 3: about 3000 samples each, where a
single CG iteration is dominated by per-call overhead) and large ones (d = 10, n = 20,
r = 4: about 31000 samples each, dominated by the sampled kernels). Every problem is a
random completion problem (``Completion``, |Omega| = 12 x dim M, sample counts made
ragged by +-10%; at 12 x dim both one problem and the batch merge pairs of modes, while
at 10 x dim the merging threshold of ``IndexSet.bounds`` falls inside the spread and
single problems and the batch would use different partitions) started from a random
point; both routes run
the same number of CG iterations from the same points. Reported per problem and
iteration: the CPU time (``time.process_time``, 1 torch thread) of the batched call and of
the loop, and their ratio; plus the largest relative distance ``||X_b - Y_b|| / ||Y_b||``
between the final points of the two routes, which should be at rounding level.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import torch

from ttmanifold import kernels
from ttmanifold.experiments.batched import BatchedCompletion, batched_riemannian_cg
from ttmanifold.experiments.problems import Completion
from ttmanifold.experiments.solvers import riemannian_cg


def make_problems(B, d, n, r, oversampling, dtype, device, seed=0):
    """B completion problems of shape (n,) * d and rank r with ragged sample counts."""
    gen = torch.Generator().manual_seed(seed)
    base = Completion((n,) * d, r, train_size=1, test_size=1).manifold.dim
    probs = []
    for b in range(B):
        f = 0.9 + 0.2 * float(torch.rand((), generator=gen))
        N = int(oversampling * base * f)
        probs.append(Completion((n,) * d, r, train_size=N, test_size=min(N // 2, 1000),
                                seed=seed * 100_003 + b, dtype=dtype, device=device))
    return probs


def time_completion(B, d=10, n=20, r=4, *, iters=5, oversampling=12.0, dtype=torch.float64,
                    device="cpu", loop=True):
    """CPU seconds per problem and iteration of the batched CG and of the loop (``None``
    without ``loop``), and the largest relative difference of the final points."""
    probs = make_problems(B, d, n, r, oversampling, dtype, device)
    x0 = torch.stack([pr.initial_point(b) for b, pr in enumerate(probs)])
    bp = BatchedCompletion(probs)
    batched_riemannian_cg(bp, x0, iters=1, metrics=False)  # warmup (layouts, buffers)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.process_time()
    res = batched_riemannian_cg(bp, x0, iters=iters, metrics=False)
    sync()
    tb = (time.process_time() - t0) / (B * iters)
    tl = diff = None
    if loop:
        for pr, x in zip(probs, x0):  # warmup
            riemannian_cg(pr, x, iters=1, metrics_every=0)
        sync()
        t0 = time.process_time()
        xs = [riemannian_cg(pr, x, iters=iters, metrics_every=0).x for pr, x in zip(probs, x0)]
        sync()
        tl = (time.process_time() - t0) / (B * iters)
        M = bp.manifold
        diff = 0.0
        for b, x in enumerate(xs):  # ||X_b - Y_b|| / ||Y_b|| in TT format (never dense)
            ref = M.to_tt(x.double())
            err = (M.to_tt(res.x[b].double()) - ref).norm() / ref.norm()
            diff = max(diff, float(err))
    return tb, tl, diff


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        settings, Bs = [(4, 8, 2)], (1, 4)
    else:
        settings, Bs = [(5, 8, 3), (10, 20, 4)], (1, 16, 64)
    kernels.build(verbose=False)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    built = "built" if kernels.status()["sampled"]["built"] else "not built"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    print(f"# bench_batch_completion {stamp} UTC, torch {torch.__version__}, 1 thread, float64, "
          f"{args.iters} CG iterations, load {load:.1f}, compiled sampled kernels "
          f"{built}")
    print("| d, n, r | B | batched ms/problem/iter | loop ms/problem/iter | loop / batched | "
          "max rel diff |")
    print("|---|---|---|---|---|---|")
    for d, n, r in settings:
        for B in Bs:
            tb, tl, diff = time_completion(B, d, n, r, iters=args.iters)
            print(f"| {d}, {n}, {r} | {B} | {tb * 1e3:.3f} | {tl * 1e3:.3f} | {tl / tb:.2f}x | "
                  f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
