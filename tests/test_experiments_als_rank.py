"""Alternating least squares for completion (each core update against a dense float64
least-squares reference) and rank-adaptive completion from rank 1."""
from __future__ import annotations

import pytest
import torch

from ttmanifold.experiments import problems as P
from ttmanifold.experiments import solvers as S

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def full(cores):
    res = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    for c in cores[1:]:
        res = torch.einsum("ia,ajb->ijb", res, c).reshape(-1, c.shape[2])
    return res.reshape([int(c.shape[1]) for c in cores])


@pytest.mark.parametrize("weighted", [False, True])
def test_als_core_solve_matches_dense_least_squares(weighted):
    g = torch.Generator().manual_seed(0)
    N, a, b, n = 60, 2, 3, 4
    left = torch.randn(N, a, dtype=F64, generator=g)
    right = torch.randn(N, b, dtype=F64, generator=g)
    ik = torch.randint(0, n, (N,), generator=g)
    vals = torch.randn(N, dtype=F64, generator=g)
    w = torch.rand(N, dtype=F64, generator=g) + 0.5 if weighted else None
    G = S.als_core_solve(left, right, ik, vals, w, n, ridge=0.0)
    # dense reference: the design matrix of the linear map core -> sampled values
    D = torch.zeros(N, a * n * b, dtype=F64)
    for i in range(N):
        E = torch.zeros(a, n, b, dtype=F64)
        E[:, ik[i], :] = torch.outer(left[i], right[i])
        D[i] = E.reshape(-1)
    sw = torch.ones(N, dtype=F64) if w is None else w.sqrt()
    ref = torch.linalg.lstsq(D * sw[:, None], vals * sw).solution
    assert torch.allclose(D @ G.reshape(-1), D @ ref, atol=1e-10)
    assert G.shape == (a, n, b) and G.dtype == F64


def test_als_core_solve_float32_rank_deficient_slice_is_solved():
    # one sample at index 0: the slice's normal matrix phi phi^T is rank one; the relative
    # shift 1e-12 vanished in float32 rounding (1 + 1e-12 == 1) and solve raised "singular"
    # (ALS on a float32 6x7x6 completion with 60 samples did, at its first sweep)
    one = torch.ones(1, 2, dtype=torch.float32)
    G = S.als_core_solve(one, one, torch.tensor([0]), torch.tensor([3.0]), None, 2)
    assert G.shape == (2, 2, 2) and torch.isfinite(G).all()
    fitted = float(G[:, 0, :].sum())  # left^T G[0] right at the sample
    ref = S.als_core_solve(one.double(), one.double(), torch.tensor([0]),
                           torch.tensor([3.0], dtype=F64), None, 2)
    assert abs(fitted - 3.0) < 1e-5 and float(ref[:, 0, :].sum()) == pytest.approx(3.0)
    assert not G[:, 1, :].any()  # no sample at index 1: zero slice


def test_als_monotone_and_last_update_is_optimal():
    pb = P.Completion((5, 5, 5, 5), 2, oversampling=6, seed=3)
    h = S.als_completion(pb, pb.initial_point(0), iters=6, metrics_every=0)
    assert all(b <= a * (1 + 1e-10) + 1e-28 for a, b in zip(h.loss, h.loss[1:]))
    # core 0 was updated last: it is the least-squares core given the others (a dense
    # check on the gauge-invariant fitted values)
    M = pb.manifold
    cores = M.split(h.x, "x")
    idx, vals = pb.train.indices, pb.a_train
    fitted = full(cores)[tuple(idx.t())]
    # the design matrix of core 0 with cores 1.. fixed, by perturbing core 0
    D = []
    for j in range(cores[0].numel()):
        e = torch.zeros(cores[0].numel(), dtype=F64)
        e[j] = 1.0
        D.append(full([e.reshape(cores[0].shape)] + cores[1:])[tuple(idx.t())])
    D = torch.stack(D, 1)
    ref = torch.linalg.lstsq(D, vals).solution
    assert torch.allclose(fitted, D @ ref, atol=1e-8)


def test_als_recovers_and_rejects_other_problems():
    pb = P.Completion((5, 5, 5, 5), 2, oversampling=5, test_size=100, seed=1)
    h = S.run(pb, "als", pb.initial_point(0), iters=80, metrics_every=0)
    assert h.lr is None
    assert pb.metrics(pb.manifold.to_tt(h.x))["test_err"] < 1e-8
    ap = P.Approximation.random((4, 5), 3, 2, seed=0)
    with pytest.raises(ValueError, match="completion"):
        S.run(ap, "als", iters=1)


def test_rank_adaptive_from_rank_one_finds_the_ranks():
    pb = P.Completion((6, 6, 6, 6), (2, 3, 2), oversampling=10, test_size=200, seed=2)
    h = S.rank_adaptive_completion(pb, max_rank=3, inner_iters=25, seed=0)
    hist = h.info["rank_history"]
    assert hist[0]["ranks"] == (1, 1, 1, 1, 1)
    assert any(not a["accepted"] for a in hist) or h.info["ranks"][1:-1] == (2, 3, 2)
    ranks = h.info["ranks"]
    assert all(r <= 3 for r in ranks)
    assert all(x >= y for x, y in zip(ranks, (1, 2, 3, 2, 1)))
    final = pb.metrics(P.FixedTTRank(pb.manifold.shape, ranks).to_tt(h.x))
    assert final["test_err"] < 1e-6, (ranks, final)
    # control errors of accepted raises fall
    acc = [a["control_err"] for a in hist if a["accepted"] and a["bond"] is not None]
    assert all(b < a for a, b in zip(acc, acc[1:]))
    with pytest.raises(ValueError, match="max_rank"):
        S.rank_adaptive_completion(pb, max_rank=0)
