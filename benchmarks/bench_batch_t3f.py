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
float64 and float32 (``--dtypes``). The check column compares the Frobenius norm of all B
results of ttmanifold's batch call with t3f's (relative difference).

``--baseline-root DIR`` adds a column for the batch call of another revision of
ttmanifold (``DIR`` holds its ``ttmanifold`` package, e.g. ``git worktree add DIR <rev>``),
run in a worker process and timed in the same interleaved rounds.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_manifold as bm  # noqa: E402  (timing, the t3f worker client, machine line)

from ttmanifold import TT, FixedTTRank  # noqa: E402

F64 = torch.float64
DTYPES = {"float64": torch.float64, "float32": torch.float32}

# the baseline worker: another revision's ttmanifold (first on its sys.path), speaking the
# JSON-lines protocol of the t3f worker (load a case from the .npz, time one call)
BASELINE_WORKER = r"""
import json, sys, time
import numpy as np
import torch
torch.set_num_threads(1)
from ttmanifold import TT, FixedTTRank
ops = {}
def reply(**rep):
    print(json.dumps(dict(ok=True, **rep)), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        if req["cmd"] == "info":
            import ttmanifold
            reply(file=ttmanifold.__file__)
        elif req["cmd"] == "load":
            c = req["case"]
            data = np.load(c["data"])
            dt = getattr(torch, c["dtype"])
            M = FixedTTRank((c["n"],) * c["d"], c["r"])
            t = lambda a: torch.from_numpy(data[a]).to(dt)
            Z = TT([t(f"Z{k}") for k in range(c["d"])])
            p, u, p0 = t("p"), t("u"), t("p0")
            ops = {"retr_batch": lambda: M.retr(p, u), "project_batch": lambda: M.project(p0, Z)}
            for fn in ops.values():
                for _ in range(req.get("warmup", 1)):
                    fn()
            reply(ops=list(ops))
        elif req["cmd"] == "time":
            timer = time.process_time if req["clock"] == "cpu" else time.perf_counter
            s = timer()
            for _ in range(req.get("reps", 1)):
                ops[req["op"]]()
            reply(s=(timer() - s) / req.get("reps", 1))
        elif req["cmd"] == "quit":
            break
    except Exception as e:
        print(json.dumps(dict(ok=False, error=repr(e))), flush=True)
"""


class BaselinePeer(bm.T3FPeer):
    """The batch calls of another ttmanifold revision (its package under ``root``) in a
    worker process; the t3f worker's client and protocol."""

    def __init__(self, root: str):
        self.errlog = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, PYTHONPATH=os.path.abspath(root), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-c", BASELINE_WORKER],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errlog, text=True, env=env, bufsize=1,
                                     cwd=os.path.abspath(root))  # (sys.path[0] is the cwd)
        self.info = self.request(cmd="info")


def save(path, arrays=None, **tts):
    arrays = dict(arrays or {})
    for name, x in tts.items():
        for k, c in enumerate(x.cores):
            arrays[f"{name}{k}"] = c.detach().numpy()
    np.savez(path, **arrays)


def case(M, r, B, gen, dtype=F64):
    # drawn in float64 (the same inputs for both dtypes), then cast
    p = M.random(B, dtype=F64, generator=gen)
    Z = TT.random(M.shape, r, dtype=F64, generator=gen, batch=(B,))
    u = M.project(p, Z)
    u = u * (0.5 / M.norm(p, u)).unsqueeze(-1)
    p0 = M.random(dtype=F64, generator=gen)
    return p.to(dtype), u.to(dtype), Z.to(dtype), p0.to(dtype)


def frob_all(tt: TT) -> float:
    return float(tt.norm().pow(2).sum().sqrt())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="4,10")
    ap.add_argument("--batches", default="1,16,256,1024")
    ap.add_argument("--loop-max", type=int, default=256,
                    help="largest B timed as a Python loop (its time per point is flat)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--ops", default="retr,project")
    ap.add_argument("--baseline-root", default=None,
                    help="a checkout of another revision: its batch calls in the same rounds")
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
    base = BaselinePeer(args.baseline_root) if args.baseline_root else None
    if base is not None:
        print(f"# baseline: {base.info['file']}", flush=True)
    opts = dict(repeats=args.repeats, max_repeats=args.repeats, min_time=0.0)
    rows = []
    d, n = 10, 20
    gen = torch.Generator().manual_seed(0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for dname in args.dtypes.split(","):
                dtype = DTYPES[dname]
                for r in (int(x) for x in args.ranks.split(",")):
                    M = FixedTTRank((n,) * d, r)
                    for B in (int(x) for x in args.batches.split(",")):
                        p, u, Z, p0 = case(M, r, B, gen, dtype)
                        path = os.path.join(tmp, f"b{r}_{B}.npz")
                        raw = {k: v.numpy() for k, v in dict(p=p, u=u, p0=p0).items()}
                        save(path, raw, X=M.to_tt(p), T=M.tangent_to_tt(p, u), Z=Z,
                             P=M.to_tt(p0))
                        spec = dict(kind="batch", data=path, d=d, n=n, r=r, dtype=dname)
                        peer.request(cmd="load", case=spec, warmup=2)
                        if base is not None:
                            base.request(cmd="load", case=spec, warmup=2)
                        rows += run_case(M, B, r, dname, p, u, Z, p0, args, opts, peer, base)
    finally:
        peer.close()
        if base is not None:
            base.close()
    print()
    head = "| dtype | r | B | op | ttmanifold batch ms/pt | "
    head += "baseline batch ms/pt | new / baseline | " if base is not None else ""
    print(head + "ttmanifold loop ms/pt | t3f batch ms/pt | batch / t3f | check |")
    print("|---" * (11 if base is not None else 9) + "|")
    for dname, r, B, op, per, chk in rows:
        loop = per.get("loop")
        mid = (f"{per['baseline']:.4f} | {per['batch'] / per['baseline']:.2f} | "
               if base is not None else "")
        print(f"| {dname} | {r} | {B} | {op} | {per['batch']:.4f} | {mid}"
              f"{'-' if loop is None else f'{loop:.4f}'} | {per['t3f']:.4f} | "
              f"{per['batch'] / per['t3f']:.2f} | {chk:.0e} |")


def run_case(M, B, r, dname, p, u, Z, p0, args, opts, peer, base):
    """The interleaved rounds of one (dtype, r, B): one row per operation."""
    rows = []
    ours = {"retr": lambda: M.retr(p, u), "project": lambda: M.project(p0, Z)}
    loops = {"retr": lambda: [M.retr(p[b], u[b]) for b in range(B)],
             "project": lambda: [M.project(p0, Z[b]) for b in range(B)]}
    for op in args.ops.split(","):
        contenders = [("batch", bm.local_sampler(ours[op]))]
        if base is not None:
            contenders.append(("baseline", base.sampler(f"{op}_batch")))
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
        rows.append((dname, r, B, op, per, abs(mine - theirs) / abs(theirs)))
        print(f"{dname} r={r} B={B} {op}: " + ", ".join(f"{k} {v:.4f}" for k, v in per.items())
              + " ms/pt", flush=True)
    return rows


if __name__ == "__main__":
    main()
