"""Rank adaptivity: the greedy rank raise against a dense float64 reference, and
rank-adaptive completion from rank 1 (the search, its record and ``solvers.run``)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttmanifold import FixedTTRank
from ttmanifold.experiments import presets
from ttmanifold.experiments import problems as P
from ttmanifold.experiments import solvers as S
from ttmanifold.tt import TT

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _orth_basis(m, rank):
    """An orthonormal basis of the column space of ``m`` (rank known)."""
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, :rank].contiguous()


def _kron(a, b):
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], -1)


def _dense_greedy(X, k, idx, vals, w, ranks):
    """Dense reference of one greedy raise at bond ``k`` of the dense tensor ``X`` with
    TT ranks ``ranks``: the top singular pair of the gradient's unfolding at bond ``k``
    restricted to (left space of bond k-1) x mode k-1, minus the left space of bond k, and
    likewise on the right; then the exact line search on the samples."""
    shape = X.shape
    d = len(shape)
    G = torch.zeros_like(X)
    res = X[tuple(idx.t())] - vals
    # duplicate samples add up (index_put_ with accumulate)
    G.index_put_(tuple(idx.t()), (w if w is not None else 1.0) * res, accumulate=True)
    nl = math.prod(shape[:k])
    Gk = G.reshape(nl, -1)
    # left: span(unfolding at k-1) x R^{n_{k-1}}, minus span(unfolding at k)
    B = _orth_basis(X.reshape(math.prod(shape[:k - 1]), -1), ranks[k - 1])
    Ul = _kron(B, torch.eye(shape[k - 1], dtype=X.dtype))
    Lk = _orth_basis(X.reshape(nl, -1), ranks[k])
    Pl = Ul @ Ul.T - Lk @ Lk.T
    Bt = _orth_basis(X.reshape(math.prod(shape[:k + 1]), -1).T.contiguous(), ranks[k + 1])
    Vr = _kron(torch.eye(shape[k], dtype=X.dtype), Bt)
    Rk = _orth_basis(X.reshape(nl, -1).T.contiguous(), ranks[k])
    Pr = Vr @ Vr.T - Rk @ Rk.T
    u, s, vh = torch.linalg.svd(Pl @ Gk @ Pr)
    W = torch.outer(u[:, 0], vh[0]).reshape(shape)
    wv = W[tuple(idx.t())]
    om = torch.ones_like(vals) if w is None else w
    step = -(om * res * wv).sum() / (om * wv * wv).sum()
    return X + step * W, s


@pytest.mark.parametrize("bond", [1, 2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_greedy_rank_raise_matches_dense_reference(bond, weighted):
    shape = (4, 5, 3, 4)
    g = torch.Generator().manual_seed(bond + 10 * weighted)
    A = P.random_tt(shape, [1, 3, 3, 3, 1], generator=g)
    x = P.random_tt(shape, [1, 1, 2, 2, 1], generator=g)
    idx = P.sample_distinct_indices(shape, 150, generator=g)
    vals = A.full()[tuple(idx.t())]
    w = torch.rand(150, dtype=F64, generator=g) + 0.5 if weighted else None
    y = S.greedy_rank_raise(x, bond, idx, vals, w)
    want = list(x.ranks)
    want[bond] += 1
    assert tuple(y.ranks) == tuple(want)
    ref, s = _dense_greedy(x.full(), bond, idx, vals, w, x.ranks)
    assert float(s[0] - s[1]) > 1e-6 * float(s[0])  # a unique leading pair
    torch.testing.assert_close(y.full(), ref, rtol=1e-9, atol=1e-12)


def test_greedy_rank_raise_several_bonds_is_the_sequence_of_single_raises():
    shape = (3, 4, 5, 4, 3)
    g = torch.Generator().manual_seed(3)
    A = P.random_tt(shape, [1, 3, 4, 4, 3, 1], generator=g)
    x = P.random_tt(shape, [1, 1, 2, 1, 1, 1], generator=g)
    idx = P.sample_distinct_indices(shape, 300, generator=g)
    vals = A.full()[tuple(idx.t())]
    y = S.greedy_rank_raise(x, [1, 3, 4], idx, vals)
    z = x
    for k in (1, 3, 4):
        z = S.greedy_rank_raise(z, k, idx, vals)
    assert tuple(y.ranks) == (1, 2, 2, 2, 2, 1)
    torch.testing.assert_close(y.full(), z.full(), rtol=1e-9, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10 ** 6), bond=st.integers(1, 3), n=st.integers(2, 4))
def test_greedy_rank_raise_never_increases_the_loss(seed, bond, n):
    shape = (n, 3, n, 3)
    g = torch.Generator().manual_seed(seed)
    x = P.random_tt(shape, 1, generator=g)
    idx = P.sample_distinct_indices(shape, 2 * n * 3, generator=g)
    vals = torch.randn(idx.shape[0], dtype=F64, generator=g)

    def loss(t):
        return float(((t.full()[tuple(idx.t())] - vals) ** 2).sum())

    y = S.greedy_rank_raise(x, bond, idx, vals)
    assert y.ranks[bond] == 2
    assert loss(y) <= loss(x) * (1 + 1e-12) + 1e-14


def test_greedy_rank_raise_without_descent_draws_its_pair_from_the_generator():
    # zero weights, so a zero gradient: no rank-increasing descent, and the new column and
    # row are a random orthogonal pair with a zero step, drawn from ``generator``
    shape = (3, 4, 4, 3)
    g = torch.Generator().manual_seed(5)
    x = P.random_tt(shape, [1, 2, 2, 2, 1], generator=g)
    idx = P.sample_distinct_indices(shape, 60, generator=g)
    vals = torch.randn(60, dtype=F64, generator=g)
    w = torch.zeros(60, dtype=F64)
    ys = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        ys.append(S.greedy_rank_raise(x, 2, idx, vals, w,
                                      generator=torch.Generator().manual_seed(9)))
    for y in ys:
        assert tuple(y.ranks) == (1, 2, 3, 2, 1)
        torch.testing.assert_close(y.full(), x.full(), rtol=1e-12, atol=1e-12)
    # the same pair whatever the global generator's state
    assert all(torch.equal(a, b) for a, b in zip(ys[0].cores, ys[1].cores))
    other = S.greedy_rank_raise(x, 2, idx, vals, w, generator=torch.Generator().manual_seed(10))
    assert not all(torch.equal(a, b) for a, b in zip(ys[0].cores, other.cores))


def test_greedy_rank_raise_rejects_bad_input():
    x = P.random_tt((3, 3, 3), 1)
    idx = torch.zeros(5, 3, dtype=torch.long)
    vals = torch.zeros(5, dtype=F64)
    with pytest.raises(ValueError, match="bond"):
        S.greedy_rank_raise(x, 0, idx, vals)
    with pytest.raises(ValueError, match="indices"):
        S.greedy_rank_raise(x, 1, idx[:, :2], vals)
    with pytest.raises(ValueError, match="bond"):  # rank 3 is the largest at bond 1
        S.greedy_rank_raise(P.random_tt((3, 3, 3), 3), 1, idx, vals)


def _uniform_problem(shape, ranks, seed, oversampling=10):
    return P.Completion(shape, ranks, core_dist="uniform", oversampling=oversampling,
                        test_size=2000, seed=seed)


def test_rank_adaptive_leaves_rank_one_and_recovers_at_order_eight():
    # d = 8: a rank-1 start and single-bond raises with random columns (the earlier
    # scheme) never left rank 1 at this order; the greedy raises reach the ranks
    pb = _uniform_problem((10,) * 8, 3, seed=1)
    h = S.rank_adaptive_completion(pb, max_rank=4, seed=1)
    assert h.info["ranks"] == (1,) + (3,) * 7 + (1,), h.info["rank_history"]
    assert h.status == "converged"
    x = P.FixedTTRank(pb.manifold.shape, h.info["ranks"]).to_tt(h.x)
    assert pb.metrics(x)["test_err"] < 1e-8
    assert h.final_metrics()["test_err"] < 1e-8
    errs = [a["control_err"] for a in h.info["rank_history"] if a["accepted"]]
    assert errs[-1] < 1e-9 < errs[0]


def test_rank_adaptive_finds_unequal_ranks_without_overshoot():
    ranks = (2, 3, 4, 3, 2)
    pb = _uniform_problem((8,) * 6, ranks, seed=2)
    h = S.rank_adaptive_completion(pb, max_rank=5, seed=0)
    assert h.info["ranks"][1:-1] == ranks, h.info["rank_history"]
    assert h.final_metrics()["test_err"] < 1e-8
    # every record lists the control error; times and iterations grow
    assert all("control_err" in m for m in h.metrics)
    assert h.iters == sorted(h.iters) and h.time == sorted(h.time)


def test_rank_adaptive_float32_stops_at_the_rounding_level_with_the_true_ranks():
    # control_tol = 1e-10 is below float32's rounding: the search went on raising bonds on
    # noise-level control gains (ranks (1, 4, 4, 1) here, status "ok", never converged)
    pb = P.Completion((6, 7, 6), 2, oversampling=4, test_size=50, seed=1,
                      dtype=torch.float32)
    h = S.rank_adaptive_completion(pb, max_rank=4, seed=0)
    assert h.status == "converged" and h.info["ranks"] == (1, 2, 2, 1), h.info["rank_history"]
    assert h.final_metrics()["test_err"] < 1e-4
    assert h.x.dtype == torch.float32


def test_control_error_of_tiny_float32_data_is_not_zero():
    # vector_norm squares: at |a| ~ 1e-22 in float32 both norms underflowed to 0, the
    # control error read 0 and the search stopped at rank 1 "converged" without a fit
    pb0 = P.Completion((5, 6, 5), 2, train_size=80, test_size=20, seed=0)
    idx = P.sample_distinct_indices((5, 6, 5), 80, generator=torch.Generator().manual_seed(0))
    vals = pb0.target.full()[tuple(idx.T)] * 1e-22
    pb = P.Completion.from_data(idx, vals.float(), (5, 6, 5), 2, dtype=torch.float32)
    data = S.RankAdaptiveData(pb, control_fraction=0.2, seed=0,
                              generator=torch.Generator().manual_seed(0))
    sub = data.make([1, 2, 2, 1])
    x = sub.manifold.random(dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    n_last = math.prod(sub.manifold.core_shapes[-1])
    x = torch.cat([x[:-n_last], x[-n_last:] * 1e-22])  # (the last core's scale: a point)
    X = sub.manifold.to_tt(x).full().double()
    a = data.vals_ctrl.double()
    ref = float((X[tuple(data.idx_ctrl.T)] - a).norm() / a.norm())
    assert abs(data.control_err(sub, x) / ref - 1) < 1e-5, (data.control_err(sub, x), ref)
    h = S.rank_adaptive_completion(pb, max_rank=3, max_iters=20)
    assert h.status != "converged" or h.final_metrics()["control_err"] > 0


def test_rank_adaptive_through_run_and_stop_rules():
    pb = _uniform_problem((8,) * 5, (2, 3, 3, 2), seed=3)
    h = S.run(pb, "rank_adaptive", iters=500, max_rank=4, seed=0)
    assert h.method == "rank_adaptive" and h.lr is None
    assert h.info["ranks"][1:-1] == (2, 3, 3, 2)
    assert h.info["rank_history"][0]["ranks"] == (1,) * 6
    assert h.final_metrics()["test_err"] < 1e-8
    M = P.FixedTTRank(pb.manifold.shape, h.info["ranks"])
    assert pb.metrics(M.to_tt(h.x))["test_err"] < 1e-8
    # the default cap is the problem's rank; a total CG budget stops the search early
    h2 = S.run(pb, "rank_adaptive", iters=5, seed=0)
    assert h2.status == "budget" and h2.n_iters <= 5
    # a cap of 0 returns the start (one CG iteration was taken beyond it)
    h0 = S.run(pb, "rank_adaptive", iters=0, seed=0)
    assert h0.status == "budget" and h0.n_iters == 0 and h0.info["ranks"] == (1,) * 6
    assert max(h2.info["ranks"]) <= max(pb.manifold.ranks)
    h3 = S.run(pb, "rank_adaptive", iters=500, stop_metric="test_err", stop_tol=0.5)
    assert h3.status == "stopped" and h3.final_metrics()["test_err"] <= 0.5
    assert "rank_adaptive" in S.ALL_METHODS
    ap = P.Approximation.random((4, 5), 3, 2, seed=0)
    with pytest.raises(ValueError, match="completion"):
        S.run(ap, "rank_adaptive", iters=1)


def test_rank_adaptive_random_direction_still_available():
    pb = P.Completion((6, 6, 6, 6), (2, 3, 2), oversampling=10, test_size=200, seed=2)
    h = S.rank_adaptive_completion(pb, max_rank=3, direction="random", start="random",
                                   seed=0)
    assert all(a <= 3 for a in h.info["ranks"])
    assert h.info["rank_history"][0]["ranks"] == (1,) * 5
    assert any(a["accepted"] for a in h.info["rank_history"][1:])  # it left rank 1
    x = P.FixedTTRank(pb.manifold.shape, h.info["ranks"]).to_tt(h.x)
    assert pb.metrics(x)["test_err"] == pytest.approx(h.final_metrics()["test_err"])
    with pytest.raises(ValueError, match="direction"):
        S.rank_adaptive_completion(pb, max_rank=3, direction="spectral")
    with pytest.raises(ValueError, match="start"):
        S.rank_adaptive_completion(pb, max_rank=3, start="dense")
    with pytest.raises(ValueError, match="rank_step"):
        S.rank_adaptive_completion(pb, max_rank=3, rank_step=0)
    # these ran: a NaN budget or tolerance never stopped, a negative budget stopped at once
    for kw in (dict(time_budget=float("nan")), dict(time_budget=-1.0), dict(max_iters=-3),
               dict(max_rank=True), dict(control_tol=float("nan")), dict(accept_rtol=-1.0),
               dict(gain_ratio=2.0)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            S.rank_adaptive_completion(pb, **{"max_rank": 3, **kw})


def test_rank_adaptive_rank_step_two_raises_bonds_by_two():
    pb = _uniform_problem((8,) * 5, 4, seed=4)
    h = S.rank_adaptive_completion(pb, max_rank=4, rank_step=2, seed=0)
    steps = [max(b - a for a, b in zip(p["ranks"], q["ranks"]))
             for p, q in zip(h.info["rank_history"], h.info["rank_history"][1:])]
    assert max(steps) == 2
    assert h.info["ranks"] == (1, 4, 4, 4, 4, 1) and h.final_metrics()["test_err"] < 1e-8


def test_greedy_rank_raise_by_two_is_the_joint_step_on_two_pairs():
    shape = (4, 5, 3, 4)
    g = torch.Generator().manual_seed(5)
    A = P.random_tt(shape, [1, 3, 3, 3, 1], generator=g)
    x = P.random_tt(shape, [1, 1, 1, 1, 1], generator=g)
    idx = P.sample_distinct_indices(shape, 150, generator=g)
    vals = A.full()[tuple(idx.t())]

    def loss(t):
        return float(((t.full()[tuple(idx.t())] - vals) ** 2).sum())

    y1 = S.greedy_rank_raise(x, 2, idx, vals)
    y2 = S.greedy_rank_raise(x, 2, idx, vals, count=2)
    assert tuple(y2.ranks) == (1, 1, 3, 1, 1)
    # the span of two pairs holds the first: the joint step does at least as well
    assert loss(y2) < loss(y1) < loss(x)
    # the change is rank 2 at the bond (dense unfolding), and the joint step is optimal:
    # the residual is orthogonal (on the samples) to both added directions
    D = (y2.full() - x.full()).reshape(20, 12)
    sv = torch.linalg.svdvals(D)
    assert float(sv[2]) < 1e-10 * float(sv[0]) and float(sv[1]) > 1e-6 * float(sv[0])
    u, s, vh = torch.linalg.svd(D)
    res = y2.full()[tuple(idx.t())] - vals
    for j in range(2):
        wj = torch.outer(u[:, j], vh[j]).reshape(shape)[tuple(idx.t())]
        assert abs(float(res @ wj)) < 1e-9 * float(res.norm() * wj.norm())
    with pytest.raises(ValueError, match="count"):
        S.greedy_rank_raise(x, 2, idx, vals, count=0)


def test_patience_keeps_raises_on_trial_and_returns_to_the_best():
    # psenka-boumal's setting (Gaussian cores, ranks up to 10) at seed 0: every single
    # raise of all bonds from the slice-means rank-1 fit is rejected by the control set,
    # so without patience the search stays at rank 1; with raises kept on trial it finds
    # the ranks
    spec = presets.build_preset("psenka-boumal", seed=0)
    pb, cap = spec["problem"], spec["max_rank"]
    h0 = S.rank_adaptive_completion(pb, max_rank=cap, patience=0, time_budget=120,
                                    start="means")
    assert h0.info["ranks"] == (1,) * 10
    h = S.rank_adaptive_completion(pb, max_rank=cap, patience=3, time_budget=120,
                                   start="means")
    assert h.info["ranks"] == (1, 3, 5, 10, 10, 10, 10, 5, 3, 1)
    X = FixedTTRank(pb.manifold.shape, h.info["ranks"]).to_tt(h.x)
    assert pb.metrics(X)["test_err"] < 1e-8
    trial = [a for a in h.info["rank_history"] if a.get("on_trial")]
    assert trial, "no raise was kept on trial"
    # the default start ("auto") fits from the rank-1 spectral start too, and keeps it
    # here: from it the first raise is accepted, so no patience is needed
    ha = S.rank_adaptive_completion(pb, max_rank=cap, patience=0, max_iters=2000)
    assert ha.info["start"] == "spectral"
    assert ha.info["ranks"] == (1, 3, 5, 10, 10, 10, 10, 5, 3, 1)
    assert pb.metrics(FixedTTRank(pb.manifold.shape, ha.info["ranks"]).to_tt(ha.x))[
        "test_err"] < 1e-8
    # a search whose trials never pay off ends at its last accepted point
    g = S.rank_adaptive_completion(P.Completion((10,) * 6, 3, oversampling=3, seed=1),
                                   max_rank=3, patience=2, time_budget=60)
    acc = [a for a in g.info["rank_history"] if a["accepted"]]
    assert g.info["ranks"] == acc[-1]["ranks"]
    with pytest.raises(ValueError, match="patience"):
        S.rank_adaptive_completion(pb, max_rank=3, patience=-1)


def _skewed_indices(shape, N, g):
    """``N`` samples, 90 % of them at index 0 of every mode: groups too uneven for
    the padded kernels (their fallback paths)."""
    idx = torch.stack([torch.randint(0, n, (N,), generator=g) for n in shape], 1)
    idx[: 9 * N // 10] = 0
    return idx


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("skewed", [False, True])
def test_sweep_kernels_match_dense_reference(dtype, skewed):
    # the grouped per-sample products of the greedy sweep (right products, residual, bond
    # matrix) against per-sample float64 loops, on even (padded groups) and skewed
    # (fallback) samples
    from ttmanifold.tt import IndexSet

    shape = (4, 5, 3, 4)
    g = torch.Generator().manual_seed(7 + skewed)
    x = P.random_tt(shape, [1, 2, 3, 2, 1], generator=g)
    N = 400
    idx = (_skewed_indices(shape, N, g) if skewed
           else torch.stack([torch.randint(0, n, (N,), generator=g) for n in shape], 1))
    vals = torch.randn(N, dtype=F64, generator=g)
    w = torch.rand(N, dtype=F64, generator=g) + 0.5
    samples = S._SweepSamples(IndexSet(idx, shape))
    xd = TT([c.to(dtype) for c in x.cores], check=False)
    st0 = S._sweep_start(xd, samples, vals.to(dtype), w.to(dtype))
    cs = [c.double() for c in st0.cores]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11,
                                                                        atol=1e-13)
    for k in range(1, 4):  # right[k-1][e] = cores k..d-1 at the sample's indices
        ref = torch.stack([_chain(cs[k:], idx[e, k:])[:, 0] for e in range(N)])
        torch.testing.assert_close(st0.right[k - 1].double(), ref, **tol)
    xv = torch.stack([_chain(cs, idx[e])[0, 0] for e in range(N)])
    torch.testing.assert_close(xv, x.full()[tuple(idx.t())], **tol)
    torch.testing.assert_close(st0.z.double(), w * (xv - vals), **tol)
    # the bond matrix: sum over the samples at (i, j) of left_e (x) right_e
    for k in (1, 2, 3):
        left = torch.randn(N, 2, dtype=F64, generator=g)
        right = torch.randn(N, 3, dtype=F64, generator=g)
        T = samples.bond_matrix(k, left.to(dtype), right.to(dtype))
        ref = torch.zeros(shape[k - 1] * shape[k], 6, dtype=F64)
        for e in range(N):
            ref[idx[e, k - 1] * shape[k] + idx[e, k]] += torch.outer(left[e], right[e]).reshape(-1)
        assert T.dtype == dtype
        torch.testing.assert_close(T.double(), ref, **tol)
        assert samples.pairs[k].padded == (not skewed)  # both paths are exercised
    assert samples.iset.plan(1).padded == (not skewed)


def _chain(cores, ik):
    """The matrix product of the cores' slices at the indices ``ik`` (float64)."""
    out = cores[0][:, int(ik[0]), :]
    for c, i in zip(cores[1:], ik[1:]):
        out = out @ c[:, int(i), :]
    return out


@pytest.mark.parametrize("skewed", [False, True])
def test_greedy_raise_on_skewed_samples_and_with_a_reused_start(skewed):
    # the dense reference on samples whose groups take the fallback kernels, and the
    # sweep from a kept start (the probe's) equals the sweep that computes its own
    from ttmanifold.tt import IndexSet

    shape = (4, 5, 3, 4)
    g = torch.Generator().manual_seed(11)
    A = P.random_tt(shape, [1, 3, 3, 3, 1], generator=g)
    x = P.random_tt(shape, [1, 1, 2, 2, 1], generator=g)
    idx = (_skewed_indices(shape, 300, g) if skewed
           else P.sample_distinct_indices(shape, 150, generator=g))
    vals = A.full()[tuple(idx.t())]
    y = S.greedy_rank_raise(x, 2, idx, vals)
    ref, s = _dense_greedy(x.full(), 2, idx, vals, None, x.ranks)
    assert float(s[0] - s[1]) > 1e-6 * float(s[0])
    torch.testing.assert_close(y.full(), ref, rtol=1e-9, atol=1e-12)
    samples = S._SweepSamples(IndexSet(idx, shape))
    start = S._sweep_start(x, samples, vals, None)
    gains = S._greedy_sweep(x, [1, 2, 3], samples, vals, None, apply=False, start=start)[1]
    y2 = S._greedy_sweep(x, [1, 2, 3], samples, vals, None, apply=True, start=start)[0]
    y3 = S._greedy_sweep(x, [1, 2, 3], idx, vals, None, apply=True)[0]
    assert gains.shape == (3,) and bool((gains > 0).all())
    assert torch.equal(y2.full(), y3.full())
    # the right products grouped by the right sweep are kept for the raises (even samples)
    assert (1 in start.grouped) == (not skewed)
