"""The compiled sampled-entry kernels called directly (``step``, ``rowdot``, ``outer``,
``gather`` and the fused right step + scatter ``step_outer``) against float64 loops written
here, and the two orders in which :class:`CompiledSampledPoint` may run its right sweep
(fused with the first projection, or alone when the tangent values come first) against dense
references.

Group sizes cover empty groups, a single sample, sizes that are not multiples of the row
blocks and groups longer than the destination prefetch distance; ranks are odd, 1, and above
the 16-column register chunk."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import ttmanifold.tt.sampled_compiled as compiled_mod
from hypothesis import HealthCheck, given, settings, strategies as st
from ttmanifold import IndexSet, kernels
from ttmanifold.tt.sampled_compiled import CompiledSampledPoint

F64 = torch.float64
F32 = torch.float32


@pytest.fixture
def mod(monkeypatch):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the compiled kernels cannot be built here")
    monkeypatch.setattr(compiled_mod, "MIN_SAMPLES", 0)
    was = kernels.enabled()
    kernels.set_enabled(True)
    kernels.build(["sampled"], verbose=False)
    m = kernels.module("sampled")
    assert m is not None, "the compiled sampled-entry kernels failed to build"
    yield m
    kernels.set_enabled(was)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def groups(counts):
    off = torch.zeros(len(counts) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    return off


def make(counts, ra, rb, rc, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    N, P = sum(counts), len(counts)
    a = torch.randn(N, ra, generator=g, dtype=F64)
    c = torch.randn(N, rb, generator=g, dtype=F64)
    Mt = torch.randn(P, rb, rc, generator=g, dtype=F64)
    z = torch.randn(N, generator=g, dtype=F64)
    dst = torch.randperm(N, generator=g).to(torch.int32)
    perm = torch.randperm(N, generator=g).to(torch.int32)
    return groups(counts), a, c, Mt, z, dst, perm, [t.to(dtype) for t in (a, c, Mt, z)]


def ref_step(c, Mt, off, dst):
    out = torch.zeros(c.shape[0], Mt.shape[2], dtype=F64)
    for grp in range(Mt.shape[0]):
        for i in range(int(off[grp]), int(off[grp + 1])):
            out[int(dst[i]) if dst is not None else i] = c[i] @ Mt[grp]
    return out


def ref_outer(a, c, z, off, perm):
    C = torch.zeros(off.numel() - 1, a.shape[1], c.shape[1], dtype=F64)
    for grp in range(C.shape[0]):
        for i in range(int(off[grp]), int(off[grp + 1])):
            C[grp] += float(z[int(perm[i])]) * torch.outer(a[i], c[i])
    return C


COUNTS = [
    [0, 1, 0],          # a single sample between empty groups
    [7, 0, 45, 3, 1],   # sizes around the row blocks; one group past the prefetch distance
    [130],              # one long group
]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("ranks", [(1, 3, 1), (5, 7, 3), (3, 19, 17), (2, 1, 9)])
def test_step_outer_matches_loops(mod, dtype, counts, ranks):
    ra, rb, rc = ranks
    off, a, c, Mt, z, dst, perm, (a_, c_, Mt_, z_) = make(counts, ra, rb, rc, dtype, 1)
    tol = 1e-13 if dtype == F64 else 2e-6
    N, P = a.shape[0], off.numel() - 1
    out = torch.full((N, rc), float("nan"), dtype=dtype)
    C = torch.full((P, ra, rb), float("nan"), dtype=dtype)
    mod.step_outer(c_, Mt_, dst, out, a_, z_, off, perm, C)
    assert rel(out, ref_step(c, Mt, off, dst)) < tol
    assert rel(C, ref_outer(a, c, z, off, perm)) < tol
    # without the step (the first block): the scatter alone, the same as `outer`
    C2 = torch.full((P, ra, rb), float("nan"), dtype=dtype)
    mod.step_outer(c_, Mt_.new_empty(0, 0, 0), None, None, a_, z_, off, perm, C2)
    C3 = torch.full((P, ra, rb), float("nan"), dtype=dtype)
    mod.outer(a_, c_, z_, off, perm, C3)
    assert torch.equal(C2, C3) and rel(C2, ref_outer(a, c, z, off, perm)) < tol


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("counts", COUNTS)
def test_step_and_rowdot_match_loops(mod, dtype, counts):
    ra, rb = 5, 11
    off, a, c, Mt, z, dst, perm, (a_, c_, Mt_, z_) = make(counts, ra, ra, rb, dtype, 2)
    tol = 1e-13 if dtype == F64 else 2e-6
    N = a.shape[0]
    for d in (dst, None):
        out = torch.full((N, rb), float("nan"), dtype=dtype)
        mod.step(a_, Mt_, off, d, out)
        assert rel(out, ref_step(a, Mt, off, d)) < tol
    y = torch.randn(N, rb, dtype=F64, generator=torch.Generator().manual_seed(3))
    t = torch.full((N,), float("nan"), dtype=dtype)
    mod.rowdot(a_, Mt_, y.to(dtype), off, t)
    assert rel(t, (ref_step(a, Mt, off, None) * y).sum(1)) < tol


def test_many_groups_on_two_threads(mod):
    """More groups than one task of the shared-counter schedule, on two threads: every group
    is done once (none skipped, none twice)."""
    counts = [(7 * k) % 11 for k in range(75)]  # empty groups included
    off, a, c, Mt, z, dst, perm, (a_, c_, Mt_, z_) = make(counts, 3, 5, 4, F64, 6)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        N, P = a.shape[0], off.numel() - 1
        out = torch.full((N, 4), float("nan"), dtype=F64)
        C = torch.full((P, 3, 5), float("nan"), dtype=F64)
        mod.step_outer(c_, Mt_, dst, out, a_, z_, off, perm, C)
        assert rel(out, ref_step(c, Mt, off, dst)) < 1e-13
        assert rel(C, ref_outer(a, c, z, off, perm)) < 1e-13
        t = torch.full((N,), float("nan"), dtype=F64)
        mod.rowdot(c_, Mt_, out, off, t)
        assert rel(t, (ref_step(c, Mt, off, None) * out).sum(1)) < 1e-13
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("counts", COUNTS)
def test_rows_from_a_table(mod, dtype, counts):
    """Every kernel with ``aidx`` / ``cidx`` (left rows ``a[aidx[i]]``, right rows
    ``c[cidx[i]]`` of small tables) against the loops on the gathered rows."""
    ra, rb, rc = 3, 7, 4
    off, a, c, Mt, z, dst, perm, (a_, c_, Mt_, z_) = make(counts, ra, rb, rc, dtype, 13)
    tol = 1e-13 if dtype == F64 else 2e-6
    N, P = a.shape[0], off.numel() - 1
    g = torch.Generator().manual_seed(14)
    ta, tc = torch.randn(6, ra, generator=g, dtype=F64), torch.randn(5, rb, generator=g, dtype=F64)
    aidx = torch.randint(0, 6, (N,), generator=g).to(torch.int32)
    cidx = torch.randint(0, 5, (N,), generator=g).to(torch.int32)
    ra_, rc_ = ta[aidx.long()], tc[cidx.long()]  # the rows they stand for
    Ma = torch.randn(P, ra, rb, generator=g, dtype=F64)
    out = torch.full((N, rb), float("nan"), dtype=dtype)
    mod.step(ta.to(dtype), Ma.to(dtype), off, dst, out, aidx)
    assert rel(out, ref_step(ra_, Ma, off, dst)) < tol
    for (A, ai, refa), (Cv, ci, refc) in [((ta, aidx, ra_), (c, None, c)),
                                          ((a, None, a), (tc, cidx, rc_)),
                                          ((ta, aidx, ra_), (tc, cidx, rc_))]:
        A, Cv = A.to(dtype), Cv.to(dtype)
        t = torch.full((N,), float("nan"), dtype=dtype)
        mod.rowdot(A, Ma.to(dtype), Cv, off, t, ai, ci)
        assert rel(t, (ref_step(refa, Ma, off, None) * refc).sum(1)) < tol
        C = torch.full((P, ra, rb), float("nan"), dtype=dtype)
        mod.outer(A, Cv, z_, off, perm, C, ai, ci)
        assert rel(C, ref_outer(refa, refc, z, off, perm)) < tol
        out = torch.full((N, rc), float("nan"), dtype=dtype)
        C = torch.full((P, ra, rb), float("nan"), dtype=dtype)
        mod.step_outer(Cv, Mt_, dst, out, A, z_, off, perm, C, ai, ci)
        assert rel(out, ref_step(refc, Mt, off, dst)) < tol
        assert rel(C, ref_outer(refa, refc, z, off, perm)) < tol
    with pytest.raises(RuntimeError, match="rowdot"):
        mod.rowdot(ta.to(dtype), Ma.to(dtype), c_, off, t, aidx, cidx[:-1])  # fewer c rows


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("threads", [1, 2])
def test_gather_matches_index_select(mod, dtype, threads):
    """``gather``: scalars and rows, more rows than one task of the two-thread schedule."""
    g = torch.Generator().manual_seed(12)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape, N in (((50,), 20000), ((37, 3), 20000), ((4, 17), 5), ((6,), 0)):
            src = torch.randn(*shape, generator=g, dtype=F64).to(dtype)
            idx = torch.randint(0, shape[0], (N,), generator=g).to(torch.int32)
            out = torch.full((N,) + shape[1:], float("nan"), dtype=dtype)
            mod.gather(src, idx, out)
            assert torch.equal(out, src.index_select(0, idx.long()))
            if len(shape) == 1:  # the sum with out
                mod.gather(src, idx, out, True)
                assert torch.equal(out, 2 * src.index_select(0, idx.long()))
        with pytest.raises(RuntimeError, match="gather"):
            mod.gather(src, idx, torch.empty(1, dtype=dtype))
        with pytest.raises(RuntimeError, match="add expects"):
            mod.gather(src.view(-1, 2), idx, torch.empty(0, 2, dtype=dtype), True)
    finally:
        torch.set_num_threads(n)


def test_helpers_repeated_concurrent_and_after_fork(mod):
    """The helper threads of the kernels: many calls in a row, two Python threads calling at
    once, and a forked child (which has no helper threads) all give the loops' results."""
    import threading

    counts = [(5 * k) % 9 for k in range(120)]
    off, a, c, Mt, z, dst, perm, _ = make(counts, 4, 6, 5, F64, 7)
    ref = ref_step(c, Mt, off, dst)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def calls(k, errs):
            out = torch.empty(a.shape[0], 5, dtype=F64)
            for _ in range(k):
                out.fill_(float("nan"))
                mod.step(c, Mt, off, dst, out)
                if not rel(out, ref) < 1e-13:
                    errs.append(rel(out, ref))

        errs = []
        calls(60, errs)
        threads = [threading.Thread(target=calls, args=(40, errs)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errs
        if hasattr(os, "fork"):
            pid = os.fork()
            if pid == 0:  # child: exit status 0 iff the results are right
                e = []
                calls(5, e)
                os._exit(0 if not e else 1)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        torch.set_num_threads(n)


def test_step_outer_rejects_inconsistent_shapes(mod):
    off, a, c, Mt, z, dst, perm, _ = make([3, 2], 2, 3, 4, F64, 4)
    with pytest.raises(RuntimeError, match="step_outer"):
        mod.step_outer(c, Mt, dst, torch.empty(5, 4, dtype=F64), a,
                       z, off, perm, torch.empty(2, 3, 3, dtype=F64))  # C of wrong shape
    with pytest.raises(RuntimeError, match="step_outer"):
        mod.step_outer(c, Mt, dst, torch.empty(5, 2, dtype=F64), a,
                       z, off, perm, torch.empty(2, 2, 3, dtype=F64))  # out of wrong width


# ---------------------------------------------------------------------------------------
# CompiledSampledPoint: the right sweep fused with the first projection, or alone
# ---------------------------------------------------------------------------------------

def dense(cores):
    res = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    for core in cores[1:]:
        res = torch.einsum("ia,ajb->ijb", res, core).reshape(-1, core.shape[2])
    return res.reshape([int(core.shape[1]) for core in cores])


def dense_project(U, V, idx, z):
    """D_k = d/dU_k of sum_e z_e xi(i(e)), xi = sum_k U_<k dU_k V_>k, by autograd on the
    dense tangent tensor (float64)."""
    dU = [torch.zeros(u.shape, dtype=F64, requires_grad=True) for u in U]
    xi = dense_tangent(U, V, dU)
    (xi[tuple(idx.t())] * z).sum().backward()
    return [t.grad for t in dU]


def dense_tangent(U, V, dU):
    d = len(U)
    return sum(dense([U[j] for j in range(k)] + [dU[k]] + [V[j] for j in range(k + 1, d)])
               for k in range(d))


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_point_fused_and_separate_right_sweeps(mod, data):
    d = data.draw(st.integers(2, 5))
    shape = tuple(data.draw(st.lists(st.integers(2, 5), min_size=d, max_size=d)))
    inner = data.draw(st.lists(st.integers(1, 18), min_size=d - 1, max_size=d - 1))
    ranks = [1] + inner + [1]
    N = data.draw(st.integers(1, 90))
    min_group = data.draw(st.sampled_from([1, 3, 64]))
    dtype = data.draw(st.sampled_from([F64, F32]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10 ** 6)))
    idx = torch.stack([torch.randint(0, n, (N,), generator=gen) for n in shape], 1)
    iset = IndexSet(idx, shape)
    iset.min_group = min_group
    # any cores: the kernels do not need orthogonal ones (ranks may be infeasible too)
    U, V, dU = ([torch.randn(ranks[k], n, ranks[k + 1], generator=gen, dtype=F64)
                 for k, n in enumerate(shape)] for _ in range(3))
    z = torch.randn(N, generator=gen, dtype=F64)
    tol = 1e-11 if dtype == F64 else 1e-4
    ref_D = dense_project(U, V, idx, z)
    ref_t = dense_tangent(U, V, dU)[tuple(idx.t())]
    cast = [[t.to(dtype) for t in ts] for ts in (U, V, dU)]
    Uc, Vc, dUc = cast
    # fused: the projection first (runs the right sweep inside the scatter), then the
    # tangent values on the kept right vectors, then the projection again (plain scatter)
    pt = iset.sampled_point(Uc, Vc)
    assert isinstance(pt, CompiledSampledPoint)
    assert rel(pt.values, dense(U)[tuple(idx.t())]) < tol
    D1 = pt.project(z.to(dtype))
    t1 = pt.tangent(dUc)
    D2 = pt.project(z.to(dtype))
    # separate: the tangent values first (the right sweep alone), then the projection
    qt = iset.sampled_point(Uc, Vc)
    t2 = qt.tangent(dUc)
    D3 = qt.project(z.to(dtype))
    for D in (D1, D2, D3):
        assert all(rel(D[k], ref_D[k]) < tol for k in range(d))
    assert rel(t1, ref_t) < tol and rel(t2, ref_t) < tol


@pytest.mark.parametrize("table_bytes", [0, 1 << 19])
def test_point_with_gathered_or_indexed_end_cores(mod, monkeypatch, table_bytes):
    """The first / last merged core read in place by index (small) or gathered into an
    (N, r) array (``TABLE_BYTES`` exceeded): both against dense references, with the right
    sweep fused into the projection and alone."""
    monkeypatch.setattr(compiled_mod, "TABLE_BYTES", table_bytes)
    gen = torch.Generator().manual_seed(21)
    shape, ranks, N = (3, 4, 2, 5, 3), [1, 3, 4, 2, 3, 1], 70
    idx = torch.stack([torch.randint(0, n, (N,), generator=gen) for n in shape], 1)
    iset = IndexSet(idx, shape)
    iset.min_group = 1
    U, V, dU = ([torch.randn(ranks[k], n, ranks[k + 1], generator=gen, dtype=F64)
                 for k, n in enumerate(shape)] for _ in range(3))
    z = torch.randn(N, generator=gen, dtype=F64)
    ref_D, ref_t = dense_project(U, V, idx, z), dense_tangent(U, V, dU)[tuple(idx.t())]
    pt, qt = iset.sampled_point(U, V), iset.sampled_point(U, V)
    assert len(pt.plan.bounds) > 2
    assert (pt.Lidx[1] is not None) == (table_bytes > 0)
    D1, t1 = pt.project(z), pt.tangent(dU)
    t2, D2 = qt.tangent(dU), qt.project(z)
    assert (qt.Ridx[-2] is not None) == (table_bytes > 0)
    assert rel(pt.values, dense(U)[tuple(idx.t())]) < 1e-12
    for D in (D1, D2):
        assert all(rel(D[k], ref_D[k]) < 1e-12 for k in range(len(shape)))
    assert rel(t1, ref_t) < 1e-12 and rel(t2, ref_t) < 1e-12
