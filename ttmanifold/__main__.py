"""Command line: ``python -m ttmanifold`` (a short tour) and
``python -m ttmanifold compare [...]`` (chart vs Riemannian comparison, see
:mod:`ttmanifold.experiments.compare`). The console script ``ttmanifold`` calls :func:`main`."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

USAGE = """usage: ttmanifold [tour | compare [options] | --help]

  tour      (default) build a random TT, round it, and take a Riemannian step
  compare   chart (STTP) vs Riemannian optimizers; 'ttmanifold compare --help'
"""


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
    if argv[0] == "compare":
        from .experiments.compare import main as compare_main

        compare_main(argv[1:], prog="ttmanifold compare")
        return 0
    print(USAGE, file=sys.stderr)
    raise SystemExit(f"ttmanifold: unknown command {argv[0]!r} (expected 'tour' or 'compare')")


if __name__ == "__main__":
    main()
