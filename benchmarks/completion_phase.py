"""Recovery rate against sampling rate for tensor completion (issue 17), in the manner of
Steinlechner's phase plots: random rank-r TTs with Gaussian cores, ``|Omega| = rate x dim
M`` sampled entries, no oracle or dense start. For every size ``(d, n, r)``, rate and seed
it runs fixed-rank Riemannian CG from a random point (``rcg_random``) and from a point next
to a random rank-1 tensor (``rcg_rank1``) and from the sparse spectral start computed from
the samples (``rcg_spectral``, ``solvers.sparse_spectral_point``), and rank-adaptive
completion from rank 1 with
cap r (``rank_adaptive``); a run recovers the tensor when its relative test error reaches
``--tol`` (default 1e-6). Prints one markdown table per size and saves the plot
``completion_phase.png`` (fraction recovered against rate) to ``--out``.

Run:  python benchmarks/completion_phase.py [--sizes 6x4x2,6x6x2,8x4x3] [--rates 2,3,5,10,20,40]
      [--seeds 4] [--budget 10] [--methods rcg_random,rcg_rank1,rcg_spectral,rank_adaptive]
      [--out phase_out]
The defaults take a few minutes on one core (torch runs with 1 thread). The sizes are
small in n because at n = 10 nothing recovers below 40 x dim M (d = 6, r = 2: 0 of 4
seeds at 2..20 x dim M for every method, measured); the issue's target size is
``--sizes 10x20x4 --rates 10 --seeds 10 --methods rank_adaptive``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from ttmanifold.experiments.presets import PHASE_METHODS, phase_table, plot_phase, recovery_phase


def _sizes(value: str):
    out = []
    for item in value.split(","):
        parts = item.strip().split("x")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected sizes d x n x r like 6x10x3, got {item!r}")
        out.append(tuple(int(p) for p in parts))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=_sizes, default=_sizes("6x4x2,6x6x2,8x4x3"),
                   help="comma-separated d x n x r (default 6x4x2,6x6x2,8x4x3)")
    p.add_argument("--rates", default="2,3,5,10,20,40",
                   help="|Omega| / dim M values (default 2,3,5,10,20,40)")
    p.add_argument("--seeds", type=int, default=4, help="problems per rate (default 4)")
    p.add_argument("--methods", default=",".join(PHASE_METHODS),
                   help=f"subset of {','.join(PHASE_METHODS)}")
    p.add_argument("--tol", type=float, default=1e-6, help="recovery: test error <= tol")
    p.add_argument("--iters", type=int, default=500, help="RCG iteration cap (default 500)")
    p.add_argument("--budget", type=float, default=10.0,
                   help="seconds per run (default 10; rank-adaptive: no raise after it)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="phase_out", help="output directory (default phase_out)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rates = [float(v) for v in args.rates.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    os.makedirs(args.out, exist_ok=True)
    print(f"# Completion recovery phase ({datetime.date.today()}, {platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} thread(s), load "
          f"{os.getloadavg()[0]:.2f})\n")
    print(f"tol {args.tol:g}, {args.seeds} seeds, RCG at most {args.iters} iterations, "
          f"budget {args.budget:g} s per run\n")
    panels = []
    t0 = time.process_time()
    for d, n, r in args.sizes:
        rows = recovery_phase(d, n, r, rates, args.seeds, methods=methods, tol=args.tol,
                              iters=args.iters, budget=args.budget, verbose=True)
        title = f"d = {d}, n = {n}, r = {r}"
        panels.append((title, rows))
        print(f"\n## {title}\n")
        print("\n".join(phase_table(rows, rates, methods)), flush=True)
        print()
    path = os.path.join(args.out, "completion_phase.png")
    plot_phase(panels, path)
    print(f"CPU time {time.process_time() - t0:.0f} s; plot: {path}")


if __name__ == "__main__":
    main()
