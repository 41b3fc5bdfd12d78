"""Batched operations against t3f's ``TensorTrainBatch``, per point, in the same run.

    T3F_PYTHON=<python of the t3f venv> python benchmarks/bench_batch_t3f.py

t3f batches two of the operations ``bench_batch.py`` times: the rounding that serves as
its retraction (``round(X_b + T_b, r)``: a rank-r point plus a rank-2r tangent TT, the
rank-3r sum of t3f's examples), and the projection of a batch of TTs onto the tangent space
at one point (``t3f.project(batch, where)``; t3f has no batch of points there). For each
(r, B) the table gives the time per point of

- ttmanifold, one call on the batch (``M.retr(p, u)`` with ``p``, ``u`` of shape
  ``(B, size)``; ``M.project(p0, Z)`` with one point ``p0`` and a batch ``Z``);
- ttmanifold, a Python loop of single-point calls (compiled kernels as shipped);
- t3f, one call on the ``TensorTrainBatch`` (a ``tf.function``, traced before timing);

with CPU time (1 thread on both sides), interleaved rounds, median. d = 10, n = 20,
float64. The check column compares the Frobenius norm of all B results of ttmanifold's
batch call with t3f's (relative difference).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_manifold as bm  # noqa: E402  (timing, the t3f worker client, machine line)

from ttmanifold import TT, FixedTTRank  # noqa: E402

F64 = torch.float64


def save(path, **tts):
    arrays = {}
    for name, x in tts.items():
        for k, c in enumerate(x.cores):
            arrays[f"{name}{k}"] = c.detach().numpy()
    np.savez(path, **arrays)


def case(M, r, B, gen):
    p = M.random(B, dtype=F64, generator=gen)
    Z = TT.random(M.shape, r, dtype=F64, generator=gen, batch=(B,))
    u = M.project(p, Z)
    u = u * (0.5 / M.norm(p, u)).unsqueeze(-1)
    p0 = M.random(dtype=F64, generator=gen)
    return p, u, Z, p0


def frob_all(tt: TT) -> float:
    return float(tt.norm().pow(2).sum().sqrt())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="4,10")
    ap.add_argument("--batches", default="1,16,256,1024")
    ap.add_argument("--loop-max", type=int, default=256,
                    help="largest B timed as a Python loop (its time per point is flat)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--t3f-python", default=None, help="default: $T3F_PYTHON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bm.set_clock("cpu")
    py = args.t3f_python or os.environ.get("T3F_PYTHON")
    if not py:
        sys.exit("bench_batch_t3f: pass --t3f-python or set T3F_PYTHON to the python of a venv "
                 "with tensorflow-cpu==2.15.1 numpy==1.23.5 t3f==1.2.0")
    print("# " + bm.machine_line(), flush=True)
    print("starting the t3f worker (TensorFlow import takes a few seconds) ...", flush=True)
    peer = bm.T3FPeer(py, threads=1)
    opts = dict(repeats=args.repeats, max_repeats=args.repeats, min_time=0.0)
    rows = []
    d, n = 10, 20
    gen = torch.Generator().manual_seed(0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in (int(x) for x in args.ranks.split(",")):
                M = FixedTTRank((n,) * d, r)
                for B in (int(x) for x in args.batches.split(",")):
                    p, u, Z, p0 = case(M, r, B, gen)
                    path = os.path.join(tmp, f"b{r}_{B}.npz")
                    save(path, X=M.to_tt(p), T=M.tangent_to_tt(p, u), Z=Z, P=M.to_tt(p0))
                    peer.request(cmd="load", case=dict(kind="batch", data=path, d=d, r=r,
                                                      dtype="float64"), warmup=2)
                    ours = {"retr": lambda: M.retr(p, u), "project": lambda: M.project(p0, Z)}
                    loops = {"retr": lambda: [M.retr(p[b], u[b]) for b in range(B)],
                             "project": lambda: [M.project(p0, Z[b]) for b in range(B)]}
                    for op in ("retr", "project"):
                        contenders = [("batch", bm.local_sampler(ours[op]))]
                        if B <= args.loop_max:
                            contenders.append(("loop", bm.local_sampler(loops[op])))
                        contenders.append(("t3f", peer.sampler(f"{op}_batch")))
                        for _, s in contenders:
                            s()  # warmup
                        res = bm.measure(contenders, opts)
                        out = ours[op]()
                        mine = (frob_all(M.to_tt(out)) if op == "retr"
                                else frob_all(M.tangent_to_tt(p0.expand(B, -1), out)))
                        theirs = peer.request(cmd="check", op=f"{op}_batch")["check"]
                        per = {k: v[0] / B for k, v in res.items()}
                        rows.append((r, B, op, per, abs(mine - theirs) / abs(theirs)))
                        loop = per.get("loop")
                        print(f"r={r} B={B} {op}: batch {per['batch']:.4f} ms/pt, loop "
                              f"{'-' if loop is None else f'{loop:.4f}'}, t3f {per['t3f']:.4f}",
                              flush=True)
    finally:
        peer.close()
    print()
    print("| r | B | op | ttmanifold batch ms/pt | ttmanifold loop ms/pt | t3f batch ms/pt "
          "| batch / t3f | check |")
    print("|---|---|---|---|---|---|---|---|")
    for r, B, op, per, chk in rows:
        loop = per.get("loop")
        print(f"| {r} | {B} | {op} | {per['batch']:.4f} | "
              f"{'-' if loop is None else f'{loop:.4f}'} | {per['t3f']:.4f} | "
              f"{per['batch'] / per['t3f']:.2f} | {chk:.0e} |")


if __name__ == "__main__":
    main()
