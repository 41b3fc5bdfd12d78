"""Batched TTs (issue 12): cores ``(*batch, r, n, r')``.

Every operation is compared with an independent dense float64 reference per TT of the
batch (plain einsum contractions and numpy-free torch SVDs, no ttmanifold code):
``full``, ``norm``, ``inner`` (elementwise and all pairs), sums, scalar multiples (one per
TT), ``gather``, ``orthogonalize``, ``round`` (caps and ``rel_eps``, one rank per bond
over the batch), indexing, ``stack``/``unbind``. Hypothesis varies shapes, ranks and batch
shapes.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttmanifold import TT, inner, orthogonalize
from ttmanifold import round as tt_round
from ttmanifold.tt import feasible_ranks
from ttmanifold.tt.tensor_train import pairwise_inner, stack

F64, F32 = torch.float64, torch.float32


def dense(cores):
    """Dense tensor of ONE TT from its cores (einsum chain)."""
    res = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    for c in cores[1:]:
        res = torch.einsum("ia,ajb->ijb", res, c).reshape(-1, c.shape[2])
    return res.reshape([int(c.shape[1]) for c in cores])


def dense_batch(x):
    """Dense tensors of a batched TT, ``batch_shape + shape``, one TT at a time."""
    bs = x.batch_shape
    flat = [c.reshape((-1,) + tuple(c.shape[-3:])) for c in x.cores]
    B = flat[0].shape[0]
    out = torch.stack([dense([c[b] for c in flat]) for b in range(B)])
    return out.reshape(bs + x.shape)


def rnd(shape, ranks, batch, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return TT.random(shape, ranks, dtype=dtype, generator=gen, batch=batch)


def close(a, b, tol):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


SHAPE = (3, 4, 5, 2)
R3 = (1, 3, 3, 2, 1)


def test_full_norm_inner_pairwise():
    x = rnd(SHAPE, (1, 2, 3, 2, 1), (2, 3), 0)
    y = rnd(SHAPE, (1, 3, 2, 2, 1), (3,), 1)
    X, Y = dense_batch(x), dense_batch(y)
    assert x.batch_shape == (2, 3) and x.full().shape == (2, 3) + SHAPE
    assert close(x.full(), X, 1e-13)
    assert close(x.norm(), X.flatten(2).norm(dim=-1), 1e-13)
    assert close(inner(x, y), (X * Y).flatten(2).sum(-1), 1e-13)  # batch shapes broadcast
    P = pairwise_inner(x, y)
    assert P.shape == (2, 3, 3)
    assert close(P, torch.einsum("abi,ci->abc", X.flatten(2), Y.flatten(1)), 1e-13)
    assert close(x.pairwise_inner(x[0]), torch.einsum("abi,ci->abc", X.flatten(2),
                                                      X[0].flatten(1)), 1e-13)
    # single TT against a batch: a vector
    assert close(inner(y[1], y), (Y * Y[1]).flatten(1).sum(-1), 1e-13)



def test_pairwise_inner_of_batches_that_do_not_broadcast():
    # all pairs of two sets of different sizes (a Gram matrix between them): the batch
    # shapes need not broadcast, only the shapes, dtypes and devices must agree
    x = rnd(SHAPE, 2, (3,), 20)
    y = rnd(SHAPE, (1, 3, 2, 2, 1), (2, 4), 21)
    X, Y = dense_batch(x), dense_batch(y)
    P = pairwise_inner(x, y)
    assert P.shape == (3, 2, 4)
    assert close(P, torch.einsum("ai,bci->abc", X.flatten(1), Y.flatten(2)), 1e-13)
    assert pairwise_inner(x[:0], y).shape == (0, 2, 4)
    with pytest.raises(ValueError, match="pairwise_inner: shapes differ"):
        pairwise_inner(x, rnd((3, 4, 5), 2, (2,), 22))

def test_norm_gradient_of_a_batch():
    x = rnd(SHAPE, 2, (3,), 2)
    cores = [c.clone().requires_grad_() for c in x.cores]
    TT(cores).norm().sum().backward()
    for b in range(3):
        cb = [c.detach()[b].clone().requires_grad_() for c in x.cores]
        dense(cb).norm().backward()
        for c, s in zip(cores, cb):
            assert torch.allclose(c.grad[b], s.grad, atol=1e-12)


def test_sums_scalars_gather():
    x = rnd(SHAPE, 2, (4,), 3)
    y = rnd(SHAPE, R3, (4,), 4)
    X, Y = dense_batch(x), dense_batch(y)
    assert close((x + y).full(), X + Y, 1e-13)
    assert close((x - y).full(), X - Y, 1e-13)
    assert close((x + y[0]).full(), X + Y[0], 1e-13)  # broadcast
    assert close((2.5 * x).full(), 2.5 * X, 1e-13)
    a = torch.arange(1.0, 5.0, dtype=F64)
    assert close(x.scaled(a).full(), a[:, None, None, None, None] * X, 1e-13)
    with pytest.raises(ValueError, match="a: expected a scalar or a tensor of the batch shape"):
        x.scaled(torch.ones(3, dtype=F64))
    gen = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randint(0, n, (50,), generator=gen) for n in SHAPE], 1)
    g = x.gather(idx)
    assert g.shape == (4, 50)
    assert close(g, X[:, idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]], 1e-13)


def test_orthogonalize_batch():
    x = rnd(SHAPE, (1, 3, 4, 2, 1), (2, 2), 5)
    z = x + x.scaled(torch.full((2, 2), 0.5, dtype=F64))  # redundant ranks
    Zd = dense_batch(z)
    for side, center in (("left", None), ("right", None), ("left", 2)):
        o = orthogonalize(z, side, center=center)
        assert o.batch_shape == (2, 2)
        assert close(o.full(), Zd, 1e-12)
        c = 3 if center is None and side == "left" else (0 if center is None else center)
        for k, core in enumerate(o.cores):
            a, n, b = core.shape[-3:]
            if k < c:
                L = core.reshape(core.shape[:-3] + (a * n, b))
                assert close(L.mT @ L, torch.eye(b, dtype=F64).expand(2, 2, b, b), 1e-12)
            elif k > c:
                R = core.reshape(core.shape[:-3] + (a, n * b))
                assert close(R @ R.mT, torch.eye(a, dtype=F64).expand(2, 2, a, a), 1e-12)
        # each TT as orthogonalized alone (same sign convention)
        for i in range(2):
            for j in range(2):
                single = orthogonalize(z[i, j], side, center=center)
                for cb, cs in zip(o.cores, single.cores):
                    assert torch.allclose(cb[i, j], cs, atol=1e-12)


def test_round_batch_caps_and_rel_eps():
    gen = torch.Generator().manual_seed(6)
    x = rnd(SHAPE, 2, (3,), 6)
    y = rnd(SHAPE, 2, (3,), 7)
    X = dense_batch(x)
    s = x + x  # rank 4, exact rank 2
    r = tt_round(s)
    assert r.ranks == (1, 2, 2, 2, 1) and close(r.full(), 2 * X, 1e-12)
    # one point needs rank 4 (x + y), the others rank 2 (x + x): the batch keeps 4
    mixed = TT([torch.cat([a[:1], b[1:]]) for a, b in zip((x + y).cores, s.cores)])
    r = tt_round(mixed, rel_eps=1e-10)
    assert r.ranks == tt_round(x[0] + y[0], rel_eps=1e-10).ranks
    Md = dense_batch(mixed)
    assert close(r.full(), Md, 1e-9)
    # caps: per-TT error within the quasi-optimal bound of its own unfoldings
    z = TT.random(SHAPE, feasible_ranks(SHAPE), dtype=F64, generator=gen, batch=(3,))
    Zd = dense_batch(z)
    rc = tt_round(z, max_rank=2)
    assert max(rc.ranks) == 2
    for b in range(3):
        bound = 0.0
        for k in range(1, len(SHAPE)):
            sv = torch.linalg.svdvals(Zd[b].reshape(math.prod(SHAPE[:k]), -1))
            bound += float((sv[rc.ranks[k]:] ** 2).sum())
        err = float((rc.full()[b] - Zd[b]).norm())
        assert err <= math.sqrt(bound) * (1 + 1e-9) + 1e-12
    # rel_eps bound holds for every TT of the batch
    re = tt_round(z, rel_eps=0.3)
    errs = (re.full() - Zd).flatten(1).norm(dim=-1) / Zd.flatten(1).norm(dim=-1)
    assert bool((errs <= 0.3 + 1e-12).all())



def test_round_of_an_empty_batch():
    # rel_eps (also the default) chooses ranks from the singular values of no TT: rank 1,
    # as for a zero TT; caps alone keep the caps
    x = rnd(SHAPE, 2, (0,), 23)
    for r in (tt_round(x + x), tt_round(x, rel_eps=0.1), tt_round(x, max_rank=2, rel_eps=0.1)):
        assert r.batch_shape == (0,) and r.ranks == (1, 1, 1, 1, 1)
        assert r.full().shape == (0,) + SHAPE
    assert tt_round(x + x, max_rank=2).ranks == (1, 2, 2, 2, 1)

def test_indexing_stack_unbind_and_errors():
    x = rnd(SHAPE, 2, (2, 3), 9)
    X = dense_batch(x)
    assert close(x[1].full(), X[1], 0) and x[1].batch_shape == (3,)
    assert x[1, 2].batch_shape == () and close(x[1, 2].full(), X[1, 2], 0)
    assert close(x[:, 1:].full(), X[:, 1:], 0)
    mask = torch.tensor([True, False])
    assert x[mask].batch_shape == (1, 3)
    parts = x.unbind(1)
    assert len(parts) == 3 and close(parts[2].full(), X[:, 2], 0)
    back = stack(parts, dim=1)
    assert all(torch.equal(a, b) for a, b in zip(back.cores, x.cores))
    assert TT.stack(list(x[0].unbind()), 0).batch_shape == (3,)
    with pytest.raises(IndexError, match="no batch dimension"):
        x[0, 0][0]
    with pytest.raises(IndexError, match="indices for batch_shape"):
        x[0, 0, 0]
    with pytest.raises(ValueError, match=r"tts\[1\]: ranks"):
        stack([x[0, 0], rnd(SHAPE, R3, (), 1)])
    with pytest.raises(ValueError, match=r"cores\[1\]: expected batch shape \(2,\)"):
        TT([torch.zeros(2, 1, 3, 2), torch.zeros(1, 2, 3, 1)])
    with pytest.raises(ValueError, match="batch shapes .* do not broadcast"):
        inner(x, rnd(SHAPE, 2, (4,), 1))


def test_float32_and_meta():
    x = rnd(SHAPE, R3, (5,), 10, dtype=F32)
    x64 = TT([c.double() for c in x.cores])
    assert x.norm().dtype == F32
    assert close(x.norm().double(), x64.norm(), 1e-5)
    assert close(tt_round(x + x, max_rank=3).full().double(), 2 * x64.full(), 1e-5)
    m = TT.random(SHAPE, R3, device="meta", batch=(4, 2))
    assert m.full().shape == (4, 2) + SHAPE and m.norm().shape == (4, 2)
    assert inner(m, m).shape == (4, 2) and pairwise_inner(m, m).shape == (4, 2, 4, 2)
    assert orthogonalize(m).cores[0].device.type == "meta"


@settings(max_examples=20)
@given(data=st.data())
def test_property_batched_algebra(data):
    d = data.draw(st.integers(1, 4), label="d")
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=d, max_size=d), label="shape"))
    feas = feasible_ranks(shape)
    ranks = [1] + [data.draw(st.integers(1, max(1, min(3, f))), label=f"r{k}")
                   for k, f in enumerate(feas[1:-1])] + [1]
    batch = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2), label="batch"))
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = rnd(shape, ranks, batch, seed)
        y = rnd(shape, ranks, batch, seed + 1)
    X, Y = dense_batch(x), dense_batch(y)
    nb = len(batch)
    assert close(x.full(), X, 1e-12)
    assert close(inner(x, y), (X * Y).flatten(nb).sum(-1), 1e-12)
    assert close(x.norm(), X.flatten(nb).norm(dim=-1), 1e-12)
    assert close((x - y).full(), X - Y, 1e-12)
    assert close(orthogonalize(x + y, "left").full(), X + Y, 1e-11)
    assert close(tt_round(x + y).full(), X + Y, 1e-10)


def test_tangent_tt_checked_batch_and_sampled_entries_refused():
    from ttmanifold import FixedTTRank, IndexSet
    from ttmanifold.manifold import TangentTT, right_cores
    M = FixedTTRank(SHAPE, R3)
    gen = torch.Generator().manual_seed(3)
    p = M.random(2, dtype=F64, generator=gen)
    U = M.split(p)
    u = M.proju(p, torch.randn(2, M.size, dtype=F64, generator=gen))
    T = TangentTT(U, right_cores(U), M.split(u))  # checked
    assert T.batch_shape == (2,)
    assert close(T.full()[1], M.tangent_to_tt(p[1], u[1]).full(), 1e-12)
    with pytest.raises(ValueError, match="does not broadcast"):
        TangentTT(U, right_cores(U), [c[:1].expand(3, *c.shape[1:]) for c in M.split(u)])
    idx = IndexSet(torch.zeros(1, 4, dtype=torch.long), SHAPE)
    with pytest.raises(ValueError, match="index_set: sampled entries of a batch"):
        M.to_tt(p).values_at(idx)


def test_bad_scalar_factor_is_refused_by_name():
    # a complex factor made a complex first core (a TT of mixed dtypes), a 0-d tensor on
    # another device failed inside torch, and a tangent TT scaled its packed deltas
    # entrywise by a vector of their size
    from ttmanifold import FixedTTRank
    M = FixedTTRank(SHAPE, R3)
    p = M.random(dtype=F32, generator=torch.Generator().manual_seed(25))
    T = M.tangent_to_tt(p, M.proju(p, torch.ones(M.size, dtype=F32)))
    x = M.to_tt(p)
    for y in (x, T, x + x):
        for a in (1j, torch.tensor(1j)):
            with pytest.raises(TypeError, match="a: expected a real scalar"):
                y.scaled(a)
        with pytest.raises(ValueError, match="a: on meta, the TT on cpu"):
            y.scaled(torch.tensor(2.0, device="meta"))
        with pytest.raises(ValueError, match="a: expected a scalar or a tensor of the batch"):
            y.scaled(torch.ones(M.size, dtype=F32))
        assert close(y.scaled(torch.tensor(2.0, dtype=F64)).full(), 2 * y.full(), 1e-6)


def test_scalar_per_tt_of_another_dtype_is_refused_by_name():
    # a float64 factor per TT on a float32 batch promoted the first core alone: a TT of
    # mixed dtypes that failed later inside torch (full, norm); the tangent TT cast all
    from ttmanifold import FixedTTRank
    M = FixedTTRank(SHAPE, R3)
    p = M.random(3, dtype=F32, generator=torch.Generator().manual_seed(24))
    T = M.tangent_to_tt(p, M.proju(p, torch.ones(3, M.size, dtype=F32)))
    for y in (rnd(SHAPE, 2, (3,), 24, dtype=F32), T):
        with pytest.raises(TypeError, match=r"a: dtype torch.float64 differs from the TT's "
                                            r"torch.float32"):
            y.scaled(torch.ones(3, dtype=F64))
        s = y.scaled(torch.tensor([1, 2, 3]))  # integers: the TT's dtype
        assert {c.dtype for c in s.cores} == {F32}
        assert close(s.full(), y.full() * torch.tensor([1.0, 2.0, 3.0])[:, None, None, None, None],
                     1e-6)
