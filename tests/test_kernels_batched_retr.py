"""The compiled batched retraction for small TT-ranks (``dense.cpp``'s
``retract_batch_small`` behind ``retract_point`` and ``M.retr`` on batches): results against
a dense float64 TT-SVD of ``X + xi`` and the torch batch path (full tensors or TT norms of
differences: the retraction is defined up to the gauge), float64 and float32, the
left-orthogonal gauge, rank-deficient steps, the fallbacks, and that the compiled call
actually runs. For it and the wide kernel (``retract_batch_wide``, the same sweep): a shared
point, non-finite input, huge and tiny entries, the compiled functions' input checks, and
their per-thread workspace after a huge call."""
import os
import subprocess
import sys
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
    return record_dense(("retract_batch_small", "retract_batch_wide", "retract_batch"))


# the two SIMD batch kernels for the tests both take: (the compiled function, a manifold's
# shape and rank it takes, its rank bound)
KERNELS = {"small": ("retract_batch_small", (6, 3, 5, 6), 3, 4),
           "wide": ("retract_batch_wide", (12, 14, 12), 6, 12)}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(2, 7), min_size=2, max_size=4), r=st.integers(1, 4),
       B=st.integers(16, 37), dtype=st.sampled_from([F64, F32]), gauged=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_matches_dense_reference_and_torch_path(spy, monkeypatch, shape, r, B, dtype, gauged, seed):
    spy.calls.clear()  # (one fixture for all examples)
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():  # ranks clipped to the feasible bound: expected
        warnings.simplefilter("ignore", UserWarning)
        M = FixedTTRank(shape, r)
    p = torch.Tensor(M.random(B, M.size, dtype=dtype, generator=g))
    u = torch.randn(B, M.size, dtype=dtype, generator=g)
    if gauged:
        u = M.proju(p, u)
    takes = all(a * n >= 2 * b for a, n, b in zip(M.ranks, shape, M.ranks[1:-1]))
    y = M.retr(p, u)
    assert y.shape == p.shape
    if not takes:  # a wide unfolding (r_k n_k < 2 r_{k+1}): the kernel's check refuses it
        assert "retract_batch_small" not in spy.calls
        return
    assert spy.calls == ["retract_batch_small"]
    full = M.to_tt(y).full()
    ref = _torch_path(monkeypatch, lambda: M.to_tt(M.retr(p, u)).full())
    assert _err(full, ref) < TOL[dtype] * 10
    A = (M.to_tt(p).full() + M.tangent_to_tt(p, u).full()).to(F64)
    for b in range(0, B, 9):
        assert _err(full[b].to(F64), _dense_ttsvd(A[b], M.ranks)) < TOL[dtype] * 10
    _left_orthogonal(M, y, TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_realistic_sizes(spy, monkeypatch, dtype):
    """d = 6, n = 8 at ranks 4 and 2 over two batch dimensions with a partial last block
    (B = 2 x 9), against the torch path by the TT norm of the difference."""
    g = torch.Generator().manual_seed(3)
    for r in (4, 2):
        M = FixedTTRank((8,) * 6, r)
        p = torch.Tensor(M.random(18, dtype=dtype, generator=g)).reshape(2, 9, -1)
        u = M.proju(p, torch.randn(2, 9, M.size, dtype=dtype, generator=g))
        spy.calls.clear()
        y = M.retr(p, u)
        assert spy.calls == ["retract_batch_small"] and y.shape == p.shape
        ref = _torch_path(monkeypatch, lambda: M.retr(p, u))
        a, b = M.to_tt(y.double()), M.to_tt(ref.double())
        assert float(((a - b).norm() / b.norm()).max()) < TOL[dtype] * 10
        _left_orthogonal(M, y, TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_rank_deficient_steps(spy, dtype):
    """Zero steps and steps in one core's delta only (exactly rank-deficient unfoldings:
    zero columns in the Householder QRs, zero singular values in the Jacobi SVDs) beside
    full steps, over blocks of 8 (float64) / 16 (float32) lanes with a partial last block,
    against the dense float64 TT-SVD."""
    g = torch.Generator().manual_seed(7)
    M = FixedTTRank((6, 5, 4, 6), 3)
    B = 21
    p = torch.Tensor(M.random(B, dtype=dtype, generator=g))
    u = M.proju(p, torch.randn(B, M.size, dtype=dtype, generator=g))
    sizes = [c.shape[-3:].numel() for c in M._split(p[0], "p")]
    u[:7] = 0
    u[7:14, :sizes[0]] = 0  # only the deltas of cores 1.. (core 1 alone: the rest zeroed)
    u[7:14, sizes[0] + sizes[1]:] = 0
    y = M.retr(p, u)
    assert spy.calls == ["retract_batch_small"]
    full = M.to_tt(y).full().to(F64)
    A = (M.to_tt(p).full() + M.tangent_to_tt(p, u).full()).to(F64)
    for b in range(B):
        assert _err(full[b], _dense_ttsvd(A[b], M.ranks)) < TOL[dtype] * 10, b
    _left_orthogonal(M, y, TOL[dtype] * 10)


def test_falls_back(spy, monkeypatch):
    g = torch.Generator().manual_seed(6)
    M = FixedTTRank((4, 4, 4), 2)
    p = torch.Tensor(M.random(15, dtype=F64, generator=g))
    M.retr(p, torch.randn(15, M.size, dtype=F64, generator=g))  # a batch below 16
    M5 = FixedTTRank((10, 10, 10), 5)  # ranks above 4
    p5 = torch.Tensor(M5.random(16, dtype=F64, generator=g))
    M5.retr(p5, torch.randn(16, M5.size, dtype=F64, generator=g))
    M3 = FixedTTRank((3, 4, 3), 2)  # n_0 = 3 < 2 r_1: a wide first unfolding
    p3 = torch.Tensor(M3.random(16, dtype=F64, generator=g))
    M3.retr(p3, torch.randn(16, M3.size, dtype=F64, generator=g))
    p16 = torch.Tensor(M.random(16, dtype=F64, generator=g)).requires_grad_()
    M.retr(p16, torch.randn(16, M.size, dtype=F64, generator=g))  # autograd: torch's
    assert "retract_batch_small" not in spy.calls
    assert retraction.SMALL_RETRACT_MAX_RANK == 4


@pytest.mark.parametrize("kernel", KERNELS)
def test_shared_point_and_zero_step(spy, monkeypatch, kernel):
    """One point for a batch of steps (not copied per point); a zero step returns the
    point's tensor."""
    name, shape, r, _ = KERNELS[kernel]
    g = torch.Generator().manual_seed(4)
    M = FixedTTRank(shape, r)
    p1 = torch.Tensor(M.random(dtype=F64, generator=g))
    u = torch.randn(20, M.size, dtype=F64, generator=g)
    y = M.retr(p1, u)
    assert spy.calls == [name] and y.shape == u.shape
    ref = _torch_path(monkeypatch, lambda: M.retr(p1.expand(20, -1), u))
    assert _err(M.to_tt(y).full(), M.to_tt(ref).full()) < 1e-11
    spy.calls.clear()
    p = torch.Tensor(M.random(16, dtype=F64, generator=g))
    y0 = M.retr(p, torch.zeros_like(p))
    assert spy.calls == [name]
    assert _err(M.to_tt(y0).full(), M.to_tt(p).full()) < 1e-12


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_non_finite_raises(spy, kernel, dtype):
    """An infinite step in a full block or a NaN in the last point, alone in its block: the
    error of the single-point retraction."""
    name, shape, r, _ = KERNELS[kernel]
    g = torch.Generator().manual_seed(5)
    M = FixedTTRank(shape, r)
    p = torch.Tensor(M.random(17, dtype=dtype, generator=g))
    for b, bad in ((7, float("inf")), (16, float("nan"))):
        u = torch.randn(17, M.size, dtype=dtype, generator=g)
        u[b, 3] = bad
        spy.calls.clear()
        with pytest.raises(RuntimeError, match="retr: X \\+ u is not finite"):
            M.retr(p, u)
        assert spy.calls == [name]


@pytest.mark.parametrize("kernel", KERNELS)
def test_compiled_function_checks_its_input(dense_module, kernel):
    name, _, _, R = KERNELS[kernel]
    fn = getattr(dense_module, name)
    U = [torch.randn(16, 1, 2 * R + 2, R + 1, dtype=F64), torch.randn(16, R + 1, 2 * R + 2, 1, dtype=F64)]
    with pytest.raises(RuntimeError, match=f"TT-ranks above {R}"):
        fn(U, U, 16)
    U = [torch.randn(16, 1, 3, 2, dtype=F64), torch.randn(16, 2, 3, 1, dtype=F64)]
    with pytest.raises(RuntimeError, match="wide"):
        fn(U, U, 16)
    with pytest.raises(RuntimeError, match="batch size"):
        fn(U, [c[:5] for c in U], 16)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype,scale", [(F64, 1e160), (F64, 1e-160), (F32, 1e25), (F32, 1e-25)])
def test_huge_and_tiny_points(spy, monkeypatch, kernel, dtype, scale):
    """Points and steps whose squares overflow or underflow (the norm in the last core):
    the structured QR and the SVDs scale their inputs (the small-rank kernel raised "not
    finite" where the single-point call works), so the result is the torch path's."""
    name, shape, r, _ = KERNELS[kernel]
    g = torch.Generator().manual_seed(7)
    M = FixedTTRank(shape, r)
    p = torch.Tensor(M.random(17, dtype=dtype, generator=g))
    a, n, b = M.core_shapes[-1]
    p[:, -a * n * b:] *= scale
    u = M.proju(p, torch.randn(17, M.size, dtype=dtype, generator=g) * scale)
    spy.calls.clear()
    y = M.retr(p, u)
    assert spy.calls == [name]
    ref = _torch_path(monkeypatch, lambda: M.retr(p, u))
    tol = 1e-10 if dtype == F64 else 1e-4
    assert _err(M.to_tt(y).full(), M.to_tt(ref).full()) < tol


def _huge_call(monkeypatch, r, n, g):
    """M.retr of 16 points of shape (2r, n, 2r), rank r (a workspace of tens of MB),
    against the torch path."""
    M = FixedTTRank((2 * r, n, 2 * r), r)
    p = torch.Tensor(M.random(16, dtype=F64, generator=g))
    u = M.proju(p, torch.randn(16, M.size, dtype=F64, generator=g))
    y = M.retr(p, u)
    a, b = M.to_tt(y), M.to_tt(_torch_path(monkeypatch, lambda: M.retr(p, u)))
    assert float(((a - b).norm() / b.norm()).max()) < 1e-11


# the resident-size part in a fresh process: in the suite's process, memory that earlier
# tests freed can still be resident and absorb the huge call's workspace (no growth seen)
_WORKSPACE = """
import os, sys, torch
from ttmanifold import FixedTTRank, kernels
assert kernels.module("dense") is not None
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
r, n = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(9)
def batch(shape):
    M = FixedTTRank(shape, r)
    p = torch.Tensor(M.random(16, dtype=torch.float64, generator=g))
    return M, p, M.proju(p, torch.randn(16, M.size, dtype=torch.float64, generator=g))
Ms, ps, us = batch((12, 12, 12))
for _ in range(5):
    Ms.retr(ps, us)
Mh, ph, uh = batch((2 * r, n, 2 * r))
before = rss()
Mh.retr(ph, uh)
held = rss() - before
after = rss()
for _ in range(4):
    Ms.retr(ps, us)
print(held, after - rss())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident size: Linux only")
@pytest.mark.parametrize("kernel,r,n", [("retract_batch_small", 4, 1500), ("retract_batch_wide", 6, 800)])
def test_workspace_freed_after_a_huge_call(spy, monkeypatch, kernel, r, n):
    """Both kernels' sweep keeps a per-thread workspace: a call with a huge mode size n (a
    workspace of ~50 MB) gives the torch path's result, and the small calls after it give
    the same tensors as before it, while the workspace is freed (in a fresh process: the
    resident size drops by most of it) once a few calls in a row needed far less."""
    g = torch.Generator().manual_seed(9)
    M = FixedTTRank((12, 12, 12), r)
    p = torch.Tensor(M.random(16, dtype=F64, generator=g))
    u = M.proju(p, torch.randn(16, M.size, dtype=F64, generator=g))
    y0 = M.retr(p, u)
    ref = _torch_path(monkeypatch, lambda: M.retr(p, u))
    assert _err(M.to_tt(y0).full(), M.to_tt(ref).full()) < 1e-11
    _huge_call(monkeypatch, r, n, g)
    for _ in range(4):
        assert torch.equal(M.retr(p, u), y0)
    assert set(spy.calls) == {kernel}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _WORKSPACE, str(r), str(n)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    held, dropped = (int(x) for x in out.stdout.split()[-2:])
    assert held > 30e6, out.stdout  # the huge call's workspace (touched: resident)
    assert dropped > 0.7 * held, out.stdout


class _RightCoresSpy:
    """The dense module recording, per batched retraction call, whether right cores were
    given (``V`` non-empty)."""

    def __init__(self, mod):
        self._mod, self.calls = mod, []

    def __getattr__(self, attr):
        f = getattr(self._mod, attr)
        if not attr.startswith("retract_batch_"):
            return f

        def call(*a, **k):
            self.calls.append((attr, len(k.get("V", ())) > 0))
            return f(*a, **k)
        return call


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_given_right_cores_skip_the_lq_sweep(dense_module, kernel, dtype):
    """The canonical right cores given (the batched right_cores', as the loss keeps them)
    give the kernel's own result (the same LQ steps: equal to rounding) and the dense
    TT-SVD; per point (a partial last block) and shared by the batch (one point)."""
    from ttmanifold.manifold.sweeps import right_cores
    name, shape, r, _ = KERNELS[kernel]
    fn = getattr(dense_module, name)
    g = torch.Generator().manual_seed(11)
    M = FixedTTRank(shape, r)
    p = torch.Tensor(M.random(19, dtype=dtype, generator=g))
    u = M.proju(p, torch.randn(19, M.size, dtype=dtype, generator=g))
    U, du = M._split(p, "x"), M._split(u, "u")
    V = right_cores(U)
    own = fn(U, du, 19)
    given = fn(U, du, 19, V=V[1:])
    assert _err(M.to_tt(given).full(), M.to_tt(own).full()) < TOL[dtype]
    A = (M.to_tt(p).full() + M.tangent_to_tt(p, u).full()).to(F64)
    for b in (0, 18):
        assert _err(M.to_tt(given[b]).full().to(F64), _dense_ttsvd(A[b], M.ranks)) < TOL[dtype] * 10
    one = fn([c[:1] for c in U], du, 19, V=[c[:1] for c in V[1:]])  # one point, 19 steps
    ref = fn([c[:1].expand_as(c) for c in U], du, 19)
    assert _err(M.to_tt(one).full(), M.to_tt(ref).full()) < TOL[dtype]
    bad = [c.clone() for c in V[1:]]  # a wrong right core changes the result: it is used
    bad[0][:, 0] *= -1
    assert _err(M.to_tt(fn(U, du, 19, V=bad)).full(), M.to_tt(own).full()) > 1e-3
    with pytest.raises(RuntimeError, match="V: the d - 1 right cores"):
        fn(U, du, 19, V=V[2:])
    with pytest.raises(RuntimeError, match="V: core 1 differs in shape"):
        fn(U, du, 19, V=[V[1][:, :, :-1]] + V[2:])


@pytest.mark.parametrize("kernel", KERNELS)
def test_step_passes_right_cores(dense_module, monkeypatch, kernel):
    """retr_transp runs one LQ sweep for its retraction and transport (right cores given to
    the retraction kernel), and retr takes the loss's kept right cores; both give the
    torch path's results."""
    from ttmanifold import kernels
    name, shape, r, _ = KERNELS[kernel]
    g = torch.Generator().manual_seed(12)
    M = FixedTTRank(shape, r)
    p = torch.Tensor(M.random(17, dtype=F64, generator=g))
    u = M.proju(p, torch.randn(17, M.size, dtype=F64, generator=g))
    v = M.proju(p, torch.randn(17, M.size, dtype=F64, generator=g))
    ref_y, ref_t = _torch_path(monkeypatch, lambda: M.retr_transp(p, u, v))
    spy = _RightCoresSpy(dense_module)
    monkeypatch.setattr(kernels._SETS["dense"], "module", spy)
    monkeypatch.setitem(kernels._config, "enabled", True)
    y, t = M.retr_transp(p, u, v)
    assert spy.calls == [(name, True)]
    assert _err(M.to_tt(y).full(), M.to_tt(ref_y).full()) < 1e-11
    assert _err(M.tangent_to_tt(y, t).full(), M.tangent_to_tt(ref_y, ref_t).full()) < 1e-10
    spy.calls.clear()
    par = p.clone().requires_grad_()
    M.unpack_tensor(par)  # the loss's evaluation keeps par's right cores for the step
    with torch.no_grad():
        y2 = M.retr(par, u)
        assert spy.calls == [(name, True)]
        assert _err(M.to_tt(y2).full(), M.to_tt(ref_y).full()) < 1e-11
        spy.calls.clear()
        M.retr(par, u)  # (consumed: the kernel's own LQ sweep)
        assert spy.calls == [(name, False)]
