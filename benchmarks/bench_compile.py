"""torch.compile of the manifold's per-step operations on the CPU (issue 16, item 5).

    python benchmarks/bench_compile.py                 # d = 10, n = 20, r = 10, float64
    python benchmarks/bench_compile.py --quick         # small sizes (smoke run)

For each per-step operation on the torch path (``TTMANIFOLD_NATIVE=0`` is set before
ttmanifold is imported, unless ``--native``): ``M.retr``, ``M.proju``, ``M.egrad2rgrad``,
``M.transp``, ``M.retr_transp``, a hand-written Riemannian SGD step
``M.retr(p, -lr * M.egrad2rgrad(p, g))``, and geoopt's ``RiemannianSGD.step`` /
``RiemannianAdam.step``, it tries ``torch.compile(fn, fullgraph=True)`` (``--backend``,
default inductor) and reports:

- whether it compiles, or the first graph break (reason and the line in ttmanifold or
  geoopt where it happens);
- for a public method that breaks in ``FixedTTRank``'s inference-mode wrapper
  (``ttmanifold/manifold/fixed_rank.py``, ``_plain_path`` calls
  ``torch.is_inference_mode_enabled()``, which dynamo cannot trace, before
  ``torch.compiler.is_compiling()``), the same with the proposed order (is_compiling
  first, applied here at run time by wrapping ``_plain_path``; the file is not changed),
  which shows whether anything else breaks;
- the compile time (first call), the eager and compiled times (median of interleaved
  single calls, ms) and their ratio;
- the largest difference between the compiled and the eager result (as full tensors for
  points); for the geoopt steps, the compiled step is compared with the eager step of a
  twin optimizer in the same state.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

if "--native" not in sys.argv:
    os.environ["TTMANIFOLD_NATIVE"] = "0"

import torch  # noqa: E402
import geoopt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_manifold import machine_line  # noqa: E402

from ttmanifold import FixedTTRank, TT  # noqa: E402
from ttmanifold import kernels  # noqa: E402
import ttmanifold.manifold.fixed_rank as _fixed_rank  # noqa: E402

_ORIG_PLAIN_PATH = _fixed_rank._plain_path


def _plain_path_compiling_first(args):
    """The proposed order: under torch.compile tracing, the plain path, decided before
    any predicate dynamo cannot trace."""
    if torch.compiler.is_compiling():
        return True
    return _ORIG_PLAIN_PATH(args)


def proposed_plain_path(on: bool) -> None:
    _fixed_rank._plain_path = _plain_path_compiling_first if on else _ORIG_PLAIN_PATH


def first_break(exc: BaseException) -> str:
    """One line: the graph break's reason and the innermost ttmanifold/geoopt frame."""
    msg = str(exc).strip().splitlines()
    reason = msg[0][:160] if msg else type(exc).__name__
    where = ""
    for line in str(exc).splitlines():
        s = line.strip()
        if s.startswith("File ") and ("ttmanifold" in s or "geoopt" in s):
            parts = s.split(",")
            fname = parts[0].split("/")[-1].rstrip('"')
            pkg = "ttmanifold" if "ttmanifold" in s else "geoopt"
            where = f" at {pkg}/.../{fname}{',' + ','.join(parts[1:3]) if len(parts) > 1 else ''}"
    return f"{type(exc).__name__}: {reason}{where}"


def median_ms(samples):
    s = sorted(samples)
    return 1e3 * s[len(s) // 2]


def as_full(M, out):
    if isinstance(out, tuple):
        out = out[0]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="torch.compile of the per-step operations")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: CPU time of the process (robust to other load; use with "
                         "--threads 1)")
    ap.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    ap.add_argument("--native", action="store_true",
                    help="keep the compiled C++ kernels for the eager calls (default: torch path)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    d, n, r = (5, 6, 3) if args.quick else (10, 20, 10)
    rounds = 5 if args.quick else args.rounds
    load0 = os.getloadavg()[0]
    machine = machine_line()
    M = FixedTTRank([n] * d, r)
    g = torch.Generator().manual_seed(0)
    p = M.random(dtype=dtype, generator=g)
    Z = TT.random([n] * d, r, dtype=dtype, generator=g)
    xi = M.project(p, Z)
    xi = xi * (0.5 * float(M.to_tt(p).norm()) / float(torch.linalg.vector_norm(xi)))
    q = M.retr(p, xi)
    egrad = torch.randn(p.shape, dtype=dtype, generator=g)
    lr = 0.1
    def full(x):
        """A point as something comparable: the full tensor when small, else its norm
        and its inner product with Z."""
        if isinstance(x, tuple):
            x = x[0]
        t = M.to_tt(x)
        if n ** d <= 10 ** 7:
            return t.full()
        from ttmanifold import inner
        return torch.stack([t.norm(), inner(t, Z)])

    ops = [
        ("M.retr(p, xi)", lambda: M.retr(p, xi), True),
        ("M.proju(p, u)", lambda: M.proju(p, egrad), False),
        ("M.egrad2rgrad(p, u)", lambda: M.egrad2rgrad(p, egrad), False),
        ("M.transp(p, q, xi)", lambda: M.transp(p, q, xi), False),
        ("M.retr_transp(p, xi, xi)", lambda: M.retr_transp(p, xi, xi), True),
        ("RSGD step by hand: M.retr(p, -lr M.egrad2rgrad(p, g))",
         lambda: M.retr(p, -lr * M.egrad2rgrad(p, egrad)), True),
    ]
    rows = []
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    timer = time.process_time if args.clock == "cpu" else time.perf_counter

    def timed_pair(eager, compiled):
        for _ in range(2):
            eager(), compiled()
        te, tc = [], []
        for _ in range(rounds):
            s = timer()
            eager()
            te.append(timer() - s)
            s = timer()
            compiled()
            tc.append(timer() - s)
        return median_ms(te), median_ms(tc)

    def try_compile(fn):
        torch._dynamo.reset()
        cf = torch.compile(fn, fullgraph=True, backend=args.backend)
        s = time.perf_counter()
        try:
            out = cf()
        except Exception as e:  # graph break under fullgraph=True, or a backend failure
            return None, None, first_break(e)
        return cf, time.perf_counter() - s, out

    for name, public, is_point in ops:
        ref = public()
        proposed_plain_path(False)
        cf, ct, out = try_compile(public)
        via = "as is"
        brk = None
        if cf is None:
            brk = out
            proposed_plain_path(True)
            cf, ct, out = try_compile(public)
            via = "with the proposed `_plain_path` order"
            if cf is None:
                proposed_plain_path(False)
                rows.append(dict(op=name, ok=False, brk=brk, body_brk=out))
                print(f"# {name}: breaks ({brk}); with the proposed order too ({out})",
                      file=sys.stderr)
                continue
        a, b = (full(ref), full(out)) if is_point else (as_full(M, ref), as_full(M, out))
        diff = float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))
        te, tc = timed_pair(public, cf)
        proposed_plain_path(False)
        rows.append(dict(op=name, ok=brk is None, brk=brk, via=via, compile_s=ct, eager=te,
                         compiled=tc, diff=diff))
        print(f"# {name}: {'compiles' if brk is None else 'breaks; compiles with the fix'} "
              f"(compile {ct:.1f} s) eager {te:.3f} ms compiled {tc:.3f} ms diff {diff:.1e}",
              file=sys.stderr, flush=True)

    # geoopt's optimizers: the step as users compile it, against an eager twin
    for oname, make in (("geoopt RiemannianSGD.step (momentum 0.9)",
                         lambda P: geoopt.optim.RiemannianSGD([P], lr=lr, momentum=0.9)),
                        ("geoopt RiemannianAdam.step", lambda P: geoopt.optim.RiemannianAdam(
                            [P], lr=1e-2))):
        P1 = geoopt.ManifoldParameter(p.clone(), manifold=M)
        P2 = geoopt.ManifoldParameter(p.clone(), manifold=M)
        o1, o2 = make(P1), make(P2)
        for P, o in ((P1, o1), (P2, o2)):
            P.grad = egrad.clone()
            o.step()  # state initialised eagerly
            P.grad = egrad.clone()
        torch._dynamo.reset()
        cstep = torch.compile(o2.step, fullgraph=True, backend=args.backend)
        s = time.perf_counter()
        try:
            cstep()
        except Exception as e:
            rows.append(dict(op=oname, ok=False, brk=first_break(e), body_brk=None))
            continue
        ct = time.perf_counter() - s
        o1.step()
        a, b = full(P1.detach()), full(P2.detach())
        diff = float((a - b).abs().max() / a.abs().max())
        te, tc = timed_pair(lambda: o1.step(), cstep)
        rows.append(dict(op=oname, ok=diff < 1e-8, brk=None if diff < 1e-8 else (
            "compiles, but the compiled step is **not** the Riemannian step: dynamo's "
            "optimizer tracing sees the parameter as a plain tensor, so geoopt picks its "
            "Euclidean default manifold (p - lr g)"), via="public method", compile_s=ct,
            eager=te, compiled=tc, diff=diff))
        print(f"# {oname}: compile {ct:.1f} s eager {te:.3f} compiled {tc:.3f} diff {diff:.1e}",
              file=sys.stderr, flush=True)

    print(f"torch.compile of the per-step operations, "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {machine}; torch {torch.__version__}, "
          f"geoopt {geoopt.__version__}; backend {args.backend}, fullgraph=True; "
          f"d = {d}, n = {n}, r = {r}, {args.dtype}; eager path: "
          f"{'compiled C++ kernels where usable' if kernels.enabled() else 'torch (TTMANIFOLD_NATIVE=0)'}; "
          f"median of {rounds} interleaved single calls, {args.clock} ms; load average {load0:.1f} at "
          f"start / {os.getloadavg()[0]:.1f} at end.")
    print()
    print("| operation | fullgraph=True as is | compiled | compile s | eager ms | compiled ms "
          "| compiled / eager | rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "eager" not in row:
            print(f"| {row['op']} | no: {row['brk']} | no: {row['body_brk'] or '—'} "
                  f"| — | — | — | — | — |")
            continue
        status = "yes" if row["brk"] is None else f"no: {row['brk']}"
        print(f"| {row['op']} | {status} | {row['via']} | {row['compile_s']:.1f} | "
              f"{row['eager']:.3f} | {row['compiled']:.3f} | "
              f"{row['compiled'] / row['eager']:.2f} | {row['diff']:.0e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
