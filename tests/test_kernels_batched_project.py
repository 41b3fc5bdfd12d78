"""The compiled batched projection for small TT-ranks (``dense.cpp``'s
``project_batch_small`` behind the batch path of ``manifold.sweeps.project_tt``): the tangent
vectors of ``M.project(p, Z)`` for batches of points against a dense float64 reference and
the torch path (full tensors), float64 and float32, broadcast ``Z``, the fallbacks, and that
the compiled call actually runs."""
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttmanifold import TT, FixedTTRank
from ttmanifold.manifold import sweeps
from kernel_checks import torch_path as _torch_path, rel_err as _err

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-11, F32: 3e-5}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def spy(record_dense):
    """The dense set's module recording its batched projection calls."""
    return record_dense(("project_batch_small", "project_batch"))


def _dense_projection(X, Z, ranks):
    """The tangent projection of the dense Z at the dense point X of TT-ranks ``ranks``
    (float64), from orthogonal projectors onto the unfoldings' column and row spaces:
    sum_k P_{<k} (x) P_{>k} Z - sum_{k<d-1} P_{<=k} (x) P_{>k} Z."""
    shape, d = X.shape, X.dim()

    def left(k):  # projector onto the column space of the unfolding (modes 0..k, rest)
        if k < 0:
            return None
        u = torch.linalg.svd(X.reshape(math.prod(shape[:k + 1]), -1))[0][:, :ranks[k + 1]]
        return u @ u.T

    def right(m):  # projector onto the row space of the unfolding (modes < m, modes m..)
        if m >= d:
            return None
        v = torch.linalg.svd(X.reshape(-1, math.prod(shape[m:])))[2][:ranks[m]].T
        return v @ v.T

    def apply(j, PL, m, PR):
        Y = Z.reshape(math.prod(shape[:j + 1]), -1)
        if PL is not None:
            Y = PL @ Y
        Y = Y.reshape(-1, math.prod(shape[m:]))
        if PR is not None:
            Y = Y @ PR
        return Y.reshape(shape)

    out = sum(apply(k - 1, left(k - 1), k + 1, right(k + 1)) for k in range(d))
    return out - sum(apply(k, left(k), k + 1, right(k + 1)) for k in range(d - 1))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4), r=st.integers(1, 4),
       R=st.integers(1, 4), B=st.integers(16, 37), dtype=st.sampled_from([F64, F32]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_dense_reference_and_torch_path(spy, monkeypatch, shape, r, R, B, dtype, seed):
    spy.calls.clear()  # (one fixture for all examples)
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():  # ranks clipped to the feasible bound: expected
        warnings.simplefilter("ignore", UserWarning)
        M = FixedTTRank(shape, r)
        Z = TT.random(M.shape, R, dtype=dtype, generator=g, batch=(B,))
    # (B, size): M.random(B) alone is one point where B happens to equal the size
    p = torch.Tensor(M.random(B, M.size, dtype=dtype, generator=g))
    u = M.project(p, Z)
    assert spy.calls == ["project_batch_small"]
    full = M.tangent_to_tt(p, u).full()
    ref_torch = _torch_path(monkeypatch, lambda: M.tangent_to_tt(p, M.project(p, Z)).full())
    assert _err(full, ref_torch) < TOL[dtype] * 10
    X, Zf = M.to_tt(p).full().to(F64), Z.full().to(F64)
    for b in range(0, B, 7):
        ref = _dense_projection(X[b], Zf[b], M.ranks)
        assert _err(full[b].to(F64), ref) < TOL[dtype] * 10
    # the gauge: every delta but the last is orthogonal to its core, <x, u> = <P x, z>
    cores = M._split(u, "u")
    for k, c in enumerate(M._split(p, "p")[:-1]):
        a, n, b2 = c.shape[-3:]
        gram = c.reshape(B, a * n, b2).mT @ cores[k].reshape(B, a * n, b2)
        assert float(gram.abs().max()) < TOL[dtype] * 10 * (1 + float(cores[k].abs().max()))


@pytest.mark.parametrize("dtype", [F64, F32])
def test_realistic_sizes_and_rank_8(spy, monkeypatch, dtype):
    """d = 5, n = 8 at ranks 4 and 8 (8: the batch leaves the per-point compiled loop for
    the SIMD kernel), a batch over two dimensions with a partial last block (B = 2 x 9)."""
    g = torch.Generator().manual_seed(3)
    for r in (4, 8):
        M = FixedTTRank((8,) * 5, r)
        p = torch.Tensor(M.random(18, dtype=dtype, generator=g)).reshape(2, 9, -1)
        Z = TT.random(M.shape, r, dtype=dtype, generator=g, batch=(2, 9))
        spy.calls.clear()
        u = M.project(p, Z)
        assert spy.calls == ["project_batch_small"] and u.shape == p.shape
        ref = _torch_path(monkeypatch, lambda: M.tangent_to_tt(p, M.project(p, Z)).full())
        assert _err(M.tangent_to_tt(p, u).full(), ref) < TOL[dtype] * 10


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shape,r,R", [((10, 10, 10), 10, 12), ((5, 4, 4, 5), 16, 16),
                                       ((4, 3, 4, 3, 4), 11, 9), ((12, 12), 12, 16)])
def test_ranks_9_to_16(spy, monkeypatch, shape, r, R, dtype):
    """TT-ranks 9..16 (the point's, Z's or both; beyond the batched QR/SVD's 8 columns; the
    kernel and M.project's routing, SMALL_PROJECT_MAX_RANK, stop at 16): the SIMD kernel
    against the dense float64 reference and the torch path, with a partial last block
    (B = 19)."""
    g = torch.Generator().manual_seed(7)
    M = FixedTTRank(shape, r)
    assert max(M.ranks) == r  # the rank is reached, not clipped
    B = 19
    p = torch.Tensor(M.random(B, dtype=dtype, generator=g))
    with warnings.catch_warnings():  # Z's ranks clipped to the feasible bound: expected
        warnings.simplefilter("ignore", UserWarning)
        Z = TT.random(M.shape, R, dtype=dtype, generator=g, batch=(B,))
    spy.calls.clear()
    u = M.project(p, Z)
    assert spy.calls == ["project_batch_small"]
    full = M.tangent_to_tt(p, u).full()
    ref = _torch_path(monkeypatch, lambda: M.tangent_to_tt(p, M.project(p, Z)).full())
    assert _err(full, ref) < TOL[dtype] * 10
    X, Zf = M.to_tt(p).full().to(F64), Z.full().to(F64)
    for b in (0, B - 1):
        assert _err(full[b].to(F64), _dense_projection(X[b], Zf[b], M.ranks)) < TOL[dtype] * 10


def test_broadcast_z_and_point_batch(spy, monkeypatch):
    """One Z for a batch of points (not copied per point), and a packed list output."""
    g = torch.Generator().manual_seed(4)
    M = FixedTTRank((3, 4, 2, 3), 3)
    p = torch.Tensor(M.random(20, dtype=F64, generator=g))
    Z = TT.random(M.shape, 2, dtype=F64, generator=g)
    u = M.project(p, Z)
    assert spy.calls == ["project_batch_small"] and u.shape == p.shape
    ref = _torch_path(monkeypatch, lambda: M.project(p, Z))
    assert _err(M.tangent_to_tt(p, u).full(), M.tangent_to_tt(p, ref).full()) < 1e-11
    U = M._split(p, "p")
    spy.calls.clear()
    D = sweeps.project_tt(U, None, Z.cores, gauge=True)  # list of cores
    assert spy.calls == ["project_batch_small"]
    assert torch.allclose(torch.cat([c.flatten(1) for c in D], 1), u, atol=1e-12)
    # cores whose (r, n, r') blocks are not contiguous (copied by the kernel), batched Z
    Zb = TT.random(M.shape, 2, dtype=F64, generator=g, batch=(20,)).cores
    Zt = [c.transpose(-1, -3).contiguous().transpose(-1, -3) for c in Zb]
    spy.calls.clear()
    out = sweeps.project_tt(U, None, Zt, packed=True, gauge=True)
    assert spy.calls == ["project_batch_small"]
    ref = _torch_path(monkeypatch, lambda: sweeps.project_tt(U, None, Zb, packed=True, gauge=True))
    assert _err(M.tangent_to_tt(p, out).full(), M.tangent_to_tt(p, ref).full()) < 1e-11


def test_falls_back(spy, monkeypatch):
    g = torch.Generator().manual_seed(5)
    M = FixedTTRank((3, 4, 3), 2)
    Z = TT.random(M.shape, 2, dtype=F64, generator=g, batch=(15,))
    p = torch.Tensor(M.random(15, dtype=F64, generator=g))
    M.project(p, Z)  # a batch below SMALL_PROJECT_MIN_BATCH
    p1 = torch.Tensor(M.random(dtype=F64, generator=g))
    Z1 = TT.random(M.shape, 2, dtype=F64, generator=g, batch=(20,))
    M.project(p1, Z1)  # one point shared by the batch: the torch products at the point
    monkeypatch.setattr(sweeps, "SMALL_PROJECT_MAX_RANK", 12)
    M13 = FixedTTRank((14, 14, 14), 13)  # ranks above SMALL_PROJECT_MAX_RANK (lowered)
    M13.project(torch.Tensor(M13.random(16, dtype=F64, generator=g)),
                TT.random(M13.shape, 2, dtype=F64, generator=g, batch=(16,)))
    monkeypatch.setattr(sweeps, "SMALL_PROJECT_MAX_RANK", 16)
    M17 = FixedTTRank((18, 18, 18), 17)  # ranks above the kernel's 16
    M17.project(torch.Tensor(M17.random(16, dtype=F64, generator=g)),
                TT.random(M17.shape, 2, dtype=F64, generator=g, batch=(16,)))
    M4 = FixedTTRank((34, 34), 3)  # a Z of rank above 32 at a point of small rank
    M4.project(torch.Tensor(M4.random(16, dtype=F64, generator=g)),
               TT.random(M4.shape, 33, dtype=F64, generator=g, batch=(16,)))
    U = M._split(torch.Tensor(M.random(16, dtype=F64, generator=g)), "p")
    Z16 = TT.random(M.shape, 2, dtype=F64, generator=g, batch=(16,)).cores
    sweeps.project_tt(U, sweeps.right_cores(U), Z16, gauge=True)  # V given
    Ug = [c.clone().requires_grad_() for c in U]
    sweeps.project_tt(Ug, None, Z16, packed=True, gauge=True)  # autograd: torch's
    assert "project_batch_small" not in spy.calls


def test_compiled_function_checks_its_input(dense_module):
    U = [torch.randn(16, 1, 18, 17, dtype=F64), torch.randn(16, 17, 18, 1, dtype=F64)]
    Z = [torch.randn(16, 1, 18, 2, dtype=F64), torch.randn(16, 2, 18, 1, dtype=F64)]
    with pytest.raises(RuntimeError, match="TT-ranks above 16"):
        dense_module.project_batch_small(U, Z, True, 16)
    with pytest.raises(RuntimeError, match="inconsistent lengths"):
        dense_module.project_batch_small(U, Z[:1], True, 16)
    with pytest.raises(RuntimeError, match="one dtype"):
        dense_module.project_batch_small([u.float() for u in U], Z, True, 16)


def test_one_call_for_a_large_batch_and_an_ordinary_result(spy, monkeypatch):
    """M.project of a large batch of small ranks: the kernel takes the whole batch in one
    call (the CPU chunking is skipped: it only added calls and a concatenation) and its
    result is returned as it is, an ordinary tensor (allocated outside inference mode, so
    not copied out of it); the same deltas as the torch path in chunks."""
    from ttmanifold.manifold import fixed_rank

    monkeypatch.setattr(fixed_rank, "CPU_BATCH_CHUNK_BYTES", 4096)  # would make 8+ chunks
    M = FixedTTRank((6,) * 5, 3)
    g = torch.Generator().manual_seed(5)
    p = torch.Tensor(M.random(40, dtype=F64, generator=g))
    Z = TT.random(M.shape, 2, dtype=F64, generator=g, batch=(40,))
    spy.calls.clear()
    u = M.project(p, Z)
    assert spy.calls == ["project_batch_small"]
    assert not u.is_inference() and u.shape == p.shape
    u.add_(0.0)  # an ordinary tensor: writable outside inference mode
    ref = _torch_path(monkeypatch, lambda: M.project(p, Z))
    assert _err(M.tangent_to_tt(p, u).full(), M.tangent_to_tt(p, ref).full()) < 1e-12


@pytest.mark.parametrize("dtype", [F64, F32])
def test_nonfinite_point_or_z_is_caught_in_the_kernel(spy, dtype):
    """The small-rank batch skips the separate finiteness pass over p and Z: the kernel
    tests the deltas as it writes them (a NaN or Inf of a point or of Z reaches them), also
    in the last, partial block of points (its padding lanes are not tested)."""
    M = FixedTTRank((5,) * 4, 3)
    g = torch.Generator().manual_seed(6)
    B = 2 * (16 if dtype == F64 else 32) + 3  # a partial last block
    p = torch.Tensor(M.random(B, dtype=dtype, generator=g))
    Z = TT.random(M.shape, 2, dtype=dtype, generator=g, batch=(B,))
    spy.calls.clear()
    M.project(p, Z)  # finite: no error
    assert spy.calls == ["project_batch_small"]
    for which, b, bad in (("p", B - 1, float("nan")), ("p", 0, float("inf")),
                          ("Z", B - 2, float("nan")), ("Z", 17, -float("inf"))):
        q, cores = p.clone(), [c.clone() for c in Z.cores]
        if which == "p":
            q[b, 7] = bad
        else:
            cores[2][b, 1, 2, 0] = bad
        spy.calls.clear()
        with pytest.raises(RuntimeError, match=r"Z: contains NaN or Inf \(or the point p does\)"):
            M.project(q, TT(cores, check=False))
        assert spy.calls == ["project_batch_small"], (which, b)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_rank_10_and_a_large_output(spy, monkeypatch, dtype):
    """n = 20 at rank 10 (the register-tiled products: edge tiles and k in several chunks,
    K = r n = 200) and, in float64, an output above 4 MB (B = 224: the kernel asks for huge
    pages for it, which must not change a value) against the torch path and the dense
    float64 reference, with a partial last block."""
    g = torch.Generator().manual_seed(8)
    M = FixedTTRank((20,) * 3, 10)
    B = 224 + 3 if dtype == F64 else 35
    p = torch.Tensor(M.random(B, dtype=dtype, generator=g))
    Z = TT.random(M.shape, 10, dtype=dtype, generator=g, batch=(B,))
    spy.calls.clear()
    u = M.project(p, Z)
    assert spy.calls == ["project_batch_small"]
    assert u.numel() * u.element_size() > (4 << 20) or dtype == F32
    ref = _torch_path(monkeypatch, lambda: M.project(p, Z))
    full = M.tangent_to_tt(p, u).full()
    assert _err(full, M.tangent_to_tt(p, ref).full()) < TOL[dtype] * 10
    X, Zf = M.to_tt(p).full().to(F64), Z.full().to(F64)
    for b in (0, B - 1):
        assert _err(full[b].to(F64), _dense_projection(X[b], Zf[b], M.ranks)) < TOL[dtype] * 10


def test_large_workspace_not_kept(spy, monkeypatch):
    """Rank 16 at n = 100 in float64: the block's interleaved cores and workspaces (about
    23 MB) exceed what the kernel keeps per thread (16 MB), so they are allocated for the
    call; the gauged deltas (unique) against the torch path."""
    g = torch.Generator().manual_seed(9)
    M = FixedTTRank((100,) * 3, 16)
    p = torch.Tensor(M.random(16, dtype=F64, generator=g))
    Z = TT.random(M.shape, 16, dtype=F64, generator=g, batch=(16,))
    spy.calls.clear()
    u = M.project(p, Z)
    assert spy.calls == ["project_batch_small"]
    ref = _torch_path(monkeypatch, lambda: M.project(p, Z))
    assert _err(u, ref) < 1e-10


@pytest.mark.parametrize("dtype", [F64, F32])
def test_z_of_rank_above_the_points_bound(spy, dtype):
    """Z's TT-ranks up to 32 at points of rank <= 16 (the rank-2r block cores of a
    transported vector at r = 10): the kernel against the dense float64 reference."""
    g = torch.Generator().manual_seed(11)
    M = FixedTTRank((6, 5, 6), 3)
    B = 17
    p = torch.Tensor(M.random(B, dtype=dtype, generator=g))
    Z = TT.random(M.shape, (1, 6, 20, 1), dtype=dtype, generator=g, batch=(B,))
    spy.calls.clear()
    u = M.project(p, Z)
    assert spy.calls == ["project_batch_small"]
    full = M.tangent_to_tt(p, u).full().to(F64)
    X, Zf = M.to_tt(p).full().to(F64), Z.full().to(F64)
    for b in (0, 9, B - 1):
        assert _err(full[b], _dense_projection(X[b], Zf[b], M.ranks)) < TOL[dtype] * 10
