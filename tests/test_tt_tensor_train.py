"""Tests of the TT algebra (ttmanifold.tt) against independent dense float64 references.

The references never call the code under test: dense tensors come from one ``einsum``
over all cores, entries from Python loops over core slices, best low-rank errors from
SVDs of dense unfoldings. Property-based tests (hypothesis) draw the order d in 1..6,
mode sizes in 1..5 and ranks bounded by ``feasible_ranks(shape)``.
"""
from __future__ import annotations

import contextlib
import math
import string
import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import ttmanifold as tm
from ttmanifold import TT, feasible_ranks, inner, orthogonalize
from ttmanifold.tt import add, lq_pos, qr_pos

tt_round = tm.round
F64 = torch.float64
F32 = torch.float32

CUDA = pytest.param(
    "cuda",
    marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
)
DEVICES = ["cpu", CUDA]


# ---------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------

def dense_ref(cores) -> torch.Tensor:
    """The dense tensor of a TT by a single einsum over all cores (in float64)."""
    d = len(cores)
    letters = string.ascii_letters
    bonds, modes = letters[: d + 1], letters[d + 1: 2 * d + 1]
    spec = ",".join(f"{bonds[k]}{modes[k]}{bonds[k + 1]}" for k in range(d))
    spec += f"->{bonds[0]}{modes}{bonds[d]}"
    out = torch.einsum(spec, *[c.to(F64) for c in cores])
    return out.reshape(out.shape[1:-1])


def entry_ref(cores, idx) -> torch.Tensor:
    """One entry as the product of core slices G_1[i_1] ... G_d[i_d], in float64."""
    v = cores[0][:, int(idx[0]), :].to(F64)
    for k in range(1, len(cores)):
        v = v @ cores[k][:, int(idx[k]), :].to(F64)
    return v[0, 0]


def unfolding(a: torch.Tensor, k: int) -> torch.Tensor:
    """k-th unfolding (n_1..n_k) x (n_{k+1}..n_d), k = 1..d-1."""
    return a.reshape(math.prod(a.shape[:k]), -1)


def unfolding_svals(a: torch.Tensor):
    """Singular values of the d-1 unfoldings, as a list indexed by bond k = 1..d-1."""
    return [None] + [torch.linalg.svdvals(unfolding(a, k)) for k in range(1, a.dim())]


def tail(s: torch.Tensor, r: int) -> float:
    """Best rank-r approximation error from singular values s."""
    return float(torch.linalg.vector_norm(s[r:])) if r < s.numel() else 0.0


def unfolding_ranks(a: torch.Tensor):
    """Numerical ranks of the unfoldings (1, r_1, ..., r_{d-1}, 1)."""
    d = a.dim()
    return (1,) + tuple(int(torch.linalg.matrix_rank(unfolding(a, k))) for k in range(1, d)) + (1,)


def attainable(shape, ranks):
    """Clip ranks to r_k <= r_{k-1} n_k and r_k <= n_{k+1} r_{k+1} (what a TT can have)."""
    r = list(ranks)
    d = len(shape)
    for k in range(1, d):
        r[k] = min(r[k], r[k - 1] * shape[k - 1])
    for k in range(d - 1, 0, -1):
        r[k] = min(r[k], shape[k] * r[k + 1])
    return tuple(r)


def gaussian_cores(shape, ranks, seed, dtype=F64, device="cpu"):
    """Plain Gaussian cores (ranks may be redundant: feasible but not attainable)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(ranks[k], n, ranks[k + 1], generator=g, dtype=dtype).to(device)
            for k, n in enumerate(shape)]


def left_unf(c):
    return c.reshape(-1, c.shape[2])


def right_unf(c):
    return c.reshape(c.shape[0], -1)


def assert_left_orth(c, tol):
    m = left_unf(c).to(F64)
    eye = torch.eye(m.shape[1], dtype=F64)
    assert torch.allclose(m.T @ m, eye, atol=tol, rtol=0), float((m.T @ m - eye).abs().max())


def assert_right_orth(c, tol):
    m = right_unf(c).to(F64)
    eye = torch.eye(m.shape[0], dtype=F64)
    assert torch.allclose(m @ m.T, eye, atol=tol, rtol=0), float((m @ m.T - eye).abs().max())


def rel_err(a, b) -> float:
    a, b = a.to(F64), b.to(F64)
    nb = float(torch.linalg.vector_norm(b))
    return float(torch.linalg.vector_norm(a - b)) / (nb if nb > 0 else 1.0)


@contextlib.contextmanager
def no_warnings():
    """Context manager turning every warning into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------------------------------
# hypothesis strategies
# ---------------------------------------------------------------------------------------

@st.composite
def shapes(draw, min_d=1, max_d=6, max_n=5):
    d = draw(st.integers(min_d, max_d))
    return tuple(draw(st.lists(st.integers(1, max_n), min_size=d, max_size=d)))


@st.composite
def rank_draw(draw, shape, max_r=5):
    """Ranks (1, r_1, ..., r_{d-1}, 1) with 1 <= r_k <= min(feasible_k, max_r)."""
    feas = feasible_ranks(shape)
    inner_r = [draw(st.integers(1, min(feas[k], max_r))) for k in range(1, len(shape))]
    return (1, *inner_r, 1)


@st.composite
def tt_spec(draw, min_d=1, max_d=6, max_n=5, max_r=5):
    shape = draw(shapes(min_d, max_d, max_n))
    ranks = draw(rank_draw(shape, max_r))
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, ranks, seed


@st.composite
def tt_pair_spec(draw, min_d=1, max_d=6, max_n=5, max_r=4):
    shape = draw(shapes(min_d, max_d, max_n))
    rx = draw(rank_draw(shape, max_r))
    ry = draw(rank_draw(shape, max_r))
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, rx, ry, seed


# ---------------------------------------------------------------------------------------
# evaluation: full, norm, inner, gather
# ---------------------------------------------------------------------------------------

@given(tt_spec())
def test_full_and_properties(spec):
    shape, ranks, seed = spec
    cores = gaussian_cores(shape, ranks, seed)
    x = TT(cores)
    assert x.shape == shape and x.ranks == ranks and x.ndim == len(shape) == len(x)
    assert x.dtype == F64 and x.device == torch.device("cpu")
    assert x.num_params == sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape))
    assert x.is_feasible()
    ref = dense_ref(cores)
    full = x.full()
    assert full.shape == torch.Size(shape) and full.dtype == F64
    assert rel_err(full, ref) <= 1e-13
    # cores is a copy of the list: mutating it does not change x
    lst = x.cores
    lst.pop()
    assert x.ndim == len(shape)


@given(tt_pair_spec())
def test_norm_and_inner(spec):
    shape, rx, ry, seed = spec
    cx = gaussian_cores(shape, rx, seed)
    cy = gaussian_cores(shape, ry, seed + 1)
    x, y = TT(cx), TT(cy)
    a, b = dense_ref(cx), dense_ref(cy)
    na = float(torch.linalg.vector_norm(a))
    assert float(x.norm()) == pytest.approx(na, rel=1e-12, abs=1e-300)
    ref = float((a * b).sum())
    scale = na * float(torch.linalg.vector_norm(b))
    ip = inner(x, y)
    assert ip.shape == torch.Size([]) and ip.dtype == F64
    assert abs(float(ip) - ref) <= 1e-12 * scale
    assert abs(float(inner(y, x)) - ref) <= 1e-12 * scale
    assert float(inner(x, x)) == pytest.approx(na**2, rel=1e-12)


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300, 1e-300])
def test_norm_no_overflow_where_squaring_would(scale):
    # the squared norm over/underflows float64, the QR-based norm must not
    x = TT.random((3, 4, 5), 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * scale
    assert not 0 < float(inner(x, x)) < math.inf
    assert float(x.norm()) == pytest.approx(scale, rel=1e-12)
    for d in (1, 2):
        y = TT.random((4,) * d, 2, dtype=F64) * scale
        assert float(y.norm()) == pytest.approx(scale, rel=1e-12)
    assert float(TT.zeros((2, 3)).norm()) == 0.0


@pytest.mark.parametrize("dtype, scale", [(F64, 1e-310), (F64, 1e-200), (F64, 1e300),
                                          (torch.float32, 1e-40), (torch.float32, 1e30)])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_norm_gradient_with_a_subnormal_or_huge_core(dtype, scale, batch):
    """A middle core scaled by ``scale`` (subnormal at 1e-310 / 1e-40): under autograd
    the norm and its gradient are the dense float64 reference's, ``||X||`` and
    ``<X, dX> / ||X||`` (the power-of-two scale of the Gram sweep overflowed to Inf for a
    subnormal interface, giving NaN, and the clamped exponent of a subnormal norm scaled
    the gradient wrongly by up to 2x)."""
    g = torch.Generator().manual_seed(3)
    cs = TT.random((3, 4, 5), 2, dtype=F64, batch=batch, generator=g).cores
    ref = TT(cs).full().flatten(len(batch))  # float64, unscaled: ||X|| = scale ||ref||
    scaled = [(c * (scale if k == 1 else 1.0)).to(dtype).requires_grad_()
              for k, c in enumerate(cs)]
    n = TT(scaled).norm()
    grads = torch.autograd.grad(n.sum(), scaled)
    # the subnormal input itself carries fewer bits (float32 1e-40: about 17)
    tol = {F64: 1e-12, torch.float32: 1e-5}[dtype] * (1e3 if scale in (1e-310, 1e-40) else 1)
    nref = ref.norm(dim=-1)
    assert torch.allclose(n.double() / scale, nref, rtol=tol, atol=0)
    # directional derivative along the middle core: <X, dX> / ||X|| (X = scale ref)
    d1 = torch.randn(cs[1].shape, dtype=F64, generator=g)
    dX = TT([cs[0], d1, cs[2]]).full().flatten(len(batch))
    want = (ref * dX).sum(-1) / nref
    got = (grads[1].double() * d1).flatten(len(batch)).sum(-1)
    assert torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300, 1e-300])
def test_round_and_from_dense_scale_invariant(scale):
    # rank selection must not depend on the overall scale (squares over/underflow)
    x1 = TT.random((3, 4, 5, 3), (1, 2, 3, 2, 1), dtype=F64,
                   generator=torch.Generator().manual_seed(1))
    x = x1 * scale
    y = tt_round(x + x)
    assert y.ranks == x.ranks
    assert float((y - 2 * x).norm()) <= 1e-12 * scale
    for rel_eps in (1e-8, 0.3, 0.6, 0.99):
        assert tt_round(x, rel_eps=rel_eps).ranks == tt_round(x1, rel_eps=rel_eps).ranks
    assert tt_round(x, rel_eps=0.99).ranks != x.ranks  # the lossy case is exercised
    z = TT.from_dense(x.full(), rel_eps=1e-10)
    assert z.ranks == x.ranks
    assert float((z - x).norm()) <= 1e-10 * scale


@given(tt_spec(), st.integers(0, 30), st.sampled_from([torch.int64, torch.int32, torch.uint8]))
def test_gather(spec, n_idx, idx_dtype):
    shape, ranks, seed = spec
    cores = gaussian_cores(shape, ranks, seed)
    x = TT(cores)
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randint(0, n, (n_idx,), generator=g) for n in shape], dim=1)
    # always include the first and the last entry
    idx = torch.cat([idx, torch.zeros(1, len(shape), dtype=torch.long),
                     torch.tensor([[n - 1 for n in shape]])]).to(idx_dtype)
    vals = x.gather(idx)
    assert vals.shape == (idx.shape[0],) and vals.dtype == F64
    ref = torch.stack([entry_ref(cores, i) for i in idx.tolist()])
    scale = max(float(ref.abs().max()), 1e-300)
    assert torch.allclose(vals, ref, rtol=1e-12, atol=1e-12 * scale)
    dense = dense_ref(cores)
    assert torch.allclose(vals, dense[tuple(idx.long().T)], rtol=1e-12, atol=1e-12 * scale)


def test_gather_empty():
    x = TT.random((3, 4), 2, dtype=F64)
    out = x.gather(torch.zeros(0, 2, dtype=torch.long))
    assert out.shape == (0,) and out.dtype == F64


# ---------------------------------------------------------------------------------------
# arithmetic
# ---------------------------------------------------------------------------------------

@given(tt_pair_spec(), st.floats(-3, 3, allow_nan=False).filter(lambda a: abs(a) > 1e-3))
def test_arithmetic(spec, a):
    shape, rx, ry, seed = spec
    cx = gaussian_cores(shape, rx, seed)
    cy = gaussian_cores(shape, ry, seed + 1)
    x, y = TT(cx), TT(cy)
    dx, dy = dense_ref(cx), dense_ref(cy)
    d = len(shape)
    s = x + y
    assert isinstance(s, TT)
    if d == 1:
        assert s.ranks == (1, 1)
    else:
        assert s.ranks == (1,) + tuple(rx[k] + ry[k] for k in range(1, d)) + (1,)
    # absolute tolerance relative to ||x|| + ||y|| (x + y may cancel)
    tol = 1e-12 * (float(torch.linalg.vector_norm(dx)) + float(torch.linalg.vector_norm(dy)))
    assert float(torch.linalg.vector_norm(s.full() - (dx + dy))) <= tol
    assert float(torch.linalg.vector_norm(add(x, y).full() - (dx + dy))) <= tol
    assert float(torch.linalg.vector_norm((x - y).full() - (dx - dy))) <= tol
    assert float(torch.linalg.vector_norm((-x).full() + dx)) <= tol
    for z in (a * x, x * a, x * torch.tensor(a, dtype=F64), torch.tensor(a, dtype=F64) * x):
        assert isinstance(z, TT) and z.ranks == x.ranks
        assert rel_err(z.full(), a * dx) <= 1e-13
    assert rel_err((x / a).full(), dx / a) <= 1e-13
    # the operands are not modified
    assert rel_err(x.full(), dx) <= 1e-13 and rel_err(y.full(), dy) <= 1e-13


@pytest.mark.parametrize("dtype, a, scale", [(F64, 1e-310, 1e-300), (F64, -5e-324, 1e-310),
                                              (torch.float32, 1e-40, 1e-30),
                                              (torch.float32, -1e-39, 1e-31)])
def test_division_by_a_tiny_number(dtype, a, scale):
    """``x / a`` for ``|a|`` so small that ``1 / a`` overflows the dtype, while ``x / a`` is
    finite, ``a`` a number or a 0-d tensor: the dense reference's values (the reciprocal
    made the first core Inf and the entries NaN), for a TT and a sum kept as its terms."""
    x = TT.random((3, 4, 2), 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * scale
    y = TT.random((3, 4, 2), 1, dtype=F64, generator=torch.Generator().manual_seed(1)) * scale
    # a 0-d tensor a of a subnormal value itself carries fewer bits (float32 1e-40: ~17)
    for t in (x, x + y):
        for div, tol in ((a, 1e-6), (torch.tensor(a, dtype=dtype), 1e-4)):
            ref = t.full() / (a if isinstance(div, float) else float(div))  # float64: finite
            got = ((t if dtype == F64 else t.to(dtype)) / div).full().double()
            assert torch.isfinite(got).all()
            assert rel_err(got, ref) <= (tol if dtype == torch.float32 else 1e-12)


def test_arithmetic_rejects_non_scalars():
    x = TT.random((2, 3), 2, dtype=F64)
    with pytest.raises(TypeError):
        x * torch.ones(2, dtype=F64)
    with pytest.raises(TypeError):
        x + 1.0
    with pytest.raises(TypeError):
        x * (1 + 2j)
    with pytest.raises(TypeError):
        x - x.full()


# ---------------------------------------------------------------------------------------
# orthogonalization and QR/LQ kernels
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (2, 7, 3), (6, 1), (1, 6)])
def test_qr_lq_pos(shape):
    a = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    q, r = qr_pos(a)
    k = min(shape[-2:])
    assert q.shape[-1] == k and r.shape[-2] == k
    assert torch.allclose(q @ r, a, atol=1e-13)
    assert torch.allclose(q.transpose(-2, -1) @ q, torch.eye(k, dtype=F64).expand(*shape[:-2], k, k),
                          atol=1e-13)
    assert (torch.diagonal(r, dim1=-2, dim2=-1) >= 0).all()
    # deterministic: QR of a matrix with orthonormal columns returns it
    q2, r2 = qr_pos(q)
    assert torch.allclose(q2, q, atol=1e-13) and torch.allclose(r2, torch.eye(k, dtype=F64), atol=1e-13)
    l, q = lq_pos(a)
    assert torch.allclose(l @ q, a, atol=1e-13)
    assert torch.allclose(q @ q.transpose(-2, -1), torch.eye(k, dtype=F64).expand(*shape[:-2], k, k),
                          atol=1e-13)
    assert (torch.diagonal(l, dim1=-2, dim2=-1) >= 0).all()


def _check_orth(y, center, tol):
    d = y.ndim
    for k in range(center):
        assert_left_orth(y.cores[k], tol)
    for k in range(center + 1, d):
        assert_right_orth(y.cores[k], tol)


@given(tt_spec(), st.data())
def test_orthogonalize(spec, data):
    shape, ranks, seed = spec
    d = len(shape)
    cores = gaussian_cores(shape, ranks, seed)
    x = TT(cores)
    ref = dense_ref(cores)
    mode = data.draw(st.sampled_from(["left", "right", "center"]))
    if mode == "center":
        center = data.draw(st.integers(0, d - 1))
        y = orthogonalize(x, center=center)
        kwargs = dict(center=center)
    else:
        center = d - 1 if mode == "left" else 0
        y = orthogonalize(x, mode)
        kwargs = dict(side=mode)
    assert isinstance(y, TT) and y.shape == x.shape
    # ranks only shrink (redundant ranks collapse to the QR's rank)
    assert all(a <= b for a, b in zip(y.ranks, x.ranks))
    assert all(a <= b for a, b in zip(y.ranks, feasible_ranks(shape)))
    _check_orth(y, center, 1e-12)
    assert rel_err(y.full(), ref) <= 1e-12
    # the norm sits in the center core
    assert float(torch.linalg.vector_norm(y.cores[center])) == pytest.approx(
        float(torch.linalg.vector_norm(ref)), rel=1e-12)
    # re-orthogonalizing is a no-op
    z = orthogonalize(y, **kwargs)
    assert z.ranks == y.ranks
    for a, b in zip(z.cores, y.cores):
        assert torch.allclose(a, b, atol=1e-12, rtol=0), float((a - b).abs().max())
    # the input is not modified
    assert all(torch.equal(a, b) for a, b in zip(x.cores, cores))


def test_orthogonalize_side_and_center_validation():
    x = TT.random((2, 3, 4), 2, dtype=F64)
    with pytest.raises(ValueError, match="side"):
        orthogonalize(x, "middle")
    for bad in (-1, 3, 1.5, "1"):
        with pytest.raises(ValueError, match="center"):
            orthogonalize(x, center=bad)
    with pytest.raises(TypeError, match="TT"):
        orthogonalize(x.full())


# ---------------------------------------------------------------------------------------
# rounding
# ---------------------------------------------------------------------------------------

@st.composite
def round_case(draw, max_d=6):
    """A TT with redundant ranks (sum of two Gaussian TTs) and a cap request."""
    shape, rx, ry, seed = draw(tt_pair_spec(max_d=max_d))
    cx = gaussian_cores(shape, rx, seed)
    cy = gaussian_cores(shape, ry, seed + 1)
    d = len(shape)
    kind = draw(st.sampled_from(["max_rank", "ranks", "both"]))
    max_rank, ranks = None, None
    if kind in ("max_rank", "both"):
        max_rank = draw(st.integers(1, 6))
    if kind in ("ranks", "both"):
        ranks = tuple(draw(st.lists(st.integers(1, 6), min_size=d - 1, max_size=d - 1)))
    return shape, cx, cy, max_rank, ranks


def _caps(shape, max_rank, ranks):
    d = len(shape)
    feas = feasible_ranks(shape)
    caps = [1] + [min(feas[k], max_rank or 10**9, ranks[k - 1] if ranks else 10**9)
                  for k in range(1, d)] + [1]
    return caps


@given(round_case())
def test_round_caps_and_error_bound(case):
    shape, cx, cy, max_rank, ranks = case
    d = len(shape)
    x = TT(cx) + TT(cy)
    ref = dense_ref(cx) + dense_ref(cy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # requests above the feasible bound are clipped
        y = tt_round(x, max_rank=max_rank, ranks=ranks)
    caps = _caps(shape, max_rank, ranks)
    assert y.ranks[0] == 1 and y.ranks[-1] == 1
    assert all(r <= c for r, c in zip(y.ranks, caps)), (y.ranks, caps)
    # caps-only bound: ||x - round(x)||^2 <= sum_k eps_k^2, eps_k best rank-cap_k error
    sv = unfolding_svals(ref)
    bound2 = sum(tail(sv[k], caps[k]) ** 2 for k in range(1, d))
    # and a TT of ranks y.ranks cannot beat the best error of any single unfolding
    lower = max([tail(sv[k], y.ranks[k]) for k in range(1, d)], default=0.0)
    err = float(torch.linalg.vector_norm(y.full() - ref))
    nref = float(torch.linalg.vector_norm(ref))
    slack = 1e-10 * nref
    assert err <= math.sqrt(bound2) + slack, (err, math.sqrt(bound2))
    assert err >= lower - slack
    # output: cores 1..d-1 right-orthogonal, norm in core 0
    for k in range(1, d):
        assert_right_orth(y.cores[k], 1e-12)


@given(tt_pair_spec(), st.sampled_from([1e-1, 3e-2, 1e-3, 1e-8, 0.5, 0.0]))
def test_round_rel_eps_bound(spec, rel_eps):
    shape, rx, ry, seed = spec
    d = len(shape)
    cx = gaussian_cores(shape, rx, seed)
    cy = gaussian_cores(shape, ry, seed + 1)
    x = TT(cx) + TT(cy) * 0.1
    ref = dense_ref(cx) + 0.1 * dense_ref(cy)
    y = tt_round(x, rel_eps=rel_eps)
    nref = float(torch.linalg.vector_norm(ref))
    err = float(torch.linalg.vector_norm(y.full() - ref))
    assert err <= rel_eps * nref + 1e-12 * nref
    # each bond keeps at most the rank the dense TT-SVD threshold would keep on x itself
    sv = unfolding_svals(ref)
    delta = rel_eps * nref / math.sqrt(max(d - 1, 1)) * (1 - 1e-8)
    for k in range(1, d):
        tails = torch.flip(torch.cumsum(torch.flip(sv[k] ** 2, (0,)), 0), (0,))
        allowed = max(1, int((tails > delta**2).sum()))
        assert y.ranks[k] <= allowed, (k, y.ranks, allowed)


@given(tt_spec(max_r=4), st.integers(0, 2**31 - 1))
def test_round_recovers_true_rank(spec, seed2):
    shape, ranks, seed = spec
    ranks = attainable(shape, ranks)
    g = torch.Generator().manual_seed(seed)
    x = TT.random(shape, ranks, dtype=F64, generator=g)
    dx = dense_ref(x.cores)
    assert unfolding_ranks(dx) == ranks  # TT.random has exactly these ranks
    y2 = tt_round(x + x)
    assert y2.ranks == ranks
    assert rel_err(y2.full(), 2 * dx) <= 1e-12
    # x + y - y: exact cancellation of a different TT of comparable norm
    r_other = attainable(shape, tuple(min(r + 1, f) for r, f in zip(ranks, feasible_ranks(shape))))
    z = TT.random(shape, r_other, dtype=F64, generator=torch.Generator().manual_seed(seed2))
    w = tt_round(x + z - z)
    assert w.ranks == ranks
    assert rel_err(w.full(), dx) <= 1e-12
    # rounding a TT that already has exact ranks changes nothing but the gauge
    v = tt_round(x)
    assert v.ranks == ranks and rel_err(v.full(), dx) <= 1e-12


@given(tt_spec(min_d=2, max_r=5))
def test_round_lossy_vs_dense_tt_svd(spec):
    shape, ranks, seed = spec
    cores = gaussian_cores(shape, ranks, seed)
    ref = dense_ref(cores)
    true = unfolding_ranks(ref)
    assume(max(true) >= 2)
    cap = max(true) - 1
    d = len(shape)
    y = tt_round(TT(cores), max_rank=cap)
    assert max(y.ranks) <= cap
    sv = unfolding_svals(ref)
    per_bond = [tail(sv[k], min(cap, true[k])) for k in range(1, d)]
    lower = max(per_bond)
    upper = math.sqrt(sum(e * e for e in per_bond))
    assert lower > 0
    err = float(torch.linalg.vector_norm(y.full() - ref))
    slack = 1e-10 * float(torch.linalg.vector_norm(ref))
    assert lower - slack <= err <= upper + slack
    assert err > 0
    # the dense TT-SVD with the same cap obeys the same sandwich
    z = TT.from_dense(ref, max_rank=cap)
    err_dense = float(torch.linalg.vector_norm(z.full() - ref))
    assert lower - slack <= err_dense <= upper + slack
    # quasi-optimality relative to the dense TT-SVD
    assert err <= math.sqrt(d - 1) * err_dense + slack


def test_round_default_threshold_keeps_small_but_real_singular_values():
    # a rank-2 TT whose second singular value is 1e-8 relative: kept by default, cut
    # by rel_eps=1e-6
    g = torch.Generator().manual_seed(3)
    a = TT.random((4, 4, 4), 1, dtype=F64, generator=g)
    b = TT.random((4, 4, 4), 1, dtype=F64, generator=g)
    x = a + 1e-8 * b
    assert tt_round(x).ranks == (1, 2, 2, 1)
    assert tt_round(x, rel_eps=1e-6).ranks == (1, 1, 1, 1)


def test_round_infeasible_ranks_warn_and_clip():
    x = TT.random((2, 3, 4), 2, dtype=F64) + TT.random((2, 3, 4), (1, 2, 3, 1), dtype=F64)
    with pytest.warns(UserWarning, match="clipped"):
        y = tt_round(x, ranks=(1, 5, 9, 1))
    assert y.ranks[1] <= 2 and y.ranks[2] <= 4
    with pytest.warns(UserWarning, match="clipped"):
        y = tt_round(x, ranks=[7, 7])
    assert y.ranks[1] <= 2 and y.ranks[2] <= 4
    # max_rank above the bound is silently a no-op cap
    with no_warnings():
        tt_round(x, max_rank=100)


def test_round_bad_arguments():
    x = TT.random((2, 3, 4), 2, dtype=F64)
    with pytest.raises(ValueError, match="rel_eps"):
        tt_round(x, rel_eps=-1.0)
    with pytest.raises(ValueError, match="rel_eps"):
        tt_round(x, rel_eps=float("nan"))
    with pytest.raises(ValueError, match="max_rank"):
        tt_round(x, max_rank=0)
    with pytest.raises(ValueError, match="ranks"):
        tt_round(x, ranks=(1, 2, 2))  # wrong length for d = 3 (needs 2 or 4 values)
    with pytest.raises(ValueError, match="boundary"):
        tt_round(x, ranks=(2, 2, 2, 1))
    with pytest.raises(ValueError, match="positive"):
        tt_round(x, ranks=0)
    with pytest.raises(TypeError, match="TT"):
        tt_round(x.full(), max_rank=2)


# ---------------------------------------------------------------------------------------
# construction: random, zeros, from_dense
# ---------------------------------------------------------------------------------------

@given(tt_spec())
def test_random_unit_norm_exact_ranks(spec):
    shape, ranks, seed = spec
    ranks = attainable(shape, ranks)
    with no_warnings():
        x = TT.random(shape, ranks, dtype=F64, generator=torch.Generator().manual_seed(seed))
    assert x.ranks == ranks and x.shape == shape and x.dtype == F64
    dx = dense_ref(x.cores)
    assert float(torch.linalg.vector_norm(dx)) == pytest.approx(1.0, rel=1e-12)
    assert unfolding_ranks(dx) == ranks
    # cores 0..d-2 are orthonormal frames
    for c in x.cores[:-1]:
        assert_left_orth(c, 1e-12)
    # without normalization the norm is that of the Gaussian last core
    y = TT.random(shape, ranks, dtype=F64, generator=torch.Generator().manual_seed(seed),
                  normalize=False)
    assert float(y.norm()) == pytest.approx(float(torch.linalg.vector_norm(y.cores[-1])), rel=1e-12)


def test_random_reproducible_with_generator():
    r = (1, 3, 3, 2, 1)
    a = TT.random((3, 4, 5, 2), r, dtype=F64, generator=torch.Generator().manual_seed(7))
    b = TT.random((3, 4, 5, 2), r, dtype=F64, generator=torch.Generator().manual_seed(7))
    c = TT.random((3, 4, 5, 2), r, dtype=F64, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(p, q) for p, q in zip(a.cores, b.cores))
    assert not all(torch.equal(p, q) for p, q in zip(a.cores, c.cores))
    # the global RNG also drives it when no generator is given
    torch.manual_seed(11)
    e = TT.random((3, 4), 2, dtype=F64)
    torch.manual_seed(11)
    f = TT.random((3, 4), 2, dtype=F64)
    assert all(torch.equal(p, q) for p, q in zip(e.cores, f.cores))


@pytest.mark.parametrize("batch", [(), (2,)])
def test_random_cores_contiguous(batch):
    # LAPACK returns Q column-major; every later use of a strided core would copy it
    a = TT.random((3, 4, 5, 2), (1, 3, 3, 2, 1), dtype=F64, batch=batch)
    assert all(c.is_contiguous() for c in a.cores)


def test_random_clips_infeasible_ranks_with_warning():
    with pytest.warns(UserWarning, match="clipped"):
        x = TT.random((2, 3, 4), 10, dtype=F64)
    assert x.ranks == (1, 2, 4, 1) == feasible_ranks((2, 3, 4))
    assert unfolding_ranks(x.full()) == x.ranks
    with pytest.warns(UserWarning, match="clipped"):
        x = TT.random((2, 2), (1, 3, 1), dtype=F64)
    assert x.ranks == (1, 2, 1)
    # feasible but not attainable by neighbouring cores: r_2 <= r_1 n_2 = 2
    with pytest.warns(UserWarning, match="clipped"):
        x = TT.random((2, 2, 2, 2), (1, 1, 3, 1, 1), dtype=F64)
    assert x.ranks == (1, 1, 2, 1, 1) == unfolding_ranks(x.full())
    # ... and r_2 <= n_3 r_3 = 2
    with pytest.warns(UserWarning, match="clipped"):
        x = TT.random((2, 2, 2, 2), (1, 2, 4, 1, 1), dtype=F64)
    assert x.ranks == (1, 2, 2, 1, 1) == unfolding_ranks(x.full())


def test_random_and_zeros_bad_arguments():
    with pytest.raises(TypeError, match="dtype"):
        TT.random((2, 3), 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype"):
        TT.random((2, 3), 2, dtype=torch.complex128)
    with pytest.raises(TypeError, match="dtype"):
        TT.zeros((2, 3), 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="shape"):
        TT.random((2, 0, 3), 2)
    with pytest.raises(ValueError, match="shape"):
        TT.random((), 2)
    with pytest.raises(ValueError, match="positive"):
        TT.random((2, 3), 0)
    with pytest.raises(ValueError, match="boundary"):
        TT.random((2, 3), (2, 2, 1))
    with pytest.raises(TypeError, match="ranks"):
        TT.random((2, 3), (1.5,))


@given(tt_spec(max_r=3))
def test_zeros(spec):
    shape, ranks, _ = spec
    z = TT.zeros(shape, ranks, dtype=F64)
    assert z.ranks == ranks and z.shape == shape and z.dtype == F64
    assert torch.equal(z.full(), torch.zeros(shape, dtype=F64))
    assert float(z.norm()) == 0.0
    assert TT.zeros(shape).ranks == (1,) * (len(shape) + 1)


@given(shapes(max_d=5, max_n=4), st.integers(0, 2**31 - 1))
def test_from_dense_exact(shape, seed):
    a = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    x = TT.from_dense(a)
    assert x.shape == shape and x.dtype == F64
    assert rel_err(x.full(), a) <= 1e-12
    # a generic dense tensor has the maximal (feasible) TT-ranks
    assert x.ranks == feasible_ranks(shape)
    for c in x.cores[:-1]:
        assert_left_orth(c, 1e-12)


@given(tt_spec(max_d=5, max_n=4, max_r=3), st.sampled_from([0.3, 0.1, 1e-2, 1e-6]))
def test_from_dense_rel_eps_and_caps(spec, rel_eps):
    shape, ranks, seed = spec
    d = len(shape)
    g = torch.Generator().manual_seed(seed)
    # low-rank plus a small dense perturbation
    a = dense_ref(gaussian_cores(shape, ranks, seed)) + 1e-2 * torch.randn(shape, dtype=F64, generator=g)
    na = float(torch.linalg.vector_norm(a))
    x = TT.from_dense(a, rel_eps=rel_eps)
    assert float(torch.linalg.vector_norm(x.full() - a)) <= rel_eps * na + 1e-12 * na
    assert all(r <= f for r, f in zip(x.ranks, feasible_ranks(shape)))
    for cap in (1, 2):
        y = TT.from_dense(a, max_rank=cap)
        assert max(y.ranks) <= cap
        sv = unfolding_svals(a)
        caps = [min(cap, f) for f in feasible_ranks(shape)]
        bound = math.sqrt(sum(tail(sv[k], caps[k]) ** 2 for k in range(1, d)))
        assert float(torch.linalg.vector_norm(y.full() - a)) <= bound + 1e-12 * na
    z = TT.from_dense(a, ranks=[1] * (d - 1))
    assert z.ranks == (1,) * (d + 1)
    # combined: no cap exceeded
    w = TT.from_dense(a, max_rank=2, rel_eps=rel_eps)
    assert max(w.ranks) <= 2


def test_from_dense_recovers_low_rank_with_rel_eps():
    x = TT.random((3, 4, 5, 3), (1, 2, 3, 2, 1), dtype=F64,
                  generator=torch.Generator().manual_seed(5))
    y = TT.from_dense(x.full(), rel_eps=1e-12)
    assert y.ranks == x.ranks
    assert rel_err(y.full(), x.full()) <= 1e-12


def test_from_dense_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        TT.from_dense(torch.tensor([[1.0, float("nan")], [0.0, 1.0]], dtype=F64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        TT.from_dense(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="real floating"):
        TT.from_dense(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="real floating"):
        TT.from_dense(torch.ones(2, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        TT.from_dense([[1.0, 2.0]])
    with pytest.raises(ValueError, match="at least one dimension"):
        TT.from_dense(torch.tensor(1.0))
    with pytest.raises(ValueError, match="positive"):
        TT.from_dense(torch.ones(2, 0, 3))
    with pytest.raises(ValueError, match="rel_eps"):
        TT.from_dense(torch.ones(2, 3), rel_eps=-0.1)
    with pytest.warns(UserWarning, match="clipped"):
        x = TT.from_dense(torch.randn(2, 3, 4, dtype=F64), ranks=(1, 5, 5, 1))
    assert x.ranks == (1, 2, 4, 1)


# ---------------------------------------------------------------------------------------
# small and large orders
# ---------------------------------------------------------------------------------------

def test_order_one():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, dtype=F64, generator=g)
    x = TT.from_dense(v)
    assert x.ranks == (1, 1) and torch.allclose(x.full(), v, atol=1e-15)
    w = torch.randn(5, dtype=F64, generator=g)
    y = TT([w.reshape(1, 5, 1)])
    assert float(inner(x, y)) == pytest.approx(float(v @ w), rel=1e-13)
    assert float(x.norm()) == pytest.approx(float(v.norm()), rel=1e-13)
    assert (x + y).ranks == (1, 1) and torch.allclose((x + y).full(), v + w, atol=1e-14)
    assert torch.allclose((x - y).full(), v - w, atol=1e-14)
    assert torch.allclose(x.gather(torch.tensor([[4], [0]])), v[[4, 0]])
    for kw in ({}, {"side": "right"}, {"center": 0}):
        assert torch.allclose(orthogonalize(x, **kw).full(), v, atol=1e-15)
    for kw in ({}, {"max_rank": 1}, {"rel_eps": 0.5}):
        assert torch.allclose(tt_round(x, **kw).full(), v, atol=1e-15)
    r = TT.random((5,), 1, dtype=F64)
    assert float(r.norm()) == pytest.approx(1.0)


def test_order_two_is_truncated_svd():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 5, dtype=F64, generator=g)
    s = torch.linalg.svdvals(a)
    x = TT.from_dense(a)
    assert x.ranks == (1, 5, 1)
    for r in range(1, 6):
        y = tt_round(x, max_rank=r)
        assert y.ranks == (1, r, 1)
        # for d = 2 rounding is the best rank-r approximation (Eckart-Young)
        assert float(torch.linalg.vector_norm(y.full() - a)) == pytest.approx(tail(s, r), rel=1e-10, abs=1e-13)


def test_order_fifty():
    d = 50
    shape = (2,) * d
    g = torch.Generator().manual_seed(50)
    # an int rank 3 exceeds the feasible bound 2 at the first and last bond: clipped there
    with pytest.warns(UserWarning, match="clipped"):
        x = TT.random(shape, 3, dtype=F64, generator=g)
    assert x.ranks == (1, 2) + (3,) * (d - 3) + (2, 1)
    assert float(x.norm()) == pytest.approx(1.0, rel=1e-12)
    assert float(inner(x, x)) == pytest.approx(float(x.norm()) ** 2, rel=1e-12)
    y = tt_round(x + x)
    assert y.ranks == x.ranks
    # distance through inner products: ||y - 2x||^2 = <y,y> - 4<y,x> + 4<x,x>
    dist2 = float(inner(y, y) - 4 * inner(y, x) + 4 * inner(x, x))
    assert abs(dist2) <= 1e-12
    # and stably through the norm of the difference TT
    assert float((y - 2 * x).norm()) <= 1e-12
    # orthogonalization keeps the value
    z = orthogonalize(x, center=25)
    assert float((z - x).norm()) <= 1e-12
    # entries against products of core slices computed here
    idx = torch.randint(0, 2, (64, d), generator=g)
    vals = x.gather(idx)
    ref = torch.stack([entry_ref(x.cores, i) for i in idx.tolist()])
    assert torch.allclose(vals, ref, rtol=1e-12, atol=1e-14 * float(ref.abs().max()))
    # lossy rounding at d = 50 still meets the rel_eps bound (measured in TT arithmetic)
    w = x + TT.random(shape, 2, dtype=F64, generator=g) * 0.05  # rank 2 is feasible
    rw = tt_round(w, rel_eps=0.2)
    assert float((rw - w).norm()) <= 0.2 * float(w.norm()) * (1 + 1e-10)


# ---------------------------------------------------------------------------------------
# float32
# ---------------------------------------------------------------------------------------

@given(tt_spec(max_r=4))
def test_float32(spec):
    shape, ranks, seed = spec
    ranks = attainable(shape, ranks)
    g = torch.Generator().manual_seed(seed)
    x = TT.random(shape, ranks, dtype=F32, generator=g)
    y = TT.random(shape, ranks, dtype=F32, generator=g)
    assert x.dtype == F32 and x.full().dtype == F32
    dx, dy = dense_ref(x.cores), dense_ref(y.cores)  # float64 from float32 cores
    assert rel_err(x.full(), dx) <= 1e-5
    assert float(x.norm()) == pytest.approx(1.0, rel=1e-5)
    assert x.norm().dtype == F32 and inner(x, y).dtype == F32
    assert abs(float(inner(x, y)) - float((dx * dy).sum())) <= 1e-5
    assert rel_err((x - 0.5 * y).full(), dx - 0.5 * dy) <= 1e-5
    idx = torch.zeros(3, len(shape), dtype=torch.long)
    assert torch.allclose(x.gather(idx).double(), dx[tuple(idx.T)], atol=1e-5)
    z = orthogonalize(x, "left")
    _check_orth(z, len(shape) - 1, 1e-5)
    assert rel_err(z.full(), dx) <= 1e-5
    r2 = tt_round(x + x)
    assert r2.ranks == x.ranks and r2.dtype == F32
    assert rel_err(r2.full(), 2 * dx) <= 1e-5
    r = tt_round(x + y, rel_eps=0.3)
    assert float(torch.linalg.vector_norm(r.full().double() - dx - dy)) <= 0.3 * float(
        torch.linalg.vector_norm(dx + dy)) + 1e-5
    f = TT.from_dense(dx.float())
    assert f.dtype == F32 and rel_err(f.full(), dx) <= 1e-5


def test_mixed_float32_float64_rejected():
    x = TT.random((2, 3), 2, dtype=F64)
    y = TT.random((2, 3), 2, dtype=F32)
    with pytest.raises(TypeError, match="dtypes differ"):
        inner(x, y)
    with pytest.raises(TypeError, match="dtypes differ"):
        x + y


# ---------------------------------------------------------------------------------------
# autograd (float64 gradcheck on tiny sizes)
# ---------------------------------------------------------------------------------------
# round() and from_dense() differentiate through truncated SVDs: their gradients are
# defined only for distinct, nonzero kept singular values and are NOT guaranteed in
# general, so they are not gradchecked here (only a smoke test that backward runs).

SHAPE_G = (3, 4, 3)
RANKS_G = (1, 2, 2, 1)


def _grad_cores(seed=0):
    return [c.requires_grad_() for c in gaussian_cores(SHAPE_G, RANKS_G, seed)]


def test_gradcheck_full_norm_inner():
    cx, cy = _grad_cores(0), _grad_cores(1)
    assert torch.autograd.gradcheck(lambda *c: TT(list(c)).full(), cx)
    assert torch.autograd.gradcheck(lambda *c: TT(list(c)).norm(), cx)
    assert torch.autograd.gradcheck(
        lambda *c: inner(TT(list(c[:3])), TT(list(c[3:]))), cx + cy)


def test_gradcheck_gather_add_scale():
    cx, cy = _grad_cores(2), _grad_cores(3)
    idx = torch.tensor([[0, 1, 2], [2, 3, 0], [1, 0, 1], [2, 3, 2]])
    assert torch.autograd.gradcheck(lambda *c: TT(list(c)).gather(idx), cx)
    assert torch.autograd.gradcheck(
        lambda *c: (TT(list(c[:3])) + TT(list(c[3:]))).full(), cx + cy)
    assert torch.autograd.gradcheck(
        lambda *c: (TT(list(c[:3])) - TT(list(c[3:]))).full(), cx + cy)
    a = torch.tensor(0.7, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, *c: (a * TT(list(c))).full(), (a, *cx))
    assert torch.autograd.gradcheck(lambda a, *c: (TT(list(c)) / a).full(), (a, *cx))


@pytest.mark.parametrize("kw", [{"side": "left"}, {"side": "right"}, {"center": 1}])
def test_gradcheck_orthogonalize(kw):
    cx = _grad_cores(4)

    def f(*c):
        y = orthogonalize(TT(list(c)), **kw)
        return torch.cat([g.reshape(-1) for g in y.cores])

    assert torch.autograd.gradcheck(f, cx)


def test_round_backward_smoke():
    cx = _grad_cores(5)
    x = TT(cx) + TT(gaussian_cores(SHAPE_G, RANKS_G, 6))
    loss = tt_round(x, max_rank=2).norm()
    loss.backward()
    assert all(c.grad is not None and torch.isfinite(c.grad).all() for c in cx)


def test_requires_grad_and_detach():
    x = TT.random((2, 3, 4), 2, dtype=F64)
    assert not x.requires_grad
    x.requires_grad_()
    assert x.requires_grad and all(c.requires_grad for c in x.cores)
    d = x.detach()
    assert not d.requires_grad
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(d.cores, x.cores))


# ---------------------------------------------------------------------------------------
# to / clone / detach / repr
# ---------------------------------------------------------------------------------------

def test_to_clone_repr():
    x = TT.random((2, 3, 4), 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    dx = x.full().clone()
    c = x.clone()
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(c.cores, x.cores))
    c.cores[0].mul_(2.0)  # in-place on the clone's core
    assert torch.equal(x.full(), dx)
    assert torch.allclose(c.full(), 2 * dx)
    y = x.to(F32)
    assert y.dtype == F32 and all(g.dtype == F32 for g in y.cores)
    assert torch.allclose(y.full().double(), dx, atol=1e-6)
    z = x.to("meta")
    assert z.device.type == "meta" and z.shape == x.shape and z.ranks == x.ranks
    r = repr(x)
    assert r.startswith("TT(") and "shape=(2, 3, 4)" in r and "ranks=(1, 2, 2, 1)" in r
    assert "torch.float64" in r and "params=" in r and "device" not in r
    assert "device=meta" in repr(z)
    with pytest.raises(TypeError, match="dtype"):
        x.to(torch.int64)


# ---------------------------------------------------------------------------------------
# devices: meta (shapes only) and CUDA (when present)
# ---------------------------------------------------------------------------------------

def test_meta_device():
    # Every torch op used by the TT algebra (randn, linalg.qr, linalg.svd, matmul/bmm,
    # index_select, cat, pad, where, cumsum/flip) has a meta kernel in torch 2.13, so no
    # step is xfailed. Value-dependent steps are skipped on meta by design: finiteness and
    # index-range checks, and rank selection from rel_eps (see the end of this test).
    shape = (3, 4, 5, 2)
    x = TT.random(shape, (1, 3, 3, 2, 1), dtype=F64, device="meta")
    y = TT.random(shape, 2, dtype=F64, device="meta")
    assert x.device.type == "meta" and x.ranks == (1, 3, 3, 2, 1)
    z = TT.zeros(shape, 2, dtype=F64, device="meta")
    assert z.device.type == "meta" and z.ranks == (1, 2, 2, 2, 1)
    full = x.full()
    assert full.device.type == "meta" and full.shape == shape
    for s in (x.norm(), inner(x, y)):
        assert s.device.type == "meta" and s.shape == ()
    s = x + y
    assert s.device.type == "meta" and s.ranks == (1, 5, 5, 4, 1)
    assert (x - y).ranks == (1, 5, 5, 4, 1)
    for t in (2.0 * x, x * 2.0, -x, x / 2.0):
        assert t.device.type == "meta" and t.ranks == x.ranks
    idx = torch.zeros(7, 4, dtype=torch.long, device="meta")
    g = x.gather(idx)
    assert g.device.type == "meta" and g.shape == (7,)
    for kw in ({"side": "left"}, {"side": "right"}, {"center": 2}):
        o = orthogonalize(s, **kw)
        assert o.device.type == "meta" and o.shape == shape
        assert all(a <= b for a, b in zip(o.ranks, s.ranks))
    r = tt_round(s, max_rank=2)
    assert r.device.type == "meta" and r.ranks == (1, 2, 2, 2, 1)
    r = tt_round(s, ranks=(1, 3, 2, 1, 1))
    assert r.ranks == (1, 3, 2, 1, 1)
    # from_dense with caps only also runs (finiteness check is skipped on meta)
    f = TT.from_dense(torch.empty(shape, dtype=F64, device="meta"), max_rank=2)
    assert f.device.type == "meta" and max(f.ranks) <= 2
    # Choosing ranks from rel_eps (also round's and from_dense's default, a few-eps
    # rel_eps) needs singular values, unknown on meta: rank selection then keeps the caps
    # (the ranks the SVDs allow, clipped to the feasible bound) instead of reading values.
    for kw in ({"rel_eps": 1e-3}, {}):
        r = tt_round(s, **kw)
        assert r.device.type == "meta"
        # nothing truncated beyond the feasible bound
        assert r.ranks == tuple(min(a, f) for a, f in
                                zip(orthogonalize(s, "left").ranks, feasible_ranks(shape)))
    r = tt_round(s, rel_eps=1e-3, max_rank=2)
    assert r.ranks == (1, 2, 2, 2, 1)
    f = TT.from_dense(torch.empty(shape, dtype=F64, device="meta"), rel_eps=0.1)
    assert f.device.type == "meta" and f.ranks == feasible_ranks(shape)
    f = TT.from_dense(torch.empty(shape, dtype=F64, device="meta"))
    assert f.ranks == feasible_ranks(shape)


@pytest.mark.parametrize("device", DEVICES)
def test_core_ops_on_device(device):
    g = torch.Generator().manual_seed(0)
    x = TT.random((3, 4, 5), 2, dtype=F64, generator=g).to(device)
    y = TT.random((3, 4, 5), 3, dtype=F64, generator=g).to(device)
    assert x.device.type == device
    dx, dy = dense_ref([c.cpu() for c in x.cores]), dense_ref([c.cpu() for c in y.cores])
    assert rel_err(x.full().cpu(), dx) <= 1e-12
    assert float(inner(x, y)) == pytest.approx(float((dx * dy).sum()), abs=1e-12)
    assert float((x + y).norm()) == pytest.approx(float(torch.linalg.vector_norm(dx + dy)), rel=1e-12)
    r = tt_round(x + x)
    assert r.device.type == device and r.ranks == x.ranks
    assert rel_err(r.full().cpu(), 2 * dx) <= 1e-12
    o = orthogonalize(x + y, center=1)
    assert o.device.type == device
    _check_orth(o.to("cpu"), 1, 1e-12)
    idx = torch.tensor([[0, 0, 0], [2, 3, 4]], device=device)
    assert torch.allclose(x.gather(idx).cpu(), dx[tuple(idx.cpu().T)], atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_random_generator_on_device(device):
    gen = torch.Generator(device=device).manual_seed(3)
    a = TT.random((3, 4, 5), 2, dtype=F64, device=device, generator=gen)
    gen = torch.Generator(device=device).manual_seed(3)
    b = TT.random((3, 4, 5), 2, dtype=F64, device=device, generator=gen)
    assert a.device.type == device
    assert all(torch.equal(p, q) for p, q in zip(a.cores, b.cores))
    assert float(a.norm()) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_rank_choice_under_deterministic_algorithms(device, monkeypatch):
    """Choosing ranks from rel_eps summed the squared singular values with cumsum on their
    device; CUDA's floating cumsum has no deterministic kernel, so round/from_dense with
    rel_eps raised under torch.use_deterministic_algorithms(True) there (on the CPU the
    test only checks the ranks)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    g = torch.Generator().manual_seed(4)
    x = TT.random((3, 4, 5), 2, dtype=F64, generator=g).to(device)
    xb = TT.random((3, 4, 5), 2, dtype=F64, generator=g, batch=(2,)).to(device)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert tt_round(x + x, rel_eps=1e-8).ranks == x.ranks
        assert tt_round(xb + xb, rel_eps=1e-8).ranks == x.ranks
        assert TT.from_dense(x.full(), rel_eps=1e-8).ranks == x.ranks
    finally:
        torch.use_deterministic_algorithms(was)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------

def _ok_cores():
    return [torch.randn(1, 2, 3, dtype=F64), torch.randn(3, 4, 2, dtype=F64),
            torch.randn(2, 3, 1, dtype=F64)]


def test_bad_cores():
    c = _ok_cores()
    TT(c)  # sanity
    with pytest.raises(ValueError, match="3-D core"):
        TT([c[0], c[1].reshape(3, 8), c[2]])
    with pytest.raises(ValueError, match="3-D core"):
        TT([c[0], c[1], c[2].unsqueeze(0)])
    with pytest.raises(ValueError, match="ranks do not match"):
        TT([c[0], torch.randn(2, 4, 2, dtype=F64), c[2]])
    with pytest.raises(ValueError, match="boundary rank r_0"):
        TT([torch.randn(2, 2, 3, dtype=F64), c[1], c[2]])
    with pytest.raises(ValueError, match="boundary rank r_d"):
        TT([c[0], c[1], torch.randn(2, 3, 2, dtype=F64)])
    with pytest.raises(ValueError, match="positive"):
        TT([c[0], torch.randn(3, 0, 2, dtype=F64), c[2]])
    with pytest.raises(TypeError, match="real floating"):
        TT([x.to(torch.int64) for x in c])
    with pytest.raises(TypeError, match="complex"):
        TT([x.to(torch.complex128) for x in c])
    with pytest.raises(TypeError, match="differs"):
        TT([c[0], c[1].float(), c[2]])
    with pytest.raises(ValueError, match="device"):
        TT([c[0], c[1].to("meta"), c[2]])
    with pytest.raises(ValueError, match="at least one core"):
        TT([])
    with pytest.raises(TypeError, match="list of 3-D tensors"):
        TT(torch.randn(1, 2, 1))
    with pytest.raises(TypeError, match="torch.Tensor"):
        TT([c[0], c[1].numpy(), c[2]])


def test_bad_cores_off_the_cpu_first_and_non_finite_cores_requiring_grad():
    """The quick validation of single-TT cores: a first core on another device than the
    rest, and a NaN in cores requiring grad (tested without detached copies), are named."""
    c = _ok_cores()
    with pytest.raises(ValueError, match="device"):
        TT([c[0].to("meta"), c[1], c[2]])
    assert TT([x.to("meta") for x in c]).shape == (2, 4, 3)  # one device: valid
    bad = [x.clone().requires_grad_() for x in c]
    with torch.no_grad():
        bad[1][0, 0, 0] = float("nan")
    with torch.enable_grad(), pytest.raises(RuntimeError, match=r"cores\[1\]: contains NaN"):
        TT(bad)


def test_bad_gather_indices():
    x = TT.random((2, 3, 4), 2, dtype=F64)
    with pytest.raises(ValueError, match="out of range"):
        x.gather(torch.tensor([[0, 0, 4]]))
    with pytest.raises(ValueError, match="out of range"):
        x.gather(torch.tensor([[0, -1, 0]]))
    with pytest.raises(ValueError, match="out of range"):
        x.gather(torch.tensor([[2, 0, 0]]))
    with pytest.raises(ValueError, match="expected shape"):
        x.gather(torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="expected shape"):
        x.gather(torch.tensor([0, 0, 0]))
    with pytest.raises(TypeError, match="integer tensor"):
        x.gather(torch.tensor([[0.0, 0.0, 0.0]]))
    with pytest.raises(TypeError, match="integer tensor"):
        x.gather(torch.tensor([[True, False, True]]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        x.gather([[0, 0, 0]])
    with pytest.raises(ValueError, match="device"):
        x.gather(torch.zeros(1, 3, dtype=torch.long, device="meta"))


def test_bad_pairs():
    x = TT.random((2, 3, 4), 2, dtype=F64)
    with pytest.raises(ValueError, match="shapes differ"):
        inner(x, TT.random((2, 3, 5), 2, dtype=F64))
    with pytest.raises(ValueError, match="shapes differ"):
        x + TT.random((2, 3), 2, dtype=F64)
    with pytest.raises(ValueError, match="shapes differ"):
        add(x, TT.random((4, 3, 2), 2, dtype=F64))
    with pytest.raises(ValueError, match="devices differ"):
        inner(x, x.to("meta"))
    with pytest.raises(ValueError, match="devices differ"):
        x - x.to("meta")
    with pytest.raises(TypeError, match="two TT"):
        inner(x, x.full())


def test_norm_derivatives_at_rank_deficient_cores():
    """``norm`` of a sum whose cores have rank-deficient unfoldings (a zero block, as in
    the tangent TT of Riemannian autodiff): value, gradient and second derivatives equal
    those of the dense Frobenius norm (the QR sweep's own backward is NaN there)."""
    g = torch.Generator().manual_seed(5)
    y = TT.random((3, 4, 5), 3, dtype=torch.float64, generator=g)
    x = TT.random((3, 4, 5), 2, dtype=torch.float64, generator=g)
    cores = [c.clone() for c in x.cores]
    cores[0] = torch.cat([torch.zeros_like(cores[0]), cores[0]], 2)  # zero columns
    cores[1] = torch.cat([cores[1], cores[1]], 0)
    cs = [c.requires_grad_() for c in cores]
    ref = [c.detach().clone().requires_grad_() for c in cs]
    n = (TT(cs) - y).norm()
    nd = (TT(ref).full() - y.full()).norm()
    assert abs(float(n.detach()) - float(nd.detach())) <= 1e-13
    gr = torch.autograd.grad(n, cs, create_graph=True)
    gd = torch.autograd.grad(nd, ref, create_graph=True)
    for a, b in zip(gr, gd):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-12)
    h = torch.autograd.grad(sum((a * a).sum() for a in gr), cs)
    hd = torch.autograd.grad(sum((a * a).sum() for a in gd), ref)
    for a, b in zip(h, hd):
        assert torch.allclose(a, b, atol=1e-11)
    # without autograd: the QR sweep alone, the same value
    with torch.no_grad():
        assert float((TT(cs) - y).norm()) == float(n.detach())
