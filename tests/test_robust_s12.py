"""No silent wrong answers (round two): a batched completion's test set that overlaps its
training set warns as one problem's does; the torch path's retraction names a NaN/Inf point
or step where its SVD returns NaN instead of raising (a GPU); completion solvers give the
same iterates on data scaled far from 1."""
from __future__ import annotations

import warnings

import pytest
import torch

from ttmanifold.experiments.batched import BatchedCompletion
from ttmanifold.experiments.problems import Completion

F64 = torch.float64


# ---------------------------------------------------------------------------------------
# BatchedCompletion.from_data: a test set that repeats training samples
# ---------------------------------------------------------------------------------------

def test_batched_from_data_warns_on_a_test_set_that_overlaps_the_training_set():
    """Problem 1's test set repeats two of its training samples: one warning naming the
    problem, with Completion.from_data's wording and count (it passed silently). A sample of
    another problem's training set is no overlap."""
    shape = (4, 5, 3, 4)
    g = torch.Generator().manual_seed(0)
    idx = [torch.tensor([[0, 1, 2, 3], [1, 1, 1, 1], [2, 0, 1, 0], [3, 4, 0, 2]]),
           torch.tensor([[0, 0, 0, 0], [1, 2, 1, 3], [2, 3, 2, 1], [0, 4, 1, 2]])]
    vals = [torch.randn(4, dtype=F64, generator=g) for _ in range(2)]
    held = torch.tensor([[3, 4, 2, 3]])
    assert not any((i == held).all(1).any() for i in idx)
    overlap = ([held, torch.cat([idx[1][:2], held])],
               [torch.zeros(1, dtype=F64), torch.zeros(3, dtype=F64)])
    with pytest.warns(UserWarning) as rec:
        BatchedCompletion.from_data(idx, vals, shape, 2, test=overlap)
    msgs = [str(w.message) for w in rec if "test samples" in str(w.message)]
    assert msgs == ["test[0][1]: 2 of the 3 test samples are also training samples, so "
                    "test_err measures the fit there, not generalization"]
    assert rec[0].filename == __file__  # attributed to the caller
    with pytest.warns(UserWarning, match=r"^test: 2 of the 3 test samples are also training"):
        Completion.from_data(idx[1], vals[1], shape, 2, test=(overlap[0][1], overlap[1][1]))
    disjoint = ([held, torch.cat([idx[0][:2], held])],  # problem 0's samples in problem 1's
                [torch.zeros(1, dtype=F64), torch.zeros(3, dtype=F64)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BatchedCompletion.from_data(idx, vals, shape, 2, test=disjoint)
    # a repeated training sample still raises (before the overlap's warning)
    dup = [idx[0], torch.cat([idx[1], idx[1][:1]])]
    with pytest.raises(ValueError, match=r"indices\[1\]: repeated multi-indices"):
        BatchedCompletion.from_data(dup, [vals[0], torch.zeros(5, dtype=F64)], shape, 2,
                                    test=overlap)


# ---------------------------------------------------------------------------------------
# CG with the exact step on data far from unit scale
# ---------------------------------------------------------------------------------------

def _scaled_start(M, x0, s):
    x = x0.clone()
    x[..., -M.core_sizes[-1]:] *= s  # the same tensor times s (the last core holds the norm)
    return x


@pytest.mark.parametrize("s", [1e-170, 1e-150, 1e150])
def test_cg_iterates_are_those_of_the_unit_scale_problem_times_the_scale(s):
    """Completion (plain and regularized), approximation and the batched CG: the problem
    times s from the start times s takes the iterates of the unit problem times s (at
    1e-170 the exact step's products underflowed: alpha = 0 and no progress at all; the CG
    coefficients' squares too). Compared as full tensors against the unit run's."""
    from ttmanifold.experiments.batched import batched_riemannian_cg
    from ttmanifold.experiments.problems import Approximation
    from ttmanifold.experiments.solvers import riemannian_cg

    P1 = Completion((5, 6, 5, 4), 2, oversampling=3, seed=1, test_size=0)
    M = P1.manifold
    idx, vals = P1.train.indices, P1.a_train
    x0 = P1.initial_point(0)
    runs = []
    for reg in (0.0, 0.05):
        unit = Completion.from_data(idx, vals, M.shape, M.ranks)
        scaled = Completion.from_data(idx, vals * s, M.shape, M.ranks)
        unit.reg = scaled.reg = reg  # (its term scales with the data as the misfit)
        runs.append((M, unit, scaled, x0))
    T = Approximation.random((4, 5, 6), 3, 2, seed=0)
    Ts = Approximation(T.target * s, T.manifold.ranks)
    runs.append((T.manifold, T, Ts, T.initial_point(0)))
    for M_, unit, scaled, start in runs:
        ref = M_.to_tt(riemannian_cg(unit, start, iters=5, metrics_every=0).x).full()
        got = M_.to_tt(riemannian_cg(scaled, _scaled_start(M_, start, s), iters=5,
                                     metrics_every=0).x).full() / s
        assert float((got - ref).norm() / ref.norm()) < 1e-10
        assert float((ref - M_.to_tt(start).full()).norm()) > 1e-2  # it moved
    xb = torch.stack([x0, P1.initial_point(1)])
    bu = BatchedCompletion.from_data([idx, idx[:150]], [vals, vals[:150]], M.shape, M.ranks)
    bs = BatchedCompletion.from_data([idx, idx[:150]], [vals * s, vals[:150] * s], M.shape,
                                     M.ranks)
    ref = batched_riemannian_cg(bu, xb, iters=5, metrics=False).x
    got = batched_riemannian_cg(bs, _scaled_start(M, xb, s), iters=5, metrics=False).x
    for b in range(2):
        R, G = M.to_tt(ref[b]).full(), M.to_tt(got[b]).full() / s
        assert float((G - R).norm() / R.norm()) < 1e-10, b


@pytest.mark.parametrize("s", [1.0, 1e-150])
def test_radam_with_the_automatic_lr_stays_at_an_exact_fit(s):
    """From an exact fit the automatic lr (a grid in units of the distance to the data) is
    at the rounding level and radam stays there, at any scale: at 1e-150 the loss
    underflowed to 0, the grid fell back to unit lrs and Adam left the fit by ~1e23 times
    the data's scale squared. (A fixed lr moves: Adam steps by about lr along its
    normalized rounding-noise gradient, see docs/comparison.md.)"""
    from ttmanifold import FixedTTRank
    from ttmanifold.experiments.solvers import run

    M = FixedTTRank((5, 6, 5, 4), 2)
    truth = M.random(dtype=F64, generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(1))[:300]
    idx = torch.stack(torch.unravel_index(perm, M.shape), 1)
    vals = M.to_tt(truth).full()[tuple(idx.t())]
    P = Completion.from_data(idx, vals * s, M.shape, M.ranks)
    x0 = _scaled_start(M, truth, s)
    h = run(P, "radam", x0, iters=6, lr="auto", grid_size=3, tune_iters=3, metrics_every=0)
    assert h.lr < 1e-15 * s
    dist = P.distance_to_data(M.to_tt(h.x))
    assert dist <= 1e-13 * s * float(vals.norm()), dist
    # distance_to_data is sqrt(2 loss), without the underflow of the squares
    y = M.random(dtype=F64, generator=torch.Generator().manual_seed(4))
    P1 = Completion.from_data(idx, vals, M.shape, M.ranks)
    d1 = P1.distance_to_data(M.to_tt(y))
    assert abs(d1 - float(2 * P1.loss(M.to_tt(y))) ** 0.5) <= 1e-12 * d1
    assert abs(P.distance_to_data(M.to_tt(_scaled_start(M, y, s))) / s - d1) <= 1e-12 * d1
