"""Benchmark of the STTP / SVDP layers of ``ttmanifold.nn`` against torch's dense layers.

    python benchmarks/bench_layers.py                 # full run (about a minute)
    python benchmarks/bench_layers.py --quick         # smoke run (few rounds)
    python benchmarks/bench_layers.py --append benchmarks/RESULTS.md

Times one forward + backward (``layer(x).sum().backward()``, parameter gradients and the
input gradient) on CPU in float32, batch 128, for

1. ``Linear(1024, 1024)``: torch's ``nn.Linear``, ``SVDPLinear(rank=16)``,
   ``STTPLinear(rank=16)`` (chart mode with the automatic contraction plan, the same with
   the dense weight forced, and manifold mode);
2. ``Conv2d(256, 256, 3, padding=1)`` on 8 x 8 inputs (small spatial size to keep the run
   short; the factorized layers gain relative to the dense one as the number of pixels per
   weight entry falls, and lose some for large images where the dense conv is compute
   bound either way): ``nn.Conv2d``, ``SVDPConv2d(rank=32)``, ``STTPConv2d(rank=32)``
   (same variants).

Variants are interleaved (one call of each per round) so that they see the same machine
load; the time is the median over the rounds after warmup, in ms. Threads default to 1
(``--threads``): on a shared 2-core machine, two intra-op threads made small kernels
erratic. ``params`` counts all parameters (weight and bias), ``ratio`` = dense params /
params, ``plan`` is the groups of cores of the automatic contraction (``dense`` = W formed).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from ttmanifold.nn import (  # noqa: E402
    STTPConv2d,
    STTPLinear,
    SVDPConv2d,
    SVDPLinear,
    compression_ratio,
)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        layer(x).sum().backward()

    return run


def _params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


def bench_case(title: str, x: torch.Tensor, variants: Dict[str, nn.Module], rounds: int,
               warmup: int) -> List[dict]:
    steps = {name: _step(m, x) for name, m in variants.items()}
    for _ in range(warmup):
        for f in steps.values():
            f()
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    rows = []
    dense_ms = None
    for name, m in variants.items():
        ms = 1e3 * statistics.median(times[name])
        if dense_ms is None:
            dense_ms = ms
        if hasattr(m, "plan"):
            groups = m.plan(*x.shape)
            plan = "dense" if len(groups) == 1 else " ".join(f"[{a},{b})" for a, b in groups)
            ratio = compression_ratio(m)["replaced"]
        else:
            plan, ratio = "-", 1.0
        rows.append(dict(case=title, variant=name, ms=ms, speedup=dense_ms / ms,
                         params=_params(m), ratio=ratio, plan=plan))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few rounds (smoke run)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--append", default=None, help="append the markdown section to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds = args.rounds or (3 if args.quick else 15)
    warmup = 1 if args.quick else 3
    B = args.batch
    dt = torch.float32

    lin_x = torch.randn(B, 1024, dtype=dt, requires_grad=True)
    lin = {
        "nn.Linear": nn.Linear(1024, 1024, dtype=dt),
        "SVDPLinear r=16": SVDPLinear(1024, 1024, rank=16, dtype=dt, init="random"),
        "STTPLinear r=16 (auto)": STTPLinear(1024, 1024, rank=16, dtype=dt, init="random"),
        "STTPLinear r=16 (dense W)": STTPLinear(1024, 1024, rank=16, dtype=dt, init="random",
                                                contraction="dense"),
        "STTPLinear r=16 (manifold)": STTPLinear(1024, 1024, rank=16, dtype=dt, init="random",
                                                 param="manifold"),
    }
    conv_x = torch.randn(B, 256, 8, 8, dtype=dt, requires_grad=True)
    ck = dict(padding=1, dtype=dt)
    conv = {
        "nn.Conv2d": nn.Conv2d(256, 256, 3, **ck),
        "SVDPConv2d r=32": SVDPConv2d(256, 256, 3, rank=32, init="random", **ck),
        "STTPConv2d r=32 (auto)": STTPConv2d(256, 256, 3, rank=32, init="random", **ck),
        "STTPConv2d r=32 (dense W)": STTPConv2d(256, 256, 3, rank=32, init="random",
                                                contraction="dense", **ck),
        "STTPConv2d r=32 (manifold)": STTPConv2d(256, 256, 3, rank=32, init="random",
                                                 param="manifold", **ck),
    }
    rows = bench_case("Linear 1024->1024", lin_x, lin, rounds, warmup)
    rows += bench_case("Conv2d 256->256 3x3, 8x8", conv_x, conv, rounds, warmup)

    today = datetime.date.today().isoformat()
    lines = [
        "## STTP layers (issue 4)",
        "",
        f"`python benchmarks/bench_layers.py{' --quick' if args.quick else ''}` on {today}: "
        f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} thread(s), float32, batch {B}, forward + backward, median of "
        f"{rounds} interleaved rounds (ms). `ratio` = dense params / params (weight + bias);"
        f" `plan` = groups of tensor cores [k0, k1) in application order (`dense` = W "
        f"formed, then `F.linear`/`F.conv2d`).",
        "",
        "| case | variant | ms | speedup vs dense | params | ratio | plan |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['variant']} | {r['ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['params']} | {r['ratio']:.1f} | {r['plan']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
