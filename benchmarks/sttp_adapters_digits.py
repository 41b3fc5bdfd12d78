"""Adapters on scikit-learn's digits: STTP / SVDP updates against a plain low-rank (LoRA)
update with the same number of trainable parameters.

    python benchmarks/sttp_adapters_digits.py [--quick] [--seeds 3]

Setting: an MLP 64-128-128-10 is trained on the digits (train split); the new task is the
same digits mirrored left-right (a domain shift the base model handles badly). Every
linear layer gets an adapter ``W0 + dW`` (base frozen, ``dW = 0`` at the start, biases
frozen too) and only the adapters train: Adam, full batch, a fixed number of steps, the
learning rate picked per method from a small grid by validation accuracy, then test
accuracy on held-out mirrored digits. LoRA: ``dW = B A`` with ``B = 0`` at the start and
``A`` Gaussian; its rank per layer is the one whose parameter count is closest to (not
above) the STTP adapter's. Mean and spread over seeds. CPU, float32, one thread.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ttmanifold.nn import SpectralAdapter  # noqa: E402


class LoRA(nn.Module):
    """``y = base(x) + x A^T B^T`` with ``B = 0`` at the start (base frozen)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.A.T) @ self.B.T


def data(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    mirrored = X.reshape(-1, 8, 8).flip(-1).reshape(-1, 64)
    idx = torch.arange(len(y))
    tr, rest = train_test_split(idx.numpy(), test_size=0.5, random_state=seed, stratify=y)
    va, te = train_test_split(rest, test_size=0.5, random_state=seed, stratify=y[rest])
    return (X[tr], y[tr]), (mirrored[tr], y[tr]), (mirrored[va], y[va]), (mirrored[te], y[te])


def acc(model, X, y):
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item()


def train(model, X, y, steps, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return model


def adapt(base, kind, rank, seed):
    torch.manual_seed(seed)
    m = copy.deepcopy(base)
    for i in (0, 2, 4):
        if kind == "lora":
            m[i] = LoRA(m[i], rank[i] if isinstance(rank, dict) else rank)
        else:
            m[i] = SpectralAdapter(m[i], rank, method=kind)
    return m


def n_trainable(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps = 60 if args.quick else 300
    lrs = (1e-2,) if args.quick else (3e-3, 1e-2, 3e-2)
    ranks = (4, 8) if args.quick else (4, 8, 16)
    rows = {}
    t0 = time.time()
    for seed in range(args.seeds):
        (Xs, ys), (Xt, yt), (Xv, yv), (Xe, ye) = data(seed)
        torch.manual_seed(seed)
        base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 10))
        train(base, Xs, ys, 400, 1e-2)
        rows.setdefault(("base (no adapter)", 0), []).append(acc(base, Xe, ye))
        for r in ranks:
            sttp_probe = adapt(base, "sttp", r, seed)
            budget = {i: sum(p.numel() for p in sttp_probe[i].parameters() if p.requires_grad)
                      for i in (0, 2, 4)}
            lora_rank = {i: max(1, budget[i] // (sttp_probe[i].base.in_features
                                                 + sttp_probe[i].base.out_features))
                         for i in (0, 2, 4)}
            for kind, rk in (("sttp", r), ("svdp", max(1, min(lora_rank.values()))),
                             ("lora", lora_rank)):
                best = None
                for lr in lrs:
                    m = train(adapt(base, kind, rk, seed), Xt, yt, steps, lr)
                    v = acc(m, Xv, yv)
                    if best is None or v > best[0]:
                        best = (v, acc(m, Xe, ye), n_trainable(m))
                label = {"sttp": f"STTP adapter r={r}", "svdp": f"SVDP adapter r={rk}",
                         "lora": f"LoRA r={'/'.join(str(v) for v in lora_rank.values())}"}[kind]
                rows.setdefault((label, best[2]), []).append(best[1])
    print(f"digits mirrored, MLP 64-128-128-10, {steps} Adam steps, lr grid {lrs}, "
          f"{args.seeds} seeds, {time.time() - t0:.0f} s\n")
    print("| adapter | trainable params | test accuracy (mean +- sd) |")
    print("| --- | ---: | --- |")
    for (label, n), v in rows.items():
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"| {label} | {n} | {statistics.mean(v):.3f} +- {sd:.3f} |")


if __name__ == "__main__":
    main()
