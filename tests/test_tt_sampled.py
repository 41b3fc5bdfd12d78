"""Tests of the sampled-entry kernels of :mod:`ttmanifold.tt` against independent
float64 references: dense tensors indexed at the samples, and explicit per-sample loops of
small matrix products written in this file (no ttmanifold code in the references).

Both implementations are covered: the per-mode sample-order kernels (``left_vectors``,
``right_vectors``, ``scatter``, ``gather`` under autograd) and the blocked layouts
(``gather`` without autograd, ``project_sampled``, :class:`SampledPoint`), the latter with
and without merged modes (``min_group`` lowered so that small index sets merge), with one or
several segments per group (``_SEG_COST``), one or several segment widths per block
(``CLASSES``), unbalanced
groups, duplicates, N = 0 and N = 1, d = 1; and the neighbour-mode order of the layouts."""
from __future__ import annotations

import gc
import math
import os
import shutil

import pytest
import torch

import ttmanifold.tt.blocked as blocked_mod
import ttmanifold.tt.layout as layout_mod
import ttmanifold.tt.sampled_compiled as compiled_mod
from hypothesis import HealthCheck, given, settings, strategies as st
from ttmanifold import kernels
from ttmanifold.manifold import project_sampled, right_cores
from ttmanifold.tt.sampled_compiled import CompiledSampledPoint as NativeSampledPoint
from ttmanifold import TT, FixedTTRank, IndexSet
from ttmanifold.experiments.problems import Completion
from ttmanifold.experiments.solvers import run

F64 = torch.float64
F32 = torch.float32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(autouse=True)
def _torch_kernels():
    """The tests of this file exercise the torch kernels (SampledPoint and its layouts);
    the compiled kernels are switched on explicitly by the tests at the end (``native``)."""
    was = kernels.enabled()
    kernels.set_enabled(False)
    yield
    kernels.set_enabled(was)


@pytest.fixture
def native(monkeypatch):
    """Switch the compiled kernels on, for index sets of any size; they must build where a
    C++ compiler exists."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the compiled kernels cannot be built here")
    monkeypatch.setattr(compiled_mod, "MIN_SAMPLES", 0)
    kernels.set_enabled(True)
    kernels.build(["sampled"], verbose=False)
    mod = kernels.module("sampled")
    assert mod is not None, "the compiled sampled-entry kernels failed to build"
    return mod


# ---------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------

def rand_cores(shape, ranks, gen, dtype=F64):
    return [torch.randn(ranks[k], n, ranks[k + 1], generator=gen, dtype=F64).to(dtype)
            for k, n in enumerate(shape)]


def dense(cores):
    """Dense tensor of TT cores by plain einsum."""
    res = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    for c in cores[1:]:
        res = torch.einsum("ia,ajb->ijb", res, c).reshape(-1, c.shape[2])
    return res.reshape([int(c.shape[1]) for c in cores])


def ref_left(cores, idx, k):
    """l_k(e) = G_0[i_0] ... G_{k-1}[i_{k-1}] (row vector), explicit loop per sample."""
    out = []
    for e in range(idx.shape[0]):
        v = torch.ones(1, 1, dtype=F64)
        for j in range(k):
            v = v @ cores[j][:, int(idx[e, j]), :].double()
        out.append(v[0])
    return torch.stack(out) if out else torch.zeros(0, cores[k].shape[0] if k < len(cores)
                                                     else 1, dtype=F64)


def ref_right(cores, idx, k):
    """rho_k(e) = G_k[i_k] ... G_{d-1}[i_{d-1}] (column), explicit loop per sample."""
    d = len(cores)
    out = []
    for e in range(idx.shape[0]):
        v = torch.ones(1, 1, dtype=F64)
        for j in range(d - 1, k - 1, -1):
            v = cores[j][:, int(idx[e, j]), :].double() @ v
        out.append(v[:, 0])
    return torch.stack(out) if out else torch.zeros(0, 1, dtype=F64)


def ref_project(U, V, idx, z):
    """D_k[:, i, :] = sum_{e: i_k(e) = i} z_e l_k(e; U)^T rho_{k+1}(e; V)^T."""
    d = len(U)
    D = [torch.zeros(u.shape, dtype=F64) for u in U]
    for k in range(d):
        L, R = ref_left(U, idx, k), ref_right(V, idx, k + 1)
        for e in range(idx.shape[0]):
            D[k][:, int(idx[e, k]), :] += float(z[e]) * torch.outer(L[e], R[e])
    return D


def ref_tangent(U, V, dU, idx):
    """sum_k l_k(e; U) dU_k[i_k(e)] rho_{k+1}(e; V) per sample."""
    d = len(U)
    out = torch.zeros(idx.shape[0], dtype=F64)
    for k in range(d):
        L, R = ref_left(U, idx, k), ref_right(V, idx, k + 1)
        for e in range(idx.shape[0]):
            out[e] += L[e] @ dU[k][:, int(idx[e, k]), :].double() @ R[e]
    return out


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm()) / max(float(b.norm()), 1e-300)


def random_indices(shape, N, gen, dup=True):
    idx = torch.stack([torch.randint(0, n, (N,), generator=gen) for n in shape], 1)
    if dup and N > 3:
        idx[1] = idx[0]
        idx[N - 1] = idx[2]
    return idx


def skewed_indices(shape, N, gen):
    """Very unbalanced groups: mode 0 mostly 0, the last mode mostly n-1."""
    idx = random_indices(shape, N, gen)
    idx[: (9 * N) // 10, 0] = 0
    idx[N // 8:, -1] = shape[-1] - 1
    return idx


@pytest.fixture
def orientation():
    """Buffers are row-major (one layout orientation)."""
    return "rm"


class _RowMajor:
    """The buffer operations of the blocked kernels under the names the tests use."""
    fm = False
    shape = staticmethod(lambda slots, r: (slots + 1, r))
    col = staticmethod(blocked_mod.col)
    move = staticmethod(blocked_mod.move)
    step = staticmethod(blocked_mod.step)
    step_out = staticmethod(blocked_mod.step_out)
    move_step = staticmethod(blocked_mod.move_step)


@pytest.fixture(params=[64, 0])
def seg_cost(request, monkeypatch):
    """64: one segment per group when balanced; 0: narrow segments (several per group)."""
    monkeypatch.setattr(layout_mod, "SEG_COST", request.param)
    return request.param


@pytest.fixture(params=["one", "many"])
def widths(request, monkeypatch):
    """One segment width per block, or several width classes (row-major layouts) forced
    at these tiny sizes (no minimum size or saving, at most 3 widths)."""
    if request.param == "many":
        monkeypatch.setattr(layout_mod, "CLASS_MIN_SLOTS", 0)
        monkeypatch.setattr(layout_mod, "CLASS_MIN_SAVING", -1.0)
        monkeypatch.setattr(layout_mod, "CLASSES", 3)
    return request.param


CASES = [
    # shape, ranks, N, min_group, kind
    ((3, 4, 3, 2), (1, 2, 3, 2, 1), 50, 64, "random"),  # single modes
    ((3, 4, 3, 2), (1, 2, 3, 2, 1), 150, 2, "random"),  # merged pairs
    ((2, 3, 2, 2, 3), (1, 2, 2, 3, 2, 1), 70, 1, "random"),  # pairs and a single mode
    ((2, 2, 2, 3), (1, 2, 1, 2, 1), 80, 1, "random"),  # a block of three modes
    ((9, 3, 4), (1, 3, 2, 1), 40, 2, "skewed"),  # unbalanced groups
    ((6,), (1, 1), 9, 1, "random"),  # d = 1
    ((3, 4, 3), (1, 2, 2, 1), 1, 1, "random"),  # N = 1
]


def make_set(shape, N, min_group, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = (skewed_indices if kind == "skewed" else random_indices)(shape, N, gen)
    iset = IndexSet(idx, shape)
    iset.min_group = min_group
    return iset, idx, gen


# ---------------------------------------------------------------------------------------
# per-mode sample-order kernels
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(len(CASES)))
def test_per_mode_kernels(case):
    shape, ranks, N, _, kind = CASES[case]
    iset, idx, gen = make_set(shape, N, 64, kind, seed=case)
    cores = rand_cores(shape, ranks, gen)
    d = len(shape)
    left = iset.left_vectors(cores)
    for k in range(d):
        assert rel(left[k], ref_left(cores, idx, k)) < 1e-12
    right = iset.right_vectors(cores, downto=1)
    for k in range(1, d + 1):
        assert rel(right[k], ref_right(cores, idx, k)) < 1e-12
    z = torch.randn(N, generator=gen, dtype=F64)
    U, V = cores, rand_cores(shape, ranks, gen)
    ref = ref_project(U, V, idx, z)
    for k in range(d):
        lk = ref_left(U, idx, k) * z.unsqueeze(1)
        rk = ref_right(V, idx, k + 1)
        assert rel(iset.scatter(k, lk, rk), ref[k]) < 1e-12


def test_per_mode_fallback_is_used_for_skewed_groups():
    iset, _, _ = make_set((9, 3, 4), 40, 64, "skewed", seed=3)
    assert not iset.plan(0).padded


# ---------------------------------------------------------------------------------------
# gather (blocked without autograd, per-mode with autograd)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [F64, F32])
def test_gather_matches_dense(case, dtype, orientation, seg_cost, widths):
    shape, ranks, N, min_group, kind = CASES[case]
    iset, idx, gen = make_set(shape, N, min_group, kind, seed=10 + case)
    cores = rand_cores(shape, ranks, gen, dtype)
    ref = dense([c.double() for c in cores])[tuple(idx.t())]
    tol = 1e-12 if dtype == F64 else 1e-5
    vals = iset.gather(cores)
    assert vals.dtype == dtype and vals.shape == (N,)
    assert rel(vals, ref) < tol
    assert rel(iset.gather(cores), ref) < tol  # reused buffers
    # autograd (blocked forward, scatter backward): same values, gradient of a sampled loss
    cg = [c.clone().requires_grad_() for c in cores]
    w = torch.randn(N, generator=gen, dtype=F64)
    vg = iset.gather(cg)
    assert rel(vg.detach(), ref) < tol
    (vg * w.to(dtype)).sum().backward()
    cd = [c.double().clone().requires_grad_() for c in cores]
    (dense(cd)[tuple(idx.t())] * w).sum().backward()
    for a, b in zip(cg, cd):
        assert a.grad.dtype == dtype and rel(a.grad, b.grad) < tol
    if dtype == F64:  # double backward (create_graph): Hessian-vector product vs dense
        cg = [c.clone().requires_grad_() for c in cores]
        v = [torch.randn(c.shape, generator=gen, dtype=F64) for c in cores]
        grads = torch.autograd.grad((iset.gather(cg) * w).pow(2).sum(), cg, create_graph=True)
        hv = torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, v)), cg)
        cd = [c.clone().requires_grad_() for c in cores]
        gd = torch.autograd.grad((dense(cd)[tuple(idx.t())] * w).pow(2).sum(), cd,
                                 create_graph=True)
        hd = torch.autograd.grad(sum((g * t).sum() for g, t in zip(gd, v)), cd)
        for a, b in zip(hv, hd):
            assert rel(a, b) < 1e-11


def test_gather_empty_and_merged_partition():
    shape = (3, 3, 3, 3)
    iset = IndexSet(torch.zeros(0, 4, dtype=torch.long), shape)
    cores = rand_cores(shape, (1, 2, 2, 2, 1), torch.Generator().manual_seed(0))
    assert iset.gather(cores).shape == (0,)
    cg = [c.clone().requires_grad_() for c in cores]
    iset.gather(cg).sum().backward()  # empty sample set under autograd: zero gradients
    assert all(c.grad is None or not c.grad.any() for c in cg)
    gen = torch.Generator().manual_seed(1)
    iset = IndexSet(random_indices(shape, 200, gen), shape)
    iset.min_group = 8  # merge while N >= P * max(min_group, 4 r)
    part = iset.partition((1, 1, 1, 1, 1))
    assert [(b.lo, b.hi) for b in part.blocks] == [(0, 2), (2, 4)]  # 27 * 8 > 200
    iset.min_group = 4
    assert [(b.lo, b.hi) for b in iset.partition((1, 1, 1, 1, 1)).blocks] == [(0, 3), (3, 4)]
    # larger ranks bound the merge (27 * 4 * 3 > 200)
    assert [(b.lo, b.hi) for b in iset.partition((1, 3, 3, 3, 1)).blocks] == [(0, 2), (2, 4)]
    cores = rand_cores(shape, (1, 3, 3, 3, 1), gen)
    assert rel(iset.gather(cores), dense(cores)[tuple(iset.indices.t())]) < 1e-12


# ---------------------------------------------------------------------------------------
# layouts and the maps between them
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(len(CASES)))
def test_layout_maps(case, orientation, seg_cost, widths):
    shape, ranks, N, min_group, kind = CASES[case]
    iset, idx, gen = make_set(shape, N, min_group, kind, seed=20 + case)
    o = _RowMajor
    part = iset.partition(ranks)
    ids = torch.arange(N, dtype=F64) + 1.0  # sample ids, 0 = padding
    for b, blk in enumerate(part.blocks):
        if blk.w is not None:
            assert len(blk.classes) == 1 and blk.slots == blk.S * blk.w
        else:
            assert not o.fm and widths == "many" and len(blk.classes) > 1
            assert blk.slots == sum(n * wj for _, n, wj, _ in blk.classes)
            assert blk.S == sum(n for _, n, _, _ in blk.classes)
        assert blk.S >= min(1, N)
        lay = blk.layout_vector(ids)
        assert lay.shape == (blk.slots,)
        assert torch.equal(lay != 0, blk.mask)
        assert int(blk.mask.sum()) == N
        assert torch.equal(blk.to_samples(lay), ids)  # round trip
        # every segment holds samples of one merged index only
        key = torch.zeros(N, dtype=torch.long)
        for k in range(blk.lo, blk.hi):
            key = key * shape[k] + idx[:, k]
        segs = blk.slot_segment()
        assert segs.shape == (blk.slots,) and bool((segs[1:] >= segs[:-1]).all())
        real = blk.mask
        assert torch.equal(blk.seg_group[segs[real]], key[(lay[real] - 1).long()])
        # moves between consecutive layouts carry every sample to its slot
        for kind_, nb in (("fwd", b + 1), ("bwd", b - 1)):
            if not 0 <= nb < len(part.blocks):
                continue
            m = getattr(part, kind_)[b if kind_ == "fwd" else b]
            src = torch.zeros(o.shape(blk.slots, 1), dtype=F64)
            o.col(src, blk.slots).copy_(lay)
            nxt = part.blocks[nb]
            dst = torch.full(o.shape(nxt.slots, 1), -1.0, dtype=F64)
            o.move(m, src, dst)
            assert torch.equal(o.col(dst, nxt.slots), nxt.layout_vector(ids))
            # from a step result (the feature-major offset maps)
            r = 3
            step_src = torch.arange(N * r, dtype=F64).view(N, r) + 1.0
            buf = torch.zeros(o.shape(blk.slots, r), dtype=F64)
            for f in range(r):
                col = blk.layout_vector(step_src[:, f])
                (buf[f, :blk.slots] if o.fm else buf[:blk.slots, f]).copy_(col)
            ws = layout_mod.Workspace(F64, torch.device("cpu"))
            eye = blk.seg(torch.eye(r, dtype=F64).expand(blk.P, r, r))
            out = o.step(blk, buf, eye, o.step_out(ws, blk, r))
            dst = torch.full(o.shape(nxt.slots, r), -1.0, dtype=F64)
            o.move_step(part, kind_, b, out, dst)
            for f in range(r):
                got = dst[f, :nxt.slots] if o.fm else dst[:nxt.slots, f]
                assert torch.equal(got, nxt.layout_vector(step_src[:, f]))
    if len(part.blocks) > 1:
        first, last = part.blocks[0], part.blocks[-1]
        for m, src_blk, dst_blk in ((part.first_map, first, part.blocks[1]),
                                    (part.last_map, last, part.blocks[-2])):
            key = torch.zeros(N, dtype=torch.long)
            for k in range(src_blk.lo, src_blk.hi):
                key = key * shape[k] + idx[:, k]
            want = torch.cat([key, torch.tensor([src_blk.P])])[
                torch.cat([dst_blk.sample_of.long()])]
            assert torch.equal(m.long(), want)


def test_layout_order_follows_neighbour_modes():
    """Groups laid out by their last mode first; inside a group the samples sorted by the
    last mode of the next block, then of the previous block, then by sample number (the
    cache-friendly order of the layout changes), checked slot by slot from the indices."""
    shape = (4, 3, 5, 2, 3, 4)
    gen = torch.Generator().manual_seed(5)
    idx = random_indices(shape, 1000, gen)
    iset = IndexSet(idx, shape)
    iset.min_group = 2
    part = iset.partition((1, 6, 6, 6, 6, 6, 1))
    bounds = [(b.lo, b.hi) for b in part.blocks]
    assert bounds == [(0, 2), (2, 5), (5, 6)]
    for j, blk in enumerate(part.blocks):
        real = blk.mask
        samples = blk.sample_of[real].long()  # in slot order
        assert torch.equal(samples.sort()[0], torch.arange(len(idx)))
        # sort key built by hand: (last mode, other modes row-major, next, prev, sample)
        cols = [blk.hi - 1] + list(range(blk.lo, blk.hi - 1))
        if j + 1 < len(bounds):
            cols.append(bounds[j + 1][1] - 1)
        if j > 0:
            cols.append(bounds[j - 1][1] - 1)
        key = torch.arange(len(idx))
        scale = len(idx)
        for m in reversed(cols):
            key = key + idx[:, m] * scale
            scale *= shape[m]
        got = key[samples]
        assert bool((got[1:] > got[:-1]).all()), f"block {j}: slots not in the expected order"
        # and each segment still holds one merged index (row-major) = seg_group
        mkey = torch.zeros(len(idx), dtype=torch.long)
        for m in range(blk.lo, blk.hi):
            mkey = mkey * shape[m] + idx[:, m]
        segs = blk.slot_segment()[real]
        assert torch.equal(blk.seg_group[segs], mkey[samples])


# ---------------------------------------------------------------------------------------
# SampledPoint and the blocked projection
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [F64, F32])
def test_sampled_point(case, dtype, orientation, seg_cost, widths):
    shape, ranks, N, min_group, kind = CASES[case]
    iset, idx, gen = make_set(shape, N, min_group, kind, seed=30 + case)
    U = rand_cores(shape, ranks, gen, dtype)
    V = rand_cores(shape, ranks, gen, dtype)  # any cores: the kernels are identities
    dU = rand_cores(shape, ranks, gen, dtype)
    z = torch.randn(N, generator=gen, dtype=F64)
    tol = 1e-12 if dtype == F64 else 2e-5
    pt = iset.sampled_point(U, V)
    vals = pt.to_samples(pt.values)
    assert rel(vals, dense([u.double() for u in U])[tuple(idx.t())]) < tol
    assert torch.equal(pt.values[~pt.mask], torch.zeros_like(pt.values[~pt.mask]))
    zl = pt.from_samples(z.to(dtype))
    assert torch.equal(pt.to_samples(zl), z.to(dtype))
    D = pt.project(zl)
    ref = ref_project(U, V, idx, z)
    for k in range(len(shape)):
        assert D[k].shape == U[k].shape
        assert rel(D[k], ref[k]) < tol
    e = pt.tangent(dU)
    assert rel(pt.to_samples(e), ref_tangent(U, V, dU, idx)) < tol
    # blocked projection with the values folded into the right sweep
    D2 = iset.project(U, V, z.to(dtype))
    for k in range(len(shape)):
        assert rel(D2[k], ref[k]) < tol


def test_width_classes(monkeypatch, seg_cost):
    """Several segment widths: fewer padded slots than one width, each segment holds
    samples of one merged index and no more than its width, and the kernels (row-major,
    float64 and float32) match the references. ``seg_cost`` 0: narrow full segments, so
    groups span several full segments plus a last one in a width class."""
    monkeypatch.setattr(layout_mod, "CLASS_MIN_SLOTS", 0)
    if seg_cost == 0:
        monkeypatch.setattr(layout_mod, "CLASS_MIN_SAVING", -1.0)
    shape, ranks = (5, 6, 5, 4), (1, 3, 3, 2, 1)
    gen = torch.Generator().manual_seed(11)
    idx = random_indices(shape, 2000, gen)
    iset = IndexSet(idx, shape)
    iset.min_group = 64  # pairs of modes: 30 and 20 merged indices, ~67 and ~100 samples
    part = iset.partition(ranks)
    single = [layout_mod.Block(iset.block_key(b.lo, b.hi), b.lo, b.hi, b.P) for b in part.blocks]
    assert [(b.lo, b.hi) for b in part.blocks] == [(0, 2), (2, 4)]
    for blk, one in zip(part.blocks, single):
        assert len(blk.classes) > 1 and blk.w is None
        if seg_cost:
            assert blk.slots < 0.97 * one.slots
        else:  # several full segments per group (the widest class)
            assert int(blk.classes[-1][1]) > 2 * blk.P
        segs = blk.slot_segment()
        sample = blk.sample_of.long()
        real = blk.mask
        key = torch.zeros(len(idx), dtype=torch.long)
        for k in range(blk.lo, blk.hi):
            key = key * shape[k] + idx[:, k]
        assert torch.equal(blk.seg_group[segs[real]], key[sample[real]])
        # every class: segments of its width, in slot order
        o0 = 0
        for first, n, wj, grp in blk.classes:
            assert first == o0 and grp.shape == (n,)
            o0 += n * wj
    for dtype, tol in ((F64, 1e-12), (F32, 2e-5)):
        U, V, dU = (rand_cores(shape, ranks, gen, dtype) for _ in range(3))
        z = torch.randn(len(idx), generator=gen, dtype=F64)
        pt = iset.sampled_point(U, V)
        assert pt.part is part
        assert rel(pt.to_samples(pt.values), dense([u.double() for u in U])[tuple(idx.t())]) < tol
        D = pt.project(pt.from_samples(z.to(dtype)))
        ref = ref_project(U, V, idx, z)
        for k in range(len(shape)):
            assert rel(D[k], ref[k]) < tol
        assert rel(pt.to_samples(pt.tangent(dU)), ref_tangent(U, V, dU, idx)) < tol
        assert rel(iset.gather(U), dense([u.double() for u in U])[tuple(idx.t())]) < tol



def test_sampled_point_empty(widths):
    shape, ranks = (3, 4, 3), (1, 2, 2, 1)
    gen = torch.Generator().manual_seed(0)
    iset = IndexSet(torch.zeros(0, 3, dtype=torch.long), shape)
    U, V, dU = (rand_cores(shape, ranks, gen) for _ in range(3))
    pt = iset.sampled_point(U, V)
    assert pt.values.shape == (0,) and pt.tangent(dU).shape == (0,)
    for Dk, u in zip(pt.project(pt.values), U):
        assert Dk.shape == u.shape and float(Dk.abs().max()) == 0.0


def test_workspace_pool_reuse_and_independence():
    shape, ranks = (3, 4, 3, 2), (1, 2, 3, 2, 1)
    iset, idx, gen = make_set(shape, 60, 2, "random", seed=5)
    U1, V1, U2, V2 = (rand_cores(shape, ranks, gen) for _ in range(4))
    a = iset.sampled_point(U1, V1)
    b = iset.sampled_point(U2, V2)  # a is alive: a second workspace
    assert a._ws is not b._ws
    assert rel(a.to_samples(a.values), dense(U1)[tuple(idx.t())]) < 1e-12
    assert rel(b.to_samples(b.values), dense(U2)[tuple(idx.t())]) < 1e-12
    ws_a = a._ws
    del a
    gc.collect()
    assert any(w is ws_a for w in iset._pool)
    c = iset.sampled_point(U1, V1)  # reuses the released buffers
    assert c._ws is ws_a
    assert rel(c.to_samples(c.values), dense(U1)[tuple(idx.t())]) < 1e-12
    assert rel(b.to_samples(b.values), dense(U2)[tuple(idx.t())]) < 1e-12  # untouched
    iset.release_buffers()
    assert not iset._pool


# ---------------------------------------------------------------------------------------
# the manifold and the completion problem on top of the blocked kernels
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("min_group", [64, 2])
def test_project_sampled_blocked_matches_per_mode(min_group, orientation, widths):
    M = FixedTTRank((3, 4, 3, 2), (1, 2, 3, 2, 1))
    gen = torch.Generator().manual_seed(3)
    p = M.random(dtype=F64, generator=gen)
    idx = random_indices(M.shape, 80, gen)
    vals = torch.randn(80, generator=gen, dtype=F64)
    iset = IndexSet(idx, M.shape)
    iset.min_group = min_group
    got = M.project_sampled(p, iset, vals)
    U = M.split(p)
    # under autograd the per-mode kernels run (sample order)
    legacy = project_sampled(U, right_cores(U), iset, vals.clone().requires_grad_())
    ref = M.proju(p, torch.cat([c.detach().reshape(-1) for c in legacy]))
    assert rel(got, ref) < 1e-12


@pytest.mark.parametrize("dtype", [F64, F32])
def test_completion_cg_pieces_with_merged_modes(dtype, orientation, widths):
    P = Completion((4, 5, 4, 5), 2, train_size=300, test_size=50, seed=2, dtype=dtype)
    P.train.min_group = 2  # merge pairs of modes at this small size
    assert len(P.train.partition(P.manifold.ranks).blocks) == 2
    M = P.manifold
    p = P.initial_point(1)
    loss, g, ctx = P.cg_grad(p)
    tol = 1e-11 if dtype == F64 else 1e-4
    # reference: per-sample kernels in sample order (the former implementation)
    U = M.split(p)
    V = right_cores(U)
    I = P.train
    left = I.left_vectors(U)
    vals = I.left_step(M.d - 1, left[-1], U[-1])[:, 0]
    z = (vals - P.a_train) * P._sw
    rights = [None] * M.d
    rights[-1] = vals.new_ones(len(I), 1)
    for k in range(M.d - 1, 0, -1):
        rights[k - 1] = I.right_step(k, rights[k], V[k])
    D = [I.scatter(k, left[k] * (z * P._sw).unsqueeze(1), rights[k]) for k in range(M.d)]
    g_ref = M.proju(p, torch.cat([c.reshape(-1) for c in D]))
    assert rel(g, g_ref) < tol
    assert abs(float(loss) - float(0.5 * (z * z).sum())) <= tol * float(loss)
    eta = -g
    legacy = (left, rights, z, None)
    assert rel(P.eval_tangent(p, eta, ctx), P.eval_tangent(p, eta, legacy)) < tol
    a_new, a_old = float(P.exact_step(p, eta, ctx)), float(P.exact_step(p, eta, legacy))
    assert abs(a_new - a_old) <= tol * abs(a_old)
    # dense check of the tangent values
    dense_eta = dense([c.double() for c in M.tangent_to_tt(p, eta).cores])
    ref_e = dense_eta[tuple(I.indices.t())] * math.sqrt(P.weight)
    assert rel(P.eval_tangent(p, eta, ctx), ref_e) < (1e-11 if dtype == F64 else 1e-4)


def test_cg_run_merged_matches_single_modes():
    """A few CG iterations give the same iterates with and without merged modes."""
    out = []
    for mg in (10 ** 9, 2):
        P = Completion((4, 5, 4, 5), 2, train_size=300, test_size=50, seed=4)
        P.train.min_group = mg
        h = run(P, "rcg", P.initial_point(0), iters=5, metrics_every=0,
                measure_memory=False)
        out.append(h.x)
    assert rel(out[1], out[0]) < 1e-9


def test_gather_jacobian_vectorized_matches_loop():
    """Batched backward (jacobian(vectorize=True): legacy-vmapped gradients) takes the
    per-mode kernels; the blocked backward cannot take batched gradients."""
    import ttmanifold as tm

    shape = (3, 4, 3, 2)
    gen = torch.Generator().manual_seed(31)
    iset = IndexSet(random_indices(shape, 15, gen), shape)
    cores = tuple(rand_cores(shape, (1, 2, 3, 2, 1), gen, F64))
    f = lambda *cs: iset.gather(list(cs))  # noqa: E731
    Jv = torch.autograd.functional.jacobian(f, cores, vectorize=True)
    Jl = torch.autograd.functional.jacobian(f, cores, vectorize=False)
    Jd = torch.autograd.functional.jacobian(
        lambda *cs: dense(list(cs))[tuple(iset.indices.t())], cores)
    for a, b, c in zip(Jv, Jl, Jd):
        assert rel(a, c) < 1e-12 and rel(b, c) < 1e-12
    M = tm.FixedTTRank(shape, (1, 2, 3, 2, 1))
    p = M.random(dtype=F64, generator=gen)
    g = lambda u: iset.gather(M.tangent_to_tt(p, u))  # noqa: E731
    u0 = torch.zeros(M.size, dtype=F64)
    Jv = torch.autograd.functional.jacobian(g, u0, vectorize=True)
    Jl = torch.autograd.functional.jacobian(g, u0, vectorize=False)
    Jd = torch.autograd.functional.jacobian(
        lambda u: iset.gather(tm.TT(M.tangent_to_tt(p, u).cores)), u0)
    assert rel(Jv, Jd) < 1e-12 and rel(Jl, Jd) < 1e-12


# ---------------------------------------------------------------------------------------
# the compiled kernels (ttmanifold.kernels, CompiledSampledPoint)
# ---------------------------------------------------------------------------------------

def _check_point(pt, U, V, dU, idx, z, tol):
    assert isinstance(pt, NativeSampledPoint)
    assert rel(pt.to_samples(pt.values), dense([u.double() for u in U])[tuple(idx.t())]) < tol
    D = pt.project(pt.from_samples(z.to(U[0].dtype)))
    ref = ref_project(U, V, idx, z)
    for k in range(len(U)):
        assert D[k].shape == U[k].shape and D[k].dtype == U[0].dtype
        assert rel(D[k], ref[k]) < tol
    assert rel(pt.to_samples(pt.tangent(dU)), ref_tangent(U, V, dU, idx)) < tol


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [F64, F32])
def test_native_sampled_point(native, case, dtype):
    shape, ranks, N, min_group, kind = CASES[case]
    iset, idx, gen = make_set(shape, N, min_group, kind, seed=30 + case)
    U, V, dU = (rand_cores(shape, ranks, gen, dtype) for _ in range(3))
    z = torch.randn(N, generator=gen, dtype=F64)
    pt = iset.sampled_point(U, V)
    if N == 0:
        assert not isinstance(pt, NativeSampledPoint)  # nothing to compile for
        return
    _check_point(pt, U, V, dU, idx, z, 1e-12 if dtype == F64 else 2e-5)
    assert bool(pt.mask.all())


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # set-up only
@given(data=st.data())
def test_native_kernels_random_shapes_and_ranks(native, data):
    """Ranks above the 16-column register chunk and not multiples of the 4-row tiles, empty
    groups (few samples), merged and single modes."""
    d = data.draw(st.integers(2, 4))
    shape = tuple(data.draw(st.lists(st.integers(2, 6), min_size=d, max_size=d)))
    inner = data.draw(st.lists(st.integers(1, 21), min_size=d - 1, max_size=d - 1))
    ranks = [1] + inner + [1]
    N = data.draw(st.integers(1, 120))
    min_group = data.draw(st.sampled_from([1, 2, 64]))
    seed = data.draw(st.integers(0, 10 ** 6))
    gen = torch.Generator().manual_seed(seed)
    idx = random_indices(shape, N, gen)
    iset = IndexSet(idx, shape)
    iset.min_group = min_group
    dtype = data.draw(st.sampled_from([F64, F32]))
    U, V, dU = (rand_cores(shape, ranks, gen, dtype) for _ in range(3))
    z = torch.randn(N, generator=gen, dtype=F64)
    _check_point(iset.sampled_point(U, V), U, V, dU, idx, z, 1e-11 if dtype == F64 else 5e-5)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_native_completion_cg_pieces(native, dtype):
    """cg_grad / exact_step on the compiled kernels agree with the torch kernels."""
    P = Completion((4, 5, 4, 5), 2, train_size=300, test_size=50, seed=2, dtype=dtype)
    P.train.min_group = 2
    p = P.initial_point(1)
    loss_n, g_n, ctx_n = P.cg_grad(p)
    assert isinstance(ctx_n.point, NativeSampledPoint)
    eta = -g_n
    a_n = float(P.exact_step(p, eta, ctx_n))
    e_n = P.eval_tangent(p, eta, ctx_n)
    kernels.set_enabled(False)
    loss_t, g_t, ctx_t = P.cg_grad(p)
    assert not isinstance(ctx_t.point, NativeSampledPoint)
    tol = 1e-11 if dtype == F64 else 1e-4
    assert rel(g_n, g_t) < tol
    assert abs(float(loss_n) - float(loss_t)) <= tol * float(loss_t)
    assert abs(a_n - float(P.exact_step(p, eta, ctx_t))) <= tol * abs(a_n)
    assert rel(e_n, P.eval_tangent(p, eta, ctx_t)) < tol


def test_native_cg_run_matches_torch_kernels(native):
    out = []
    for on in (True, False):
        kernels.set_enabled(on)
        P = Completion((4, 5, 4, 5), 2, train_size=300, test_size=50, seed=4)
        P.train.min_group = 2
        h = run(P, "rcg", P.initial_point(0), iters=5, metrics_every=0, measure_memory=False)
        out.append(h.x)
    assert rel(out[0], out[1]) < 1e-9


def test_native_workspace_reuse_and_independence(native):
    shape, ranks = (3, 4, 3, 2), (1, 2, 3, 2, 1)
    iset, idx, gen = make_set(shape, 60, 2, "random", seed=5)
    U1, V1, U2, V2 = (rand_cores(shape, ranks, gen) for _ in range(4))
    a = iset.sampled_point(U1, V1)
    b = iset.sampled_point(U2, V2)  # a is alive: a second workspace
    assert a._ws is not b._ws
    ws_a = a._ws
    del a
    gc.collect()
    c = iset.sampled_point(U1, V1)  # reuses the released buffers
    assert c._ws is ws_a
    assert rel(c.to_samples(c.values), dense(U1)[tuple(idx.t())]) < 1e-12
    assert rel(b.to_samples(b.values), dense(U2)[tuple(idx.t())]) < 1e-12  # untouched
    iset.release_buffers()
    assert all(not plan.free for plan in iset.compiled_plans.values())


def test_native_not_used_when_disabled_or_unsupported(native):
    shape, ranks = (3, 4, 3), (1, 2, 2, 1)
    iset, idx, gen = make_set(shape, 40, 64, "random", seed=1)
    U, V = (rand_cores(shape, ranks, gen) for _ in range(2))
    assert isinstance(iset.sampled_point(U, V), NativeSampledPoint)
    Uh = [u.to(torch.bfloat16) for u in U]  # not a dtype of the kernels
    assert not kernels.usable("sampled", Uh[0])
    kernels.set_enabled(False)
    assert not isinstance(iset.sampled_point(U, V), NativeSampledPoint)


def test_native_only_for_large_index_sets(native, monkeypatch):
    shape, ranks = (3, 4, 3), (1, 2, 2, 1)
    iset, idx, gen = make_set(shape, 40, 64, "random", seed=1)
    U, V = (rand_cores(shape, ranks, gen) for _ in range(2))
    monkeypatch.setattr(compiled_mod, "MIN_SAMPLES", 41)
    assert not isinstance(iset.sampled_point(U, V), NativeSampledPoint)
    monkeypatch.setattr(compiled_mod, "MIN_SAMPLES", 40)
    assert isinstance(iset.sampled_point(U, V), NativeSampledPoint)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [F64, F32])
def test_native_gather_and_blocked_projection(native, case, dtype):
    """``gather`` without autograd and the projection of ``project_sampled`` on the
    compiled kernels."""
    shape, ranks, N, min_group, kind = CASES[case]
    iset, idx, gen = make_set(shape, N, min_group, kind, seed=60 + case)
    U, V = (rand_cores(shape, ranks, gen, dtype) for _ in range(2))
    z = torch.randn(N, generator=gen, dtype=F64)
    tol = 1e-12 if dtype == F64 else 2e-5
    vals = iset.gather(U)
    assert vals.shape == (N,) and vals.dtype == dtype
    if N:
        assert rel(vals, dense([u.double() for u in U])[tuple(idx.t())]) < tol
    D = iset.project(U, V, z.to(dtype))
    ref = ref_project(U, V, idx, z)
    for k in range(len(shape)):
        assert D[k].shape == U[k].shape
        if N:
            assert rel(D[k], ref[k]) < tol
    if N:  # the pool got its workspace back
        assert all(plan.free for plan in iset.compiled_plans.values())


def test_native_project_sampled_matches_torch_kernels(native):
    M = FixedTTRank((4, 5, 3, 4), (1, 3, 4, 3, 1))
    gen = torch.Generator().manual_seed(3)
    p = M.random(dtype=F64, generator=gen)
    idx = random_indices(M.shape, 150, gen)
    iset = IndexSet(idx, M.shape)
    vals = torch.randn(150, generator=gen, dtype=F64)
    a = M.project_sampled(p, iset, vals)
    kernels.set_enabled(False)
    b = M.project_sampled(p, IndexSet(idx, M.shape), vals)
    assert rel(a, b) < 1e-12


def test_native_gather_results_are_not_workspace_views(native):
    """Values returned by gather (with and without autograd) stay valid when the index set
    serves later calls (the pooled buffers are reused)."""
    shape, ranks = (3, 4, 3, 2), (1, 2, 3, 2, 1)
    iset, idx, gen = make_set(shape, 60, 2, "random", seed=8)
    U1, U2 = (rand_cores(shape, ranks, gen) for _ in range(2))
    ref1 = dense(U1)[tuple(idx.t())]
    c1 = [u.clone().requires_grad_() for u in U1]
    v1 = iset.gather(c1)  # autograd: the values of a NativeSampledPoint
    v1.sum().backward()
    v1 = v1.detach()  # drops the graph (and the point): its workspace goes back to the pool
    del c1
    gc.collect()
    w1 = iset.gather(U1)  # no autograd: left sweep only
    for _ in range(2):
        c2 = [u.clone().requires_grad_() for u in U2]
        iset.gather(c2).sum().backward()
        iset.gather(U2)
        gc.collect()
    assert rel(v1, ref1) < 1e-12 and rel(w1, ref1) < 1e-12


def test_index_set_on_the_meta_device():
    """An index set on the meta device (shapes only) runs the per-mode kernels, as
    documented: gather (with and without autograd), left / right vectors and scatter give
    the right shapes (the per-mode grouping used to call bincount: NotImplementedError)."""
    shape = (3, 4, 5)
    x = TT.random(shape, 2, device="meta")
    iset = IndexSet(torch.zeros(10, 3, dtype=torch.long, device="meta"), shape)
    assert iset.gather(x).shape == (10,)
    xg = TT([c.requires_grad_() for c in TT.random(shape, 2, device="meta").cores])
    iset.gather(xg).sum().backward()
    assert xg.cores[1].grad.shape == (2, 4, 2)
    assert iset.left_vectors(x.cores)[2].shape == (10, 2)
    assert iset.right_vectors(x.cores)[1].shape == (10, 2)
    ones = torch.ones(10, 2, device="meta")
    assert iset.scatter(1, ones, ones).shape == (2, 4, 2)


def test_index_set_copies_and_pickles():
    """deepcopy/pickle of an index set (alone, or in an object that holds one) failed on
    its pool's lock; a copy holds the samples and rebuilds its layouts."""
    import copy
    import pickle

    M = FixedTTRank((3, 4, 5, 3), 2)
    g = torch.Generator().manual_seed(7)
    p = M.random(dtype=torch.float64, generator=g)
    for N in (50, 3000):  # per-mode and blocked kernels
        idx = torch.stack([torch.randint(0, n, (N,), generator=g) for n in M.shape], 1)
        vals = torch.randn(N, dtype=torch.float64, generator=g)
        iset = IndexSet(idx, M.shape)
        ref_g, ref_p = iset.gather(M.to_tt(p)), M.project_sampled(p, iset, vals)
        for c in (copy.deepcopy(iset), pickle.loads(pickle.dumps(iset))):
            assert torch.equal(c.indices, idx) and c.shape == iset.shape
            torch.testing.assert_close(c.gather(M.to_tt(p)), ref_g)
            torch.testing.assert_close(M.project_sampled(p, c, vals), ref_p)
    bset = IndexSet.batched([idx[:40], idx[40:]], M.shape)
    pb = M.random(2, dtype=torch.float64, generator=g)
    ref = bset.gather(M.to_tt(pb))
    torch.testing.assert_close(copy.deepcopy(bset).gather(M.to_tt(pb)), ref)
