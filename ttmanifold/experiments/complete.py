"""``ttmanifold complete``: complete a user's own tensor from observed entries.

Input (by file name):

- ``.npz`` with arrays ``indices`` (``(N, d)`` integers) and ``values`` (``(N,)``), or with one
  floating array: a dense tensor with NaN for the missing entries;
- ``.npy``: a dense floating tensor with NaN for the missing entries;
- anything else: text (CSV or whitespace separated), one observed entry per line,
  ``i_1, ..., i_d, value`` (0-based indices), an optional header line, ``#`` comments.

Output (in ``--out``, default ``complete_out``): ``completed.npz`` (the TT, read it back with
:func:`ttmanifold.load`), ``report.csv`` (loss, train/validation error and RMSE per
iteration; a header with the shape, ranks, sample counts and the run's status),
``predictions.csv`` (the completed tensor at the multi-indices of ``--query``), and
``checkpoint.pt`` with ``--checkpoint-every``. Nothing is overwritten without ``--force``.

The rank is fixed (``--rank``) or chosen (``--rank-adaptive``, with ``--rank`` as the cap:
:func:`~ttmanifold.experiments.distributed.distributed_rank_adaptive`, the search of
:func:`~ttmanifold.experiments.solvers.rank_adaptive_completion` from rank 1 with a control
set of 10% of the training entries chosen by a hash of the multi-index, in one process or
data-parallel under ``torchrun`` with the same result; ``--checkpoint-every K`` then keeps
every K-th accepted stage and ``--resume`` continues from it). The
fixed-rank solver (``--method``) is Riemannian CG with exact line search (``rcg``, default:
:func:`~ttmanifold.experiments.distributed.distributed_cg`), Riemannian L-BFGS (``rlbfgs``:
:func:`~ttmanifold.experiments.distributed.distributed_lbfgs`) or the Riemannian trust
region with the exact Hessian (``rtr``:
:func:`~ttmanifold.experiments.distributed.distributed_trust_region`) or alternating least
squares (``als``: :func:`~ttmanifold.experiments.distributed.distributed_als`); each runs in one
process, or data-parallel when started by ``torchrun`` (each process keeps the entries that
hash to it, so the iterates are the single-process ones to rounding). Run ``ttmanifold
complete --help``.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._checks import ensure_writable_dir

OUTPUTS = ("completed.npz", "report.csv", "predictions.csv", "checkpoint.pt")
#: the fixed-rank solvers of ``--method`` (all data-parallel under torchrun)
METHODS = {"rcg": "Riemannian CG", "rlbfgs": "Riemannian L-BFGS",
           "rtr": "Riemannian trust region", "als": "alternating least squares"}
DENSE_LIMIT = 2 * 10 ** 7


class DataError(ValueError):
    """A malformed input file; the message names the file and the offending entry."""


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------

def _fmt_index(row) -> str:
    return "(" + ", ".join(str(int(v)) for v in row) + ")"


def _read_text(path: str) -> np.ndarray:
    """Rows of numbers from a CSV / whitespace-separated file (header and comments
    skipped); raises DataError naming the line of a malformed row."""
    rows: List[List[float]] = []
    ncol = None
    with open(path, "r", newline="") as f:
        first_data = True
        for lineno, line in enumerate(f, 1):
            s = line.split("#", 1)[0].strip()
            if not s:
                continue
            parts = [p.strip() for p in (s.split(",") if "," in s else s.split())]
            try:
                nums = [float(p) for p in parts]
            except ValueError:
                if first_data and not rows:
                    first_data = False  # a header line
                    continue
                raise DataError(f"{path}: line {lineno}: not a row of numbers: {s[:80]!r}")
            first_data = False
            if ncol is None:
                ncol = len(nums)
            elif len(nums) != ncol:
                raise DataError(f"{path}: line {lineno}: {len(nums)} columns, the first row "
                                f"has {ncol}")
            rows.append(nums)
    if not rows:
        raise DataError(f"{path}: no entries (the file is empty or holds only a header)")
    return np.asarray(rows, dtype=np.float64)


def _indices_from_float(a: np.ndarray, path: str, what: str) -> np.ndarray:
    bad = ~np.isfinite(a) | (a != np.round(a))
    if bad.any():
        i, k = map(int, np.argwhere(bad)[0])
        raise DataError(f"{path}: {what} row {i}, column {k}: index {float(a[i, k])!r} is not an "
                        f"integer")
    big = np.abs(a) >= 2.0 ** 62  # (the cast wrapped it to a "negative" index)
    if big.any():
        i, k = map(int, np.argwhere(big)[0])
        raise DataError(f"{path}: {what} row {i}, column {k}: index {float(a[i, k])!r} is too "
                        f"large")
    return a.astype(np.int64)


def _from_dense(a: np.ndarray, path: str) -> Tuple[np.ndarray, np.ndarray, Tuple[int, ...]]:
    if a.ndim < 1 or a.size == 0:
        raise DataError(f"{path}: an empty array (shape {a.shape})")
    if not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"{path}: a dense array must be floating point with NaN for the "
                        f"missing entries, got dtype {a.dtype}; for index/value pairs use a "
                        f".npz with arrays 'indices' and 'values', or a CSV file")
    a = np.asarray(a, dtype=np.float64)
    if np.isinf(a).any():
        i = np.argwhere(np.isinf(a))[0]
        raise DataError(f"{path}: entry {_fmt_index(i)} is infinite")
    observed = ~np.isnan(a)
    idx = np.argwhere(observed).astype(np.int64)
    if idx.shape[0] == 0:
        raise DataError(f"{path}: no observed entries (every entry is NaN)")
    return idx, a[observed], tuple(int(n) for n in a.shape)


def read_entries(path: str, shape: Optional[Sequence[int]] = None
                 ) -> Tuple[np.ndarray, np.ndarray, Tuple[int, ...], str]:
    """Observed entries of a data file.

    Args:
        path: ``.npz`` (``indices`` + ``values``, or one dense array), ``.npy`` (dense, NaN
            missing) or text (``i_1, ..., i_d, value`` per line).
        shape: the tensor's shape; default the dense array's, or ``max index + 1``.

    Returns ``(indices (N, d) int64, values (N,) float64, shape, kind)`` (``kind``:
    ``"dense"`` or ``"entries"``). Raises :class:`DataError` (a ``ValueError``) naming the
    file and the entry: empty file, non-integer / negative / out-of-range indices, NaN or
    infinite values, duplicate indices, inconsistent columns. Cost: O(N d) plus O(N log N)
    for the duplicate check.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")
    low = path.lower()
    kind = "entries"
    try:
        if low.endswith(".npy"):
            idx, vals, dshape = _from_dense(np.load(path, allow_pickle=False), path)
            kind = "dense"
        elif low.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if "indices" in keys and "values" in keys:
                    idx = np.asarray(z["indices"])
                    vals = np.asarray(z["values"])
                elif len(keys) == 1:
                    idx, vals, dshape = _from_dense(z[keys[0]], path)
                    kind = "dense"
                else:
                    raise DataError(f"{path}: expected arrays 'indices' and 'values' (or one "
                                    f"dense array), found {keys}")
            if kind == "entries":
                if idx.ndim != 2:
                    raise DataError(f"{path}: 'indices' must be an (N, d) array, got shape "
                                    f"{idx.shape}")
                if np.issubdtype(idx.dtype, np.floating):
                    idx = _indices_from_float(idx, path, "'indices'")
                elif not np.issubdtype(idx.dtype, np.integer):
                    raise DataError(f"{path}: 'indices' must be integers, got dtype {idx.dtype}")
                vals = vals.reshape(-1) if vals.ndim == 2 and 1 in vals.shape else vals
                if vals.ndim != 1 or vals.shape[0] != idx.shape[0]:
                    raise DataError(f"{path}: {vals.shape} 'values' for {idx.shape[0]} indices")
                if idx.shape[0] == 0:
                    raise DataError(f"{path}: no entries ('indices' is empty)")
        else:
            a = _read_text(path)
            if a.shape[1] < 2:
                raise DataError(f"{path}: each line needs d indices and a value, found "
                                f"{a.shape[1]} column(s)")
            idx = _indices_from_float(a[:, :-1], path, "line (data)")
            vals = a[:, -1]
    except DataError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from exc
    if np.issubdtype(idx.dtype, np.unsignedinteger) and idx.size and \
            int(idx.max()) > np.iinfo(np.int64).max:  # (wrapped to a "negative" index)
        raise DataError(f"{path}: index {int(idx.max())} is too large")
    idx = idx.astype(np.int64, copy=False)
    if np.iscomplexobj(vals):  # (the cast below dropped the imaginary parts with a warning)
        raise DataError(f"{path}: values must be real numbers, got dtype {vals.dtype}")
    try:
        vals = vals.astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: values must be numbers ({exc})") from exc
    if kind == "entries":
        nonfinite = ~np.isfinite(vals)
        if nonfinite.any():
            i = int(np.argmax(nonfinite))
            raise DataError(f"{path}: entry {i} at index {_fmt_index(idx[i])} has value "
                            f"{float(vals[i])!r}; every listed entry needs a finite value (leave "
                            f"missing entries out)")
        neg = idx < 0
        if neg.any():
            i, k = map(int, np.argwhere(neg)[0])
            raise DataError(f"{path}: entry {i}: index {_fmt_index(idx[i])} is negative in "
                            f"mode {k} (indices are 0-based)")
    d = idx.shape[1]
    if shape is not None:
        shape = tuple(int(n) for n in shape)
        if len(shape) != d:
            raise DataError(f"{path}: the entries have {d} indices, --shape has {len(shape)} "
                            f"modes {shape}")
        if kind == "dense" and shape != dshape:
            raise DataError(f"{path}: the dense array has shape {dshape}, --shape says {shape}")
        over = idx >= np.asarray(shape, dtype=np.int64)
        if over.any():
            i, k = map(int, np.argwhere(over)[0])
            raise DataError(f"{path}: entry {i}: index {_fmt_index(idx[i])} is out of range "
                            f"in mode {k} for shape {shape}")
    else:
        shape = dshape if kind == "dense" else tuple(int(v) + 1 for v in idx.max(0))
    if kind == "entries":
        check_duplicates(idx, path)
    return idx, vals, shape, kind


def check_duplicates(idx: np.ndarray, path: str) -> None:
    """Raise :class:`DataError` naming the first repeated multi-index (and its rows).
    O(N log N)."""
    if idx.shape[0] < 2:
        return
    order = np.lexsort(idx.T[::-1])
    s = idx[order]
    same = (s[1:] == s[:-1]).all(1)
    if same.any():
        j = int(np.argmax(same))
        rows = sorted((int(order[j]), int(order[j + 1])))
        raise DataError(f"{path}: the index {_fmt_index(s[j])} appears more than once "
                        f"(entries {rows[0]} and {rows[1]}); average (or sum) the values of "
                        f"each entry first")


def read_query(path: str, shape: Tuple[int, ...]) -> np.ndarray:
    """The ``(Q, d)`` multi-indices of a query file (``.npy`` / ``.npz`` integer array,
    key ``indices`` in a multi-array ``.npz``, or text with ``d`` columns per line).
    Raises :class:`DataError` naming the file and the entry. O(Q d)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (--query)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the query file is empty")
    low = path.lower()
    try:
        if low.endswith(".npy"):
            q = np.load(path, allow_pickle=False)
        elif low.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                key = "indices" if "indices" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise DataError(f"{path}: expected an array 'indices', found {keys}")
                q = z[key]
        else:
            q = _read_text(path)
    except DataError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from exc
    d = len(shape)
    if q.ndim == 1 and q.shape[0] == d:
        q = q.reshape(1, d)
    if q.ndim != 2 or q.shape[1] != d:
        raise DataError(f"{path}: expected {d} indices per query, got an array of shape "
                        f"{q.shape}")
    if q.shape[0] == 0:
        raise DataError(f"{path}: no queries")
    if np.issubdtype(q.dtype, np.floating):
        q = _indices_from_float(q, path, "query")
    elif not np.issubdtype(q.dtype, np.integer):
        raise DataError(f"{path}: query indices must be integers, got dtype {q.dtype}")
    q = q.astype(np.int64)
    bad = (q < 0) | (q >= np.asarray(shape, dtype=np.int64))
    if bad.any():
        i, k = map(int, np.argwhere(bad)[0])
        raise DataError(f"{path}: query {i}: index {_fmt_index(q[i])} is out of range in "
                        f"mode {k} for shape {tuple(shape)}")
    return q


# ---------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, a line every
    tenth of the run otherwise); silent when disabled."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.enabled = max(int(total), 1), enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last_line = -1

    def update(self, t: int, row: dict) -> None:
        if not self.enabled:
            return
        frac = min(t / self.total, 1.0)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        parts = [f"[{bar}] {t}/{self.total}"]
        for key in ("train_err", "val_err"):
            if key in row:
                parts.append(f"{key} {row[key]:.3e}")
        parts.append(f"{time.perf_counter() - self.t0:.1f} s")
        line = "  ".join(parts)
        if self.tty:
            self.stream.write("\r" + line + " " * 4)
            self.stream.flush()
        elif int(10 * frac) != self.last_line or t == self.total:
            self.last_line = int(10 * frac)
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------

def _parse_shape(s: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in s.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 10,20,30 or 10x20x30, got {s!r}")
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {s!r}")
    return shape


def build_parser(prog: str = "ttmanifold complete") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Complete a tensor from observed entries with a fixed-TT-rank model "
                    "(Riemannian CG, L-BFGS, trust region or ALS). Data: .npz (indices + values, or a dense array with "
                    "NaN for missing), .npy (dense, NaN missing) or CSV lines "
                    "'i_1,...,i_d,value' (0-based). Data-parallel under torchrun, unchanged.",
        epilog="examples:\n  ttmanifold complete ratings.csv --rank 5 --validation 0.1 "
               "--query wanted.csv\n  torchrun --nproc_per_node 4 -m ttmanifold complete "
               "data.npz --rank 8 --out run1")
    p.add_argument("data", help="the observed entries (.npz, .npy or CSV)")
    p.add_argument("--rank", type=int, required=True,
                   help="TT-rank (clipped to the feasible ranks of the shape); with "
                        "--rank-adaptive the cap of every bond")
    p.add_argument("--rank-adaptive", action="store_true",
                   help="choose the ranks: start from rank 1 and raise the bonds whose "
                        "gradient promises the largest gain (one or several at a time) while "
                        "the error on a control set (10%% of the training entries) falls "
                        "(distributed.distributed_rank_adaptive; data-parallel under "
                        "torchrun; --iters is then the cap of CG iterations per attempt, "
                        "--checkpoint-every K keeps every K-th accepted stage)")
    p.add_argument("--shape", type=_parse_shape, default=None,
                   help="the tensor's shape, e.g. 10,20,30 (default: the dense array's, or "
                        "the largest index + 1 per mode)")
    p.add_argument("--validation", type=float, default=0.0,
                   help="fraction of the entries held out for validation (default 0)")
    p.add_argument("--method", choices=tuple(METHODS), default="rcg",
                   help="fixed-rank solver: 'rcg' Riemannian CG with exact line search "
                        "(default), 'rlbfgs' Riemannian L-BFGS, 'rtr' Riemannian trust "
                        "region with the exact Hessian (fewer, costlier iterations), 'als' "
                        "alternating least squares (one sweep per iteration); all "
                        "data-parallel under torchrun")
    p.add_argument("--iters", type=int, default=100,
                   help="iterations of the solver (default 100)")
    p.add_argument("--tol", type=float, default=1e-10,
                   help="stop when the relative training error is below this (default 1e-10)")
    p.add_argument("--init", choices=("auto", "spectral", "random", "means"), default="auto",
                   help="start: 'spectral' (TT-SVD of the rescaled zero-filled data; dense, at "
                        "most 2e7 entries), 'random', or 'auto' (spectral when possible); "
                        "with --rank-adaptive the rank-1 start: 'means' (slice means), "
                        "'spectral' (sparse, from the samples), 'random', or 'auto' (CG from "
                        "the means and the spectral start, the control set keeps one)")
    p.add_argument("--query", default=None,
                   help="file of multi-indices (.npy/.npz/CSV) to predict: predictions.csv")
    p.add_argument("--out", default="complete_out", help="output directory (default complete_out)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the validation split and the random start")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="write OUT/checkpoint.pt every K iterations (with --rank-adaptive: "
                        "every K accepted stages)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (same data and options); replaces "
                        "that run's outputs")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="under torchrun: seconds after which a silent peer is an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_outputs(out: str, want: Sequence[str], force: bool, resume: bool) -> Optional[str]:
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out: {out!r} exists and is not a directory"
    if resume:
        if not os.path.isfile(os.path.join(out, "checkpoint.pt")):
            return f"--resume: no checkpoint {os.path.join(out, 'checkpoint.pt')!r}"
        return None
    for name in want:
        f = os.path.join(out, name)
        if os.path.isdir(f):  # not replaceable by a file, even with --force
            return f"--out: {f!r} is a directory; remove it or choose another --out"
        if os.path.exists(f) and not force:
            return f"--out: {f!r} exists; pass --force to overwrite it or choose another --out"
    try:  # a real write: os.access says yes to root on read-only and special file systems
        ensure_writable_dir(out)
    except OSError as exc:
        return f"--out: cannot write in {out!r} ({exc.strerror or exc})"
    return None


def _write_report(path: str, hist, header: List[str], extra: Sequence[str] = ()) -> None:
    keys = ["train_err", "train_rmse", "val_err", "val_rmse"] + list(extra)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        for line in header:
            f.write(f"# {line}\n")
        w = csv.writer(f)
        w.writerow(["iter", "time", "loss"] + keys)
        for t, l, s, m in zip(hist.iters, hist.loss, hist.time, hist.metrics):
            w.writerow([t, f"{s:.6f}", repr(float(l))] +
                       [repr(float(m[k])) if k in m else "" for k in keys])
    os.replace(tmp, path)


def _write_predictions(path: str, q: np.ndarray, pred: np.ndarray) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"i{k + 1}" for k in range(q.shape[1])] + ["prediction"])
        for row, v in zip(q.tolist(), pred.tolist()):
            w.writerow(row + [repr(float(v))])
    os.replace(tmp, path)


def run_complete(args, out_stream=None) -> int:
    """The command once its arguments are parsed. Returns the exit status (0, or 130 after
    Ctrl-C with the finished iterations written)."""
    from .. import io as tt_io
    from .distributed import (Communicator, ShardedCompletion, distributed_als,
                              distributed_cg, distributed_lbfgs, distributed_trust_region,
                              shard_mask, validation_mask)

    comm = Communicator()
    lead = comm.rank == 0
    say_stream = out_stream or sys.stdout

    def say(msg: str) -> None:
        if lead:
            print(msg, file=say_stream, flush=True)

    def fail_all(error: Optional[str]) -> None:
        try:
            comm.check_all(error, "the check of the inputs")
        except ValueError as exc:
            raise SystemExit(f"ttmanifold complete: {exc}")

    # arguments and outputs first, before any long work
    error = None
    if args.rank < 1:
        error = f"--rank: expected a positive int, got {args.rank}"
    elif not 0.0 <= args.validation < 1.0:
        error = f"--validation: expected a fraction in [0, 1), got {args.validation}"
    elif args.iters < 0:
        error = f"--iters: expected a non-negative int, got {args.iters}"
    elif not (math.isfinite(args.tol) and args.tol >= 0):
        error = f"--tol: expected a non-negative number, got {args.tol}"
    elif args.checkpoint_every < 0:
        error = f"--checkpoint-every: expected a non-negative int, got {args.checkpoint_every}"
    elif args.rank_adaptive and args.method != "rcg":
        error = (f"--method {args.method}: --rank-adaptive runs Riemannian CG inside; drop "
                 f"--method or give a fixed --rank")
    elif args.rank_adaptive and args.iters < 1:
        error = "--iters: --rank-adaptive needs at least 1 CG iteration per attempt"
    elif args.init == "means" and not args.rank_adaptive:
        error = "--init means: the slice-means start is the rank-adaptive search's (rank 1)"
    want = ["completed.npz", "report.csv"] + (["predictions.csv"] if args.query else []) + \
        (["checkpoint.pt"] if args.checkpoint_every else [])
    if error is None and lead:
        error = _check_outputs(args.out, want, args.force, args.resume)
    fail_all(error)

    t_read = time.perf_counter()
    size = os.path.getsize(args.data) if os.path.isfile(args.data) else 0
    say(f"reading {args.data} ({size / 1e6:.1f} MB)" +
        (f" on each of {comm.world_size} processes" if comm.distributed else "") + " ...")
    error = None
    q = None
    try:
        idx, vals, shape, kind = read_entries(args.data, args.shape)
        if args.query:
            q = read_query(args.query, shape)
    except DataError as exc:
        error = str(exc)
    fail_all(error)
    n_all = idx.shape[0]
    val = validation_mask(idx, args.validation, seed=args.seed) if args.validation else \
        np.zeros(n_all, dtype=bool)
    if args.validation and (val.all() or not val.any()):
        fail_all(f"--validation {args.validation}: leaves "
                 f"{'no training' if val.all() else 'no validation'} entries of {n_all}")
    mine = shard_mask(idx, comm.rank, comm.world_size) if comm.distributed else \
        np.ones(n_all, dtype=bool)
    tr, va = mine & ~val, mine & val
    say(f"{n_all} observed entries ({kind} input) of a tensor of shape {shape} "
        f"({math.prod(shape):.3g} entries, {n_all / math.prod(shape):.2%} observed); "
        f"{int((~val).sum())} for training, {int(val.sum())} for validation; read in "
        f"{time.perf_counter() - t_read:.1f} s")
    dtype = getattr(torch, args.dtype)
    if args.rank_adaptive:
        return _run_rank_adaptive(args, idx, vals, tr, va, shape, q, dtype, say, comm)
    import warnings

    t_build = time.perf_counter()
    say("building the problem (checks of the entries, index layouts) ...")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            S = ShardedCompletion(torch.from_numpy(idx[tr]), torch.from_numpy(vals[tr]),
                                  shape, args.rank,
                                  validation=(torch.from_numpy(idx[va]),
                                              torch.from_numpy(vals[va])),
                                  dtype=dtype)
        except ValueError as exc:
            raise SystemExit(f"ttmanifold complete: {exc}")
    for w in caught:
        say(f"note: {w.message}")
    del idx, vals
    M = S.manifold
    say(f"problem built in {time.perf_counter() - t_build:.1f} s")
    say(f"model: TT-ranks {M.ranks} (fixed; --rank-adaptive chooses them), {M.dim} "
        f"degrees of freedom, "
        f"{S.n_train / M.dim:.3g} training entries per degree of freedom"
        + (f"; {comm.world_size} processes, {S.n_local} entries on rank 0"
           if comm.distributed else ""))
    if S.n_train < M.dim:
        say(f"warning: fewer training entries ({S.n_train}) than degrees of freedom "
            f"({M.dim}): the completion is underdetermined; lower --rank")
    init = args.init
    if init == "auto":
        init = "spectral" if math.prod(shape) <= DENSE_LIMIT else "random"
    if init == "spectral" and math.prod(shape) > DENSE_LIMIT:
        raise SystemExit(f"ttmanifold complete: --init spectral forms the dense tensor "
                         f"({math.prod(shape):.3g} entries > 2e7); use --init random")
    if not args.resume:
        t0 = time.perf_counter()
        say(f"start: {init}" + (f" (TT-SVD of a dense tensor with {math.prod(shape):.3g} "
                                 f"entries)" if init == "spectral" else "") + " ...")
        x0 = S.initial_point(args.seed, kind=init)
        say(f"start ready in {time.perf_counter() - t0:.1f} s")
    else:
        x0 = S.initial_point(args.seed, kind="random")  # replaced by the checkpoint's
        say(f"resuming from {os.path.join(args.out, 'checkpoint.pt')}")

    bar = Progress(args.iters, enabled=lead and not args.no_progress)

    def callback(t, hist):
        bar.update(t + 1 if t < args.iters else t, hist.metrics[-1] if hist.metrics else {})
        return False

    say(f"{METHODS[args.method]}, at most {args.iters} iterations (stops at train_err <= "
        f"{args.tol:g})")
    ck = os.path.join(args.out, "checkpoint.pt")
    solver = {"rcg": distributed_cg, "rlbfgs": distributed_lbfgs,
              "rtr": distributed_trust_region, "als": distributed_als}[args.method]
    try:
        hist = solver(S, x0, iters=args.iters, metrics_every=1,
                      checkpoint=ck if (args.checkpoint_every or args.resume) else None,
                      checkpoint_every=args.checkpoint_every, resume=args.resume,
                      callback=callback, stop_metric="train_err", stop_tol=args.tol)
    except ValueError as exc:  # a checkpoint of another run (method, shape, ranks, ...)
        raise SystemExit(f"ttmanifold complete: {exc}")
    finally:
        bar.close()
    status = hist.status
    final = hist.final_metrics()
    x = M.to_tt(hist.x)
    if lead:
        say(f"status {status} after {hist.n_iters} iterations, {hist.total_time:.1f} s: " +
            ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
        tt_io.save(x, os.path.join(args.out, "completed.npz"))
        header = [f"status: {'incomplete (interrupted)' if status == 'interrupted' else status}",
                  f"data: {args.data}", f"shape: {list(shape)}", f"ranks: {list(M.ranks)} "
                  f"(fixed)", f"train: {S.n_train}", f"validation: {S.n_val}",
                  f"processes: {comm.world_size}", f"dtype: {args.dtype}",
                  f"init: {'checkpoint' if args.resume else init}",
                  f"method: {args.method}"]
        _write_report(os.path.join(args.out, "report.csv"), hist, header)
        _finish_outputs(args.out, x, q, shape, say)
    if status == "interrupted":
        if lead:
            print("ttmanifold complete: interrupted; the files hold the last finished "
                  "iteration (report.csv marked incomplete)", file=sys.stderr)
        return 130
    return 0


def _finish_outputs(out: str, x, q, shape, say) -> None:
    """The predictions at the query indices ``q`` (if any), and the line naming the files
    written (the completed TT and the report are written before)."""
    written = ["completed.npz", "report.csv"]
    if q is not None:
        from ..tt import IndexSet

        with torch.no_grad():
            pred = IndexSet(torch.from_numpy(q), shape).gather(x).double().numpy()
        _write_predictions(os.path.join(out, "predictions.csv"), q, pred)
        written.append("predictions.csv")
    say(f"wrote {', '.join(os.path.join(out, w) for w in written)}")


def _run_rank_adaptive(args, idx, vals, tr, va, shape, q, dtype, say, comm) -> int:
    """``--rank-adaptive``: :func:`~ttmanifold.experiments.distributed.distributed_rank_adaptive`
    on the training entries (validation entries only reported), in one process or
    data-parallel; checkpoints at accepted stages."""
    from .. import io as tt_io
    from ..manifold import FixedTTRank
    from .distributed import ShardedCompletion, distributed_rank_adaptive

    lead = comm.rank == 0
    try:
        S = ShardedCompletion(torch.from_numpy(idx[tr]), torch.from_numpy(vals[tr]), shape, 1,
                              validation=(torch.from_numpy(idx[va]), torch.from_numpy(vals[va])),
                              dtype=dtype)
    except ValueError as exc:
        raise SystemExit(f"ttmanifold complete: {exc}")
    del idx, vals
    say(f"rank-adaptive: ranks from 1 up to {args.rank} per bond; each attempt raises the "
        f"most promising bond(s) and runs CG (at most {args.iters} iterations), kept when "
        f"the error on a control set "
        f"(10% of the {S.n_train} training entries) falls; the attempts are listed when the "
        f"search ends" + (f" ({comm.world_size} processes)" if comm.distributed else "") +
        " ...")
    if args.resume:
        say(f"resuming from {os.path.join(args.out, 'checkpoint.pt')}")
    ck = os.path.join(args.out, "checkpoint.pt")
    t0 = time.perf_counter()
    try:
        hist = distributed_rank_adaptive(
            S, max_rank=args.rank, inner_iters=args.iters, seed=args.seed, start=args.init,
            checkpoint=ck if (args.checkpoint_every or args.resume) else None,
            checkpoint_every=args.checkpoint_every, resume=args.resume)
    except KeyboardInterrupt:
        if lead:
            print("ttmanifold complete: interrupted during the rank-adaptive search; nothing "
                  "written" + (" (continue from the last accepted stage with --resume)"
                               if args.checkpoint_every else
                               " (--checkpoint-every K keeps every K-th accepted stage)"),
                  file=sys.stderr)
        return 130
    except ValueError as exc:  # a checkpoint of another run, bad options
        raise SystemExit(f"ttmanifold complete: {exc}")

    def what(j, a):
        return ("start" if j == 0 else "rounding") if a.get("bond") is None \
            else f"bond {a['bond']}"

    errs = hist.info["rank_history"][0].get("start_errs") if hist.info.get(
        "rank_history") else None
    if errs:
        say(f"  rank-1 start {hist.info.get('start')} kept (control error after the fit: " +
            ", ".join(f"{k} {v:.3e}" for k, v in errs.items()) + ")")
    for j, a in enumerate(hist.info.get("rank_history", [])):
        say(f"  {what(j, a)}: ranks {list(a['ranks'])}, control error "
            f"{a['control_err']:.3e}, {'kept' if a['accepted'] else 'rejected'}")
    ranks = tuple(hist.info["ranks"])
    x = FixedTTRank(shape, ranks).to_tt(hist.x)
    final = hist.final_metrics()
    say(f"ranks {list(ranks)} after {time.perf_counter() - t0:.1f} s: " +
        ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
    if not lead:
        return 0
    tt_io.save(x, os.path.join(args.out, "completed.npz"))
    header = [f"status: {hist.status}", f"data: {args.data}", f"shape: {list(shape)}",
              f"ranks: {list(ranks)} (rank-adaptive, cap {args.rank})",
              f"train: {S.n_train} (of which a control set of "
              f"{hist.info.get('control_size')})", f"validation: {S.n_val}",
              f"processes: {comm.world_size}", f"dtype: {args.dtype}",
              "init: " + ("checkpoint" if args.resume else
                          f"rank 1, {hist.info.get('start')} (--init {args.init})")]
    header += [f"attempt: {what(j, a)} ranks {list(a['ranks'])} control_err "
               f"{a['control_err']!r} {'kept' if a['accepted'] else 'rejected'}"
               for j, a in enumerate(hist.info.get("rank_history", []))]
    _write_report(os.path.join(args.out, "report.csv"), hist, header, extra=["control_err"])
    _finish_outputs(args.out, x, q, shape, say)
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "ttmanifold complete") -> int:
    """Entry point of ``ttmanifold complete``. Under ``torchrun`` (``WORLD_SIZE > 1``) it
    joins the process group (gloo on CPU, NCCL with CUDA) and runs data-parallel."""
    from .distributed import init_from_env

    args = build_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        # checked in one process too, not only when a process group is started
        raise SystemExit(f"ttmanifold complete: --timeout: expected a positive number of "
                         f"seconds, got {args.timeout}")
    started = False
    try:
        started = init_from_env(timeout=args.timeout)
    except ValueError as exc:
        raise SystemExit(f"ttmanifold complete: --timeout: {exc}")
    from .distributed import PeerFailure

    try:
        return run_complete(args)
    except KeyboardInterrupt:
        # before the solver's first iteration (reading, checks, the start) or while
        # writing the outputs (each file is replaced atomically): nothing half-written
        print("ttmanifold complete: interrupted before the solver ran or while writing "
              "the outputs; every file in --out is complete (old or new)", file=sys.stderr)
        return 130
    except PeerFailure as exc:
        raise SystemExit(f"ttmanifold complete: {exc}")
    finally:
        if started:
            import torch.distributed as dist

            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001  (a failed peer; exit anyway)
                pass
