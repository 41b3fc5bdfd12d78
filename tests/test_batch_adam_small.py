"""The batched optimizer step at small TT-ranks (issue 12): ``retr_transp`` and ``transp``
of a CPU batch of TT-rank <= 4 run the compiled small-rank kernels over the whole batch
(``retract_batch_small``, then ``transport_batch_small``: the projection of the transported
vector's rank-2r block cores at the new points, assembled in cache). Checked against the torch batch path and against dense
float64 references (the TT-SVD of ``X + xi``, the orthogonal projector of the tangent space
at the new point) as full tensors; non-finite vectors raise on every path; geoopt's
RiemannianAdam on one ManifoldParameter holding a batch follows B independent runs."""
from __future__ import annotations

import geoopt
import pytest
import torch

from ttmanifold import TT, FixedTTRank, inner
from ttmanifold.manifold.tangent import TangentTT
from test_manifold_batch import dense_point, dense_tangent, tangent_projector, tt_svd
from kernel_checks import torch_path

F64, F32 = torch.float64, torch.float32
# uneven ranks and modes, every unfolding tall enough for the small-rank retraction
SHAPE, RANKS = (4, 5, 3, 4), (1, 2, 3, 2, 1)
B = 16  # the kernels' smallest batch (SMALL_RETRACT_MIN_BATCH, SMALL_PROJECT_MIN_BATCH)
TOL = {F64: 1e-10, F32: 2e-4}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def spy(record_dense):
    """The dense set's module recording its small-rank batch kernels' calls."""
    return record_dense(("retract_batch_small", "project_batch_small", "transport_batch_small"))


def case(dtype, seed=0, gauged_v=True):
    M = FixedTTRank(SHAPE, RANKS)
    g = torch.Generator().manual_seed(seed)
    p = torch.Tensor(M.random(B, dtype=F64, generator=g))
    u = M.project(p, TT.random(SHAPE, 2, dtype=F64, generator=g, batch=(B,)))
    u = 0.3 * u / M.norm(p, u, keepdim=True)
    v = torch.randn(p.shape, dtype=F64, generator=g)
    if gauged_v:
        v = M.proju(p, v)
    return M, p.to(dtype), u.to(dtype), v.to(dtype)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("gauged_v", [True, False], ids=["gauged", "non-gauged"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_retr_transp_small_against_torch_path_and_dense(spy, monkeypatch, dtype, gauged_v):
    M, p, u, v = case(dtype, seed=1, gauged_v=gauged_v)
    spy.calls.clear()
    y, t = M.retr_transp(p, u, v)
    assert spy.calls == ["retract_batch_small", "transport_batch_small"]
    assert not y.is_inference() and not t.is_inference()
    y0, t0 = torch_path(monkeypatch, lambda: M.retr_transp(p, u, v))
    assert spy.calls == ["retract_batch_small", "transport_batch_small"]  # (none on torch's)
    # the transport at the same point by the plain transp (kernels too)
    assert rel(M.transp(p, y, v), t) < TOL[dtype]
    for b in (0, 7, B - 1):
        Y = dense_point(M, y[b])
        assert rel(Y, dense_point(M, y0[b])) < TOL[dtype]
        assert rel(dense_tangent(M, y[b], t[b]), dense_tangent(M, y0[b], t0[b])) < TOL[dtype]
        # dense float64 references: round_r(X + xi) and P_Y(v at x)
        ref = dense_point(M, p[b]) + dense_tangent(M, p[b], u[b])
        assert rel(Y, dense_point(M, torch.cat([c.reshape(-1) for c in tt_svd(ref, M.ranks)]))
                   ) < 10 * TOL[dtype]
        P = tangent_projector(Y, M.ranks)
        tv = (P @ dense_tangent(M, p[b], v[b]).reshape(-1)).reshape(SHAPE)
        assert rel(dense_tangent(M, y[b], t[b]), tv) < 10 * TOL[dtype]


def test_transp_small_and_broadcast_vector(spy, monkeypatch):
    """``transp`` of a batch: one projection call; one vector for the whole batch of
    points broadcasts as on the torch path."""
    M, p, u, v = case(F64, seed=2)
    y = M.retr(p, u)
    spy.calls.clear()
    for w in (v, v[3]):
        t = M.transp(p, y, w)
        assert spy.calls == ["transport_batch_small"] and t.shape == p.shape
        spy.calls.clear()
        assert rel(t, torch_path(monkeypatch, lambda: M.transp(p, y, w))) < 1e-12


@pytest.mark.parametrize("where", ["kernels", "torch", "one point", "grad"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_v_raises(spy, monkeypatch, where, bad):
    """A NaN or Inf anywhere in ``v`` (first, middle, last core) raises in ``retr_transp``
    and ``transp`` on the kernels' path, the torch batch path, for one point and for a
    ``v`` that requires grad (the projection's kernel declines it: torch's sweeps); it used
    to give a NaN transported vector silently in ``retr_transp``."""
    M, p, u, v = case(F64, seed=3)
    if where == "one point":
        p, u, v = p[0], u[0], v[0]
    y = M.retr(p, u)
    for i in (0, M.size // 2, M.size - 1):
        w = v.clone()
        w[..., i] = bad
        w.requires_grad_(where == "grad")
        for call in (lambda: M.retr_transp(p, u, w), lambda: M.transp(p, y, w)):
            with pytest.raises(RuntimeError, match="^v: contains NaN or Inf"):
                if where == "torch":
                    torch_path(monkeypatch, call)
                else:
                    call()
    # a non-finite point or step still fails the retraction first
    if where == "kernels":
        w = u.clone()
        w[..., 5] = bad
        with pytest.raises(RuntimeError, match="^retr: "):
            M.retr_transp(p, w, v)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_adam_on_a_small_rank_batch_equals_independent_runs(spy, dtype):
    """geoopt's RiemannianAdam on one ManifoldParameter holding B points (the kernels'
    path: the loss's inner product with a batch of TTs projected by the small-rank kernel,
    its right cores kept for the step) gives the iterates of B independent single-point
    runs, to rounding."""
    M, p, _, _ = case(dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    A = TT.random(SHAPE, 3, dtype=F64, generator=g, batch=(B,))
    A = TT([2.0 * c.to(dtype) for c in A.cores])

    def loss(T, a):
        return 0.5 * inner(T, T) - inner(T, a)

    pb = geoopt.ManifoldParameter(p.clone(), manifold=M)
    opt_b = geoopt.optim.RiemannianAdam([pb], lr=0.05)
    singles = [geoopt.ManifoldParameter(p[b].clone(), manifold=M) for b in range(B)]
    opts = [geoopt.optim.RiemannianAdam([s], lr=0.05) for s in singles]
    for _ in range(6):
        spy.calls.clear()
        opt_b.zero_grad()
        loss(pb.unpack_tensor(), A).sum().backward()
        assert spy.calls == ["project_batch_small"]  # <T, A>: the kernel recomputes V
        spy.calls.clear()
        opt_b.step()
        assert spy.calls == ["retract_batch_small", "transport_batch_small"]
        for b in range(B):
            opts[b].zero_grad()
            loss(singles[b].unpack_tensor(), A[b]).backward()
            opts[b].step()
    tol = 1e-10 if dtype == F64 else 5e-4
    for b in range(B):
        assert rel(dense_point(M, pb[b]), dense_point(M, singles[b])) < tol, b
    assert M.check_point_on_manifold(pb.detach())


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_loss_inner_on_the_kernel_value_and_gradient(spy, monkeypatch, dtype):
    """``inner(T, A)`` of the loss's tangent TT (``unpack_tensor`` of a batch) with a batch
    of TTs runs on the small-rank projection kernel: values against the dense float64
    ``<X, A>``, ``p.grad`` against the torch path. A TangentTT whose right cores are not
    the canonical ones (signs flipped) keeps the torch projection (the kernel would
    recompute the canonical ones)."""
    M, p, _, _ = case(dtype, seed=6)
    g = torch.Generator().manual_seed(7)
    A = TT.random(SHAPE, 3, dtype=F64, generator=g, batch=(B,))
    A = TT([c.to(dtype) for c in A.cores])

    def run():
        q = p.clone().requires_grad_()
        val = inner(M.unpack_tensor(q), A)
        val.sum().backward()
        return val.detach(), q.grad

    spy.calls.clear()
    val, grad = run()
    assert spy.calls == ["project_batch_small"]
    val0, grad0 = torch_path(monkeypatch, run)
    ref = torch.stack([(dense_point(M, p[b]) * A[b].full().double()).sum() for b in range(B)])
    assert rel(val.double(), ref) < TOL[dtype] and rel(grad, grad0) < TOL[dtype]
    # non-canonical right cores: the same tangent vector, the torch projection
    T = M.unpack_tensor(p.clone().requires_grad_())
    (U, V), flat = T.point_cores, T._flat.detach()
    flip = [None] + [-v for v in V[1:]]  # V_>k -> (-1)^(d-k) V_>k: deltas follow
    sign = torch.cat([torch.full((c.shape[-3] * c.shape[-2] * c.shape[-1],),
                                 float((-1) ** (M.d - 1 - k)), dtype=dtype)
                      for k, c in enumerate(U)])
    Tf = TangentTT(U, flip, None, flat=flat * sign, gauged=True)
    spy.calls.clear()
    assert rel(inner(Tf, A).double(), ref) < TOL[dtype] and spy.calls == []


def test_egrad2rgrad_of_a_batch_is_a_plain_new_tensor(monkeypatch):
    """Under geoopt's no_grad the gradient of a ManifoldParameter batch comes back as an
    ordinary tensor without a graph (not an inference tensor, never an alias of ``u``),
    equal to the torch path's."""
    M, p, _, _ = case(F64, seed=8)
    par = geoopt.ManifoldParameter(p.clone(), manifold=M)
    u = torch.randn(p.shape, dtype=F64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        r = M.egrad2rgrad(par, u)
        r0 = torch_path(monkeypatch, lambda: M.egrad2rgrad(par, u))
    assert not r.requires_grad and r.grad_fn is None and not r.is_inference()
    assert r.data_ptr() != u.data_ptr() and rel(r, r0) < 1e-13
    r.add_(1.0)  # writable


def test_chunked_retr_transp_takes_the_loss_right_cores(monkeypatch):
    """Above the small-rank kernels (here TT-rank 4 with a bond of 5, B = 7) a CPU batch runs
    ``retr_transp`` in chunks: the right cores the loss computed (``unpack_tensor``) serve
    every chunk (no LQ sweep per chunk), the results are the unchunked ones and ordinary
    tensors (no copy out of inference mode needed)."""
    from ttmanifold.manifold import fixed_rank as FR

    M = FixedTTRank(SHAPE, (1, 4, 5, 4, 1))
    g = torch.Generator().manual_seed(10)
    p = torch.Tensor(M.random(7, dtype=F64, generator=g))
    u = M.project(p, TT.random(SHAPE, 2, dtype=F64, generator=g, batch=(7,)))
    v = M.proju(p, torch.randn(p.shape, dtype=F64, generator=g))
    monkeypatch.setattr(FR, "CPU_BATCH_CHUNK_BYTES", None)
    y0, t0 = M.retr_transp(p, u, v)
    sweeps_seen = []
    real = FR.right_cores
    monkeypatch.setattr(FR, "right_cores", lambda U: sweeps_seen.append(1) or real(U))
    monkeypatch.setattr(FR, "CPU_BATCH_CHUNK_BYTES", 3 * M.size * p.element_size())
    par = geoopt.ManifoldParameter(p.clone(), manifold=M)
    par.unpack_tensor()  # keeps the point's right cores for the step
    with torch.no_grad():
        y, t = M.retr_transp(par, u, v)
    assert sweeps_seen == [] and not M._right_memo
    assert not y.is_inference() and not t.is_inference() and not y.requires_grad
    assert rel(M.to_tt(y).full(), M.to_tt(y0).full()) < 1e-12 and rel(t, t0) < 1e-12
    y, t = M.retr_transp(p, u, v)  # nothing kept: one LQ sweep per chunk
    assert len(sweeps_seen) == 3 and rel(t, t0) < 1e-12
    # retr (RiemannianSGD's step) likewise
    sweeps_seen.clear()
    par.unpack_tensor()
    with torch.no_grad():
        y = M.retr(par, u)
    assert sweeps_seen == [] and not M._right_memo and not y.is_inference()
    assert rel(M.to_tt(y).full(), M.to_tt(y0).full()) < 1e-12


def test_retr_of_a_small_rank_batch_after_the_loss_takes_the_kernel(spy):
    """With right cores kept by the loss, ``retr`` of a small-rank batch still runs the
    small-rank kernel (its own LQ sweep is cheaper than torch's sweeps given them) and
    forgets them."""
    M, p, u, _ = case(F64, seed=11)
    y0 = M.retr(p, u)
    par = geoopt.ManifoldParameter(p.clone(), manifold=M)
    par.unpack_tensor()
    assert M._right_memo
    spy.calls.clear()
    with torch.no_grad():
        y = M.retr(par, u)
    assert spy.calls == ["retract_batch_small"] and not M._right_memo
    assert rel(M.to_tt(y).full(), M.to_tt(y0).full()) < 1e-12


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_retr_transp_wide_rank_batch(record_dense, monkeypatch, dtype):
    """Ranks 5-12: ``retr_transp`` of a batch runs the retraction of runtime width and the
    transport (the projection of the rank-2r block cores, 2r within the projection's bound
    for Z), each one call, against the torch path and the
    dense float64 references as full tensors."""
    spy = record_dense(("retract_batch_wide", "project_batch_small", "transport_batch_small"))
    M = FixedTTRank((10, 10, 10), 5)
    g = torch.Generator().manual_seed(3)
    p = torch.Tensor(M.random(B, dtype=F64, generator=g))
    u = M.project(p, TT.random(M.shape, 2, dtype=F64, generator=g, batch=(B,)))
    u = 0.3 * u / M.norm(p, u, keepdim=True)
    v = M.proju(p, torch.randn(p.shape, dtype=F64, generator=g))
    p, u, v = p.to(dtype), u.to(dtype), v.to(dtype)
    spy.calls.clear()
    y, t = M.retr_transp(p, u, v)
    assert spy.calls == ["retract_batch_wide", "transport_batch_small"]
    y0, t0 = torch_path(monkeypatch, lambda: M.retr_transp(p, u, v))
    for b in (0, B - 1):
        Y = dense_point(M, y[b])
        assert rel(Y, dense_point(M, y0[b])) < TOL[dtype]
        assert rel(dense_tangent(M, y[b], t[b]), dense_tangent(M, y0[b], t0[b])) < TOL[dtype]
        P = tangent_projector(Y, M.ranks)
        tv = (P @ dense_tangent(M, p[b], v[b]).reshape(-1)).reshape(M.shape)
        assert rel(dense_tangent(M, y[b], t[b]), tv) < 10 * TOL[dtype]
