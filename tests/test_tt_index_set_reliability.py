"""IndexSet under hostile use: threads sharing one index set, a caller changing its index
tensor afterwards, cores that do not fit, values of another dtype. Each case compares with
an independent dense float64 reference or expects a clear error naming the argument."""
from __future__ import annotations

import threading

import pytest
import torch

import ttmanifold as tm
from ttmanifold import kernels

F64 = torch.float64


@pytest.fixture(params=[False, True], ids=["torch", "compiled"])
def sampled_kernels(request):
    """The torch sampled kernels, and the compiled ones (built here; skipped without a C++
    compiler)."""
    was = kernels.enabled()
    kernels.set_enabled(request.param)
    try:
        if request.param:
            import shutil

            if shutil.which("c++") is None:
                pytest.skip("no C++ compiler")
            kernels.build(["sampled"], verbose=False)
            assert kernels.module("sampled") is not None
        yield request.param
    finally:
        kernels.set_enabled(was)


def _dense_entries(cores, idx):
    return tm.TT([c.double() for c in cores]).full()[tuple(idx.t())]


def test_threads_share_one_index_set(sampled_kernels):
    """Four threads gather and project on one 2 * 10^4-sample index set at once, each with
    its own TT: every result equals the single-threaded dense reference (the shared
    workspace used to be overwritten: 20-70 % wrong answers)."""
    shape = (6, 7, 5, 6)
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randint(0, n, (20_000,), generator=g) for n in shape], 1)
    iset = tm.IndexSet(idx, shape)
    M = tm.FixedTTRank(shape, 3)
    pts = [M.random(dtype=F64, generator=g) for _ in range(4)]
    vals = torch.randn(20_000, generator=g, dtype=F64)
    with torch.no_grad():
        ref_g = [_dense_entries(M.split(p), idx) for p in pts]
        ref_p = [M.project_sampled(p, iset, vals) for p in pts]  # one thread
    errors, barrier = [], threading.Barrier(4)

    def work(j):
        try:
            barrier.wait(timeout=30)
            for _ in range(15):
                with torch.no_grad():
                    got = iset.gather(M.split(pts[j]))
                    pr = M.project_sampled(pts[j], iset, vals)
                if not torch.allclose(got, ref_g[j], atol=1e-12):
                    errors.append(("gather", j, float((got - ref_g[j]).abs().max())))
                if not torch.allclose(pr, ref_p[j], atol=1e-10):
                    errors.append(("project", j, float((pr - ref_p[j]).abs().max())))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(("exception", j, repr(exc)))

    threads = [threading.Thread(target=work, args=(j,), daemon=True) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "threads did not finish"
    assert not errors, errors[:5]


def test_index_set_does_not_alias_the_callers_indices():
    shape = (4, 5, 3)
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randint(0, n, (50,), generator=g) for n in shape], 1)
    keep = idx.clone()
    iset = tm.IndexSet(idx, shape)
    x = tm.TT.random(shape, 2, dtype=F64, generator=g)
    before = iset.gather(x)
    idx.zero_()  # the caller reuses its buffer
    assert torch.equal(iset.indices, keep)
    assert torch.allclose(iset.gather(x), before)
    assert torch.allclose(before, x.full()[tuple(keep.t())])


def test_gather_validates_cores():
    shape = (4, 5, 3)
    iset = tm.IndexSet(torch.zeros(100, 3, dtype=torch.long), shape)
    good = tm.TT.random(shape, 2, dtype=F64).cores
    bad_rank = [good[0], torch.randn(3, 5, 2, dtype=F64), good[2]]
    with pytest.raises(ValueError, match="rank mismatch between cores 0 and 1"):
        iset.gather(bad_rank)
    with pytest.raises(TypeError, match="dtype"):
        iset.gather([c.to(torch.int64) for c in good])
    with pytest.raises(TypeError, match="dtype"):
        iset.gather([c.half() for c in good])
    with pytest.raises(ValueError, match="boundary ranks"):
        iset.gather([torch.randn(2, 4, 2, dtype=F64), good[1], good[2]])
    with pytest.raises(ValueError, match="shape"):
        iset.gather(tm.TT.random((4, 5, 4), 2, dtype=F64))
    with pytest.raises(ValueError, match="3 cores|order"):
        iset.gather(good[:2])


def test_gather_validates_cores_at_scale():
    """At 2 * 10^4 samples (blocked and compiled kernels) mismatched ranks raise the same
    clear error instead of a C++ shape error."""
    shape = (20, 20, 20)
    idx = torch.randint(0, 20, (20_000, 3))
    iset = tm.IndexSet(idx, shape)
    good = tm.TT.random(shape, 3, dtype=F64).cores
    with pytest.raises(ValueError, match="rank mismatch"):
        iset.gather([good[0], torch.randn(2, 20, 3, dtype=F64), good[2]])


def test_project_sampled_names_bad_values():
    shape = (4, 5, 3)
    M = tm.FixedTTRank(shape, 2)
    p = M.random(dtype=F64)
    iset = tm.IndexSet(torch.zeros(10, 3, dtype=torch.long), shape)
    with pytest.raises(TypeError, match="values"):
        M.project_sampled(p, iset, torch.ones(10, dtype=torch.float32))
    with pytest.raises(ValueError, match="values"):
        M.project_sampled(p, iset, torch.ones(9, dtype=F64))
    with pytest.raises(TypeError, match="values"):
        M.project_sampled(p, iset, [1.0] * 10)


@pytest.mark.parametrize("n", [100, 3000])  # blocked and (from 2048 samples) compiled kernels
def test_project_and_sampled_point_validate_v_and_values(n):
    """IndexSet.project / sampled_point with right cores ``V`` of other ranks, a missing core
    or another dtype, and values of another length or dtype: a clear error naming ``V`` or
    ``values`` (V of other ranks used to give a silently wrong projection, the rest a torch
    shape or dtype error from inside the kernels)."""
    shape = (5, 1, 6, 3)
    idx = torch.stack([torch.randint(0, s, (n,)) for s in shape], 1)
    iset = tm.IndexSet(idx, shape)
    x = tm.TT.random(shape, 3, dtype=F64)
    U, V = tm.orthogonalize(x, "left").cores, tm.orthogonalize(x, "right").cores
    z = torch.randn(n, dtype=F64)
    other = tm.TT.random(shape, 2, dtype=F64).cores
    for bad in (other, V[:3], [V[0]] + [v.float() for v in V[1:]]):
        with pytest.raises((ValueError, TypeError), match="V"):
            iset.project(U, bad, z)
        with pytest.raises((ValueError, TypeError), match="V"):
            iset.sampled_point(U, bad)
    for bad in (z[:-1], z.float(), z.unsqueeze(1)):
        with pytest.raises((ValueError, TypeError), match="values"):
            iset.project(U, V, bad)
    # V[0] is unused: None is accepted, and the result is the dense reference's
    D = iset.project(U, [None] + V[1:], z)
    for k in range(len(shape)):
        G = torch.zeros_like(U[k], requires_grad=True)
        full = tm.TT(U[:k] + [G] + V[k + 1:]).full()
        (full[tuple(idx.t())] * z).sum().backward()
        assert torch.allclose(D[k], G.grad, atol=1e-10)


def test_sampled_point_validates_its_arguments(sampled_kernels):
    """SampledPoint (torch) and CompiledSampledPoint: ``project`` with values of another
    length or dtype, ``tangent`` with deltas of other ranks, fewer cores or another dtype,
    and the layout changes with vectors of another length raise naming the argument (the
    compiled ``from_samples`` / ``to_samples`` returned a shorter vector silently, the rest
    failed inside the kernels with torch shape or dtype errors)."""
    shape, n = (5, 1, 6, 3), 3000
    idx = torch.stack([torch.randint(0, s, (n,)) for s in shape], 1)
    x = tm.TT.random(shape, 3, dtype=F64)
    U, V = tm.orthogonalize(x, "left").cores, tm.orthogonalize(x, "right").cores
    p = tm.IndexSet(idx, shape).sampled_point(U, V)
    assert ("Compiled" in type(p).__name__) == sampled_kernels
    z = p.from_samples(torch.randn(n, dtype=F64))
    for bad in (z[:-1], z.float(), z.unsqueeze(1)):
        with pytest.raises((ValueError, TypeError), match="^z:"):
            p.project(bad)
    dU = [torch.randn_like(u) for u in U]
    for bad in (dU[:3], tm.TT.random(shape, 2, dtype=F64).cores, [d.float() for d in dU]):
        with pytest.raises((ValueError, TypeError), match="^dU:"):
            p.tangent(bad)
    with pytest.raises(ValueError, match="^x:"):
        p.from_samples(torch.zeros(n - 1, dtype=F64))
    with pytest.raises(ValueError, match="^v:"):
        p.to_samples(torch.zeros(n - 1, dtype=F64))
    # the values are the dense reference's
    ref = sum(tm.TT(U[:k] + [dU[k]] + V[k + 1:]).full()[tuple(idx.t())]
              for k in range(len(shape)))
    assert torch.allclose(p.to_samples(p.tangent(dU)), ref, atol=1e-10)


def test_from_sparse_rejects_a_dense_tensor():
    """IndexSet.from_sparse of a dense tensor: a TypeError naming ``z`` (was torch's
    NotImplementedError for aten::_indices on strided tensors)."""
    with pytest.raises(TypeError, match="^z: expected a sparse COO tensor"):
        tm.IndexSet.from_sparse(torch.ones(3, 3))
    iset = tm.IndexSet.from_sparse(torch.eye(3).to_sparse())
    assert len(iset) == 3 and iset.shape == (3, 3)
