"""The ``ttmanifold compare`` command: every requested method on every requested problem
from one starting point, with the common step-size rule; writes ``results.csv``,
``summary.md`` and two loss plots to ``--out`` and prints the tables. Outputs and
settings: ``docs/comparison.md``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import problems as P
from . import solvers
from ..manifold import FixedTTRank
from .solvers import METHODS, History

__all__ = ["PROBLEMS", "build_parser", "build_problem", "compare", "main"]

PROBLEMS = ("approximation", "completion", "layer")

# sizes: (full, quick)
_DEFAULTS = {
    "full": dict(d=10, n=20, rank=6, iters=200, grid_size=7, tune_iters=10, hidden=256,
                 layer_rank=4, layer_iters=200, target_rank=12),
    "quick": dict(d=5, n=8, rank=3, iters=100, grid_size=4, tune_iters=5, hidden=64,
                  layer_rank=4, layer_iters=100, target_rank=6),
}


def _csv_list(value: str, allowed: Sequence[str], what: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"empty list of {what}")
    if items == ["all"]:
        return list(allowed)
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(map(repr, bad))}; choose from {', '.join(allowed)} or 'all'"
        )
    return list(dict.fromkeys(items))


def _methods_type(value: str) -> List[str]:
    return _csv_list(value, METHODS, "method")


def _problems_type(value: str) -> List[str]:
    return _csv_list(value, PROBLEMS, "problem")


def _shape_type(value: str):
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {value!r}") from None
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(f"expected positive mode sizes, got {value!r}")
    return shape


def _checked(cast, ok, what: str):
    """An argparse ``type``: ``cast(value)`` that must satisfy ``ok``, else "expected {what}"."""
    def parse(value: str):
        try:
            v = cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return v

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive int")
_nonneg_int = _checked(int, lambda v: v >= 0, "a non-negative int")
_positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")


def build_parser(prog: str = "ttmanifold compare") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Compare chart-based (STTP) and Riemannian optimizers on fixed-TT-rank "
                    "problems from the same starting point; writes results.csv, summary.md "
                    "and loss plots to --out.",
    )
    p.add_argument("--problems", type=_problems_type, default=list(PROBLEMS),
                   help=f"comma-separated subset of {','.join(PROBLEMS)} or 'all' (default all)")
    p.add_argument("--methods", type=_methods_type, default=list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} or 'all' (default "
                        f"all; rcg only runs on approximation and completion)")
    p.add_argument("--shape", type=_shape_type, default=None,
                   help="tensor shape for approximation/completion, e.g. 20,20,20 "
                        "(overrides --d/--n)")
    p.add_argument("--d", type=_positive_int, default=None,
                   help="order d (default 10; quick 5)")
    p.add_argument("--n", type=_positive_int, default=None,
                   help="mode size n (default 20; quick 8)")
    p.add_argument("--rank", type=_positive_int, default=None,
                   help="TT-rank of the manifold (default 6; quick 3); for the layer "
                        "problem see --layer-rank")
    p.add_argument("--target-rank", type=_positive_int, default=None,
                   help="rank of the approximation target (default 2x rank)")
    p.add_argument("--layer-rank", type=_positive_int, default=None,
                   help="STTP rank of the digits layer (default 4)")
    p.add_argument("--hidden", type=_positive_int, default=None,
                   help="hidden width of the digits MLP (default 256; quick 64)")
    p.add_argument("--iters", type=_nonneg_int, default=None,
                   help="iterations per run (default 200; quick 100)")
    p.add_argument("--time-budget", type=_positive_float, default=None,
                   help="seconds of optimization per run (default: no limit)")
    p.add_argument("--tol", type=_positive_float, default=None,
                   help="tolerance on each problem's target metric (default: "
                        "approximation gap 1e-4, completion test_err 1e-6, layer test_err "
                        "0.05)")
    p.add_argument("--grid-size", type=_positive_int, default=None,
                   help="number of step sizes in the log grid 1e-3..1 (default 7; quick 4)")
    p.add_argument("--tune-iters", type=_positive_int, default=None,
                   help="iterations per trial step size (default 10; quick 5)")
    p.add_argument("--oversampling", type=_positive_float, default=10.0,
                   help="completion: |Omega| = oversampling x dim M (default 10)")
    p.add_argument("--core-dist", choices=("gaussian", "uniform"), default="gaussian",
                   help="completion: distribution of the target's cores (default gaussian)")
    p.add_argument("--init", choices=("random", "spectral", "homotopy", "perturbed", "auto"),
                   default="auto",
                   help="completion starting point (default auto: spectral when the "
                        "tensor has at most 2e7 entries, else random; 'perturbed' is the "
                        "target plus 30%% noise, an oracle start for local convergence)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="device (default auto: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="dtype of the tensor problems (default float64; the layer "
                        "problem uses float32 unless float64 is given explicitly)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch.set_num_threads (default: 1 on the CPU with --quick, where "
                        "the kernels are small and extra OpenMP threads only contend; "
                        "torch's default otherwise)")
    p.add_argument("--out", default="compare_out", help="output directory (default ./compare_out)")
    p.add_argument("--quick", action="store_true",
                   help="a ~one-minute CPU version: small sizes, few iterations")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def _resolve_device(name: str, parser: argparse.ArgumentParser) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine (torch "
                     f"{torch.__version__}, cuda build: {torch.version.cuda}); use "
                     "--device cpu or auto")
    return torch.device(name)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _settings(args) -> Dict[str, object]:
    base = dict(_DEFAULTS["quick" if args.quick else "full"])
    for key in ("d", "n", "rank", "iters", "grid_size", "tune_iters", "hidden",
                "target_rank"):
        v = getattr(args, key)
        if v is not None:
            base[key] = v
    if args.layer_rank is not None:
        base["layer_rank"] = args.layer_rank
    if args.iters is not None:
        base["layer_iters"] = args.iters
    base["shape"] = tuple(args.shape) if args.shape else (base["n"],) * base["d"]
    if args.target_rank is None:
        base["target_rank"] = 2 * base["rank"]
    return base


def _validate(args, settings, parser) -> None:
    shape = settings["shape"]
    tensor_problems = [p for p in args.problems if p != "layer"]
    if tensor_problems:
        if len(shape) < 2:
            parser.error(f"--shape/--d: the tensor problems need order d >= 2, got shape {shape}")
        try:
            FixedTTRank(shape, settings["rank"])
        except ValueError as e:
            parser.error(f"--rank {settings['rank']} is infeasible for shape {shape}: {e}")
    if "layer" in args.problems:
        if settings["layer_rank"] > min(settings["hidden"], 64):
            parser.error(f"--layer-rank {settings['layer_rank']} exceeds min(hidden, 64) = "
                         f"{min(settings['hidden'], 64)}")
    if "completion" in args.problems:
        M = FixedTTRank(shape, settings["rank"])
        total = 1
        for n in shape:
            total *= n
        need = math.ceil(args.oversampling * M.dim)
        if need + min(need, 10000) > total:
            parser.error(f"--oversampling {args.oversampling}: |Omega| = {need} (+ test set) "
                         f"exceeds the {total} entries of shape {shape}")
    if set(args.methods) == {"rcg"} and args.problems == ["layer"]:
        parser.error("--methods rcg: Riemannian CG needs a quadratic problem "
                     "(approximation or completion), not 'layer'")


def build_problem(name: str, settings, *, device, dtype, seed: int, oversampling: float = 10.0,
                  core_dist: str = "gaussian", layer_dtype=None):
    """The problem ``name`` at the given settings (see :func:`compare`)."""
    shape, rank = settings["shape"], settings["rank"]
    if name == "approximation":
        return P.Approximation.random(shape, settings["target_rank"], rank, seed=seed,
                                      dtype=dtype, device=device)
    if name == "completion":
        return P.Completion(shape, rank, core_dist=core_dist, oversampling=oversampling,
                            seed=seed, dtype=dtype, device=device)
    if name == "layer":
        return P.LayerTraining(hidden=settings["hidden"], rank=settings["layer_rank"],
                               seed=seed, dtype=layer_dtype or torch.float32, device=device)
    raise ValueError(f"unknown problem {name!r}")


def _initial_point(problem, name, init, seed):
    if name != "completion":
        return problem.initial_point(seed), "random"
    if init == "auto":
        total = 1
        for n in problem.manifold.shape:
            total *= n
        init = "spectral" if total <= 2 * 10 ** 7 else "random"
    if init == "homotopy":
        return solvers.homotopy_point(problem, problem.initial_point(seed)), init
    return problem.initial_point(seed, kind=init), init


def _fmt(v, spec=".3e") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return format(v, spec)
    return str(v)


def _table(problem, runs: List[History], tol: float) -> List[str]:
    key = problem.target_metric
    mkeys = []
    for h in runs:
        for k in h.final_metrics():
            if k not in mkeys and k != "rel_err_svd":
                mkeys.append(k)
    head = (["method", "lr", "final loss"] + mkeys +
            [f"iters to {key}<={tol:g}", "s to tol", "iters", "ms/iter", "peak MB", "status"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for h in runs:
        m = h.final_metrics()
        reach = h.reach(key, tol)
        row = [h.method, _fmt(h.lr, ".3g"), _fmt(h.final_loss)]
        row += [_fmt(m.get(k)) for k in mkeys]
        row += [str(reach[0]) if reach else "-", _fmt(reach[1], ".3f") if reach else "-",
                str(h.n_iters), _fmt(1e3 * h.time_per_iter, ".2f"),
                _fmt(float(h.info.get("peak_mem_mb", float("nan"))), ".1f"), h.status]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _plot(results, path_iter: str, path_time: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(results)
    for xkey, path in (("iter", path_iter), ("time", path_time)):
        fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.0), squeeze=False)
        for ax, name in zip(axes[0], names):
            problem, runs = results[name]
            for h in runs:
                xs = h.iters if xkey == "iter" else h.time
                ys = [max(v, 1e-300) if math.isfinite(v) else float("nan") for v in h.loss]
                style = "--" if h.method.startswith("chart") else "-"
                ax.plot(xs, ys, style, label=h.method, lw=1.5)
            ax.set_yscale("log")
            ax.set_xlabel("iteration" if xkey == "iter" else "seconds")
            ax.set_ylabel("loss")
            ax.set_title(problem.name, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("chart (dashed) vs Riemannian (solid): loss vs "
                     + ("iteration" if xkey == "iter" else "time"), fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def compare(args, parser: Optional[argparse.ArgumentParser] = None) -> Dict[str, object]:
    """Run the comparison described by parsed ``args`` (see :func:`build_parser`); returns
    ``{problem_name: (problem, [History, ...])}`` and writes the outputs."""
    parser = parser or build_parser()
    device = _resolve_device(args.device, parser)
    threads = args.threads
    if threads is None and args.quick and device.type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    layer_dtype = torch.float32 if args.dtype is None else dtype
    settings = _settings(args)
    _validate(args, settings, parser)
    os.makedirs(args.out, exist_ok=True)
    compiled = "n/a (CUDA)"
    if device.type == "cpu":
        # the compiled CPU sweeps build in the background on first use (once per machine);
        # wait for them so that no timed iteration shares the CPU with the compiler
        from .. import _native

        compiled = "in use" if _native.get_dense(wait=True) is not None else "not in use"
    started = time.perf_counter()
    header = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": _device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": f"{str(dtype).replace('torch.', '')} (layer: "
                 f"{str(layer_dtype).replace('torch.', '')})",
        "seed": args.seed,
        "quick": args.quick,
        "compiled_cpu_sweeps": compiled,
        "command": "ttmanifold compare " + " ".join(getattr(args, "_argv", [])),
    }
    results: Dict[str, object] = {}
    descriptions = {}
    for name in args.problems:
        problem = build_problem(name, settings, device=device, dtype=dtype, seed=args.seed,
                                oversampling=args.oversampling, core_dist=args.core_dist,
                                layer_dtype=layer_dtype)
        x0, init = _initial_point(problem, name, args.init, args.seed)
        tol = args.tol if args.tol is not None else problem.default_tol
        iters = settings["layer_iters"] if name == "layer" else settings["iters"]
        desc = problem.describe() + (f", start={init}" if name == "completion" else "")
        descriptions[name] = (desc, tol)
        print(desc, file=sys.stderr)
        runs = []
        for method in args.methods:
            if method == "rcg" and not problem.quadratic:
                continue
            h = solvers.run(problem, method, x0, iters=iters, time_budget=args.time_budget,
                            lr="auto", grid_size=settings["grid_size"],
                            tune_iters=settings["tune_iters"], seed=args.seed,
                            progress=not args.no_progress)
            runs.append(h)
        results[name] = (problem, runs)
    elapsed = time.perf_counter() - started
    header["total_seconds"] = f"{elapsed:.1f}"
    # outputs ----------------------------------------------------------------------------
    lines = ["# Chart vs Riemannian comparison", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "Step size: for every method but rcg, the lr of the log grid 1e-3..1 "
              f"({settings['grid_size']} values) with the smallest loss after "
              f"{settings['tune_iters']} iterations from the common start; rcg uses the exact "
              "line search. Times exclude tuning and metric evaluation; peak MB is the "
              "CUDA max_memory_allocated increase (cuda) or the sampled RSS increase (cpu).", ""]
    for name, (problem, runs) in results.items():
        desc, tol = descriptions[name]
        lines += [f"## {desc}", ""]
        lines += _table(problem, runs, tol)
        lines.append("")
    summary = "\n".join(lines)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary + "\n")
    rows = [r for _, runs in results.values() for h in runs for r in h.rows()]
    cols: List[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        for k, v in header.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    if results:
        _plot(results, os.path.join(args.out, "loss_vs_iter.png"),
              os.path.join(args.out, "loss_vs_time.png"))
    print(summary)
    print(f"\nwrote {args.out}/results.csv, summary.md, loss_vs_iter.png, loss_vs_time.png "
          f"({elapsed:.1f} s)")
    return results


def main(argv: Optional[Sequence[str]] = None, prog: str = "ttmanifold compare"):
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._argv = argv
    return compare(args, parser)
