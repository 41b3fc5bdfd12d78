"""The compiled batched retraction for TT-ranks 5 to 12 (``dense.cpp``'s
``retract_batch_wide`` behind ``retract_point`` and ``M.retr`` on batches): results against a
dense float64 TT-SVD of ``X + xi`` and the torch batch path (full tensors or TT norms of
differences: the retraction is defined up to the gauge), float64 and float32, both lane
counts with partial blocks, a shared point, the left-orthogonal gauge, non-finite input,
the fallbacks, and that the compiled call actually runs."""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttmanifold import FixedTTRank
from ttmanifold.manifold import retraction
from kernel_checks import torch_path as _torch_path, rel_err as _err, dense_ttsvd as _dense_ttsvd

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-11, F32: 3e-5}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def spy(record_dense):
    """The dense set's module recording its batched retraction calls."""
    return record_dense(("retract_batch_wide", "retract_batch_small", "retract_batch"))


def _tt_err(M, y, ref):
    """max over the batch of |Y - Ref| / |Ref| (TT norms, float64)."""
    a, b = M.to_tt(y.double()), M.to_tt(ref.double())
    return float(((a - b).norm() / b.norm()).max())


def _left_orthogonal(M, y, tol):
    for c in M._split(y, "y")[:-1]:
        a, n, b = c.shape[-3:]
        m = c.reshape(c.shape[:-3] + (a * n, b)).double()
        assert float((m.mT @ m - torch.eye(b, dtype=F64)).abs().max()) < tol


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(12, 14), min_size=3, max_size=3), r=st.integers(5, 6),
       B=st.integers(16, 20), dtype=st.sampled_from([F64, F32]), gauged=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_matches_dense_reference_and_torch_path(spy, monkeypatch, shape, r, B, dtype, gauged, seed):
    spy.calls.clear()  # (one fixture for all examples)
    g = torch.Generator().manual_seed(seed)
    M = FixedTTRank(shape, r)
    p = torch.Tensor(M.random(B, M.size, dtype=dtype, generator=g))
    u = torch.randn(B, M.size, dtype=dtype, generator=g)
    if gauged:
        u = M.proju(p, u)
    y = M.retr(p, u)
    assert spy.calls == ["retract_batch_wide"] and y.shape == p.shape
    full = M.to_tt(y).full()
    ref = _torch_path(monkeypatch, lambda: M.to_tt(M.retr(p, u)).full())
    assert _err(full, ref) < TOL[dtype] * 10
    A = (M.to_tt(p).full() + M.tangent_to_tt(p, u).full()).to(F64)
    for b in range(0, B, 7):
        assert _err(full[b].to(F64), _dense_ttsvd(A[b], M.ranks)) < TOL[dtype] * 10
    _left_orthogonal(M, y, TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_ranks_up_to_12_and_partial_blocks(spy, monkeypatch, dtype, dense_module):
    """d = 4, n = 24 at ranks 12, 10 and 8 (ragged at the ends) over two batch dimensions
    (B = 2 x 9: a partial last block), against the torch path by the TT norm of the
    difference; the compiled function with both lane counts gives the same tensors."""
    g = torch.Generator().manual_seed(3)
    for r in (12, 10, 8):
        M = FixedTTRank((24,) * 4, r)
        p = torch.Tensor(M.random(18, dtype=dtype, generator=g)).reshape(2, 9, -1)
        u = M.proju(p, torch.randn(2, 9, M.size, dtype=dtype, generator=g))
        spy.calls.clear()
        y = M.retr(p, u)
        assert spy.calls == ["retract_batch_wide"] and y.shape == p.shape
        ref = _torch_path(monkeypatch, lambda: M.retr(p, u))
        assert _tt_err(M, y, ref) < TOL[dtype] * 10
        _left_orthogonal(M, y, TOL[dtype] * 10)
        U = [c.reshape((18,) + c.shape[-3:]) for c in M._split(p, "x")]
        du = [c.reshape((18,) + c.shape[-3:]) for c in M._split(u, "u")]
        for lanes in (8, 16, 32):  # float64: 8, 16; float32: 16, 32 (others: the default)
            y2 = dense_module.retract_batch_wide(U, du, 18, lanes).reshape(p.shape)
            assert _tt_err(M, y2, ref) < TOL[dtype] * 10


def test_shared_point_and_zero_step(spy, monkeypatch):
    """One point for a batch of steps (not copied per point); a zero step returns the
    point's tensor."""
    g = torch.Generator().manual_seed(4)
    M = FixedTTRank((12, 14, 12), 6)
    p1 = torch.Tensor(M.random(dtype=F64, generator=g))
    u = torch.randn(20, M.size, dtype=F64, generator=g)
    y = M.retr(p1, u)
    assert spy.calls == ["retract_batch_wide"] and y.shape == u.shape
    ref = _torch_path(monkeypatch, lambda: M.retr(p1.expand(20, -1), u))
    assert _err(M.to_tt(y).full(), M.to_tt(ref).full()) < 1e-11
    spy.calls.clear()
    p = torch.Tensor(M.random(16, dtype=F64, generator=g))
    y0 = M.retr(p, torch.zeros_like(p))
    assert spy.calls == ["retract_batch_wide"]
    assert _err(M.to_tt(y0).full(), M.to_tt(p).full()) < 1e-12


def test_kept_right_cores(spy, monkeypatch):
    """A batch whose right cores the loss kept (``unpack_tensor`` with grad) still goes to
    the kernel (its own LQ sweep: faster than the per-point loop given them)."""
    g = torch.Generator().manual_seed(8)
    M = FixedTTRank((12, 14, 12), 6)
    p = torch.Tensor(M.random(16, dtype=F64, generator=g)).requires_grad_()
    M.unpack_tensor(p)  # keeps the point's right cores for the step
    u = M.proju(p.detach(), torch.randn(16, M.size, dtype=F64, generator=g))
    with torch.no_grad():
        spy.calls.clear()
        y = M.retr(p, u)
        assert spy.calls == ["retract_batch_wide"]
        ref = _torch_path(monkeypatch, lambda: M.retr(p.detach().clone(), u))
    assert _err(M.to_tt(y).full(), M.to_tt(ref).full()) < 1e-11


@pytest.mark.parametrize("dtype,scale", [(F64, 1e160), (F64, 1e-160), (F32, 1e25), (F32, 1e-25)])
def test_huge_and_tiny_points(spy, monkeypatch, dtype, scale):
    """Points and steps whose squares overflow or underflow (the norm in the last core):
    the factorizations scale their inputs, so the result is the torch path's."""
    g = torch.Generator().manual_seed(7)
    M = FixedTTRank((12, 12, 12), 6)
    p = torch.Tensor(M.random(17, dtype=dtype, generator=g))
    a, n, b = M.core_shapes[-1]
    p[:, -a * n * b:] *= scale
    u = M.proju(p, torch.randn(17, M.size, dtype=dtype, generator=g) * scale)
    y = M.retr(p, u)
    assert spy.calls == ["retract_batch_wide"]
    ref = _torch_path(monkeypatch, lambda: M.retr(p, u))
    assert _err(M.to_tt(y).full(), M.to_tt(ref).full()) < TOL[dtype] * 10


@pytest.mark.parametrize("dtype", [F64, F32])
def test_non_finite_raises(spy, dtype):
    """The same error as the small-rank kernel (and the per-point SVD's NaN/Inf message)."""
    g = torch.Generator().manual_seed(5)
    M = FixedTTRank((10, 10, 10), 5)
    p = torch.Tensor(M.random(17, dtype=dtype, generator=g))
    u = torch.randn(17, M.size, dtype=dtype, generator=g)
    u[16, 3] = float("nan")  # the last point, alone in its block
    with pytest.raises(RuntimeError, match="retr: X \\+ u is not finite"):
        M.retr(p, u)
    assert spy.calls == ["retract_batch_wide"]


def test_falls_back(spy):
    g = torch.Generator().manual_seed(6)
    M = FixedTTRank((10, 10, 10), 5)
    p = torch.Tensor(M.random(15, dtype=F64, generator=g))
    M.retr(p, torch.randn(15, M.size, dtype=F64, generator=g))  # a batch below 16
    p16 = torch.Tensor(M.random(16, dtype=F64, generator=g)).requires_grad_()
    M.retr(p16, torch.randn(16, M.size, dtype=F64, generator=g))  # autograd: torch's
    M13 = FixedTTRank((26, 26, 26), 13)  # ranks above 12
    p13 = torch.Tensor(M13.random(16, dtype=F64, generator=g))
    M13.retr(p13, torch.randn(16, M13.size, dtype=F64, generator=g))
    with warnings.catch_warnings():  # ranks clipped to the feasible bound: expected
        warnings.simplefilter("ignore", UserWarning)
        M9 = FixedTTRank((9, 10, 9), 6)  # n_0 = 9 < 2 r_1: a wide first unfolding
    p9 = torch.Tensor(M9.random(16, dtype=F64, generator=g))
    M9.retr(p9, torch.randn(16, M9.size, dtype=F64, generator=g))
    assert "retract_batch_wide" not in spy.calls
    M4 = FixedTTRank((10, 10, 10), 4)  # ranks <= 4: the small-rank kernel
    p4 = torch.Tensor(M4.random(16, dtype=F64, generator=g))
    M4.retr(p4, torch.randn(16, M4.size, dtype=F64, generator=g))
    assert "retract_batch_wide" not in spy.calls and "retract_batch_small" in spy.calls
    assert retraction.WIDE_RETRACT_MAX_RANK == 12


def test_compiled_function_checks_its_input(dense_module):
    U = [torch.randn(16, 1, 30, 13, dtype=F64), torch.randn(16, 13, 30, 1, dtype=F64)]
    with pytest.raises(RuntimeError, match="TT-ranks above 12"):
        dense_module.retract_batch_wide(U, U, 16)
    U = [torch.randn(16, 1, 9, 5, dtype=F64), torch.randn(16, 5, 9, 1, dtype=F64)]
    with pytest.raises(RuntimeError, match="wide"):
        dense_module.retract_batch_wide(U, U, 16)
    with pytest.raises(RuntimeError, match="batch size"):
        dense_module.retract_batch_wide(U, [c[:5] for c in U], 16)
