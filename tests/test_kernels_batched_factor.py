"""The compiled batched QR / SVD of many small matrices (``dense.cpp``'s ``batched_qr`` /
``batched_svd`` behind ``manifold.sweeps.batched_qr`` / ``batched_svd``): gauge-invariant
agreement with ``torch.linalg`` in float64 and float32, edge inputs, the dispatch (the
compiled call must actually run), and the batch manifold operations at r = 4 on both paths
compared on full tensors."""

import geoopt
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttmanifold import TT, FixedTTRank, inner, kernels
from ttmanifold.manifold import sweeps
from kernel_checks import rel_err as _err

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-12, F32: 2e-5}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def spy(record_dense):
    """The dense set's module recording its batched factorizations (name, input shape)."""
    return record_dense(("batched_qr", "batched_svd"), shapes=True)


def _check_qr(a, q, r, tol):
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype)
    assert q.shape == a.shape and r.shape == a.shape[:-2] + (n, n)
    assert torch.equal(r, r.triu())
    scale = a.abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    assert float(((q @ r - a) / scale).abs().max()) < tol * a.shape[-2]
    assert float((q.mT @ q - eye).abs().max()) < tol * a.shape[-2]


def _check_svd(a, u, s, vh, tol):
    k = min(a.shape[-2:])
    eye = torch.eye(k, dtype=a.dtype)
    assert u.shape == a.shape[:-2] + (a.shape[-2], k) and vh.shape == a.shape[:-2] + (k, a.shape[-1])
    scale = a.abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    m = max(a.shape[-2:])
    assert float((((u * s.unsqueeze(-2)) @ vh - a) / scale).abs().max()) < tol * m
    assert float((u.mT @ u - eye).abs().max()) < tol * m
    assert float((vh @ vh.mT - eye).abs().max()) < tol * m
    assert bool((s >= 0).all()) and bool((s[..., :-1] >= s[..., 1:]).all())
    ref = torch.linalg.svdvals(a.double()).to(a.dtype)
    assert float(((s - ref) / scale[..., 0]).abs().max()) < tol * m


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(32, 50), n=st.integers(1, 8), extra=st.integers(0, 80),
       dtype=st.sampled_from([F64, F32]), seed=st.integers(0, 2**31 - 1))
def test_batched_qr_against_torch(spy, B, n, extra, dtype, seed):
    m = min(n + extra, sweeps.BATCHED_QR_MAX_NUMEL // n)
    a = torch.randn(B, m, n, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    spy.calls.clear()
    q, r = sweeps.batched_qr(a)
    assert spy.calls == [("batched_qr", (B, m, n))]
    _check_qr(a, q, r, TOL[dtype])
    # the canonical factor (diag R > 0) is unique for full column rank: equal to torch's
    qt, rt = torch.linalg.qr(a)
    sg, sgt = torch.sign(torch.diagonal(r, 0, -2, -1)), torch.sign(torch.diagonal(rt, 0, -2, -1))
    assert _err(sg.unsqueeze(-1) * r, sgt.unsqueeze(-1) * rt) < 50 * TOL[dtype]


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(16, 40), k=st.integers(1, 8), extra=st.integers(0, 40),
       wide=st.booleans(), dtype=st.sampled_from([F64, F32]), seed=st.integers(0, 2**31 - 1))
def test_batched_svd_against_torch(spy, B, k, extra, wide, dtype, seed):
    shape = (k + extra, k) if not wide else (k, k + extra)
    a = torch.randn((B,) + shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    spy.calls.clear()
    u, s, vh = sweeps.batched_svd(a)
    assert [c[0] for c in spy.calls] == ["batched_svd"]
    _check_svd(a, u, s, vh, TOL[dtype])
    # the rank-j truncations (gauge-invariant) agree with torch's where the gap is clear
    ut, st_, vht = torch.linalg.svd(a, full_matrices=False)
    j = max(1, k // 2)
    gap = (st_[..., j - 1] - st_[..., j]) / st_[..., 0] if j < k else torch.ones(B, dtype=dtype)
    ok = gap > 0.1
    low = (u[..., :j] * s[..., None, :j]) @ vh[..., :j, :]
    lowt = (ut[..., :j] * st_[..., None, :j]) @ vht[..., :j, :]
    if bool(ok.any()):
        assert _err(low[ok], lowt[ok]) < 1e3 * TOL[dtype]


@pytest.mark.parametrize("dtype", [F64, F32])
def test_edge_inputs(spy, dtype):
    g = torch.Generator().manual_seed(1)
    B, m, n = 40, 20, 8
    a = torch.randn(B, m, n, dtype=dtype, generator=g)
    a[0] = 0  # zero
    a[1] = torch.randn(m, 1, dtype=dtype, generator=g) @ torch.randn(1, n, dtype=dtype, generator=g)
    a[2, :, 4:] = a[2, :, :4]  # rank 4 of 8, repeated columns
    a[3, :, 1] = 0  # a zero column
    big, small = (1e150, 1e-150) if dtype == F64 else (1e30, 1e-30)
    a[4] *= big
    a[5] *= small
    a[6] = torch.eye(m, n, dtype=dtype)  # repeated singular values
    q, r = sweeps.batched_qr(a[..., :4].contiguous())
    _check_qr(a[..., :4], q, r, TOL[dtype])
    u, s, vh = sweeps.batched_svd(a)
    _check_svd(a, u, s, vh, TOL[dtype])
    assert float(s[0].abs().max()) == 0
    assert float(s[1, 1:].abs().max()) <= 10 * TOL[dtype] * float(s[1, 0])
    assert float(s[2, 4:].abs().max()) <= 10 * TOL[dtype] * float(s[2, 0])
    assert [c[0] for c in spy.calls] == ["batched_qr", "batched_svd"]


def test_nan_input_ends(spy):
    """NaN in one matrix (no endless sweeps: NaN compares false); the others are exact."""
    a = torch.randn(32, 20, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    a[3, 2, 1] = float("nan")
    a[9, 0, 0] = float("inf")
    u, s, vh = sweeps.batched_svd(a)
    assert bool(torch.isnan(s[3]).any()) and not bool(torch.isfinite(s[9]).all())
    keep = torch.ones(32, dtype=torch.bool)
    keep[[3, 9]] = False
    _check_svd(a[keep], u[keep], s[keep], vh[keep], TOL[F64])
    q, r = sweeps.batched_qr(a[..., :4])
    assert bool(torch.isnan(r[3]).any())
    _check_qr(a[keep, :, :4], q[keep], r[keep], TOL[F64])


def test_falls_back_to_torch(spy):
    a = torch.randn(32, 20, 4, dtype=F64)
    few, big, wide_qr = a[:31], torch.randn(32, 200, 8, dtype=F64), a.mT
    for x in (few, big, wide_qr, a[0]):
        sweeps.batched_qr(x)
    sweeps.batched_svd(torch.randn(32, 400, 8, dtype=F64))
    sweeps.batched_svd(a[:15])
    assert spy.calls == []
    g = a.clone().requires_grad_()
    q, r = sweeps.batched_qr(g)  # autograd needs torch's backward
    u, s, vh = sweeps.batched_svd(g)
    assert spy.calls == [] and q.grad_fn is not None and s.grad_fn is not None
    with torch.no_grad():
        sweeps.batched_svd(g)
    assert [c[0] for c in spy.calls] == ["batched_svd"]
    spy.calls.clear()
    old = sweeps.BATCHED_SVD_MIN_BATCH
    sweeps.BATCHED_SVD_MIN_BATCH = 10**9  # the documented switch
    try:
        sweeps.batched_svd(a)
    finally:
        sweeps.BATCHED_SVD_MIN_BATCH = old
    assert spy.calls == []


def test_compiled_functions_check_their_input(dense_module):
    with pytest.raises(RuntimeError, match="m >= n"):
        dense_module.batched_qr(torch.randn(16, 2, 4, dtype=F64))
    with pytest.raises(RuntimeError, match="n <= 8"):
        dense_module.batched_svd(torch.randn(16, 20, 9, dtype=F64))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        dense_module.batched_svd(torch.randn(16, 20, 4, dtype=torch.float16))
    q, r = dense_module.batched_qr(torch.randn(0, 5, 3, dtype=F64))  # empty batch
    assert q.shape == (0, 5, 3) and r.shape == (0, 3, 3)


def _full(M, p):
    return M.to_tt(p).full()


@pytest.mark.parametrize("dtype", [F64, F32])
def test_manifold_batch_ops_match_torch_path(spy, dtype):
    """retr, project and two RiemannianAdam steps of a batch at r = 4 on the compiled
    batched factorizations give the points of the torch path (full tensors)."""
    B, M = 40, FixedTTRank((6,) * 5, 4)
    g = torch.Generator().manual_seed(3)
    p = torch.Tensor(M.random(B, dtype=dtype, generator=g))
    Z = TT.random(M.shape, 4, dtype=dtype, generator=g, batch=(B,))
    A = TT.random(M.shape, 4, dtype=dtype, generator=g, batch=(B,))

    def run():
        u = M.project(p, Z)
        u = u * (0.5 / M.norm(p, u)).unsqueeze(-1)
        y = M.retr(p, u)
        par = geoopt.ManifoldParameter(p.clone(), manifold=M)
        opt = geoopt.optim.RiemannianAdam([par], lr=5e-2)
        for _ in range(2):
            opt.zero_grad()
            T = par.unpack_tensor()
            (0.5 * inner(T, T) - inner(T, A)).sum().backward()
            opt.step()
        return M.tangent_to_tt(p, u).full(), _full(M, y), _full(M, par.detach())

    spy.calls.clear()
    new = run()
    used = {c[0] for c in spy.calls}
    assert used == {"batched_qr", "batched_svd"}, spy.calls
    kernels.set_enabled(False)
    try:
        old = run()
    finally:
        kernels.set_enabled(True)
    tol = 1e-10 if dtype == F64 else 1e-4
    for x, ref in zip(new, old):
        assert _err(x, ref) < tol
