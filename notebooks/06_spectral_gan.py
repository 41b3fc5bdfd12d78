# %% [markdown]
# # A spectrally constrained discriminator in a toy GAN
#
# **Purpose.** Obukhov et al. (AISTATS 2021) report that GAN discriminators built from STTP
# layers with a normalized spectrum train stably, like spectrally normalized ones. This
# notebook tests that claim at toy scale, on one CPU thread: a small GAN learns a 2-D
# mixture of 8 Gaussians, with the same generator and three discriminators that differ only
# in their layers:
#
# * **no constraint**: plain `nn.Linear` layers;
# * **spectral norm**: torch's `nn.utils.parametrizations.spectral_norm` on each layer
#   (the weight divided by a power-iteration estimate of its largest singular value);
# * **STTP "lipschitz"**: `ttmanifold.nn.STTPLinear(..., spectrum="lipschitz",
#   init="near_identity")`, the paper's "-L" setting: the weight is a tensor train whose
#   singular values are $s / \max|s|$, so every layer's spectral norm is exactly 1.
#
# Over training we count the **modes covered** and the **share of good samples**, for
# several seeds, and report what comes out whichever way it falls. The full run takes
# about 8 to 12 minutes on a shared 2-core machine (the last code cell prints how long this
# run took); set `TTMANIFOLD_NB_QUICK=1` for a short smoke run (the test suite does), which
# is too short to show anything about the claim. The committed outputs come from the full run.

# %%
# %matplotlib inline
import contextlib
import math
import os
import statistics
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ttmanifold as tm
from ttmanifold.nn import STTPLinear, batched_frames

QUICK = os.environ.get("TTMANIFOLD_NB_QUICK") == "1"
NB_START = time.perf_counter()  # the last code cell prints how long the whole run took

torch.set_default_dtype(torch.float32)
torch.set_num_threads(1)  # small networks: one thread is fastest and reproducible
plt.rcParams["figure.dpi"] = 100

G_STEPS = 100 if QUICK else 2500  # generator steps
EVERY = 25 if QUICK else 100  # evaluate the generator every EVERY generator steps
SEEDS = [0] if QUICK else [0, 1, 2]
D_STEPS = 5  # discriminator steps per generator step (the paper's GAN schedule)
BATCH = 256
print(f"ttmanifold {tm.__version__}, torch {torch.__version__}, quick mode: {QUICK}")
print(f"{G_STEPS} generator steps x {D_STEPS} discriminator steps, batch {BATCH}, seeds {SEEDS}")

# %% [markdown]
# ## 1. Data and metrics
#
# The target is 8 Gaussians of standard deviation 0.05 centred on a circle of radius 2.
# To score a generator we draw 2500 samples: a sample is **good** when it lies within 3
# standard deviations (0.15) of its nearest mode, and a mode is **covered** when at least
# 25 samples (1 %) are good samples of that mode. A perfect generator covers 8 modes with
# a good share of about 0.99; a collapsed one covers 1 or 2 modes, possibly with a high good
# share.

# %%
MODES = torch.tensor([[2 * math.cos(2 * math.pi * k / 8), 2 * math.sin(2 * math.pi * k / 8)]
                      for k in range(8)])
STD = 0.05
Z_DIM = 16


def sample_data(n, g):
    return MODES[torch.randint(0, 8, (n,), generator=g)] + STD * torch.randn(n, 2, generator=g)


@torch.no_grad()
def score(G, g, n=2500):
    return score_samples(G(torch.randn(n, Z_DIM, generator=g)))


def score_samples(x):
    n = len(x)
    dmin, nearest = torch.cdist(x, MODES).min(dim=1)
    good = dmin < 3 * STD
    counts = torch.bincount(nearest[good], minlength=8)
    return int((counts >= n // 100).sum()), float(good.float().mean())


print("2500 samples of the data itself: modes covered %d, good share %.3f"
      % score_samples(sample_data(2500, torch.Generator().manual_seed(0))))

# %% [markdown]
# ## 2. Networks and training
#
# Generator: MLP $16 \to 128 \to 128 \to 2$ (ReLU). Discriminator: MLP $2 \to 128 \to 128
# \to 1$ (ReLU) with one of the three layer types. The STTP layers use rank 16 and the
# library's default (the paper's) tensorization; with the ReLUs in between, the STTP
# discriminator is 1-Lipschitz by construction (every layer's spectral norm is exactly 1),
# the spectral-norm one approximately (one power iteration per forward pass). Hinge loss,
# Adam (lr $10^{-3}$, betas (0.5, 0.9)) for both networks, batch 256, and 5 discriminator steps per generator step, the schedule of the
# paper's GANs. Each discriminator step scores the real and the fake batch in one forward
# pass, and the STTP discriminator evaluates all its Householder frames of equal shape
# in one call (`batched_frames`), which makes its step about twice as fast; the loss is
# the same. A seed fixes the initial weights and every random draw, equally for the three
# variants.

# %%
def generator():
    return nn.Sequential(nn.Linear(Z_DIM, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))


def discriminator(kind):
    if kind == "STTP lipschitz":
        layer = lambda i, o: STTPLinear(i, o, rank=16, spectrum="lipschitz", init="near_identity")  # noqa: E731
    elif kind == "spectral norm":
        layer = lambda i, o: nn.utils.parametrizations.spectral_norm(nn.Linear(i, o))  # noqa: E731
    else:
        layer = nn.Linear
    return nn.Sequential(layer(2, 128), nn.ReLU(), layer(128, 128), nn.ReLU(), layer(128, 1))


KINDS = ["no constraint", "spectral norm", "STTP lipschitz"]
print(discriminator("STTP lipschitz"))
for kind in KINDS:
    print(f"{kind:15s} discriminator: {sum(p.numel() for p in discriminator(kind).parameters())} trainable numbers")


def train(kind, seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    G, D = generator(), discriminator(kind)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.9))
    # STTP: all frames of equal shape in one call (build the cores once per forward pass)
    batched = batched_frames if kind == "STTP lipschitz" else (lambda m: contextlib.nullcontext())
    trace = [(0,) + score(G, g)]
    for step in range(1, G_STEPS + 1):
        for _ in range(D_STEPS):
            real = sample_data(BATCH, g)
            with torch.no_grad():
                fake = G(torch.randn(BATCH, Z_DIM, generator=g))
            opt_d.zero_grad()
            with batched(D):
                out = D(torch.cat([real, fake]))
                loss_d = F.relu(1 - out[:BATCH]).mean() + F.relu(1 + out[BATCH:]).mean()
            loss_d.backward()
            opt_d.step()
        opt_g.zero_grad()
        with batched(D):
            loss_g = -D(G(torch.randn(BATCH, Z_DIM, generator=g))).mean()
        loss_g.backward()
        opt_g.step()
        if step % EVERY == 0:
            trace.append((step,) + score(G, g))
    return G, D, trace


runs = {}  # (kind, seed) -> (G, D, trace, seconds)
for kind in KINDS:
    for seed in SEEDS:
        t0 = time.perf_counter()
        G, D, trace = train(kind, seed)
        runs[(kind, seed)] = (G, D, trace, time.perf_counter() - t0)
    secs = statistics.mean(runs[(kind, s)][3] for s in SEEDS)
    print(f"{kind:15s}: {secs:5.1f} s per run; final (modes, good share) per seed: "
          + ", ".join(f"({runs[(kind, s)][2][-1][1]}, {runs[(kind, s)][2][-1][2]:.2f})" for s in SEEDS))

# %% [markdown]
# ## 3. Modes covered and good samples over training
#
# Lines: mean over the seeds; shaded: min to max.

# %%
steps = [t[0] for t in runs[(KINDS[0], SEEDS[0])][2]]
colors = {"no constraint": "C7", "spectral norm": "C0", "STTP lipschitz": "C3"}
fig, axs = plt.subplots(1, 2, figsize=(12, 4.2))
for kind in KINDS:
    for ax, j in ((axs[0], 1), (axs[1], 2)):
        v = np.array([[t[j] for t in runs[(kind, s)][2]] for s in SEEDS], dtype=float)
        ax.plot(steps, v.mean(0), color=colors[kind], label=kind)
        ax.fill_between(steps, v.min(0), v.max(0), color=colors[kind], alpha=0.15)
axs[0].set_ylabel("modes covered (of 8)")
axs[0].set_ylim(-0.2, 8.4)
axs[1].set_ylabel("share of good samples")
axs[1].set_ylim(0, 1)
for ax in axs:
    ax.set_xlabel("generator step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
fig.suptitle(f"8 Gaussians, {D_STEPS} discriminator steps per generator step, {len(SEEDS)} seed(s)")
fig.tight_layout()
plt.show()

marks = sorted(set(steps[::max(1, len(steps) // 6)]) | {steps[-1]})
print(f"{'step':>5s} | " + " | ".join(f"{k:>22s}" for k in KINDS))
print(f"{'':>5s} | " + " | ".join(f"{'modes [min,max]  good':>22s}" for _ in KINDS))
for i, st in enumerate(steps):
    if st not in marks:
        continue
    cells = []
    for kind in KINDS:
        m = [runs[(kind, s)][2][i][1] for s in SEEDS]
        gd = [runs[(kind, s)][2][i][2] for s in SEEDS]
        cells.append(f"{statistics.mean(m):4.1f} [{min(m)},{max(m)}]  {statistics.mean(gd):5.2f}")
    print(f"{st:5d} | " + " | ".join(f"{c:>22s}" for c in cells))

# %% [markdown]
# ## 4. Samples at the end of training
#
# 1000 samples of each generator after the last step (first seed), over the 8 modes
# (crosses), and the spectral norm of each discriminator layer (largest singular value of
# its weight matrix, dense SVD).

# %%
fig, axs = plt.subplots(1, len(KINDS), figsize=(12, 4), sharex=True, sharey=True)
g = torch.Generator().manual_seed(123)
z = torch.randn(1000, Z_DIM, generator=g)
for ax, kind in zip(axs, KINDS):
    G, D, trace, _ = runs[(kind, SEEDS[0])]
    with torch.no_grad():
        x = G(z)
    ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.4, color=colors[kind])
    ax.scatter(MODES[:, 0], MODES[:, 1], marker="x", color="k", s=40)
    ax.set_title(f"{kind}: {trace[-1][1]} modes, good {trace[-1][2]:.2f}", fontsize=10)
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
fig.suptitle(f"generator samples after {G_STEPS} steps (seed {SEEDS[0]})")
fig.tight_layout()
plt.show()

for kind in KINDS:
    D = runs[(kind, SEEDS[0])][1]
    with torch.no_grad():
        norms = [float(torch.linalg.matrix_norm(D[i].weight, ord=2)) for i in (0, 2, 4)]
    print(f"{kind:15s} discriminator, spectral norm of each layer's weight: "
          + ", ".join(f"{v:.3f}" for v in norms))
print(f"\nthis run of the notebook took {(time.perf_counter() - NB_START) / 60:.1f} min "
      f"({'quick' if QUICK else 'full'} mode, {torch.get_num_threads()} torch thread)")

# %% [markdown]
# ## Summary
#
# Numbers from the committed full run (3 seeds, 2500 generator steps with 5 discriminator
# steps each; 6.0 minutes, with other jobs on the machine), as printed
# in sections 2 and 3.
#
# * **No constraint: mode collapse.** With the paper's schedule of 5 discriminator steps per
#   generator step, the unconstrained discriminator drives the generator onto 1 or 2 modes
#   in every seed by step 400 and it stays there (1.7 modes on average, [1, 2], to the end):
#   a high share of good samples (0.97 at the end), all in those modes. Its layers' spectral
#   norms grow well above 1 (seed 0: 5.3, 10.0 and 2.8).
# * **Spectral norm: stable.** torch's spectral normalization covers 7 to 8 modes by step
#   800 and all 8 in every seed from step 1200 on, with the share of good samples rising
#   (with some dips) to 0.78 at step 2500.
# * **STTP "lipschitz": avoids the early collapse, but slower and not stable.** The STTP
#   discriminator (rank 16, 1-Lipschitz by construction, 2433 trainable numbers against
#   17025) covers hardly any mode until step 800 (0.3 on average), then climbs unevenly:
#   3.0 modes ([0, 7]) at step 1200, 4.0 ([1, 8]) at 2000 and 5.7 ([4, 8]) at 2400, and
#   falls back to 3.0 ([1, 6]) with a good share of 0.07 at step 2500: later than spectral
#   norm and not stable. Its good share stays well below spectral norm's throughout (at most
#   about 0.2 on average). The scatter plot of seed 0 shows why the metric is harsh on it
#   there: the samples spread along the whole circle, denser near six of the modes but
#   broader than the data, so that few samples lie within 0.15 of a mode.
# * **The claim at toy scale.** A norm-constrained discriminator does prevent the collapse
#   that the unconstrained one suffers in this setting, and the STTP "-L" discriminator
#   shares that much; it does **not** match torch's spectral normalization here, neither
#   in speed nor in the quality of the samples nor in stability late in training. We did
#   not tune anything for it (rank, learning rate, schedule are the same for all three),
#   and the cause is untested: its weights are rank-16 tensor trains with every layer's
#   spectral norm pinned to exactly 1 and only about a seventh of the parameters, so the
#   comparison mixes the constraint with a much smaller discriminator.
# * **Limits.** A 2-D toy with a 3-layer MLP discriminator, 3 seeds, one schedule and
#   one learning rate, and a sample-based metric with a sharp threshold (3 standard
#   deviations); the paper's claim is about convolutional GANs on images, which this does
#   not test. The quick mode (100 generator steps, 1 seed) only checks that the code runs.
