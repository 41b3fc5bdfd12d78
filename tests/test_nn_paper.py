"""Paper fidelity of ttmanifold.nn (Obukhov et al. 2021 and its reference code): the
reference tensorization and rank rule, the non-redundant SVDP with identity spectrum, the
normalized spectrum, the near-identity initialization, and the shared tensorization of
STTPParametrization. Dense float64 references throughout."""
import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from ttmanifold import FixedTTRank, register_sttp
from ttmanifold.nn import (
    STTPConv2d,
    STTPLinear,
    SVDPConv2d,
    SVDPLinear,
    Tensorization,
    lipschitz_normalize,
    sttp_dof,
    sttp_ranks,
    svdp_dof,
)

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _ref_ranks(shape, r):
    """The reference code's rule, written out: min(left product, right product, r)."""
    d = len(shape)
    return tuple(min(math.prod(shape[:k]), math.prod(shape[k:]), r) for k in range(d + 1))


@given(out_f=st.integers(1, 40), in_c=st.integers(1, 12), k=st.integers(1, 3),
       rank=st.integers(1, 80))
def test_reference_tensorization_and_ranks(out_f, in_c, k, rank):
    layer = STTPConv2d(in_c, out_f, k, rank=rank, bias=False)
    t = layer.tensorization
    primes = lambda n: [p for p in range(2, n + 1) if n % p == 0 and all(p % q for q in range(2, p))]  # noqa: E731
    assert t.order == "natural"
    assert math.prod(t.out_modes) == out_f and all(m in primes(out_f) for m in t.out_modes
                                                   if m > 1)
    assert list(t.out_modes) == sorted(t.out_modes)
    if k > 1:
        assert t.in_modes[-1] == k * k  # the kernel as one mode, last
    assert layer.ranks == _ref_ranks(layer.tensor_shape, rank)
    # the spectral rank is min(r, C_out, C_in k^2); any rank is accepted
    assert layer.ranks[layer.center] == min(rank, out_f, in_c * k * k)
    assert layer.theta.numel() == FixedTTRank(layer.tensor_shape, layer.ranks).dim


def test_inner_bonds_may_exceed_the_spectral_rank():
    # 4 x 72 at r = 16: spectral rank 4, inner bonds up to 16
    assert sttp_ranks((2, 2), (2, 2, 2, 3, 3), 16, order="natural") == (1, 2, 4, 8, 16, 9, 3, 1)
    layer = STTPLinear(72, 4, rank=16)
    assert layer.ranks == (1, 2, 4, 8, 16, 9, 3, 1)
    x = torch.randn(3, 72)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    assert SVDPLinear(72, 4, rank=16).s.numel() == 4


def test_tensorization_maps_against_dense_reference():
    W = torch.randn(12, 30, dtype=DT)
    for order in ("natural", "reversed"):
        t = Tensorization((3, 4), (2, 3, 5), order)
        T = t.matrix_to_tensor(W)
        assert T.shape == ((3, 4, 2, 3, 5) if order == "natural" else (3, 4, 5, 3, 2))
        for i in range(12):
            for j in (0, 7, 29):
                a, b = divmod(i, 4)
                j1, rest = divmod(j, 15)
                j2, j3 = divmod(rest, 5)
                idx = (a, b, j1, j2, j3) if order == "natural" else (a, b, j3, j2, j1)
                assert T[idx] == W[i, j]
        assert torch.equal(t.tensor_to_matrix(T), W)
    with pytest.raises(ValueError, match="order"):
        Tensorization((3,), (2,), "sideways")


def test_explicit_modes_and_orders():
    a = STTPLinear(72, 16, rank=4, out_modes=(4, 4), in_modes=(8, 9), order="natural")
    assert a.tensor_shape == (4, 4, 8, 9)
    b = STTPLinear(72, 16, rank=4, out_modes=(4, 4), in_modes=(8, 9))  # explicit: reversed
    assert b.tensor_shape == (4, 4, 9, 8)
    c = STTPConv2d(6, 8, 3, rank=4, tensorization="section8")
    assert c.tensor_shape == (2, 2, 2, 3, 3, 3, 2) and c.tensorization.order == "reversed"
    t = Tensorization((2, 2, 4), (9, 8), "natural")
    d = STTPLinear(72, 16, rank=4, tensorization=t)
    assert d.tensorization == t and d.tensor_shape == (2, 2, 4, 9, 8)
    with pytest.raises(ValueError, match="tensorization"):
        STTPLinear(72, 8, rank=4, tensorization=t)
    with pytest.raises(ValueError, match="tensorization"):
        STTPLinear(8, 6, rank=2, tensorization="paper")
    with pytest.raises(ValueError, match="order"):
        STTPLinear(8, 6, rank=2, order="up")
    with pytest.raises(ValueError, match="out_modes"):
        SVDPLinear(8, 6, rank=2, out_modes=(2, 3))


@pytest.mark.parametrize("order", ["natural", "reversed"])
def test_from_dense_exact_in_both_orders(order):
    """A weight whose tensorization has the layer's TT-ranks is recovered exactly."""
    torch.manual_seed(0)
    scheme = "reference" if order == "natural" else "section8"
    src = STTPConv2d(6, 8, 3, rank=3, init="random", dtype=DT, tensorization=scheme)
    W = src.weight.detach()
    dst = STTPConv2d.from_dense(W, 3, tensorization=scheme)
    torch.testing.assert_close(dst.weight, W, rtol=0, atol=1e-12)


def test_svdp_identity_is_non_redundant():
    for d_out, d_in, r in ((16, 72, 4), (8, 8, 8), (5, 9, 3)):
        layer = SVDPLinear(d_in, d_out, rank=r, spectrum="identity", bias=False, dtype=DT)
        n = layer.num_weight_params()
        assert n == svdp_dof(d_out, d_in, r, spectrum="identity")
        assert n == r * (d_out - r) + d_in * r - r * (r + 1) // 2
        # full column rank of the Jacobian of the weight: no redundant parameter
        p0 = torch.cat([layer.u_params, layer.v_params]).detach() + 0.1 * torch.randn(n, dtype=DT)
        nu = layer.u_params.numel()

        J = torch.autograd.functional.jacobian(lambda p: _w(layer, p, nu), p0).reshape(-1, n)
        assert torch.linalg.matrix_rank(J).item() == n
    assert svdp_dof(16, 72, 4, spectrum="identity") == 336 - 4 - 4 * 3 // 2


def _w(layer, p, nu):
    """The weight U V^T from the packed parameters (the layer's own frames)."""
    from ttmanifold.householder import frame_from_full, frame_from_reduced
    r = layer.weight_param.r
    U = frame_from_reduced(p[:nu], layer.out_features, r)
    V = frame_from_full(p[nu:], layer.in_features, r)
    return U @ V.T


def test_svdp_identity_from_dense_is_the_polar_factor():
    g = torch.Generator().manual_seed(1)
    A = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=DT))[0]
    B = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=DT))[0]
    W = A @ torch.diag(torch.tensor([3.0, 2.0, 0.5], dtype=DT)) @ B.T
    layer = SVDPLinear.from_dense(W, 3, spectrum="identity")
    torch.testing.assert_close(layer.weight, A @ B.T, rtol=0, atol=1e-12)
    conv = SVDPConv2d(4, 6, 3, rank=6, spectrum="identity", dtype=DT)
    assert conv.num_weight_params() == 0 + 36 * 6 - 21  # square U: no U parameter


def test_lipschitz_normalize_is_clamped():
    assert torch.equal(lipschitz_normalize(torch.zeros(3)), torch.zeros(3))
    s = torch.tensor([2.0, -4.0], dtype=DT, requires_grad=True)
    out = lipschitz_normalize(s)
    assert torch.equal(out.detach(), torch.tensor([0.5, -1.0], dtype=DT))
    layer = SVDPLinear(10, 8, rank=3, spectrum="lipschitz", dtype=DT)
    assert torch.equal(layer.s.detach(), torch.ones(3, dtype=DT))  # the paper's s = 1
    assert torch.linalg.matrix_norm(layer.weight, ord=2).item() == pytest.approx(1.0)


@pytest.mark.parametrize("cls", [STTPLinear, SVDPLinear])
def test_near_identity_init(cls):
    """Frames QR(F + 1e-4 noise), F the orthogonal init's (I for SVDP): W within ~1e-3 of
    the orthogonal init up to signs, orthonormal frames, spectrum 1 for "lipschitz"."""
    torch.manual_seed(2)
    layer = cls(24, 16, rank=4, spectrum="lipschitz", init="near_identity", dtype=DT)
    ortho = cls(24, 16, rank=4, spectrum="lipschitz", init="orthogonal", dtype=DT)
    W, W0 = layer.weight.detach(), ortho.weight.detach()
    assert 0 < (W.abs() - W0.abs()).abs().max().item() < 1e-2
    sv = torch.linalg.svdvals(W)[:4]
    torch.testing.assert_close(sv, torch.ones(4, dtype=DT), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scheme", ["reference", "section8"])
def test_parametrization_shares_the_layer_tensorization(scheme):
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 8, 3, bias=False, dtype=DT)
    layer = STTPConv2d.from_dense(conv, 3, tensorization=scheme)
    register_sttp(conv, "weight", 3, tensorization=scheme)
    P = conv.parametrizations.weight[0]
    assert P.chart.shape == layer.tensor_shape and P.chart.center == layer.center
    assert P.manifold.ranks == layer.ranks
    torch.testing.assert_close(conv.weight, layer.weight, rtol=1e-10, atol=1e-12)
    assert sttp_dof(layer.out_modes, layer.in_modes, 3, order=layer.tensorization.order) == \
        P.chart.dim


_MODES = st.lists(st.integers(1, 4), min_size=1, max_size=3)


@given(out_modes=_MODES, in_modes=_MODES, order=st.sampled_from(["natural", "reversed"]),
       rank=st.integers(1, 12), batch=st.integers(1, 5), seed=st.integers(0, 99))
def test_explicit_modes_property(out_modes, in_modes, order, rank, batch, seed):
    """Any modes and order: W is the train's tensor read through the tensorization (an
    independent permutation reference) and every forward path equals x W^T + b."""
    d_out, d_in = math.prod(out_modes), math.prod(in_modes)
    torch.manual_seed(seed)
    layer = STTPLinear(d_in, d_out, rank=rank, out_modes=out_modes, in_modes=in_modes,
                       order=order, init="random", dtype=DT)
    T = layer.tt().full()
    D, E = len(out_modes), len(in_modes)
    if order == "reversed":
        T = T.permute(tuple(range(D)) + tuple(range(D + E - 1, D - 1, -1)))
    torch.testing.assert_close(layer.weight, T.reshape(d_out, d_in), rtol=1e-12, atol=1e-12)
    x = torch.randn(batch, d_in, dtype=DT)
    ref = x @ layer.weight.T + layer.bias
    for path in ("dense", "tt"):
        layer.contraction = path
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)
