"""Batched completion and batched Riemannian CG (issue 12): ``B`` completion problems with
ragged sample sets in one call equal ``B`` independent runs of
:func:`~ttmanifold.experiments.solvers.riemannian_cg` (same iterates to rounding), with a
per-problem exact line search and per-problem convergence (finished problems stop
changing)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import ttmanifold.tt.sampled_compiled as compiled_mod

from ttmanifold import FixedTTRank, kernels
from ttmanifold.experiments.batched import (BatchedCompletion, batched_cg_direction,
                                            batched_riemannian_cg)
from ttmanifold.experiments.problems import Completion
from ttmanifold.experiments.solvers import cg_direction, riemannian_cg

F64, F32 = torch.float64, torch.float32
SHAPE = (4, 5, 3, 4)
RANK = 2


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(autouse=True)
def _torch_kernels():
    was = kernels.enabled()
    kernels.set_enabled(False)
    yield
    kernels.set_enabled(was)


def problems(dtype=F64, sizes=(60, 90, 75)):
    # ragged sample counts; a test set each
    return [Completion(SHAPE, RANK, train_size=n, test_size=20, seed=s, dtype=dtype)
            for s, n in enumerate(sizes)]


def full_of(M, p):
    return M.to_tt(p.to(F64)).full()


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-9), (F32, 2e-3)])
@pytest.mark.parametrize("beta", ["pr+", "fr"])
def test_equals_independent_runs(dtype, tol, beta):
    probs = problems(dtype)
    bp = BatchedCompletion(probs)
    x0 = torch.stack([pr.initial_point(b) for b, pr in enumerate(probs)])
    res = batched_riemannian_cg(bp, x0, iters=6, beta=beta)
    assert res.status == ["max_iters"] * 3 and res.iterations.tolist() == [6] * 3
    M = bp.manifold
    for b, pr in enumerate(probs):
        h = riemannian_cg(pr, x0[b], iters=6, beta=beta, metrics_every=0)
        ref = full_of(M, h.x)
        assert (full_of(M, res.x[b]) - ref).abs().max() <= tol * ref.abs().max()
        assert torch.allclose(res.loss[:, b].to(F64), torch.tensor(h.loss[:7], dtype=F64),
                              rtol=50 * tol, atol=0)
        assert int(res.restarts[b]) == h.info["restarts"]
        m = pr.metrics(h.x)
        assert abs(float(res.metrics["test_err"][b]) - m["test_err"]) <= 50 * tol * m["test_err"]


@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "compiled"])
def test_batched_pieces_match_single_problem_pieces(compiled, monkeypatch):
    if compiled:  # the compiled sampled kernels, forced on for these small sets
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler: the compiled kernels cannot be built here")
        monkeypatch.setattr(compiled_mod, "MIN_SAMPLES", 0)
        kernels.set_enabled(True)
        kernels.build(["sampled"], verbose=False)
    probs = problems()
    bp = BatchedCompletion(probs)
    p = torch.stack([pr.initial_point(b) for b, pr in enumerate(probs)])
    loss, g, ctx = bp.cg_grad(p)
    eta = -g + 0.3 * torch.randn_like(g)
    eta = bp.manifold.proju(p, eta)
    alpha = bp.exact_step(p, eta, ctx)
    assert torch.allclose(bp.loss(p), loss, rtol=1e-12)
    for b, pr in enumerate(probs):
        lb, gb, cb = pr.cg_grad(p[b])
        assert torch.allclose(loss[b], lb, rtol=1e-12)
        assert torch.allclose(g[b], gb, atol=1e-12)
        assert torch.allclose(alpha[b], pr.exact_step(p[b], eta[b], cb), rtol=1e-10)
        # the exact step minimizes the loss along the tangent line (dense check)
        M = pr.manifold
        X = M.to_tt(p[b]).full()
        E = M.tangent_to_tt(p[b], eta[b]).full()
        f = [float(pr.dense_loss(X + t * E)) for t in (alpha[b] - 1e-3, alpha[b],
                                                       alpha[b] + 1e-3)]
        assert f[1] <= min(f[0], f[2])


def test_per_problem_convergence_freezes_finished_problems():
    probs = problems(sizes=(150, 100, 200))
    bp = BatchedCompletion(probs)
    x0 = torch.stack([pr.initial_point(7 + b, kind="perturbed", distance=0.05)
                      for b, pr in enumerate(probs)])
    res = batched_riemannian_cg(bp, x0, iters=60, tol=1e-8)
    its = res.iterations.tolist()
    assert res.status == ["converged"] * 3
    assert len(set(its)) > 1, its  # different problems stop at different iterations
    T = res.loss.shape[0] - 1
    assert T == max(its)
    for b, pr in enumerate(probs):
        assert float(res.train_err[its[b], b]) <= 1e-8 < float(res.train_err[its[b] - 1, b])
        # frozen after its last iteration: constant loss, and the point of a single run
        # with exactly that many iterations
        assert bool((res.loss[its[b]:, b] == res.loss[its[b], b]).all())
        h = riemannian_cg(pr, x0[b], iters=its[b], metrics_every=0)
        ref = full_of(bp.manifold, h.x)
        assert (full_of(bp.manifold, res.x[b]) - ref).abs().max() <= 1e-7


def test_ragged_from_data_with_an_empty_problem():
    gen = torch.Generator().manual_seed(3)
    M = FixedTTRank(SHAPE, (1, 2, 2, 2, 1))
    truth = M.random(3, dtype=F64, generator=gen)
    idx = [torch.zeros(0, 4, dtype=torch.long)]
    for c in (120, 160):
        flat = torch.randperm(240, generator=gen)[:c]
        idx.append(torch.stack(torch.unravel_index(flat, SHAPE), 1))
    vals = [M.to_tt(truth[b]).full()[tuple(i.t())] for b, i in enumerate(idx)]
    bp = BatchedCompletion.from_data(idx, vals, SHAPE, (1, 2, 2, 2, 1))
    x0 = bp.initial_point(1)
    res = batched_riemannian_cg(bp, x0, iters=5)
    assert res.status[0] == "converged" and int(res.iterations[0]) == 0
    assert torch.equal(res.x[0], x0[0])
    assert res.status[1:] == ["max_iters", "max_iters"]
    for b in (1, 2):  # a non-empty problem: as the single problem from the same data
        pr = Completion.from_data(idx[b], vals[b], SHAPE, (1, 2, 2, 2, 1))
        h = riemannian_cg(pr, x0[b], iters=5, metrics_every=0)
        ref = full_of(M, h.x)
        assert (full_of(M, res.x[b]) - ref).abs().max() <= 1e-9


def test_direction_rule_matches_single_rule():
    gen = torch.Generator().manual_seed(0)
    g, gn, gt, et = (torch.randn(6, 9, generator=gen, dtype=F64) for _ in range(4))
    gt[1] = gn[1]  # Powell restart
    et[2] = gn[2] * 5  # not a descent direction
    k = torch.tensor([1, 2, 3, 4, 5, 6])
    for rule in ("pr+", "fr"):
        eta, rs = batched_cg_direction(g, gn, gt, et, k, beta_rule=rule, restart_tol=0.1,
                                       restart_every=4)
        for b in range(6):
            e1, r1 = cg_direction(g[b], gn[b], gt[b], et[b], int(k[b]), beta_rule=rule,
                                  restart_tol=0.1, restart_every=4)
            assert torch.allclose(eta[b], e1, atol=1e-14) and bool(rs[b]) == r1


def test_bad_input_errors_name_the_argument():
    probs = problems()
    with pytest.raises(TypeError, match="problems"):
        BatchedCompletion(probs[0])
    with pytest.raises(ValueError, match="problems"):
        BatchedCompletion([])
    with pytest.raises(ValueError, match=r"problems\[1\]"):
        BatchedCompletion([probs[0], Completion((4, 5, 3, 5), RANK, train_size=50)])
    with pytest.raises(ValueError, match=r"problems\[1\]"):
        BatchedCompletion([probs[0], problems(F32)[1]])
    bp = BatchedCompletion(probs)
    x0 = bp.initial_point()
    with pytest.raises(ValueError, match="x0"):
        batched_riemannian_cg(bp, x0[:2])
    with pytest.raises(ValueError, match="beta"):
        batched_riemannian_cg(bp, x0, beta="hs")
    with pytest.raises(ValueError, match="tol"):
        batched_riemannian_cg(bp, x0, tol=-1.0)
    with pytest.raises(TypeError, match="problem"):
        batched_riemannian_cg(probs[0], x0)
    with pytest.raises(ValueError, match=r"values\[0\]"):
        BatchedCompletion.from_data([torch.zeros(2, 4, dtype=torch.long)], [torch.zeros(3)],
                                    SHAPE, 2)
    # a repeated sample (Completion.from_data refuses it; the batch counted it twice)
    dup = torch.tensor([[0, 1, 2, 3], [1, 1, 1, 1], [0, 1, 2, 3]])
    with pytest.raises(ValueError, match=r"indices\[1\]: repeated multi-indices"):
        BatchedCompletion.from_data([dup[:2], dup, dup[:0]], [torch.zeros(2), torch.zeros(3),
                                                             torch.zeros(0)], SHAPE, 2)
    with pytest.raises(ValueError, match=r"test\[1\]\[0\]: contains NaN"):
        BatchedCompletion.from_data([dup[:2]], [torch.zeros(2)], SHAPE, 2,
                                    test=([dup[1:2]], [torch.tensor([float("nan")])]))
    # these ran: an int dtype (truncated values), a start that is not a point, a negative
    # restart tolerance
    i2 = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    with pytest.raises(TypeError, match="dtype"):
        BatchedCompletion.from_data([i2[:1]], [torch.ones(1)], SHAPE, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="x0: .*not left-orthogonal"):
        batched_riemannian_cg(bp, torch.randn_like(x0))
    with pytest.raises(ValueError, match="restart_tol"):
        batched_riemannian_cg(bp, x0, restart_tol=-1.0)


def test_weighted_and_regularized_problems_match_single_problems():
    """Per-sample weights (Completion.from_data(weights=...)) and a Tikhonov term (reg)
    enter the batched loss, gradient, exact step and CG iterates as in single problems."""
    gen = torch.Generator().manual_seed(5)
    M = FixedTTRank(SHAPE, (1, 2, 2, 2, 1))
    truth = M.random(2, dtype=F64, generator=gen)
    probs = []
    for b, c in enumerate((110, 140)):
        flat = torch.randperm(240, generator=gen)[:c]
        idx = torch.stack(torch.unravel_index(flat, SHAPE), 1)
        vals = M.to_tt(truth[b]).full()[tuple(idx.t())]
        w = 0.5 + torch.rand(c, generator=gen, dtype=F64)
        probs.append(Completion.from_data(idx, vals, SHAPE, (1, 2, 2, 2, 1), weights=w))
    probs[1].reg = 0.05
    bp = BatchedCompletion(probs)
    x0 = torch.stack([pr.initial_point(b) for b, pr in enumerate(probs)])
    loss, g, ctx = bp.cg_grad(x0)
    for b, pr in enumerate(probs):
        lb, gb, _ = pr.cg_grad(x0[b])
        assert torch.allclose(loss[b], lb, rtol=1e-12) and torch.allclose(g[b], gb, atol=1e-12)
        X = M.to_tt(x0[b]).full()
        assert torch.allclose(loss[b], pr.dense_loss(X), rtol=1e-10)  # dense reference
    res = batched_riemannian_cg(bp, x0, iters=4)
    for b, pr in enumerate(probs):
        h = riemannian_cg(pr, x0[b], iters=4, metrics_every=0)
        ref = full_of(M, h.x)
        assert (full_of(M, res.x[b]) - ref).abs().max() <= 1e-9


# (each problem's test set is the other's samples, which overlap its own: warned)
@pytest.mark.filterwarnings(r"ignore:test\[0\]\[\d\]. \d+ of the \d+ test samples are also training")
@pytest.mark.parametrize("dtype,scale", [(F64, 1e-170), (F32, 1e-25)])
def test_errors_and_zero_gradient_rule_of_tiny_data(dtype, scale):
    """The relative errors are scale invariant (they were sums of squares: 0 / 0 = NaN
    below ~1e-154 in float64, ~1e-19 in float32), and a tiny gradient is not a zero one
    (its norm underflowed to 0: "converged" at iteration 0), as for a single problem."""
    gen = torch.Generator().manual_seed(3)
    M = FixedTTRank(SHAPE, (1, 2, 2, 2, 1))
    truth = M.random(2, dtype=F64, generator=gen)
    idx = [torch.stack(torch.unravel_index(torch.randperm(240, generator=gen)[:c], SHAPE), 1)
           for c in (120, 160)]
    vals = [M.to_tt(truth[b]).full()[tuple(i.t())] for b, i in enumerate(idx)]
    test = (idx[::-1], vals[::-1])  # (other entries, other values)
    unit = BatchedCompletion.from_data(idx, vals, SHAPE, (1, 2, 2, 2, 1), test=test,
                                       dtype=dtype)
    tiny = BatchedCompletion.from_data(idx, [v * scale for v in vals], SHAPE,
                                       (1, 2, 2, 2, 1), dtype=dtype,
                                       test=(test[0], [v * scale for v in test[1]]))
    x0 = unit.initial_point(1)
    xs = x0.clone()
    xs[:, -M.core_sizes[-1]:] *= scale  # the same tensors times scale
    m1, ms = unit.metrics(x0), tiny.metrics(xs)
    for k in ("train_err", "test_err"):
        assert torch.allclose(ms[k], m1[k], rtol=1e-5), (k, ms[k], m1[k])
    # against a dense float64 reference of the relative training error
    for b in range(2):
        X = M.to_tt(x0[b].to(F64)).full()
        ref = (X[tuple(idx[b].t())] - vals[b]).norm() / vals[b].norm()
        assert abs(float(m1["train_err"][b]) - float(ref)) <= 1e-5 * float(ref)
    assert torch.allclose(tiny.cg_grad(xs)[2].train_err, unit.cg_grad(x0)[2].train_err,
                          rtol=1e-5)
    res = batched_riemannian_cg(tiny, xs, iters=2, metrics=False)
    assert res.status == ["max_iters"] * 2 and res.iterations.tolist() == [2, 2]
    assert bool(torch.isfinite(res.train_err).all())


def test_problems_without_a_test_set_keep_the_others_test_errors():
    """One problem without a test set dropped every problem's test_err silently; now it
    has an empty one (NaN, as for an empty training set) and the others keep theirs."""
    probs = problems()
    probs[1] = Completion(SHAPE, RANK, train_size=80, test_size=0, seed=5)
    bp = BatchedCompletion(probs)
    x = torch.stack([pr.initial_point(b) for b, pr in enumerate(probs)])
    m = bp.metrics(x)
    assert bool(m["test_err"][1].isnan())
    for b in (0, 2):
        assert abs(float(m["test_err"][b]) - probs[b].metrics(x[b])["test_err"]) <= \
            1e-12 * float(m["test_err"][b])
    assert "test_err" not in BatchedCompletion([probs[1]]).metrics(x[1:2])


def test_from_data_takes_index_lists_and_names_a_bad_index_shape():
    """Lists of multi-indices, as Completion.from_data takes them (an AttributeError from
    inside); indices of the wrong shape are named (the error blamed ``values[0]``)."""
    idx = [[[0, 1, 2, 3], [1, 1, 1, 1]], [[2, 2, 2, 2]], []]
    vals = [[1.0, 2.0], [3.0], []]
    a = BatchedCompletion.from_data(idx, vals, SHAPE, 2)
    b = BatchedCompletion.from_data([torch.tensor(i).reshape(-1, 4) for i in idx],
                                    [torch.tensor(v, dtype=F64) for v in vals], SHAPE, 2)
    assert a.train.counts == (2, 1, 0)
    assert all(torch.equal(x, y) for x, y in zip(a.train.indices, b.train.indices))
    assert torch.equal(a.a_train, b.a_train)
    with pytest.raises(ValueError, match=r"indices\[0\]: expected shape \(N_0, 4\), got \(4,\)"):
        BatchedCompletion.from_data([torch.tensor([0, 1, 2, 3])], [[1.0]], SHAPE, 2)
