"""Batched Householder frames across a converted model against per-layer evaluation.

    python benchmarks/bench_sttp_batched.py [--quick] [--threads 1]

The CIFAR-10 SNGAN discriminator (``benchmarks/sttp_paper_models.py``, ndf = 128, 10
convolutions and a linear map) and WideResNet-16-4 are converted to STTP (and SVDP) with
the normalized spectrum, float32 on the CPU. Times, median over interleaved rounds (ms):
the cores of all layers alone (per layer vs :func:`ttmanifold.nn.batched_cores`), and one
training step's forward + backward on a batch (per layer vs inside
:func:`ttmanifold.nn.batched_frames`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from sttp_paper_models import SNGANDiscriminator, WideResNet  # noqa: E402

from ttmanifold.nn import FactorizedLayer, batched_cores, batched_frames, convert_model  # noqa: E402


def _median_ms(fns, rounds, warmup=2):
    times = {k: [] for k in fns}
    for i in range(rounds + warmup):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if i >= warmup:
                times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def run(name, model, x, rounds):
    layers = [m for m in model.modules() if isinstance(m, FactorizedLayer)]
    shapes = {(b.kind, b.m, b.r) for m in layers if m.method == "sttp"
              for b in m.chart.layout if b.kind != "spectrum"}
    shapes |= {(f, m.weight_param.d_out if f == "u" else m.weight_param.d_in, m.weight_param.r)
               for m in layers if m.method == "svdp" for f in ("u", "v")}
    nframes = sum(1 for m in layers if m.method == "sttp"
                  for b in m.chart.layout if b.kind != "spectrum")
    nframes += 2 * sum(1 for m in layers if m.method == "svdp")

    def cores_each():
        with torch.no_grad():
            for m in layers:
                m.weight_param.cores()

    def cores_batched():
        with torch.no_grad():
            batched_cores(layers)

    def step_each():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def step_batched():
        model.zero_grad(set_to_none=True)
        with batched_frames(model):
            y = model(x)
        y.sum().backward()

    t = _median_ms({"ce": cores_each, "cb": cores_batched, "se": step_each,
                    "sb": step_batched}, rounds)
    print(f"| {name} | {len(layers)} | {nframes} | {len(shapes)} | {t['ce']:.2f} | "
          f"{t['cb']:.2f} | {t['ce'] / t['cb']:.2f}x | {t['se']:.1f} | {t['sb']:.1f} | "
          f"{t['se'] / t['sb']:.2f}x |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds = 3 if args.quick else 15
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, median of {rounds} "
          f"interleaved rounds (ms)\n")
    print("| model | layers | frames | frame shapes | cores per layer | cores batched | "
          "speedup | step per layer | step batched | speedup |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for method, rank in (("sttp", 16), ("sttp", 64), ("svdp", 16)):
        D = SNGANDiscriminator(32)
        convert_model(D, rank, method=method, init="near_identity", spectrum="lipschitz")
        run(f"SNGAN D CIFAR {method.upper()} r{rank}, batch 16", D, torch.randn(16, 3, 32, 32),
            rounds)
    W = WideResNet(depth=16, widen=4)
    convert_model(W, 16, init="near_identity", spectrum="lipschitz", ignore=["conv1"])
    run("WRN-16-4 STTP r16, batch 16", W, torch.randn(16, 3, 32, 32), rounds)


if __name__ == "__main__":
    main()
