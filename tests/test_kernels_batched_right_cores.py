"""The compiled SIMD right-core sweep for small TT-ranks (``dense.cpp``'s
``right_cores_batch_small`` behind the batch path of ``manifold.sweeps.right_cores``): the
right-orthogonal cores of batches of points against a dense float64 reference (the LQ of each
right unfolding with a nonnegative diagonal), their orthonormality and the tensor they span,
the torch path's cores (the canonical gauge makes them unique), partial blocks, non-finite
points, the fallbacks, and that the compiled call actually runs."""
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttmanifold import FixedTTRank
from ttmanifold.manifold import sweeps
from kernel_checks import torch_path as _torch_path

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-12, F32: 2e-5}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def spy(record_dense):
    """The dense set's module recording its right-core calls."""
    return record_dense(("right_cores_batch_small", "right_cores_batch", "right_cores"))


def _merged(cores):
    """The cores ``(r, n_k, ..., r')`` of one point contracted into ``(r, prod n, r')``."""
    out = cores[0]
    for c in cores[1:]:
        out = torch.einsum("aib,bjc->aijc", out, c).reshape(out.shape[0], -1, c.shape[-1])
    return out


def _dense_right(U, k):
    """Float64 reference of ``V_k ... V_{d-1}`` merged (``r_k x prod n``) of one point: the LQ
    ``U_k ... U_{d-1} = L Q`` with ``diag(L) >= 0`` (the canonical gauge), by a QR of the
    transpose in float64."""
    W = _merged([c.to(F64) for c in U[k:]]).reshape(U[k].shape[0], -1)
    q, r = torch.linalg.qr(W.T)
    s = torch.ones_like(torch.diagonal(r)).copysign_(torch.diagonal(r))
    return (q * s).T


def _check_point(U, V, b, dtype):
    """Point b's right cores: orthonormal rows of each unfolding, the canonical merged
    ``V_>=k`` of the dense reference, and the tensor rebuilt from its left-orthogonal part
    and ``V`` (``X_(k) V_>=k^T V_>=k``) equal to ``X``."""
    Ub = [c[b] for c in U]
    Vb = [None] + [v[b].to(F64) for v in V[1:]]
    X = _merged([c.to(F64) for c in Ub]).reshape(-1)
    tol = TOL[dtype] * 10
    for k in range(1, len(Ub)):
        a = Vb[k].shape[0]
        unf = Vb[k].reshape(a, -1)
        assert float((unf @ unf.T - torch.eye(a, dtype=F64)).abs().max()) < tol
        Wk = _merged(Vb[k:]).reshape(a, -1)
        assert float((Wk - _dense_right(Ub, k)).abs().max()) < tol * 10
        Xk = X.reshape(-1, Wk.shape[1])
        assert float((Xk @ Wk.T @ Wk - Xk).abs().max()) < tol * max(1.0, float(X.abs().max()))


def _points(M, B, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.Tensor(M.random((B, M.size), dtype=F64, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shape,r,B", [((4, 5, 3, 4), 1, 16), ((6, 5, 7, 4, 6), 3, 19),
                                       ((8,) * 5, 8, 37), ((5, 4, 4, 5), (1, 5, 16, 5, 1), 17),
                                       ((10, 10, 10), 10, 33)])
def test_matches_dense_reference_and_torch_path(spy, monkeypatch, shape, r, B, dtype):
    """Ranks 1..16 (float32 blocks of 32 points up to rank 8, 16 above), full and partial
    blocks: the kernel runs once, each point against the dense reference, and the cores
    equal the torch path's (canonical gauge: unique) up to rounding."""
    M = FixedTTRank(shape, r)
    assert max(M.ranks) == (r if isinstance(r, int) else max(r))
    U = M.split(_points(M, B, dtype, 1), "p")
    V = sweeps.right_cores(U)
    assert spy.calls == ["right_cores_batch_small"]
    assert V[0] is None and all(v.shape == u.shape and v.dtype == dtype
                                for v, u in zip(V[1:], U[1:]))
    ref = _torch_path(monkeypatch, lambda: sweeps.right_cores(U))
    for v, w in zip(V[1:], ref[1:]):
        assert float((v - w).abs().max()) < TOL[dtype] * 10
    for b in sorted({0, B // 2, B - 1}):
        _check_point(U, V, b, dtype)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=5), r=st.integers(1, 12),
       B=st.integers(16, 40), dtype=st.sampled_from([F64, F32]), seed=st.integers(0, 2**31 - 1))
def test_random_shapes(spy, monkeypatch, shape, r, B, dtype, seed):
    """Any mode sizes (ones included), ranks clipped to the feasible bound, any batch from
    16: the kernel's cores equal the torch path's and the dense reference's."""
    spy.calls.clear()  # (one fixture for all examples)
    with warnings.catch_warnings():  # ranks clipped to the feasible bound: expected
        warnings.simplefilter("ignore", UserWarning)
        M = FixedTTRank(shape, r)
    U = M.split(_points(M, B, dtype, seed), "p")
    V = sweeps.right_cores(U)
    assert spy.calls == ["right_cores_batch_small"]
    ref = _torch_path(monkeypatch, lambda: sweeps.right_cores(U))
    for v, w in zip(V[1:], ref[1:]):
        assert float((v - w).abs().max()) < TOL[dtype] * 10
    _check_point(U, V, B - 1, dtype)


def test_batch_shapes_strides_and_broadcast(spy, monkeypatch):
    """A batch over two dimensions, cores whose (r, n, r') blocks are not contiguous (read
    after one copy) and a core shared by the whole batch (not copied per point)."""
    M = FixedTTRank((4, 6, 5, 3), 3)
    p = _points(M, 18, F64, 2).reshape(2, 9, -1)
    U = M.split(p, "p")
    V = sweeps.right_cores(U)
    assert spy.calls == ["right_cores_batch_small"] and V[1].shape == (2, 9) + U[1].shape[-3:]
    ref = _torch_path(monkeypatch, lambda: sweeps.right_cores(U))
    assert all(float((v - w).abs().max()) < 1e-12 for v, w in zip(V[1:], ref[1:]))
    Ut = [c.transpose(-1, -3).contiguous().transpose(-1, -3) for c in U]
    assert not Ut[1].is_contiguous()
    Vt = sweeps.right_cores(Ut)
    assert all(torch.equal(v, w) for v, w in zip(V[1:], Vt[1:]))
    Us = [U[0]] + [c[:1, :1].expand_as(c) if k == 2 else c for k, c in enumerate(U[1:], 1)]
    spy.calls.clear()
    Vs = sweeps.right_cores(Us)
    assert spy.calls == ["right_cores_batch_small"]
    ref = _torch_path(monkeypatch, lambda: sweeps.right_cores([c.contiguous() for c in Us]))
    assert all(float((v - w).abs().max()) < 1e-12 for v, w in zip(Vs[1:], ref[1:]))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_point_stays_in_its_lane(spy, bad):
    """A NaN or infinite entry in one point's last core: that point's right cores are not
    finite, every other point's (the same block's lanes) are exactly those of the clean
    batch."""
    M = FixedTTRank((5, 4, 6, 5), 4)
    U = M.split(_points(M, 20, F64, 3), "p")
    clean = sweeps.right_cores(U)
    Ub = [c.clone() for c in U]
    Ub[-1][5, 1, 2, 0] = bad
    V = sweeps.right_cores(Ub)
    assert spy.calls == ["right_cores_batch_small"] * 2
    keep = torch.arange(20) != 5
    for v, w in zip(V[1:], clean[1:]):
        assert not bool(torch.isfinite(v[5]).all())
        assert torch.equal(v[keep], w[keep])


def test_falls_back(spy):
    """Batches below SMALL_RIGHT_MIN_BATCH, ranks above SMALL_RIGHT_MAX_RANK (lowered, and
    the kernel's own 16), one point, autograd: the other paths (the per-point compiled loop
    from rank 8, torch's batched QRs below it)."""
    M = FixedTTRank((3, 4, 3), 2)
    sweeps.right_cores(M.split(_points(M, 15, F64, 4), "p"))  # too few points
    sweeps.right_cores(M.split(_points(M, 1, F64, 4), "p"))  # one point (B = 1)
    sweeps.right_cores(M.split(_points(M, 1, F64, 4)[0], "p"))  # unbatched
    Ug = [c.clone().requires_grad_() for c in M.split(_points(M, 16, F64, 4), "p")]
    V = sweeps.right_cores(Ug)  # autograd: torch's
    assert V[1].requires_grad
    assert "right_cores_batch_small" not in spy.calls
    M9 = FixedTTRank((10, 10, 10), 9)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sweeps, "SMALL_RIGHT_MAX_RANK", 8)
        sweeps.right_cores(M9.split(_points(M9, 16, F64, 5), "p"))
    M17 = FixedTTRank((18, 18, 18), 17)
    sweeps.right_cores(M17.split(_points(M17, 16, F64, 5), "p"))
    assert "right_cores_batch_small" not in spy.calls
    assert spy.calls.count("right_cores_batch") == 2  # ranks >= 8: the per-point loop


def test_adam_step_loss_uses_it(spy):
    """The loss's ``unpack_tensor`` of a batched parameter under autograd takes its right
    cores from the SIMD sweep (the cores are detached from the parameter)."""
    geoopt = pytest.importorskip("geoopt")
    M = FixedTTRank((4, 5, 4), 2)
    p = geoopt.ManifoldParameter(_points(M, 16, F64, 6), manifold=M)
    p.unpack_tensor()
    assert spy.calls == ["right_cores_batch_small"]


def test_compiled_function_checks_its_input(dense_module):
    U = [torch.randn(16, 1, 18, 17, dtype=F64), torch.randn(16, 17, 18, 1, dtype=F64)]
    with pytest.raises(RuntimeError, match="TT-ranks above 16"):
        dense_module.right_cores_batch_small(U, 16)
    U = [torch.randn(16, 1, 3, 2, dtype=F64), torch.randn(15, 2, 3, 1, dtype=F64)]
    with pytest.raises(RuntimeError, match="neither 1 nor 16"):
        dense_module.right_cores_batch_small(U, 16)
    U = [torch.randn(16, 1, 3, 2, dtype=F64), torch.randn(16, 3, 3, 1, dtype=F64)]
    with pytest.raises(RuntimeError, match="ranks of consecutive cores differ"):
        dense_module.right_cores_batch_small(U, 16)
    U = [torch.randn(16, 1, 3, 4), torch.randn(16, 4, 3, 1)]
    with pytest.raises(RuntimeError, match="fewer columns"):
        dense_module.right_cores_batch_small(U, 16)
    V = dense_module.right_cores_batch_small([torch.zeros(0, 1, 3, 2), torch.zeros(0, 2, 3, 1)], 0)
    assert V[1].shape == (0, 2, 3, 1)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_both_lq_variants_agree(dense_module, dtype):
    """Up to rank 8 the kernel runs rbs's LQ in 64-byte blocks (variant 2, the default
    there), above it pbs's in 128-byte blocks (variant 1): the same cores up to rounding,
    with partial blocks of either size (B = 21); variant 2 refuses ranks above 8."""
    M = FixedTTRank((6, 5, 7, 6), 5)
    U = [c.contiguous() for c in M.split(_points(M, 21, dtype, 7), "p")]
    a = dense_module.right_cores_batch_small(U, 21, 1)
    b = dense_module.right_cores_batch_small(U, 21, 2)
    c = dense_module.right_cores_batch_small(U, 21)
    assert all(float((x - y).abs().max()) < TOL[dtype] * 10 for x, y in zip(a[1:], b[1:]))
    assert all(torch.equal(x, y) for x, y in zip(b[1:], c[1:]))
    M9 = FixedTTRank((10, 10, 10), 9)
    with pytest.raises(RuntimeError, match="variant 2 needs TT-ranks <= 8"):
        dense_module.right_cores_batch_small(M9.split(_points(M9, 16, dtype, 7), "p"), 16, 2)
