"""No silent wrong answers at the manifold's entry points: non-finite data is rejected
(without a host sync), a packed tensor that is not a valid point fails at the first
optimizer step, ``check_point`` says why, and batch requests get a clear message."""
from __future__ import annotations

import geoopt
import pytest
import torch

import ttmanifold as tm

F64 = torch.float64


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    M = tm.FixedTTRank((3, 4, 5, 3), (1, 2, 3, 2, 1))
    p = M.random(dtype=F64, generator=g)
    u = M.proju(p, torch.randn(M.size, generator=g, dtype=F64))
    return M, p, u, g


def _nan_at(t, i=3):
    t = t.clone().contiguous()
    t.view(-1)[i] = float("nan")
    return t


def test_non_finite_input_is_rejected(setup):
    M, p, u, g = setup
    x = tm.TT.random(M.shape, 2, dtype=F64, generator=g)
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        tm.TT([_nan_at(c) if k == 1 else c for k, c in enumerate(x.cores)])
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        M.pack_point([_nan_at(c) if k == 0 else c for k, c in enumerate(x.cores)])
    with pytest.raises(RuntimeError, match="Z: contains NaN"):
        M.project(p, _nan_at(x.full()))
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        M.project(p, tm.TT([_nan_at(c) if k == 2 else c for k, c in enumerate(x.cores)],
                           check=False))
    idx = torch.zeros(4, 4, dtype=torch.long)
    vals = torch.tensor([1.0, float("inf"), 0.0, 2.0], dtype=F64)
    with pytest.raises(RuntimeError, match="Z: contains NaN"):
        M.project(p, torch.sparse_coo_tensor(idx.t(), vals, M.shape, check_invariants=True))
    with pytest.raises(RuntimeError, match="u: contains NaN"):
        M.proju(p, _nan_at(u))
    with pytest.raises(RuntimeError, match="x: contains NaN"):
        M.projx(_nan_at(p))


def test_finite_checks_skip_meta(setup):
    M, p, u, _ = setup
    pm, um = p.to("meta"), u.to("meta")
    assert M.proju(pm, um).device.type == "meta"
    assert M.projx(pm).device.type == "meta"


def test_first_optimizer_step_on_a_non_orthogonal_point_fails(setup):
    M, p, u, g = setup
    cores = [c.clone() for c in M.split(p)]
    cores[0] = cores[0] * 3.0  # same TT shape, not left-orthogonal
    cores[1] = cores[1] / 3.0
    bad = geoopt.ManifoldParameter(torch.cat([c.reshape(-1) for c in cores]), manifold=M)
    A = tm.TT.random(M.shape, 2, dtype=F64, generator=g)
    opt = geoopt.optim.RiemannianSGD([bad], lr=0.1)
    X = bad.unpack_tensor()
    (0.5 * tm.inner(X, X) - tm.inner(X, A)).backward()
    with pytest.raises(RuntimeError, match="not left-orthogonal"):
        opt.step()
    # the same loop on the repaired point runs
    good = geoopt.ManifoldParameter(M.projx(bad.detach()), manifold=M)
    opt = geoopt.optim.RiemannianSGD([good], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        X = good.unpack_tensor()
        (0.5 * tm.inner(X, X) - tm.inner(X, A)).backward()
        opt.step()
    M.check_point(good.detach())


def test_check_point_says_why(setup):
    M, p, u, _ = setup
    M.check_point(p)
    with pytest.raises(ValueError, match="not left-orthogonal"):
        M.check_point(p * 2.0)
    with pytest.raises(ValueError, match="non-finite"):
        M.check_point(_nan_at(p))
    with pytest.raises(ValueError, match="flat tensor of size"):
        M.check_point(p[:-1])
    z = p.clone()
    M.split(z)[-1].zero_()  # rank collapses at the last bond
    with pytest.raises(ValueError, match="rank"):
        M.check_point(z)


def test_check_point_follows_geoopts_signature(setup):
    """geoopt's ``check_point(x, explain=False)`` returns a bool (or the bool and the
    reason): ``if M.check_point(p)`` held nothing (None) for a valid point before."""
    M, p, u, _ = setup
    assert M.check_point(p) is True
    assert M.check_point(p, explain=False) is True
    assert M.check_point(p * 2.0, explain=False) is False
    ok, why = M.check_point(_nan_at(p), explain=True)
    assert not ok and "non-finite" in why
    assert M.check_point(p, explain=True) == (True, None)


def test_random_with_a_batch_size_gives_a_batch(setup):
    """Batches are supported (issue 12): one int or geoopt's (*batch, size); other sizes
    are rejected naming the conventions (tests/test_manifold_batch.py tests the batches)."""
    M = setup[0]
    assert M.random(3).shape == (3, M.size)
    assert M.random((3, M.size)).shape == (3, M.size)
    assert M.random(2, 3, M.size).shape == (2, 3, M.size)
    with pytest.raises(ValueError, match="a batch is"):
        M.random(3, 4)
    assert M.random(M.size).shape == (M.size,)
    assert M.random((M.size,)).shape == (M.size,)
    assert M.random().shape == (M.size,)
