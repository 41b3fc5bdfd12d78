"""One command to check ttmanifold on a GPU (issue 12): prints one table.

    python benchmarks/gpu_check.py                       # on a CUDA machine, < 5 minutes
    python benchmarks/gpu_check.py --device cpu --quick  # here (CI runs this, ~20 s)

Rows:

- ``cuda tests``: the tests parametrized on CUDA (every test module that asks
  ``torch.cuda.is_available()``, ``pytest -k cuda``) in a subprocess, before the timings
  on CUDA (alongside them with ``--device cpu``, where they only skip);
- ``manifold``: time per point of ``retr``, ``project`` and one RiemannianAdam step on a
  batch of B = 1 and 256 points in float32 (d = 10, n = 20, r = 4), the functions of
  ``bench_batch.py``, synchronized on CUDA (median of a few rounds after a warmup);
- ``completion CG``: batched Riemannian CG on B = 1 and 64 completion problems
  (``bench_batch_completion.py``, float32), time per problem and iteration;
- ``compare``: the quick comparison (``ttmanifold compare --quick --device ...``, in
  process), final loss of every method per problem.

Exit status 1 when a check fails (a failing test, an exception). ``--quick`` shrinks every
size (the CUDA tests still run in full).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import traceback

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # the sibling benchmark modules (imported when used)


def cuda_test_files():
    """Test modules with CUDA parametrizations (they skip "CUDA not available")."""
    return [p for p in sorted((ROOT / "tests").glob("test_*.py"))
            if "torch.cuda.is_available()" in p.read_text()]


def start_cuda_tests():
    cmd = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider",
           *[str(p) for p in cuda_test_files()]]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True), time.perf_counter()


def finish_cuda_tests(proc, t0, timeout):
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return [("cuda tests", "pytest -k cuda", f"timeout after {timeout:.0f} s", None, False)]
    counts = dict((k, int(v)) for v, k in re.findall(
        r"(\d+) (passed|failed|skipped|errors?|deselected)", out.strip().splitlines()[-1]
        if out.strip() else ""))
    ok = proc.returncode in (0, 5) and not counts.get("failed") and not counts.get("error") \
        and not counts.get("errors")
    text = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "deselected") or "no output"
    if not torch.cuda.is_available() and counts.get("skipped"):
        text += " (CUDA not available)"
    if not ok:
        text += " | " + " / ".join(out.strip().splitlines()[-3:])
    return [("cuda tests", f"{len(cuda_test_files())} modules, pytest -k cuda", text,
             time.perf_counter() - t0, ok)]


def synced(fn, device):
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)
    return run


def manifold_rows(device, quick):
    from bench_batch import adam_batched, median_time, setup

    from ttmanifold import FixedTTRank

    d, n, r, Bs, rounds = (4, 5, 2, (1, 16), 2) if quick else (10, 20, 4, (1, 256), 5)
    M = FixedTTRank((n,) * d, r)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for B in Bs:
        t0 = time.perf_counter()
        p, Z, u, A = setup(M, B, r, gen)  # float64 on the CPU, then cast
        p, u = p.to(torch.float32).to(device), u.to(torch.float32).to(device)
        Z, A = Z.to(dtype=torch.float32, device=device), A.to(dtype=torch.float32, device=device)
        ops = {"retr": lambda: M.retr(p, u), "project": lambda: M.project(p, Z),
               "adam step": adam_batched(M, p, A)}
        res = [f"{name} {median_time(synced(fn, device), rounds) / B * 1e3:.4f}"
               for name, fn in ops.items()]
        rows.append(("manifold", f"float32 d={d} n={n} r={r} B={B}",
                     "ms/point: " + ", ".join(res), time.perf_counter() - t0, True))
    return rows


def completion_rows(device, quick):
    from bench_batch_completion import time_completion

    d, n, r, Bs = (4, 8, 2, (1, 4)) if quick else (10, 20, 4, (1, 64))
    rows = []
    for B in Bs:
        t0 = time.perf_counter()
        tb, _, _ = time_completion(B, d, n, r, iters=3, dtype=torch.float32, device=device,
                                   loop=False)
        rows.append(("completion CG", f"float32 d={d} n={n} r={r} B={B}",
                     f"{tb * 1e3:.3f} ms/problem/iteration (CPU time)",
                     time.perf_counter() - t0, True))
    return rows


def compare_rows(device, quick):
    from ttmanifold.experiments.compare import main as compare_main

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        argv = ["--quick", "--device", device.type, "--no-progress", "--out", out]
        if quick:  # a smoke run: two methods on completion, a few iterations
            argv += ["--problems", "completion", "--methods", "rcg,radam", "--iters", "5",
                     "--grid-size", "1", "--tune-iters", "1"]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            compare_main(argv)
        with open(os.path.join(out, "results.csv")) as f:
            rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    last = {}
    for row in rows:
        last[(row["problem"], row["method"])] = row
    out_rows = []
    for prob in dict.fromkeys(p for p, _ in last):
        res = ", ".join(f"{m} {float(row['loss']):.3g}" for (p, m), row in last.items()
                        if p == prob)
        out_rows.append(("compare", f"--quick {prob}", "final loss: " + res, None, True))
    out_rows[-1] = out_rows[-1][:3] + (time.perf_counter() - t0, True)
    return out_rows


def guarded(name, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # one failing check must not hide the others
        traceback.print_exc()
        return [(name, "", f"FAILED: {type(exc).__name__}: {exc}", None, False)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="device of the benchmarks and the comparison (default cuda)")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--test-timeout", type=float, default=240.0,
                    help="seconds for the CUDA tests (default 240)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here; use --device cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    t_all = time.perf_counter()
    proc, t0 = start_cuda_tests()
    tests = None
    if device.type == "cuda":  # the tests would share the GPU with the timings: run first
        tests = finish_cuda_tests(proc, t0, args.test_timeout)
    rows = guarded("manifold", manifold_rows, device, args.quick)
    rows += guarded("completion CG", completion_rows, device, args.quick)
    rows += guarded("compare", compare_rows, device, args.quick)
    if tests is None:  # on the CPU they ran alongside (they only skip there)
        tests = finish_cuda_tests(proc, t0, args.test_timeout)
    rows = tests + rows
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# gpu_check on {name}, torch {torch.__version__}, "
          f"{'quick' if args.quick else 'full'}, {time.perf_counter() - t_all:.1f} s")
    print("| check | setting | result | seconds | ok |")
    print("|---|---|---|---|---|")
    for check, setting, result, secs, ok in rows:
        s = "" if secs is None else f"{secs:.1f}"
        print(f"| {check} | {setting} | {result} | {s} | {'yes' if ok else 'NO'} |")
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
