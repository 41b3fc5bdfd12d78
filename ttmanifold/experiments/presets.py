"""Named comparison settings from the literature (``ttmanifold compare --preset NAME``).

Each preset builds completion problems, runs every listed method from the stated start
for a time budget, and reports when each reaches the preset's target (iterations and
seconds), plus the final errors. ``steinlechner``: random TT, d = 10, n = 20, rank r,
training and test sets of ``10 d n r^2`` entries each; fixed-rank methods from the oracle
start (the target plus 30 % noise, rounded) and rank-adaptive RCG from rank 1 (no oracle).
``t3f-tutorial``: shape (3, 4, 4, 5, 7, 5), TT-rank 5 (clipped to the feasible ranks),
25 % of the entries observed with additive Gaussian noise of standard deviation 1e-2 on
entries of unit mean square, the rest as the test set; the target is a test MSE of 1.3x
the noise floor ``1e-4``, from a random start (a least-squares fit of ``N`` noisy samples
with ``p = dim M`` parameters has an expected test MSE of about
``sigma^2 (1 + p / (N - p))``, 1.22x here: t3f's 2.5e-5 against 2.1e-5, 1.19x, is out
of reach at this sampling rate). ``psenka-boumal``: d = 9, n = 4, ranks
(1, 3, 5, 10, 10, 10, 10, 5, 3, 1), 10 % of the entries observed, several seeds, random
starts: success rate and time to test error 1e-8. ``function``: ``exp(-||x||)`` on a 20^5
grid of [0, 1]^5 from 49,000 samples (100 of them the rank-adaptive control set), ranks up
to 7: relative error on 10^5 other grid points. ``image``: a photograph shipped with
scikit-learn, tensorized with interleaved row and column bits, completed from 10, 20 and
30 % of its pixels by rank-adaptive completion: PSNR against the number of parameters,
and a figure. :func:`recovery_phase` (``benchmarks/completion_phase.py``): the fraction
of random TTs recovered against ``|Omega| / dim M`` from random and rank-1 starts. Setup
and measured numbers: ``docs/comparison.md#presets``.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch

from . import problems as P
from . import solvers
from .solvers import History
from ..manifold import FixedTTRank
from ..tt import TT

__all__ = ["PRESETS", "build_preset", "run_preset", "exp_norm_values", "tensorize_image",
           "untensorize_image", "sample_image", "psnr", "image_completion", "save_image_figure",
           "PHASE_METHODS", "rank_one_start", "recovery_phase", "phase_table", "plot_phase"]

PRESETS = ("steinlechner", "t3f-tutorial", "psenka-boumal", "function", "image")


def _steinlechner(rank: int, seed: int, quick: bool, core_dist: str = "uniform"):
    d, n = (6, 10) if quick else (10, 20)
    size = 10 * d * n * rank * rank
    pb = P.Completion((n,) * d, rank, train_size=size, test_size=size, seed=seed,
                      core_dist=core_dist)
    methods = ["rcg", "rtr", "rlbfgs", "als", "chart_lbfgs", "chart_gd_armijo",
               "rank_adaptive"]
    if core_dist == "uniform":
        # TTeMPS's examples: the start is another random TT of the data's kind
        x0 = pb.initial_point(seed, kind="random", core_dist="uniform")
        start = "random TT with uniform cores, as TTeMPS (rank-adaptive: rank 1)"
    else:
        # from a random start no method recovers a Gaussian-core tensor at these sizes
        x0 = pb.initial_point(seed, kind="perturbed", distance=0.3)
        start = "oracle: target + 30% noise (rank-adaptive: rank 1)"
    return dict(problem=pb, x0=x0, start=start, methods=methods, key="test_err", tol=1e-8,
                max_rank=rank)


def _t3f(seed: int, quick: bool):
    shape = (3, 4, 4, 5, 7, 5)
    gen = torch.Generator().manual_seed(seed)
    target = P.random_tt(shape, [1, 3, 5, 5, 5, 5, 1], generator=gen)
    total = math.prod(shape)
    target = target * math.sqrt(total)  # entries of unit mean square
    idx = torch.randperm(total, generator=gen)
    n_obs = int(0.25 * total)
    multi = torch.stack(torch.unravel_index(idx, shape), 1)
    full = target.full().reshape(-1)[idx]
    noisy = full + 1e-2 * torch.randn(total, generator=gen, dtype=full.dtype)
    pb = P.Completion.from_data(multi[:n_obs], noisy[:n_obs], shape, 5,
                                test=(multi[n_obs:], noisy[n_obs:]), seed=seed)
    floor = 1e-4
    x0 = pb.initial_point(seed)
    methods = ["rcg", "rtr", "rlbfgs", "als", "radam", "chart_lbfgs", "chart_adam"]
    return dict(problem=pb, x0=x0, start="random", methods=methods, key="test_mse",
                tol=1.3 * floor, max_rank=5)


# psenka-boumal: (quick: d = 6, 30 % observed, 2 seeds)
_PB_RANKS = (1, 3, 5, 10, 10, 10, 10, 5, 3, 1)
_PB_QUICK_RANKS = (1, 2, 3, 3, 3, 2, 1)


def _psenka_boumal(seed: int, quick: bool):
    ranks = _PB_QUICK_RANKS if quick else _PB_RANKS
    d, n = len(ranks) - 1, 4
    frac = 0.3 if quick else 0.1
    total = n ** d
    pb = P.Completion((n,) * d, ranks[1:-1], train_size=int(frac * total),
                      test_size=min(10000, total - int(frac * total)), seed=seed)
    x0 = pb.initial_point(seed)
    methods = ["rcg", "rtr", "rlbfgs", "als", "rank_adaptive"]
    return dict(problem=pb, x0=x0, start="random (rank-adaptive: rank 1)", methods=methods,
                key="test_err", tol=1e-8, max_rank=max(ranks), seeds=2 if quick else 10)


def exp_norm_values(indices: torch.Tensor, n: int) -> torch.Tensor:
    """``exp(-||x||)`` at the grid points ``x_k = i_k / (n - 1)`` of the multi-indices
    ``indices`` (an ``(N, d)`` int tensor): the ``function`` preset's data.

    Args:
        indices: ``(N, d)`` integer multi-indices in ``[0, n)``; n: points per axis (>= 2).
    Returns:
        ``(N,)`` float64 values on the indices' device. Cost: O(N d).
    """
    if n < 2:
        raise ValueError(f"n: expected at least 2 grid points, got {n}")
    x = indices.to(torch.float64) / (n - 1)
    return torch.exp(-torch.linalg.vector_norm(x, dim=1))


def _function(seed: int, quick: bool):
    d, n, n_train, n_ctrl, n_test, rank = ((4, 8, 1000, 50, 1000, 3) if quick
                                           else (5, 20, 49000, 100, 100000, 7))
    shape = (n,) * d
    gen = torch.Generator().manual_seed(seed)
    idx = P.sample_distinct_indices(shape, n_train + n_test, generator=gen)
    vals = exp_norm_values(idx, n)
    pb = P.Completion.from_data(idx[:n_train], vals[:n_train], shape, rank,
                                test=(idx[n_train:], vals[n_train:]), seed=seed)
    x0 = pb.initial_point(seed)
    methods = ["rank_adaptive", "rcg", "rlbfgs", "als"]
    return dict(problem=pb, x0=x0,
                start=f"random at rank {rank} (rank-adaptive: rank 1, control set of "
                      f"{n_ctrl} of the {n_train} samples)",
                methods=methods, key="test_err", tol=1e-4, max_rank=rank,
                ra_opts=dict(control_fraction=n_ctrl / n_train))


def tensorize_image(img: torch.Tensor) -> torch.Tensor:
    """A ``2^k x 2^k`` image as a tensor of ``k`` modes of size 4 with interleaved row and
    column bits: mode ``b`` is ``2 i_b + j_b``, ``i_b`` and ``j_b`` the ``b``-th most
    significant bits of the row and column (so the first modes choose a quadrant and the
    last ones a pixel within 2x2 blocks: neighbouring pixels share the leading modes).

    Args:
        img: a ``(2^k, 2^k)`` tensor, ``k >= 1``.
    Returns:
        the ``(4,) * k`` tensor (a view-free copy). Cost: O(4^k).
    """
    if img.dim() != 2 or img.shape[0] != img.shape[1] or img.shape[0] < 2 or (
            img.shape[0] & (img.shape[0] - 1)):
        raise ValueError(f"img: expected a square 2^k x 2^k image (k >= 1), got shape "
                         f"{tuple(img.shape)}")
    k = img.shape[0].bit_length() - 1
    t = img.reshape((2,) * (2 * k))  # (i_0, .., i_{k-1}, j_0, .., j_{k-1})
    order = [a for b in range(k) for a in (b, k + b)]
    return t.permute(order).reshape((4,) * k).contiguous()


def untensorize_image(t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`tensorize_image`: a ``(4,) * k`` tensor back to the
    ``2^k x 2^k`` image.

    Args:
        t: a tensor of shape ``(4,) * k``, ``k >= 1``.
    Returns:
        the ``(2^k, 2^k)`` image. Cost: O(4^k).
    """
    if t.dim() < 1 or any(n != 4 for n in t.shape):
        raise ValueError(f"t: expected shape (4, ..., 4), got {tuple(t.shape)}")
    k = t.dim()
    u = t.reshape((2,) * (2 * k))  # (i_0, j_0, i_1, j_1, ...)
    order = [2 * b for b in range(k)] + [2 * b + 1 for b in range(k)]
    return u.permute(order).reshape(2 ** k, 2 ** k).contiguous()


def sample_image(size: int) -> torch.Tensor:
    """The central ``size x size`` crop of scikit-learn's ``china.jpg`` photograph
    (``sklearn.datasets.load_sample_image``, shipped with scikit-learn), in grayscale
    (ITU-R 601 luma) scaled to [0, 1], float64.

    Args:
        size: the crop's side, at most 427 (the photograph's height).
    Returns:
        a ``(size, size)`` float64 tensor. Cost: decoding the JPEG once.
    """
    from sklearn.datasets import load_sample_image  # the compare extra

    rgb = torch.tensor(load_sample_image("china.jpg"), dtype=torch.float64) / 255.0
    h, w = rgb.shape[:2]
    if not 1 <= size <= min(h, w):
        raise ValueError(f"size: expected 1..{min(h, w)}, got {size}")
    gray = rgb @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    r0, c0 = (h - size) // 2, (w - size) // 2
    return gray[r0:r0 + size, c0:c0 + size].contiguous()


def _image(seed: int, quick: bool):
    size, max_rank = (32, 8) if quick else (256, 40)
    img = sample_image(size)
    T = tensorize_image(img)
    shape = tuple(T.shape)
    total = T.numel()
    flat = T.reshape(-1)
    problems = []
    for rate in (0.1, 0.2, 0.3):
        gen = torch.Generator().manual_seed(seed)
        lin = torch.randperm(total, generator=gen)
        n_obs = int(rate * total)
        multi = torch.stack(torch.unravel_index(lin, shape), 1)
        pb = P.Completion.from_data(multi[:n_obs], flat[lin[:n_obs]], shape, 1,
                                    test=(multi[n_obs:], flat[lin[n_obs:]]), seed=seed)
        problems.append((rate, pb))
    return dict(image=img, problems=problems, problem=problems[0][1], x0=None,
                start="rank 1 (rank-adaptive; control set 10 % of the observed pixels)",
                methods=["rank_adaptive"], key="test_rmse", tol=0.0, max_rank=max_rank)


def build_preset(name: str, *, rank: Optional[int] = None, seed: int = 0,
                 quick: bool = False, core_dist: Optional[str] = None) -> Dict[str, object]:
    """The problem, start, methods, target metric and tolerance of preset ``name``.

    Args:
        name: one of :data:`PRESETS`; rank: ``steinlechner``'s r (default 4);
        seed: data and start (``psenka-boumal``: the first of its seeds);
        quick: smaller sizes (``steinlechner``: d = 6, n = 10; ``psenka-boumal``: d = 6,
            ranks (1, 2, 3, 3, 3, 2, 1), 30 % observed, 2 seeds; ``function``: 8^4 grid,
            1000 samples, ranks up to 3; ``image``: a 32 x 32 crop, ranks up to 8);
        core_dist: ``steinlechner``'s cores, ``"uniform"`` (default: i.i.d. uniform [0, 1],
            what TTeMPS's random TTs and Steinlechner's examples use; the fixed-rank methods
            start from another such random TT) or ``"gaussian"`` (mean-zero: no low-rank
            part to start a rank search from, and no method recovers it from a random start
            at these sizes, so the fixed-rank methods start from the oracle start).
    Returns:
        a dict with ``problem``, ``x0``, ``start``, ``methods``, ``key``, ``tol``,
        ``max_rank`` (the rank-adaptive cap); ``psenka-boumal`` adds ``seeds``,
        ``function`` the rank-adaptive options ``ra_opts``; ``image`` adds ``image`` (the
        grayscale crop) and ``problems``, a list of ``(rate, Completion)`` (its
        ``problem`` is the first of them and ``x0`` is None: it starts from rank 1).
    Cost: building the data, O(|Omega| d r^2) (``image``: O(pixels)).
    """
    if core_dist is not None and name != "steinlechner":
        raise ValueError(f"core_dist: only for the 'steinlechner' preset, not {name!r}")
    if rank is not None and name != "steinlechner":  # (it was ignored)
        raise ValueError(f"rank: only for the 'steinlechner' preset (the others fix their "
                         f"ranks), not {name!r}")
    if core_dist not in (None, "gaussian", "uniform"):
        raise ValueError(f"core_dist: expected 'gaussian' or 'uniform', got {core_dist!r}")
    if name == "steinlechner":
        return _steinlechner(4 if rank is None else int(rank), seed, quick,
                             core_dist or "uniform")
    if name == "t3f-tutorial":
        return _t3f(seed, quick)
    if name == "psenka-boumal":
        return _psenka_boumal(seed, quick)
    if name == "function":
        return _function(seed, quick)
    if name == "image":
        return _image(seed, quick)
    raise ValueError(f"preset: unknown preset {name!r}; expected one of {PRESETS}")


def _run_one(spec, method: str, budget: float, iters: int, pb=None) -> History:
    pb = spec["problem"] if pb is None else pb
    if method == "rank_adaptive":
        # the solver's own defaults (inner CG until its loss stalls, greedy raises)
        return solvers.rank_adaptive_completion(pb, max_rank=spec["max_rank"],
                                                time_budget=budget,
                                                **spec.get("ra_opts", {}))
    # chart Adam at t3f's tutorial's lr; Riemannian Adam with the automatic step rule
    lr = 0.01 if method == "chart_adam" else "auto"
    return solvers.run(pb, method, spec["x0"], iters=iters, time_budget=budget, lr=lr,
                       stop_metric=spec["key"], stop_tol=spec["tol"],
                       metrics_every=1, measure_memory=False)


def _header(name, spec, pb, budget, iters) -> List[str]:
    return [f"# Preset {name}", "", f"- problem: {pb.describe()}",
            f"- start: {spec['start']}", f"- target: {spec['key']} <= {spec['tol']:.3g}",
            f"- budget: {budget:g} s per method, at most {iters} iterations",
            f"- torch threads: {torch.get_num_threads()}", ""]


def _progress(text: str, end: str = "") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


def _single(name, spec, methods, budget, iters) -> List[str]:
    pb, key, tol = spec["problem"], spec["key"], spec["tol"]
    lines = _header(name, spec, pb, budget, iters)
    lines += [f"| method | iters to target | s to target | best {key} | final {key} | "
              f"iters | s | ranks | status |", "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        t0 = time.perf_counter()
        _progress(f"{name}: {m} ... ")
        h = _run_one(spec, m, budget, iters)
        vals = [r.get(key) for r in h.metrics if r.get(key) is not None]
        reach = h.reach(key, tol)
        ranks = h.info.get("ranks", pb.manifold.ranks)
        lines.append(
            f"| {m} | {reach[0] if reach else '-'} | "
            f"{f'{reach[1]:.2f}' if reach else '-'} | "
            f"{min(vals):.3e} | {vals[-1]:.3e} | {h.n_iters} | {h.total_time:.1f} | "
            f"{tuple(ranks)} | {h.status} |" if vals else f"| {m} | - | - | - | - | "
            f"{h.n_iters} | {h.total_time:.1f} | {tuple(ranks)} | {h.status} |")
        _progress(f"{time.perf_counter() - t0:.1f} s", "\n")
    return lines


def _median(xs):
    xs = sorted(xs)
    if not xs:
        return None
    k = len(xs) // 2
    return xs[k] if len(xs) % 2 else 0.5 * (xs[k - 1] + xs[k])


def _seeds(name, spec, methods, budget, iters, seed, quick) -> List[str]:
    """Every method on ``spec["seeds"]`` problems (seeds ``seed, seed + 1, ...``): success
    counts and the median / largest seconds and iterations to the target."""
    key, tol, n = spec["key"], spec["tol"], spec["seeds"]
    lines = _header(name, spec, spec["problem"], budget, iters)
    lines[2] += f" (seed {seed}; {n} seeds {seed}..{seed + n - 1}, data and start)"
    results = {m: [] for m in methods}
    for s in range(seed, seed + n):
        sp = spec if s == seed else build_preset(name, seed=s, quick=quick)
        for m in methods:
            t0 = time.perf_counter()
            _progress(f"{name}: seed {s} {m} ... ")
            h = _run_one(sp, m, budget, iters)
            vals = [r.get(key) for r in h.metrics if r.get(key) is not None]
            results[m].append((h.reach(key, tol), min(vals) if vals else math.nan,
                               tuple(h.info.get("ranks", sp["problem"].manifold.ranks))))
            _progress(f"{time.perf_counter() - t0:.1f} s", "\n")
    lines += [f"| method | recovered ({key} <= {tol:.0e}) | median s to target | "
              f"max s to target | median iters to target | median best {key} | "
              f"ranks (seed {seed}) |", "|---|---|---|---|---|---|---|"]
    for m, rs in results.items():
        hits = [r[0] for r in rs if r[0] is not None]
        secs = [h[1] for h in hits]
        its = [h[0] for h in hits]
        best = _median([r[1] for r in rs])
        lines.append(f"| {m} | {len(hits)}/{len(rs)} | "
                     f"{f'{_median(secs):.2f}' if hits else '-'} | "
                     f"{f'{max(secs):.2f}' if hits else '-'} | "
                     f"{_median(its) if hits else '-'} | {best:.3e} | {rs[0][2]} |")
    return lines


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Peak signal-to-noise ratio ``10 log10(1 / MSE)`` in dB of an image ``x`` against
    ``ref``, both with values in [0, 1] (``x`` is clipped to [0, 1] first).

    Args:
        x, ref: tensors of the same shape.
    Returns:
        the PSNR in dB (``inf`` when equal). Cost: O(numel).
    """
    if x.shape != ref.shape:
        raise ValueError(f"x: shape {tuple(x.shape)} differs from ref's {tuple(ref.shape)}")
    mse = float(((x.clamp(0.0, 1.0) - ref) ** 2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def image_completion(spec, budget: Optional[float] = 60.0) -> List[Dict[str, object]]:
    """Rank-adaptive completion of the ``image`` preset's photograph at each sampling rate.

    Args:
        spec: :func:`build_preset` ``("image")``'s dict; budget: seconds per rate after
            which no rank raise is tried.
    Returns:
        one dict per rate: ``rate``, ``ranks`` (found), ``params`` (numbers in the TT
        cores), ``psnr`` (all pixels), ``psnr_unobserved``, ``psnr_svd`` (TT-SVD of the
        whole image at the same ranks: what those ranks allow when every pixel is known),
        ``seconds``, ``status``, ``observed`` (the image with missing pixels 0) and
        ``recovered`` (the completed image).
    Cost: the rank-adaptive runs (``budget`` each) plus a TT-SVD of the image per rate.
    """
    img = spec["image"]
    dense = tensorize_image(img)
    out = []
    for rate, pb in spec["problems"]:
        t0 = time.perf_counter()
        _progress(f"image: {rate:.0%} observed ... ")
        h = _run_one(spec, "rank_adaptive", budget, 0, pb=pb)
        ranks = tuple(h.info["ranks"])
        M = FixedTTRank(pb.manifold.shape, ranks)
        rec = untensorize_image(M.to_tt(h.x).full().to(torch.float64))
        # observed = training pixels (the rank-adaptive control set is among them)
        mask = torch.zeros(pb.manifold.shape, dtype=torch.float64)
        mask[tuple(pb.train.indices.cpu().t())] = 1.0
        mask = untensorize_image(mask) > 0.5
        best = untensorize_image(TT.from_dense(dense, ranks=ranks).full())
        out.append(dict(rate=rate, ranks=ranks,
                        params=sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(M.shape)),
                        psnr=psnr(rec, img), psnr_unobserved=psnr(rec[~mask], img[~mask]),
                        psnr_svd=psnr(best, img), seconds=h.total_time, status=h.status,
                        observed=torch.where(mask, img, torch.zeros_like(img)), recovered=rec))
        _progress(f"{time.perf_counter() - t0:.1f} s", "\n")
    return out


def _image_run(name, spec, budget, out) -> List[str]:
    img = spec["image"]
    lines = _header(name, spec, spec["problem"], budget, 0)[:4]
    lines[2] = (f"- problem: grayscale {img.shape[0]} x {img.shape[1]} centre crop of "
                f"scikit-learn's china.jpg, tensorized to {spec['problem'].manifold.shape} "
                f"(interleaved row/column bits), values in [0, 1]; rank cap "
                f"{spec['max_rank']}")
    lines += [f"- budget: {budget:g} s per sampling rate",
              f"- torch threads: {torch.get_num_threads()}", "",
              "| observed | ranks | parameters | parameters / pixels | PSNR all (dB) | "
              "PSNR unobserved (dB) | PSNR of TT-SVD at these ranks (dB) | s | status |",
              "|---|---|---|---|---|---|---|---|---|"]
    rows = image_completion(spec, budget)
    for r in rows:
        lines.append(f"| {r['rate']:.0%} | {r['ranks']} | {r['params']} | "
                     f"{r['params'] / img.numel():.3f} | {r['psnr']:.2f} | "
                     f"{r['psnr_unobserved']:.2f} | {r['psnr_svd']:.2f} | "
                     f"{r['seconds']:.1f} | {r['status']} |")
    fig_path = os.path.join(out, "image_completion.png")
    save_image_figure(img, rows, fig_path)
    lines += ["", f"Figure: {os.path.basename(fig_path)} (original; observed pixels, missing "
                  f"ones black; recovered, per sampling rate)."]
    return lines


def _finish_figure(fig, path: Optional[str]):
    """Lay out ``fig``; return it when ``path`` is None, else save it there and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def save_image_figure(img: torch.Tensor, rows, path: Optional[str] = None, *,
                      size: float = 3.0):
    """One row per sampling rate: the original, the observed pixels (missing ones black)
    and the recovered image.

    Args:
        img: the original ``(h, w)`` image in [0, 1]; rows: :func:`image_completion`'s
            output; path: save the figure there as PNG (and close it); None: return it;
        size: inches per panel.
    Returns:
        the matplotlib figure, or None when saved. Cost: drawing ``3 len(rows)`` images.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(3 * size, size * len(rows)),
                             squeeze=False)
    for row, r in zip(axes, rows):
        for ax, im, title in zip(row, (img, r["observed"], r["recovered"]),
                                 ("original", f"observed\n{r['rate']:.0%} of the pixels",
                                  f"recovered\n{r['params']} parameters, "
                                  f"{r['psnr']:.1f} dB")):
            ax.imshow(im.clamp(0, 1).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return _finish_figure(fig, path)


PHASE_METHODS = ("rcg_random", "rcg_rank1", "rcg_spectral", "rank_adaptive")


def rank_one_start(manifold, seed: int = 0, eps: float = 1e-4, *, dtype=torch.float64,
                   device=None) -> torch.Tensor:
    """A point of ``manifold`` next to a random rank-1 tensor: the rank-1 cores in the
    leading corner of each core, every other entry ``eps`` times a standard normal (the
    manifold needs all ``r_k`` directions; they start small).

    Args:
        manifold: a :class:`~ttmanifold.manifold.FixedTTRank`; seed: the draw;
        eps: the size of the padding; dtype, device: of the point.
    Returns:
        a packed point whose tensor is a unit-norm rank-1 tensor up to ``O(eps)``.
    Cost: O(d n r^3) (packing).
    """
    g = torch.Generator().manual_seed(int(seed))
    ranks, shape = manifold.ranks, manifold.shape
    cores = []
    for k, n in enumerate(shape):
        c = eps * torch.randn(ranks[k], n, ranks[k + 1], generator=g, dtype=torch.float64)
        v = torch.randn(n, generator=g, dtype=torch.float64)
        c[0, :, 0] = v / torch.linalg.vector_norm(v)
        cores.append(c)
    # unchecked: the Gaussian part is eps-small, possibly below the rank test's tolerance
    x = manifold.pack_point(TT(cores), check_rank=False)
    return x.to(dtype=dtype, device=device)


def recovery_phase(d: int, n: int, r: int, rates, seeds: int, *,
                   methods=PHASE_METHODS, tol: float = 1e-6, iters: int = 500,
                   budget: Optional[float] = None, test_size: int = 2000,
                   verbose: bool = False) -> List[Dict[str, object]]:
    """Recovery of random rank-``r`` TTs (:class:`~.problems.Completion`, Gaussian
    cores, shape ``(n,) * d``) against the sampling rate ``|Omega| / dim M``, in the manner
    of Steinlechner's phase plots, without an oracle or dense start.

    Methods: ``rcg_random``, fixed-rank Riemannian CG from a random point;
    ``rcg_rank1``, the same from :func:`rank_one_start`; ``rcg_spectral``, the same
    from :func:`~.solvers.sparse_spectral_point` (computed from the samples only; its
    time is included in ``seconds``); ``rank_adaptive``,
    rank-adaptive completion from rank 1 with cap ``r`` (its control set is 10 % of
    Omega). A run recovers the tensor when its relative test error reaches ``tol``.

    Args:
        d, n, r: the tensor's order, mode size and TT-rank; rates: the values of
            ``|Omega| / dim M``; seeds: problems per rate (seeds ``0..seeds-1``: data
            and start); methods: a subset of :data:`PHASE_METHODS`; tol: the recovery
            threshold; iters: RCG's iteration cap; budget: seconds per run (RCG) or
            after which no rank raise is tried (rank-adaptive, with the solver's
            defaults otherwise); test_size: ``|Gamma|`` (at most the entries left).
    Returns:
        one dict per run: ``rate``, ``seed``, ``method``, ``recovered`` (bool),
        ``test_err`` (final), ``seconds`` (optimization time), ``ranks``.
    Cost: ``len(rates) * seeds * len(methods)`` runs of O(iters |Omega| d r^2) each.
    """
    bad = [m for m in methods if m not in PHASE_METHODS]
    if bad:
        raise ValueError(f"methods: {bad} not in {PHASE_METHODS}")
    if not (isinstance(seeds, int) and seeds >= 1):
        raise ValueError(f"seeds: expected a positive int, got {seeds!r}")
    total, dim = n ** d, FixedTTRank((n,) * d, r).dim
    for rate in rates:
        if not rate > 0:
            raise ValueError(f"rates: expected positive sampling rates, got {rate!r}")
        if math.ceil(rate * dim) >= total:
            raise ValueError(f"rates: {rate:g} x dim M = {math.ceil(rate * dim)} samples "
                             f"leave no test entry of the {total} of shape {(n,) * d}")
    rows = []
    for rate in rates:
        for s in range(seeds):
            # a smaller test set when the samples take most of a small tensor
            gamma = min(test_size, total - math.ceil(rate * dim))
            pb = P.Completion((n,) * d, r, oversampling=rate, test_size=gamma, seed=s)
            for m in methods:
                t_start = 0.0  # seconds of computing the start (the spectral one)
                if m == "rank_adaptive":
                    h = solvers.rank_adaptive_completion(pb, max_rank=r, seed=s,
                                                         time_budget=budget)
                else:
                    t0 = time.perf_counter()
                    if m == "rcg_random":
                        x0 = pb.initial_point(s)
                    elif m == "rcg_spectral":
                        x0 = pb.manifold.pack_point(solvers.sparse_spectral_point(
                            pb.train.indices, pb.a_train, pb.manifold.shape,
                            pb.manifold.ranks), check_rank=False)
                    else:
                        x0 = rank_one_start(pb.manifold, s, dtype=pb.dtype, device=pb.device)
                    if m == "rcg_spectral":
                        t_start = time.perf_counter() - t0
                    h = solvers.run(pb, "rcg", x0, iters=iters, time_budget=budget,
                                    stop_metric="test_err", stop_tol=tol,
                                    measure_memory=False)
                err = h.final_metrics().get("test_err", math.nan)
                rows.append(dict(rate=rate, seed=s, method=m, recovered=bool(err <= tol),
                                 test_err=err, seconds=h.total_time + t_start,
                                 ranks=tuple(h.info.get("ranks", pb.manifold.ranks))))
                if verbose:
                    _progress(f"d={d} n={n} r={r} rate={rate:g} seed={s} {m}: "
                              f"test_err {err:.2e} ({h.total_time:.1f} s)", "\n")
    return rows


def phase_table(rows, rates, methods=PHASE_METHODS) -> List[str]:
    """A markdown table of :func:`recovery_phase`'s rows: per method, the number of
    recovered seeds at each rate (and the median seconds of the recovered runs).

    Args:
        rows: :func:`recovery_phase`'s output; rates, methods: the columns and rows.
    Returns:
        the table's lines. Cost: O(len(rows)).
    """
    lines = ["| method | " + " | ".join(f"{r:g} x dim M" for r in rates) + " |",
             "|---|" + "---|" * len(rates)]
    for m in methods:
        cells = []
        for rate in rates:
            rs = [x for x in rows if x["method"] == m and x["rate"] == rate]
            if not rs:
                cells.append("-")
                continue
            hits = [x["seconds"] for x in rs if x["recovered"]]
            med = _median(hits)
            cells.append(f"{len(hits)}/{len(rs)}" + (f" ({med:.1f} s)" if hits else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def plot_phase(panels, path: Optional[str] = None):
    """Recovery rate against sampling rate, one panel per problem size.

    Args:
        panels: a list of ``(title, rows)`` with ``rows`` from :func:`recovery_phase`;
        path: save the figure there as PNG (and close it); None: return it.
    Returns:
        the matplotlib figure (None when saved). Cost: drawing.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        methods = list(dict.fromkeys(x["method"] for x in rows))
        rates = sorted(dict.fromkeys(x["rate"] for x in rows))
        for m in methods:
            frac = []
            for rate in rates:
                rs = [x["recovered"] for x in rows if x["method"] == m and x["rate"] == rate]
                frac.append(sum(rs) / len(rs) if rs else math.nan)  # rate not run
            ax.plot(rates, frac, "o-", label=m)
        ax.set_xscale("log")
        ax.set_xticks(rates)
        ax.set_xticklabels([f"{v:g}" for v in rates])
        ax.minorticks_off()  # the log axis' minor labels would overlap the rates
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("|Omega| / dim M")
        ax.set_ylabel("fraction recovered")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    return _finish_figure(fig, path)


def run_preset(name: str, out: str, *, rank: Optional[int] = None, seed: int = 0,
               quick: bool = False, budget: float = 60.0, iters: int = 2000,
               methods: Optional[List[str]] = None, core_dist: Optional[str] = None) -> str:
    """Run preset ``name``; write ``summary.md`` to ``out`` and return its text.

    Args:
        name, rank, seed, quick, core_dist: as :func:`build_preset`; out: output directory;
        budget: seconds per method (``psenka-boumal``: per method and seed; ``image``:
            per sampling rate); iters: iteration cap per method;
        methods: a subset of the preset's methods.
    Returns:
        the summary: a markdown table per method of iterations and seconds to the
        target, the best and final value of the target metric, final ranks and status;
        ``psenka-boumal``: per method the number of seeds recovered and the median and
        largest seconds to the target; ``image``: per sampling rate the ranks found,
        the number of parameters and the PSNR (also ``image_completion.png`` in ``out``).
    Cost: ``budget`` seconds per method (and seed, or rate) at most, plus metric
    evaluations.
    """
    spec = build_preset(name, rank=rank, seed=seed, quick=quick, core_dist=core_dist)
    methods = methods or spec["methods"]
    bad = [m for m in methods if m not in spec["methods"]]
    if bad:
        raise ValueError(f"methods: {bad} not in preset {name!r}'s {spec['methods']}")
    os.makedirs(out, exist_ok=True)
    if name == "image":
        lines = _image_run(name, spec, budget, out)
    elif "seeds" in spec:
        lines = _seeds(name, spec, methods, budget, iters, seed, quick)
    else:
        lines = _single(name, spec, methods, budget, iters)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text
