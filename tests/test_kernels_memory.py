"""Large outputs without fresh-memory costs (``ttmanifold.kernels.memory``) and the batch
paths that use them: huge-page advice (values kept; small, non-CPU and meta tensors
untouched), the sliced batched dot, its autograd function in the tangent TT, the
block cores written in place, and one batched RiemannianAdam step with every large-batch
path forced on small sizes (against the per-point loop)."""
from __future__ import annotations

import os
import sys

import geoopt
import pytest
import torch

from ttmanifold import TT, FixedTTRank, inner
from ttmanifold.kernels import memory
from ttmanifold.manifold import tangent

F64 = torch.float64
linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
    reason="madvise(MADV_HUGEPAGE): Linux with transparent huge pages only")


@linux
def test_advise_huge_pages_on_a_large_cpu_tensor_keeps_values():
    t = torch.arange(3 << 20, dtype=F64)  # 24 MB
    ref = t.clone()
    assert memory.advise_huge_pages(t)
    assert torch.equal(t, ref)
    out = memory.empty_for_output((1 << 20, 3), F64)
    assert out.shape == (1 << 20, 3) and out.dtype == F64 and out.is_contiguous()
    out.copy_(ref.view(1 << 20, 3))
    assert torch.equal(out.view(-1), ref)


def test_advice_skips_small_meta_and_strided_tensors():
    assert not memory.advise_huge_pages(torch.ones(1000, dtype=F64))
    big_meta = torch.empty(1 << 24, dtype=F64, device="meta")
    assert not memory.advise_huge_pages(big_meta)
    out = memory.empty_for_output((1 << 24,), F64, "meta")
    assert out.device.type == "meta" and out.shape == (1 << 24,)
    assert not memory.advise_huge_pages(torch.ones(1 << 10, 1 << 10, dtype=F64).t())
    small = memory.empty_for_output((3, 4), torch.float32)
    assert small.shape == (3, 4) and small.dtype == torch.float32
    assert not memory.big_cpu_output(torch.empty(1 << 24, dtype=F64, device="meta"))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape", [(64, 20000), (3, 50), (7, 1)])
def test_packed_dot_matches_product_and_sum(shape, dtype):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(shape, dtype=dtype, generator=g) for _ in range(2))
    got = memory.packed_dot(a, b)
    assert torch.equal(got, (a * b).sum(-1))  # the same products and row reductions
    ref = (a.double() * b.double()).sum(-1)
    assert torch.allclose(got.double(), ref, rtol=1e-4 if dtype == torch.float32 else 1e-12,
                          atol=1e-3 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("same", [True, False])
def test_packed_dot_function_gradients(monkeypatch, same):
    monkeypatch.setattr(memory, "DOT_CHUNK_BYTES", 64)  # sliced forward on small inputs
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 40, dtype=F64, generator=g, requires_grad=True)
    b = a if same else torch.randn(5, 40, dtype=F64, generator=g, requires_grad=True)
    w = torch.randn(5, dtype=F64, generator=g)
    val = tangent._flat_dot(a, b)
    assert val.grad_fn is not None and "PackedDot" in type(val.grad_fn).__name__
    grads = torch.autograd.grad((val * w).sum(), [a] if same else [a, b])
    ref = torch.autograd.grad(((a * b).sum(-1) * w).sum(), [a] if same else [a, b])
    for x, y in zip(grads, ref):
        assert torch.allclose(x, y, rtol=0, atol=1e-14)
    # second order (create_graph): the backward is differentiable
    assert torch.autograd.gradcheck(lambda x, y: tangent._PackedDot.apply(x, y),
                                    (a.detach().clone().requires_grad_(),
                                     b.detach().clone().requires_grad_()))
    assert torch.autograd.gradgradcheck(lambda x: tangent._PackedDot.apply(x, None),
                                        (a.detach().requires_grad_(),))


def _dense_tangent(U, V, dU):
    """``sum_k U_<k dU_k V_>k`` of one point as a dense tensor (independent reference)."""
    d = len(U)
    total = 0
    for k in range(d):
        cores = [U[j] if j < k else dU[j] if j == k else V[j] for j in range(d)]
        total = total + TT([c.clone() for c in cores]).full()
    return total


def test_written_block_cores_match_dense_reference(monkeypatch):
    monkeypatch.setattr(tangent, "WRITTEN_CORES_MIN_BYTES", 0)
    M = FixedTTRank((3, 4, 2, 3), 2)
    g = torch.Generator().manual_seed(2)
    p = M.random(3, dtype=F64, generator=g)
    u = M.proju(p, torch.randn(3, M.size, dtype=F64, generator=g))
    U = M.split(p)
    from ttmanifold.manifold import right_cores
    V = right_cores(U)
    T = tangent.TangentTT(U, V, M.split(u), gauged=True)
    with torch.no_grad():
        cores = T.cores
    full = TT(cores).full()
    for b in range(3):
        ref = _dense_tangent([c[b] for c in U], [None] + [c[b] for c in V[1:]],
                             [c[b] for c in M.split(u)])
        assert torch.allclose(full[b], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_adam_step_with_large_batch_paths_forced_matches_per_point_loop(monkeypatch, dtype):
    """Every threshold at 0: the sliced dots and their autograd function, the written
    delta vector and block cores, huge-page outputs; one batched RiemannianAdam step of
    the benchmark's loss against B independent single-point steps."""
    monkeypatch.setattr(memory, "HUGE_PAGE_MIN_BYTES", 0)
    monkeypatch.setattr(memory, "DOT_CHUNK_BYTES", 64)
    monkeypatch.setattr(tangent, "WRITTEN_CORES_MIN_BYTES", 0)
    M = FixedTTRank((4, 3, 5, 3), 2)
    g = torch.Generator().manual_seed(3)
    B = 4
    p = M.random(B, dtype=dtype, generator=g)
    A = TT.random(M.shape, 3, dtype=dtype, generator=g, batch=(B,))

    def run(points, As):
        pars = [geoopt.ManifoldParameter(x.clone(), manifold=M) for x in points]
        opt = geoopt.optim.RiemannianAdam(pars, lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            for par, a in zip(pars, As):
                T = par.unpack_tensor()
                (0.5 * inner(T, T) - inner(T, a)).sum().backward()
            opt.step()
        return torch.stack([x.detach() for x in pars]) if len(pars) > 1 else pars[0].detach()

    batched = run([p], [A])
    loop = run(list(p.unbind(0)), [A[b] for b in range(B)])
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    Mt = M.to_tt
    for b in range(B):  # gauge invariant: the full tensors
        assert torch.allclose(Mt(batched[b]).full(), Mt(loop[b]).full(), rtol=0, atol=tol)


def test_batched_hvp_and_grad_with_large_batch_paths_forced_match_default(monkeypatch):
    """The packed-dot function under ``create_graph`` (Hessian-vector products) and the
    written delta vector give what the default (small-batch) paths give."""
    M = FixedTTRank((3, 4, 3), 2)
    g = torch.Generator().manual_seed(4)
    p = M.random(3, dtype=F64, generator=g)
    u = M.proju(p, torch.randn(3, M.size, dtype=F64, generator=g))
    A = TT.random(M.shape, 2, dtype=F64, generator=g, batch=(3,))

    def f(T):
        return inner(T, T) ** 2 - inner(T, A)

    ref = (M.riemannian_grad(p, f), M.riemannian_hvp(p, f, u))
    monkeypatch.setattr(memory, "HUGE_PAGE_MIN_BYTES", 0)
    monkeypatch.setattr(memory, "DOT_CHUNK_BYTES", 16)
    got = (M.riemannian_grad(p, f), M.riemannian_hvp(p, f, u))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_egrad2rgrad_batch_flags_nonfinite_not_overflow():
    M = FixedTTRank((4, 5, 4), 3)
    g = torch.Generator().manual_seed(5)
    p = M.random(20, dtype=F64, generator=g)
    u = torch.randn(20, M.size, dtype=F64, generator=g)
    ref = M.proju(p, u)
    assert torch.allclose(M.egrad2rgrad(p, u), ref, rtol=0, atol=1e-14)
    for val in (float("nan"), float("inf")):
        bad = u.clone()
        bad[7, 5] = val
        with pytest.raises(RuntimeError, match="u: gradient contains NaN or Inf"):
            M.egrad2rgrad(p, bad)
    huge = torch.full_like(u, torch.finfo(F64).max)  # finite, its projection overflows
    M.egrad2rgrad(p, huge)


@pytest.mark.parametrize("floor", [0, None])
def test_clone_for_output_is_a_contiguous_copy(monkeypatch, floor):
    if floor is not None:
        monkeypatch.setattr(memory, "HUGE_PAGE_MIN_BYTES", floor)
    base = torch.arange(6, dtype=F64).view(6, 1)
    wide = base.expand(6, 5)
    out = memory.clone_for_output(wide)
    assert out.is_contiguous() and torch.equal(out, wide)
    out[0, 0] = -1.0  # its own memory
    assert base[0, 0] == 0
    x = torch.ones(3, requires_grad=True)
    (memory.clone_for_output(x) * 2).sum().backward()  # differentiable as clone
    assert torch.equal(x.grad, torch.full((3,), 2.0))
