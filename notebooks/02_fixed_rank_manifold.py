# %% [markdown]
# # The manifold of fixed TT-rank
#
# **Purpose.** This notebook shows how `ttmanifold.FixedTTRank` turns the set
# $\mathcal M_r = \{X : \text{TT-rank}(X) = r\}$ into a Riemannian manifold usable with
# [geoopt](https://github.com/geoopt/geoopt), and checks each ingredient numerically on
# examples small enough for dense references:
#
# 1. the manifold and its dimension formula;
# 2. tangent vectors, their gauged-delta representation and their rank-$2r$ TT form;
# 3. the orthogonal projection of dense, TT and sparse ambient tensors onto a tangent space;
# 4. the retraction and its second-order accuracy;
# 5. the Riemannian gradient by automatic differentiation;
# 6. a geoopt `RiemannianAdam` loop fitting a rank-$r$ TT to a target tensor;
# 7. batches: many points in one tensor, computed point by point like a loop over them, one
#    optimizer for many independent fits, and what a batch saves.
#
# The formulas are in the repository's docs: [`docs/manifold.md`](../docs/manifold.md)
# (tangent space, gauge, projection, retraction, transport; Holtz, Rohwedder, Schneider
# 2012; Lubich, Oseledets, Vandereycken 2015; Steinlechner 2016) and
# [`docs/autodiff.md`](../docs/autodiff.md) (Riemannian automatic differentiation; Novikov,
# Rakhuba, Oseledets 2021); batches in [`docs/manifold.md#batches`](../docs/manifold.md#batches)
# and [`docs/tt_algebra.md#batches`](../docs/tt_algebra.md#batches).
#
# Set the environment variable `TTMANIFOLD_NB_QUICK=1` to run with reduced sizes (the test
# suite does); the committed outputs come from the full run.

# %%
# %matplotlib inline
import math
import os

import geoopt
import matplotlib.pyplot as plt
import torch

import ttmanifold as tm
from ttmanifold import TT, FixedTTRank, inner

QUICK = os.environ.get("TTMANIFOLD_NB_QUICK") == "1"

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # float64 so that checks can go down to ~1e-13
torch.set_num_threads(1)  # small kernels: one thread is fastest and reproducible
gen = torch.Generator().manual_seed(0)  # explicit generator for the random draws
plt.rcParams["figure.dpi"] = 100


def rel_err(a, b):
    # relative Euclidean error ||a - b|| / ||b||
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


print(f"ttmanifold {tm.__version__}, geoopt {geoopt.__version__}, quick mode: {QUICK}")

# %% [markdown]
# ## 1. The manifold and its dimension
#
# $\mathcal M_r$ is a smooth embedded submanifold of $\mathbb R^{n_1 \times \dots \times n_d}$
# of dimension
#
# $$\dim \mathcal M_r = \sum_{k=1}^{d} r_{k-1} n_k r_k - \sum_{k=1}^{d-1} r_k^2 :$$
#
# the number of core entries minus the $r_k \times r_k$ gauge freedom at each inner bond.
# For $d = 2$ this is the fixed-rank matrix manifold, $\dim = r(n_1 + n_2 - r)$. A point is
# stored (as geoopt expects) as **one flat tensor** packing left-orthogonal cores
# $U_1, \dots, U_d$ (`M.size` numbers). A tuple of ranks that no tensor of this shape can
# have is rejected (a single int rank is clipped to the feasible bound with a warning).

# %%
shape, ranks = (4, 5, 6, 5), (1, 3, 4, 3, 1)
M = FixedTTRank(shape, ranks)
d = len(shape)
by_hand = (sum(ranks[k] * shape[k] * ranks[k + 1] for k in range(d))
           - sum(r * r for r in ranks[1:-1]))
print(M)
print("dim by the formula:", by_hand, "   packed size M.size:", M.size)
print("d = 2, n = (7, 9), r = 3:  dim =", FixedTTRank((7, 9), 3).dim, "  r(n1 + n2 - r) =", 3 * (7 + 9 - 3))
try:
    FixedTTRank((2, 3, 4), (1, 5, 5, 1))
except ValueError as e:
    print("\nValueError:", e)

# %% [markdown]
# An independent check of the dimension: the tangent space at a point is the range of the
# Jacobian $J$ of the map (cores) $\mapsto$ (dense tensor), so $\operatorname{rank} J$ must
# equal $\dim\mathcal M_r$. We compute $J$ by autograd through a plain dense contraction of
# the cores (not the package's code) and read its numerical rank from its singular values. We
# keep its left singular vectors $Q$ (an orthonormal basis of the tangent space) for the
# projection check of section 3.

# %%
p = M.random(generator=gen)  # a random point (packed left-orthogonal cores)
sizes = [a * b * c for a, b, c in M.core_shapes]


def dense_from_packed(flat):
    cores = [c.reshape(s) for c, s in zip(torch.split(flat, sizes), M.core_shapes)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    # einsum over all cores: "aAb,bBc,cCd,dDe->aABCDe" for d = 4
    spec = ",".join(letters[k] + letters[k].upper() + letters[k + 1] for k in range(d))
    out = letters[0] + "".join(letters[k].upper() for k in range(d)) + letters[d]
    return torch.einsum(spec + "->" + out, *cores).reshape(-1)


J = torch.autograd.functional.jacobian(dense_from_packed, p)  # (prod(shape), M.size)
sv = torch.linalg.svdvals(J)
numerical_rank = int((sv > sv[0] * 1e-10).sum())
print(f"Jacobian {tuple(J.shape)}: numerical rank {numerical_rank}, M.dim = {M.dim}")
print(f"singular values around the gap: {sv[M.dim - 1]:.2e} (#{M.dim}) then {sv[M.dim]:.2e}")
assert numerical_rank == M.dim
Q = torch.linalg.svd(J, full_matrices=False)[0][:, :M.dim]  # orthonormal basis of T_X M
X_dense = M.to_tt(p).full()
print("to_tt(p) matches the dense contraction:", rel_err(X_dense.reshape(-1), dense_from_packed(p)))

# %% [markdown]
# ## 2. Tangent vectors
#
# With $U_k$ the left-orthogonal cores of $X$ and $V_k$ right-orthogonal cores of the same
# $X$, every tangent vector is
#
# $$\xi = \sum_{k=1}^d U_1 \cdots U_{k-1}\, \delta U_k\, V_{k+1} \cdots V_d ,$$
#
# and the **gauge conditions** $(U_k^L)^\top \delta U_k^L = 0$ ($k < d$) make the deltas
# unique. A tangent vector is stored as the flat tensor of its deltas (same size as a
# point); under the gauge the map is an isometry, so the Riemannian metric is the plain dot
# product of packed deltas. As a TT, $\xi$ has ranks $2r$ with block cores
# $[\delta U_1\; U_1]$, $\begin{pmatrix}V_k & 0\\ \delta U_k & U_k\end{pmatrix}$,
# $\begin{pmatrix}V_d\\ \delta U_d\end{pmatrix}$ (`M.tangent_to_tt`).
#
# `M.proju` applies the gauge projection, so `M.proju(p, noise)` is a random tangent vector.

# %%
xi = M.proju(p, torch.randn(M.size, generator=gen))
eta = M.proju(p, torch.randn(M.size, generator=gen))
xi_tt, eta_tt = M.tangent_to_tt(p, xi), M.tangent_to_tt(p, eta)
print("TT-ranks of X :", M.to_tt(p).ranks)
print("TT-ranks of xi:", xi_tt.ranks, "= 2r")

U = [c.reshape(-1, c.shape[2]) for c in M.to_tt(p).cores]
dU = [c.reshape(-1, c.shape[2]) for c in M.to_tt(xi).cores]  # same packing as a point
print("gauge conditions, max |U_k^T dU_k| over k < d:",
      max(float((u.T @ du).abs().max()) for u, du in zip(U[:-1], dU[:-1])))
print("isometry: ||xi|| dense", float(torch.linalg.vector_norm(xi_tt.full())),
      " packed", float(M.norm(p, xi)))
print("metric  : <xi, eta> dense", float((xi_tt.full() * eta_tt.full()).sum()),
      " packed", float(M.inner(p, xi, eta)))
# xi lies in the tangent space: it is its own projection onto the range of J
res = xi_tt.full().reshape(-1)
print("distance of xi to the range of J (relative):", rel_err(Q @ (Q.T @ res), res))

# %% [markdown]
# ## 3. Projection onto the tangent space
#
# `M.project(p, Z)` returns the gauged deltas of the orthogonal projection $P_X Z$ of an
# ambient tensor $Z$, given as
#
# * a **dense** tensor (reads all $\prod n_k$ entries),
# * a **TT** of rank $R$ ($O(d n r R (r + R))$, never dense; here $R = (4, 6, 4)$),
# * a **sparse** `torch.sparse_coo_tensor` with $N$ stored entries ($O(N d r^2)$, never
#   dense; the kernel of Riemannian tensor completion).
#
# The three must agree when they represent the same tensor, and match the independent
# projection $Q Q^\top \mathrm{vec}(Z)$ built from the Jacobian of section 1.

# %%
Z_tt = TT.random(shape, [4, 6, 4], generator=gen)
Z = Z_tt.full()
P_dense = M.project(p, Z)
P_tt = M.project(p, Z_tt)
print("TT vs dense projection          :", rel_err(P_tt, P_dense))
PZ = M.tangent_to_tt(p, P_dense).full().reshape(-1)
print("dense projection vs Q Q^T vec(Z):", rel_err(PZ, Q @ (Q.T @ Z.reshape(-1))))

# a sparse tensor: 150 distinct random entries of Z, zero elsewhere
flat = torch.randperm(Z.numel(), generator=gen)[:150]
idx = torch.stack(torch.unravel_index(flat, shape))  # (d, N)
Z_sparse = torch.sparse_coo_tensor(idx, Z[tuple(idx)], shape, check_invariants=True)
P_sparse = M.project(p, Z_sparse)
print("sparse vs dense projection      :", rel_err(P_sparse, M.project(p, Z_sparse.to_dense())))

# properties of an orthogonal projection: idempotent, residual orthogonal to the tangent space
print("P(P Z) = P Z                    :", rel_err(M.project(p, M.tangent_to_tt(p, P_dense)), P_dense))
residual = Z.reshape(-1) - PZ
print("<Z - P Z, xi> / (||Z|| ||xi||)  :",
      float(residual @ xi_tt.full().reshape(-1) / (Z.norm() * M.norm(p, xi))))

# %% [markdown]
# ## 4. Retraction
#
# A retraction maps a tangent step back onto the manifold. `M.retr(p, xi)` computes
# $R_X(\xi) = \mathrm{round}_r(X + \xi)$, the TT-SVD of the rank-$2r$ TT $X + \xi$, and
# returns a point again (left-orthogonal cores). It agrees with the straight line to second
# order,
#
# $$\|R_X(t\xi) - (X + t\xi)\| = O(t^2) \quad (t \to 0),$$
#
# which shows as slope 2 on a log-log plot.

# %%
X_tt = M.to_tt(p)
u = xi / M.norm(p, xi)  # unit tangent direction
u_dense = M.tangent_to_tt(p, u).full()
ts = torch.logspace(-5, 0, 6 if QUICK else 16)
errors = []
for t in ts:
    y = M.retr(p, t * u)
    errors.append(float(torch.linalg.vector_norm(M.to_tt(y).full() - (X_dense + t * u_dense))))
errors = torch.tensor(errors)

y = M.retr(p, u)
print("R_X(u) is a point: ranks", M.to_tt(y).ranks, " check_point:", M.check_point_on_manifold(y))
small_t = ts < 1e-2
slope = torch.diff(errors[small_t].log()) / torch.diff(ts[small_t].log())
print("log-log slopes for t < 1e-2:", [round(float(s), 3) for s in slope])
assert torch.allclose(slope, torch.full_like(slope, 2.0), atol=0.05)

fig, ax = plt.subplots(figsize=(6, 4.2))
ax.loglog(ts, errors, "o-", label=r"$\|R_X(t\xi) - (X + t\xi)\|$")
c = float(errors[0] / ts[0] ** 2)  # slope-2 line through the first point
ax.loglog(ts, c * ts ** 2, "k--", label=r"slope 2 reference $\propto t^2$")
ax.set_xlabel(r"step size $t$  ($\|\xi\| = 1$)")
ax.set_ylabel("distance")
ax.set_title("The TT-SVD retraction is second order")
ax.grid(True, which="major", alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## 5. Riemannian gradient by automatic differentiation
#
# For a function $f$ of the tensor, the Riemannian gradient is the projection of the
# Euclidean gradient onto the tangent space, $\operatorname{grad} f(X) = P_X \nabla f(X)$.
# `ttmanifold` gets it from **one** reverse pass without forming $\nabla f(X)$
# (Novikov, Rakhuba, Oseledets 2021): write the tangent TT
# $\sum_k U_{<k}\,\delta_k\,V_{>k}$, evaluate $f$ at $\delta = (0, \dots, 0, U_d)$ (where it
# equals $X$) and differentiate with respect to $\delta$. Two entry points:
#
# * `M.riemannian_grad(p, f)` for a function `f(TT) -> scalar`;
# * `M.unpack_tensor(p)` for `p` requiring grad (what an optimizer sees): after
#   `f(M.unpack_tensor(p)).backward()`, `p.grad` *is* the Riemannian gradient.
#
# We check both against the projection of the dense Euclidean gradient, for
# $f(X) = \tfrac12\|X - A\|^2 + \tfrac14 \sum X^4$, and check the directional derivative
# $\frac{d}{dt} f(R_X(t\xi))|_{t=0} = \langle \operatorname{grad} f, \xi\rangle$ by central
# differences.

# %%
A = torch.randn(shape, generator=gen)


def f_dense(T):  # f on a dense tensor
    return 0.5 * (T - A).square().sum() + 0.25 * T.pow(4).sum()


def f(x):  # the same f on a TT (here through its dense form; small example)
    return f_dense(x.full())


X_req = X_dense.clone().requires_grad_()
egrad, = torch.autograd.grad(f_dense(X_req), X_req)  # dense Euclidean gradient
g_dense = M.project(p, egrad)

g_auto = M.riemannian_grad(p, f)

q = p.clone().requires_grad_()
f(M.unpack_tensor(q)).backward()
g_unpack = q.grad

print("riemannian_grad   vs P_X(dense gradient):", rel_err(g_auto, g_dense))
print("unpack_tensor     vs P_X(dense gradient):", rel_err(g_unpack, g_dense))
h = 1e-5
fd = (f(M.to_tt(M.retr(p, h * u))) - f(M.to_tt(M.retr(p, -h * u)))) / (2 * h)
print(f"directional derivative: finite differences {float(fd):.8f},  <grad f, u> {float(M.inner(p, g_auto, u)):.8f}")
assert rel_err(g_auto, g_dense) < 1e-10 and rel_err(g_unpack, g_dense) < 1e-10

# %% [markdown]
# **What it costs.** `f` receives a `TangentTT`: the rank-$2r$ TT of the autodiff scheme,
# kept as its factors $U, V, \delta$. Operations that know the structure stay at rank $r$:
# `inner(X, X)` is the dot product of the packed deltas (the tangent map is an isometry) and
# `inner(X, A)` is one projection sweep, so a loss written with inner products costs about one
# tangent-space projection, plus the loss's other terms (here $\langle A, A\rangle$) and
# autograd's bookkeeping: a small multiple of `project` (the ratio is printed below). Any
# other operation sees the rank-$2r$ block cores. (On the CPU some of these sweeps can run
# in compiled kernels: [`docs/kernels.md`](../docs/kernels.md).) Below, the
# same loss $\tfrac12\|X - A\|^2$ at $d = 10$, $n = 20$, $r = 10$ three ways: with inner
# products, forced onto the block cores (`TT(x.cores)`), and the projection `M.project(p, A)`
# for scale (best of repeated calls on this machine, one thread, set above; the timings
# vary between runs and machines).

# %%
import time

Mb = FixedTTRank((20,) * 10, 10)
pb = Mb.random(dtype=torch.float64, generator=gen)
Ab = TT.random(Mb.shape, 10, dtype=torch.float64, generator=gen)


def loss(x):  # 0.5 ||X - A||^2 written with inner products
    return 0.5 * inner(x, x) - inner(x, Ab) + 0.5 * inner(Ab, Ab)


def loss_on_blocks(x):  # the same loss on the rank-2r block cores
    return loss(TT(x.cores))


def best_ms(fn, reps=20 if QUICK else 100):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


g_struct = Mb.riemannian_grad(pb, loss)
g_blocks = Mb.riemannian_grad(pb, loss_on_blocks)
print("same gradient:", rel_err(g_struct, g_blocks))
ms = {"riemannian_grad, inner products": best_ms(lambda: Mb.riemannian_grad(pb, loss)),
      "riemannian_grad, rank-2r cores": best_ms(lambda: Mb.riemannian_grad(pb, loss_on_blocks)),
      "project(p, A) for scale": best_ms(lambda: Mb.project(pb, Ab))}
for what, t in ms.items():
    print(f"{what:32s}: {t:.2f} ms  ({t / ms['project(p, A) for scale']:.1f} x project)")
assert rel_err(g_struct, g_blocks) < 1e-10

# %% [markdown]
# ## 6. Optimizing with geoopt
#
# A point of `FixedTTRank` is a `geoopt.ManifoldParameter`; any geoopt optimizer then
# performs Riemannian steps: Riemannian gradient (section 5), retraction (section 4) and
# vector transport of the momentum (projection onto the new tangent space).
#
# Problem: the best rank-$r$ approximation of a target $A$,
# $\min_{X \in \mathcal M_r} \tfrac12\|X - A\|^2$, where $A$ is a rank-$r$ "signal" plus a
# small rank-$2r$ perturbation. The loss is written with TT operations only
# ($\tfrac12\langle X - A, X - A\rangle$), so the dense tensor ($10^8$ entries in the full
# run) is never formed. The reference is TT-SVD rounding of $A$, which is quasi-optimal but
# not optimal: the optimizer can do slightly better.
#
# *Note on Adam's second moment.* `RiemannianAdam` normalizes its step by a running average
# of `M.component_inner(p, grad)` that, unlike the momentum, is not transported between
# tangent spaces. `FixedTTRank.component_inner` therefore returns one second moment for the
# whole tangent vector (gauge invariant), the Riemannian Adam of Bécigneul & Ganea (2019);
# per-core second moments would go stale as the split of a tangent vector among the cores
# changes with the point.

# %%
shape_opt, r_opt = ((6,) * 5, 3) if QUICK else ((10,) * 8, 4)
n_iter = 60 if QUICK else 300
gen_A = torch.Generator().manual_seed(1)
A_tt = TT.random(shape_opt, r_opt, generator=gen_A) + 0.1 * TT.random(shape_opt, 2 * r_opt, generator=gen_A)
norm_A = float(A_tt.norm())
ref = float((tm.round(A_tt, max_rank=r_opt) - A_tt).norm()) / norm_A

M_opt = FixedTTRank(shape_opt, r_opt)
print(M_opt, f"- the target has {math.prod(shape_opt):.0e} entries, TT-ranks {A_tt.ranks}")

torch.manual_seed(0)
p_opt = geoopt.ManifoldParameter(M_opt.random(), manifold=M_opt)
opt = geoopt.optim.RiemannianAdam([p_opt], lr=0.05)
history = []  # (relative error, ||Riemannian gradient||) per iteration
for it in range(n_iter):
    opt.zero_grad()
    D = p_opt.unpack_tensor() - A_tt
    loss = 0.5 * inner(D, D)
    loss.backward()  # p_opt.grad is now the Riemannian gradient
    history.append((math.sqrt(2 * loss.item()) / norm_A, float(p_opt.grad.norm())))
    opt.step()

with torch.no_grad():
    final = float((M_opt.to_tt(p_opt) - A_tt).norm()) / norm_A
print(f"relative error: start {history[0][0]:.4f}, after {n_iter} steps {final:.6f}")
print(f"TT-SVD rounding of A to rank {r_opt}: {ref:.6f}")
print("the iterate is still a point of the manifold:", M_opt.check_point_on_manifold(p_opt.detach()))
assert final < history[0][0]
if not QUICK:
    assert final <= ref * (1 + 1e-6)

err_hist, grad_hist = zip(*history)
fig, axs = plt.subplots(1, 2, figsize=(11, 4))
axs[0].semilogy(err_hist, label="RiemannianAdam")
axs[0].axhline(ref, color="k", ls="--", label="TT-SVD rounding of A")
axs[0].set_xlabel("iteration")
axs[0].set_ylabel(r"$\|X_t - A\| / \|A\|$")
axs[0].set_title("relative error")
axs[0].legend()
axs[1].semilogy(grad_hist)
axs[1].set_xlabel("iteration")
axs[1].set_ylabel(r"$\|\mathrm{grad}\, f(X_t)\|$")
axs[1].set_title("Riemannian gradient norm")
for ax in axs:
    ax.grid(True, which="major", alpha=0.3)
fig.suptitle(f"Best rank-{r_opt} approximation on FixedTTRank{shape_opt}")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 7. Batches
#
# A **batch** of points is one tensor of shape `(*B, M.size)`, each slice along the last
# dimension a packed point; tangent vectors of a batch have the same layout, and a batched
# `TT` has cores `(*B, r, n, r')`. Every method of `FixedTTRank` works point by point over
# the leading dimensions (batch shapes broadcast, so many TTs can also be projected at one
# point), and `inner`/`norm` give one value per point. Each small QR, SVD and product of
# the sweeps becomes one batched call. The formulas are those of the sections above, so a
# batch must give what a Python loop over its points gives, to rounding: we check it for
# `retr`, `project` (at a batch of points, and of a batch of TTs at one point), `inner`,
# `to_tt` and the Riemannian gradient of a loss with one value per point
# ([`docs/manifold.md#batches`](../docs/manifold.md#batches)).

# %%
B = 5
P = M.random(B, generator=gen)  # (B, M.size): B independent points
Xi = M.proju(P, torch.randn(B, M.size, generator=gen))  # one tangent vector per point
Eta = M.proju(P, torch.randn(B, M.size, generator=gen))
Zb = TT.random(shape, [4, 6, 4], batch=(B,), generator=gen)  # B ambient TTs, batch_shape (B,)


def loss_b(x):  # 0.5 <X, X> - <X, Z_b>: one value per point of the batch
    return 0.5 * inner(x, x) - inner(x, Zb)


print("points", tuple(P.shape), "| TTs: batch_shape", Zb.batch_shape,
      "| inner: shape", tuple(M.inner(P, Xi, Eta).shape), "| loss: shape",
      tuple(loss_b(M.to_tt(P)).shape))


def max_diff(batched, looped):  # batched result against the stacked loop over the points
    return float((batched - torch.stack(looped)).abs().max())


diffs = {
    "retr(P, Xi)": max_diff(M.retr(P, Xi), [M.retr(P[b], Xi[b]) for b in range(B)]),
    "project(P, Zb)": max_diff(M.project(P, Zb), [M.project(P[b], Zb[b]) for b in range(B)]),
    "project(p, Zb), one point": max_diff(M.project(P[0], Zb),
                                          [M.project(P[0], Zb[b]) for b in range(B)]),
    "inner(P, Xi, Eta)": max_diff(M.inner(P, Xi, Eta),
                                  [M.inner(P[b], Xi[b], Eta[b]) for b in range(B)]),
    "to_tt(P).full()": max_diff(M.to_tt(P).full(), [M.to_tt(P[b]).full() for b in range(B)]),
    "riemannian_grad(P, loss_b)": max_diff(
        M.riemannian_grad(P, loss_b),
        [M.riemannian_grad(P[b], lambda x, b=b: 0.5 * inner(x, x) - inner(x, Zb[b]))
         for b in range(B)]),
}
for what, diff in diffs.items():
    print(f"batch vs loop, {what:27s}: max |difference| {diff:.1e}")
assert max(diffs.values()) < 1e-12

# %% [markdown]
# **One optimizer for many problems.** A `ManifoldParameter` holding B points is B
# independent problems for a geoopt optimizer: the loss returns one value per point, its
# sum is backpropagated (the points do not interact, so each point gets the Riemannian
# gradient of its own term), and `RiemannianAdam` scales each point's step by that point's
# own second moment (`component_inner` is per point). Below, B best-approximation problems
# as in section 6, each with its own target, run as one parameter and as B separate
# parameters with B optimizers, from the same starting points: the iterates agree to
# rounding at every step.

# %%
shape_b, r_b = (6,) * 5, 3
M_b = FixedTTRank(shape_b, r_b)
B_fit, n_fit = (4, 20) if QUICK else (8, 100)
gen_b = torch.Generator().manual_seed(2)
targets = (TT.random(shape_b, r_b, batch=(B_fit,), generator=gen_b)  # B different targets
           + 0.1 * TT.random(shape_b, 2 * r_b, batch=(B_fit,), generator=gen_b))
start = M_b.random(B_fit, generator=gen_b)


def fit_loss(x, target):  # 0.5 ||X - A||^2 - 0.5 ||A||^2, one value per point
    return 0.5 * inner(x, x) - inner(x, target)


p_all = geoopt.ManifoldParameter(start.clone(), manifold=M_b)  # one parameter, B points
opt_all = geoopt.optim.RiemannianAdam([p_all], lr=0.05)
p_each = [geoopt.ManifoldParameter(start[b].clone(), manifold=M_b) for b in range(B_fit)]
opt_each = [geoopt.optim.RiemannianAdam([q], lr=0.05) for q in p_each]
gap = 0.0  # largest difference of the iterates over all steps
for it in range(n_fit):
    opt_all.zero_grad()
    fit_loss(p_all.unpack_tensor(), targets).sum().backward()
    opt_all.step()
    for b in range(B_fit):
        opt_each[b].zero_grad()
        fit_loss(p_each[b].unpack_tensor(), targets[b]).backward()
        opt_each[b].step()
    gap = max(gap, float((p_all.detach() - torch.stack([q.detach() for q in p_each])).abs().max()))

with torch.no_grad():
    err0 = (M_b.to_tt(start) - targets).norm() / targets.norm()  # one value per problem
    err = (M_b.to_tt(p_all) - targets).norm() / targets.norm()
print(f"{B_fit} problems, relative errors at the start:", [round(float(e), 3) for e in err0])
print(f"after {n_fit} RiemannianAdam steps:         ", [round(float(e), 3) for e in err])
print(f"one parameter of {B_fit} points vs {B_fit} parameters: "
      f"max |difference| of the iterates {gap:.1e}")
assert gap < 1e-10 and bool((err < err0).all())

# %% [markdown]
# **What a batch saves.** The CPU time per point of `retr`, `project` of a TT and
# `riemannian_grad` (the loss above), for a Python loop over the points and for one call on
# the batch, at TT-ranks 4 and 10 (best of a few interleaved runs, one thread; the times
# vary between runs and machines).

# %%
B_t = 16 if QUICK else 64
shape_t = (10,) * (6 if QUICK else 8)
rows = []
for r_t in (4, 10):
    M_t = FixedTTRank(shape_t, r_t)
    P_t = M_t.random(B_t, generator=gen)
    U_t = M_t.proju(P_t, torch.randn(B_t, M_t.size, generator=gen))
    Z_t = TT.random(shape_t, r_t, batch=(B_t,), generator=gen)
    ops = {  # operation: (the batch in one call, the call for point b)
        "retr": (lambda: M_t.retr(P_t, U_t), lambda b: M_t.retr(P_t[b], U_t[b])),
        "project of a TT": (lambda: M_t.project(P_t, Z_t), lambda b: M_t.project(P_t[b], Z_t[b])),
        "riemannian_grad": (lambda: M_t.riemannian_grad(P_t, lambda x: fit_loss(x, Z_t)),
                            lambda b: M_t.riemannian_grad(P_t[b], lambda x: fit_loss(x, Z_t[b]))),
    }
    for what, (batched, one) in ops.items():
        t_loop, t_batch = [], []
        for _ in range(2 if QUICK else 5):  # interleave the two so that load affects both
            t0 = time.process_time()
            for b in range(B_t):
                one(b)
            t_loop.append(time.process_time() - t0)
            t0 = time.process_time()
            batched()
            t_batch.append(time.process_time() - t0)
        rows.append((r_t, what, 1e6 * min(t_loop) / B_t, 1e6 * min(t_batch) / B_t))

print(f"CPU time per point, B = {B_t}, shape {shape_t}, one thread")
print(f"{'r':>3s}  {'operation':16s} {'loop (us)':>10s} {'batch (us)':>11s} {'loop / batch':>13s}")
for r_t, what, t_l, t_b in rows:
    print(f"{r_t:3d}  {what:16s} {t_l:10.0f} {t_b:11.0f} {t_l / t_b:13.2f}")

# %% [markdown]
# On the CPU a batch mostly saves Python and dispatch overhead: one call instead of B, with
# each small QR, SVD and product batched over the points. That overhead is a fixed cost per
# call, so the last column is largest where a point's arithmetic is small (the lower rank,
# `project`) and shrinks as the rank grows; `retr` gains least, since its SVDs dominate and
# batched LAPACK still factors one small matrix after another. From TT-rank 8 (here r = 10)
# the compiled CPU kernels take a batch of `retr` and `project` in one call, a loop over
# the points in C++ ([`docs/kernels.md`](../docs/kernels.md)); under autograd
# (`riemannian_grad`) the batch runs the torch implementation. On a GPU the batch is one
# kernel launch per operation instead of B. For many tensor-completion problems, each with
# its own samples, see `IndexSet.batched` and `ttmanifold.experiments.batched`
# ([`docs/sampled_entries.md#batches-of-index-sets`](../docs/sampled_entries.md#batches-of-index-sets)).

# %% [markdown]
# ## Summary
#
# * `FixedTTRank(shape, ranks)` is a geoopt manifold whose dimension
#   $\sum_k r_{k-1} n_k r_k - \sum_k r_k^2$ matches the numerical rank of the Jacobian of the
#   core-to-tensor map; infeasible rank tuples are rejected.
# * Tangent vectors are packed gauged deltas: the gauge conditions hold, the metric is the
#   dot product of the packed deltas (an isometry), and `tangent_to_tt` gives the rank-$2r$
#   TT form.
# * `project` handles dense, TT and sparse ambient tensors with identical results, equal to
#   the orthogonal projection onto the Jacobian's range; it is idempotent with an orthogonal
#   residual.
# * `retr` (TT-SVD of $X + \xi$) returns a point and is second order: slope 2 on the log-log
#   plot.
# * The Riemannian gradient by autodiff (`riemannian_grad`, or `p.grad` after a backward pass
#   through `unpack_tensor`) equals the projected dense Euclidean gradient to machine
#   precision and matches finite differences.
# * A geoopt `RiemannianAdam` loop on a `ManifoldParameter` solves a best-approximation
#   problem with $10^8$-entry tensors without forming them, reaching (slightly below) the
#   TT-SVD error — using the whole-vector second moment (see the note in section 6).
# * A batch of points `(*B, M.size)` gives what a loop over its points gives, to rounding,
#   for every operation; one `ManifoldParameter` of B points under `RiemannianAdam` follows
#   B independent runs; on the CPU a batch saves mostly Python and dispatch overhead.
