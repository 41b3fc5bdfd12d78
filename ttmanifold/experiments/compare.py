"""The ``ttmanifold compare`` command: every requested method on every requested problem
from one starting point, with the common step-size rule.

Writes to ``--out`` (checked before the first run): ``results.csv`` (one row per
iteration; ``# key: value`` header lines, among them ``# status: complete`` or
``incomplete``; rewritten as each run finishes, so an interrupted run keeps the finished
ones), ``summary.md`` (the tables, printed first) and ``loss_vs_iter.png`` /
``loss_vs_time.png``. Outputs and settings: ``docs/comparison.md``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import math
import os
import platform
import signal
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import problems as P
from . import solvers
from .._checks import ensure_writable_dir
from ..manifold import FixedTTRank
from .presets import PRESETS, run_preset
from .solvers import ALL_METHODS, COMPLETION_METHODS, LINE_SEARCH_METHODS, METHODS, History

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
    return _csv_list(value, ALL_METHODS, "method")


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
                   help=f"comma-separated subset of {','.join(ALL_METHODS)} or 'all' "
                        f"(default {','.join(METHODS)}; rcg and "
                        f"{','.join(LINE_SEARCH_METHODS)} only run on approximation and "
                        f"completion, als only on completion; none of these needs a step "
                        f"size: each has its own line search, trust region or exact solve)")
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
                   help="completion: distribution of the target's cores (default gaussian; "
                        "--preset steinlechner defaults to uniform, TTeMPS's random TT, and "
                        "takes gaussian when given)")
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
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="a named setting from the literature (docs/comparison.md#presets): "
                        "its own problem, start and methods (--methods picks a subset); "
                        "--rank (steinlechner's r, default 4), --seed, --quick, --iters "
                        "(default 2000), --time-budget (seconds per method, default 60; "
                        "psenka-boumal: per method and seed; image: per sampling rate) and "
                        "--threads (default 1) apply; writes summary.md (image: also "
                        "image_completion.png) to --out")
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
        try:  # a tuple: exact (an int would be clipped to the feasible ranks)
            FixedTTRank(shape, (settings["rank"],) * (len(shape) - 1))
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
    tensor_only = {"rcg", *LINE_SEARCH_METHODS, *COMPLETION_METHODS}
    if set(args.methods) <= tensor_only and args.problems == ["layer"]:
        parser.error(f"--methods {','.join(args.methods)}: these methods need a tensor "
                     f"problem (approximation or completion; Riemannian CG a quadratic "
                     f"one), not 'layer'")


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


# metrics kept in results.csv but not in the tables (constant, or redundant there)
_TABLE_SKIPS = ("rel_err_svd", "train_mse", "train_rmse")


def _table(problem, runs: List[History], tol: float) -> List[str]:
    key = problem.target_metric
    mkeys = []
    for h in runs:
        for k in h.final_metrics():
            if k not in mkeys and k not in _TABLE_SKIPS:
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


OUTPUT_FILES = ("results.csv", "summary.md", "loss_vs_iter.png", "loss_vs_time.png")


def _check_out(out: str, parser: argparse.ArgumentParser) -> None:
    """Fail early (before the first run) when ``out`` cannot hold the outputs: an existing
    file, a path under a file, a directory we cannot create or write (tested by creating
    and removing a file in it, so it also holds for root on read-only mounts)."""
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {out}: is an existing file, not a directory; give a directory "
                     f"path (it is created if missing)")
    try:
        ensure_writable_dir(out)
    except OSError as exc:
        parser.error(f"--out {out}: cannot write there ({exc.strerror or exc}); give a "
                     f"writable directory")
    for name in OUTPUT_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            parser.error(f"--out {out}: {name} is a directory; remove it or give another --out")


def _write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so an interrupted
    write never leaves a truncated file."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


class _Output:
    """The outputs under ``--out``, written as the runs finish: ``results.csv`` is rewritten
    (atomically) after every run with all finished runs and a ``# status:`` header line
    (``incomplete`` until the last run, ``complete`` after it)."""

    def __init__(self, out: str, header: Dict[str, object], total_runs: int):
        self.out = out
        self.header = header
        self.total_runs = total_runs
        self.runs: List[History] = []
        self.write_error: Optional[OSError] = None

    def status(self, interrupted: bool = False) -> str:
        done = len(self.runs)
        if interrupted:
            return (f"incomplete: interrupted after {done} of {self.total_runs} runs (the "
                    f"finished runs are complete; the interrupted one is not recorded)")
        if done < self.total_runs:
            return f"incomplete: {done} of {self.total_runs} runs finished so far"
        return f"complete: {done} runs"

    def csv_text(self, status: str) -> str:
        rows = [r for h in self.runs for r in h.rows()]
        cols: List[str] = []
        for r in rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
        buf = io.StringIO()
        for k, v in list(self.header.items()) + [("status", status)]:
            buf.write(f"# {k}: {v}\n")
        w = csv.DictWriter(buf, fieldnames=cols or ["problem", "method", "lr", "iter", "time",
                                                     "loss"], lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r)
        return buf.getvalue()

    def add(self, hist: History) -> None:
        self.runs.append(hist)
        self.write_csv(self.status())

    def write_csv(self, status: str) -> None:
        try:
            _write_atomic(os.path.join(self.out, "results.csv"), self.csv_text(status))
        except OSError as exc:
            if self.write_error is None:  # say it once; the runs go on, the table is printed
                print(f"ttmanifold compare: cannot write {self.out}/results.csv ({exc}); "
                      f"continuing, the table will be printed", file=sys.stderr)
            self.write_error = exc


def _summary(header, settings, results, descriptions, status: str) -> str:
    lines = ["# Chart vs Riemannian comparison", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines.append(f"- status: {status}")
    lines += ["", "Step size: for every method but rcg, rtr, rlbfgs, chart_gd_armijo, "
              "chart_lbfgs and als, the lr of the log grid 1e-3..1 "
              f"({settings['grid_size']} values) with the smallest loss after "
              f"{settings['tune_iters']} iterations from the common start; rcg uses the exact "
              "line search, rtr its trust region, rlbfgs and chart_gd_armijo Armijo "
              "backtracking, chart_lbfgs a strong Wolfe search, als exact core solves. Times exclude tuning and metric evaluation; peak MB is the "
              "CUDA max_memory_allocated increase (cuda) or the sampled RSS increase (cpu).", ""]
    for name, (problem, runs) in results.items():
        if not runs:
            continue
        desc, tol = descriptions[name]
        lines += [f"## {desc}", ""]
        lines += _table(problem, runs, tol)
        lines.append("")
    return "\n".join(lines)


def _compiled_kernels() -> List[str]:
    """The compiled kernel modules this process has loaded (cheap: their names in
    ``sys.modules``; no build is started or waited for)."""
    return sorted(dict.fromkeys(name.rsplit("_", 1)[0] for name in list(sys.modules)
                                if name.startswith("ttmanifold_")))


def _compiled_field(first_seen: Dict[str, int]) -> str:
    if not first_seen:
        return "none loaded (torch kernels)"
    return ", ".join(f"{name} (loaded by the end of run {k})"
                     for name, k in first_seen.items())


def _planned_runs(args, problems: Sequence[str]) -> int:
    return sum(1 for name in problems for m in args.methods if not _skipped(m, name))


def _skipped(method: str, name: str) -> bool:
    """rcg and the line-search methods need a tensor problem (not the layer), als a
    completion problem."""
    if method in COMPLETION_METHODS:
        return name != "completion"
    return name == "layer" and (method == "rcg" or method in LINE_SEARCH_METHODS)


def _warm_up_optimizers() -> None:
    """The first ``torch.optim`` optimizer of a process imports torch's compiler stack
    (``torch._dynamo``, 2-5 s): do it here, on one announced line, rather than silently
    inside the first run."""
    if "torch._dynamo" in sys.modules:
        return
    print("preparing torch.optim (its first use loads torch's compiler stack, usually 2-5 s, "
          "once) ... ", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    print(f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def compare(args, parser: Optional[argparse.ArgumentParser] = None) -> Dict[str, object]:
    """Run the comparison described by parsed ``args`` (see :func:`build_parser`); returns
    ``{problem_name: (problem, [History, ...])}`` and writes the outputs.

    ``--out`` is checked before the first run; ``results.csv`` is rewritten as each run
    finishes (header ``# status: incomplete ...`` until the last one); the tables are
    printed before ``summary.md`` and the plots are written. Ctrl-C keeps the finished
    runs (``results.csv`` and ``summary.md`` marked incomplete) and exits with status 130
    after one line on stderr."""
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
    _check_out(args.out, parser)
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
        "compiled": "n/a (CUDA)" if device.type == "cuda" else _compiled_field({}),
        "command": "ttmanifold compare " + " ".join(getattr(args, "_argv", [])),
    }
    total_runs = _planned_runs(args, args.problems)
    output = _Output(args.out, header, total_runs)
    first_seen: Dict[str, int] = {}  # compiled kernel module -> first run that saw it
    print(f"ttmanifold compare: {total_runs} runs ({len(args.methods)} methods on "
          f"{', '.join(args.problems)}; each method's step size from a "
          f"{settings['grid_size']}-point search)"
          f"{'; usually 10-20 s on 2 CPU cores' if args.quick else ''}; results in "
          f"{args.out}/", file=sys.stderr, flush=True)
    results: Dict[str, object] = {}
    descriptions = {}
    try:
        _warm_up_optimizers()
        for name in args.problems:
            print(f"{name}: building the problem ... ", end="", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            problem = build_problem(name, settings, device=device, dtype=dtype,
                                    seed=args.seed, oversampling=args.oversampling,
                                    core_dist=args.core_dist, layer_dtype=layer_dtype)
            x0, init = _initial_point(problem, name, args.init, args.seed)
            tol = args.tol if args.tol is not None else problem.default_tol
            iters = settings["layer_iters"] if name == "layer" else settings["iters"]
            desc = problem.describe() + (f", start={init}" if name == "completion" else "")
            descriptions[name] = (desc, tol)
            print(f"{time.perf_counter() - t0:.1f} s: {desc.split(': ', 1)[-1]}",
                  file=sys.stderr, flush=True)
            runs: List[History] = []
            results[name] = (problem, runs)
            for method in args.methods:
                if (method == "rcg" and not problem.quadratic) or _skipped(method, name):
                    continue
                h = solvers.run(problem, method, x0, iters=iters,
                                time_budget=args.time_budget, lr="auto",
                                grid_size=settings["grid_size"],
                                tune_iters=settings["tune_iters"], seed=args.seed,
                                progress=not args.no_progress)
                runs.append(h)
                if device.type == "cpu":
                    for kname in _compiled_kernels():
                        first_seen.setdefault(kname, len(output.runs) + 1)
                    header["compiled"] = _compiled_field(first_seen)
                output.add(h)
    except KeyboardInterrupt:
        try:  # a second Ctrl-C must not interrupt the writes below
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
        header["total_seconds"] = f"{time.perf_counter() - started:.1f} (interrupted)"
        status = output.status(interrupted=True)
        output.write_csv(status)
        try:
            _write_atomic(os.path.join(args.out, "summary.md"),
                          _summary(header, settings, results, descriptions, status) + "\n")
        except OSError:
            pass
        print(f"\nttmanifold compare: interrupted; {len(output.runs)} of {total_runs} runs "
              f"finished, kept in {args.out}/results.csv and summary.md (marked incomplete)",
              file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    elapsed = time.perf_counter() - started
    header["total_seconds"] = f"{elapsed:.1f}"
    status = output.status()
    summary = _summary(header, settings, results, descriptions, status)
    print(summary, flush=True)  # the table first: a failing write below cannot lose it
    output.write_csv(status)
    try:
        _write_atomic(os.path.join(args.out, "summary.md"), summary + "\n")
        if any(runs for _, runs in results.values()):
            _plot({k: v for k, v in results.items() if v[1]},
                  os.path.join(args.out, "loss_vs_iter.png"),
                  os.path.join(args.out, "loss_vs_time.png"))
    except OSError as exc:
        raise SystemExit(f"ttmanifold compare: the table is above, but writing to --out "
                         f"{args.out} failed: {exc}") from None
    except KeyboardInterrupt:  # every run finished; only the plots are missing
        print(f"\nttmanifold compare: interrupted while plotting; all {len(output.runs)} "
              f"runs are in {args.out}/results.csv and summary.md, the plots are not "
              f"written", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    if output.write_error is not None:
        raise SystemExit(f"ttmanifold compare: the table is above, but writing "
                         f"{args.out}/results.csv failed: {output.write_error}")
    print(f"\nwrote {args.out}/results.csv, summary.md, loss_vs_iter.png, loss_vs_time.png "
          f"({elapsed:.1f} s)")
    return results


def main(argv: Optional[Sequence[str]] = None, prog: str = "ttmanifold compare"):
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._argv = argv
    if args.preset:
        explicit = any(a == "--methods" or a.startswith("--methods=") for a in argv)
        # --core-dist only when given: it applies to the steinlechner preset alone
        cd = any(a == "--core-dist" or a.startswith("--core-dist=") for a in argv)
        # one thread unless --threads: the presets time methods against each other
        torch.set_num_threads(args.threads or 1)
        try:
            text = run_preset(args.preset, args.out, rank=args.rank, seed=args.seed,
                              quick=args.quick, budget=args.time_budget or 60.0,
                              iters=args.iters or 2000,
                              methods=args.methods if explicit else None,
                              core_dist=args.core_dist if cd else None)
        except ValueError as exc:
            parser.error(str(exc))
        print(text, flush=True)
        return text
    return compare(args, parser)
