# %% [markdown]
# # Chart-based versus Riemannian descent on fixed-TT-rank problems
#
# **Purpose.** This notebook compares the two ways `ttmanifold` offers to optimize over the
# manifold $\mathcal M_r$ of tensors of fixed TT-rank ([`docs/comparison.md`](../docs/comparison.md)):
#
# * **chart-based descent**: write $X = \varphi(\theta)$ with the STTP chart
#   (`STTPChart`, notebook `03_sttp_chart.ipynb`), $\theta \in \mathbb R^{\dim \mathcal M_r}$,
#   and minimize $f(\varphi(\theta))$ with a Euclidean optimizer (`chart_sgd`,
#   `chart_momentum`, `chart_adam`: `torch.optim.SGD` / `Adam` on $\theta$);
# * **Riemannian descent**: $X_{t+1} = R_{X_t}(-\alpha\, \mathrm{grad} f(X_t))$ on
#   `FixedTTRank` (`rsgd`, `rsgd_momentum`, `radam`: geoopt's optimizers; `rcg`: Riemannian
#   conjugate gradient with exact line search).
#
# It runs all seven methods of `ttmanifold.experiments.solvers` (`S` below) on three
# problems of `ttmanifold.experiments.problems` (`P`), from **the same starting point**
# (the chart methods start at $\theta_0 = \varphi^{-1}(X_0)$, and the round trip
# $\varphi(\varphi^{-1}(X_0)) = X_0$ is checked), with the step sizes chosen by the
# package's documented rule (`solvers.tune_lr`), and then looks at *why* the chart methods behave as they do:
#
# 1. the problems and the common start;
# 2. the runs, and 3. convergence per iteration and per second;
# 4. the chart gradient per block at the start, against the Riemannian gradient, and what
#    Adam's per-coordinate scaling does with it;
# 5. the Jacobian of the chart along the way and the Hessian at the solution;
# 6. whether a different step size would rescue the chart methods;
# 7. the chart's domain; 8. cost per iteration against the rank;
# 9. when each approach wins.
#
# Set `TTMANIFOLD_NB_QUICK=1` to run with reduced sizes (the test suite does); the committed
# outputs, and every number quoted in the text, come from the full run. The notebook uses a
# GPU when one is available (`device` is passed to every problem).

# %%
# %matplotlib inline
import math
import os
import time

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch

import ttmanifold as tm
from ttmanifold import STTPChart, orthogonalize
from ttmanifold.experiments import problems as P
from ttmanifold.experiments import solvers as S

QUICK = os.environ.get("TTMANIFOLD_NB_QUICK") == "1"

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)  # small kernels: one thread is fastest and reproducible
device = "cuda" if torch.cuda.is_available() else "cpu"
plt.rcParams["figure.dpi"] = 100

SEED = 0
RULE = dict(grid_size=7, tune_iters=10)  # the defaults of solvers.tune_lr (documented rule)
OVERSAMPLING = 20  # completion: |Omega| = 20 x dim M
if QUICK:
    APPROX_SHAPE, APPROX_RANK = (8,) * 5, 3
    COMP_SHAPE, COMP_RANK = (8,) * 5, 3
    ITERS = 60
    SCALING = dict(d=6, n=8, ranks=(2, 4), iters=10)
else:
    APPROX_SHAPE, APPROX_RANK = (10,) * 7, 4
    COMP_SHAPE, COMP_RANK = (8,) * 6, 4
    ITERS = 300
    SCALING = dict(d=10, n=20, ranks=(2, 4, 8, 16), iters=20)

CHART = S.CHART_METHODS          # chart_sgd, chart_momentum, chart_adam
RIEM = S.RIEMANNIAN_METHODS      # rsgd, rsgd_momentum, radam, rcg
COLORS = {m: f"C{i}" for i, m in enumerate(S.METHODS)}
print(f"ttmanifold {tm.__version__}, torch {torch.__version__}, device {device}, quick mode: {QUICK}")
print(f"approximation: shape {APPROX_SHAPE}, rank {APPROX_RANK}; completion: shape {COMP_SHAPE}, "
      f"rank {COMP_RANK}; {ITERS} iterations per run")

# %% [markdown]
# ## 1. The problems and the common start
#
# Three problems (all scaled so that $\|A\| = 1$ and a step of 1 is the natural gradient
# step; see `ttmanifold.experiments.problems` and [`docs/comparison.md`](../docs/comparison.md)):
#
# * **function**: `Approximation.function`, $\min \tfrac12\|X - A\|^2$ for the
#   function-related tensor $A[i] = 1/(1 + x_1(i_1) + \dots + x_d(i_d))$ on a uniform grid
#   of $[0,1]^d$. Its TT singular values decay fast, so the best rank-$r$ approximation is
#   very accurate, and it has *small* singular values;
# * **random target**: `Approximation.random`, $A = (B + 0.1\,C)/\|\cdot\|$ with $B$ a random
#   rank-$r$ TT and $C$ a random TT of rank $r$ (so $A$ has rank $2r$): the best rank-$r$
#   error is about $0.1$ and the singular values of the solution are all of order one;
# * **completion**: `Completion`, $\min \tfrac{w}{2}\|P_\Omega(X - A)\|^2$ for a random
#   rank-$r$ TT $A$ (Gaussian cores) observed on $|\Omega| = 20 \dim\mathcal M_r$ random
#   entries, test error on a disjoint set $\Gamma$.
#
# Every method starts from the same random unit-norm point $X_0$ (`problem.initial_point(0)`).
# For completion the `compare` command's default start is the *spectral* one (TT-SVD of the
# zero-filled data); section 7 shows why it is not used here. The chart methods start from
# $\theta_0 = \varphi^{-1}(X_0)$ (`STTPChart.inverse`); the solver records the round-trip
# error $\|\varphi(\theta_0) - X_0\| / \|X_0\|$ itself, and it is checked here too.

# %%
problems = {
    "function": P.Approximation.function(APPROX_SHAPE, APPROX_RANK, device=device),
    "random target": P.Approximation.random(APPROX_SHAPE, 2 * APPROX_RANK, APPROX_RANK,
                                            seed=SEED, device=device),
    "completion": P.Completion(COMP_SHAPE, COMP_RANK, oversampling=OVERSAMPLING, seed=SEED,
                               device=device),
}
starts = {name: pr.initial_point(SEED) for name, pr in problems.items()}  # packed points X_0
charts = {name: STTPChart(pr.manifold) for name, pr in problems.items()}  # default center

for name, pr in problems.items():
    M, chart, x0 = pr.manifold, charts[name], starts[name]
    X0 = M.to_tt(x0)
    theta0 = chart.inverse(x0)
    roundtrip = float((chart(theta0) - X0).norm() / X0.norm())
    print(f"[{name}] {pr.describe()}")
    if isinstance(pr, P.Approximation):
        print(f"    target TT-ranks {pr.target.ranks}; TT-SVD truncation error (reference) "
              f"{pr.rel_err_svd:.3e}")
    print(f"    f(X0) = {float(pr.loss(X0)):.4f};  chart: center {chart.center}, len(theta) = {chart.dim} "
          f"= dim M = {M.dim}; packed point: {M.size} numbers")
    print(f"    round trip |phi(phi^-1(X0)) - X0| / |X0| = {roundtrip:.1e}")
    assert chart.dim == M.dim and roundtrip < 1e-12

# %% [markdown]
# ## 2. The runs
#
# `solvers.run(problem, method, x0, lr="auto")` applies the step-size rule of
# `solvers.tune_lr` (the same for every method, never adjusted by hand): run the method for
# `tune_iters = 10` iterations from $X_0$ for each step size of the log grid
# $\{10^{-3}, 10^{-2.5}, \dots, 1\}$ (7 values) and keep the one with the smallest loss.
# `rcg` has no step size (exact line search). Times (`History.time`) count only the
# optimization steps, not the tuning and not the evaluation of the metrics.
#
# A run whose loss blows up *after* the 10 tuning iterations ends with status `"diverged"`
# (geoopt's step raises on the non-finite gradient that `egrad2rgrad` asserts against, and
# `solvers.run` records it), keeping the history up to that point.

# %%
TOL = {name: (pr.target_metric, pr.default_tol) for name, pr in problems.items()}
results = {}
wall = time.perf_counter()
for name, pr in problems.items():
    results[name] = {}
    for method in S.METHODS:
        results[name][method] = S.run(pr, method, starts[name], iters=ITERS, lr="auto",
                                         seed=SEED, metrics_every=1, measure_memory=False,
                                         **RULE)
print(f"all runs (tuning included): {time.perf_counter() - wall:.1f} s")


def table(name):
    key, tol = TOL[name]
    print(f"[{name}]  target: {key} <= {tol:g}")
    print(f"  {'method':15s} {'lr':>7s} {'final loss':>11s} {key + ' (final)':>16s} "
          f"{'iters to tol':>12s} {'s to tol':>9s} {'ms/iter':>8s} {'tuning s':>9s}  status")
    for method, h in results[name].items():
        m = h.final_metrics()
        reach = h.reach(key, tol)
        lr = "-" if h.lr is None else f"{h.lr:.3g}"
        print(f"  {method:15s} {lr:>7s} {h.final_loss:11.3e} {m.get(key, float('nan')):16.3e} "
              f"{(str(reach[0]) if reach else '-'):>12s} {(f'{reach[1]:.3f}' if reach else '-'):>9s} "
              f"{1e3 * h.time_per_iter:8.2f} {h.info.get('tune_seconds', 0.0):9.2f}  {h.status}"
              + (f" ({h.info['error']})" if "error" in h.info else ""))
    errs = [h.info["chart_start_rel_err"] for h in results[name].values() if "chart_start_rel_err" in h.info]
    print(f"  chart start, round-trip error recorded by the solver: max {max(errs):.1e}\n")


for name in problems:
    table(name)


# %% [markdown]
# ## 3. Convergence per iteration and per second
#
# The plots show the suboptimality $f(X_t) - f_{\min}$, where $f_{\min}$ is the lowest loss
# that any run reached on that problem (for completion $f_{\min} \approx 0$: the target is
# recovered), on a log scale; chart methods dashed, Riemannian methods solid. Values below
# $10^{-16}$ (rounding of the loss) are clipped. The time axis is the wall-clock time of the
# optimization steps of one run on a shared CPU, so differences of less than about 20% are
# not meaningful.

# %%
def suboptimality(name):
    f_min = min(min(h.loss) for h in results[name].values() if h.loss)
    sub = {}
    for m, h in results[name].items():
        v = np.maximum(np.array(h.loss) - f_min, 1e-16)
        sub[m] = np.where(v > 1e2, np.nan, v)  # a diverging run leaves the plot at the top
    return f_min, sub


fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
for j, name in enumerate(problems):
    f_min, sub = suboptimality(name)
    for method, h in results[name].items():
        if not h.loss:
            continue
        style = dict(color=COLORS[method], ls="--" if method in CHART else "-", lw=1.6,
                     label=method + (" (diverged)" if h.status == "diverged" else ""))
        axes[0, j].semilogy(h.iters, sub[method], **style)
        axes[1, j].semilogy(h.time, sub[method], **style)
    axes[0, j].set_title(f"{name}: $f - f_{{min}}$ per iteration ($f_{{min}}$ = {f_min:.3g})")
    axes[1, j].set_title(f"{name}: $f - f_{{min}}$ per second")
    axes[0, j].set_xlabel("iteration")
    axes[1, j].set_xlabel("seconds (optimization steps only)")
    for ax in axes[:, j]:
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(1e-16, 10)
axes[0, 0].legend(fontsize=8, loc="lower left")
axes[0, 2].legend(fontsize=8, loc="lower left")
fig.tight_layout()
plt.show()


# %% [markdown]
# **What the runs show** (full run; the numbers are those of the tables and plots above).
#
# * **Riemannian methods.** On both approximation problems `rsgd` (the rule picks lr 1) and
#   `rcg` reach the tolerance (gap $\le 10^{-4}$) in 9 to 12 iterations (hundredths of a second), and
#   the optimum to rounding soon after; `radam` needs 26 and 58 iterations (its automatic
#   rule restarts Adam's momentum when it points uphill and halves the lr after a rise) and
#   `rsgd_momentum` 128 and 193. On completion `rcg` recovers the tensor (test error
#   $\le 10^{-6}$) in 41 iterations, `radam` in 133 and `rsgd` in 155; `rsgd_momentum`
#   diverged: the rule chose lr 1 from its 10-iteration look-ahead, and the run blew up
#   later.
# * **Chart methods.** `chart_sgd` and `chart_momentum` end at a loss of about $0.5$ on both
#   approximation problems. That is $f(0) = \frac12\|A\|^2$: the iterate has shrunk to
#   almost zero (its norm at the end is in section 5). On completion they end with test
#   errors of about 1. `chart_adam` is the only chart method that makes real progress:
#   after 300 iterations its loss is $5.5\cdot10^{-4}$ on the function problem (the optimum
#   is $1.7\cdot10^{-11}$), $6.4\cdot10^{-3}$ on the random target (optimum
#   $4.95\cdot10^{-3}$), and its test error on completion is $7.6\cdot10^{-2}$. All three
#   curves flatten out.
# * **Per second.** At these sizes a Riemannian iteration costs at most about as much as a
#   chart iteration (the `ms/iter` column, from single runs on a shared machine; section 8
#   measures it more carefully), so per second, as per iteration, the Riemannian curves are
#   far ahead.

# %% [markdown]
# ## 4. Why: the chart gradient at the start
#
# By the chain rule the chart gradient is $\nabla_\theta f = J^\top \nabla f(X)$ with
# $J = \partial\varphi/\partial\theta$ (a $\dim$-column basis of the tangent space
# $T_X\mathcal M_r$, the chart being non-redundant). Since the columns of $J$ are tangent,
# $\nabla_\theta f = J^\top \mathrm{grad} f(X)$: the chart sees exactly the Riemannian
# gradient, but weighted by $J$. The cell below splits $\nabla_\theta f(\theta_0)$ into
# the blocks of $\theta$ (`chart.layout`: reduced Householder blocks `U0, U1, ...`, the
# full block next to the spectrum, the spectrum `s`, then the right blocks `V...`) and
# compares the block norms with $\|\mathrm{grad} f(X_0)\|$ (`FixedTTRank.riemannian_grad`).
# It also splits the Riemannian gradient into its *radial* component (along $X_0$ itself,
# i.e. changing only the scale of $X$) and the rest (changing the "shape": the frames).
#
# The second row shows the size of the *first step* per block for `chart_sgd` and
# `chart_adam` at the step sizes the rule chose: SGD moves each block by
# $\alpha\,\|\nabla_{\theta_b} f\|$, while Adam's first step is $\alpha\, g/(|g| + \epsilon)$
# coordinate by coordinate, i.e. about $\alpha\sqrt{\text{block size}}$ per block whatever
# the gradient's scale.

# %%
def chart_gradient(problem, chart, theta):
    th = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(problem.loss(chart(th)), th)
    return g


def x_as_tangent(M, p):
    # X itself as a tangent vector at p: packed deltas (0, ..., 0, U_d)
    k = math.prod(M.core_shapes[-1])
    xt = torch.zeros_like(p)
    xt[-k:] = p[-k:]
    return xt


def adam_first_step(problem, chart, theta, lr):
    th = theta.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([th], lr=lr)
    problem.loss(chart(th)).backward()
    opt.step()
    return (th.detach() - theta).abs()


block_data = {}
for name, pr in problems.items():
    M, chart, x0 = pr.manifold, charts[name], starts[name]
    theta0 = chart.inverse(x0)
    g = chart_gradient(pr, chart, theta0)
    rg = M.riemannian_grad(x0, pr.loss)
    xt = x_as_tangent(M, x0)
    radial = float((rg * xt).sum() / xt.norm())
    rest = math.sqrt(max(float(rg.norm()) ** 2 - radial ** 2, 0.0))
    # check of the chain rule in tangent coordinates: grad_theta = J^T grad f(X)
    J = torch.autograd.functional.jacobian(lambda t: M.project(x0, chart(t)), theta0, vectorize=True)
    chain_err = float((J.T @ rg - g).norm() / g.norm())
    lr_sgd, lr_adam = results[name]["chart_sgd"].lr, results[name]["chart_adam"].lr
    step_adam = adam_first_step(pr, chart, theta0, lr_adam)
    rows = []
    for b in chart.layout:
        sl = slice(b.start, b.start + b.size)
        rows.append((b.name, b.kind, b.size, float(g[sl].norm()), lr_sgd * float(g[sl].norm()),
                     float(step_adam[sl].norm())))
    block_data[name] = dict(rows=rows, rgrad=float(rg.norm()), radial=radial, rest=rest,
                            lr_sgd=lr_sgd, lr_adam=lr_adam)
    print(f"[{name}] |grad f(X0)| = {float(rg.norm()):.3e}: radial part {abs(radial):.3e}, the rest "
          f"{rest:.3e};  |J^T grad f - grad_theta f| / |grad_theta f| = {chain_err:.1e}")
    print(f"    {'block':6s} {'kind':9s} {'size':>5s} {'|grad_theta f|':>15s} "
          f"{'SGD step (lr ' + format(lr_sgd, '.3g') + ')':>22s} {'Adam step (lr ' + format(lr_adam, '.3g') + ')':>24s}")
    for r_ in rows:
        print(f"    {r_[0]:6s} {r_[1]:9s} {r_[2]:5d} {r_[3]:15.3e} {r_[4]:22.3e} {r_[5]:24.3e}")
    ratios = [r_[5] / r_[4] for r_ in rows if r_[1] != "spectrum"]
    print(f"    first step, Adam / SGD over the Householder blocks: {min(ratios):.0f} to {max(ratios):.0f} times")

fig, axes = plt.subplots(2, 3, figsize=(16, 7.5))
for j, (name, bd) in enumerate(block_data.items()):
    names = [r_[0] for r_ in bd["rows"]]
    xs = np.arange(len(names))
    colors = ["C3" if r_[1] == "spectrum" else ("C1" if r_[1] == "full" else "C0") for r_ in bd["rows"]]
    ax = axes[0, j]
    ax.bar(xs, [r_[3] for r_ in bd["rows"]], color=colors)
    ax.axhline(bd["rgrad"], color="k", lw=1.5, label=r"$\|\mathrm{grad}\, f(X_0)\|$")
    ax.axhline(bd["rest"], color="k", lw=1.2, ls=":", label=r"same, radial part removed")
    ax.set_yscale("log")
    ax.set_xticks(xs, names)
    ax.set_title(f"{name}: chart gradient per block at $\\theta_0$")
    ax.set_ylim(top=30 * max(bd["rgrad"], max(r_[3] for r_ in bd["rows"])))
    ax.legend(fontsize=8, loc="upper right")
    ax = axes[1, j]
    ax.bar(xs - 0.2, [r_[4] for r_ in bd["rows"]], width=0.4, color="C0", label=f"chart_sgd (lr {bd['lr_sgd']:.3g})")
    ax.bar(xs + 0.2, [r_[5] for r_ in bd["rows"]], width=0.4, color="C2", label=f"chart_adam (lr {bd['lr_adam']:.3g})")
    ax.set_yscale("log")
    ax.set_xticks(xs, names)
    ax.set_title(f"{name}: size of the first step per block")
    ax.set_ylim(top=30 * max(max(r_[4], r_[5]) for r_ in bd["rows"]))
    ax.legend(fontsize=8, loc="upper right", ncol=2)
for ax in axes.ravel():
    ax.grid(True, axis="y", which="both", alpha=0.3)
fig.text(0.01, 0.98, "blue: reduced Householder blocks, orange: full Householder blocks, red: spectrum s",
         fontsize=9, va="top")
fig.tight_layout(rect=(0, 0, 1, 0.97))
plt.show()


# %% [markdown]
# **Reading the bars.** At the random start, the Riemannian gradient is almost entirely
# *radial*. $X_0$ and $A$ are nearly orthogonal unit-norm tensors, so $f(X_0) \approx 1$ and
# $\mathrm{grad} f(X_0) = X_0 - P_{X_0}A \approx X_0$. The rest, the part that would turn $X$
# towards $A$, has norm $6.5\cdot10^{-3}$ (function), $2.0\cdot10^{-2}$ (random target) and
# $0.44$ (completion). The radial direction lies in the span of the spectrum block's
# columns, so $\|\nabla_s f\| \approx 1$. Every Householder block gets between
# $7\cdot10^{-4}$ and $7\cdot10^{-3}$ on the approximation problems (0.06 to 0.14 on
# completion).
#
# * **Chart SGD therefore spends its first steps shrinking $s$.** With lr 1 it removes the
#   radial part at once and moves the frames by about $10^{-3}$. Once $s$ is small, the
#   Householder columns of $J$, which carry factors of the singular values, are small too,
#   and the frames stop moving. The run then sits near $X = 0$, where $f = 0.5$. Section 6
#   shows that this is not a matter of the step size.
# * **A Riemannian step with lr 1 does something different in kind.**
#   $X_0 - \mathrm{grad} f(X_0) = P_{X_0}A$ is a tangent vector whose direction is set
#   entirely by the non-radial part, and the retraction makes it the next iterate whatever
#   its norm. So one step turns $X$ towards $A$ by a large angle. In chart coordinates the
#   same move would need changes of order one in the Householder parameters.
# * **Adam's first step moves every coordinate by about its learning rate,** whatever the
#   gradient's scale. On the approximation problems the Householder blocks move 50 to 570
#   times farther than with SGD (printed above); on completion, where their gradients are
#   larger, 2 to 3 times. The spectrum moves by only $0.063 = 0.0316\sqrt 4$. This
#   per-coordinate rescaling is what lets `chart_adam` leave the start. It is a diagonal
#   rescaling of $\theta$, not a correction of the geometry, and its progress stalls
#   (section 5).

# %% [markdown]
# ## 5. Why, continued: the Jacobian of the chart, and the Hessian at the solution
#
# How well chart coordinates suit a gradient method depends on the singular values of $J$:
# a unit change of $\theta$ moves $X$ by between $\sigma_{\min}(J)$ and $\sigma_{\max}(J)$.
# The cell computes $J$ in the (isometric) tangent coordinates of `FixedTTRank`, as the
# Jacobian of $\theta \mapsto P_{X}\varphi(\theta)$ at $\theta = \varphi^{-1}(X)$, at four
# points of each problem: the start, the final points of `chart_sgd` and `chart_adam`, and
# the final point of `rcg` (the solution). It also lists the smallest and largest singular
# values over all unfoldings of $X$ (the bond singular values) and $\|X\|$.
#
# At the solution $X_*$ (a critical point) the Hessian of $f \circ \varphi$ is exactly
# $J^\top H J$, with $H$ the Riemannian Hessian of $f$ in orthonormal tangent coordinates,
# so its condition number lies between $\kappa(J)^2/\kappa(H)$ and $\kappa(J)^2\kappa(H)$:
# a chart method converging to $X_*$ faces the condition number of $J^\top H J$, a
# Riemannian gradient method that of $H$. Both are computed below (the Hessian of
# $f\circ\varphi$ by automatic differentiation; $H$ from it through the QR factorization
# $J = QR$, $H = R^{-\top}(J^\top H J)R^{-1}$; its accuracy is limited by $\kappa(J)^2$ times
# the rounding error of the Hessian).

# %%
def bond_singular_values(x):
    # singular values of every unfolding X^<k>, k = 1..d-1 (orthogonality center at core k-1)
    out = []
    for k in range(1, x.ndim):
        c = orthogonalize(x, center=k - 1).cores[k - 1]
        out.append(torch.linalg.svdvals(c.reshape(-1, c.shape[2])))
    return out


def chart_jacobian(chart, p):
    M = chart.manifold
    theta = chart.inverse(p)
    return theta, torch.autograd.functional.jacobian(lambda t: M.project(p, chart(t)), theta,
                                                     vectorize=True)


jac_data = {}
for name, pr in problems.items():
    M, chart = pr.manifold, charts[name]
    pts = {"start": starts[name]}
    for method in ("chart_sgd", "chart_adam", "rcg"):
        h = results[name][method]
        if h.x is not None and h.status != "diverged":
            pts[f"{method} end"] = h.x if method == "rcg" else M.pack_point(h.x)
    jac_data[name] = {}
    print(f"[{name}]")
    print(f"    {'point':15s} {'|X|':>6s} {'sigma_min(J)':>13s} {'sigma_max(J)':>13s} {'kappa(J)':>10s} "
          f"{'min_b sigma_min(J_b)':>21s} {'bond sv min':>12s} {'bond sv max':>12s}")
    for label, p in pts.items():
        try:
            theta, J = chart_jacobian(chart, p)
        except ValueError as e:  # outside the chart's domain
            print(f"    {label:15s} outside the chart domain: {str(e)[:80]}")
            continue
        sv = torch.linalg.svdvals(J)
        per_block = min(float(torch.linalg.svdvals(J[:, b.start:b.start + b.size])[-1]) for b in chart.layout)
        bs = bond_singular_values(M.to_tt(p))
        jac_data[name][label] = dict(sv=sv.cpu().numpy(), theta=theta, J=J, p=p)
        print(f"    {label:15s} {float(M.to_tt(p).norm()):6.3f} {float(sv[-1]):13.2e} {float(sv[0]):13.2e} "
              f"{float(sv[0] / sv[-1]):10.2e} {per_block:21.2e} {min(float(s[-1]) for s in bs):12.2e} "
              f"{max(float(s[0]) for s in bs):12.2e}")

print("\nHessians at the solution (final point of rcg):")
print(f"    {'problem':14s} {'|grad f|':>9s} {'kappa(J)^2':>11s} {'eig(J^T H J)':>22s} {'kappa':>9s} "
      f"{'eig(H)':>20s} {'kappa(H)':>9s}")
for name, pr in problems.items():
    d = jac_data[name].get("rcg end")
    if d is None:
        continue
    chart, M = charts[name], pr.manifold
    Hc = torch.autograd.functional.hessian(lambda t: pr.loss(chart(t)), d["theta"], vectorize=True)
    Hc = 0.5 * (Hc + Hc.T)
    ec = torch.linalg.eigvalsh(Hc)
    Q, R = torch.linalg.qr(d["J"])
    Hr = torch.linalg.solve_triangular(R.T, Hc, upper=False)       # R^-T (J^T H J)
    Hr = torch.linalg.solve_triangular(R, Hr, upper=True, left=False)  # ... R^-1
    er = torch.linalg.eigvalsh(0.5 * (Hr + Hr.T))
    gnorm = float(M.riemannian_grad(d["p"], pr.loss).norm())
    kj = float(d["sv"][0] / d["sv"][-1])
    print(f"    {name:14s} {gnorm:9.1e} {kj ** 2:11.2e} [{float(ec[0]):9.2e}, {float(ec[-1]):9.2e}] "
          f"{float(ec[-1] / ec[0]):9.2e} [{float(er[0]):8.2e}, {float(er[-1]):8.2e}] {float(er[-1] / er[0]):9.2e}")

fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
styles = {"start": dict(color="k"), "chart_sgd end": dict(color=COLORS["chart_sgd"], ls="--"),
          "chart_adam end": dict(color=COLORS["chart_adam"], ls="--"), "rcg end": dict(color=COLORS["rcg"])}
for ax, (name, dd) in zip(axes, jac_data.items()):
    for label, d in dd.items():
        ax.semilogy(np.arange(1, len(d["sv"]) + 1), d["sv"], label=label, **styles[label])
    ax.set_title(f"{name}: singular values of the chart Jacobian $J$")
    ax.set_xlabel("index")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Reading the table and the plot.**
#
# * **At the start**, $\kappa(J) \approx 90$ to $150$: the chart is moderately distorted
#   even at a random point whose bond singular values lie between 0.1 and 0.72.
# * **At the end of `chart_sgd`** on the approximation problems, $\|X\| \le 0.003$ and all
#   bond singular values are below $2.2\cdot10^{-3}$. Only the four spectrum columns of $J$,
#   which have unit norm whatever $s$ is, keep singular values of 1. The next singular value
#   is below $10^{-2}$, and the smallest is $9\cdot10^{-6}$ (function) and $5\cdot10^{-5}$
#   (random target) (dashed blue curves). The frames can no longer move: this is the plateau
#   at $f = 0.5$.
# * **At the solution of the function problem**, the smallest bond singular value is
#   $1.5\cdot10^{-5}$ and $\kappa(J) = 2.2\cdot10^{6}$. The Hessian of $f\circ\varphi$ has
#   condition number $4.75\cdot10^{12} = \kappa(J)^2$, while the Riemannian Hessian has
#   eigenvalues in $[0.91, 1.05]$. Gradient descent with step 1 on the manifold therefore
#   contracts the error by a factor of about 0.1 per iteration near the solution, which
#   matches `rsgd` converging in about ten iterations. In chart coordinates the same local
#   problem is conditioned like $10^{12}$.
# * **At the solutions of the random target and of completion**, the singular values are
#   not small (at least 0.11), and each block of $J$ on its own is reasonably conditioned
#   (per-block $\sigma_{\min} \ge 0.13$). Yet $\kappa(J) = 331$ and $458$, because columns of
#   *different* blocks are nearly parallel. The chart Hessians have condition numbers
#   $1.1\cdot10^{5}$ and $2.9\cdot10^{5}$, against $1.01$ and $8.9$ for the Riemannian ones.
#
# So the chart methods carry two handicaps that the Riemannian methods do not. Near the
# solution they face Hessians conditioned like $\kappa(J)^2$, which is inflated both by small
# singular values of the solution and by the non-orthogonality of the Householder
# coordinates. Far from the solution, plain SGD and momentum collapse the spectrum
# (section 4).

# %% [markdown]
# ## 6. Is it the step size?
#
# The rule looks only 10 iterations ahead. To see whether another step size of the grid
# would have rescued the chart methods, each chart method is rerun for the full number of
# iterations with *every* step size of the grid, and the best final loss is compared with
# the one of the rule's choice and with the best Riemannian run (suboptimality
# $f - f_{\min}$ as in section 3).

# %%
grid = S.lr_grid(RULE["grid_size"])
wall = time.perf_counter()
print(f"suboptimality f - f_min after {ITERS} iterations; grid {[float(f'{a:.3g}') for a in grid]}")
for name, pr in problems.items():
    f_min, _ = suboptimality(name)
    best_riem = min(results[name][m].final_loss for m in RIEM if results[name][m].loss) - f_min
    print(f"[{name}]  best Riemannian run: {max(best_riem, 0.0):.2e}")
    for method in CHART:
        finals = {}
        for lr in grid:
            h = S.run(pr, method, starts[name], iters=ITERS, lr=lr, seed=SEED, metrics_every=0,
                         measure_memory=False)
            ok = h.status != "diverged" and h.loss and math.isfinite(h.final_loss)
            finals[lr] = h.final_loss - f_min if ok else math.inf
        best = min(grid, key=lambda a: finals[a])
        tuned = results[name][method]
        print(f"    {method:15s} rule's lr {tuned.lr:.3g}: {tuned.final_loss - f_min:.2e};  best lr of the "
              f"grid {best:.3g}: {finals[best]:.2e};  per lr: "
              + ", ".join("div" if not math.isfinite(v) else f"{v:.1e}" for v in finals.values()))
print(f"({time.perf_counter() - wall:.1f} s)")

# %% [markdown]
# No step size of the grid gets `chart_sgd` or `chart_momentum` off the plateau at
# $f - f_{\min} \approx 0.5$ on the approximation problems within 300 iterations. On
# completion, `chart_momentum` with lr 1 ends at $1.7\cdot10^{-2}$ instead of 0.52 with the
# rule's lr 0.0316, so there the 10-iteration look-ahead chose badly, but the run is still
# far from recovery. For `chart_adam` the rule's choice is the best lr of the grid, or within
# 10% of it (function: $5.5\cdot10^{-4}$ against $5.2\cdot10^{-4}$ at lr 0.01). The best
# chart runs stay $5\cdot10^{-4}$ to $3\cdot10^{-3}$ above $f_{\min}$, where the Riemannian
# runs reach rounding level. The step-size rule is not what separates the two families here.

# %% [markdown]
# ## 7. The chart's domain
#
# The STTP chart covers an open dense subset of $\mathcal M_r$: every *reduced* Householder
# frame needs a nonsingular leading $r \times r$ block (`03_sttp_chart.ipynb`, section 4).
# Random points are inside with probability one, but structured points need not be. A
# realistic example is the *spectral* start for completion (`initial_point(kind="spectral")`,
# the TT-SVD of the rescaled zero-filled data, the `compare` command's default for small
# tensors) when the samples are sparse. Then almost no row of the last unfolding holds more
# than one sample, so its Gram matrix is (nearly) diagonal, and the frame of the last core of
# the start consists of (nearly) coordinate vectors. Its leading block is singular unless the
# selected coordinates happen to be the first ones.

# %%
dom = P.Completion((5,) * 8, 2, seed=SEED, device=device)  # oversampling 10 (default)
x_spec = dom.initial_point(SEED, kind="spectral")
Md = dom.manifold
print(dom.describe())
last = orthogonalize(Md.to_tt(x_spec), "right").cores[-1]
print("outer frame of the last core (transposed right unfolding), rounded:")
print(last.reshape(last.shape[0], -1).T.cpu().numpy().round(6))
for c in range(1, Md.d):
    try:
        STTPChart(Md, center=c).inverse(x_spec)
        print(f"center {c}: inside the domain")
    except ValueError as e:
        print(f"center {c}: ValueError: {str(e).split(': ', 2)[2].split(', so')[0]}")
h = S.run(dom, "rcg", x_spec, iters=20, metrics_every=0, measure_memory=False)
print(f"rcg runs from this start (20 iterations): test_err {dom.metrics(x_spec)['test_err']:.3f} -> "
      f"{dom.metrics(h.x)['test_err']:.3f}")


# %% [markdown]
# At this sampling density (1120 samples of a tensor with $5^8 = 390625$ entries), the
# spectral start lies outside the chart's domain for every choice of the center. The frame of
# the last core printed above consists of two coordinate vectors, and for the centers 6 and 7
# an inner left frame fails instead.
#
# `solvers.run` with a chart method cannot start from such a point: it returns at once with
# status `"outside chart domain"` (and the reason in `History.info["error"]`), which is what
# `ttmanifold compare` then reports for the chart methods on such a problem (e.g.
# `--problems completion --d 8 --n 5 --rank 2`). The Riemannian methods need no domain and run from any point of
# $\mathcal M_r$. That `rcg` makes no progress from this particular start in 20 iterations is
# a property of the start: at 10 samples per degree of freedom of so sparse a tensor, the
# spectral initialization carries little information. For these reasons the comparison above
# uses random starts, which lie inside the domain with probability one.

# %% [markdown]
# ## 8. Cost per iteration
#
# The times in section 2 come from single runs on a shared machine. Here the cost of an
# iteration is measured more carefully: every method runs a few iterations with a fixed step
# size of $10^{-3}$ (the cost of a step does not depend on it), the methods take turns
# (three rounds, so that a change of the machine's load affects all of them alike), and the
# reported value is the smallest over the rounds of the median time per step. First on the
# three problems above, then on the random-target approximation problem with $d = 10$,
# $n = 20$ (quick mode: smaller) as the rank grows. The last column is the range of the
# ratio (ms per chart step) / (ms per Riemannian step) over the pairs of methods. The
# number of stored values per iterate is listed too: $\theta$ has $\dim\mathcal M_r$ entries, a packed point
# $\sum_k r_{k-1} n_k r_k = \dim\mathcal M_r + \sum_k r_k^2$; optimizer state is one
# (momentum) or two (Adam) more vectors of that length.

# %%
def cost_per_iter(problem, methods, x0, iters, rounds=3):
    # ms per step: min over interleaved rounds of the median step time
    best = {m: math.inf for m in methods}
    for _ in range(rounds):
        for m in methods:
            h = S.run(problem, m, x0, iters=iters, lr=1e-3, seed=SEED, metrics_every=0,
                      measure_memory=False)
            best[m] = min(best[m], 1e3 * float(np.median(np.diff(h.time))))
    return best


def chart_over_riemannian(c):
    # (smallest, largest) ratio of a chart method's step time to a Riemannian method's
    ch = [c[m] for m in c if m in CHART]
    ri = [c[m] for m in c if m not in CHART]
    return min(ch) / max(ri), max(ch) / min(ri)


print(f"ms per iteration on the problems of sections 1-3 ({SCALING['iters']} steps x 3 rounds)")
print(f"    {'problem':14s} " + " ".join(f"{m:>14s}" for m in S.METHODS) + "   chart / Riemannian")
for name, pr in problems.items():
    c = cost_per_iter(pr, S.METHODS, starts[name], SCALING["iters"])
    lo, hi = chart_over_riemannian(c)
    print(f"    {name:14s} " + " ".join(f"{c[m]:14.2f}" for m in S.METHODS) + f"   {lo:.2f} to {hi:.2f}")

sc_methods = ("chart_sgd", "chart_adam", "rsgd", "radam", "rcg")
shape_sc = (SCALING["n"],) * SCALING["d"]
timings = {m: [] for m in sc_methods}
print(f"\nrandom-target approximation, shape {SCALING['n']}^{SCALING['d']}: ms per iteration")
print(f"    {'rank':>4s} {'dim M':>7s} {'packed':>7s} " + " ".join(f"{m:>11s}" for m in sc_methods)
      + "   chart / Riemannian")
for r in SCALING["ranks"]:
    pr = P.Approximation.random(shape_sc, min(2 * r, SCALING["n"]), r, seed=SEED, device=device)
    c = cost_per_iter(pr, sc_methods, pr.initial_point(SEED), SCALING["iters"])
    for m in sc_methods:
        timings[m].append(c[m])
    lo, hi = chart_over_riemannian(c)
    print(f"    {r:4d} {pr.manifold.dim:7d} {pr.manifold.size:7d} " + " ".join(f"{c[m]:11.2f}" for m in sc_methods)
          + f"   {lo:.2f} to {hi:.2f}")

fig, ax = plt.subplots(figsize=(6.5, 4))
for m in sc_methods:
    ax.loglog(SCALING["ranks"], timings[m], "o" + ("--" if m in CHART else "-"), color=COLORS[m], label=m)
ax.set_xticks(SCALING["ranks"], [str(r) for r in SCALING["ranks"]])
ax.set_xticks([], minor=True)
ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
ax.set_xlabel("TT-rank r")
ax.set_ylabel("ms per iteration")
ax.set_title(f"cost per iteration, shape {SCALING['n']}^{SCALING['d']}")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 9. When does each approach win?
#
# What the numbers above support (one seed, one size per problem, 300 iterations, timings
# from a shared CPU):
#
# * **Accuracy and iterations: Riemannian.** On all three problems the Riemannian methods
#   reach the optimum to rounding (approximation) or recover the tensor (completion, except
#   the diverged `rsgd_momentum`). `rsgd` and `rcg` need about 10 iterations on
#   approximation. No chart method reaches any of the tolerances. The best chart method,
#   `chart_adam`, stops at $f - f_{\min}$ between $5\cdot10^{-4}$ and $3\cdot10^{-3}$,
#   where the Riemannian runs reach rounding level.
# * **Cost per iteration: Riemannian cheaper up to moderate rank, chart cheaper at rank 16.**
#   A chart step is one forward and backward pass through compact-WY Householder products.
#   `rsgd`, `rsgd_momentum` and `radam` differentiate the loss through the tangent TT of
#   Riemannian autodiff (inner products and sampled entries at rank $r$, see notebook 02)
#   and retract with a TT-SVD; `rcg` computes its gradient and step without autograd
#   (`cg_grad`, `exact_step`). Section 8 prints the ratio of the step times. On the
#   approximation problems of sections 1-3 a chart step costs about 2 to 2.7 times a
#   Riemannian one; on completion, where every method runs the same kernels on the sampled
#   entries, they cost about the same. On the random-target problem with $d = 10$,
#   $n = 20$ the Riemannian step is 1.2 to 3.4 times cheaper up to rank 8, but the TT-SVD of
#   its retraction grows like $r^3$, and at rank 16 the chart step is the cheaper one, by a
#   factor of about 1.1 to 2 (last column). That pays off only if a chart method needs at
#   most that factor more iterations, which is not the case for any problem here: no chart
#   method reaches the tolerances at all.
# * **Conditioning: Riemannian.** The chart's local conditioning is that of $J^\top H J$,
#   i.e. up to $\kappa(J)^2$ worse than the Riemannian Hessian $H$. $\kappa(J)$ grows with
#   small singular values of the iterate (function problem: $\kappa(J)^2 = 4.75\cdot10^{12}$
#   at the solution) and with the skew of the Householder coordinates ($\kappa(J)^2 = 1.1\cdot10^5$
#   and $2.1\cdot10^5$ at the well-conditioned solutions of the other two problems). For problems whose natural Riemannian step is good
#   (approximation, with $H \approx I$), the chart throws that advantage away.
# * **Far from the solution**, the columns of $J$ for the spectrum have unit norm, while
#   those for the frames carry factors of the singular values. At a random start, where the
#   gradient is mostly radial, plain SGD and momentum collapse the spectrum and stall at
#   $X \approx 0$. Adam's per-coordinate scaling
#   avoids the collapse but does not fix the conditioning.
# * **Chart domain.** A chart method can only start inside the domain (nonsingular leading
#   blocks of the reduced frames). Structured starts, such as the spectral start of sparse
#   completion, can lie outside it for every center. Riemannian methods have no such
#   restriction.
# * **Memory: no real difference at these sizes.** $\theta$ has $\dim\mathcal M_r$ numbers
#   and a packed point $\dim\mathcal M_r + \sum_k r_k^2$ (784 against 880 here; 39296
#   against 41600 at $r = 16$, $d = 10$, $n = 20$), and optimizer states scale alike. Peak
#   memory was not measured: the solver's CPU measurement samples the process's resident
#   memory and cannot resolve states of a few hundred kilobytes.
# * **Where the chart is the natural choice** (not measured here). The chart is a plain
#   parameter vector. Any `torch.optim` optimizer and any training loop work with it, and the
#   spectrum is an explicit parameter that constraints act on (Lipschitz normalization, the
#   D-optimal penalty, `03_sttp_chart.ipynb`). In training, where a few digits of the loss
#   suffice and Adam is used anyway, the comparison can come out differently;
#   `05_sttp_layers.ipynb` compares chart Adam and manifold RAdam on a classification task.
#   For fitting problems that need accuracy, like the approximation and
#   completion problems here, the Riemannian methods, and `rcg` in particular, are the better
#   tool in every respect measured here except, at larger ranks, the cost of a single
#   iteration.

# %% [markdown]
# ## Summary
#
# * **Setup.** Seven methods ran from one random start per problem. The chart methods
#   started at $\theta_0 = \varphi^{-1}(X_0)$, with round-trip error about $10^{-15}$, and
#   step sizes came from the package's rule (`tune_lr`: 7-point log grid, 10-iteration
#   look-ahead). The problems were approximation of a function-related tensor and of a
#   random rank-$2r$ target ($d = 7$, $n = 10$, $r = 4$) and completion ($d = 6$, $n = 8$,
#   $r = 4$, $20\dim$ samples), with 300 iterations each.
# * **Riemannian methods win.** `rsgd` and `rcg` reach the approximation optimum in about
#   10 iterations (hundredths of a second). `rcg` recovers the completion target in 41 iterations, `rsgd` in
#   155. `chart_sgd` and `chart_momentum` stall at $f \approx f(0) = 0.5$ on approximation,
#   and `chart_adam` plateaus at $f - f_{\min} \approx 5\cdot10^{-4}$ to $3\cdot10^{-3}$,
#   where the Riemannian runs reach rounding level. No grid step size changes this
#   (section 6).
# * **Why, part 1: the start.** The chart gradient is $J^\top \mathrm{grad} f$. At a random
#   start the Riemannian gradient is almost radial, so in the chart it sits in the spectrum
#   block ($\approx 1$) and the frame blocks get $10^{-3}$. SGD collapses $s$, after which the
#   frames cannot move. Adam's per-coordinate scaling moves the frames 50 to 570 times
#   farther on its first step (approximation) and escapes.
# * **Why, part 2: conditioning.** At the solutions the Hessian of $f\circ\varphi$ is
#   $J^\top H J$. Its condition number was $4.75\cdot10^{12}$, $1.1\cdot10^{5}$ and
#   $2.9\cdot10^{5}$, against 1.15, 1.01 and 8.9 for the Riemannian Hessian $H$. The cause is
#   small singular values of the solution and nearly parallel columns of $J$ from different
#   Householder blocks.
# * **Cost and domain.** Per iteration a Riemannian step costs about half of a chart step
#   on approximation at these sizes and about the same on completion; at rank 16 with
#   $d = 10$, $n = 20$ the chart step is cheaper, by a factor of about 1.1 to 2
#   (section 8). The chart needs its domain, though: a spectral completion start was
#   outside it for every center.
# * **Practicalities.** `solvers.run` reports a run that diverges after the tuning
#   look-ahead (status `"diverged"`) and a chart method started outside the chart's domain
#   (status `"outside chart domain"`) instead of raising.
