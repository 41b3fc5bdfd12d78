# %% [markdown]
# # Tensor trains with `ttmanifold`
#
# **Purpose.** This notebook introduces the tensor-train (TT) format as implemented by
# `ttmanifold.TT` and checks every claim numerically against a dense reference. It covers
#
# 1. building TTs: from explicit cores, at random, and from a dense tensor (TT-SVD);
# 2. TT-ranks and the *feasible* ranks a shape allows;
# 3. arithmetic, and how ranks add;
# 4. rounding with error control (`rel_eps`, `max_rank`), including a plot of the rounding
#    error against the rank for a function sampled on a grid, next to the
#    $\sqrt{d-1}\times$ best-error bound;
# 5. reading individual entries without forming the dense tensor;
# 6. left-, right- and mixed-orthogonal forms.
#
# A TT of shape $(n_1, \dots, n_d)$ and ranks $(r_0, \dots, r_d)$, $r_0 = r_d = 1$, stores
# $d$ cores $G_k$ of shape $(r_{k-1}, n_k, r_k)$, and
#
# $$X[i_1, \dots, i_d] = G_1[:, i_1, :]\, G_2[:, i_2, :] \cdots G_d[:, i_d, :],$$
#
# a product of small matrices: $\sum_k r_{k-1} n_k r_k$ numbers instead of $\prod_k n_k$.
# The formulas and their derivations (after Oseledets 2011) are in the repository's
# [`docs/tt_algebra.md`](../docs/tt_algebra.md).
#
# Set the environment variable `TTMANIFOLD_NB_QUICK=1` to run with reduced sizes (the test
# suite does); the committed outputs come from the full run.

# %%
# %matplotlib inline
import math
import os
import warnings

import matplotlib.pyplot as plt
import torch

import ttmanifold as tm
from ttmanifold import TT, IndexSet, feasible_ranks, inner, orthogonalize

QUICK = os.environ.get("TTMANIFOLD_NB_QUICK") == "1"

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # float64 so that checks can go down to ~1e-13
torch.set_num_threads(1)  # small kernels: one thread is fastest and reproducible
gen = torch.Generator().manual_seed(0)  # explicit generator for every random TT
plt.rcParams["figure.dpi"] = 100


def rel_err(a, b):
    # relative Frobenius error ||a - b|| / ||b|| of two dense tensors
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


print(f"ttmanifold {tm.__version__}, quick mode: {QUICK}")


# %% [markdown]
# ## 1. Building tensor trains
#
# **From cores.** The tensor $S[i_1, \dots, i_d] = i_1 + \dots + i_d$ has TT-rank 2:
# with the cores
#
# $$G_1[i] = \begin{pmatrix} i & 1 \end{pmatrix},\qquad
# G_k[i] = \begin{pmatrix} 1 & 0 \\ i & 1 \end{pmatrix},\qquad
# G_d[i] = \begin{pmatrix} 1 \\ i \end{pmatrix},$$
#
# the running product is $\begin{pmatrix} i_1 + \dots + i_k & 1\end{pmatrix}$. Cores are
# passed as a list of 3-D tensors of shape $(r_{k-1}, n_k, r_k)$.

# %%
def sum_tensor_tt(n, d):
    # the rank-2 TT of S[i] = i_1 + ... + i_d, built from explicit cores
    i = torch.arange(n, dtype=torch.float64)
    one = torch.ones(n)
    first = torch.stack([i, one], dim=-1).reshape(1, n, 2)
    middle = torch.zeros(2, n, 2)
    middle[0, :, 0] = 1.0
    middle[1, :, 0] = i
    middle[1, :, 1] = 1.0
    last = torch.stack([one, i], dim=0).reshape(2, n, 1)
    return TT([first] + [middle] * (d - 2) + [last])


n, d = 5, 4
S_tt = sum_tensor_tt(n, d)
grid = torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * d, indexing="ij")
S_dense = sum(grid)  # independent dense reference

print(S_tt)
print("core shapes:", [tuple(c.shape) for c in S_tt.cores])
print("max |S_tt.full() - S|:", float((S_tt.full() - S_dense).abs().max()))

# %% [markdown]
# **At random.** `TT.random(shape, ranks)` draws a TT of exactly the requested ranks: its
# first $d-1$ cores are random orthonormal frames and the result has unit norm, so it is well
# conditioned for any $d$. `ranks` is one int for all bonds, $d-1$ inner ranks, or all $d+1$
# ranks.

# %%
shape = (4, 5, 6, 7)
X = TT.random(shape, 3, generator=gen)
Y = TT.random(shape, [2, 4, 3], generator=gen)
print(X)
print(Y)
print("norms:", float(X.norm()), float(Y.norm()))
print(f"stored numbers: {X.num_params} instead of {math.prod(shape)} dense entries")

# %% [markdown]
# **From a dense tensor.** `TT.from_dense` is the TT-SVD: a left-to-right sweep of truncated
# SVDs of the unfoldings. Without any argument it is exact to rounding: it drops only the
# singular values at the level of rounding errors (a default `rel_eps` of a few hundred
# machine epsilons), so its ranks are the numerical ranks of the unfoldings, here the true
# rank 2 of $S$. A larger `rel_eps` trades accuracy for smaller ranks (section 4), and
# `tm.round` finds the exact ranks of a given TT, e.g. of a redundant sum (section 3).

# %%
S_exact = TT.from_dense(S_dense)
S_eps = TT.from_dense(S_dense, rel_eps=1e-12)
print("from_dense(S)              ranks", S_exact.ranks, " error", rel_err(S_exact.full(), S_dense))
print("from_dense(S, rel_eps=1e-12) ranks", S_eps.ranks, " error", rel_err(S_eps.full(), S_dense))
print("round(from_dense(S))       ranks", tm.round(S_exact).ranks)
assert S_exact.ranks == S_eps.ranks == (1, 2, 2, 2, 1)

# %% [markdown]
# ## 2. Ranks and feasible ranks
#
# The $k$-th TT-rank is the rank of the unfolding $X^{\langle k\rangle}$ of size
# $(n_1\cdots n_k) \times (n_{k+1}\cdots n_d)$, hence
# $r_k \le \min(n_1\cdots n_k,\; n_{k+1}\cdots n_d)$. `feasible_ranks(shape)` returns these
# bounds. A generic dense tensor attains them; functions taking a rank *request*
# (`TT.random`, `TT.zeros`, `TT.from_dense`, `tm.round`) clip larger requests with a warning.

# %%
small = (2, 3, 4, 5)
print("feasible_ranks", small, "=", feasible_ranks(small))
print("feasible_ranks (10,)*6 =", feasible_ranks((10,) * 6))

# a generic dense tensor attains the bound: compare with the ranks of its unfoldings
G = torch.randn(small, generator=gen)
unfolding_ranks = [int(torch.linalg.matrix_rank(G.reshape(math.prod(small[:k]), -1)))
                   for k in range(1, len(small))]
print("unfolding ranks of a Gaussian tensor:", unfolding_ranks)
print("its TT-SVD ranks:", TT.from_dense(G).ranks)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    Z = TT.random(small, 10, generator=gen)
print("TT.random(small, 10).ranks =", Z.ranks)
print("warning:", caught[0].message)

# %% [markdown]
# ## 3. Arithmetic: ranks add
#
# `x + y` and `x - y` stack the cores into block cores (first core $[G_1\; H_1]$, middle
# cores $\mathrm{diag}(G_k, H_k)$, last core $[G_d; H_d]$), so ranks add; scalar
# multiplication keeps them. The inner product $\langle x, y\rangle$ is computed by a sweep
# of small matrices. Sums are exact but their ranks may be redundant: rounding recovers the
# true ranks, e.g. $x + x = 2x$ has the ranks of $x$.

# %%
Z = 2.0 * X - Y / 3
print("ranks of X, Y, 2X - Y/3:", X.ranks, Y.ranks, Z.ranks)
print("error of 2X - Y/3 against the dense computation:", rel_err(Z.full(), 2 * X.full() - Y.full() / 3))
print("<X, Y>: TT", float(inner(X, Y)), " dense", float((X.full() * Y.full()).sum()))
print("ranks of X + X:", (X + X).ranks, "-> after rounding:", tm.round(X + X).ranks)
print("||X - X|| =", float((X - X).norm()))

# %% [markdown]
# ## 4. Rounding with error control
#
# `tm.round(x, ...)` (Oseledets 2011, Alg. 2) left-orthogonalizes $x$, then sweeps right to
# left with truncated SVDs. If the $k$-th truncation discards $\varepsilon_k$ (in Frobenius
# norm), then $\|x - \mathrm{round}(x)\|^2 \le \sum_k \varepsilon_k^2$. Hence:
#
# * **`rel_eps`**: each of the $d-1$ truncations discards at most
#   $\mathrm{rel\_eps}\,\|x\|/\sqrt{d-1}$, so $\|x - \mathrm{round}(x)\| \le \mathrm{rel\_eps}\,\|x\|$
#   with the smallest ranks each step allows;
# * **`max_rank` / `ranks`**: $\varepsilon_k$ is at most the best rank-$r_k$ error of the
#   $k$-th unfolding of $x$, which in turn is at most the best error $E_{\text{best}}$ of
#   *any* TT of ranks $\le r$. So the rounding is quasi-optimal:
#   $\|x - \mathrm{round}(x)\| \le \sqrt{\textstyle\sum_k \varepsilon_k^2} \le \sqrt{d-1}\, E_{\text{best}}$.
#
# Test tensors: two functions sampled on the uniform grid $x_j \in [0, 1]$ with $n$ points
# per axis, small enough to form densely for the reference,
#
# $$A[i_1,\dots,i_d] = \frac{1}{1 + x_{i_1} + \dots + x_{i_d}}, \qquad
# B[i_1,\dots,i_d] = e^{-\|(x_{i_1}, \dots, x_{i_d})\|_2}.$$

# %%
d_f, n_f = (5, 6) if QUICK else (6, 10)
x_grid = torch.linspace(0.0, 1.0, n_f)
axes = torch.meshgrid(*[x_grid] * d_f, indexing="ij")
functions = {
    "1 / (1 + x_1 + ... + x_d)": 1.0 / (1.0 + sum(axes)),
    "exp(-||x||)": torch.exp(-torch.sqrt(sum(a * a for a in axes))),
}
del axes

# near-exact TTs (TT-SVD to 1e-13): the inputs of the rounding experiments below
tts = {name: TT.from_dense(F, rel_eps=1e-13) for name, F in functions.items()}
for name, F in functions.items():
    T = tts[name]
    print(f"{name:28s} shape {tuple(F.shape)}  {F.numel():8d} entries  TT ranks {T.ranks}"
          f"  ({T.num_params} numbers)  error {rel_err(T.full(), F):.1e}")

# %% [markdown]
# **`rel_eps`**: the relative error never exceeds the requested accuracy, and the ranks grow
# as it tightens.

# %%
name = "1 / (1 + x_1 + ... + x_d)"
F, T = functions[name], tts[name]
print(f"{'rel_eps':>8s}  {'ranks':34s} {'relative error':>15s}")
for eps in [1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-8, 1e-10]:
    R = tm.round(T, rel_eps=eps)
    err = rel_err(R.full(), F)
    print(f"{eps:8.0e}  {str(R.ranks):34s} {err:15.2e}")
    assert err <= eps, (eps, err)  # the guarantee (the 1e-13 TT-SVD slack is negligible)

# %% [markdown]
# **`max_rank`**: we round each near-exact TT to every rank $r$ and compare with the dense
# reference. The best rank-$r$ errors $\varepsilon_k(r)$ of the unfoldings come from dense
# SVDs (independent of the code under test). The best TT error $E_{\text{best}}(r)$ has no
# closed form, but $\max_k \varepsilon_k(r) \le E_{\text{best}}(r)$, so the plot shows
#
# * the rounding error (markers);
# * the bound $\sqrt{\sum_k \varepsilon_k^2}$ it must satisfy (solid line);
# * $\sqrt{d-1}\,\max_k \varepsilon_k$ (dashed), a lower estimate of the $\sqrt{d-1}\,E_{\text{best}}$ bound;
# * $\max_k \varepsilon_k$ (dotted), a lower bound on the best possible error.
#
# All errors are relative to $\|F\|$.

# %%
rank_range = list(range(1, 7 if QUICK else 10))
results = {}
for name, F in functions.items():
    T, normF = tts[name], torch.linalg.vector_norm(F)
    sv = [torch.linalg.svdvals(F.reshape(math.prod(F.shape[:k]), -1)) for k in range(1, d_f)]
    rows = []
    for r in rank_range:
        R = tm.round(T, max_rank=r)
        err = rel_err(R.full(), F)
        eps_k = torch.stack([s[r:].square().sum().sqrt() for s in sv]) / normF
        rows.append((err, float(eps_k.norm()), float(eps_k.max())))
        # the quasi-optimality bound, up to the 1e-13 slack of the near-exact input TT
        assert err <= float(eps_k.norm()) * (1 + 1e-6) + 1e-12, (name, r)
    results[name] = rows

fig, axs = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
for ax, (name, rows) in zip(axs, results.items()):
    err, bound, best_lb = (torch.tensor(c) for c in zip(*rows))
    ax.semilogy(rank_range, err, "o", ms=7, label="round(X, max_rank=r)")
    ax.semilogy(rank_range, bound, "-", label=r"$\sqrt{\sum_k \varepsilon_k^2}$ (guaranteed bound)")
    ax.semilogy(rank_range, math.sqrt(d_f - 1) * best_lb, "--",
                label=r"$\sqrt{d-1}\,\max_k \varepsilon_k$  ($\leq \sqrt{d-1}\,E_{best}$)")
    ax.semilogy(rank_range, best_lb, ":", label=r"$\max_k \varepsilon_k$  ($\leq E_{best}$)")
    ax.set_title(f"{name},  d = {d_f}, n = {n_f}")
    ax.set_xlabel("max_rank r")
    ax.grid(True, which="major", alpha=0.3)
axs[0].set_ylabel("relative error")
axs[0].legend(fontsize=8)
fig.suptitle("TT rounding: error against rank, and the quasi-optimality bound")
fig.tight_layout()
plt.show()

for name, rows in results.items():
    ratio = max(e / lb for e, _, lb in rows)
    print(f"{name}: max over r of error / max_k eps_k = {ratio:.2f}  (sqrt(d-1) = {math.sqrt(d_f - 1):.2f})")

# %% [markdown]
# In practice the rounding error is much closer to the lower bound $\max_k\varepsilon_k$
# than the worst case $\sqrt{d-1}$ factor allows: TT rounding is nearly optimal on these
# smooth functions. Both ranks decay exponentially; the non-smooth $e^{-\|x\|}$ (a cusp at
# the origin) needs larger ranks for the same accuracy.
#
# ## 5. Reading entries
#
# `X.gather(indices)` returns the entries at $N$ multi-indices (an integer tensor of shape
# $(N, d)$) as $N$ products of $d$ small matrices: $O(N d r^2)$ work, the dense tensor is
# never formed. `IndexSet` does the same with the samples grouped per mode; build it once and
# reuse it when the same entries are read repeatedly (tensor completion).

# %%
name = "1 / (1 + x_1 + ... + x_d)"
F, T = functions[name], tts[name]
N = 1000
idx = torch.stack([torch.randint(n_f, (N,), generator=gen) for _ in range(d_f)], dim=1)
vals = T.gather(idx)
exact = 1.0 / (1.0 + x_grid[idx].sum(dim=1))  # the function itself, at the grid points
print("max |gather - entries of T.full()|:", float((vals - T.full()[tuple(idx.T)]).abs().max()))
print("max |gather - function values|   :", float((vals - exact).abs().max()),
      "(T is a TT-SVD to relative accuracy 1e-13)")
print("max |IndexSet.gather - gather|  :", float((IndexSet(idx, T.shape).gather(T) - vals).abs().max()))

# the dense tensor need not fit in memory: the sum tensor in d = 30 has 10^30 entries
S_big = sum_tensor_tt(10, 30)
idx_big = torch.randint(10, (5, 30), generator=gen)
print("\nS_big:", S_big)
print("entries      :", S_big.gather(idx_big).tolist())
print("index sums   :", idx_big.sum(dim=1).tolist())


# %% [markdown]
# ## 6. Orthogonal forms
#
# The TT representation is not unique: $G_k \to G_k A$, $G_{k+1} \to A^{-1} G_{k+1}$
# leaves $X$ unchanged (the *gauge*). `orthogonalize` fixes it by QR sweeps:
#
# * `side="left"`: cores $1..d-1$ left-orthogonal, $(G_k^L)^\top G_k^L = I$ with
#   $G_k^L$ the $(r_{k-1} n_k) \times r_k$ left unfolding; the norm sits in the last core;
# * `side="right"`: cores $2..d$ right-orthogonal, $G_k^R (G_k^R)^\top = I$ with $G_k^R$
#   the $r_{k-1} \times (n_k r_k)$ right unfolding; the norm sits in the first core;
# * `center=k` (0-based): left-orthogonal before $k$, right-orthogonal after; core $k$
#   carries the norm, $\|G_k\|_F = \|X\|$.
#
# The QR sign convention $\mathrm{diag}(R) \ge 0$ makes the result a deterministic function
# of the input, so re-orthogonalizing an orthogonal TT changes nothing. The QR steps also
# remove redundant ranks: a left sweep those with $r_k > r_{k-1} n_k$ (below, $r_1 = 5 > n_1 = 4$
# after a sum), a right sweep those with $r_{k-1} > n_k r_k$.

# %%
def left_defect(core):
    L = core.reshape(-1, core.shape[2])
    return float((L.T @ L - torch.eye(L.shape[1])).abs().max())


def right_defect(core):
    R = core.reshape(core.shape[0], -1)
    return float((R @ R.T - torch.eye(R.shape[0])).abs().max())


W = X + Y  # a sum: redundant ranks and no orthogonality
W_dense, W_norm = W.full(), float(W.norm())
print("W = X + Y:", W.ranks, "\n")
print(f"{'form':10s} {'ranks':18s} {'max left defect':>16s} {'max right defect':>17s} "
      f"{'|norm(core c) - norm(W)|':>25s} {'error':>9s}")
for label, kwargs, c in [("left", dict(side="left"), W.ndim - 1),
                         ("right", dict(side="right"), 0),
                         ("center=2", dict(center=2), 2)]:
    O = orthogonalize(W, **kwargs)
    cores = O.cores
    ld = max([left_defect(g) for g in cores[:c]], default=0.0)
    rd = max([right_defect(g) for g in cores[c + 1:]], default=0.0)
    core_norm = float(torch.linalg.vector_norm(cores[c]))
    print(f"{label:10s} {str(O.ranks):18s} {ld:16.1e} {rd:17.1e} {abs(core_norm - W_norm):25.1e} "
          f"{rel_err(O.full(), W_dense):9.1e}")
    assert ld < 1e-12 and rd < 1e-12 and abs(core_norm - W_norm) < 1e-12

WL = orthogonalize(W, "left")
again = orthogonalize(WL, "left")
print("\nre-orthogonalizing a left-orthogonal TT moves its cores by at most",
      max(float((a - b).abs().max()) for a, b in zip(WL.cores, again.cores)))
R = tm.round(W)
print("round(W) has cores 2..d right-orthogonal: max defect",
      max(right_defect(g) for g in R.cores[1:]))

# %% [markdown]
# ## Summary
#
# * A TT stores $d$ small cores; `TT(cores)`, `TT.random` and `TT.from_dense` build one, and
#   explicit cores can encode structure exactly (the sum tensor has rank 2 for any $d$,
#   so a tensor with $10^{30}$ entries is stored in 1160 numbers).
# * TT-ranks are bounded by `feasible_ranks(shape)`; a generic dense tensor attains the
#   bound, and larger requests are clipped with a warning.
# * `+` and `-` add ranks, scalars keep them; `inner` agrees with the dense inner product.
# * `tm.round` recovers exact ranks of redundant sums, meets `rel_eps` with
#   $\|x - \mathrm{round}(x)\| \le \mathrm{rel\_eps}\,\|x\|$ (checked for
#   $10^{-1}..10^{-10}$), and with `max_rank` stays below
#   $\sqrt{\sum_k\varepsilon_k^2} \le \sqrt{d-1}\,E_{\text{best}}$ — in practice within a
#   small factor of the lower bound $\max_k \varepsilon_k$ on the best error.
# * `gather` / `IndexSet.gather` read entries in $O(N d r^2)$ without forming the tensor.
# * `orthogonalize` produces left-, right- and mixed-orthogonal forms with orthogonality
#   defects at machine precision, the norm in the center core, and a deterministic result.
#
# Next: `02_fixed_rank_manifold.ipynb` treats the set of tensors of *fixed* TT-rank as a
# Riemannian manifold and optimizes on it.
