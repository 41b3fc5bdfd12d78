# %% [markdown]
# # STTP and SVDP layers in a small classifier
#
# **Purpose.** This notebook replaces the hidden layers of a small multilayer perceptron by
# spectral low-rank layers from `ttmanifold.nn` and measures test accuracy against
# compression, a toy-scale version of the accuracy-versus-compression comparison of
# Obukhov et al. (AISTATS 2021, Fig. 7):
#
# * **STTP** (`STTPLinear`): the weight is a tensor train in the STTP chart
#   (`03_sttp_chart.ipynb`), trained either **through the chart** (plain `torch.optim.Adam` on
#   $\theta$, `param="chart"`) or **on the manifold** of fixed TT-rank (geoopt's
#   `RiemannianAdam` on the TT point, `param="manifold"`);
# * **SVDP** (`SVDPLinear`): the rank-$r$ compact SVD $U\,\mathrm{diag}(s)\,V^\top$ with
#   Householder frames, the matrix baseline;
# * the **dense** network as the reference.
#
# Data: scikit-learn's bundled `digits` ($8 \times 8$ images, 10 classes, 1797 samples; no
# download), standardized, with a fixed stratified train/test split. The full run trains
# over a hundred small networks on a CPU in a few minutes (1.6 to 3.3 minutes on a 2-core
# machine in the runs made for this notebook, depending on its load; the last code cell
# prints how long this run took), so the model is tiny and the conclusions are toy-scale
# (see the summary).
#
# Set the environment variable `TTMANIFOLD_NB_QUICK=1` to run with fewer ranks and epochs
# (the test suite does); the committed outputs come from the full run.

# %%
# %matplotlib inline
import copy
import math
import os
import time
import warnings

import geoopt
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import ttmanifold as tm
from ttmanifold.nn import (SVDPLinear, STTPLinear, compression_ratio, factorize, replace_layers,
                           sttp_dof, svdp_dof)

QUICK = os.environ.get("TTMANIFOLD_NB_QUICK") == "1"
NB_START = time.perf_counter()  # the last cell prints how long the whole run took

torch.manual_seed(0)
torch.set_default_dtype(torch.float32)  # ordinary single-precision training
torch.set_num_threads(1)  # small kernels: one thread is fastest and reproducible
plt.rcParams["figure.dpi"] = 100

RANKS = [2, 8] if QUICK else [1, 2, 4, 8, 16, 32]
EPOCHS = 4 if QUICK else 30
SEEDS = [0] if QUICK else [0, 1, 2]  # each seed: initialization and mini-batch order
BATCH = 128
print(f"ttmanifold {tm.__version__}, geoopt {geoopt.__version__}, quick mode: {QUICK}")
print(f"ranks {RANKS}, {EPOCHS} epochs, batch size {BATCH}, seeds {SEEDS}")

# %% [markdown]
# ## 1. Data
#
# 70 % of the samples for training and 30 % for testing (stratified, `random_state=0`); the
# features are standardized with the training statistics. For choosing learning rates
# (section 3) the training part is split once more into 80 % fitting / 20 % validation, so
# the test set is used only for the final numbers.

# %%
X_all, y_all = load_digits(return_X_y=True)
X_tr, X_te, y_tr, y_te = train_test_split(X_all, y_all, test_size=0.3, random_state=0, stratify=y_all)
X_fit, X_val, y_fit, y_val = train_test_split(X_tr, y_tr, test_size=0.2, random_state=0, stratify=y_tr)


def standardize(train, *others):
    mu, sd = train.mean(0), train.std(0)
    sd[sd == 0] = 1.0  # constant pixels (always 0 at the border)
    return [torch.tensor((a - mu) / sd, dtype=torch.float32) for a in (train,) + others]


Xtr, Xte = standardize(X_tr, X_te)
Xfit, Xval = standardize(X_fit, X_val)
ytr, yte, yfit, yval = (torch.tensor(v) for v in (y_tr, y_te, y_fit, y_val))
print(f"train {tuple(Xtr.shape)}, test {tuple(Xte.shape)}  (fit {tuple(Xfit.shape)}, validation {tuple(Xval.shape)})")
print("test class counts:", torch.bincount(yte).tolist())


# %% [markdown]
# ## 2. The model and its compressed variants
#
# An MLP $64 \to 256 \to 256 \to 10$ with ReLUs (85,002 parameters). We compress the two
# hidden layers (`"0"`: $256 \times 64$ and `"2"`: $256 \times 256$, 97 % of the weights) and
# keep the $10 \times 256$ classifier dense (its rank is at most 10 anyway).
# `replace_layers(model, rank, names=..., method=...)` swaps the `nn.Linear` modules in place
# and initializes each new layer from the current weight (TT-SVD or truncated SVD); applied
# to a freshly initialized network this is a random start, i.e. training from scratch.
#
# STTP tensorizes $W$ ($d_\text{out} \times d_\text{in}$) into modes of size 4
# (`factorize(n, max_factor=4)`: $256 = 4^4$, $64 = 4^3$), output modes first, input modes
# reversed, with TT-ranks $R_k = \min(r, R_k^{\max})$ and the spectrum between output and
# input modes, so that $s$ are the singular values of $W$ itself. The same rank $r$ thus
# means a rank-$r$ matrix for both methods, but STTP spends far fewer parameters on it.

# %%
def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10))


COMPRESSED = ["0", "2"]


def compressed_mlp(method, rank, param="chart", seed=0):
    # a fresh MLP whose hidden layers are replaced by STTP (modes of size 4) or SVDP layers
    model = mlp(seed)
    for name in COMPRESSED:
        lin = model.get_submodule(name)
        if method == "sttp":
            replace_layers(model, rank, names=[name], method="sttp", param=param,
                           out_modes=factorize(lin.out_features, max_factor=4),
                           in_modes=factorize(lin.in_features, max_factor=4))
        else:
            replace_layers(model, rank, names=[name], method="svdp")
    return model


dense_model = mlp()
print(dense_model)
print("dense parameters:", sum(p.numel() for p in dense_model.parameters()))
example = compressed_mlp("sttp", 8)
print("\nrank 8, STTP:", example[2])
cr = compression_ratio(example)
print("compression ratios:", {k: round(v, 1) for k, v in cr["layers"].items()},
      f"; both layers {cr['replaced']:.1f}; whole model {cr['model']:.2f} ({cr['params']} parameters)")

print(f"\n{'rank':>4s} | {'SVDP 256x64':>11s} {'SVDP 256x256':>12s} | {'STTP 256x64':>11s} {'STTP 256x256':>12s} | {'dense':>6s}")
for r in [1, 2, 4, 8, 16, 32]:
    print(f"{r:4d} | {svdp_dof(256, 64, r):11d} {svdp_dof(256, 256, r):12d} | "
          f"{sttp_dof((4,) * 4, (4,) * 3, r):11d} {sttp_dof((4,) * 4, (4,) * 4, r):12d} | {256 * 64 + 256 * 256:6d}")


# %% [markdown]
# ## 3. Training, and choosing the learning rates
#
# Mini-batch training (batch 128, cross-entropy) for a fixed number of epochs, the same data
# order for every model. Chart-mode layers, SVDP and the dense network use `torch.optim.Adam`.
# Manifold-mode layers use `geoopt.optim.RiemannianAdam` (the biases and the dense head are
# ordinary parameters inside the same optimizer).
#
# The learning rates are **not** interchangeable between the routes. Adam normalizes each
# coordinate of $\theta$ separately, so a step moves every Householder parameter by about
# `lr`. `RiemannianAdam` on `FixedTTRank` normalizes the whole tangent vector by one second
# moment (see `02_fixed_rank_manifold.ipynb`, section 6), so a step has norm about `lr` in
# the tangent space, which is measured in the units of the weight itself
# ($\|W\|_F \approx 9$ here). We therefore pick each route's learning rate on the validation
# split (mean over the seeds), at rank 8 (and the dense network's as well), and keep it for
# all ranks. With 252 validation images the differences between candidates are often
# within noise; the sweep guards against a badly wrong scale, not more.

# %%
def train(model, route, lr, X, y, epochs=EPOCHS, seed=0):
    # route: "adam" (torch.optim.Adam on every parameter) or "riemannian"
    if route == "riemannian":
        points = [p for p in model.parameters() if isinstance(p, geoopt.ManifoldParameter)]
        others = [p for p in model.parameters() if not isinstance(p, geoopt.ManifoldParameter)]
        opt = geoopt.optim.RiemannianAdam([dict(params=points, lr=lr),
                                           dict(params=others, lr=LR_EUCLID)])
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        total = 0.0
        for i in range(0, len(X), BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(X))
    return losses


@torch.no_grad()
def accuracy(model, X, y):
    return float((model(X).argmax(1) == y).float().mean())


LR_EUCLID = 3e-3  # biases and dense head inside RiemannianAdam (the Adam default scale)
variants = {  # name: (build(rank, seed), route, candidate learning rates)
    "dense": (lambda r, seed: mlp(seed), "adam", [1e-3, 3e-3, 1e-2, 3e-2]),
    "SVDP (Adam)": (lambda r, seed: compressed_mlp("svdp", r, seed=seed), "adam", [1e-3, 3e-3, 1e-2, 3e-2]),
    "STTP chart (Adam)": (lambda r, seed: compressed_mlp("sttp", r, seed=seed), "adam", [1e-3, 3e-3, 1e-2, 3e-2]),
    "STTP manifold (RiemannianAdam)": (lambda r, seed: compressed_mlp("sttp", r, param="manifold", seed=seed),
                                       "riemannian", [3e-3, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]),
}
best_lr = {}
t0 = time.perf_counter()
for name, (build, route, lrs) in variants.items():
    val = {}
    for lr in lrs:
        accs = []
        for seed in SEEDS:
            model = build(8, seed)
            train(model, route, lr, Xfit, yfit, seed=seed)
            accs.append(accuracy(model, Xval, yval))
        val[lr] = sum(accs) / len(accs)
    best_lr[name] = max(lrs, key=lambda lr: val[lr])
    print(f"{name:31s} validation accuracy " + "  ".join(f"lr={lr:g}: {a:.3f}" for lr, a in val.items())
          + f"   -> lr = {best_lr[name]:g}")
print(f"({time.perf_counter() - t0:.0f} s)")

# %% [markdown]
# The Euclidean routes agree on a learning rate of about $10^{-2}$. The manifold route needs
# a learning rate about two orders of magnitude larger: at the chart's scale
# ($3\cdot10^{-3}$) it hardly trains, while its validation accuracy is flat over a wide range
# (about $0.1$ to $3$), so the choice within that range is noise.

# %% [markdown]
# ## 4. Accuracy against compression
#
# Each variant is trained from scratch on the full training split with its chosen learning
# rate, for every rank and every seed (points: mean over the seeds; error bars: min and max).
# The compression ratio is (dense parameters) / (parameters) of the
# **two compressed layers** (weights and biases; `compression_ratio(model)["replaced"]`).
# For the manifold route the layer stores the TT cores (`manifold.size` numbers, redundant
# by the gauge) while training, but the trained weight is the same kind of object as in the
# chart route and `to_chart()` stores it in `chart.dim` numbers (section 5), so both STTP
# routes share the chart's compression ratio; the table lists both counts.

# %%
dense_runs = []
t0 = time.perf_counter()
for seed in SEEDS:
    dense = mlp(seed)
    losses = train(dense, "adam", best_lr["dense"], Xtr, ytr, seed=seed)
    dense_runs.append(dict(acc=accuracy(dense, Xte, yte), train_acc=accuracy(dense, Xtr, ytr), losses=losses))
dense_accs = [r["acc"] for r in dense_runs]
dense_acc = sum(dense_accs) / len(dense_accs)
print(f"dense: test accuracy {dense_acc:.4f} (seeds: {', '.join(f'{a:.4f}' for a in dense_accs)}),"
      f" train accuracy >= {min(r['train_acc'] for r in dense_runs):.4f} ({time.perf_counter() - t0:.1f} s)\n")

runs = []  # one dict per (variant, rank, seed)
trained = {}  # (variant, rank) -> the model of the first seed
for rank in RANKS:
    for name, (build, route, _) in variants.items():
        if name == "dense":
            continue
        for seed in SEEDS:
            model = build(rank, seed)
            stored = compression_ratio(model)["replaced"]
            t0 = time.perf_counter()
            losses = train(model, route, best_lr[name], Xtr, ytr, seed=seed)
            seconds = time.perf_counter() - t0
            if route == "riemannian":  # the same weights in chart form: chart.dim numbers per layer
                chart_form = copy.deepcopy(model)
                for n in COMPRESSED:
                    chart_form.get_submodule(n).to_chart()
                ratio = compression_ratio(chart_form)["replaced"]
            else:
                ratio = stored
            runs.append(dict(variant=name, rank=rank, seed=seed, ratio=ratio, ratio_stored=stored,
                             acc=accuracy(model, Xte, yte), train_acc=accuracy(model, Xtr, ytr),
                             seconds=seconds, losses=losses))
            trained.setdefault((name, rank), model)

# aggregate over the seeds
results = []
print(f"{'variant':31s} {'rank':>4s} {'ratio':>7s} {'stored':>7s} {'test acc: mean (min-max)':>25s} "
      f"{'train acc':>9s} {'s/run':>6s}")
for rank in RANKS:
    for name in list(variants)[1:]:
        rs = [r for r in runs if r["variant"] == name and r["rank"] == rank]
        accs = [r["acc"] for r in rs]
        row = dict(variant=name, rank=rank, ratio=rs[0]["ratio"], ratio_stored=rs[0]["ratio_stored"],
                   acc=sum(accs) / len(accs), lo=min(accs), hi=max(accs),
                   train_acc=sum(r["train_acc"] for r in rs) / len(rs),
                   seconds=sum(r["seconds"] for r in rs) / len(rs))
        results.append(row)
        print(f"{name:31s} {rank:4d} {row['ratio']:7.1f} {row['ratio_stored']:7.1f} "
              f"{row['acc']:11.4f} ({row['lo']:.3f}-{row['hi']:.3f}) {row['train_acc']:9.4f} {row['seconds']:5.1f}s")

# %%
styles = {"SVDP (Adam)": dict(marker="s", color="C0"),
          "STTP chart (Adam)": dict(marker="o", color="C3"),
          "STTP manifold (RiemannianAdam)": dict(marker="^", color="C2", ls="--")}
fig, axs = plt.subplots(1, 2, figsize=(12, 4.8))
for name, st in styles.items():
    rows = [r for r in results if r["variant"] == name]
    ys = np.array([r["acc"] for r in rows])
    err = np.array([[r["acc"] - r["lo"] for r in rows], [r["hi"] - r["acc"] for r in rows]])
    for ax, xs in ((axs[0], [r["ratio"] for r in rows]), (axs[1], [r["rank"] for r in rows])):
        ax.errorbar(xs, ys, yerr=err, label=name, capsize=3, ms=6, **st)
    if "manifold" not in name:  # rank labels (the manifold points share the chart's ratios)
        for r in rows:
            axs[0].annotate(f"r={r['rank']}", (r["ratio"], r["acc"]), textcoords="offset points",
                            xytext=(5, -12) if name.startswith("SVDP") else (5, 5), fontsize=8, color=st["color"])
for ax in axs:
    ax.axhline(dense_acc, color="k", lw=1, label=f"dense ({dense_acc:.3f})")
    ax.axhspan(min(dense_accs), max(dense_accs), color="k", alpha=0.1, label="dense, min-max over seeds")
    ax.set_ylabel("test accuracy")
    ax.grid(True, which="both", alpha=0.3)
axs[0].set_xscale("log")
axs[0].set_xlabel("compression ratio of the two hidden layers (dense params / params, log)")
axs[0].set_title("Accuracy against compression (digits, MLP 64-256-256-10)")
axs[1].set_xscale("log", base=2)
axs[1].set_xlabel("rank r")
axs[1].set_title("The same runs against the rank")
axs[0].legend(fontsize=8, loc="lower left")
fig.tight_layout()
plt.show()

# %% [markdown]
# The comparisons the summary quotes, computed from the table above: compression-matched
# pairs (for each STTP rank, the SVDP rank with the nearest compression ratio), the
# compression up to which each variant stays within two percentage points of the dense
# network, and chart against manifold at each rank.

# %%
by = {(r["variant"], r["rank"]): r for r in results}
SV, CH, MF = "SVDP (Adam)", "STTP chart (Adam)", "STTP manifold (RiemannianAdam)"
print("weight parameters of the two layers, SVDP / STTP at equal rank: " + ", ".join(
    f"r={r}: {(svdp_dof(256, 64, r) + svdp_dof(256, 256, r)) / (sttp_dof((4,) * 4, (4,) * 3, r) + sttp_dof((4,) * 4, (4,) * 4, r)):.1f}x"
    for r in RANKS))
print(f"\ncompression-matched pairs (dense network: {dense_acc:.3f})")
for r in RANKS:
    st = by[(CH, r)]
    sv = min((by[(SV, q)] for q in RANKS), key=lambda row: abs(math.log(row["ratio"] / st["ratio"])))
    print(f"    STTP chart r={r:<2d} {st['ratio']:6.1f}x: {st['acc']:.3f}    "
          f"SVDP r={sv['rank']:<2d} {sv['ratio']:6.1f}x: {sv['acc']:.3f}")
print("\nlargest compression up to which every point is within 0.02 of the dense accuracy")
for name in (SV, CH, MF):
    rows = sorted((r for r in results if r["variant"] == name), key=lambda row: row["ratio"])
    ok = 0.0
    for row in rows:
        if row["acc"] < dense_acc - 0.02:
            break
        ok = row["ratio"]
    print(f"    {name:31s} {ok:6.1f}x" if ok else f"    {name:31s} none")
print("\nchart against manifold, per rank: test accuracy (chart - manifold), time per run (manifold / chart)")
for r in RANKS:
    c, m = by[(CH, r)], by[(MF, r)]
    print(f"    r={r:<2d} {c['acc']:.3f} - {m['acc']:.3f} = {c['acc'] - m['acc']:+.3f}    "
          f"{m['seconds'] / c['seconds']:.1f}x")

# %% [markdown]
# ## 5. Chart and manifold: the same layers, two ways to train them
#
# A layer trained on the manifold converts to chart form (`to_chart()`, the inverse chart of
# section 4 of `03_sttp_chart.ipynb`) without changing its function, and back
# (`to_manifold()`). The trained point is a valid point of `FixedTTRank` (checked by the
# manifold itself), and the spectrum of the layer is the singular values of its weight
# matrix.

# %%
r_show = 8
model = copy.deepcopy(trained[("STTP manifold (RiemannianAdam)", r_show)])
layer = model.get_submodule("2")
print(layer)
print("point on the manifold:", layer.manifold.check_point_on_manifold(layer.point.detach()))
with torch.no_grad():
    logits_manifold = model(Xte)
    W_manifold = layer.weight.clone()
    before = layer.num_weight_params()
    for n in COMPRESSED:
        model.get_submodule(n).to_chart()
    after = layer.num_weight_params()
    print(f"to_chart(): stored numbers {before} -> {after} (= chart.dim {layer.chart.dim}); "
          f"max |change of the logits| {float((model(Xte) - logits_manifold).abs().max()):.1e}")
    print("singular values of W (dense SVD):", [round(v, 3) for v in torch.linalg.svdvals(layer.weight)[:r_show].tolist()])
    print("|layer.singular_values()|       :", [round(v, 3) for v in layer.singular_values().abs().sort(descending=True).values.tolist()])

fig, ax = plt.subplots(figsize=(6, 3.6))
for name, st in styles.items():
    row = next(r for r in runs if r["variant"] == name and r["rank"] == r_show and r["seed"] == SEEDS[0])
    ax.semilogy(row["losses"], color=st["color"], ls=st.get("ls", "-"), label=name)
ax.semilogy(dense_runs[0]["losses"], color="k", lw=1, label="dense")
ax.set_xlabel("epoch")
ax.set_ylabel("training loss (epoch mean)")
ax.set_title(f"Training curves at rank {r_show} (seed {SEEDS[0]})")
ax.grid(True, alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
print(f"this run of the notebook took {(time.perf_counter() - NB_START) / 60:.1f} min "
      f"({'quick' if QUICK else 'full'} mode, {torch.get_num_threads()} torch thread)")

# %% [markdown]
# ## Summary
#
# Numbers from the committed full run (3 seeds, 540 test images; differences of about one
# percentage point are within the seed-to-seed spread); the comparisons are the ones printed
# at the end of section 4.
#
# * **Parameters per rank.** An STTP weight of rank $r$ is a rank-$r$ matrix like the SVDP one,
#   but its frames are themselves tensor trains: the two hidden layers' weights need from
#   17.7$\times$ (rank 1) down to 1.6$\times$ (rank 32) fewer parameters than SVDP at the same rank.
# * **Accuracy against compression** (left plot, the shape of the paper's Fig. 7 at toy
#   scale): the STTP curves lie to the right of the SVDP curve. At about 37$\times$ compression
#   of the two layers STTP (rank 8) reaches 0.948 test accuracy against 0.741 for SVDP
#   (rank 2, 38$\times$); at about 12$\times$, 0.969 (STTP rank 16) against 0.958 (SVDP rank 8),
#   with the dense network at 0.965. Trained through the chart, STTP stays within two points
#   of the dense network up to 36.8$\times$, SVDP up to 11.7$\times$.
# * **Accuracy against rank** (right plot): at equal rank SVDP is as good or better (e.g. rank
#   2: 0.741 against 0.653 and 0.667; the one exception is the manifold route at rank 32,
#   0.1 point ahead). The TT structure of the frames is a real restriction; it pays
#   off per parameter, not per rank. Below rank 4 every variant loses accuracy sharply.
# * **Chart versus manifold.** Both routes train the same family of weights and end within
#   two points of each other at every rank: the manifold route is ahead at ranks 2, 4, 8
#   and 32, the chart route at ranks 1 and 16, by 0.2 to 1.9 points, mostly within the
#   seed-to-seed spread. On this problem the manifold route brings no clear accuracy gain.
#   Its steps do more work (retraction, transported momentum); the printed time ratios are
#   single measurements on a shared CPU. Its learning rate lives in the units of the
#   weight: at the chart's scale (3e-3) it reaches 0.72 validation accuracy, while anything
#   from 0.1 to 3 gives about 0.93 to 0.94. During training it stores the gauge-redundant
#   TT cores (e.g. 28.6$\times$ instead of 36.8$\times$ at rank 8); `to_chart()` converts the
#   trained layer to the compact chart form with outputs unchanged to $\sim10^{-4}$
#   (float32). Its numbers depend on which implementation computed its sweeps (the compiled
#   CPU kernels or torch: float32 rounding differs and training amplifies it).
#   `nbtools.py` builds the kernels before a full run, so one implementation serves the
#   whole run and the run repeats exactly; runs started with a cold kernel cache switch
#   when the background build finishes, and theirs differed from these by up to about 4
#   points (rank 1).
# * **Limits.** A 1797-sample dataset and a three-layer MLP, while the paper's experiments
#   are convolutional networks and GANs; learning rates chosen at rank 8 only; fixed training
#   length; modes of size 4 rather than prime factors. The qualitative ordering in the left
#   plot is what these runs support, not the precise gaps.
