"""The paper's training recipe against ttmanifold's earlier defaults, on scikit-learn's
digits: test accuracy against compression for STTP and SVDP (the shape of the paper's
Fig. 7 at toy scale).

    python benchmarks/sttp_recipe_digits.py [--quick] [--seeds 3]

Model: MLP 64 -> 256 -> 256 -> 10 (ReLU); the two hidden layers are converted
(``convert_model``, the classifier stays dense, as the paper keeps small layers dense)
at ranks 2..16 with two recipes, everything else equal (Adam, lr 3e-3, full batch, a
fixed number of steps, float32, one thread):

- ``paper``: reference tensorization, normalized spectrum (``"lipschitz"``), near-identity
  frames, the D-optimal penalty (``spectral_penalty``) with weight 1.0;
- ``earlier``: section 8 tensorization, learned spectrum, orthogonal frames, no penalty.

Compression is Z of the whole model (eq. 11); accuracy is the mean over seeds (min, max).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ttmanifold.nn import compression_z, convert_model, spectral_penalty  # noqa: E402

RECIPES = {
    "paper": dict(kw=dict(spectrum="lipschitz", init="near_identity"), sttp=dict(
        tensorization="reference"), penalty=1.0),
    "earlier": dict(kw=dict(spectrum="learned", init="orthogonal"), sttp=dict(
        tensorization="section8"), penalty=0.0),
}


def data(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=seed, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    return f(Xtr), torch.tensor(ytr), f(Xte), torch.tensor(yte)


def model_for(method, rank, recipe, seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                      nn.Linear(256, 10))
    if method != "dense":
        r = RECIPES[recipe]
        kw = dict(r["kw"], **(r["sttp"] if method == "sttp" else {}))
        convert_model(m, rank, method=method, names=["0", "2"], **kw)
    return m


def fit(m, X, y, steps, penalty):
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(m(X), y)
        if penalty:
            loss = loss + penalty * spectral_penalty(m)
        loss.backward()
        opt.step()
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps = 60 if args.quick else 300
    ranks = (2, 8) if args.quick else (2, 4, 8, 16)
    t0 = time.time()
    rows = []
    sets = [data(s) for s in range(args.seeds)]
    dense = []
    for s, (X, y, Xe, ye) in enumerate(sets):
        m = fit(model_for("dense", 0, None, s), X, y, steps, 0.0)
        with torch.no_grad():
            dense.append((m(Xe).argmax(1) == ye).float().mean().item())
    rows.append(("dense", "-", "-", 100.0, dense))
    for method in ("sttp", "svdp"):
        for recipe in RECIPES:
            for r in ranks:
                accs, z = [], None
                for s, (X, y, Xe, ye) in enumerate(sets):
                    m = model_for(method, r, recipe, s)
                    z = compression_z(m)
                    fit(m, X, y, steps, RECIPES[recipe]["penalty"])
                    with torch.no_grad():
                        accs.append((m(Xe).argmax(1) == ye).float().mean().item())
                rows.append((method.upper(), recipe, r, z, accs))
    print(f"digits, MLP 64-256-256-10, hidden layers converted, {steps} Adam steps, "
          f"{args.seeds} seeds, {time.time() - t0:.0f} s\n")
    print("| method | recipe | rank | Z % | test accuracy mean [min, max] |")
    print("| --- | --- | ---: | ---: | --- |")
    for meth, rec, r, z, a in rows:
        print(f"| {meth} | {rec} | {r} | {z:.2f} | {statistics.mean(a):.3f} "
              f"[{min(a):.3f}, {max(a):.3f}] |")


if __name__ == "__main__":
    main()
