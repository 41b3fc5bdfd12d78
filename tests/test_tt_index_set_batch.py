"""B sampled-entry problems in one call (issue 12): :class:`BatchIndexSet` and the batched
sparse projection :func:`project_sampled_batch`, ragged sample counts (an empty set
included).

References: dense float64 code written here (full tensors, the orthogonal projector onto
the tangent space from the Jacobian of the core map), and B independent single-problem
calls (:class:`IndexSet`, :meth:`FixedTTRank.project_sampled`). Tangent vectors are
compared as full tensors (gauge invariant). Both kernel families run: the torch blocked
kernels and the compiled CPU kernels (forced on for small sets).
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ttmanifold.tt.sampled_compiled as compiled_mod
from ttmanifold import FixedTTRank, IndexSet, kernels
from ttmanifold.manifold.sampled_batch import project_sampled_batch
from ttmanifold.tt import BatchIndexSet

F64, F32 = torch.float64, torch.float32
SHAPE = (4, 5, 3, 4)
RANKS = (1, 2, 3, 2, 1)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(params=["torch", "compiled"])
def kernel(request, monkeypatch):
    """The torch blocked kernels, or the compiled ones forced on for any set size."""
    was = kernels.enabled()
    if request.param == "compiled":
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler: the compiled kernels cannot be built here")
        monkeypatch.setattr(compiled_mod, "MIN_SAMPLES", 0)
        kernels.set_enabled(True)
        kernels.build(["sampled"], verbose=False)
        assert kernels.module("sampled") is not None
    else:
        kernels.set_enabled(False)
    yield request.param
    kernels.set_enabled(was)


# -- independent dense references ---------------------------------------------------------
def cores_of(flat, shape, ranks):
    out, o = [], 0
    for k, n in enumerate(shape):
        m = ranks[k] * n * ranks[k + 1]
        out.append(flat[o:o + m].reshape(ranks[k], n, ranks[k + 1]))
        o += m
    return out


def full(cores):
    res = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    for c in cores[1:]:
        res = torch.einsum("ia,ajb->ijb", res, c).reshape(-1, c.shape[2])
    return res.reshape([int(c.shape[1]) for c in cores])


def projector(X, ranks):
    """Orthogonal projector onto the tangent space at the dense X (range of the Jacobian
    of the core map at a TT-SVD of X)."""
    shape, cores, c, rp = X.shape, [], X, 1
    for k in range(len(shape) - 1):
        u, s, vh = torch.linalg.svd(c.reshape(rp * shape[k], -1), full_matrices=False)
        r = ranks[k + 1]
        cores.append(u[:, :r].reshape(rp, shape[k], r))
        c, rp = s[:r, None] * vh[:r], r
    cores.append(c.reshape(rp, shape[-1], 1))
    v0 = torch.cat([g.reshape(-1) for g in cores])
    J = torch.autograd.functional.jacobian(
        lambda v: full(cores_of(v, shape, ranks)).reshape(-1), v0, vectorize=True)
    U, _, _ = torch.linalg.svd(J, full_matrices=False)
    dim = sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape)) - sum(
        r * r for r in ranks[1:-1])
    return U[:, :dim] @ U[:, :dim].T


def case(counts, seed=0, dtype=F64, shape=SHAPE, ranks=RANKS):
    M = FixedTTRank(shape, ranks)
    gen = torch.Generator().manual_seed(seed)
    B = len(counts)
    p = M.random(B, dtype=F64, generator=gen).to(dtype)
    idx = [torch.stack([torch.randint(0, n, (c,), generator=gen) for n in shape], 1)
           for c in counts]
    vals = torch.randn(sum(counts), generator=gen, dtype=F64).to(dtype)
    return M, p, idx, vals


COUNTS = [40, 0, 7, 90]  # ragged, one empty set


def test_gather_matches_dense_and_single_calls(kernel):
    for dtype, tol in ((F64, 1e-12), (F32, 2e-5)):
        M, p, idx, _ = case(COUNTS, dtype=dtype)
        bset = IndexSet.batched(idx, SHAPE)
        assert isinstance(bset, BatchIndexSet) and len(bset) == sum(COUNTS)
        got = bset.gather(M.to_tt(p))
        assert got.shape == (sum(COUNTS),) and got.dtype == dtype
        for b, (g, i) in enumerate(zip(bset.split(got), idx)):
            X = full(cores_of(p[b].to(F64), SHAPE, RANKS))
            ref = X[tuple(i.t())]
            assert torch.allclose(g.to(F64), ref, atol=tol, rtol=tol)
            if len(i):
                single = IndexSet(i, SHAPE).gather(M.to_tt(p[b]))
                assert torch.allclose(g, single, atol=tol, rtol=tol)


def test_gather_autograd_matches_single_problems():
    M, p, idx, vals = case(COUNTS)
    bset = BatchIndexSet(idx, SHAPE)
    cores = [c.detach().clone().requires_grad_() for c in M.split(p)]
    loss = (bset.gather(cores) * vals).sum()
    grads = torch.autograd.grad(loss, cores)
    for b, (i, v) in enumerate(zip(idx, bset.split(vals))):
        cb = [c[b].detach().clone().requires_grad_() for c in M.split(p)]
        X = full(cb)
        lb = (X[tuple(i.t())] * v).sum() if len(i) else sum(c.sum() * 0 for c in cb)
        gb = torch.autograd.grad(lb, cb)
        for g, r in zip(grads, gb):
            assert torch.allclose(g[b], r, atol=1e-12)


def dense_tangent(M, pb, u):
    """Full tensor of the packed gauged deltas ``u`` at the single point ``pb``, through the
    library's TangentTT (a gauge-invariant comparison: the dense reference is the
    projector below)."""
    return M.tangent_to_tt(pb, u).full()


def test_project_sampled_batch_matches_dense_and_single_calls(kernel):
    for dtype, tol in ((F64, 1e-10), (F32, 5e-4)):
        M, p, idx, vals = case(COUNTS, seed=1, dtype=dtype)
        bset = BatchIndexSet(idx, SHAPE)
        got = project_sampled_batch(M, p, bset, vals)
        assert got.shape == p.shape and got.dtype == dtype
        # the manifold's method takes the batch through the same function
        assert torch.equal(M.project_sampled(p, bset, vals), got)
        for b, (i, v) in enumerate(zip(idx, bset.split(vals))):
            Z = torch.zeros(SHAPE, dtype=F64)
            Z.index_put_(tuple(i.t()), v.to(F64), accumulate=True)
            X = full(cores_of(p[b].to(F64), SHAPE, RANKS))
            ref = (projector(X, RANKS) @ Z.reshape(-1)).reshape(SHAPE)
            T = dense_tangent(M, p[b].to(F64), got[b].to(F64))
            assert torch.allclose(T, ref, atol=tol * max(1.0, float(ref.abs().max())))
            if len(i):
                single = M.project_sampled(p[b], IndexSet(i, SHAPE), v.contiguous())
                assert torch.allclose(got[b], single, atol=tol, rtol=tol)
            else:
                assert float(got[b].abs().max()) == 0.0


def test_sampled_point_of_batch_matches_single_points(kernel):
    """The CG pieces on the stacked TT: values, projection and tangent values at the
    samples, summed per problem in the layout, equal B single sampled points."""
    M, p, idx, vals = case(COUNTS, seed=2)
    bset = BatchIndexSet(idx, SHAPE)
    from ttmanifold.manifold import right_cores
    U = M.split(p)
    V = right_cores(U)
    pt = bset.sampled_point(U, V)
    z = pt.from_samples(vals)
    D = pt.project(z)
    dU = [torch.randn_like(u) for u in U]
    e = pt.tangent(dU)
    sums = bset.layout_sum(pt, e * z)
    for b, (i, v) in enumerate(zip(idx, bset.split(vals))):
        if not len(i):
            assert all(float(d[b].abs().max()) == 0 for d in D) and float(sums[b]) == 0
            continue
        iset = IndexSet(i, SHAPE)
        Ub = [u[b] for u in U]
        Vb = [None] + [w[b] for w in V[1:]]
        sp = iset.sampled_point(Ub, Vb)
        assert torch.allclose(pt.to_samples(pt.values)[bset.offsets[b]:bset.offsets[b + 1]],
                              sp.to_samples(sp.values), atol=1e-12)
        Db = sp.project(sp.from_samples(v))
        for d, db in zip(D, Db):
            assert torch.allclose(d[b], db, atol=1e-12)
        eb = sp.to_samples(sp.tangent([x[b] for x in dU]))
        assert torch.allclose(sums[b], (eb * v).sum(), atol=1e-11)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(counts=st.lists(st.integers(0, 30), min_size=1, max_size=5),
       seed=st.integers(0, 2 ** 16))
def test_property_gather_and_sums_ragged(counts, seed):
    M, p, idx, vals = case(counts, seed=seed, shape=(3, 4, 2), ranks=(1, 2, 2, 1))
    bset = BatchIndexSet(idx, (3, 4, 2))
    got = bset.gather(M.to_tt(p))
    sums = bset.sum_per_problem(got * vals)
    for b, i in enumerate(idx):
        X = full(cores_of(p[b], (3, 4, 2), (1, 2, 2, 1)))
        ref = X[tuple(i.t())] if len(i) else X.new_zeros(0)
        assert torch.allclose(bset.split(got)[b], ref, atol=1e-12)
        assert torch.allclose(sums[b], (ref * bset.split(vals)[b]).sum(), atol=1e-11)
    for b, i in enumerate(bset.indices):
        assert torch.equal(i, idx[b])


def test_all_sets_empty():
    M, p, idx, vals = case([0, 0])
    bset = BatchIndexSet(idx, SHAPE)
    assert bset.gather(M.to_tt(p)).shape == (0,)
    out = project_sampled_batch(M, p, bset, vals)
    assert out.shape == p.shape and float(out.abs().max()) == 0.0


def test_bad_input_errors_name_the_argument():
    M, p, idx, vals = case([5, 3])
    with pytest.raises(TypeError, match="indices"):
        BatchIndexSet(idx[0], SHAPE)
    with pytest.raises(ValueError, match="indices"):
        BatchIndexSet([], SHAPE)
    with pytest.raises(TypeError, match=r"indices\[1\]"):
        BatchIndexSet([idx[0], idx[1].double()], SHAPE)
    with pytest.raises(ValueError, match=r"indices\[1\]"):
        BatchIndexSet([idx[0], idx[1][:, :2]], SHAPE)
    bad = idx[1].clone()
    bad[0, 1] = SHAPE[1]
    with pytest.raises(ValueError, match=r"indices\[1\].*out of range"):
        BatchIndexSet([idx[0], bad], SHAPE)
    bset = BatchIndexSet(idx, SHAPE)
    with pytest.raises(ValueError, match="tt"):
        bset.gather(M.to_tt(p[:1]))  # one TT for two sets
    with pytest.raises(ValueError, match="tt"):
        bset.gather(M.to_tt(p[0]))  # not a batch
    with pytest.raises(ValueError, match="p"):
        project_sampled_batch(M, p[:1], bset, vals)
    with pytest.raises(ValueError, match="values"):
        project_sampled_batch(M, p, bset, vals[:-1])
    with pytest.raises(TypeError, match="values"):
        project_sampled_batch(M, p, bset, vals.float())
    with pytest.raises(TypeError, match="index_set"):
        project_sampled_batch(M, p, IndexSet(idx[0], SHAPE), vals)
    with pytest.raises(ValueError, match="index_set"):
        M2 = FixedTTRank((4, 5, 3, 5), RANKS)
        project_sampled_batch(M2, M2.random(2, dtype=F64), bset, vals)
    with pytest.raises(ValueError, match="x"):
        bset.split(vals[:-1])
    # the right cores of other points (a V of a smaller batch was read out of range or
    # silently as this batch's), and a NaN value named as what it is (not the projection's u)
    from ttmanifold.manifold import right_cores
    with pytest.raises(ValueError, match=r"V: expected the point's right-orthogonal cores"):
        M.project_sampled(p, bset, vals, V=right_cores(M.split(p[:1])))
    with pytest.raises(ValueError, match=r"V: expected"):
        M.project_sampled(p, bset, vals, V=right_cores(M.split(p[0])))
    with pytest.raises(ValueError, match=r"V: expected"):  # a batch's V at one point
        M.project_sampled(p[1], IndexSet(idx[1], SHAPE), vals[-3:], V=right_cores(M.split(p)))
    with pytest.raises(RuntimeError, match=r"values: contains NaN"):
        M.project_sampled(p, bset, torch.full_like(vals, float("nan")))
    assert torch.equal(M.project_sampled(p, bset, vals, V=right_cores(M.split(p))),
                       M.project_sampled(p, bset, vals))


def test_merged_blocks_match_single_calls(kernel):
    """Blocks of 2 and 3 merged modes (merged per TT): the stacked set's min_group lowered
    so that this small batch merges; every kernel against single problems and the dense
    reference."""
    shape, ranks = (2, 3, 2, 3), (1, 2, 2, 2, 1)
    M, p, idx, vals = case([150, 0, 60, 200], seed=4, shape=shape, ranks=ranks)
    bset = BatchIndexSet(idx, shape)
    bset.stacked.min_group = 1
    bounds = bset.stacked.bounds(list(ranks))
    assert max(hi - lo for lo, hi in bounds) >= 3, bounds
    from ttmanifold.manifold import right_cores
    U = M.split(p)
    V = right_cores(U)
    got = bset.gather(M.to_tt(p))
    proj = project_sampled_batch(M, p, bset, vals)
    pt = bset.sampled_point(U, V)
    dU = [torch.randn_like(u) for u in U]
    e = pt.to_samples(pt.tangent(dU))
    for b, (i, v) in enumerate(zip(idx, bset.split(vals))):
        X = full(cores_of(p[b], shape, ranks))
        assert torch.allclose(bset.split(got)[b], X[tuple(i.t())], atol=1e-12)
        Z = torch.zeros(shape, dtype=F64)
        Z.index_put_(tuple(i.t()), v, accumulate=True)
        ref = (projector(X, ranks) @ Z.reshape(-1)).reshape(shape)
        assert torch.allclose(M.tangent_to_tt(p[b], proj[b]).full(), ref, atol=1e-10)
        # tangent values: sum_k U_<k dU_k V_>k at the samples, dense
        Ub = [u[b] for u in U]
        Vb = [None] + [w[b] for w in V[1:]]
        T = sum(full(Ub[:k] + [dU[k][b]] + Vb[k + 1:]) for k in range(len(shape)))
        assert torch.allclose(bset.split(e)[b], T[tuple(i.t())], atol=1e-12)


def test_gather_double_backward_matches_dense():
    """create_graph=True takes the per-mode kernels of the stacked set (batched cores
    stacked on the fly): a Hessian-vector quantity against the dense per-problem one."""
    M, p, idx, vals = case([9, 0, 6], seed=6)
    bset = BatchIndexSet(idx, SHAPE)

    def second(loss_of):
        cores = [c.detach().clone().requires_grad_() for c in M.split(p)]
        g = torch.autograd.grad(loss_of(cores), cores, create_graph=True)
        return torch.autograd.grad(sum((x ** 2).sum() for x in g), cores)

    got = second(lambda cs: (bset.gather(cs) ** 3 * vals).sum())
    ref = second(lambda cs: sum(
        (full([c[b] for c in cs])[tuple(i.t())] ** 3 * v).sum()
        for b, (i, v) in enumerate(zip(idx, bset.split(vals))) if len(i)))
    for a, r in zip(got, ref):
        assert torch.allclose(a, r, atol=1e-10)
