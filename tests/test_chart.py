"""Tests for ttmanifold.chart (STTP: the spectral tensor-train parameterization)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

from ttmanifold import TT, FixedTTRank, feasible_ranks
from ttmanifold.chart import (
    STTPChart,
    STTPParametrization,
    d_optimal_penalty,
    lipschitz_normalize,
    register_sttp,
)

F64 = torch.float64
F32 = torch.float32

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="CUDA not available")),
]
SPECTRA = ["learned", "identity", "lipschitz"]

PAPER_SHAPE = (2, 2, 2, 2, 3, 3, 2, 2, 2)
PAPER_RANKS = (1, 2, 4, 4, 4, 4, 4, 4, 2, 1)

# small (shape, ranks) cases used by the deterministic tests
CASES = [
    ((3, 4, 2), (1, 3, 2, 1)),
    ((2, 3, 2, 2), (1, 2, 3, 2, 1)),
    ((2, 2, 2, 2), (1, 2, 3, 2, 1)),
    ((4, 4), (1, 3, 1)),
    ((4, 4), (1, 4, 1)),  # square frames at the center
    ((1, 3, 1, 2), (1, 1, 2, 2, 1)),  # modes of size 1
]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    return float(((a - b).norm() / b.norm()).detach())


def attainable(shape, ranks):
    """Clip ranks to r_k <= r_{k-1} n_{k-1} and r_k <= n_k r_{k+1} (0-based modes)."""
    d = len(shape)
    r = list(ranks)
    for k in range(1, d):
        r[k] = min(r[k], r[k - 1] * shape[k - 1])
    for k in range(d - 1, 0, -1):
        r[k] = min(r[k], shape[k] * r[k + 1])
    return tuple(r)


@st.composite
def shapes_ranks(draw, dmax=6, nmax=5, rmax=None):
    d = draw(st.integers(1, dmax))
    shape = tuple(draw(st.lists(st.integers(1, nmax), min_size=d, max_size=d)))
    feas = feasible_ranks(shape)
    inner = [draw(st.integers(1, min(feas[k], rmax or feas[k]))) for k in range(1, d)]
    return shape, attainable(shape, [1] + inner + [1])


def all_centers(d):
    return [None] if d == 1 else list(range(1, d))


def unfolding(full, c):
    n = full.shape
    return full.reshape(math.prod(n[:c]), -1)


# ---------------------------------------------------------------------------------------
# dimension count (the non-redundancy claim)
# ---------------------------------------------------------------------------------------

@settings(max_examples=60)
@given(shapes_ranks())
def test_dim_equals_manifold_dim_every_center(sr):
    shape, ranks = sr
    M = FixedTTRank(shape, ranks)
    for c in all_centers(M.d):
        for spec in SPECTRA:
            ch = STTPChart(M, center=c, spectrum=spec)
            assert sum(b.size for b in ch.layout) == ch.dim
            if M.d == 1:
                assert ch.dim == M.dim == shape[0]
            elif spec == "identity":
                rc = ranks[ch.center]
                assert ch.dim == M.dim - rc * (rc + 1) // 2
            else:
                assert ch.dim == M.dim


def test_paper_example_128_parameters():
    M = FixedTTRank(PAPER_SHAPE, PAPER_RANKS)
    ch = STTPChart(M)
    assert ch.center == 4  # between the out modes (2,2,2,2) and the in modes (3,3,2,2,2)
    assert ch.dim == M.dim == 128
    assert STTPChart(M, center=4).dim == 128
    # the weight-matrix parametrization of the paper: W 16 x 72, r = 4
    P = STTPParametrization((16, 72), 4, PAPER_SHAPE)
    assert P.manifold.ranks == PAPER_RANKS and P.chart.center == 4 and P.chart.dim == 128


def test_default_center_largest_rank_nearest_middle():
    M = FixedTTRank((2, 3, 3, 3, 2), (1, 2, 3, 3, 2, 1))
    assert STTPChart(M).center == 2  # tie between bonds 2 and 3 (middle 2.5): smaller
    M = FixedTTRank((2, 4, 4, 2), (1, 2, 2, 2, 1))
    assert STTPChart(M).center == 2
    M = FixedTTRank((2, 4, 4, 2), (1, 2, 1, 2, 1))
    assert STTPChart(M).center == 1


def test_layout_and_split():
    M = FixedTTRank((3, 4, 2, 2), (1, 3, 4, 2, 1))
    ch = STTPChart(M, center=2)
    assert list(ch.parameters()) == [] and list(ch.buffers()) == []
    th = ch.random_theta(dtype=F64, generator=gen(0))
    parts = ch.split(th)
    assert list(parts) == ["U0", "U1", "s", "V2", "V3"]
    assert [b.kind for b in ch.layout] == ["reduced", "full", "spectrum", "full", "reduced"]
    assert torch.equal(torch.cat(list(parts.values())), th)
    assert parts["s"].shape == (4,)
    chi = STTPChart(M, center=2, spectrum="identity")
    assert list(chi.split(chi.random_theta(dtype=F64))) == ["U0", "U1", "V2", "V3"]
    assert chi.layout[1].kind == "reduced"


def test_unattainable_ranks_rejected():
    # feasible but r_2 > r_1 n_2: FixedTTRank itself may reject it; the chart does too
    with pytest.raises(ValueError, match="cannot be attained"):
        STTPChart(FixedTTRank((3, 1, 3), (1, 1, 3, 1)))


# ---------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------

@settings(max_examples=25)
@given(shapes_ranks(dmax=5, nmax=4, rmax=5), st.integers(0, 2**31 - 1), st.data())
def test_roundtrip_random_point(sr, seed, data):
    shape, ranks = sr
    M = FixedTTRank(shape, ranks)
    c = data.draw(st.sampled_from(all_centers(M.d)))
    ch = STTPChart(M, center=c)
    x = TT.random(shape, ranks, dtype=F64, generator=gen(seed))
    th = ch.inverse(x)
    assert th.shape == (ch.dim,) and th.dtype == F64
    assert rel(ch(th).full(), x.full()) < 1e-10


@settings(max_examples=25)
@given(shapes_ranks(dmax=5, nmax=4, rmax=5), st.integers(0, 2**31 - 1),
       st.sampled_from(SPECTRA), st.data())
def test_roundtrip_theta(sr, seed, spec, data):
    shape, ranks = sr
    M = FixedTTRank(shape, ranks)
    c = data.draw(st.sampled_from(all_centers(M.d)))
    ch = STTPChart(M, center=c, spectrum=spec)
    th = ch.random_theta(dtype=F64, generator=gen(seed))
    X = ch(th)
    th2 = ch.inverse(X)
    assert rel(ch(th2).full(), X.full()) < 1e-10


@pytest.mark.parametrize("spec", SPECTRA)
@pytest.mark.parametrize("shape,ranks", CASES)
def test_inverse_canonical_representative_is_fixed(shape, ranks, spec):
    M = FixedTTRank(shape, ranks)
    for c in range(1, M.d):
        ch = STTPChart(M, center=c, spectrum=spec)
        th = ch.inverse(ch(ch.random_theta(dtype=F64, generator=gen(c))))
        th2 = ch.inverse(ch(th))
        assert (th2 - th).abs().max() < 1e-8


def test_roundtrip_paper_example_all_centers_and_packed_point():
    M = FixedTTRank(PAPER_SHAPE, PAPER_RANKS)
    x = TT.random(PAPER_SHAPE, PAPER_RANKS, dtype=F64, generator=gen(1))
    p = M.pack_point(x)
    for c in range(1, M.d):
        ch = STTPChart(M, center=c)
        assert rel(ch(ch.inverse(x)).full(), x.full()) < 1e-10
        assert rel(ch(ch.inverse(p)).full(), x.full()) < 1e-10


def test_roundtrip_float32():
    M = FixedTTRank((3, 4, 2, 3), (1, 3, 4, 3, 1))
    x = TT.random(M.shape, M.ranks, dtype=F32, generator=gen(2))
    for spec in ("learned",):
        ch = STTPChart(M, spectrum=spec)
        th = ch.inverse(x)
        assert th.dtype == F32
        assert rel(ch(th).full(), x.full()) < 1e-5


@pytest.mark.parametrize("scale", [1e160, 1e-160])
def test_extreme_theta_and_points_roundtrip(scale):
    # Householder parameters beyond ~1e154 overflowed |w|^2 (NaN cores); points scaled by
    # 1e+-160 keep their chart coordinates (a spectrum scaled alike)
    M = FixedTTRank((3, 4, 2, 3), (1, 3, 4, 3, 1))
    ch = STTPChart(M)
    th = ch.random_theta(dtype=F64, generator=gen(5))
    spec = ch._by_name["s"]
    big = th.clone()
    big[:spec.start] *= scale
    big[spec.start + spec.size:] *= scale
    x = ch(big)
    for k, g in enumerate(x.cores):
        assert bool(torch.isfinite(g).all()), k
    assert rel(ch(ch.inverse(x)).full(), x.full()) < 1e-12
    y = ch(th)
    ys = TT([g * scale if k == 0 else g for k, g in enumerate(y.cores)])
    assert rel(ch(ch.inverse(ys)).full() / scale, y.full()) < 1e-12  # (norms of 1e160 overflow)


def test_point_is_packed_forward():
    M = FixedTTRank((3, 4, 2), (1, 3, 2, 1))
    ch = STTPChart(M)
    th = ch.random_theta(dtype=F64, generator=gen(3))
    p = ch.point(th)
    assert p.shape == (M.size,)
    assert rel(M.to_tt(p).full(), ch(th).full()) < 1e-12


def test_d1_identity_chart():
    M = FixedTTRank((5,), (1, 1))
    for spec in SPECTRA:
        ch = STTPChart(M, spectrum=spec)
        assert ch.center == 0 and ch.dim == 5
        th = torch.randn(5, dtype=F64, generator=gen(0))
        assert torch.equal(ch(th).full(), th)
        assert torch.equal(ch.inverse(ch(th)), th)
        assert ch.singular_values(th).shape == (0,)
    with pytest.raises(ValueError, match="center"):
        STTPChart(M, center=1)


# ---------------------------------------------------------------------------------------
# non-redundancy: full-rank Jacobian
# ---------------------------------------------------------------------------------------

JAC_CASES = [
    ((3, 4, 2), (1, 3, 2, 1), 1),
    ((3, 4, 2), (1, 3, 2, 1), 2),
    ((2, 3, 2, 2), (1, 2, 3, 2, 1), 2),
    ((2, 2, 2, 2), (1, 2, 3, 2, 1), 1),
    ((2, 2, 2, 2), (1, 2, 3, 2, 1), 3),
    ((4, 4), (1, 4, 1), 1),
    ((1, 3, 1, 2), (1, 1, 2, 2, 1), 2),
]


@pytest.mark.parametrize("spec", SPECTRA)
@pytest.mark.parametrize("shape,ranks,c", JAC_CASES)
def test_jacobian_full_column_rank(shape, ranks, c, spec):
    M = FixedTTRank(shape, ranks)
    ch = STTPChart(M, center=c, spectrum=spec)
    th = ch.random_theta(dtype=F64, generator=gen(10 + c))
    J = torch.autograd.functional.jacobian(lambda t: ch(t).full().reshape(-1), th)
    sv = torch.linalg.svdvals(J)
    rank = int((sv > 1e-9 * sv[0]).sum())
    # the Lipschitz chart is invariant under positive scaling of s
    expected = ch.dim - 1 if spec == "lipschitz" else ch.dim
    assert rank == expected, (rank, ch.dim, sv[-3:])


# ---------------------------------------------------------------------------------------
# frames and spectrum
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECTRA)
@pytest.mark.parametrize("shape,ranks", CASES)
def test_frames_orthonormal_and_spectrum(shape, ranks, spec):
    M = FixedTTRank(shape, ranks)
    for c in range(1, M.d):
        ch = STTPChart(M, center=c, spectrum=spec)
        th = ch.random_theta(dtype=F64, generator=gen(20 + c))
        U, s, V = ch.forward_cores(th)
        assert len(U) == c and len(V) == M.d - c
        for u in U:
            L = u.reshape(-1, u.shape[2])
            assert (L.T @ L - torch.eye(L.shape[1], dtype=F64)).abs().max() < 1e-12
        for v in V:
            R = v.reshape(v.shape[0], -1)
            assert (R @ R.T - torch.eye(R.shape[0], dtype=F64)).abs().max() < 1e-12
        sv_dense = torch.linalg.svdvals(unfolding(ch(th).full(), c))[: ranks[c]]
        sv = ch.singular_values(th)
        assert torch.allclose(s, sv)
        assert torch.allclose(torch.sort(sv.abs(), descending=True).values, sv_dense,
                              atol=1e-12, rtol=1e-10)
        if spec == "lipschitz":
            assert abs(float(sv_dense[0]) - 1.0) < 1e-12
            assert torch.allclose(sv, th[ch.layout[c].start:][: ranks[c]]
                                  / th[ch.layout[c].start:][: ranks[c]].abs().max())
        if spec == "identity":
            assert torch.equal(sv, torch.ones(ranks[c], dtype=F64))
            assert (sv_dense - 1).abs().max() < 1e-12


def test_forward_puts_s_into_core_c_minus_1():
    M = FixedTTRank((3, 4, 2, 2), (1, 3, 4, 2, 1))
    ch = STTPChart(M, center=2)
    th = ch.random_theta(dtype=F64, generator=gen(4))
    U, s, V = ch.forward_cores(th)
    cores = ch(th).cores
    assert torch.equal(cores[0], U[0])
    assert torch.allclose(cores[1], U[1] * s)
    assert torch.equal(cores[2], V[0]) and torch.equal(cores[3], V[1])


def test_forward_cores_batched():
    M = FixedTTRank((3, 4, 2), (1, 3, 2, 1))
    ch = STTPChart(M)
    th = torch.randn(2, 3, ch.dim, dtype=F64, generator=gen(5))
    U, s, V = ch.forward_cores(th)
    assert ch.center == 1 and s.shape == (2, 3, 3)
    U1, s1, V1 = ch.forward_cores(th[1, 2])
    for a, b in zip(U + V, U1 + V1):
        assert a.shape[:2] == (2, 3)
        assert torch.allclose(a[1, 2], b, atol=1e-14)


def test_identity_orthogonal_init_and_random_theta():
    M = FixedTTRank((3, 4, 2, 2), (1, 3, 4, 2, 1))
    for spec in SPECTRA:
        ch = STTPChart(M, spectrum=spec)
        for th in (ch.identity_init(dtype=F64), ch.orthogonal_init(dtype=F64)):
            assert th.shape == (ch.dim,)
            U, s, V = ch.forward_cores(th)
            assert torch.equal(s, torch.ones(4, dtype=F64))
            assert ch.center == 2
            sv = torch.linalg.svdvals(unfolding(ch(th).full(), ch.center))[:4]
            assert torch.allclose(sv, torch.ones(4, dtype=F64))
            assert rel(ch(ch.inverse(ch(th))).full(), ch(th).full()) < 1e-12
        th = ch.identity_init(dtype=F64)
        U, s, V = ch.forward_cores(th)
        frames = [u.reshape(-1, u.shape[2]) for u in U] + \
            [v.reshape(v.shape[0], -1).T for v in V]
        for F in frames:  # zero Householder parameters: -I_{m x r}
            assert torch.equal(F, -torch.eye(*F.shape, dtype=F64))
        # the identity frames meet in rank 1 at bond 1 (declared 3): outside the manifold
        assert torch.linalg.matrix_rank(unfolding(ch(th).full(), 1)).item() == 1
        with pytest.raises(ValueError, match="TT-rank at bond 1"):
            ch.point(th)
        ch.point(ch.orthogonal_init(dtype=F64))  # full rank: packs with the rank check
        a = ch.random_theta(dtype=F32, generator=gen(7))
        b = ch.random_theta(dtype=F32, generator=gen(7))
        assert a.dtype == F32 and torch.equal(a, b)
        if spec != "identity":
            blk = ch.split(a)["s"]
            assert bool(((blk >= 0.5) & (blk < 1.5)).all())


def test_spectral_helpers():
    s = torch.tensor([2.0, -3.0], dtype=F64, requires_grad=True)
    pen = d_optimal_penalty(s)
    assert torch.allclose(pen, torch.tensor(-math.log(6.0), dtype=F64))
    pen.backward()
    assert torch.allclose(s.grad, torch.tensor([-0.5, 1.0 / 3.0], dtype=F64))
    assert torch.equal(lipschitz_normalize(torch.tensor([2.0, -4.0])), torch.tensor([0.5, -1.0]))
    assert lipschitz_normalize(torch.ones(3, 2) * 5).eq(1).all()
    assert d_optimal_penalty(torch.ones(4, 3)).shape == (4,)
    with pytest.raises(TypeError, match="s:"):
        d_optimal_penalty([1.0])
    # an integer spectrum was cast to the default dtype, a complex one normalized to
    # complex values, a bool one failed inside torch
    for bad in (torch.tensor([2, 4]), torch.tensor([1j, 2.0]), torch.tensor([True, False])):
        for fn in (lipschitz_normalize, d_optimal_penalty):
            with pytest.raises(TypeError, match=f"s: expected a real floating tensor, got "
                                                f"dtype {bad.dtype}"):
                fn(bad)
    # D-optimal penalty through the chart is differentiable
    M = FixedTTRank((3, 4, 2), (1, 3, 2, 1))
    ch = STTPChart(M)
    th = ch.random_theta(dtype=F64).requires_grad_()
    d_optimal_penalty(ch.singular_values(th)).backward()
    assert th.grad is not None and th.grad[ch.layout[1].start:].abs().sum() > 0


# ---------------------------------------------------------------------------------------
# spectrum constraints in the inverse
# ---------------------------------------------------------------------------------------

def test_lipschitz_inverse_strict_or_project():
    M = FixedTTRank((3, 4, 2), (1, 3, 2, 1))
    ch = STTPChart(M, spectrum="lipschitz")
    x = TT.random(M.shape, M.ranks, dtype=F64, generator=gen(8)) * 3.0
    with pytest.raises(ValueError, match="largest singular value.*project=True"):
        ch.inverse(x)
    smax = torch.linalg.svdvals(unfolding(x.full(), ch.center))[0]
    th = ch.inverse(x, project=True)
    assert rel(ch(th).full(), x.full() / smax) < 1e-10
    # a normalized point is accepted as is and reproduced exactly
    assert rel(ch(ch.inverse(x / smax)).full(), x.full() / smax) < 1e-10
    with pytest.raises(ValueError, match="zero"):
        ch.inverse(x * 0.0, project=True)


def test_identity_inverse_strict_or_project_and_domain():
    M = FixedTTRank((3, 4, 2), (1, 3, 2, 1))
    ch = STTPChart(M, spectrum="identity")
    x = TT.random(M.shape, M.ranks, dtype=F64, generator=gen(9))
    with pytest.raises(ValueError, match="deviate from 1"):
        ch.inverse(x)
    th = ch.inverse(x, project=True)
    sv = torch.linalg.svdvals(unfolding(ch(th).full(), ch.center))[:2]
    assert torch.allclose(sv, torch.ones(2, dtype=F64))
    # square V_c: only one orientation of O(r_c) is reachable without signs
    M = FixedTTRank((4, 4), (1, 4, 1))
    ch = STTPChart(M, spectrum="identity")
    eye = torch.eye(4, dtype=F64)
    th = ch.inverse(TT.from_dense(eye, ranks=(1, 4, 1)))
    assert torch.allclose(th, torch.zeros(6, dtype=F64), atol=1e-12)
    assert torch.allclose(ch(th).full(), eye)
    flip = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="identity' STTP chart"):
        ch.inverse(TT.from_dense(flip, ranks=(1, 4, 1)))
    # the learned chart covers both
    chl = STTPChart(M)
    assert torch.allclose(chl(chl.inverse(TT.from_dense(flip, ranks=(1, 4, 1)))).full(), flip)


def test_outside_domain_singular_reduced_block():
    M = FixedTTRank((3, 3, 3), (1, 2, 2, 1))
    U0 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=F64).reshape(1, 3, 2)
    g = gen(11)
    x = TT([U0, torch.randn(2, 3, 2, generator=g, dtype=F64),
            torch.randn(2, 3, 1, generator=g, dtype=F64)])
    with pytest.raises(ValueError, match=r"outside the domain.*U_0.*center=1"):
        STTPChart(M, center=2).inverse(x)
    ch = STTPChart(M, center=1)  # re-centering: U_0 becomes a full frame
    assert rel(ch(ch.inverse(x)).full(), x.full()) < 1e-10


# ---------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECTRA)
def test_gradcheck(spec):
    M = FixedTTRank((2, 3, 2), (1, 2, 2, 1))
    for c in (1, 2):
        ch = STTPChart(M, center=c, spectrum=spec)
        th = ch.random_theta(dtype=F64, generator=gen(12)).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: ch(t).full(), (th,),
                                        fast_mode=spec != "learned")


# ---------------------------------------------------------------------------------------
# torch.nn.utils.parametrize integration
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_parametrize_linear(device):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6, dtype=F64, device=device)
    register_sttp(lin, "weight", 2, shape=(2, 3, 2, 4))
    assert parametrize.is_parametrized(lin, "weight")
    P = lin.parametrizations.weight[0]
    theta = lin.parametrizations.weight.original
    assert lin.weight.shape == (6, 8) and lin.weight.dtype == F64
    assert P.chart.center == 2  # between out modes (2, 3) and in modes (2, 4)
    assert theta.shape == (P.chart.dim,) and theta.device.type == torch.device(device).type
    assert set(lin.state_dict()) == {"bias", "parametrizations.weight.original"}
    # assignment calls the inverse chart: the weight becomes the rank-2 TT-SVD of W
    W = torch.randn(6, 8, dtype=F64, device=device)
    lin.weight = W
    ref = TT.from_dense(W.reshape(2, 3, 2, 4), ranks=P.manifold.ranks).full().reshape(6, 8)
    assert rel(lin.weight, ref) < 1e-10
    # an exactly representable weight is reproduced
    lin.weight = ref
    assert rel(lin.weight, ref) < 1e-10
    # training changes theta and decreases the loss
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    x = torch.randn(32, 8, dtype=F64, device=device)
    y = torch.randn(32, 6, dtype=F64, device=device)
    before = theta.detach().clone()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ((lin(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert not torch.allclose(theta.detach(), before)
    assert losses[-1] < losses[0]


def test_parametrize_spectra_and_default_shape():
    torch.manual_seed(1)
    lin = torch.nn.Linear(8, 6)  # float32
    register_sttp(lin, "weight", 3, spectrum="lipschitz")  # shape = (6, 8): U diag(s) V^T
    assert lin.parametrizations.weight.original.shape == (6 * 3 - 6 + 3 + 8 * 3 - 6,)
    assert abs(float(torch.linalg.matrix_norm(lin.weight.detach(), 2)) - 1.0) < 1e-5
    lin.weight = 5.0 * torch.randn(6, 8)
    assert abs(float(torch.linalg.matrix_norm(lin.weight.detach(), 2)) - 1.0) < 1e-5
    lin2 = torch.nn.Linear(8, 6, dtype=F64)
    register_sttp(lin2, "weight", 2, shape=(2, 3, 2, 4), spectrum="identity")
    sv = torch.linalg.svdvals(lin2.weight)
    assert torch.allclose(sv[:2], torch.ones(2, dtype=F64)) and sv[2:].abs().max() < 1e-12


def test_parametrize_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        STTPParametrization((6, 8), 2, (2, 3, 2, 2))
    P = STTPParametrization((6, 8), 2, (2, 3, 2, 4))
    with pytest.raises(ValueError, match="W: expected shape"):
        P.right_inverse(torch.randn(8, 6))
    with pytest.raises(ValueError, match="W: contains NaN"):  # was named "x", the TT
        P.right_inverse(torch.full((6, 8), float("nan")))
    with pytest.raises(ValueError, match="name"):
        register_sttp(torch.nn.Linear(3, 3), "weights", 2)
    lin = register_sttp(torch.nn.Linear(6, 4), "weight", 2)
    with pytest.raises(ValueError, match="parametrized already"):  # was the chart's theta error
        register_sttp(lin, "weight", 2)


# ---------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------

def test_meta_device():
    M = FixedTTRank((3, 4, 2, 2), (1, 3, 4, 2, 1))
    for spec in SPECTRA:
        ch = STTPChart(M, spectrum=spec)
        th = ch.random_theta(device="meta")
        X = ch(th)
        assert X.device.type == "meta" and X.ranks == M.ranks
        assert ch.orthogonal_init(device="meta").device.type == "meta"
        assert ch.identity_init(device="meta").device.type == "meta"
        assert ch.point(th).shape == (M.size,)
        x = TT.random(M.shape, M.ranks, device="meta")
        t = ch.inverse(x)
        assert t.device.type == "meta" and t.shape == (ch.dim,)
    lin = torch.nn.Linear(8, 6, device="meta")
    register_sttp(lin, "weight", 2, shape=(2, 3, 2, 4))
    assert lin.weight.shape == (6, 8) and lin.weight.device.type == "meta"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_device_dtype_follow_inputs(device, dtype):
    M = FixedTTRank((3, 4, 2), (1, 3, 2, 1))
    ch = STTPChart(M)
    th = ch.random_theta(dtype=dtype, device=device)
    X = ch(th)
    assert X.dtype == dtype and X.device.type == torch.device(device).type
    t = ch.inverse(X)
    assert t.dtype == dtype and t.device == th.device
    assert rel(ch(t).full(), X.full()) < (1e-4 if dtype == F32 else 1e-10)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------

def test_identity_domain_hint_names_a_working_center():
    # a matrix with a zero row (an embedding's padding row) leaves the identity chart's
    # domain at U_{c-1}; the hint named the chart's own center, as if U_{c-1} could be full
    torch.manual_seed(0)
    W = torch.randn(10, 8, dtype=F64)
    W[0] = 0
    M = FixedTTRank((2, 5, 2, 2, 2), (1, 2, 2, 2, 2, 1))
    x = TT.from_dense(W.reshape(M.shape), ranks=M.ranks)
    with pytest.raises(ValueError, match=r"center=2: .* core U_1 .*\(e\.g\. center=1 "):
        STTPChart(M, center=2, spectrum="identity").inverse(x, project=True)
    ch = STTPChart(M, center=1, spectrum="identity")  # the suggested center works
    ch.inverse(x, project=True)


def test_bad_inputs():
    M = FixedTTRank((3, 4, 2), (1, 3, 2, 1))
    ch = STTPChart(M)
    with pytest.raises(ValueError, match="theta: expected shape"):
        ch(torch.zeros(ch.dim + 1, dtype=F64))
    with pytest.raises(ValueError, match="theta: expected shape .*forward_cores"):
        ch(torch.zeros(2, ch.dim, dtype=F64))
    with pytest.raises(ValueError, match="theta"):
        ch.singular_values(torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match="theta: expected dtype"):
        ch(torch.zeros(ch.dim, dtype=torch.int64))
    with pytest.raises(TypeError, match="theta"):
        ch([0.0] * ch.dim)
    for bad in (0, 3, -1, 1.5, True):
        with pytest.raises(ValueError, match="center"):
            STTPChart(M, center=bad)
    with pytest.raises(ValueError, match="spectrum"):
        STTPChart(M, spectrum="free")
    with pytest.raises(TypeError, match="manifold"):
        STTPChart((3, 4, 2))
    with pytest.raises(ValueError, match="x: TT shape"):
        ch.inverse(TT.random((3, 4, 3), (1, 3, 2, 1), dtype=F64))
    with pytest.raises(ValueError, match="x: TT ranks"):
        ch.inverse(TT.random((3, 4, 2), (1, 2, 2, 1), dtype=F64))
    with pytest.raises(ValueError, match="x: expected a TT or a packed point"):
        ch.inverse(torch.zeros(M.size + 1, dtype=F64))
    with pytest.raises(TypeError, match="x: expected a TT"):
        ch.inverse("x")
    x = TT.random((3, 4, 2), (1, 3, 2, 1), dtype=F64)
    cores = x.cores
    cores[1] = cores[1].clone()
    cores[1][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x: core 1"):
        ch.inverse(TT(cores, check=False))  # TT(cores) itself rejects NaN since the tt rework
    with pytest.raises(TypeError, match="dtype"):
        ch.random_theta(dtype=torch.float16)
