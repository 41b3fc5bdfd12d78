"""Benchmark of ttmanifold's manifold operations against t3f (and torchTT).

    python benchmarks/bench_manifold.py            # full run (several minutes on 2 cores)
    python benchmarks/bench_manifold.py --quick    # smoke run on small sizes

Times, at d = 10, n = 20, r = 10 and 40 (ranks clipped to the feasible bound
``min(n_1..n_k, n_{k+1}..n_d)``, i.e. r_1 = r_{d-1} = 20 for r = 40), float64 and float32:

1. ``FixedTTRank.project(p, Z)`` of a rank-r TT onto the tangent space at a random point;
2. ``FixedTTRank.retr(p, xi)`` of a tangent vector ``xi = P_X(W)`` (W = Z scaled so that
   ``||xi|| = ||X|| / 2``);
3. ``FixedTTRank.riemannian_grad(p, f)`` for ``f(X) = 0.5||X - A||^2``, A of rank r,
   written ``0.5 <X,X> - <X,A> + 0.5 <A,A>`` with ``ttmanifold.inner`` (the shortcut);
4. the same f as a general loss, ``0.5 * (TT(X.cores) - A).norm() ** 2`` (through TT
   algebra on the rank-2r tangent TT; t3f: ``frobenius_norm_squared(x - A)``), with the
   Euclidean backprop of that f through the rank-r cores of X as a reference (ratio
   target <= 2), and (for reference, no verdict) the same f written on the tangent TT
   itself, ``0.5 * (X - A).norm() ** 2``, whose difference keeps the tangent structure;
   and (info rows) a sampled-entry loss ``0.5 sum_Omega (X[i] - a_i)^2`` on 10^4 random
   entries, written ``X.values_at(Omega)`` on the tangent TT and
   ``TT(X.cores).values_at(Omega)`` through the rank-2r block cores, each against its
   Euclidean backprop;
5. the projection of a sparse tensor with ``N = 10 d n r^2`` random entries:
   ``project_sampled`` with an :class:`IndexSet` built once outside the timing, and
   ``project`` of a ``torch.sparse_coo_tensor`` (which builds the index set on each call);
   timings only: t3f has no sampled-entry projection and no competitor is run;

one full ``geoopt.optim.RiemannianSGD`` step (zero_grad, loss from ``p.unpack_tensor()``,
backward, step) at n = 10, r = 20, d = 25, 50, 100 (float64), against t3f's gradient and
rounding of ``X - lr g`` formed at rank 2r in the gradient's tangent basis; and, with
``--ops cg`` (not in the default), one Riemannian CG iteration for completion at d = 20,
n = 50, r = 10, |Omega| = 10^6 against the GEMM floor. Every table's header names the CPU
model and a measured 2000 x 2000 GEMM GFLOP/s with the threads used.

Peers in the same run, on the same input cores: t3f (TensorFlow), through
``benchmarks/_t3f_bench.py --serve`` run by the interpreter named by ``--t3f-python`` or
``$T3F_PYTHON`` (a venv with ``tensorflow-cpu==2.15.1 numpy==1.23.5 t3f==1.2.0``; a note is
printed when none is given), and torchTT
(``torchtt.manifold``) when importable. The samples of the libraries are interleaved (one
call of each per round) so that they see the same machine load. Each time is the median
over the rounds after warmup, in ms. ``ratio`` = ttmanifold / t3f; the issue's targets are
ratio <= 0.5 at r = 10 and < 1 at r = 40 (the general loss: <= 0.5 at both). ``check`` is the relative difference between
the norms of ttmanifold's and t3f's results (both compute the same thing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

import geoopt
import ttmanifold as tm
from ttmanifold import IndexSet, FixedTTRank, TT

HERE = os.path.dirname(os.path.abspath(__file__))
SLOW_S = 2.0  # a round slower than this: stop after three rounds
VERY_SLOW_S = 8.0  # a single call slower than this: one warmup call, one round
CLOCK = {"name": "wall", "timer": time.perf_counter}


def set_clock(name: str) -> None:
    """``wall``: time.perf_counter; ``cpu``: time.process_time (CPU time of the process,
    insensitive to other load on the machine; equals wall time only single-threaded)."""
    CLOCK["name"] = name
    CLOCK["timer"] = time.process_time if name == "cpu" else time.perf_counter


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------
def local_sampler(fn: Callable[[], object], block: int = 1) -> Callable[[], float]:
    """One sample: seconds per call over ``block`` back-to-back calls (1: a single call, so
    that the interleaved libraries see each other's cache footprint)."""
    timer = CLOCK["timer"]

    def sample() -> float:
        s = timer()
        for _ in range(block):
            fn()
        return (timer() - s) / block

    return sample


def warm(fn: Callable[[], object], warmup: int) -> float:
    """Call ``fn`` ``warmup`` times (only once if that call is very slow); return the
    duration of the first call in s."""
    first = None
    for _ in range(max(warmup, 1)):
        s = time.perf_counter()
        fn()
        dt = time.perf_counter() - s
        first = dt if first is None else first
        if dt > VERY_SLOW_S:
            break
    return first


def measure(contenders: List[Tuple[str, Callable[[], float]]], opts, slow=False):
    """Interleaved timing: each round calls every contender once. At least ``repeats``
    rounds, more (up to ``max_repeats``) until ``min_time`` s were spent; three rounds
    when a round is slower than SLOW_S, one when ``slow``. Returns {name: (median ms, n)}."""
    samples: Dict[str, List[float]] = {name: [] for name, _ in contenders}
    total, rounds = 0.0, 0
    while True:
        rt = 0.0
        for name, sample in contenders:
            dt = sample()
            samples[name].append(dt)
            rt += dt
        total += rt
        rounds += 1
        if slow or (rt > SLOW_S and rounds >= 3):
            break
        if rounds >= opts["repeats"] and (total >= opts["min_time"]
                                          or rounds >= opts["max_repeats"]):
            break
    out = {}
    for name, s in samples.items():
        s = sorted(s)
        out[name] = (1e3 * s[len(s) // 2], len(s))
    return out


# ----------------------------------------------------------------------------------------
# peers
# ----------------------------------------------------------------------------------------
class PeerError(RuntimeError):
    pass


class T3FPeer:
    """The t3f worker (``_t3f_bench.py --serve``) in the t3f venv, spoken to in JSON lines."""

    def __init__(self, python: str, threads: Optional[int] = None):
        self.errlog = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        cmd = [python, os.path.join(HERE, "_t3f_bench.py"), "--serve"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errlog, text=True,
            env=env, bufsize=1)
        self.info = self.request(cmd="info")

    def request(self, **req):
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    raise PeerError("t3f worker exited: " + self.stderr_tail())
                if line.startswith("{"):
                    break
        except BrokenPipeError:
            raise PeerError("t3f worker exited: " + self.stderr_tail()) from None
        rep = json.loads(line)
        if not rep.pop("ok"):
            raise PeerError(f"t3f worker: {rep['error']}")
        return rep

    def stderr_tail(self, n=12) -> str:
        self.errlog.seek(0)
        return "\n".join(self.errlog.read().splitlines()[-n:])

    def sampler(self, op: str, block: int = 1) -> Callable[[], float]:
        return lambda: self.request(cmd="time", op=op, clock=CLOCK["name"], reps=block)["s"]

    def close(self):
        try:
            self.proc.stdin.write(json.dumps(dict(cmd="quit")) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "(version unknown)"


def torchtt_module():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchtt
            import torchtt.manifold  # noqa: F401
        return torchtt
    except Exception:
        return None


# ----------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------
def clipped_ranks(shape, r):
    return [min(r, f) for f in tm.feasible_ranks(shape)]


def loss_of(A: TT):
    def f(X: TT) -> torch.Tensor:
        return 0.5 * tm.inner(X, X) - tm.inner(X, A) + 0.5 * tm.inner(A, A)

    return f


def general_loss_of(A: TT):
    """The same f through TT algebra: a rank-3r difference and its norm (what any loss
    that is not written with ``tm.inner`` pays; Riemannian autodiff evaluates it on the
    rank-2r tangent TT, Euclidean backprop on the rank-r cores of X)."""

    def f(X: TT) -> torch.Tensor:
        return 0.5 * (TT(X.cores) - A).norm() ** 2

    return f


def structured_sum_loss_of(A: TT):
    """The same f on the tangent TT itself: ``X - A`` keeps X's structure as a term of the
    sum, so ``<X, X>`` and ``<X, A>`` take the tangent shortcuts."""

    def f(X: TT) -> torch.Tensor:
        return 0.5 * (X - A).norm() ** 2

    return f


#: samples of the sampled-entry loss rows (info rows beside the general loss)
SAMPLED_LOSS_N = 10_000


def sampled_loss_of(iset: IndexSet, a: torch.Tensor, structured: bool):
    """``0.5 sum_Omega (X[i] - a_i)^2`` at the samples of ``iset``: with ``structured``
    through ``X.values_at`` (on the tangent TT: rank-r sweeps, the sparse projection as its
    backward), else through the rank-2r block cores, ``TT(X.cores).values_at``."""

    def f(X: TT) -> torch.Tensor:
        Y = X if structured else TT(X.cores)
        return 0.5 * ((Y.values_at(iset) - a) ** 2).sum()

    return f


def gemm_gflops(dtype=torch.float64, size: int = 2000, reps: int = 5,
                timer: Callable[[], float] = time.perf_counter) -> float:
    """This machine's GEMM throughput in GFLOP/s: the best of ``reps`` 2000 x 2000
    matmuls with torch's current thread count (the floor against which small-matrix
    paths are judged, so ratios carry across machines). ``timer``: wall time by default;
    ``time.process_time`` gives FLOP per CPU second (all threads), insensitive to load."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, dtype=dtype, generator=g)
    b = torch.randn(size, size, dtype=dtype, generator=g)
    a @ b
    best = float("inf")
    for _ in range(reps):
        s = timer()
        a @ b
        best = min(best, timer() - s)
    return 2 * size ** 3 / best / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """CPU model, CPU count, torch threads and the measured GEMM GFLOP/s (float64 and
    float32), for every table's header."""
    g64, g32 = gemm_gflops(torch.float64), gemm_gflops(torch.float32)
    return (f"{cpu_model()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
            f"GEMM 2000x2000: {g64:.0f} GFLOP/s float64, {g32:.0f} GFLOP/s float32")


def dtname(dtype) -> str:
    return str(dtype).replace("torch.", "")


def sparse_peak_bytes(d, r, N, itemsize):
    """Rough peak memory of ``project_sampled``: it holds the left and the right vectors of
    every sample at once (2 d vectors of length r) plus a few (N, r) temporaries."""
    return (2 * d + 6) * N * r * itemsize


def save_npz(path, **tts):
    arrays = {}
    for name, x in tts.items():
        if isinstance(x, torch.Tensor):
            arrays[name] = x.numpy()
        else:
            for k, c in enumerate(x.cores):
                arrays[f"{name}{k}"] = c.numpy()
    np.savez(path, **arrays)


def bench_case(d, n, r, dtype, N, seed, opts, peer, ttmod, mem_budget_gib, tmp, log,
               ops=("project", "retr", "rgrad", "rgrad_general")):
    """All operations of one (dtype, r) case. Returns (rows, notes)."""
    shape = [n] * d
    ranks = clipped_ranks(shape, r)
    M = FixedTTRank(shape, ranks)
    g = torch.Generator().manual_seed(seed)
    p = M.random(dtype=dtype, generator=g)
    Z = TT.random(shape, ranks, dtype=dtype, generator=g)
    A = TT.random(shape, ranks, dtype=dtype, generator=g)
    idx = torch.randint(0, n, (N, d), generator=g) if N else None
    vals = torch.randn(N, dtype=dtype, generator=g) if N else None
    dt = dtname(dtype)
    notes: List[str] = []
    peer_ops: List[str] = []
    # the tangent vector of the retraction: xi = P_X(W), W = c Z scaled so that
    # ||xi|| = 0.5 ||X|| (P_X(Z) itself is tiny for a random Z)
    W = Z * (0.5 / float(torch.linalg.vector_norm(M.project(p, Z))))
    if peer is not None:
        path = os.path.join(tmp, f"case_{dt}_r{r}.npz")
        # no sparse data for t3f: it has no sampled-entry projection, and an autodiff
        # stand-in through gather_nd is not a fair peer (no verdict against it)
        save_npz(path, X=M.to_tt(p), Z=Z, A=A, W=W)
        t0 = time.perf_counter()
        rep = peer.request(cmd="load", case=dict(data=path, d=d, n=n, r=r, dtype=dt),
                           warmup=opts["warmup"], mem_budget_gib=mem_budget_gib)
        peer_ops, notes = rep["ops"], rep["notes"]
        log(f"t3f loaded {dt} r={r} (trace + warmup {time.perf_counter() - t0:.1f} s)")
    X_tt = None
    if ttmod is not None:
        X_tt = ttmod.TT(M.to_tt(p).cores)
        Z_tt, A_tt = ttmod.TT(Z.cores), ttmod.TT(A.cores)

        def f_tt(x):
            return 0.5 * ttmod.dot(x, x) - ttmod.dot(x, A_tt) + 0.5 * ttmod.dot(A_tt, A_tt)

    rows = []
    vnorm = lambda u: float(torch.linalg.vector_norm(u))  # noqa: E731  (isometry)

    def run(op, fn, check, peers=(), torchtt_fn=None, euclid_fn=None, **extra):
        slow = warm(fn, opts["warmup"]) > VERY_SLOW_S
        block = 1 if op.startswith("sparse") else opts.get("block", 1)
        contenders = [("ttmanifold", local_sampler(fn, block))]
        if euclid_fn is not None:
            warm(euclid_fn, opts["warmup"])
            contenders.append(("euclid", local_sampler(euclid_fn, block)))
        for pop in peers:
            if pop in peer_ops:
                contenders.append((pop, peer.sampler(pop, block)))
        if torchtt_fn is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                warm(torchtt_fn, opts["warmup"])
            contenders.append(("torchtt", local_sampler(torchtt_fn, block)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = measure(contenders, opts, slow=slow)
        out = fn()
        row = dict(op=op, dtype=dt, r=r, ms=res["ttmanifold"][0], rounds=res["ttmanifold"][1],
                   peers={}, torchtt=None, euclid=res["euclid"][0] if "euclid" in res else None,
                   **extra)
        mine = check(out)
        for pop in peers:
            if pop in res:
                theirs = peer.request(cmd="check", op=pop)["check"]
                row["peers"][pop] = dict(ms=res[pop][0], check=abs(mine - theirs) / max(
                    abs(mine), abs(theirs), 1e-300))
        if "torchtt" in res:
            row["torchtt"] = res["torchtt"][0]
        rows.append(row)
        pe = "  ".join(f"{k} {v['ms']:.3f} ms" for k, v in row["peers"].items())
        log(f"{op:<15} {dt} r={r}: ttmanifold {row['ms']:.3f} ms  {pe}"
            + (f"  torchTT {row['torchtt']:.3f} ms" if row["torchtt"] else "")
            + (f"  euclidean backprop {row['euclid']:.3f} ms" if row["euclid"] else ""))
        return row

    if "project" in ops:
        run("project", lambda: M.project(p, Z), vnorm, peers=("project",),
            torchtt_fn=(lambda: ttmod.manifold.riemannian_projection(X_tt, Z_tt))
            if ttmod else None)
    if "retr" in ops:
        xi = M.project(p, W)
        run("retr", lambda: M.retr(p, xi), lambda q: float(M.to_tt(q).norm()),
            peers=("retr_2r", "retr_3r"))
    if "rgrad" in ops:
        run("rgrad", lambda: M.riemannian_grad(p, loss_of(A)), vnorm, peers=("rgrad",),
            torchtt_fn=(lambda: ttmod.manifold.riemannian_gradient(X_tt, f_tt))
            if ttmod else None)
    if "rgrad_general" in ops:
        # the same f through TT algebra on the rank-2r tangent TT (a general loss), with
        # the Euclidean backprop of that f through the rank-r cores of X as the reference
        fg = general_loss_of(A)
        Xc = M.to_tt(p)

        def euclid():
            cores = [c.detach().requires_grad_() for c in Xc.cores]
            with torch.enable_grad():
                val = fg(TT(cores, check=False))
                return torch.autograd.grad(val, cores)

        row = run("rgrad_general", lambda: M.riemannian_grad(p, fg), vnorm,
                  peers=("rgrad_general",),
                  euclid_fn=euclid)
        # the same f written on the tangent TT itself (no TT(X.cores)): X - A is then a sum
        # whose inner products use the tangent structure (info: the general row is the
        # verdict)
        fs = structured_sum_loss_of(A)
        run("rgrad_sum", lambda: M.riemannian_grad(p, fs), vnorm, peers=("rgrad_general",),
            euclid_fn=euclid)
        # a sampled-entry loss, 0.5 sum_Omega (X[i] - a_i)^2 on SAMPLED_LOSS_N entries: through
        # the tangent TT's values_at (rank-r sweeps, the scatter of one CG iteration as its
        # backward) and through the rank-2r block cores (TT(X.cores)); info rows, each
        # against the Euclidean backprop of the same loss through the cores of X
        gs = torch.Generator().manual_seed(seed + 1)
        iset = IndexSet(torch.randint(0, n, (SAMPLED_LOSS_N, d), generator=gs), M.shape)
        a_s = torch.randn(SAMPLED_LOSS_N, dtype=dtype, generator=gs)
        for op, fl in (("rgrad_values", sampled_loss_of(iset, a_s, structured=True)),
                       ("rgrad_values_blocks", sampled_loss_of(iset, a_s, structured=False))):
            def euclid_s(fl=fl):
                cores = [c.detach().requires_grad_() for c in Xc.cores]
                with torch.enable_grad():
                    return torch.autograd.grad(fl(TT(cores, check=False)), cores)

            run(op, lambda fl=fl: M.riemannian_grad(p, fl), vnorm, euclid_fn=euclid_s)

    if N:
        itemsize = torch.finfo(dtype).bits // 8
        peak = sparse_peak_bytes(d, r, N, itemsize)
        chunks = max(1, math.ceil(peak / (mem_budget_gib * 2**30)))
        bounds = [N * i // chunks for i in range(chunks + 1)]
        parts = [(idx[a:b], vals[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        t0 = time.perf_counter()
        sets = []
        for pi, _ in parts:
            s = IndexSet(pi, M.shape)
            for k in range(d):
                s.plan(k)  # the per-mode grouping is built lazily: build it here
            sets.append(s)
        build_ms = 1e3 * (time.perf_counter() - t0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sparse invariant-check notice
            coos = [torch.sparse_coo_tensor(pi.t(), pv, M.shape) for pi, pv in parts]

        def sampled():
            out = M.project_sampled(p, sets[0], parts[0][1])
            for s, (_, pv) in zip(sets[1:], parts[1:]):
                out = out + M.project_sampled(p, s, pv)
            return out

        def coo():
            out = M.project(p, coos[0])
            for z in coos[1:]:
                out = out + M.project(p, z)
            return out

        extra = dict(N=N, chunks=chunks, build_ms=build_ms, peak_gib=peak / 2**30)
        run("sparse_sampled", sampled, vnorm, **extra)
        del sets
        run("sparse_coo", coo, vnorm, **extra)
        if chunks > 1:
            notes.append(
                f"{dt}, r = {r}, N = {N}: ttmanifold's project_sampled would hold ~"
                f"{peak / 2**30:.0f} GiB (all left and right sample vectors at once), so the "
                f"samples were split into {chunks} chunks (one IndexSet / sparse tensor "
                f"each; the projection is linear) to stay within {mem_budget_gib:g} GiB")
    return rows, notes


def bench_sgd(d, n, r, dtype, lr, seed, opts, peer, tmp, log):
    shape = [n] * d
    ranks = clipped_ranks(shape, r)
    M = FixedTTRank(shape, ranks)
    g = torch.Generator().manual_seed(seed)
    p0 = M.random(dtype=dtype, generator=g)
    A = TT.random(shape, ranks, dtype=dtype, generator=g)
    p = geoopt.ManifoldParameter(p0.clone(), manifold=M)
    opt = geoopt.optim.RiemannianSGD([p], lr=lr)
    f = loss_of(A)

    def step():
        opt.zero_grad()
        loss = f(M.unpack_tensor(p))
        loss.backward()
        opt.step()
        return loss

    contenders = [("ttmanifold", local_sampler(step))]
    if peer is not None:
        path = os.path.join(tmp, f"sgd_d{d}.npz")
        save_npz(path, X=M.to_tt(p0), A=A)
        peer.request(cmd="load", case=dict(kind="sgd", data=path, d=d, n=n, r=r,
                                           dtype=dtname(dtype), lr=lr),
                     warmup=opts["warmup"])
        contenders.append(("t3f", peer.sampler("sgd_step")))
    warm(step, opts["warmup"])
    res = measure(contenders, opts)
    row = dict(d=d, ms=res["ttmanifold"][0], t3f=res["t3f"][0] if "t3f" in res else None)
    log(f"sgd_step d={d}: ttmanifold {row['ms']:.3f} ms"
        + (f"  t3f {row['t3f']:.3f} ms" if row["t3f"] else ""))
    return row


def bench_cg(dtype, iters, log, d=20, n=50, r=10, N=10 ** 6):
    """Seconds per Riemannian CG iteration for completion (issue 16, item 2) against the
    GEMM floor of this machine: the iteration's arithmetic is about 8 r^2 d N flop (left
    and right sweeps on Omega, the gradient scatter and the line search's tangent values,
    2 r^2 flop per sample and core each), the floor that count at the measured 2000 x 2000
    GEMM rate with the same threads."""
    from ttmanifold import kernels
    from ttmanifold.experiments.problems import Completion
    from ttmanifold.experiments.solvers import run as run_solver

    gf = gemm_gflops(dtype)
    gf_cpu = gemm_gflops(dtype, timer=time.process_time)
    t0 = time.perf_counter()
    P = Completion((n,) * d, r, train_size=N, test_size=10 ** 4, seed=0, dtype=dtype)
    x = P.initial_point(0)
    h = run_solver(P, "rcg", x, iters=1, metrics_every=0, measure_memory=False)
    log(f"cg {dtname(dtype)}: problem + first iteration {time.perf_counter() - t0:.1f} s")
    cpu = [time.process_time()]  # CPU time of this process (all threads) after each step

    def tick(t, hist):
        cpu.append(time.process_time())
        return False

    h = run_solver(P, "rcg", h.x, iters=iters, metrics_every=0, measure_memory=False,
                   callback=tick)
    steps = [b - a for a, b in zip(h.time[:-1], h.time[1:])]
    cpu_steps = [b - a for a, b in zip(cpu[:-1], cpu[1:])]
    steady = sorted(steps[1:]) if len(steps) > 1 else steps
    med = steady[len(steady) // 2]
    csteady = sorted(cpu_steps[1:]) if len(cpu_steps) > 1 else cpu_steps
    cmed = csteady[len(csteady) // 2]
    flop = 8 * r * r * d * N
    floor = flop / (gf * 1e9)
    floor_cpu = flop / (gf_cpu * 1e9)  # the same floor in CPU seconds (load-insensitive)
    native = kernels.status()["sampled"]["in_use"]
    log(f"cg {dtname(dtype)}: {1e3 * med:.0f} ms/iteration (CPU {1e3 * cmed:.0f} ms), "
        f"floor {1e3 * floor:.0f} ms (CPU {1e3 * floor_cpu:.0f} ms), compiled sampled "
        f"kernels in use: {native}")
    return dict(dtype=dtname(dtype), ms=1e3 * med, cpu_ms=1e3 * cmed,
                steps=[1e3 * t for t in steps], gemm=gf, flop=flop, floor_ms=1e3 * floor,
                ratio=med / floor, gemm_cpu=gf_cpu, floor_cpu_ms=1e3 * floor_cpu,
                ratio_cpu=cmed / floor_cpu, d=d, n=n, r=r, N=N, native=native)


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


LABELS = {
    ("project", "project"): "project: rank-r TT → tangent",
    ("retr", "retr_2r"): "retr (t3f: round of rank-2r X+ξ, add_n_projected)",
    ("retr", "retr_3r"): "retr (t3f: round(add(X, ξ)), rank 3r)",
    ("rgrad", "rgrad"): "riemannian_grad, f = 0.5‖X−A‖² written with tm.inner",
    ("rgrad_general", "rgrad_general"): "**riemannian_grad, general loss** "
                                        "f = 0.5‖X−A‖² as (X − A).norm()²/2",
    ("rgrad_sum", "rgrad_general"): "riemannian_grad, the same f as (X − A).norm()²/2 on "
                                    "the tangent TT (a sum of X and −A)",
    ("rgrad_values", None): "riemannian_grad, sampled-entry loss ½Σ_Ω (X[i] − a_i)² with "
                            "X.values_at(Ω) on the tangent TT",
    ("rgrad_values_blocks", None): "riemannian_grad, the same sampled-entry loss through the "
                                   "rank-2r block cores, TT(X.cores).values_at(Ω)",
    ("sparse_sampled", None): "project_sampled, prebuilt IndexSet",
    ("sparse_coo", None): "project(sparse_coo), incl. IndexSet build",
}
PEER_OF = {"project": ["project"], "retr": ["retr_2r", "retr_3r"], "rgrad": ["rgrad"],
           "rgrad_general": ["rgrad_general"], "rgrad_sum": ["rgrad_general"],
           "rgrad_values": [None], "rgrad_values_blocks": [None],
           "sparse_sampled": [None], "sparse_coo": [None]}
INFO_ONLY = {"retr_3r"}  # peer variants shown for reference, without a verdict
INFO_OPS = {"rgrad_sum", "rgrad_values", "rgrad_values_blocks"}  # reference rows, no verdict
EUCLID_TARGET = 2.0  # Riemannian autodiff / Euclidean backprop of the same loss


def report(rows, sgd_rows, notes, peer_info, peer_note, ttmod, args, header, cg_rows=()):
    lines = []
    w = lines.append
    w(header)
    w("")
    if cg_rows:
        c = cg_rows[0]
        w(f"Riemannian CG for completion, d = {c['d']}, n = {c['n']}, r = {c['r']}, "
          f"|Ω| = {c['N']:,}, {torch.get_num_threads()} threads: median wall time of "
          f"iterations 2.. of a run against the GEMM floor (≈ 8 r² d |Ω| = {c['flop']:.2g} "
          f"flop at this machine's 2000 x 2000 GEMM rate, same threads); target ratio ≤ 2. "
          f"The CPU columns measure both in CPU time of the process (all threads), which "
          f"other load on the machine does not inflate:")
        w("")
        w("| dtype | ms / iteration | GEMM GFLOP/s | floor ms | ratio | met "
          "| CPU ms / iteration | GEMM GFLOP/s per CPU s | CPU floor ms | CPU ratio | met "
          "| compiled kernels | iterations ms |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for c in cg_rows:
            w(f"| {c['dtype']} | {c['ms']:.0f} | {c['gemm']:.0f} | {c['floor_ms']:.0f} | "
              f"{c['ratio']:.1f} | {'yes' if c['ratio'] <= 2 else '**no**'} | "
              f"{c['cpu_ms']:.0f} | {c['gemm_cpu']:.0f} | {c['floor_cpu_ms']:.0f} | "
              f"{c['ratio_cpu']:.1f} | {'yes' if c['ratio_cpu'] <= 2 else '**no**'} | "
              f"{'yes' if c['native'] else 'no'} | "
              + ", ".join(f"{t:.0f}" for t in c["steps"]) + " |")
        w("")
        if not rows and not sgd_rows:
            return "\n".join(lines), []
    w("| operation | dtype | r | ttmanifold ms | t3f ms | ratio | target | met "
      "| Euclidean backprop ms | ratio (target ≤ 2) | torchTT ms | check |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for row in rows:
        # the general loss: <= 0.5 at both ranks (issue 16); the rest: <= 0.5 / < 1
        target = 0.5 if row["r"] <= 10 or row["op"] == "rgrad_general" else 1.0
        for pop in PEER_OF[row["op"]]:
            tgt = "≤ 0.5" if target == 0.5 else "< 1"
            label = LABELS[(row["op"], pop)]
            if "N" in row:
                label += f" [N = {row['N']:,}" + (
                    f", {row['chunks']} chunks]" if row["chunks"] > 1 else "]")
            theirs = row["peers"].get(pop) if pop else None
            if theirs and (pop in INFO_ONLY or row["op"] in INFO_OPS):
                ratio = row["ms"] / theirs["ms"]
                ratio_s, met_s, tgt = f"{ratio:.2f}", "(info)", "—"
                t_ms, chk = theirs["ms"], f"{theirs['check']:.0e}"
            elif theirs:
                ratio = row["ms"] / theirs["ms"]
                met = ratio <= target if target == 0.5 else ratio < target
                ratio_s, met_s = f"{ratio:.2f}", ("yes" if met else "**no**")
                t_ms, chk = theirs["ms"], f"{theirs['check']:.0e}"
                verdicts.append(dict(op=label, dtype=row["dtype"], r=row["r"], ratio=ratio,
                                     met=met))
            else:
                t_ms, ratio_s, chk = None, "—", "—"
                if row["op"].startswith("sparse"):
                    met_s, tgt = "no peer", "—"
                elif row["op"] in INFO_OPS and pop is None:
                    met_s, tgt = "(info)", "—"
                elif peer_info is None:
                    met_s = "no peer"
                else:
                    met_s = "—"
            first = pop == PEER_OF[row["op"]][0]
            tt = fmt_ms(row["torchtt"]) if first else "—"
            eu, eu_r = "—", "—"
            if row.get("euclid") and first and row["op"] in INFO_OPS:
                q = row["ms"] / row["euclid"]
                eu, eu_r = fmt_ms(row["euclid"]), f"{q:.2f} (info)"
            elif row.get("euclid") and first:
                q = row["ms"] / row["euclid"]
                eu, eu_r = fmt_ms(row["euclid"]), f"{q:.2f} " + ("yes" if q <= EUCLID_TARGET
                                                                  else "**no**")
                verdicts.append(dict(op=label + " vs Euclidean backprop", dtype=row["dtype"],
                                     r=row["r"], ratio=q, met=q <= EUCLID_TARGET))
            w(f"| {label} | {row['dtype']} | {row['r']} | {fmt_ms(row['ms'])} | "
              f"{fmt_ms(t_ms)} | {ratio_s} | {tgt} | {met_s} | {eu} | {eu_r} | {tt} | {chk} |")
    w("")
    if sgd_rows:
        w(f"One geoopt `RiemannianSGD` step (zero_grad, loss 0.5‖X−A‖² from "
          f"`p.unpack_tensor()`, backward, step), n = {args.sgd_n}, r = {args.sgd_r}, "
          f"float64; t3f: `t3f.gradients(f, X)`, then `X − lr·g` formed at rank 2r in the "
          f"gradient's tangent basis (`add_n_projected`) and `round(·, r)`, in one tf.function "
          f"(the fair baseline: X − lr·g has rank ≤ 2r):")
        w("")
        w("| d | ttmanifold ms/step | ttmanifold ms/step/d | t3f ms/step | ratio |")
        w("|---|---|---|---|---|")
        for row in sgd_rows:
            ratio = f"{row['ms'] / row['t3f']:.2f}" if row["t3f"] else "—"
            w(f"| {row['d']} | {fmt_ms(row['ms'])} | {row['ms'] / row['d']:.3f} | "
              f"{fmt_ms(row['t3f'])} | {ratio} |")
        if len(sgd_rows) >= 2:
            a, b = sgd_rows[0], sgd_rows[-1]
            w("")
            w(f"Growth d = {a['d']} → {b['d']} (×{b['d'] / a['d']:.0f}): ttmanifold time "
              f"×{b['ms'] / a['ms']:.2f} (linear: ×{b['d'] / a['d']:.0f}).")
        w("")
    out_notes = []
    if peer_note:
        out_notes.append(peer_note)
    if peer_info:
        v = peer_info["versions"]
        out_notes.append(
            f"t3f peer: t3f {v['t3f']}, TensorFlow {v['tensorflow']} (intra-op threads "
            f"{peer_info['threads']['intra_op'] or 'default'}), numpy {v['numpy']}; every t3f "
            f"operation is a tf.function traced during warmup.")
        out_notes.append(
            "general loss: ttmanifold `M.riemannian_grad(p, lambda X: 0.5 * (TT(X.cores) - "
            "A).norm() ** 2)` (f on the rank-2r tangent TT, through a rank-3r difference), "
            "t3f `t3f.gradients(lambda x: 0.5 * t3f.frobenius_norm_squared(x - A, "
            "differentiable=True), X)`; Euclidean backprop: the same f of the rank-r TT of X, "
            "`torch.autograd.grad` to its cores.")
        if not peer_info["sparse_projection_api"]:
            out_notes.append(
                "sparse rows: t3f has no projection of a sparse tensor (`t3f.project` takes "
                "TT objects only) and no sampled-entry competitor is run, so these rows are "
                "timings without a verdict.")
    out_notes.extend(notes)
    if ttmod is None:
        out_notes.append("torchTT not installed: no torchTT column.")
    else:
        out_notes.append(
            f"torchTT {_dist_version('torchTT')}: "
            "`torchtt.manifold.riemannian_projection` (project) and "
            "`torchtt.manifold.riemannian_gradient` (gradient); it has no retraction and no "
            "sparse projection.")
    out_notes.append("ttmanifold returns packed gauged deltas; t3f and torchTT return the "
                     "rank-2r TT of the tangent vector.")
    for n in out_notes:
        w(f"- {n}")
    return "\n".join(lines), verdicts


def main(argv=None):
    ap = argparse.ArgumentParser(description="ttmanifold manifold-operation benchmark")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="minimum rounds per operation")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no-t3f", action="store_true", help="skip the t3f peer")
    ap.add_argument("--t3f-python", default=None,
                    help="python of a venv with t3f 1.2.0 (default: $T3F_PYTHON)")
    ap.add_argument("--no-torchtt", action="store_true", help="skip the torchTT peer")
    ap.add_argument("--ops", default="project,retr,rgrad,rgrad_general,sparse,sgd",
                    help="comma-separated subset of project,retr,rgrad,rgrad_general,sparse,"
                         "sgd (default all), and cg: seconds per Riemannian CG iteration "
                         "for completion at d = 20, n = 50, r = 10, |Omega| = 10^6 against "
                         "the GEMM floor (not in the default; about a minute per dtype)")
    ap.add_argument("--cg-iters", type=int, default=6)
    ap.add_argument("--ranks", default=None, help="comma-separated ranks (default 10,40)")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--sparse-max-n", type=int, default=400_000,
                    help="cap on the sparse N = 10 d n r^2 (default 400000, which binds at "
                         "r = 40 where 10 d n r^2 = 3.2M takes about a minute per call); "
                         "0: no cap")
    ap.add_argument("--mem-budget-gib", type=float, default=8.0,
                    help="memory budget of one sparse projection (default 8): beyond it "
                         "ttmanifold's samples are split in chunks and t3f's gather_nd "
                         "route is not run")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of torch (torch.set_num_threads) and of TensorFlow "
                         "(intra- and inter-op); default: each library's own choice")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time (default); cpu: CPU time of each process, "
                         "robust to other load on the machine (use with --threads 1)")
    ap.add_argument("--block", type=int, default=1,
                    help="time the dense operations (project, retr, riemannian_grad) over blocks "
                         "of this many back-to-back calls per library (warm caches), the "
                         "blocks of the libraries interleaved; default 1: single interleaved "
                         "calls (each library sees the other's cache footprint)")
    ap.add_argument("--json", default=None, help="also write the raw results to this file")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    set_clock(args.clock)
    ops = set(args.ops.split(","))
    unknown = ops - {"project", "retr", "rgrad", "rgrad_general", "sparse", "sgd", "cg"}
    if unknown:
        ap.error(f"--ops: unknown {sorted(unknown)}")
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    if args.quick:
        d, n, rs = 6, 8, (3, 6)
        args.sgd_n, args.sgd_r, sgd_ds = 6, 4, (10, 20, 40)
        opts = dict(warmup=args.warmup or 1, repeats=args.repeats or 3, min_time=0.05,
                    max_repeats=10)
    else:
        d, n, rs = 10, 20, (10, 40)
        args.sgd_n, args.sgd_r, sgd_ds = 10, 20, (25, 50, 100)
        opts = dict(warmup=args.warmup or 2, repeats=args.repeats or 7, min_time=0.5,
                    max_repeats=40)
    if args.block < 1:
        ap.error("--block: expected a positive int")
    opts["block"] = args.block
    if args.ranks:
        rs = tuple(int(x) for x in args.ranks.split(","))
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    machine = machine_line()  # CPU model and GEMM GFLOP/s with the threads used
    notes: List[str] = []

    def log(msg):
        print(f"# [{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # build (or load) the compiled dense sweeps before timing, so that every timed call runs
    # the same code (TTMANIFOLD_NATIVE=0: the torch path)
    from ttmanifold import kernels
    if kernels.enabled():
        log("compiled dense sweeps: building or loading (`ttmanifold build-kernels`; a build "
            "takes 20-60 s, once per machine)")
        kernels.build(["dense"], verbose=False)
    native = kernels.module("dense") is not None
    log(f"compiled dense sweeps: {'in use' if native else 'not in use (torch path)'}")
    notes.append(f"ttmanifold's compiled dense sweeps (right_cores, project of a TT, retr): "
                 f"{'in use' if native else 'not in use (torch implementation)'}.")

    t3f_python = args.t3f_python or os.environ.get("T3F_PYTHON")
    peer, peer_info, peer_note = None, None, None
    if args.no_t3f:
        peer_note = "t3f peer skipped (--no-t3f)."
    elif not t3f_python or not os.path.exists(t3f_python):
        peer_note = (f"t3f peer missing: no interpreter {'at ' + t3f_python if t3f_python else 'given'} "
                     f"(pass --t3f-python or set T3F_PYTHON to the python of a venv made with "
                     f"`python -m venv t3fvenv && t3fvenv/bin/pip install "
                     f"tensorflow-cpu==2.15.1 numpy==1.23.5 t3f==1.2.0`).")
    else:
        try:
            peer = T3FPeer(t3f_python, args.threads)
            peer_info = peer.info
            log(f"t3f worker up: {peer_info['versions']}")
        except PeerError as e:
            peer_note = f"t3f peer failed to start: {e}"
            peer = None
    ttmod = None if args.no_torchtt else torchtt_module()

    rows, sgd_rows, cg_rows = [], [], []
    if "cg" in ops:
        kernels.build(["sampled"], verbose=False) if kernels.enabled() else None
        for dtype in dtypes:
            cg_rows.append(bench_cg(dtype, args.cg_iters, log))
        ops.discard("cg")
    try:
        with tempfile.TemporaryDirectory(prefix="bench_manifold_") as tmp:
            for dtype in (dtypes if ops & {"project", "retr", "rgrad", "rgrad_general",
                                           "sparse"} else ()):
                for r in rs:
                    N = 10 * d * n * r * r if "sparse" in ops else 0
                    if N and args.sparse_max_n and N > args.sparse_max_n:
                        notes.append(
                            f"{dtname(dtype)}, r = {r}: sparse N capped at {args.sparse_max_n:,} "
                            f"instead of 10 d n r² = {N:,} to keep the run short (the cost is "
                            f"linear in N; `--sparse-max-n 0` lifts the cap)")
                        N = args.sparse_max_n
                    try:
                        rws, nts = bench_case(d, n, r, dtype, N, 1234 + r, opts, peer, ttmod,
                                              args.mem_budget_gib, tmp, log, ops)
                    except PeerError as e:
                        peer_note = f"t3f peer failed: {e}"
                        peer.close()
                        peer = None
                        rws, nts = bench_case(d, n, r, dtype, N, 1234 + r, opts, None,
                                              ttmod, args.mem_budget_gib, tmp, log, ops)
                    rows += rws
                    notes += nts
            if "sgd" in ops:
                for sd in sgd_ds:
                    sgd_rows.append(bench_sgd(sd, args.sgd_n, args.sgd_r, torch.float64, 0.1,
                                              99, opts, peer, tmp, log))
    finally:
        if peer is not None:
            peer.close()

    header = (f"ttmanifold manifold benchmark ({'quick' if args.quick else 'full'} run), "
              f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {machine}, "
              f"load average {load0:.1f} at start / {os.getloadavg()[0]:.1f} at end; "
              f"torch {torch.__version__} (threads: {torch.get_num_threads()}), geoopt "
              f"{geoopt.__version__}; d = {d}, n = {n}; median of ≥ {opts['repeats']} "
              f"interleaved rounds after {opts['warmup']} warmup calls"
              + (f" (dense operations: each sample = mean of {opts['block']} back-to-back "
                 f"calls)" if opts.get("block", 1) > 1 else " (single calls)") + "; "
              f"{'CPU' if args.clock == 'cpu' else 'wall'} times in ms.")
    text, verdicts = report(rows, sgd_rows, notes, peer_info, peer_note, ttmod, args, header,
                            cg_rows)
    print(text)
    log(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, sgd=sgd_rows, cg=cg_rows, notes=notes, peer=peer_info,
                           verdicts=verdicts), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
