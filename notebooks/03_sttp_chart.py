# %% [markdown]
# # The STTP chart: Householder frames and a non-redundant parameterization
#
# **Purpose.** This notebook presents `ttmanifold.STTPChart`, the Spectral Tensor Train
# Parameterization (STTP, Obukhov et al., AISTATS 2021): a differentiable map from a plain
# vector $\theta \in \mathbb R^{\dim \mathcal M_r}$ onto the manifold $\mathcal M_r$ of tensors
# of fixed TT-rank, with **no redundant parameters**, so that any Euclidean optimizer can
# train TT-structured tensors. Every claim is checked numerically against an independent
# dense computation:
#
# 1. Householder frames (`ttmanifold.householder`): full and reduced forms, their parameter
#    counts against $\dim \mathrm{St}(m, r)$ and the Grassmannian, and the inverse maps;
# 2. the chart: mixed canonical form, which core gets which frame, and a picture of the
#    resulting structure;
# 3. parameter counts against the manifold dimension for several shapes, and the paper's
#    $16 \times 72$ rank-4 example (128 against 336 against 1152);
# 4. the inverse chart and its round trip;
# 5. the spectrum and its constraints (`"learned"`, `"lipschitz"`, `"identity"`);
# 6. the D-optimal regularizer $-\sum_i \log|s_i|$;
# 7. `register_sttp`: STTP as a `torch.nn.utils.parametrize` parametrization of an
#    `nn.Linear`.
#
# The formulas are in the repository's [`docs/sttp.md`](../docs/sttp.md) (Householder frames
# after Shepard, Brozell, Gidofalvi 2015; the chart after Obukhov et al. 2021).
#
# Set the environment variable `TTMANIFOLD_NB_QUICK=1` to run with reduced sizes (the test
# suite does); the committed outputs come from the full run.

# %%
# %matplotlib inline
import math
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

import ttmanifold as tm
from ttmanifold import TT, FixedTTRank, STTPChart, d_optimal_penalty, lipschitz_normalize, register_sttp
from ttmanifold import householder as hh
from ttmanifold.nn import STTPLinear, SVDPLinear, sttp_dof, sttp_ranks, svdp_dof

QUICK = os.environ.get("TTMANIFOLD_NB_QUICK") == "1"

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # float64 so that checks can go down to ~1e-13
torch.set_num_threads(1)  # small kernels: one thread is fastest and reproducible
gen = torch.Generator().manual_seed(0)  # explicit generator for the random draws
plt.rcParams["figure.dpi"] = 100


def rel_err(a, b):
    # relative Frobenius error ||a - b|| / ||b||
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def num_rank(J):
    # numerical rank of a Jacobian (relative threshold 1e-10 on its singular values)
    sv = torch.linalg.svdvals(J)
    return int((sv > 1e-10 * sv[0]).sum())


print(f"ttmanifold {tm.__version__}, quick mode: {QUICK}")


# %% [markdown]
# ## 1. Householder frames
#
# A *frame* is an $m \times r$ matrix $Q$ with $Q^\top Q = I_r$, a point of the Stiefel
# manifold $\mathrm{St}(m, r)$. Householder's parameterization writes it as
#
# $$Q = H_1 H_2 \cdots H_r\, I_{m \times r}, \qquad H_i = I_m - \frac{2\, v_i v_i^\top}{\|v_i\|^2},$$
#
# with the reflector vectors stored as the columns of an $m \times r$ *reflector matrix* $V$:
# unit diagonal, zeros above it, free entries below. Every parameter vector gives an exactly
# orthonormal $Q$.
#
# * **Full form** (`frame_from_full`): all entries below the diagonal are free,
#   $mr - r(r+1)/2 = \dim \mathrm{St}(m, r)$ parameters.
# * **Reduced form** (`frame_from_reduced`): the leading $r \times r$ block of $V$ is the
#   identity, only rows $r+1..m$ are free: $r(m - r)$ parameters, the dimension of the
#   Grassmannian $\mathrm{Gr}(m, r)$ of $r$-dimensional subspaces. The resulting frames have
#   an exactly upper-triangular leading block ($\mathrm{St}_U(m, r)$ in [`docs/sttp.md`](../docs/sttp.md)): the
#   reduced form fixes the $r \times r$ rotation gauge of the frame, which the STTP chart
#   leaves to the neighbouring core.
#
# The parameters are packed column by column (`ttmanifold/householder.py`). As an
# independent check we rebuild the reflector matrix from that documented packing and
# multiply the explicit $m \times m$ reflections.

# %%
def reflector_matrix(params, m, r, reduced):
    # the m x r reflector matrix V from packed parameters (column by column, top to bottom)
    V = torch.eye(m, r)
    it = iter(params.tolist())
    for j in range(r):
        for i in range(r if reduced else j + 1, m):
            V[i, j] = next(it)
    return V


def explicit_frame(V):
    # H_1 ... H_r I_{m x r} with explicit dense reflections
    m, r = V.shape
    H = torch.eye(m)
    for j in range(r):
        v = V[:, j:j + 1]
        H = H @ (torch.eye(m) - 2.0 * (v @ v.T) / (v.T @ v))
    return H[:, :r]


m, r = 7, 3
p_full = torch.randn(hh.full_dim(m, r), generator=gen)
p_red = torch.randn(hh.reduced_dim(m, r), generator=gen)
Q_full = hh.frame_from_full(p_full, m, r)
Q_red = hh.frame_from_reduced(p_red, m, r)
for name, Q, p, red in [("full", Q_full, p_full, False), ("reduced", Q_red, p_red, True)]:
    print(f"{name:8s} m={m}, r={r}: {p.numel():2d} parameters,"
          f" |Q^T Q - I| = {float((Q.T @ Q - torch.eye(r)).abs().max()):.1e},"
          f" |Q - explicit product| = {float((Q - explicit_frame(reflector_matrix(p, m, r, red))).abs().max()):.1e}")
print("\nleading 3x3 block of the reduced frame (exactly upper triangular):")
print(Q_red[:r, :r])
print("strictly lower entries:", Q_red[:r, :r].tril(-1).abs().max().item())
print("\nall parameters 0 give -I:", torch.equal(hh.frame_from_full(torch.zeros(hh.full_dim(m, r)), m, r), -torch.eye(m, r)))

# %% [markdown]
# **Parameter counts.** The full form has exactly $\dim \mathrm{St}(m, r)$ parameters and the
# reduced form $\dim \mathrm{Gr}(m, r)$. That these parameters are independent (no
# redundancy) is checked on the Jacobians at a random point: the Jacobian of
# $p \mapsto Q$ (full form) must have rank $\dim \mathrm{St}$, and the Jacobian of
# $p \mapsto QQ^\top$ (reduced form; $QQ^\top$ is the projector onto the subspace, i.e. the
# point of the Grassmannian) must have rank $\dim \mathrm{Gr}$.

# %%
print(f"{'m':>4s} {'r':>3s} {'full_dim':>9s} {'dim St':>7s} {'rank dQ':>8s} {'reduced_dim':>12s} {'dim Gr':>7s} {'rank d(QQ^T)':>13s}")
for m_, r_ in [(4, 2), (7, 3), (12, 4), (20, 5), (72, 4), (256, 8)]:
    dim_st, dim_gr = m_ * r_ - r_ * (r_ + 1) // 2, r_ * (m_ - r_)
    if m_ <= 20:  # Jacobians of the small cases (independent rank checks)
        pf = torch.randn(hh.full_dim(m_, r_), generator=gen)
        pr = torch.randn(hh.reduced_dim(m_, r_), generator=gen)
        Jf = torch.autograd.functional.jacobian(lambda p: hh.frame_from_full(p, m_, r_).reshape(-1), pf)
        Jr = torch.autograd.functional.jacobian(
            lambda p: (lambda Q: Q @ Q.T)(hh.frame_from_reduced(p, m_, r_)).reshape(-1), pr)
        rf, rr = num_rank(Jf), num_rank(Jr)
        assert rf == dim_st and rr == dim_gr
    else:
        rf = rr = "-"
    assert hh.full_dim(m_, r_) == dim_st and hh.reduced_dim(m_, r_) == dim_gr
    print(f"{m_:4d} {r_:3d} {hh.full_dim(m_, r_):9d} {dim_st:7d} {rf!s:>8s} {hh.reduced_dim(m_, r_):12d} {dim_gr:7d} {rr!s:>13s}")

# %% [markdown]
# **Inverses.** `full_from_frame(Q)` runs a Householder QR of $Q$ and returns
# `(params, signs)` with `frame_from_full(params) * signs == Q`: a frame is reachable up to
# the signs of its columns, which the chart folds into the spectrum.
# `reduced_from_frame(Q)` first rotates $Q$ on the right by an orthogonal $O$ (an RQ
# decomposition of its leading block) into $\mathrm{St}_U$ and returns
# `(params, signs, O)` with `frame_from_reduced(params) * signs == Q @ O`; the same subspace
# ($QQ^\top$ is unchanged) and the rotation $O^\top$ goes into the neighbouring core.

# %%
m, r = 9, 4
Q = torch.linalg.qr(torch.randn(m, r, generator=gen))[0]  # a random frame

p, signs = hh.full_from_frame(Q)
print("full_from_frame:    |frame_from_full(p) * signs - Q|   =",
      f"{float((hh.frame_from_full(p, m, r) * signs - Q).abs().max()):.1e}   signs", signs.tolist())

p, signs, O = hh.reduced_from_frame(Q)
F = hh.frame_from_reduced(p, m, r) * signs
print("reduced_from_frame: |frame_from_reduced(p) * signs - Q O| =", f"{float((F - Q @ O).abs().max()):.1e}",
      f"  |O^T O - I| = {float((O.T @ O - torch.eye(r)).abs().max()):.1e}")
print("                    same subspace: |F F^T - Q Q^T| =", f"{float((F @ F.T - Q @ Q.T).abs().max()):.1e}")

# parameters with |w_j| < 1 per column are recovered exactly (the canonical representative)
p0 = 0.2 * torch.randn(hh.full_dim(m, r), generator=gen)
p1, s1 = hh.full_from_frame(hh.frame_from_full(p0, m, r))
print("\nround trip of small full parameters: |p - p0| =", f"{float((p1 - p0).abs().max()):.1e}", " signs", s1.tolist())

# %% [markdown]
# ## 2. The STTP chart
#
# Pick a spectral position $c$ ($1 \le c \le d-1$; the code numbers cores from 0) and write
# $X \in \mathcal M_r$ in mixed canonical form
#
# $$X = U_0 \cdots U_{c-1}\; \mathrm{diag}(s)\; V_c \cdots V_{d-1},$$
#
# with $U_k$ left-orthogonal (the left unfolding, $r_k n_k \times r_{k+1}$, is a frame),
# $V_k$ right-orthogonal (the transposed right unfolding, $n_k r_{k+1} \times r_k$, is a
# frame) and $s$ the singular values of the $c$-th unfolding
# $X^{\langle c\rangle}$. Then
#
# | block | frame | form | parameters |
# |---|---|---|---|
# | $U_k$, $k < c-1$ | $r_k n_k \times r_{k+1}$ | reduced | $r_{k+1}(r_k n_k - r_{k+1})$ |
# | $U_{c-1}$ | $r_{c-1} n_{c-1} \times r_c$ | full | $r_{c-1} n_{c-1} r_c - r_c(r_c+1)/2$ |
# | $s$ | | | $r_c$ |
# | $V_c$ | $n_c r_{c+1} \times r_c$ | full | $n_c r_{c+1} r_c - r_c(r_c+1)/2$ |
# | $V_k$, $k > c$ | $n_k r_{k+1} \times r_k$ | reduced | $r_k(n_k r_{k+1} - r_k)$ |
#
# The reduced frames fix the gauge ($r_k \times r_k$ rotations) at each bond, the two full
# frames next to the spectrum keep the freedom of the singular vectors, and the total is
# $\sum_k r_{k-1} n_k r_k - \sum_k r_k^2 = \dim \mathcal M_r$. A small example,
# $4 \times 4 \times 4 \times 4 \times 4$ with ranks $(1, 2, 3, 3, 2, 1)$ (the default center
# is the bond of largest rank nearest the middle):

# %%
shape5, ranks5 = (4, 4, 4, 4, 4), (1, 2, 3, 3, 2, 1)
M5 = FixedTTRank(shape5, ranks5)
C5 = STTPChart(M5)
print(C5, "\n")
print(f"{'block':6s} {'kind':9s} {'frame':>7s} {'params':>7s}")
for b in C5.layout:
    frame = f"{b.m}x{b.r}" if b.kind != "spectrum" else ""
    print(f"{b.name:6s} {b.kind:9s} {frame:>7s} {b.size:7d}")
print(f"\ntotal {C5.dim} = dim M_r {M5.dim};  stored TT cores: {M5.size} numbers;  dense tensor: {math.prod(shape5)} entries")

# %% [markdown]
# **The structure, pictured.** For a random $\theta$ the top row shows the reflector matrix
# of each block (rebuilt from `chart.split(theta)` with the packing above) and the bottom row
# the frame it generates (`chart.forward_cores`), with the spectrum $\mathrm{diag}(s)$ in the
# middle. Exact zeros are grey; the leading $r \times r$ block is outlined. Reduced blocks
# have an identity leading block in the reflector matrix and an upper-triangular leading
# block in the frame; the full blocks next to the spectrum have free entries all the way up
# to the diagonal and a dense frame.

# %%
theta5 = C5.random_theta(generator=gen)
parts = C5.split(theta5)
U_list, s5, V_list = C5.forward_cores(theta5)
frames = {}
for k, U in enumerate(U_list):
    frames[f"U{k}"] = U.reshape(-1, U.shape[-1])  # left unfolding (r_k n_k) x r_{k+1}
for k, V in enumerate(V_list, start=C5.center):
    frames[f"V{k}"] = V.reshape(V.shape[0], -1).T  # transposed right unfolding (n_k r_{k+1}) x r_k

cmap = plt.get_cmap("RdBu_r").copy()
cmap.set_bad("0.85")  # exact zeros in grey


def show(ax, A, title, lim, r_lead=None):
    A = A.detach().numpy()
    im = ax.imshow(np.ma.masked_where(A == 0.0, A), cmap=cmap, vmin=-lim, vmax=lim)
    if r_lead:
        ax.add_patch(Rectangle((-0.5, -0.5), r_lead, r_lead, fill=False, lw=2, ec="k"))
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


blocks = C5.layout
fig, axs = plt.subplots(2, len(blocks), figsize=(2.0 * len(blocks) + 1, 5.4), layout="constrained")
for j, b in enumerate(blocks):
    if b.kind == "spectrum":
        show(axs[0, j], torch.diag(s5), f"diag(s)\n{b.r} values", 2.0)
        axs[1, j].axis("off")
        axs[1, j].text(0.5, 0.5, "s =\n" + "\n".join(f"{v:.3f}" for v in s5.tolist()),
                       ha="center", va="center", fontsize=9)
        continue
    V = reflector_matrix(parts[b.name], b.m, b.r, b.kind == "reduced")
    im_top = show(axs[0, j], V, f"{b.name}: {b.kind}\nreflectors {b.m}x{b.r}", 2.0, b.r)
    im_bot = show(axs[1, j], frames[b.name], f"frame {b.name}", 1.0, b.r)
axs[0, 0].set_ylabel("reflector matrix")
axs[1, 0].set_ylabel("frame")
fig.colorbar(im_top, ax=axs[0, :], shrink=0.8, label="entry (clipped at 2)")
fig.colorbar(im_bot, ax=axs[1, :], shrink=0.8, label="entry")
fig.suptitle(f"STTP structure of a random point: shape {shape5}, ranks {ranks5}, center c = {C5.center}"
             "  (grey: exact zeros; box: leading r x r block)")
plt.show()

for name, Fk in frames.items():
    rr = Fk.shape[1]
    kind = C5._by_name[name].kind
    print(f"{name} ({kind:7s}): |F^T F - I| = {float((Fk.T @ Fk - torch.eye(rr)).abs().max()):.1e},"
          f"  max |strictly lower part of the leading block| = {float(Fk[:rr, :rr].tril(-1).abs().max()):.1e}")
X5 = C5(theta5)
print("\nsingular values of the c-th unfolding:", torch.linalg.svdvals(X5.full().reshape(16, -1))[:4].tolist())
print("|s| sorted                            :", s5.abs().sort(descending=True).values.tolist())

# %% [markdown]
# ## 3. Counting parameters
#
# For several shapes and ranks: the length of $\theta$ (`chart.dim`), the manifold dimension
# by the formula, the numbers stored by plain TT cores (`M.size`, redundant by the gauge)
# and the dense size. Independent check: the numerical rank of the Jacobian of
# $\theta \mapsto$ (dense tensor) at a random $\theta$ must equal `chart.dim` (the chart is an
# immersion: no parameter is redundant). For the other two spectra the table lists the
# number of parameters and the Jacobian rank (section 5 explains the difference).

# %%
cases = [((4, 5, 6), (1, 3, 4, 1)),
         ((3, 4, 4, 3), (1, 3, 3, 3, 1)),
         ((2, 3, 4, 5), (1, 2, 4, 3, 1)),
         (shape5, ranks5),
         ((16, 72), (1, 4, 1)),
         ((2, 2, 2, 2, 3, 3, 2, 2, 2), (1, 2, 4, 4, 4, 4, 4, 4, 2, 1))]
if not QUICK:
    cases.append(((3, 4, 5, 4, 3), (1, 3, 5, 5, 3, 1)))
print(f"{'shape':28s} {'ranks':32s} {'c':>2s} {'dense':>6s} {'cores':>6s} {'dim M_r':>8s} "
      f"{'theta':>6s} {'rank J':>7s} {'lipschitz':>10s} {'identity':>10s}")
for shape, ranks in cases:
    M = FixedTTRank(shape, ranks)
    formula = sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape)) - sum(q * q for q in ranks[1:-1])
    cols = []
    for spectrum in ("learned", "lipschitz", "identity"):
        C = STTPChart(M, spectrum=spectrum)
        th = C.random_theta(generator=gen)
        J = torch.autograd.functional.jacobian(lambda t: C(t).full().reshape(-1), th, vectorize=True)
        cols.append((C.dim, num_rank(J), C.center))
    (dim_l, rank_l, c), (dim_p, rank_p, _), (dim_i, rank_i, _) = cols
    assert dim_l == formula == M.dim == rank_l
    print(f"{str(shape):28s} {str(ranks):32s} {c:2d} {math.prod(shape):6d} {M.size:6d} {formula:8d} "
          f"{dim_l:6d} {rank_l:7d} {f'{dim_p} / {rank_p}':>10s} {f'{dim_i} / {rank_i}':>10s}")

# %% [markdown]
# **The paper's example** (Obukhov et al. 2021, Sec. 3.3): a $16 \times 72$ weight matrix of
# rank 4 is tensorized as $2\times2\times2\times2 \mid 3\times3\times2\times2\times2$ (output
# modes, then input modes in reverse order, so that the $c = 4$-th unfolding is the matrix
# itself) with ranks $R_k = \min(4, R_k^{\max})$. STTP needs **128** parameters, the compact
# SVD $U\,\mathrm{diag}(s)\,V^\top$ of rank 4 (SVDP, Householder frames) **336**
# $= r(d_\text{out} + d_\text{in} - r)$, the dimension of the rank-4 matrix manifold, and the
# dense matrix **1152**. We count the trainable weight entries of the actual layers.

# %%
out_modes, in_modes, R = (2, 2, 2, 2), (2, 2, 2, 3, 3), 4
sttp = STTPLinear(72, 16, rank=R, out_modes=out_modes, in_modes=in_modes, bias=False)
svdp = SVDPLinear(72, 16, rank=R, bias=False)
dense = torch.nn.Linear(72, 16, bias=False)
print("tensor shape:", sttp.tensor_shape, "  ranks:", sttp.ranks, "  center:", sttp.center)
counts = {
    "STTP (chart theta)": sttp.num_weight_params(),
    "  sttp_dof": sttp_dof(out_modes, in_modes, R),
    "  dim of the TT manifold": FixedTTRank(sttp.tensor_shape, sttp.ranks).dim,
    "  plain TT cores": FixedTTRank(sttp.tensor_shape, sttp.ranks).size,
    "SVDP (u_params, s, v_params)": svdp.num_weight_params(),
    "  svdp_dof": svdp_dof(16, 72, R),
    "  dim of the rank-4 matrix manifold": FixedTTRank((16, 72), R).dim,
    "dense": dense.weight.numel(),
}
for k, v in counts.items():
    print(f"{k:38s} {v:5d}")
assert (counts["STTP (chart theta)"], counts["SVDP (u_params, s, v_params)"], counts["dense"]) == (128, 336, 1152)
W = sttp.weight.detach()
print("\nthe STTP weight has rank", int(torch.linalg.matrix_rank(W)), "and its singular values are |s|:",
      torch.allclose(torch.linalg.svdvals(W)[:R], sttp.singular_values().detach().abs().sort(descending=True).values))

# %% [markdown]
# ## 4. The inverse chart
#
# `chart.inverse(x)` maps a TT (any gauge) back to a $\theta$ with `chart(theta) == x`: it
# orthogonalizes $x$, inverts the outer cores with reduced Householder QRs (moving each
# rotation towards the center), takes the SVD of the center and finally inverts the two
# full frames, folding their column signs into $s$. The returned $\theta$ is a canonical
# representative, so `inverse(chart(inverse(x))) == inverse(x)`. The domain is the open dense
# set where every reduced frame has a nonsingular leading block; outside it `inverse` raises
# a `ValueError` that suggests another center.

# %%
n_trials = 5 if QUICK else 20
print(f"{'shape':28s} {'ranks':32s} {'max rel error of chart(inverse(x))':>36s} {'max |theta change|':>19s}")
for shape, ranks in cases:
    C = STTPChart(FixedTTRank(shape, ranks))
    errs, drift = [], []
    for _ in range(n_trials):
        x = TT.random(shape, ranks, generator=gen)
        x = TT([g * 3.0 for g in x.cores])  # any gauge and scale
        th = C.inverse(x)
        errs.append(rel_err(C(th).full(), x.full()))
        drift.append(float((C.inverse(C(th)) - th).abs().max()))
    print(f"{str(shape):28s} {str(ranks):32s} {max(errs):36.1e} {max(drift):19.1e}")
    assert max(errs) < 1e-12

# a point outside the domain: the leading 2x2 block of the (reduced) frame U_0 is singular
bad = TT.random(shape5, ranks5, generator=gen).cores
bad[0] = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).reshape(1, 4, 2)
try:
    C5.inverse(TT(bad))
except ValueError as e:
    print("\nValueError:", str(e)[:260], "...")

# %% [markdown]
# ## 5. The spectrum and its constraints
#
# The spectrum block $s$ is directly the (signed) singular values of the $c$-th unfolding,
# which makes spectral constraints trivial to impose:
#
# * `"learned"`: $s$ free; `chart.dim` $= \dim\mathcal M_r$.
# * `"lipschitz"`: $\theta$ stores $s$ unnormalized and the chart uses
#   $s / \|s\|_\infty$ (`lipschitz_normalize`): the spectral norm of the unfolding is exactly 1
#   (for a weight matrix: a 1-Lipschitz layer). Same number of parameters, but the chart is
#   invariant under positive scaling of $s$, so its Jacobian has rank `dim - 1` (table above).
# * `"identity"`: $s = 1$, no $s$ block and $U_{c-1}$ reduced as well, so
#   $\dim = \dim\mathcal M_r - r_c(r_c+1)/2$: a smaller family (all singular values 1; for a
#   matrix, a scaled orthogonal/isometric map), still without redundancy.
#
# Below, for the same Householder parameters, the singular values of the $c$-th unfolding
# of `chart(theta)` (computed densely) against the effective spectrum
# `chart.singular_values(theta)`.

# %%
M = FixedTTRank((4, 5, 6, 5), (1, 3, 4, 3, 1))
charts = {sp: STTPChart(M, spectrum=sp) for sp in ("learned", "lipschitz", "identity")}
c = charts["learned"].center
raw_s = torch.tensor([2.5, -1.5, 0.8, 0.3])  # stored s (signed, unnormalized)
thetas = {}
for sp, C in charts.items():
    th = C.random_theta(generator=torch.Generator().manual_seed(7))
    if "s" in C._by_name:
        b = C._by_name["s"]
        th[b.start:b.start + b.size] = raw_s
    thetas[sp] = th

fig, axs = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
for ax, (sp, C) in zip(axs, charts.items()):
    X = C(thetas[sp]).full()
    unf = X.reshape(math.prod(M.shape[:c]), -1)
    sv = torch.linalg.svdvals(unf)[:M.ranks[c]]
    eff = C.singular_values(thetas[sp])
    print(f"{sp:10s} dim {C.dim:3d}  effective s = {[round(v, 4) for v in eff.tolist()]}"
          f"   singular values of unfolding {c}: {[round(v, 4) for v in sv.tolist()]}")
    assert torch.allclose(sv, eff.abs().sort(descending=True).values, atol=1e-12)
    i = torch.arange(len(sv))
    ax.bar(i - 0.2, sv, width=0.4, label="singular values of $X^{<c>}$ (dense SVD)")
    ax.bar(i + 0.2, eff.abs().sort(descending=True).values, width=0.4, label="|chart.singular_values|")
    if sp == "learned":
        ax.plot(i, raw_s.abs(), "k_", ms=20, mew=2, label="stored |s|")
    elif sp == "lipschitz":
        ax.plot(i, raw_s.abs(), "k_", ms=20, mew=2, label="stored |s| (unnormalized)")
        ax.axhline(1.0, color="r", ls="--", lw=1, label="spectral norm 1")
    ax.set_title(f'spectrum="{sp}"  (dim {C.dim})')
    ax.set_xticks(i)
    ax.set_xlabel("index i")
    ax.legend(fontsize=7)
axs[0].set_ylabel("value")
fig.suptitle(f"Spectrum of the c-th unfolding (c = {c}) of chart(theta), shape {M.shape}, ranks {M.ranks}")
fig.tight_layout()
plt.show()
print("\nlipschitz_normalize(raw s) =", lipschitz_normalize(raw_s).tolist())

# %% [markdown]
# ## 6. The D-optimal regularizer
#
# `d_optimal_penalty(s)` $= -\sum_i \log|s_i| = -\log|\det \mathrm{diag}(s)|$: its gradient
# $-1/s_i$ grows without bound as a singular value approaches 0, so it acts as a barrier
# that keeps the point away from the boundary of $\mathcal M_r$ (where the rank drops and the
# chart degenerates). As an experiment we fit a target $A$ whose $c$-th unfolding has
# singular values $(2, 1, 0.3, 0)$ (rank 3, on the boundary of the rank-4 manifold) by
# minimizing
#
# $$\tfrac12 \|\mathrm{chart}(\theta) - A\|^2 + \lambda\, \mathrm{d\_optimal\_penalty}(s)$$
#
# with Adam (learning rate 0.02) from a random $\theta$. With frames aligned to those of $A$,
# the loss separates into $\sum_i \tfrac12 (s_i - a_i)^2 - \lambda \log |s_i|$, minimized at
# $s_i = (a_i + \sqrt{a_i^2 + 4\lambda})/2$; for $a_i = 0$ this is $\sqrt\lambda$.
#
# A caveat shows up in the run: the learned $s$ is *signed*, and a discrete optimizer step
# can jump across $s_i = 0$ (through the rank drop) when $|s_i|$ is smaller than the step;
# the barrier then only acts after the jump. With $\lambda = 10^{-2}$ the spectrum stays
# away from 0 all the way.

# %%
C = charts["learned"]
b = C._by_name["s"]
a = torch.tensor([2.0, 1.0, 0.3, 0.0])
th_A = C.random_theta(generator=torch.Generator().manual_seed(3))
th_A[b.start:b.start + b.size] = a
A = C(th_A)
n_steps = 150 if QUICK else 600
lams = [0.0, 1e-4, 1e-2]
traj = {}
for lam in lams:
    theta = C.random_theta(generator=torch.Generator().manual_seed(4)).requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.02)
    hist = []
    for it in range(n_steps):
        opt.zero_grad()
        D = C(theta) - A
        s = C.singular_values(theta)
        loss = 0.5 * tm.inner(D, D) + lam * d_optimal_penalty(s)
        loss.backward()
        opt.step()
        hist.append(s.detach().abs().sort(descending=True).values)
    traj[lam] = torch.stack(hist)
    final = traj[lam][-1]
    pred = (a + torch.sqrt(a * a + 4 * lam)) / 2
    print(f"lambda = {lam:6.0e}: final |s| = {[f'{v:.4f}' for v in final.tolist()]}"
          f"   closed form {[f'{v:.4f}' for v in pred.tolist()]}   final condition number"
          f" {float(final[0] / final[-1]):7.1e}   min over the run of min|s_i| {float(traj[lam][:, -1].min()):.1e}")

fig, axs = plt.subplots(1, 2, figsize=(11, 3.8))
for lam in lams:
    line, = axs[0].semilogy(traj[lam][:, -1], label=rf"$\lambda$ = {lam:g}")
    if lam > 0:
        axs[0].axhline(math.sqrt(lam), color=line.get_color(), ls="--", lw=1)
    axs[1].semilogy(traj[lam][:, 0] / traj[lam][:, -1], label=rf"$\lambda$ = {lam:g}")
axs[0].set_title(r"smallest $|s_i|$ (dashed: $\sqrt{\lambda}$)")
axs[1].set_title(r"condition number $\max|s_i| / \min|s_i|$")
for ax in axs:
    ax.set_xlabel("Adam step")
    ax.grid(True, alpha=0.3)
    ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 7. `register_sttp`: parametrizing an `nn.Linear`
#
# `register_sttp(module, "weight", rank, shape)` registers a
# `torch.nn.utils.parametrize` parametrization: the module stores the flat $\theta$ as
# `parametrizations.weight.original` and rebuilds the dense weight from it on access. The
# current weight is *projected* onto the parametrized set (TT-SVD to the chart's ranks, then
# `inverse(project=True)`), and so is every later assignment `module.weight = W`. With the
# default center (the bond that separates output and input modes) the spectrum is exactly
# the singular values of the weight matrix.

# %%
from torch.nn.utils import parametrize

torch.manual_seed(0)
lin = torch.nn.Linear(72, 16)
W0 = lin.weight.detach().clone()
tshape = (2, 2, 2, 2, 3, 3, 2, 2, 2)  # row-major reshape of the 16 x 72 weight
register_sttp(lin, "weight", rank=4, shape=tshape)
P = lin.parametrizations.weight[0]
print(P.chart)
print("trainable parameters:", {n: tuple(p.shape) for n, p in lin.named_parameters()})
print("parametrized:", parametrize.is_parametrized(lin, "weight"), "  weight shape:", tuple(lin.weight.shape))

W = lin.weight.detach()
sv0 = torch.linalg.svdvals(W0)
print(f"\nrank of the weight: {int(torch.linalg.matrix_rank(W))};  |singular values - |s||:"
      f" {float((torch.linalg.svdvals(W)[:4] - P.chart.singular_values(lin.parametrizations.weight.original).detach().abs().sort(descending=True).values).abs().max()):.1e}")
print(f"projection error of the initial weight: {rel_err(W, W0):.3f}  "
      f"(best rank-4 approximation, Eckart-Young: {float(sv0[4:].norm() / sv0.norm()):.3f};"
      " the TT ranks constrain more than the matrix rank)")
x = torch.randn(8, 72, generator=gen)
with torch.no_grad():
    print("lin(x) == x W^T + b:", float((lin(x) - (x @ lin.weight.T + lin.bias)).abs().max()))
lin.weight = 2.0 * W  # assignment = projection; 2 W is already in the set
print("after lin.weight = 2 W: |lin.weight - 2 W| =", f"{float((lin.weight.detach() - 2 * W).abs().max()):.1e}")

# %% [markdown]
# Training works with any `torch.optim` optimizer on $\theta$. A teacher-student regression:
# the teacher is a random weight of the same STTP family, the students start from torch's
# default initialization (projected). The `"lipschitz"` student keeps spectral norm exactly 1
# throughout (the teacher's is larger, so it cannot fit it exactly); it needs no projection
# step and no penalty.

# %%
gen_t = torch.Generator().manual_seed(5)
teacher = torch.nn.Linear(72, 16, bias=False)
register_sttp(teacher, "weight", rank=4, shape=tshape)
with torch.no_grad():
    C_t = teacher.parametrizations.weight[0].chart
    teacher.parametrizations.weight.original.copy_(C_t.random_theta(generator=gen_t))
W_star = teacher.weight.detach()
X_train = torch.randn(512, 72, generator=gen_t)
Y_train = X_train @ W_star.T

n_steps = 150 if QUICK else 800
curves = {}
for spectrum in ("learned", "lipschitz"):
    torch.manual_seed(1)
    student = torch.nn.Linear(72, 16, bias=False)
    register_sttp(student, "weight", rank=4, shape=tshape, spectrum=spectrum)
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    losses = []
    for it in range(n_steps):
        opt.zero_grad()
        loss = (student(X_train) - Y_train).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    curves[spectrum] = losses
    Ws = student.weight.detach()
    print(f"{spectrum:9s}: loss {losses[0]:.3f} -> {losses[-1]:.2e};  |W - W*| / |W*| = {rel_err(Ws, W_star):.2e};"
          f"  spectral norm {float(torch.linalg.matrix_norm(Ws, 2)):.6f} (teacher {float(torch.linalg.matrix_norm(W_star, 2)):.3f})")

plt.figure(figsize=(5.5, 3.5))
for sp, losses in curves.items():
    plt.semilogy(losses, label=f'spectrum="{sp}"')
plt.xlabel("Adam step")
plt.ylabel("mean squared error")
plt.title("Teacher-student regression through register_sttp")
plt.legend()
plt.grid(True, alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Summary
#
# * **Householder frames.** Full-form parameters give exactly orthonormal frames with
#   $\dim\mathrm{St}(m, r) = mr - r(r+1)/2$ independent parameters; the reduced form (identity
#   leading block of the reflector matrix, upper-triangular leading block of the frame) has
#   $r(m - r) = \dim\mathrm{Gr}(m, r)$, both confirmed by Jacobian ranks. The frames agree
#   with explicit products of reflections to $\sim10^{-16}$, and the inverses reproduce any
#   frame up to column signs (full) or a right rotation (reduced).
# * **The STTP chart** uses reduced frames for the outer cores, full frames on both sides of
#   the spectrum and the spectrum itself; its parameter count equals $\dim\mathcal M_r$ for
#   every shape tried, and the Jacobian of $\theta \mapsto X$ has full column rank: no
#   redundancy, unlike the plain TT cores (`M.size`).
# * **The paper's example**: a $16\times72$ rank-4 weight needs 128 STTP parameters against
#   336 for the rank-4 SVD parameterization and 1152 dense.
# * **The inverse chart** reproduces random points to $\sim10^{-15}$ and returns a canonical
#   $\theta$; points outside its open dense domain are reported with a hint.
# * **Spectral constraints** are exact by construction: `"lipschitz"` fixes the spectral norm
#   of the $c$-th unfolding to 1 (Jacobian rank `dim - 1`), `"identity"` sets all singular
#   values to 1 with $r_c(r_c+1)/2$ fewer parameters.
# * **The D-optimal penalty** $-\sum\log|s_i|$ keeps the spectrum away from 0: fitting a
#   rank-deficient target, the smallest singular value settles near the closed-form
#   $\sqrt\lambda$ instead of decaying to 0. It is a barrier for small steps only: Adam can
#   jump across $s_i = 0$ when $\lambda$ is small.
# * **`register_sttp`** makes any weight an STTP tensor via `torch.nn.utils.parametrize`;
#   assignment projects, and plain Adam trains it (a teacher of the same family is recovered
#   to about 1 % relative error in 800 steps; the Lipschitz student stays at spectral norm
#   exactly 1).
#
# Next: `05_sttp_layers.ipynb` uses STTP and SVDP layers in a small classifier and compares
# accuracy against compression.
