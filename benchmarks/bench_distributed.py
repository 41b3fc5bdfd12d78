"""Data-parallel Riemannian CG (or L-BFGS, ``--method rlbfgs``; trust region, ``--method
rtr``) for completion (issue 14): seconds per iteration at d = 20,
n = 50, r = 10, |Omega| = 10^6 (float64) with 1 and 2 processes, one torch thread each
(gloo on 127.0.0.1), the peak memory (RSS) per process, and whether the iterates agree.

Each process reads only the rows of the shared data file that hash to it
(``shard_mask``), builds its :class:`ShardedCompletion`, runs ``--warmup`` iterations, then
``--iters`` timed ones (the median is reported, in wall-clock seconds and in CPU seconds of the process: on a
machine shared with other jobs the wall clock measures the contention, the CPU time what
each process computes). The data are generated once, into a
temporary directory (indices as uint8, 20 MB, values 8 MB). Target: 2 processes at least
1.7x faster than 1, with identical iterates (to rounding).

Run:  python benchmarks/bench_distributed.py [--n-samples 1000000] [--iters 8]
      [--warmup 2] [--worlds 1 2] [--method rcg|rlbfgs|rtr]
About 2-3 minutes on a 2-core CPU (most of it building the index layouts and the
iterations of the 1-process run).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time

D, N_MODE, R = 20, 50, 10
#: the solvers' counters reported (history info)
COUNTERS = ("restarts", "backtracks", "skipped_updates", "inner_iters", "hess_products",
            "rejected", "backtracked")


def _log(msg: str) -> None:
    print(msg, flush=True)


def worker(rank, world, port, tmp, args, out_q):
    os.environ["OMP_NUM_THREADS"] = "1"
    import numpy as np
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from ttmanifold.experiments.distributed import (Communicator, ShardedCompletion,
                                                    distributed_cg, distributed_lbfgs,
                                                    distributed_trust_region, shard_mask)

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        t0 = time.perf_counter()
        idx_all = np.load(os.path.join(tmp, "idx.npy"), mmap_mode="r")
        vals_all = np.load(os.path.join(tmp, "vals.npy"), mmap_mode="r")
        mine = shard_mask(idx_all, rank, world) if world > 1 else np.ones(len(vals_all), bool)
        idx = torch.from_numpy(np.asarray(idx_all[mine], dtype=np.int64))
        vals = torch.from_numpy(np.asarray(vals_all[mine]))
        del idx_all, vals_all, mine
        S = ShardedCompletion(idx, vals, (N_MODE,) * D, R)
        del idx, vals
        x0 = S.initial_point(0)
        t_setup = time.perf_counter() - t0
        # warm-up: builds the layouts and buffers of the index set
        cpu = [time.process_time()]
        solver = {"rcg": distributed_cg, "rlbfgs": distributed_lbfgs,
                  "rtr": distributed_trust_region}[args.method]
        h = solver(S, x0, iters=args.warmup + args.iters, metrics_every=0,
                   callback=lambda t, hist: cpu.append(time.process_time()) and False)
        per_iter = [b - a for a, b in zip(h.time[args.warmup:], h.time[args.warmup + 1:])]
        n = args.warmup + args.iters  # cpu[j + 1] - cpu[j]: iteration j (j >= 1)
        cpu_iter = [cpu[j + 1] - cpu[j] for j in range(args.warmup, n)]
        comm = Communicator()
        ar = []
        if comm.distributed:
            buf = torch.zeros(S.manifold.size + 1, dtype=torch.float64)
            for _ in range(20):
                t = time.perf_counter()
                comm.all_reduce(buf, "bench")
                ar.append(time.perf_counter() - t)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux: KB)
        out_q.put({"rank": rank, "world": world, "n_local": S.n_local, "setup": t_setup,
                   "per_iter": per_iter, "cpu_iter": cpu_iter, "peak_mb": peak, "x": h.x.numpy().copy(),
                   "loss": h.loss, "allreduce_ms": 1e3 * statistics.median(ar) if ar else None,
                   "dim": S.manifold.dim,
                   "info": {k: h.info[k] for k in COUNTERS if k in h.info}})
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_world(world, tmp, args):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=worker, args=(r, world, port, tmp, args, q))
             for r in range(world)]
    for p in procs:
        p.start()
    res = []
    deadline = time.time() + 1800
    while len(res) < world:
        try:
            res.append(q.get(timeout=5))
        except Exception:  # noqa: BLE001  (queue.Empty)
            if any(p.exitcode not in (None, 0) for p in procs) or time.time() > deadline:
                for p in procs:
                    p.kill()
                raise SystemExit(f"bench: a process of the {world}-process run failed")
    for p in procs:
        p.join(60)
    return sorted(res, key=lambda r: r["rank"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-samples", type=int, default=10 ** 6)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--method", choices=("rcg", "rlbfgs", "rtr"), default="rcg")
    args = ap.parse_args()

    import numpy as np
    import torch

    import ttmanifold as tm
    from ttmanifold import kernels

    _log(f"# bench_distributed: {args.method}, d={D}, n={N_MODE}, r={R}, "
         f"|Omega|={args.n_samples}, float64, {args.warmup} warm-up + {args.iters} timed "
         f"iterations per run")
    _log(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
         f"load average {os.getloadavg()[0]:.2f}, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC")
    _log("loading (or building, ~20 s each on a cold cache) the compiled CPU kernels ...")
    res = kernels.build(["dense", "sampled"], verbose=False, timeout=300)
    _log("kernels: " + ", ".join(f"{k} {v['result']}" for k, v in res.items()))
    with tempfile.TemporaryDirectory(prefix="bench_dist_") as tmp:
        t0 = time.perf_counter()
        _log(f"generating the data ({args.n_samples} samples of a random rank-{R} TT) ...")
        g = torch.Generator().manual_seed(0)
        truth = tm.TT.random((N_MODE,) * D, R, dtype=torch.float64, generator=g)
        idx = torch.randint(0, N_MODE, (args.n_samples, D), generator=g, dtype=torch.uint8)
        vals = truth.gather(idx.long())
        np.save(os.path.join(tmp, "idx.npy"), idx.numpy())
        np.save(os.path.join(tmp, "vals.npy"), vals.numpy())
        del idx, vals
        _log(f"data ready in {time.perf_counter() - t0:.1f} s")
        results = {}
        for world in args.worlds:
            _log(f"running {world} process(es), 1 thread each ...")
            t0 = time.perf_counter()
            results[world] = run_world(world, tmp, args)
            r = results[world]
            _log(f"  done in {time.perf_counter() - t0:.1f} s: median s/iter per rank "
                 + ", ".join(f"{statistics.median(x['per_iter']):.3f}" for x in r)
                 + "; peak RSS MB per rank " + ", ".join(f"{x['peak_mb']:.0f}" for x in r))
    base = results[args.worlds[0]][0]
    M = tm.FixedTTRank((N_MODE,) * D, R)
    X1 = M.to_tt(torch.from_numpy(base["x"]))

    def distance(x):
        """||X - X_1proc|| / ||X_1proc|| of the tensors (the packed cores of two equal
        tensors may differ in gauge where singular values are close: a random start)."""
        return float((M.to_tt(torch.from_numpy(x)) - X1).norm() / X1.norm())
    t_base = statistics.median(base["per_iter"])
    c_base = statistics.median(base["cpu_iter"])
    _log("")
    _log("| processes | samples per process | s / iteration (median) | speed-up | "
         "CPU s / iteration per process | CPU speed-up | "
         "peak RSS per process (MB) | setup s | all-reduce of dim M + 1 (ms) | "
         "||X - X_1proc|| / ||X_1proc|| |")
    _log("|---|---|---|---|---|---|---|---|---|---|")
    for world, r in results.items():
        t = max(statistics.median(x["per_iter"]) for x in r)
        c = max(statistics.median(x["cpu_iter"]) for x in r)
        diff = max(distance(x["x"]) for x in r)
        same = all(np.array_equal(x["x"], r[0]["x"]) for x in r)
        ar = r[0]["allreduce_ms"]
        peaks = ", ".join(f"{x['peak_mb']:.0f}" for x in r)
        _log(f"| {world} | {', '.join(str(x['n_local']) for x in r)} | {t:.3f} | "
             f"{t_base / t:.2f}x | {c:.3f} | {c_base / c:.2f}x | {peaks} | "
             f"{max(x['setup'] for x in r):.1f} | {'-' if ar is None else f'{ar:.2f}'} | "
             f"{diff:.1e}{' (replicas bitwise equal)' if world > 1 and same else ''} |")
    _log(f"dim M = {base['dim']}; loss after {args.warmup + args.iters} iterations: "
         + ", ".join(f"{w} proc {r[0]['loss'][-1]:.6e}" for w, r in results.items()))
    _log("solver counters (rank 0): " + "; ".join(
        f"{w} proc {r[0]['info']}" for w, r in results.items()))
    _log(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
