"""The compiled batched vector transport (``dense.cpp``'s ``transport_batch_small`` behind
``retr_transp`` and ``transp`` of a CPU batch): ``P_Y`` of tangent vectors given at points
X by (U, V, dU), the rank-2r block cores assembled in cache. Against the torch path (full
tensors, gauge-invariant), a dense float64 projector reference, for uneven ranks and modes,
batch shapes (3,), (2, 3) (the kernel called directly: below the dispatch's batch bound)
and (2, 8), broadcast points and vectors; non-finite inputs raise. And the gauge
projection of a batch SIMD across the points (``gauge_project_batch_small``, behind
``egrad2rgrad``/``proju`` and the loss's backward) against a float64 per-point reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttmanifold import TT, FixedTTRank
from ttmanifold.kernels import dense as compiled_dense
from ttmanifold.manifold import sweeps
from kernel_checks import rel_err, torch_path
from test_manifold_batch import dense_point, dense_tangent, tangent_projector

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-11, F32: 3e-5}
NONFINITE = r"^v: contains NaN or Inf"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def spy(record_dense):
    """The dense set's module recording the transport's and the projection's calls."""
    return record_dense(("transport_batch_small", "project_batch_small"))


def case(shape, ranks, bs, dtype, seed, vector_bs=None):
    """A manifold, points x (batch bs), steps to y = retr(x, u), vectors v (batch
    vector_bs, default bs), all float64 made then cast."""
    M = FixedTTRank(shape, ranks)
    g = torch.Generator().manual_seed(seed)
    B = torch.Size(bs).numel()
    x = torch.Tensor(M.random(B, M.size, dtype=F64, generator=g)).reshape(bs + (M.size,))
    u = M.project(x, TT.random(shape, 2, dtype=F64, generator=g, batch=tuple(bs)))
    u = 0.3 * u / M.norm(x, u, keepdim=True)
    y = M.retr(x, u)
    vb = tuple(bs) if vector_bs is None else tuple(vector_bs)
    v = torch.randn(vb + (M.size,), dtype=F64, generator=g)  # non-gauged: any deltas
    return M, x.to(dtype), y.to(dtype), v.to(dtype)


def cores_of(M, p):
    """The cores of the packed p (..., size) as (..., r, n, r') views."""
    sizes = [M.ranks[k] * n * M.ranks[k + 1] for k, n in enumerate(M.shape)]
    return [c.unflatten(-1, (M.ranks[k], n, M.ranks[k + 1]))
            for k, (c, n) in enumerate(zip(p.split(sizes, -1), M.shape))]


def kernel_transport(mod, M, x, y, v):
    """The compiled transport called directly (any batch size)."""
    U = cores_of(M, x)
    return compiled_dense.transport_batch_small(mod, cores_of(M, y), U, sweeps.right_cores(U),
                                                cores_of(M, v), check="v: bad")


def full_tangent(M, y, t):
    """Dense float64 tensors of the tangent vectors t at y (any batch shape), stacked."""
    y, t = y.reshape(-1, M.size), t.reshape(-1, M.size)
    return torch.stack([M.tangent_to_tt(y[b].double(), t[b].double()).full()
                        for b in range(y.shape[0])])


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape,ranks", [((4, 5, 3, 4), (1, 2, 3, 2, 1)), ((3, 6), 3),
                                         ((2, 3, 4, 3, 2), (1, 2, 4, 3, 2, 1)),
                                         ((3, 3, 3), 3)])
@pytest.mark.parametrize("bs", [(3,), (2, 3)])
def test_kernel_against_torch_path(dense_module, monkeypatch, dtype, shape, ranks, bs):
    """The kernel against ``transp`` on the torch path, as full tensors (uneven ranks,
    d = 2 to 5, a rank equal to the mode size: a square LQ)."""
    M, x, y, v = case(shape, ranks, bs, dtype, seed=len(shape) + len(bs))
    t = kernel_transport(dense_module, M, x, y, v)
    assert t.shape == y.shape
    t0 = torch_path(monkeypatch, lambda: M.transp(x, y, v))
    assert rel_err(full_tangent(M, y, t), full_tangent(M, y, t0)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_routed_transport_against_dense_reference(spy, dtype):
    """``transp`` and ``retr_transp`` of a (2, 8) batch run the transport kernel (one call
    each); the transported vectors against the dense float64 ``P_Y v`` (the orthogonal
    projector onto the tangent space at Y)."""
    M, x, y, v = case((4, 5, 3, 4), (1, 2, 3, 2, 1), (2, 8), dtype, seed=3)
    spy.calls.clear()
    t = M.transp(x, y, v)
    assert spy.calls == ["transport_batch_small"] and t.shape == v.shape
    for i, j in ((0, 0), (1, 5), (1, 7)):
        Y = dense_point(M, y[i, j])
        P = tangent_projector(Y, M.ranks)
        ref = (P @ dense_tangent(M, x[i, j], v[i, j]).reshape(-1)).reshape(M.shape)
        assert rel_err(dense_tangent(M, y[i, j], t[i, j]), ref) < 10 * TOL[dtype]
    spy.calls.clear()
    y2, t2 = M.retr_transp(x, 0.1 * M.proju(x, v), v)
    assert spy.calls == ["transport_batch_small"]  # (the retraction is not recorded here)
    assert rel_err(t2, M.transp(x, y2, v)) < TOL[dtype]


def test_broadcast_point_and_vector(spy, monkeypatch):
    """One point x for the batch of y (its cores not copied per point) and one vector v for
    the batch: as the torch path."""
    M, x, y, v = case((4, 5, 3, 4), (1, 2, 3, 2, 1), (16,), F64, seed=4)
    for xx, vv in ((x[3], v), (x, v[5]), (x[2], v[1])):
        spy.calls.clear()
        t = M.transp(xx, y, vv)
        assert spy.calls == ["transport_batch_small"] and t.shape == y.shape
        t0 = torch_path(monkeypatch, lambda: M.transp(xx, y, vv))
        assert rel_err(t, t0) < 1e-12  # same points y: the same canonical gauge


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_rank_10_float_lanes_and_partial_block(spy, dense_module, monkeypatch, dtype):
    """n = 20 at rank 10 (2r = 20: float32 at half the lanes, register tiles with edges)
    and a partial last block (B = 19): the kernel against the torch path (same y: deltas
    compared). ``transp`` routes rank 10 to it unless ``SMALL_TRANSPORT_MAX_RANK`` is
    lowered (then the block cores and the projection kernel)."""
    M, x, y, v = case((20, 20, 20), 10, (19,), dtype, seed=5)
    t = kernel_transport(dense_module, M, x, y, v)
    t0 = torch_path(monkeypatch, lambda: M.transp(x, y, v))
    assert rel_err(t, t0) < 10 * TOL[dtype]
    spy.calls.clear()
    assert rel_err(M.transp(x, y, v), t0) < 10 * TOL[dtype]
    assert spy.calls == ["transport_batch_small"]
    monkeypatch.setattr(sweeps, "SMALL_TRANSPORT_MAX_RANK", 8)
    spy.calls.clear()
    assert rel_err(M.transp(x, y, v), t0) < 10 * TOL[dtype]
    assert spy.calls == ["project_batch_small"]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_nonfinite_inputs_raise(spy, dtype):
    """A NaN or Inf in v, in x or in y (first, middle, last core; first and last point of
    a batch with a partial last block) raises from the kernel, as on the torch path."""
    B = 16 + 16 + 3
    M, x, y, v = case((4, 5, 3, 4), (1, 2, 3, 2, 1), (B,), dtype, seed=6)
    for which in ("v", "x", "y"):
        for b, i, bad in ((0, 0, float("nan")), (B - 1, M.size // 2, float("inf")),
                          (B - 2, M.size - 1, -float("inf"))):
            a = {"v": v, "x": x, "y": y}
            a[which] = a[which].clone()
            a[which][b, i] = bad
            spy.calls.clear()
            with pytest.raises(RuntimeError, match=NONFINITE):
                M.transp(a["x"], a["y"], a["v"])
            assert spy.calls == ["transport_batch_small"], (which, b, i)


def test_kernel_checks_its_arguments(dense_module):
    M, x, y, v = case((4, 5, 3, 4), (1, 2, 3, 2, 1), (3,), F64, seed=7)
    U, Uy, dU = cores_of(M, x), cores_of(M, y), cores_of(M, v)
    V = sweeps.right_cores(U)
    tb = dense_module.transport_batch_small
    with pytest.raises(RuntimeError, match="inconsistent lengths"):
        tb(Uy, U, [U[0]] + V[1:], dU, 3, "")  # d cores for V: V_1..V_{d-1} expected
    with pytest.raises(RuntimeError, match="differs in shape"):
        tb(Uy[:2] + [Uy[3], Uy[2]], U, V[1:], dU, 3, "")
    with pytest.raises(RuntimeError, match="one dtype"):
        tb(Uy, U, V[1:], [c.float() for c in dU], 3, "")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(2, 5), min_size=2, max_size=5), r=st.integers(1, 5),
       B=st.integers(1, 20), dtype=st.sampled_from([F64, F32]), seed=st.integers(0, 2**31 - 1))
def test_property_kernel_against_torch_path(dense_module, monkeypatch, shape, r, B, dtype, seed):
    """Random modes, ranks (clipped to the feasible ones) and batch sizes: the kernel
    against the torch path, full tensors."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ranks clipped to the feasible bound
        M, x, y, v = case(tuple(shape), r, (B,), dtype, seed=seed)
    t = kernel_transport(dense_module, M, x, y, v)
    t0 = torch_path(monkeypatch, lambda: M.transp(x, y, v))
    assert rel_err(full_tangent(M, y, t), full_tangent(M, y, t0)) < 10 * TOL[dtype]


# --- the gauge projection of a batch SIMD across the points (gauge_project_batch_small) ---

def dense_gauge(M, p, g):
    """float64 reference: g_k - U_k (U_k^T g_k) on the left unfoldings of the cores k < d-1
    of each point, the last core unchanged (plain matrix products per point)."""
    p, g = p.double().reshape(-1, M.size), g.double().reshape(-1, M.size)
    out = g.clone()
    for b in range(g.shape[0]):
        pb = p[b if p.shape[0] > 1 else 0]
        for k, (U, G, O) in enumerate(zip(cores_of(M, pb), cores_of(M, g[b]), cores_of(M, out[b]))):
            if k < M.d - 1:
                U2, G2 = U.reshape(-1, U.shape[-1]), G.reshape(-1, G.shape[-1])
                O.copy_((G2 - U2 @ (U2.T @ G2)).reshape(O.shape))
    return out


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape,ranks,B", [((4, 5, 3, 4), (1, 2, 3, 2, 1), 37),
                                           ((20, 20, 20), 10, 19), ((3, 6), 3, 16),
                                           ((6, 6, 6, 6), (1, 6, 9, 6, 1), 33)])
def test_gauge_kernel_against_dense_reference(record_dense, monkeypatch, dtype, shape, ranks, B):
    """``egrad2rgrad`` and ``proju`` of a batch run the SIMD gauge kernel (partial last
    blocks, ranks 2 to 10, float32 at half the lanes above 8), against the float64
    per-point reference and the torch path; one point for the batch broadcasts."""
    spy = record_dense(("gauge_project_batch_small", "gauge_project_batch"))
    M = FixedTTRank(shape, ranks)
    g0 = torch.Generator().manual_seed(B)
    p = torch.Tensor(M.random(B, M.size, dtype=F64, generator=g0)).to(dtype)
    g = torch.randn(p.shape, dtype=F64, generator=g0).to(dtype)
    with torch.no_grad():
        out = M.egrad2rgrad(p, g)
    assert spy.calls == ["gauge_project_batch_small"]
    assert rel_err(out.double(), dense_gauge(M, p, g)) < TOL[dtype]
    assert rel_err(out, torch_path(monkeypatch, lambda: M.proju(p, g))) < TOL[dtype]
    spy.calls.clear()
    one = M.proju(p[4], g)  # one point for the batch of vectors
    assert spy.calls == ["gauge_project_batch_small"]
    assert rel_err(one.double(), dense_gauge(M, p[4:5], g)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_gauge_kernel_reports_nonfinite(dense_module, dtype):
    """The kernel's finiteness flag: a NaN or Inf in a gauged core or in the copied last
    core, of the first or the last point (a partial block), of g or of the points."""
    M = FixedTTRank((4, 5, 3, 4), (1, 2, 3, 2, 1))
    B = 35
    p = torch.Tensor(M.random(B, M.size, dtype=dtype, generator=torch.Generator().manual_seed(1)))
    g = torch.randn(p.shape, dtype=dtype)
    runs = compiled_dense._flat_runs(M.gauge_runs)
    assert dense_module.gauge_project_batch_small(p, g, runs)[1]
    for which, b, i in (("g", 0, 3), ("g", B - 1, M.size - 1), ("p", B - 1, 5), ("g", 20, 30)):
        q, h = p.clone(), g.clone()
        (q if which == "p" else h)[b, i] = float("nan") if b else float("inf")
        out, ok = dense_module.gauge_project_batch_small(q, h, runs)
        assert not ok, (which, b, i)
        ref, ok0 = dense_module.gauge_project_batch(q, h, runs)
        assert not ok0 and torch.equal(out.isfinite(), ref.isfinite())


def test_transport_module_declines_what_it_does_not_take(dense_module):
    """``sweeps.small_transport_module``: None for fewer than 16 points, a batch shape that
    only broadcasts (not one point), ranks above 16, a mismatch of core shapes; the module
    otherwise."""
    M, x, y, v = case((4, 5, 3, 4), (1, 2, 3, 2, 1), (2, 8), F64, seed=9)
    U, Uy, dU = cores_of(M, x), cores_of(M, y), cores_of(M, v)
    V = sweeps.right_cores(U)
    assert sweeps.small_transport_module(Uy, U, V, dU) is dense_module
    assert sweeps.small_transport_module(Uy, [c[0, 0] for c in U], V, [c[1, 2] for c in dU]) \
        is dense_module  # one point and one vector for the batch
    assert sweeps.small_transport_module([c[0] for c in Uy], U, V, dU) is None  # 8 points
    assert sweeps.small_transport_module(Uy, [c[1] for c in U], V, dU) is None  # (8,) vs (2, 8)
    assert sweeps.small_transport_module(Uy, U, V, dU[:3] + [dU[3][..., :1, :]]) is None
    M2 = FixedTTRank((20, 20, 20), 17)
    p2 = torch.Tensor(M2.random(16, M2.size, dtype=F64, generator=torch.Generator().manual_seed(0)))
    c2 = cores_of(M2, p2)
    assert sweeps.small_transport_module(c2, c2, sweeps.right_cores(c2), c2) is None


# --- the projection given the points' right cores (the loss's inner(T, A)) ---

@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape,ranks,R", [((4, 5, 3, 4), (1, 2, 3, 2, 1), 3), ((3, 6), 3, 2),
                                           ((20, 20, 20), 10, 7)])
def test_projection_with_given_right_cores(dense_module, monkeypatch, dtype, shape, ranks, R):
    """``project_batch_small`` given the canonical right cores (no LQ sweep) equals the
    kernel's own sweep and the torch path (same points: the deltas compared), for a
    batch of Z and for one Z for all points; a V of another shape is refused."""
    M, x, _, _ = case(shape, ranks, (19,), dtype, seed=11)
    U = cores_of(M, x)
    V = sweeps.right_cores(U)
    g = torch.Generator().manual_seed(12)
    for zb in ((19,), ()):
        Z = TT.random(shape, R, dtype=F64, generator=g, batch=zb).cores
        Z = [z.to(dtype) for z in Z]
        got = compiled_dense.project_batch_small(dense_module, U, V, Z, packed=True, gauge=True)
        own = compiled_dense.project_batch_small(dense_module, U, None, Z, packed=True, gauge=True)
        ref = torch_path(monkeypatch, lambda: sweeps.project_tt(U, V, Z, packed=True, gauge=True))
        assert rel_err(got, own) < TOL[dtype] and rel_err(got, ref) < 10 * TOL[dtype]
    with pytest.raises(RuntimeError, match="V: core 1 differs"):
        dense_module.project_batch_small(U, [z.expand((19,) + z.shape) for z in Z], True, 19,
                                         "", [V[1][..., :1, :].contiguous()] + V[2:])


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_loss_projection_takes_the_kept_right_cores(dense_module, monkeypatch, dtype):
    """The loss's ``inner(T, A)`` of ``unpack_tensor`` of a batch passes the tangent TT's
    right cores to the kernel (its LQ sweep skipped; float32 at these ranks keeps the
    sweep: ``SMALL_PROJECT_V_MIN_RANK_F32``); value and gradient as the torch path."""
    from ttmanifold import inner, kernels

    seen = []

    class Rec:
        def __getattr__(self, name):
            fn = getattr(dense_module, name)
            if name != "project_batch_small":
                return fn

            def call(*a, **k):
                seen.append(len(a[5]) if len(a) > 5 else 0)
                return fn(*a, **k)
            return call

    M, x, _, _ = case((4, 5, 3, 4), (1, 2, 3, 2, 1), (16,), dtype, seed=13)
    A = TT.random(M.shape, 3, dtype=F64, generator=torch.Generator().manual_seed(14), batch=(16,))
    A = TT([c.to(dtype) for c in A.cores])

    def run():
        q = x.clone().requires_grad_()
        val = inner(M.unpack_tensor(q), A)
        val.sum().backward()
        return val.detach(), q.grad

    with monkeypatch.context() as m:
        m.setattr(kernels._SETS["dense"], "module", Rec())
        m.setitem(kernels._config, "enabled", True)
        val, grad = run()
    assert seen == [M.d - 1 if dtype == F64 else 0]
    val0, grad0 = torch_path(monkeypatch, run)
    assert rel_err(val, val0) < TOL[dtype] and rel_err(grad, grad0) < TOL[dtype]
