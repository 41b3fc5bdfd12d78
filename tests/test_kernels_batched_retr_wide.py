"""The compiled batched retraction for TT-ranks 5 to 12 (``dense.cpp``'s
``retract_batch_wide`` behind ``retract_point`` and ``M.retr`` on batches): results against a
dense float64 TT-SVD of ``X + xi`` and the torch batch path (full tensors or TT norms of
differences: the retraction is defined up to the gauge), float64 and float32, both lane
counts with partial blocks, the left-orthogonal gauge, kept right cores, the fallbacks, and
that the compiled call actually runs. What it shares with the small-rank kernel (a shared
point, non-finite input, huge and tiny entries, the input checks, the workspace) is tested
for both in test_kernels_batched_retr.py."""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttmanifold import FixedTTRank
from ttmanifold.manifold import retraction
from kernel_checks import torch_path as _torch_path, rel_err as _err, dense_ttsvd as _dense_ttsvd
from kernel_checks import assert_left_orthogonal as _left_orthogonal

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


