"""The inner-product sweep with its one-sweep backward, and sums kept as their terms
(``inner`` and ``norm`` of ``x - y`` from the inner products of the terms), against dense
float64 references; float32 accuracy of norms of near-equal TTs."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ttmanifold as tm
from ttmanifold import TT, inner

F64 = torch.float64


def _rand(shape, r, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return TT.random(shape, r, dtype=dtype, generator=g)


def _leaf(x: TT):
    cs = [c.detach().clone().requires_grad_() for c in x.cores]
    return cs, TT(cs)


def _dense_grads(fn, xs):
    """Gradients of ``fn`` of the dense tensors of TTs built from leaf copies."""
    leaves = [[c.detach().clone().requires_grad_() for c in x.cores] for x in xs]
    val = fn(*[TT(cs).full() for cs in leaves])
    gs = torch.autograd.grad(val, [c for cs in leaves for c in cs])
    return val.detach(), gs


# ---------------------------------------------------------------------------------------
# the inner-product sweep under autograd
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("same", [True, False])
def test_inner_values_and_gradients_match_dense(same):
    x = _rand((3, 4, 2, 5), (1, 2, 4, 3, 1), 0)
    y = x if same else _rand((3, 4, 2, 5), 3, 1)
    cx, tx = _leaf(x)
    if same:
        val = inner(tx, tx)
        ref, gref = _dense_grads(lambda a: (a * a).sum(), [x])
        got = torch.autograd.grad(val, cx)
    else:
        cy, ty = _leaf(y)
        val = inner(tx, ty)
        ref, gref = _dense_grads(lambda a, b: (a * b).sum(), [x, y])
        got = torch.autograd.grad(val, cx + cy)
    assert val.grad_fn is not None and "GramSweep" in type(val.grad_fn).__name__
    assert abs(float(val) - float(ref)) <= 1e-13 * max(1.0, abs(float(ref)))
    for a, b in zip(got, gref):
        assert torch.allclose(a, b, atol=1e-13, rtol=1e-12)


def test_inner_one_side_requires_grad():
    x, y = _rand((4, 3, 3), 2, 2), _rand((4, 3, 3), 3, 3)
    cy, ty = _leaf(y)
    got = torch.autograd.grad(inner(x, ty), cy)
    _, gref = _dense_grads(lambda a, b: (a * b).sum(), [x, y])
    for a, b in zip(got, gref[len(x.cores):]):
        assert torch.allclose(a, b, atol=1e-13)


def test_inner_gradcheck_and_second_derivatives():
    x, y = _rand((2, 3, 2), 2, 4), _rand((2, 3, 2), (1, 2, 3, 1), 5)
    cx, _ = _leaf(x)
    cy, _ = _leaf(y)
    d = len(cx)

    def f2(*cs):
        return inner(TT(list(cs[:d]), check=False), TT(list(cs[d:]), check=False))

    def f1(*cs):
        t = TT(list(cs), check=False)
        return inner(t, t)

    assert torch.autograd.gradcheck(f2, cx + cy)
    assert torch.autograd.gradgradcheck(f2, cx + cy)
    assert torch.autograd.gradcheck(f1, cx)
    assert torch.autograd.gradgradcheck(f1, cx)


# ---------------------------------------------------------------------------------------
# sums kept as their terms
# ---------------------------------------------------------------------------------------
def test_sum_behaves_like_its_block_cores():
    x, y, z = _rand((3, 4, 5), 2, 6), _rand((3, 4, 5), 3, 7), _rand((3, 4, 5), 1, 8)
    s = x + y - z
    dense = x.full() + y.full() - z.full()
    assert s.ranks == (1, 6, 6, 1) and s.shape == (3, 4, 5) and s.batch_shape == ()
    assert s.num_params == sum(c.numel() for c in s.cores)
    assert torch.allclose(s.full(), dense, atol=1e-14)
    for c in (copy.deepcopy(s), pickle.loads(pickle.dumps(s)), (2 * s) / 2):
        assert torch.allclose(c.full(), dense, atol=1e-14)
    assert "ranks=(1, 6, 6, 1)" in repr(x + y - z)
    # the block cores are those of nested sums of the terms, in order
    old = tm.tt.tensor_train._add_dense(tm.tt.tensor_train._add_dense(x, y), -z)
    for a, b in zip(s.cores, old.cores):
        assert torch.equal(a, b)


def test_sum_inner_and_norm_match_dense_with_gradients():
    x, y, a = _rand((3, 4, 2, 3), 3, 9), _rand((3, 4, 2, 3), 2, 10), _rand((3, 4, 2, 3), 2, 11)
    cx, tx = _leaf(x)
    cy, ty = _leaf(y)
    s = tx - ty
    val = 0.5 * s.norm() ** 2 + inner(s, a) + 0.3 * s.norm()
    ref, gref = _dense_grads(
        lambda p, q: 0.5 * ((p - q) ** 2).sum() + ((p - q) * a.full()).sum()
        + 0.3 * torch.linalg.vector_norm(p - q), [x, y])
    got = torch.autograd.grad(val, cx + cy)
    assert abs(float(val) - float(ref)) <= 1e-13
    for g1, g2 in zip(got, gref):
        assert torch.allclose(g1, g2, atol=1e-13)


def test_sum_norm_takes_no_qr_sweep_without_cancellation(monkeypatch):
    """The point of the structured sum: the norm of ``x - a`` (no cancellation) is read from
    the Gram sweeps of the terms, the QR sweep of the rank-(r_x + r_a) cores is skipped."""
    x, a = _rand((4, 5, 4, 3), 3, 12), _rand((4, 5, 4, 3), 3, 13)
    cx, tx = _leaf(x)
    calls = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *ar, **kw: calls.append(1) or qr(*ar, **kw))
    n = (tx - a).norm()
    torch.autograd.grad(n, cx)
    with torch.no_grad():
        n0 = (tx - a).norm()
    assert not calls
    ref = torch.linalg.vector_norm(x.full() - a.full())
    assert abs(float(n) - float(ref)) <= 1e-14 and float(n0) == float(n)
    # near-equal terms: the QR sweep gives the value
    (tx - (tx + 1e-9 * a)).norm()
    assert calls


@pytest.mark.parametrize("grad", [False, True])
def test_float32_norm_of_near_equal_tts(grad):
    """||x - y|| for y = x + tiny z in float32: relative accuracy of a float32 QR sweep
    (the Gram expansion <x,x> - 2<x,y> + <y,y> would lose every digit), with and without
    autograd; the gradient against the float64 dense one."""
    x, z = _rand((4, 5, 3, 4), 3, 14), _rand((4, 5, 3, 4), 2, 15)
    for t in (1e-3, 1e-5):
        y64 = x + t * z
        ref = float(torch.linalg.vector_norm(x.full() - y64.full()))
        x32 = x.to(torch.float32)
        y32 = TT([c.to(torch.float32) for c in (x + t * z).cores])  # its rounding included
        ref32 = float(torch.linalg.vector_norm(x32.to(F64).full() - y32.to(F64).full()))
        with torch.set_grad_enabled(grad):
            cx, tx = _leaf(x32)
            n = (tx - y32).norm()
        # absolute error at the rounding of x (the expansion <x,x> - 2<x,y> + <y,y> would
        # give an error near sqrt(eps) ||x||)
        eps = torch.finfo(torch.float32).eps
        assert abs(float(n) - ref32) <= 20 * eps * float(x.norm()), (t, float(n), ref32)
        assert abs(ref32 - ref) <= 1e-2 * ref
        if grad:
            (gx,) = torch.autograd.grad(n, cx[:1])
            _, gref = _dense_grads(lambda p, q: torch.linalg.vector_norm(p - q),
                                   [x32.to(F64), y32.to(F64)])
            # the gradient's rounding grows like eps ||x|| / ||x - y||: the sweep of the
            # concatenated cores (taken for near-equal terms) stays within 500x that; the
            # sum of the terms' own sweeps would not (about 1000x here)
            err = float(torch.linalg.vector_norm(gx.double() - gref[0]))
            err /= float(torch.linalg.vector_norm(gref[0]))
            assert err <= 500 * eps * float(x.norm()) / ref32, (t, err)


def test_sum_is_frozen_once_its_cores_are_read():
    """After its cores are handed out, a sum is the plain TT of those cores: in-place
    changes and requires_grad_ on them are seen by inner and norm."""
    x, y = _rand((3, 4, 3), 2, 16), _rand((3, 4, 3), 2, 17)
    s = x + y
    s.cores[0].mul_(2.0)
    ref = torch.linalg.vector_norm(s.full())
    assert abs(float(s.norm()) - float(ref)) <= 1e-13
    assert abs(float(inner(s, s)) - float(ref) ** 2) <= 1e-12
    # cores first read under no_grad keep their graph (they are cached)
    cx, tx = _leaf(x)
    s1 = tx + y
    with torch.no_grad():
        s1.norm()
    (g1,) = torch.autograd.grad(inner(s1, y), cx[:1])
    _, gref = _dense_grads(lambda p: ((p + y.full()) * y.full()).sum(), [x])
    assert torch.allclose(g1, gref[0], atol=1e-13)
    s2 = (x + y).requires_grad_()
    (g,) = torch.autograd.grad(s2.norm(), s2.cores[:1])
    assert g.shape == s2.cores[0].shape


def test_many_terms_and_batches_use_block_cores():
    xs = [_rand((3, 3, 3), 1, 20 + i) for i in range(6)]
    s = xs[0]
    for x in xs[1:]:
        s = s + x
    ref = sum(x.full() for x in xs)
    assert torch.allclose(s.full(), ref, atol=1e-14)
    assert abs(float(s.norm()) - float(torch.linalg.vector_norm(ref))) <= 1e-13
    b = TT.random((3, 3, 3), 2, dtype=F64, batch=(2,))
    assert type(b + b) is TT and torch.allclose((b + b).full(), 2 * b.full())


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(2, 4), min_size=2, max_size=4), st.integers(1, 3),
       st.integers(1, 3), st.integers(0, 10 ** 6))
def test_property_sum_inner_and_norm(shape, ra, rb, seed):
    x, y, w = _rand(shape, ra, seed), _rand(shape, rb, seed + 1), _rand(shape, 2, seed + 2)
    cx, tx = _leaf(x)
    s = tx - 0.5 * y + w
    dense = x.full() - 0.5 * y.full() + w.full()
    val = s.norm() + inner(s, w)
    ref = torch.linalg.vector_norm(dense) + (dense * w.full()).sum()
    assert abs(float(val) - float(ref)) <= 1e-12 * (1 + abs(float(ref)))
    (g,) = torch.autograd.grad(val, cx[-1:])
    _, gref = _dense_grads(lambda p: torch.linalg.vector_norm(p - 0.5 * y.full() + w.full())
                           + ((p - 0.5 * y.full() + w.full()) * w.full()).sum(), [x])
    assert torch.allclose(g, gref[-1], atol=1e-12)


def test_float32_norm_of_a_sum_without_cancellation():
    """Independent x and a in float32: the norm (value and gradient) read from the terms'
    inner products has the accuracy of a single float32 sweep."""
    x, a = _rand((4, 5, 3, 4), 3, 30), _rand((4, 5, 3, 4), 2, 31)
    x32, a32 = x.to(torch.float32), a.to(torch.float32)
    cx, tx = _leaf(x32)
    n = (tx - a32).norm()
    ref, gref = _dense_grads(lambda p, q: torch.linalg.vector_norm(p - q),
                             [x32.to(F64), a32.to(F64)])
    eps = torch.finfo(torch.float32).eps
    assert abs(float(n) - float(ref)) <= 20 * eps * float(ref)
    (g,) = torch.autograd.grad(n, cx[:1])
    assert float(torch.linalg.vector_norm(g.double() - gref[0])) <= 50 * eps * float(
        torch.linalg.vector_norm(gref[0]))


def test_sum_with_one_varying_term_gradcheck():
    """``||x - a + b||`` with only x varying takes the one-against-the-terms sweep (one
    node for <x, x>, <x, a>, <x, b>); first and second derivatives against finite
    differences, value and gradient against the dense reference."""
    x, a, b = _rand((2, 3, 2, 2), 2, 40), _rand((2, 3, 2, 2), 2, 41), _rand((2, 3, 2, 2), 1, 42)
    a, b = 0.5 * a, 0.2 * b  # no strong cancellation: the terms' inner products are used
    cx, tx = _leaf(x)
    d = len(cx)

    def f(*cs):
        s = TT(list(cs[:d]), check=False) - a + b
        return 0.5 * inner(s, s) + s.norm()

    val = f(*cx)
    names, seen, stack = set(), set(), [val.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and id(fn) not in seen:
            seen.add(id(fn))
            names.add(type(fn).__name__)
            stack.extend(nf for nf, _ in fn.next_functions)
    assert "_OneVsSumBackward" in names
    ref, gref = _dense_grads(lambda p: 0.5 * ((p - a.full() + b.full()) ** 2).sum()
                             + torch.linalg.vector_norm(p - a.full() + b.full()), [x])
    assert abs(float(val) - float(ref)) <= 1e-13
    for g1, g2 in zip(torch.autograd.grad(val, cx), gref):
        assert torch.allclose(g1, g2, atol=1e-13)
    assert torch.autograd.gradcheck(f, cx)
    assert torch.autograd.gradgradcheck(f, cx)


# ---------------------------------------------------------------------------------------
# the compiled sweeps (kernel set "dense": inner, one_vs_blocks and its backward)
# ---------------------------------------------------------------------------------------
class _Spy:
    """A compiled module that records which of its functions were called."""

    def __init__(self, mod):
        self._mod, self.calls = mod, []

    def __getattr__(self, attr):
        f = getattr(self._mod, attr)

        def call(*a, **k):
            self.calls.append(attr)
            return f(*a, **k)

        return call


@pytest.fixture
def dense_spy(monkeypatch):
    """The compiled dense kernels (built or loaded from the cache) behind a spy."""
    from ttmanifold import kernels

    kernels.build("dense", verbose=False)
    mod = kernels.module("dense")
    if mod is None:
        pytest.skip(f"compiled dense kernels unavailable: {kernels.status()['dense']}")
    spy = _Spy(mod)
    monkeypatch.setattr(kernels._SETS["dense"], "module", spy)
    monkeypatch.setitem(kernels._config, "enabled", True)
    return spy


_GRAM_CASES = [((3, 4, 2, 5), [(1, 2, 4, 3, 1), 3, 1]),
               ((4, 3), [2, 1, 3]),
               ((2, 3, 2, 2, 3), [(1, 2, 5, 4, 3, 1), 2, (1, 1, 3, 2, 2, 1), 4])]


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape,ranks", _GRAM_CASES)
def test_compiled_gram_sweeps_match_dense(dense_spy, shape, ranks, dtype):
    """The compiled forward (values and environments) and backward of the one-against-the-
    terms sweep, and the compiled inner, against the dense float64 values and gradients
    and against the torch sweeps."""
    tt_mod = tm.tt.tensor_train
    ts = [_rand(shape, r, 60 + i) for i, r in enumerate(ranks)]
    k = len(ts)
    cores = [c.to(dtype) for t in ts for c in t.cores]
    g = torch.randn(k, dtype=F64, generator=torch.Generator().manual_seed(7))
    from ttmanifold.kernels import dense as compiled_dense

    vals, ws = compiled_dense.one_vs_blocks(dense_spy, k, cores, True)
    dxs = compiled_dense.one_vs_blocks_backward(dense_spy, k, cores, ws, g.to(dtype))
    tvals, tws = tt_mod._one_vs_blocks.torch_impl(k, cores, True)
    tdxs = tt_mod._one_vs_blocks_backward.torch_impl(k, cores, tws, g.to(dtype))
    # dense float64 reference: values <x, t_j> and d/dx sum_j g_j <x, t_j> (t_0 = x)
    fulls = [TT([c.to(F64) for c in t.cores]).full() for t in ts]
    x0 = fulls[0].clone().requires_grad_()
    ref = torch.stack([(x0 * x0).sum()] + [(x0 * f).sum() for f in fulls[1:]])
    (gref,) = torch.autograd.grad((ref * g).sum(), x0)
    pairs = torch.stack([(fulls[i] * fulls[j]).sum() for i in range(1, k) for j in range(i, k)])
    ref = torch.cat([ref.detach(), pairs])
    # the gradient cores, mapped to the dense tensor: the derivative along each core
    xs = [c.to(F64) for c in ts[0].cores]
    tol = 1e-12 if dtype == F64 else 3e-5
    scale = float(ref.abs().max())
    assert float((vals.double() - ref.detach()).abs().max()) <= tol * scale
    assert float((tvals.double() - vals.double()).abs().max()) <= tol * scale
    for w, tw in zip(ws, tws):
        assert torch.allclose(w.double(), tw.double(), atol=tol * scale, rtol=tol)
    d = len(xs)
    for m in range(d):  # <dx_m, e> = directional derivative along core m: dense check
        e = torch.randn(xs[m].shape, dtype=F64, generator=torch.Generator().manual_seed(m))
        de = TT(xs[:m] + [e] + xs[m + 1:]).full()
        want = float((gref * de).sum())
        got = float((dxs[m].double() * e).sum())
        assert abs(got - want) <= tol * max(1.0, float(gref.norm() * de.norm()))
        assert torch.allclose(dxs[m].double(), tdxs[m].double(), atol=tol * float(
            tdxs[m].abs().max()), rtol=tol)
    a, b = TT([c.to(dtype) for c in ts[1].cores]), TT([c.to(dtype) for c in ts[-1].cores])
    got = inner(a, b)
    assert "inner" in dense_spy.calls
    assert abs(float(got) - float((fulls[1] * fulls[-1]).sum())) <= tol * scale


def test_compiled_one_vs_sum_gradcheck(dense_spy):
    """``<s, s>`` of ``s = x - a + b`` (only x varying) through the compiled sweeps:
    gradcheck of the first derivatives, the second by the differentiable torch backward,
    and the same gradient as the torch sweeps."""
    from ttmanifold import kernels

    x, a, b = _rand((2, 3, 2, 2), 2, 50), _rand((2, 3, 2, 2), 2, 51), _rand((2, 3, 2, 2), 1, 52)
    a, b = 0.5 * a, 0.2 * b
    cx, _ = _leaf(x)
    d = len(cx)

    def f(*cs):
        s = TT(list(cs[:d]), check=False) - a + b
        return s.norm() ** 2

    assert torch.autograd.gradcheck(f, cx)
    assert {"one_vs_blocks", "one_vs_blocks_backward"} <= set(dense_spy.calls)
    assert torch.autograd.gradgradcheck(f, cx)
    got = torch.autograd.grad(f(*cx), cx)
    kernels.set_enabled(False)
    try:
        ref = torch.autograd.grad(f(*cx), cx)
    finally:
        kernels.set_enabled(True)
    for g1, g2 in zip(got, ref):
        assert torch.allclose(g1, g2, atol=1e-14, rtol=1e-12)


def test_gram_sweeps_on_meta_and_under_compile():
    """Meta tensors and torch.compile take the torch sweeps (shapes only / traced)."""
    x = TT([torch.empty(c.shape, device="meta") for c in _rand((3, 4, 2), 2, 1).cores])
    assert inner(x, x).shape == ()
    a = _rand((3, 4, 2), 2, 2)
    y = _rand((3, 4, 2), 3, 3)
    fn = torch.compile(lambda *cs: inner(TT(list(cs), check=False), a), fullgraph=True,
                       backend="eager")
    assert abs(float(fn(*y.cores)) - float((y.full() * a.full()).sum())) <= 1e-13


def test_tt_core_check_names_the_core_and_allows_huge_finite_cores():
    """The core check (one sum per core on the CPU, then the per-core test) names the
    first non-finite core, catches +Inf and -Inf in different cores, and does not reject
    finite cores whose sum overflows."""
    cs = _rand((3, 4, 2, 5), 2, 9, torch.float32).cores
    for k, bad in [(2, float("nan")), (0, float("inf"))]:
        c2 = [c.clone() for c in cs]
        c2[k][0, 1, 0] = bad
        with pytest.raises(RuntimeError, match=rf"cores\[{k}\]: contains NaN or Inf"):
            TT(c2)
    c2 = [c.clone() for c in cs]
    c2[1][0, 0, 0], c2[3][0, 0, 0] = float("inf"), -float("inf")
    with pytest.raises(RuntimeError, match=r"cores\[1\]: contains NaN or Inf"):
        TT(c2)
    huge = [torch.full_like(c, 3e38) for c in cs]  # each sum overflows float32
    assert TT(huge).ranks == TT(cs).ranks


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_compiled_all_finite_matches_torch(dense_spy, dtype):
    """The compiled finiteness test of a TT's cores: False for NaN, +-Inf anywhere (also in
    the tail after the vector lanes), True for finite cores however large; TT() uses it."""
    from ttmanifold.kernels import dense as compiled_dense

    tt_mod = tm.tt.tensor_train
    cs = [c.to(dtype) for c in _rand((3, 5, 7, 2), 3, 11).cores]
    assert compiled_dense.all_finite(dense_spy, cs) and tt_mod._cores_finite.torch_impl(cs)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for k, idx in [(0, (0, 2, 2)), (2, (1, 6, 1)), (2, (2, 3, 0)), (3, (1, 1, 0))]:
            c2 = [c.clone() for c in cs]
            c2[k][idx] = bad
            assert not compiled_dense.all_finite(dense_spy, c2)
            assert not tt_mod._cores_finite.torch_impl(c2)
    big = torch.finfo(dtype).max / 2
    huge = [torch.full_like(c, big) for c in cs]
    assert compiled_dense.all_finite(dense_spy, huge)
    dense_spy.calls.clear()
    TT(cs)
    assert "all_finite" in dense_spy.calls
