"""Named comparison settings from the literature (``ttmanifold compare --preset NAME``).

Each preset builds completion problems, runs every listed method from the stated start
for a time budget, and reports when each reaches the preset's target (iterations and
seconds), plus the final errors. ``steinlechner``: random TT, d = 10, n = 20, rank r,
training and test sets of ``10 d n r^2`` entries each; fixed-rank methods from the oracle
start (the target plus 30 % noise, rounded) and rank-adaptive RCG from rank 1 (no oracle).
``t3f-tutorial``: shape (3, 4, 4, 5, 7, 5), TT-rank 5 (clipped to the feasible ranks),
25 % of the entries observed with additive Gaussian noise of standard deviation 1e-2 on
entries of unit mean square, the rest as the test set; the target is a test MSE of 1.3x
the noise floor ``1e-4``, from a random start (a least-squares fit of ``N`` noisy samples
with ``p = dim M`` parameters has an expected test MSE of about
``sigma^2 (1 + p / (N - p))``, 1.22x here: t3f's 2.5e-5 against 2.1e-5, 1.19x, is out
of reach at this sampling rate). Setup and measured numbers: ``docs/comparison.md#presets``.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch

from . import problems as P
from . import solvers
from .solvers import History

__all__ = ["PRESETS", "build_preset", "run_preset"]

PRESETS = ("steinlechner", "t3f-tutorial")


def _steinlechner(rank: int, seed: int, quick: bool):
    d, n = (6, 10) if quick else (10, 20)
    size = 10 * d * n * rank * rank
    pb = P.Completion((n,) * d, rank, train_size=size, test_size=size, seed=seed)
    x0 = pb.initial_point(seed, kind="perturbed", distance=0.3)
    methods = ["rcg", "rtr", "rlbfgs", "als", "chart_lbfgs", "chart_gd_armijo",
               "rank_adaptive"]
    return dict(problem=pb, x0=x0, start="oracle: target + 30% noise (rank-adaptive: rank 1)",
                methods=methods, key="test_err", tol=1e-8, max_rank=rank)


def _t3f(seed: int, quick: bool):
    shape = (3, 4, 4, 5, 7, 5)
    gen = torch.Generator().manual_seed(seed)
    target = P.random_tt(shape, [1, 3, 5, 5, 5, 5, 1], generator=gen)
    total = math.prod(shape)
    target = target * math.sqrt(total)  # entries of unit mean square
    idx = torch.randperm(total, generator=gen)
    n_obs = int(0.25 * total)
    multi = torch.stack(torch.unravel_index(idx, shape), 1)
    full = target.full().reshape(-1)[idx]
    noisy = full + 1e-2 * torch.randn(total, generator=gen, dtype=full.dtype)
    pb = P.Completion.from_data(multi[:n_obs], noisy[:n_obs], shape, 5,
                                test=(multi[n_obs:], noisy[n_obs:]), seed=seed)
    floor = 1e-4
    x0 = pb.initial_point(seed)
    methods = ["rcg", "rtr", "rlbfgs", "als", "radam", "chart_lbfgs", "chart_adam"]
    return dict(problem=pb, x0=x0, start="random", methods=methods, key="test_mse",
                tol=1.3 * floor, max_rank=5)


def build_preset(name: str, *, rank: Optional[int] = None, seed: int = 0,
                 quick: bool = False) -> Dict[str, object]:
    """The problem, start, methods, target metric and tolerance of preset ``name``.

    Args:
        name: one of :data:`PRESETS`; rank: ``steinlechner``'s r (default 4);
        seed: data and start; quick: smaller sizes (``steinlechner``: d = 6, n = 10).
    Returns:
        a dict with ``problem``, ``x0``, ``start``, ``methods``, ``key``, ``tol``.
    Cost: building the data, O(|Omega| d r^2).
    """
    if name == "steinlechner":
        return _steinlechner(4 if rank is None else int(rank), seed, quick)
    if name == "t3f-tutorial":
        return _t3f(seed, quick)
    raise ValueError(f"preset: unknown preset {name!r}; expected one of {PRESETS}")


def _run_one(spec, method: str, budget: float, iters: int) -> History:
    pb = spec["problem"]
    if method == "rank_adaptive":
        return solvers.rank_adaptive_completion(pb, max_rank=spec["max_rank"], inner_iters=40,
                                                time_budget=budget)
    # chart Adam at t3f's tutorial's lr; Riemannian Adam with the automatic step rule
    lr = 0.01 if method == "chart_adam" else "auto"
    return solvers.run(pb, method, spec["x0"], iters=iters, time_budget=budget, lr=lr,
                       stop_metric=spec["key"], stop_tol=spec["tol"],
                       metrics_every=1, measure_memory=False)


def run_preset(name: str, out: str, *, rank: Optional[int] = None, seed: int = 0,
               quick: bool = False, budget: float = 60.0, iters: int = 2000,
               methods: Optional[List[str]] = None) -> str:
    """Run preset ``name``; write ``summary.md`` to ``out`` and return its text.

    Args:
        name, rank, seed, quick: as :func:`build_preset`; out: output directory;
        budget: seconds per method; iters: iteration cap per method;
        methods: a subset of the preset's methods.
    Returns:
        the summary (a markdown table: per method, iterations and seconds to the target,
        the best and final value of the target metric, final ranks, status).
    Cost: ``budget`` seconds per method at most (plus metric evaluations).
    """
    spec = build_preset(name, rank=rank, seed=seed, quick=quick)
    pb, key, tol = spec["problem"], spec["key"], spec["tol"]
    methods = methods or spec["methods"]
    bad = [m for m in methods if m not in spec["methods"]]
    if bad:
        raise ValueError(f"methods: {bad} not in preset {name!r}'s {spec['methods']}")
    lines = [f"# Preset {name}", "", f"- problem: {pb.describe()}",
             f"- start: {spec['start']}", f"- target: {key} <= {tol:.3g}",
             f"- budget: {budget:g} s per method, at most {iters} iterations",
             f"- torch threads: {torch.get_num_threads()}", "",
             f"| method | iters to target | s to target | best {key} | final {key} | "
             f"iters | s | ranks | status |", "|---|---|---|---|---|---|---|---|---|"]
    os.makedirs(out, exist_ok=True)
    for m in methods:
        t0 = time.perf_counter()
        print(f"{name}: {m} ... ", end="", file=sys.stderr, flush=True)
        h = _run_one(spec, m, budget, iters)
        vals = [r.get(key) for r in h.metrics if r.get(key) is not None]
        reach = h.reach(key, tol)
        ranks = h.info.get("ranks", pb.manifold.ranks)
        lines.append(
            f"| {m} | {reach[0] if reach else '-'} | "
            f"{f'{reach[1]:.2f}' if reach else '-'} | "
            f"{min(vals):.3e} | {vals[-1]:.3e} | {h.n_iters} | {h.total_time:.1f} | "
            f"{tuple(ranks)} | {h.status} |" if vals else f"| {m} | - | - | - | - | "
            f"{h.n_iters} | {h.total_time:.1f} | {tuple(ranks)} | {h.status} |")
        print(f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text
