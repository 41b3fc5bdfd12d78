"""The sparse spectral start (solvers.sparse_spectral_point): TT-SVD of the zero-filled
data computed from the samples only."""
import math
from collections import defaultdict

import pytest
import torch

from ttmanifold import FixedTTRank
from ttmanifold.experiments import presets as PR
from ttmanifold.experiments import problems as P
from ttmanifold.experiments import solvers as S

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.parametrize("shape, ranks, rate", [((5, 6, 5, 6), 2, 4),
                                                ((4, 4, 4, 4, 4), (2, 3, 3, 2), 5)])
def test_without_deletion_it_is_the_dense_tt_svd_of_the_zero_filled_data(shape, ranks, rate):
    pb = P.Completion(shape, ranks, oversampling=rate, seed=0)
    x = S.sparse_spectral_point(pb.train.indices, pb.a_train, shape, pb.manifold.ranks,
                                delete_self=False)
    ref = pb.manifold.to_tt(pb.initial_point(kind="spectral"))  # dense TT-SVD
    assert x.ranks == pb.manifold.ranks
    assert torch.allclose(x.full(), ref.full(), rtol=0, atol=1e-10 * float(ref.full().norm()))


def _deleted_reference(idx, vals, shape, ranks, weight):
    """Dense float64 sweep: at each bond, the Gram matrix of the projected unfolding from
    the pairs of distinct samples sharing a column (a plain loop over the pairs)."""
    d = len(shape)
    a = [torch.tensor([float(v) * weight], dtype=torch.float64) for v in vals]
    cores = []
    for k in range(d - 1):
        n, rp, rk = shape[k], ranks[k], ranks[k + 1]
        groups = defaultdict(list)
        for s, row in enumerate(idx.tolist()):
            groups[tuple(row[k + 1:])].append(s)
        G = torch.zeros(rp * n, rp * n, dtype=torch.float64)
        for members in groups.values():
            for s in members:
                for t in members:
                    if s != t:
                        ws = torch.zeros(rp, n, dtype=torch.float64)
                        wt = torch.zeros(rp, n, dtype=torch.float64)
                        ws[:, int(idx[s, k])] = a[s]
                        wt[:, int(idx[t, k])] = a[t]
                        G += torch.outer(ws.reshape(-1), wt.reshape(-1))
        evals, evecs = torch.linalg.eigh(G)
        core = evecs[:, -rk:].reshape(rp, n, rk)
        cores.append(core)
        a = [core[:, int(idx[s, k]), :].T @ a[s] for s in range(len(a))]
    last = torch.zeros(ranks[d - 1], shape[-1], 1, dtype=torch.float64)
    for s in range(len(a)):
        last[:, int(idx[s, d - 1]), 0] += a[s]
    cores.append(last)
    full = cores[0]
    for c in cores[1:]:
        full = torch.tensordot(full, c, dims=([full.dim() - 1], [0]))
    return full.reshape(shape)


def test_deleted_gram_matches_a_pairwise_dense_reference():
    shape, ranks = (3, 4, 3, 4), (1, 2, 2, 2, 1)
    pb = P.Completion(shape, ranks[1:-1], oversampling=2, seed=3)
    idx, vals = pb.train.indices, pb.a_train
    x = S.sparse_spectral_point(idx, vals, shape, ranks)
    ref = _deleted_reference(idx, vals, shape, ranks, math.prod(shape) / len(vals))
    assert torch.allclose(x.full(), ref, rtol=0, atol=1e-10 * float(ref.norm()))


def test_spectral_start_recovers_where_random_starts_fail():
    # d = 6, n = 4, r = 2 at 5 x dim M, Gaussian cores: from the spectral start CG
    # recovered 6 of 6 seeds, from random points 2 of 6 (this is seed 0, where random fails)
    pb = P.Completion((4,) * 6, 2, oversampling=5, test_size=1000, seed=0)
    x0 = pb.manifold.pack_point(S.sparse_spectral_point(pb.train.indices, pb.a_train,
                                                        pb.manifold.shape, pb.manifold.ranks))
    kw = dict(iters=300, stop_metric="test_err", stop_tol=1e-6, measure_memory=False,
              metrics_every=10)
    assert S.run(pb, "rcg", x0, **kw).final_metrics()["test_err"] <= 1e-6
    assert S.run(pb, "rcg", pb.initial_point(0), **kw).final_metrics()["test_err"] > 1e-6


def test_recovery_phase_runs_the_spectral_start():
    rows = PR.recovery_phase(4, 4, 2, [4.0], 1, methods=["rcg_spectral"], iters=100,
                             test_size=100)
    assert rows[0]["method"] == "rcg_spectral" and rows[0]["seconds"] > 0


@pytest.mark.parametrize("args, match", [
    (dict(ranks=(1, 2, 2)), "ranks"),
    (dict(ranks=(1, 9, 2, 1)), "feasible"),
    (dict(shape=(4, 4)), "indices"),
    # (these failed deep inside, or ran: a rank above the right-hand bound, NaN values,
    # indices out of range or of a float dtype)
    (dict(ranks=(1, 2, 5, 1)), "infeasible"),
    (dict(values=torch.full((5,), float("nan"), dtype=torch.float64)), "values: contains NaN"),
    (dict(indices=torch.full((5, 3), 3, dtype=torch.long)), "indices: out of range"),
    (dict(indices=-torch.ones(5, 3, dtype=torch.long)), "indices: out of range"),
    (dict(indices=torch.zeros(5, 3)), "indices: expected integer"),
])
def test_bad_input(args, match):
    idx = torch.zeros(5, 3, dtype=torch.long)
    kw = dict(indices=idx, values=torch.ones(5, dtype=torch.float64), shape=(3, 4, 4),
              ranks=(1, 2, 2, 1))
    kw.update(args)
    with pytest.raises((ValueError, TypeError), match=match):
        S.sparse_spectral_point(**kw)
    # an int rank is every bond's (it crashed)
    assert S.sparse_spectral_point(idx, kw["values"] if "values" not in args else
                                   torch.ones(5, dtype=torch.float64), (3, 4, 4),
                                   2).ranks == (1, 2, 2, 1)


def test_steinlechner_preset_with_ttemps_uniform_cores():
    # TTeMPS's random TT has uniform [0, 1] cores (the preset's default): from rank 1 the
    # search recovers it, while the Gaussian-core tensor gives it nothing to start from
    uni = PR.build_preset("steinlechner", quick=True)
    gau = PR.build_preset("steinlechner", quick=True, core_dist="gaussian")
    assert uni["problem"].core_dist == "uniform" and gau["problem"].core_dist == "gaussian"
    assert float(uni["problem"].a_train.min()) >= 0 > float(gau["problem"].a_train.min())
    errs = []
    for spec in (uni, gau):
        # an iteration cap, not a time budget: the outcome must not depend on the load
        h = S.rank_adaptive_completion(spec["problem"], max_rank=spec["max_rank"],
                                       max_iters=400)
        errs.append(h.final_metrics()["test_err"])
    assert errs[0] < 1e-8 and errs[1] > 0.5, errs
    # the fixed-rank methods start from another uniform random TT (no oracle) and recover
    h = S.run(uni["problem"], "rcg", uni["x0"], iters=300, stop_metric="test_err",
              stop_tol=1e-8, measure_memory=False)
    assert h.final_metrics()["test_err"] < 1e-8
    assert "oracle" not in uni["start"] and "oracle" in gau["start"]
    with pytest.raises(ValueError, match="core_dist"):
        PR.build_preset("t3f-tutorial", core_dist="uniform")
    with pytest.raises(ValueError, match="core_dist"):
        PR.build_preset("steinlechner", quick=True, core_dist="normal")


# --- the rank-adaptive search's start (rank_adaptive_completion(start=...)) -------------

def _data(pb, seed=0):
    return S.RankAdaptiveData(pb, control_fraction=0.1, seed=seed,
                              generator=torch.Generator().manual_seed(seed))


def test_spectral_start_is_the_rank_one_sparse_spectral_point():
    pb = P.Completion((4,) * 5, 2, oversampling=10, seed=0)
    data = _data(pb)
    ones = [1] * 6
    # the search's start: the rank-1 point of the training part (control set held out),
    # the same tensor in any order of the samples, bit for bit (1 and N processes)
    x = S._rank1_spectral_point(data)
    ref = S.sparse_spectral_point(data.idx_tr, data.vals_tr, pb.manifold.shape, ones)
    assert x.ranks == tuple(ones)
    assert torch.allclose(x.full(), ref.full(), rtol=0, atol=1e-12 * float(ref.full().norm()))
    perm = torch.randperm(len(data.vals_tr), generator=torch.Generator().manual_seed(1))
    data.idx_tr, data.vals_tr = data.idx_tr[perm], data.vals_tr[perm]
    y = S._rank1_spectral_point(data)
    assert all(torch.equal(a, b) for a, b in zip(x.cores, y.cores))
    # and the search starts there: its first record is one CG step from that point
    h = S.rank_adaptive_completion(pb, max_rank=2, start="spectral", max_iters=1)
    sub = _data(pb).make(ones)
    step = S.run(sub, "rcg", sub.manifold.pack_point(ref), iters=1, metrics_every=0,
                 measure_memory=False)
    assert h.iters == [1] and h.info["start"] == "spectral"
    got, want = sub.manifold.to_tt(h.x).full(), sub.manifold.to_tt(step.x).full()
    assert torch.allclose(got, want, rtol=0, atol=1e-10 * float(want.norm()))


def _rank1_values(x, shape, idx):
    """The rank-1 packed point ``x`` at the multi-indices ``idx``: the product of its
    cores' entries (a reference independent of the sampled-entry kernels)."""
    cores = FixedTTRank(shape, [1] * (len(shape) + 1)).to_tt(x).cores
    out = torch.ones(idx.shape[0], dtype=torch.float64)
    for k, c in enumerate(cores):
        out = out * c[0, idx[:, k], 0].double()
    return out


@pytest.mark.parametrize("shape, rate, core_dist, seed, kept, lower", [
    # Gaussian cores (mean zero): the slice means carry nothing, the spectral start does
    ((4,) * 6, 10, "gaussian", 2, "spectral", "spectral"),
    # uniform cores at d = 8: no samples share the indices right of the first bonds, so
    # the spectral start is arbitrary there (control error 1.0), the means are not
    ((6,) * 8, 10, "uniform", 0, "means", "means"),
    # the means fit's control error is lower, but by less than the control set's noise
    # (t = -0.6): the spectral start is kept, and only from it is the tensor recovered
    ((4,) * 6, 5, "gaussian", 3, "spectral", "means"),
])
def test_auto_start_keeps_the_means_only_when_significantly_better(shape, rate, core_dist,
                                                                    seed, kept, lower):
    pb = P.Completion(shape, 2, oversampling=rate, seed=seed, core_dist=core_dist)
    first = {}
    runs = {s: S.rank_adaptive_completion(
        pb, max_rank=2, seed=seed, start=s,
        stage_callback=lambda st, s=s: first.setdefault(s, st["x"]))
        for s in ("auto", "means", "spectral")}
    auto, won = runs["auto"], runs[kept]
    lost = runs["means" if kept == "spectral" else "spectral"]
    rec = auto.info["rank_history"][0]
    errs = rec["start_errs"]
    # the control errors after each start's fit are those of the runs from that start
    for s in ("means", "spectral"):
        assert errs[s] == runs[s].info["rank_history"][0]["control_err"]
    assert min(errs, key=errs.get) == lower and auto.info["start"] == kept
    # the paired t-statistic against a dense float64 reference on the control set
    data = _data(pb, seed)
    r = {s: _rank1_values(first[s], shape, data.idx_ctrl) - data.vals_ctrl.double()
         for s in ("means", "spectral")}
    dd = r["means"] ** 2 - r["spectral"] ** 2
    t = float(dd.mean() / (dd.std() / math.sqrt(len(dd))))
    assert rec["start_t"] == pytest.approx(t, rel=1e-9)
    assert (t < -2) == (kept == "means")
    # from there on "auto" is the kept start's search (the other one's CG iterations added)
    assert auto.info["ranks"] == won.info["ranks"] == (1,) + (2,) * (len(shape) - 1) + (1,)
    assert auto.iters[0] == won.iters[0] + lost.iters[0]
    assert [a["ranks"] for a in auto.info["rank_history"]] == \
        [a["ranks"] for a in won.info["rank_history"]]
    X = pb.manifold.to_tt(auto.x).full()
    W = pb.manifold.to_tt(won.x).full()
    assert torch.allclose(X, W, rtol=0, atol=1e-9 * float(W.norm()))
    assert auto.final_metrics()["test_err"] < 1e-8
    # the other start alone does not recover
    assert lost.final_metrics()["test_err"] > 1e-2


def test_auto_start_in_float32_and_a_clear_error_for_an_unknown_start():
    pb = P.Completion((4,) * 5, 2, oversampling=10, seed=0, dtype=torch.float32)
    h = S.rank_adaptive_completion(pb, max_rank=2, max_iters=60)
    assert h.x.dtype == torch.float32 and set(h.info["rank_history"][0]["start_errs"]) == {
        "means", "spectral"}
    # an iteration cap spent by the first fit keeps the means without the second fit
    h = S.rank_adaptive_completion(pb, max_rank=2, max_iters=1)
    assert h.info["start"] == "means" and h.iters == [1]
    with pytest.raises(ValueError, match="start.*'spectral'"):
        S.rank_adaptive_completion(pb, max_rank=2, start="dense")


@pytest.mark.parametrize("d, n, N", [(2, 3, 50), (3, 2, 40), (5, 3, 300), (9, 20, 2000)])
def test_column_ids_are_the_lexicographic_ranks_of_the_suffixes(d, n, N):
    # the spectral start's grouping of the samples by column (duplicates included)
    idx = torch.randint(0, n, (N, d), generator=torch.Generator().manual_seed(d))
    ids = S._suffix_ids(idx)
    assert len(ids) == d - 1
    for k in range(d - 1):
        assert torch.equal(ids[k], torch.unique(idx[:, k + 1:], dim=0, return_inverse=True)[1])


def test_a_spectral_start_of_lower_rank_than_the_manifold_packs():
    """Two samples give zero-filled data of TT-rank 2: the dense spectral start of a rank-3
    problem is a rank-deficient TT. It packs as before (solver-internal points skip
    ``pack_point``'s rank test), and equals the data's TT-SVD as a full tensor."""
    idx = torch.tensor([[0, 0, 0], [1, 1, 1]])
    vals = torch.tensor([1.0, 2.0], dtype=torch.float64)
    pb = P.Completion.from_data(idx, vals, shape=(6, 6, 6), ranks=3)
    full = pb.manifold.to_tt(pb.initial_point(kind="spectral")).full()
    ref = torch.zeros(6, 6, 6, dtype=torch.float64)
    ref[0, 0, 0], ref[1, 1, 1] = vals * pb.weight
    assert torch.allclose(full, ref, atol=1e-12)
