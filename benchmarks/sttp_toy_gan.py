"""A small GAN on a 2-D mixture of Gaussians: does an STTP "lipschitz" discriminator
stabilize training, as the paper reports for image GANs? (CPU, minutes.)

    python benchmarks/sttp_toy_gan.py [--quick] [--seeds 3] [--steps 3000]

Data: 8 Gaussians on a circle of radius 2, standard deviation 0.05. Generator: MLP
16 -> 128 -> 128 -> 2 (ReLU). Discriminator: MLP 2 -> 128 -> 128 -> 1 (ReLU) in three
versions, everything else equal:

- ``none``: plain ``nn.Linear`` layers;
- ``spectral_norm``: torch's ``parametrizations.spectral_norm`` on each layer (power
  iteration estimate of the spectral norm);
- ``sttp``: ``STTPLinear`` layers with the normalized spectrum (``spectrum="lipschitz"``,
  exact spectral norm 1), near-identity initialization, rank 16 (the paper's "-L").

Hinge loss, Adam (lr 1e-3, betas (0.5, 0.9)), batch 256, ``--d-steps`` discriminator
steps per generator step (1; the paper's GANs use 5). Every ``--every`` steps 2500 samples are drawn: a sample is *good* when it
lies within 3 standard deviations of its nearest mode, a mode is *covered* when it holds at
least 1 % of the good samples' share (25 of 2500). Printed: modes covered and share of
good samples over training, per variant (mean and min/max over seeds).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ttmanifold.nn import STTPLinear  # noqa: E402

MODES = torch.tensor([[2 * math.cos(2 * math.pi * k / 8), 2 * math.sin(2 * math.pi * k / 8)]
                      for k in range(8)])
STD = 0.05


def sample_data(n, g):
    idx = torch.randint(0, 8, (n,), generator=g)
    return MODES[idx] + STD * torch.randn(n, 2, generator=g)


def generator():
    return nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 2))


def discriminator(kind):
    if kind == "sttp":
        mk = lambda i, o: STTPLinear(i, o, rank=16, spectrum="lipschitz",  # noqa: E731
                                     init="near_identity")
    elif kind == "spectral_norm":
        mk = lambda i, o: nn.utils.parametrizations.spectral_norm(nn.Linear(i, o))  # noqa: E731
    else:
        mk = nn.Linear
    return nn.Sequential(mk(2, 128), nn.ReLU(), mk(128, 128), nn.ReLU(), mk(128, 1))


def quality(G, g):
    with torch.no_grad():
        x = G(torch.randn(2500, 16, generator=g))
    d = torch.cdist(x, MODES)
    dmin, arg = d.min(dim=1)
    good = dmin < 3 * STD
    counts = torch.bincount(arg[good], minlength=8)
    return int((counts >= 25).sum()), good.float().mean().item()


def run(kind, seed, steps, every, d_steps=1):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    G, D = generator(), discriminator(kind)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.9))
    trace = []
    for step in range(1, steps + 1):
        for _ in range(d_steps):
            real = sample_data(256, g)
            with torch.no_grad():
                fake = G(torch.randn(256, 16, generator=g))
            opt_d.zero_grad()
            loss_d = F.relu(1 - D(real)).mean() + F.relu(1 + D(fake)).mean()
            loss_d.backward()
            opt_d.step()
        opt_g.zero_grad()
        loss_g = -D(G(torch.randn(256, 16, generator=g))).mean()
        loss_g.backward()
        opt_g.step()
        if step % every == 0:
            trace.append((step,) + quality(G, g))
    return trace


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--d-steps", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps, every = (300, 100) if args.quick else (args.steps, args.every)
    kinds = ("none", "spectral_norm", "sttp")
    t0 = time.time()
    res = {k: [run(k, s, steps, every, args.d_steps) for s in range(args.seeds)]
           for k in kinds}
    print(f"8 Gaussians, {steps} steps ({args.d_steps} D step(s) each), {args.seeds} seeds, "
          f"{time.time() - t0:.0f} s; "
          f"modes covered (of 8) and share of good samples, mean [min, max] over seeds\n")
    print("| step | " + " | ".join(f"{k}: modes | {k}: good" for k in kinds) + " |")
    print("| ---: | " + " | ".join("---: | ---:" for _ in kinds) + " |")
    for i in range(len(res[kinds[0]][0])):
        cells = []
        for k in kinds:
            modes = [t[i][1] for t in res[k]]
            good = [t[i][2] for t in res[k]]
            cells.append(f"{statistics.mean(modes):.1f} [{min(modes)}, {max(modes)}]")
            cells.append(f"{statistics.mean(good):.2f} [{min(good):.2f}, {max(good):.2f}]")
        print(f"| {res[kinds[0]][0][i][0]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
