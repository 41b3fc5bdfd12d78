"""Data-parallel Riemannian CG (or L-BFGS, ``--method rlbfgs``; trust region, ``--method
rtr``; the rank-adaptive search, ``--method rank_adaptive``, below) for completion (issue
14): seconds per iteration at d = 20,
n = 50, r = 10, |Omega| = 10^6 (float64) with 1 and 2 processes, one torch thread each
(gloo on 127.0.0.1), the peak memory (RSS) per process, and whether the iterates agree.

Each process reads only the rows of the shared data file that hash to it
(``shard_mask``), builds its :class:`ShardedCompletion`, runs ``--warmup`` iterations, then
``--iters`` timed ones (the median is reported, in wall-clock seconds and in CPU seconds of the process: on a
machine shared with other jobs the wall clock measures the contention, the CPU time what
each process computes). The data are generated once, into a
temporary directory (indices as uint8, 20 MB, values 8 MB). Target: 2 processes at least
1.7x faster than 1, with identical iterates (to rounding).

``--method rank_adaptive``: the whole search of ``distributed_rank_adaptive`` from rank 1
(cap ``--max-rank``, the data a TT of rank ``--truth-rank`` with uniform cores, at most ``--iters`` CG iterations in
all), its wall-clock and CPU seconds per process, the ranks found and the distance of the
final tensors; default 2e5 samples.

Run:  python benchmarks/bench_distributed.py [--n-samples 1000000] [--iters 8]
      [--warmup 2] [--worlds 1 2] [--method rcg|rlbfgs|rtr|rank_adaptive]
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
                                                    distributed_rank_adaptive,
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
        ra = args.method == "rank_adaptive"
        S = ShardedCompletion(idx, vals, (N_MODE,) * D, 1 if ra else R)
        del idx, vals
        t_setup = time.perf_counter() - t0
        if ra:
            t, c = time.perf_counter(), time.process_time()
            h = distributed_rank_adaptive(S, max_rank=args.max_rank, max_iters=args.iters)
            wall, cpu_s = time.perf_counter() - t, time.process_time() - c
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out_q.put({"rank": rank, "world": world, "n_local": S.n_local, "setup": t_setup,
                       "wall": wall, "cpu": cpu_s, "peak_mb": peak, "x": h.x.numpy().copy(),
                       "ranks": h.info["ranks"], "cg_iters": h.iters[-1],
                       "stages": len(h.info["rank_history"]), "status": h.status,
                       "attempts": [(a["bond"], tuple(a["ranks"]), a["accepted"])
                                    for a in h.info["rank_history"]],
                       "control_err": h.metrics[-1]["control_err"],
                       "errs": [a["control_err"] for a in h.info["rank_history"]]})
            return
        x0 = S.initial_point(0)
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
    ap.add_argument("--method", choices=("rcg", "rlbfgs", "rtr", "rank_adaptive"),
                    default="rcg")
    ap.add_argument("--truth-rank", type=int, default=3,
                    help="rank_adaptive: the TT-rank of the data")
    ap.add_argument("--max-rank", type=int, default=3, help="rank_adaptive: the cap")
    args = ap.parse_args()
    ra = args.method == "rank_adaptive"
    if ra and "--n-samples" not in sys.argv:
        args.n_samples = 2 * 10 ** 5
    if ra and "--iters" not in sys.argv:
        args.iters = 400

    import numpy as np
    import torch

    import ttmanifold as tm
    from ttmanifold import kernels

    if ra:
        _log(f"# bench_distributed: rank_adaptive, d={D}, n={N_MODE}, data of rank "
             f"{args.truth_rank} (uniform cores, entries of RMS 1), cap {args.max_rank}, "
             f"|Omega|={args.n_samples}, float64, at most {args.iters} CG iterations in all")
    else:
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
        _log(f"generating the data ({args.n_samples} samples of a random "
             f"rank-{args.truth_rank if ra else R} TT) ...")
        g = torch.Generator().manual_seed(0)
        if ra:  # uniform cores: a rank-one part the search can start from
            from ttmanifold.experiments.problems import random_tt

            truth = random_tt((N_MODE,) * D, args.truth_rank, core_dist="uniform",
                              generator=g)
        else:
            truth = tm.TT.random((N_MODE,) * D, R, dtype=torch.float64, generator=g)
        idx = torch.randint(0, N_MODE, (args.n_samples, D), generator=g, dtype=torch.uint8)
        vals = truth.gather(idx.long())
        if ra:
            # entries of RMS 1 (a unit-norm TT of 50^20 entries has entries near 1e-17)
            vals = vals / vals.pow(2).mean().sqrt()
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
            if ra:
                _log(f"  done in {time.perf_counter() - t0:.1f} s")
                continue
            _log(f"  done in {time.perf_counter() - t0:.1f} s: median s/iter per rank "
                 + ", ".join(f"{statistics.median(x['per_iter']):.3f}" for x in r)
                 + "; peak RSS MB per rank " + ", ".join(f"{x['peak_mb']:.0f}" for x in r))
    base = results[args.worlds[0]][0]
    if ra:
        return _report_rank_adaptive(results, args, base)
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



def _report_rank_adaptive(results, args, base):
    """The table of ``--method rank_adaptive``: seconds of the whole search per process."""
    import numpy as np
    import torch

    import ttmanifold as tm

    M = tm.FixedTTRank((N_MODE,) * D, base["ranks"])
    X1 = M.to_tt(torch.from_numpy(base["x"]))
    _log("")
    _log("| processes | samples per process | search s (wall) | speed-up | CPU s per "
         "process | CPU speed-up | peak RSS per process (MB) | ranks | attempts | CG "
         "iterations | control error | same attempts as 1 proc | "
         "||X - X_1proc|| / ||X_1proc|| |")
    _log("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for world, r in results.items():
        wall, cpu = max(x["wall"] for x in r), max(x["cpu"] for x in r)
        same = all(np.array_equal(x["x"], r[0]["x"]) for x in r)
        peaks = ", ".join(f"{x['peak_mb']:.0f}" for x in r)
        ok = r[0]["ranks"] == base["ranks"] and r[0]["attempts"] == base["attempts"]
        diff = float((M.to_tt(torch.from_numpy(r[0]["x"])) - X1).norm() / X1.norm()) \
            if ok else float("nan")
        _log(f"| {world} | {', '.join(str(x['n_local']) for x in r)} | {wall:.1f} | "
             f"{base['wall'] / wall:.2f}x | {cpu:.1f} | {base['cpu'] / cpu:.2f}x | "
             f"{peaks} | "
             f"{min(r[0]['ranks'][1:-1])}..{max(r[0]['ranks'])} | {r[0]['stages']} | "
             f"{r[0]['cg_iters']} | {r[0]['control_err']:.1e} | {'yes' if ok else 'NO'} | "
             f"{diff:.1e}{' (replicas bitwise equal)' if world > 1 and same else ''} |")
    for world, r in results.items():
        if world == args.worlds[0] or r[0]["attempts"] != base["attempts"]:
            _log(f"attempts ({world} proc): " + "; ".join(
                f"{b} {list(rk)} {'kept' if a else 'rejected'}" for b, rk, a in r[0]["attempts"]))
    for world, r in results.items():
        _log(f"control errors ({world} proc): " + ", ".join(f"{e:.6e}" for e in r[0]["errs"]))
    _log(f"status {base['status']}; load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
