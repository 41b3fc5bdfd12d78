"""Command line: ``python -m ttmanifold`` (a short tour),
``python -m ttmanifold compare [...]`` (chart vs Riemannian comparison, see
:mod:`ttmanifold.experiments.compare`), ``build-kernels`` and ``info`` (the compiled CPU
kernels, :mod:`ttmanifold.kernels`). The console script ``ttmanifold`` calls :func:`main`."""
from __future__ import annotations

import math
import sys
from typing import Optional, Sequence

USAGE = """usage: ttmanifold [tour | compare [options] | complete DATA --rank R [options] | build-kernels [dense|sampled ...] | info | --help]

  tour           (default) build a random TT, round it, and take a Riemannian step
  compare        chart (STTP) vs Riemannian optimizers; 'ttmanifold compare --help'
  complete       complete your own tensor from observed entries; 'ttmanifold complete --help'
  build-kernels  compile the optional CPU kernels now (default: both sets), with progress;
                 '--timeout S': wait at most S seconds for another process's build (600)
  info           versions, devices, and per kernel set: built / in use / failed (why)
"""

BUILD_USAGE = """usage: ttmanifold build-kernels [dense|sampled ...] [--timeout S]

Compile the optional CPU kernels now (default: both sets) in the foreground, with a line
per step; a set already built is loaded, not rebuilt. Exit status 0 when every set is
built, 1 otherwise, 130 when interrupted.

  --timeout S   wait at most S seconds for a build another process runs (default 600)
"""

INFO_USAGE = """usage: ttmanifold info

Print the versions, the devices, and per kernel set: built / in use / failed (the whole
reason). Loads what is built; starts no build."""


def build_kernels(args: Sequence[str]) -> int:
    """``ttmanifold build-kernels [dense|sampled ...] [--timeout S]``: exit status 0 when
    every set built (or was built), 1 otherwise."""
    from . import kernels

    args = list(args)
    if "-h" in args or "--help" in args:  # (was refused as an unknown kernel set)
        print(BUILD_USAGE)
        return 0
    timeout = 600.0
    # '--timeout=S' as well as '--timeout S' (the form compare and complete accept too)
    at = [i for i, a in enumerate(args) if a == "--timeout" or a.startswith("--timeout=")]
    if at:
        i = at[0]
        if args[i] == "--timeout":
            value = args[i + 1] if i + 1 < len(args) else ""
            del args[i:i + 2]
        else:
            value = args[i].split("=", 1)[1]
            del args[i]
        try:
            timeout = float(value)
        except ValueError:
            raise SystemExit("ttmanifold build-kernels: --timeout takes a number of seconds")
        if not (math.isfinite(timeout) and timeout >= 0):  # (NaN never timed out)
            raise SystemExit(f"ttmanifold build-kernels: --timeout: expected a non-negative "
                             f"number of seconds, got {value}")
    names = args or ["dense", "sampled"]
    unknown = [n for n in names if n not in ("dense", "sampled")]
    if unknown:
        raise SystemExit(f"ttmanifold build-kernels: unknown kernel set(s) {unknown} "
                         "(expected 'dense' and/or 'sampled')")
    try:
        res = kernels.build(names, verbose=True, timeout=timeout)
    except KeyboardInterrupt:  # (was a traceback from inside the wait)
        print("\nttmanifold build-kernels: interrupted; the build in progress was stopped "
              "(sets built before are kept)", file=sys.stderr, flush=True)
        return 130
    print()
    for name, r in res.items():
        line = f"{name:8s} {r['result']} in {r['seconds']:.1f} s  ({r['path']})"
        if not r["ok"]:
            line += f"\n         cause:\n{r['reason']}"
        print(line)
    return 0 if all(r["ok"] for r in res.values()) else 1


def info() -> int:
    """``ttmanifold info``: versions, devices, and the kernel sets' status."""
    import os
    import platform
    import warnings

    import torch

    from . import __version__, kernels

    def version(mod: str) -> str:
        try:
            return __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            return f"not available ({type(exc).__name__})"

    print(f"ttmanifold {__version__}")
    print(f"python     {platform.python_version()} ({platform.python_implementation()}, "
          f"{platform.system()} {platform.machine()})")
    print(f"torch      {torch.__version__} ({os.path.dirname(torch.__file__)})")
    print(f"geoopt     {version('geoopt')}")
    print(f"numpy      {version('numpy')}")
    cuda = (f"available, {torch.cuda.device_count()} device(s)" if torch.cuda.is_available()
            else "not available")
    print(f"devices    cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          f"cuda: {cuda}")
    flags = []
    if not kernels.enabled():
        flags.append("disabled (TTMANIFOLD_NATIVE=0)")
    if not kernels._config["auto_build"]:
        flags.append("no automatic build (TTMANIFOLD_BUILD=0)")
    print(f"compiled CPU kernels{': ' + ', '.join(flags) if flags else ''}")
    auto = kernels._config["auto_build"]
    kernels.set_auto_build(False)  # load what is built (does it load here?), start no build
    try:
        with warnings.catch_warnings():  # a failure is printed below (it was printed twice)
            warnings.simplefilter("ignore", RuntimeWarning)
            for name in ("dense", "sampled"):
                kernels.module(name)
    finally:
        kernels.set_auto_build(auto)
    for name, row in kernels.status().items():
        state = ("built" if row["built"] else "not built") + (", in use" if row["in_use"] else "")
        if row["building"]:
            state += ", being built by another process"
        print(f"  {name:8s} {state}  ({row['path']})")
        if row["failed"]:
            print(f"           failed:\n{row['failed']}")
    return 0


def tour() -> None:
    """Build a random TT, round it, print what happened; then a 3-line manifold demo."""
    import torch

    from . import FixedTTRank, TT, inner, round as tt_round

    g = torch.Generator().manual_seed(0)
    shape = (6, 7, 8, 7, 6)
    x = TT.random(shape, 3, dtype=torch.float64, generator=g)
    x = x + 1e-2 * TT.random(shape, 4, dtype=torch.float64, generator=g)  # rank 3 + noise
    print(f"x = rank-3 TT + 1e-2 * rank-4 TT: shape {x.shape}, ranks {x.ranks}, "
          f"{x.num_params} parameters, ||x|| = {float(x.norm()):.4f}")
    eps = 0.05
    y = tt_round(x, rel_eps=eps)
    err = float((x - y).norm() / x.norm())
    print(f"round(x, rel_eps={eps}): ranks {x.ranks} -> {y.ranks}, {y.num_params} parameters;"
          f" relative error {err:.2e} <= bound {eps}: {err <= eps}")
    z = tt_round(x, max_rank=2)
    print(f"round(x, max_rank=2): ranks {z.ranks}, relative error "
          f"{float((x - z).norm() / x.norm()):.2e} (quasi-optimal, within sqrt(d-1) of the best)")
    print()
    print("manifold demo: one Riemannian gradient step on f(X) = 0.5 ||X - x||^2 over rank-3 TTs")
    M = FixedTTRank(shape, 3)
    xx = inner(x, x)
    f = lambda t: 0.5 * (inner(t, t) - 2 * inner(t, x) + xx)  # noqa: E731  (TT ops only)
    p = M.random(dtype=torch.float64, generator=g)
    print(f"  M = {M!r}; p = M.random(); f(p) = {float(f(M.to_tt(p))):.4f}")
    grad = M.riemannian_grad(p, f)
    q = M.retr(p, -1.0 * grad)
    print(f"  grad = M.riemannian_grad(p, f) (||grad|| = {float(M.norm(p, grad)):.4f}); "
          f"q = M.retr(p, -grad); f(q) = {float(f(M.to_tt(q))):.4f}")
    print()
    print("next: python -m ttmanifold compare --quick   (chart vs Riemannian optimizers)")


def main(argv: Optional[Sequence[str]] = None):
    """Entry point of ``python -m ttmanifold`` and of the ``ttmanifold`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "tour":
        if len(argv) > 1:
            print(USAGE, file=sys.stderr)
            raise SystemExit(f"ttmanifold tour: takes no arguments, got {argv[1:]}")
        tour()
        return 0
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] == "build-kernels":
        return build_kernels(argv[1:])
    if argv[0] == "info":
        if argv[1:] in (["-h"], ["--help"]):
            print(INFO_USAGE)
            return 0
        if len(argv) > 1:
            raise SystemExit(f"ttmanifold info: takes no arguments, got {argv[1:]}")
        return info()
    if argv[0] == "compare":
        from .experiments.compare import main as compare_main

        compare_main(argv[1:], prog="ttmanifold compare")
        return 0
    if argv[0] == "complete":
        from .experiments.complete import main as complete_main

        return complete_main(argv[1:], prog="ttmanifold complete")
    print(USAGE, file=sys.stderr)
    raise SystemExit(f"ttmanifold: unknown command {argv[0]!r} (expected 'tour', 'compare', 'complete', 'build-kernels' or 'info')")


if __name__ == "__main__":
    sys.exit(main())
