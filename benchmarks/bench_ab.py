"""A/B regression check: this checkout against another git revision, in the same run.

    python benchmarks/bench_ab.py --baseline <rev> [--rounds 5] [--cg]

Checks the baseline out into a temporary git worktree and times the same per-step
operations (FixedTTRank.project of a TT, retr, riemannian_grad of an inner-product loss,
one geoopt RiemannianSGD step; d = 10, n = 20, r = 10, float64) in two worker processes,
one per revision, alternating rounds so that both see the same machine load. With
``--cg``: one Riemannian CG iteration of completion at d = 20, n = 50, r = 10,
|Omega| = 10^6 (both revisions' compiled kernels built first). One intra-op thread, CPU
time, median over rounds; prints a table with the ratio new / baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

WORKER = r'''
import json, os, sys, time
import torch
torch.set_num_threads(1)
import geoopt
import ttmanifold as tm

def build():
    try:
        from ttmanifold import kernels
        kernels.build(verbose=False)
    except ImportError:  # older revisions: the _native module
        from ttmanifold import _native
        _native.get_dense(wait=True)
        _native.get()

def timed(fn, reps):
    fn()
    t = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t) / reps * 1e3

def small():
    g = torch.Generator().manual_seed(0)
    shape = (20,) * 10
    M = tm.FixedTTRank(shape, 10)
    p = M.random(dtype=torch.float64, generator=g).as_subclass(torch.Tensor)
    A = tm.TT.random(shape, 10, dtype=torch.float64, generator=g)
    u = M.proju(p, torch.randn(M.size, dtype=torch.float64, generator=g))
    u = u / u.norm()
    f = lambda X: 0.5 * tm.inner(X, X) - tm.inner(X, A)
    q = geoopt.ManifoldParameter(p.clone(), manifold=M)
    opt = geoopt.optim.RiemannianSGD([q], lr=1e-3)
    def sgd():
        opt.zero_grad()
        X = q.unpack_tensor()
        (0.5 * tm.inner(X, X) - tm.inner(X, A)).backward()
        opt.step()
    return {
        "project (TT, r=10)": timed(lambda: M.project(p, A), 40),
        "retr": timed(lambda: M.retr(p, 0.1 * u), 40),
        "riemannian_grad (inner loss)": timed(lambda: M.riemannian_grad(p, f), 40),
        "RiemannianSGD step": timed(sgd, 40),
    }

def cg():
    from importlib import import_module
    try:
        P = import_module("ttmanifold.experiments.problems")
    except ImportError:
        P = import_module("ttmanifold.problems")
    prob = P.Completion((50,) * 20, 10, train_size=10 ** 6, test_size=1000, seed=0,
                        dtype=torch.float64)
    M = prob.manifold
    x = prob.initial_point(1)
    def it():
        loss, grad, ctx = prob.cg_grad(x)
        eta = -grad
        a = prob.exact_step(x, eta, ctx)
        del ctx
        return M.retr(x, a * eta)
    return {"CG iteration (1e6 samples)": timed(it, 2)}

build()
out = small()
if "--cg" in sys.argv:
    out.update(cg())
print("RESULT " + json.dumps(out))
'''


def run_worker(root: str, cg: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1", TTMANIFOLD_BUILD="0")
    r = subprocess.run([sys.executable, "-c", WORKER] + (["--cg"] if cg else []), cwd=root,
                       env=env, capture_output=True, text=True, timeout=3600)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker in {root} failed:\n{r.stderr[-3000:]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cg", action="store_true", help="also one CG iteration at 1e6 samples")
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                          text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="ttm_ab_") as tmp:
        base = os.path.join(tmp, "baseline")
        subprocess.run(["git", "worktree", "add", "--detach", "-q", base, args.baseline],
                       cwd=here, check=True)
        try:
            print(f"building both revisions' compiled kernels (once per machine, up to a "
                  f"few minutes) ...", flush=True)
            for root in (here, base):
                subprocess.run([sys.executable, "-c", WORKER.split("build()\nout")[0] + "build()"],
                               cwd=root, env=dict(os.environ, PYTHONPATH=root), check=True,
                               capture_output=True, timeout=1800)
            rows: dict = {}
            t0 = time.time()
            for k in range(args.rounds):
                for name, root in (("new", here), ("baseline", base)):
                    for op, ms in run_worker(root, args.cg).items():
                        rows.setdefault(op, {"new": [], "baseline": []})[name].append(ms)
                print(f"  round {k + 1}/{args.rounds} done ({time.time() - t0:.0f} s)", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base], cwd=here)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    print(f"\nA/B: HEAD {head} vs {args.baseline}; {platform.processor() or platform.machine()}, "
          f"1 thread, CPU time, median of {args.rounds} rounds, load {os.getloadavg()[0]:.1f}")
    print(f"| operation | baseline ms | new ms | new / baseline |\n| --- | ---: | ---: | ---: |")
    for op, v in rows.items():
        b, n = med(v["baseline"]), med(v["new"])
        print(f"| {op} | {b:.3f} | {n:.3f} | {n / b:.2f} |")


if __name__ == "__main__":
    main()
