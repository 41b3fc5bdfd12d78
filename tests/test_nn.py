"""Tests of ttmanifold.nn: STTP / SVDP layers, their forward paths, conversions and
model-level utilities."""
import math

import geoopt
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from ttmanifold import TT
from ttmanifold.chart import d_optimal_penalty
from ttmanifold.nn.planner import Plan
from ttmanifold.nn import (
    STTPConv2d,
    STTPConvTranspose2d,
    STTPEmbedding,
    STTPLinear,
    SVDPConv2d,
    SVDPLinear,
    compression_ratio,
    factorize,
    replace_layers,
    spectral_penalty,
    sttp_dof,
    sttp_ranks,
    svdp_dof,
)

DT = torch.float64
PATHS = ("dense", "tt", "auto")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------
# tensorization and parameter counts
# ---------------------------------------------------------------------------------------

def test_factorize():
    assert factorize(72) == (2, 2, 2, 3, 3)
    assert factorize(16) == (2, 2, 2, 2)
    assert factorize(1) == (1,)
    assert factorize(97) == (97,)
    assert factorize(1024, max_factor=4) == (4, 4, 4, 4, 4)
    assert factorize(72, max_factor=4) == (2, 3, 3, 4)
    assert factorize(2 * 97, max_factor=8) == (2, 97)
    for n in range(1, 200):
        assert math.prod(factorize(n)) == n
    with pytest.raises(ValueError, match="n"):
        factorize(0)
    with pytest.raises(ValueError, match="max_factor"):
        factorize(8, max_factor=1)


def test_paper_example_counts():
    """W 16 x 72, r = 4 (Obukhov et al. 2021): 128 STTP vs 336 SVD vs 1152 dense."""
    out_modes, in_modes = (2, 2, 2, 2), (2, 2, 2, 3, 3)
    assert sttp_ranks(out_modes, in_modes, 4) == (1, 2, 4, 4, 4, 4, 4, 4, 2, 1)
    assert sttp_dof(out_modes, in_modes, 4) == 128
    assert svdp_dof(16, 72, 4) == 336
    layer = STTPLinear(72, 16, bias=False, rank=4, out_modes=out_modes, in_modes=in_modes)
    assert layer.tensor_shape == (2, 2, 2, 2, 3, 3, 2, 2, 2)  # in modes reversed
    assert layer.ranks == (1, 2, 4, 4, 4, 4, 4, 4, 2, 1)
    assert layer.theta.numel() == 128 == layer.manifold.dim == layer.chart.dim
    assert STTPLinear(72, 16, bias=False, rank=4, tensorization="section8").theta.numel() == 128
    # the reference code's default: 2x2x2x2 | 2x2x2x3x3 in natural order
    ref = STTPLinear(72, 16, bias=False, rank=4)
    assert ref.tensor_shape == (2, 2, 2, 2, 2, 2, 2, 3, 3) and ref.tensorization.order == "natural"
    assert ref.ranks == (1, 2, 4, 4, 4, 4, 4, 4, 3, 1)
    assert ref.theta.numel() == sttp_dof((2, 2, 2, 2), (2, 2, 2, 3, 3), 4, order="natural") == 116
    svdp = SVDPLinear(72, 16, bias=False, rank=4)
    assert sum(p.numel() for p in svdp.parameters()) == 336
    assert layer.decompress().weight.numel() == 1152
    assert compression_ratio(layer)["replaced"] == pytest.approx(1152 / 128)
    assert compression_ratio(svdp)["replaced"] == pytest.approx(1152 / 336)


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_dof_matches_manifold(rank):
    layer = STTPConv2d(6, 10, 3, rank=rank)
    assert layer.theta.numel() == sttp_dof(layer.out_modes, layer.in_modes, rank,
                                           order=layer.tensorization.order)
    assert layer.theta.numel() == layer.manifold.dim
    ident = STTPLinear(12, 10, rank=rank, spectrum="identity", tensorization="section8")
    rc = ident.ranks[ident.center]
    assert ident.theta.numel() == sttp_dof(ident.out_modes, ident.in_modes, rank) - rc * (rc + 1) // 2
    s = SVDPConv2d(6, 10, 3, rank=rank)
    assert sum(p.numel() for n, p in s.named_parameters() if n != "bias") == svdp_dof(10, 54, rank)


def test_conv_modes_layout():
    layer = STTPConv2d(12, 8, (3, 2), rank=4, tensorization="section8")
    assert layer.in_modes == (2, 2, 3, 3, 2)  # channels, then kh, then kw factors
    assert layer.tensor_shape == (2, 2, 2, 2, 3, 3, 2, 2)  # kernel modes next to the center
    assert layer.center == 3
    assert STTPConv2d(1, 4, 3, rank=2, tensorization="section8").in_modes == (3, 3)
    assert STTPConv2d(8, 4, 1, rank=2, tensorization="section8").in_modes == (2, 2, 2)
    # the reference code's: channel factors, then the kernel as one mode, natural order
    ref = STTPConv2d(12, 8, (3, 2), rank=4)
    assert ref.in_modes == (2, 2, 3, 6) and ref.tensor_shape == (2, 2, 2, 2, 2, 3, 6)
    assert STTPConv2d(8, 4, 1, rank=2).in_modes == (2, 2, 2)


# ---------------------------------------------------------------------------------------
# forward paths against the dense layers
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [STTPLinear, SVDPLinear])
@pytest.mark.parametrize("spectrum", ["learned", "lipschitz", "identity"])
def test_linear_matches_dense(cls, spectrum):
    torch.manual_seed(0)
    layer = cls(30, 20, rank=4, spectrum=spectrum, init="random", dtype=DT)
    x = torch.randn(3, 5, 30, dtype=DT)
    ref = F.linear(x, layer.weight, layer.bias)
    assert layer.weight.shape == (20, 30)
    for path in PATHS:
        layer.contraction = path
        torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x[0, 0]), ref[0, 0], rtol=1e-12, atol=1e-12)
    assert layer(x[:, :0]).shape == (3, 0, 20)  # empty batch
    torch.testing.assert_close(layer._forward_tt(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer._forward_dense(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.decompress()(x), ref, rtol=1e-12, atol=1e-12)


CONV_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), padding="same", padding_mode="reflect"),
    dict(kernel_size=3, padding=(1, 2), dilation=2, padding_mode="circular", bias=False),
    dict(kernel_size=2, padding=1, padding_mode="replicate"),
    dict(kernel_size=1, stride=2),
]


@pytest.mark.parametrize("cls", [STTPConv2d, SVDPConv2d])
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_matches_dense(cls, case):
    torch.manual_seed(1)
    kw = dict(CONV_CASES[case])
    layer = cls(12, 8, rank=4, init="random", dtype=DT, **kw)
    x = torch.randn(3, 12, 9, 10, dtype=DT)
    ref = layer.decompress()(x)  # torch's own Conv2d with layer.weight
    assert layer.weight.shape == (8, 12) + layer.kernel_size
    for path in PATHS:
        layer.contraction = path
        torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(x[1]), ref[1], rtol=1e-12, atol=1e-12)
    assert layer(x[:0]).shape == (0,) + ref.shape[1:]  # empty batch


def _all_plans(layer, batch, pix_in, pix_out):
    """A few valid non-default plans (singletons; a middle split)."""
    d, c = len(layer.tensor_shape), layer.center
    base = layer._plan(layer.ranks, batch, "tt", None if pix_in is None else
                       layer._kernel_range() + (pix_in, pix_out))
    kc1 = layer._kernel_range()[0] if pix_in is not None else c + 1
    singles = tuple([(k, k + 1) for k in range(d - 1, kc1 - 1, -1)] + [(c, kc1)]
                    + [(k, k + 1) for k in range(c - 1, -1, -1)])
    halves = ((c, d), (0, c))
    plans = [singles, halves]
    if pix_in is None:
        plans.append(((c - 1, d), (0, c - 1)) if c > 1 else ((1, d), (0, 1)))
    return [Plan(g, base.split, 0, False) for g in plans]


def test_linear_every_plan():
    torch.manual_seed(2)
    layer = STTPLinear(24, 36, rank=5, init="random", dtype=DT)
    x = torch.randn(7, 24, dtype=DT)
    ref = F.linear(x, layer.weight, layer.bias)
    for plan in _all_plans(layer, 7, None, None):
        torch.testing.assert_close(layer._forward_tt(x, None, plan), ref, rtol=1e-12, atol=1e-12)


def test_conv_every_plan():
    torch.manual_seed(3)
    layer = STTPConv2d(12, 8, 3, rank=4, stride=2, padding=1, padding_mode="replicate",
                       init="random", dtype=DT)
    x = torch.randn(2, 12, 9, 10, dtype=DT)
    ref = layer.decompress()(x)
    for plan in _all_plans(layer, 2, 90, 25):
        torch.testing.assert_close(layer._forward_tt(x, None, plan), ref, rtol=1e-12, atol=1e-12)


@given(out_f=st.integers(1, 24), in_f=st.integers(1, 24), rank=st.integers(1, 6),
       batch=st.integers(1, 9), seed=st.integers(0, 1000))
def test_linear_property(out_f, in_f, rank, batch, seed):
    rank = min(rank, out_f, in_f)
    torch.manual_seed(seed)
    layer = STTPLinear(in_f, out_f, rank=rank, init="random", dtype=DT)
    x = torch.randn(batch, in_f, dtype=DT)
    ref = F.linear(x, layer.weight, layer.bias)
    for path in ("tt", "dense"):
        layer.contraction = path
        torch.testing.assert_close(layer(x), ref, rtol=1e-11, atol=1e-11)


def test_planner_choices():
    layer = STTPLinear(1024, 1024, rank=16)
    d = len(layer.tensor_shape)
    layer.contraction = "dense"
    assert layer.plan(128, 1024) == ((0, d),)
    layer.contraction = "tt"
    assert layer.plan(128, 1024) != ((0, d),)
    layer.contraction = "auto"
    auto = layer._plan(layer.ranks, 128, "auto")
    assert auto.cost <= min(layer._plan(layer.ranks, 128, m).cost for m in ("tt", "dense"))
    assert not auto.dense  # rank 16 of 1024: far cheaper without W
    # full rank on a tiny layer with a large batch: forming W is cheapest
    small = STTPLinear(4, 4, rank=4)
    assert small.plan(4096, 4) == ((0, len(small.tensor_shape)),)


# ---------------------------------------------------------------------------------------
# construction from dense weights
# ---------------------------------------------------------------------------------------

def _tt_weight(layer_cls_kw, d_out, d_in, out_modes, in_modes, rank, seed=0):
    shape = tuple(out_modes) + tuple(in_modes)[::-1]
    ranks = sttp_ranks(out_modes, in_modes, rank)
    x = TT.random(shape, ranks, dtype=DT, generator=_gen(seed))
    T = x.full()
    D, E = len(out_modes), len(in_modes)
    T = T.permute(tuple(range(D)) + tuple(range(D + E - 1, D - 1, -1)))
    return T.reshape(d_out, d_in)


def test_from_dense_exact_tt_rank_weight():
    W = _tt_weight(None, 16, 72, (2, 2, 2, 2), (2, 2, 2, 3, 3), 4) * 3.0
    modes = dict(out_modes=(2, 2, 2, 2), in_modes=(2, 2, 2, 3, 3))
    layer = STTPLinear.from_dense(W, 4, **modes)
    assert layer.bias is None and layer.theta.dtype == DT
    torch.testing.assert_close(layer.weight, W, rtol=0, atol=1e-12)
    lin = nn.Linear(72, 16, dtype=DT)
    with torch.no_grad():
        lin.weight.copy_(W)
    for param in ("chart", "manifold"):
        layer = STTPLinear.from_dense(lin, 4, param=param, **modes)
        torch.testing.assert_close(layer.weight, W, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.bias, lin.bias)
        x = torch.randn(5, 72, dtype=DT)
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-10, atol=1e-10)


def test_from_dense_conv_and_svdp():
    Wm = _tt_weight(None, 8, 12 * 9, (2, 2, 2), (2, 2, 3, 3, 3), 3, seed=1)
    conv = nn.Conv2d(12, 8, 3, padding=1, dtype=DT)
    with torch.no_grad():
        conv.weight.copy_(Wm.reshape(8, 12, 3, 3))
    layer = STTPConv2d.from_dense(conv, 3, tensorization="section8")
    assert layer.padding == (1, 1)
    torch.testing.assert_close(layer.weight, conv.weight, rtol=0, atol=1e-12)
    x = torch.randn(2, 12, 6, 6, dtype=DT)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-10)
    # SVDP: exact for rank-r matrices, every spectrum
    g = _gen(5)
    A = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=DT))[0]
    B = torch.linalg.qr(torch.randn(30, 3, generator=g, dtype=DT))[0]
    W = A @ torch.diag(torch.tensor([3.0, 2.0, 0.5], dtype=DT)) @ B.T
    torch.testing.assert_close(SVDPLinear.from_dense(W, 3).weight, W, rtol=0, atol=1e-12)
    lip = SVDPLinear.from_dense(W, 3, spectrum="lipschitz").weight
    torch.testing.assert_close(lip, W / 3.0, rtol=0, atol=1e-12)
    ident = SVDPLinear.from_dense(W, 3, spectrum="identity").weight
    torch.testing.assert_close(ident, A @ B.T, rtol=0, atol=1e-12)
    Wc = (A @ B[:27].T).reshape(20, 3, 3, 3)
    sc = SVDPConv2d.from_dense(Wc, 3, bias=torch.arange(20.0, dtype=DT), padding=1)
    torch.testing.assert_close(sc.weight, Wc, rtol=0, atol=1e-12)
    torch.testing.assert_close(sc.bias, torch.arange(20.0, dtype=DT))


# ---------------------------------------------------------------------------------------
# gradients and training
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [STTPLinear, SVDPLinear])
@pytest.mark.parametrize("path", ["dense", "tt"])
def test_gradcheck(cls, path):
    torch.manual_seed(4)
    layer = cls(6, 4, rank=2, init="random", dtype=DT, contraction=path)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    x = torch.randn(3, 6, dtype=DT, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_gradcheck_conv():
    torch.manual_seed(5)
    layer = STTPConv2d(4, 4, 2, rank=2, padding=1, init="random", dtype=DT, contraction="tt")
    x = torch.randn(1, 4, 3, 3, dtype=DT, requires_grad=True)
    th = layer.theta.detach().clone().requires_grad_()
    f = lambda x, th: torch.func.functional_call(layer, {"theta": th}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, th))


@pytest.mark.parametrize("spectrum", ["learned", "lipschitz"])
@pytest.mark.parametrize("path", ["dense", "tt"])
def test_manifold_grad_is_riemannian(spectrum, path):
    torch.manual_seed(6)
    layer = STTPLinear(12, 8, bias=False, rank=3, spectrum=spectrum, init="random", dtype=DT,
                       param="manifold", contraction=path, tensorization="section8")
    x = torch.randn(5, 12, dtype=DT)
    y = torch.randn(5, 8, dtype=DT)
    (layer(x) - y).square().sum().backward()
    M, p = layer.manifold, layer.point
    D, E = len(layer.out_modes), len(layer.in_modes)

    def f(tt):
        T = tt.full().permute(tuple(range(D)) + tuple(range(D + E - 1, D - 1, -1)))
        W = T.reshape(8, 12)
        if spectrum == "lipschitz":
            W = W / torch.linalg.matrix_norm(W, ord=2)
        return (x @ W.T - y).square().sum()

    ref = M.riemannian_grad(p.detach(), f)
    torch.testing.assert_close(p.grad, ref, rtol=1e-9, atol=1e-10)


def _teacher_problem(seed=7, d_in=16, d_out=12):
    """Targets of a random rank-3 STTP teacher (reachable by every student here)."""
    g = _gen(seed)
    torch.manual_seed(seed)
    W = STTPLinear(d_in, d_out, rank=3, init="random", dtype=DT).weight.detach()
    x = torch.randn(64, d_in, generator=g, dtype=DT)
    return x, x @ W.T


@pytest.mark.parametrize("cls", [STTPLinear, SVDPLinear])
def test_training_chart_adam(cls):
    torch.manual_seed(8)
    x, y = _teacher_problem()
    layer = cls(16, 12, rank=3, init="random", dtype=DT)
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_training_orthogonal_init_adam():
    torch.manual_seed(9)
    x, y = _teacher_problem()
    layer = STTPLinear(16, 12, rank=3, dtype=DT)  # default: orthogonal init
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.7 * first


@pytest.mark.parametrize("spectrum", ["learned", "lipschitz"])
def test_training_manifold_riemannian_adam(spectrum):
    torch.manual_seed(10)
    x, y = _teacher_problem()
    layer = STTPLinear(16, 12, rank=3, init="random", dtype=DT, param="manifold",
                       spectrum=spectrum)
    assert isinstance(layer.point, geoopt.ManifoldParameter) and layer.theta is None
    opt = geoopt.optim.RiemannianAdam(layer.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    ok, msg = layer.manifold._check_point_on_manifold(layer.point.detach())
    assert ok, msg
    if spectrum == "lipschitz":
        assert torch.linalg.matrix_norm(layer.weight, ord=2).item() == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("spectrum", ["learned", "lipschitz"])
def test_mode_switch_keeps_weight(spectrum):
    torch.manual_seed(11)
    layer = STTPConv2d(6, 8, 3, rank=4, init="random", dtype=DT, spectrum=spectrum)
    W0 = layer.weight.detach().clone()
    assert layer.to_manifold() is layer
    assert layer.param == "manifold" and layer.theta is None
    assert isinstance(layer.point, geoopt.ManifoldParameter)
    assert layer.point.manifold is layer.manifold
    assert [n for n, _ in layer.named_parameters()] == ["bias", "point"]
    torch.testing.assert_close(layer.weight, W0, rtol=0, atol=1e-12)
    layer.to_manifold()  # no-op
    assert layer.to_chart() is layer and layer.point is None
    assert [n for n, _ in layer.named_parameters()] == ["bias", "theta"]
    torch.testing.assert_close(layer.weight, W0, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# spectra and penalties
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [STTPLinear, SVDPLinear])
def test_lipschitz_bound(cls):
    torch.manual_seed(12)
    layer = cls(20, 24, rank=5, spectrum="lipschitz", init="random", dtype=DT)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(8, 20, dtype=DT)
    for _ in range(3):
        assert torch.linalg.matrix_norm(layer.weight, ord=2).item() == pytest.approx(1.0, abs=1e-12)
        opt.zero_grad()
        layer(x).sum().backward()
        opt.step()


def test_default_init_scale():
    """Learned spectrum: ||W||_F^2 = d_out / 3, torch's default-init expectation."""
    for cls in (STTPLinear, SVDPLinear):
        for init in ("orthogonal", "random"):
            layer = cls(40, 30, rank=6, init=init, dtype=DT)
            assert layer.weight.square().sum().item() == pytest.approx(30 / 3)
    w = STTPLinear(40, 30, rank=6, dtype=DT).weight
    assert torch.linalg.matrix_rank(w).item() == 6


def test_spectral_penalty():
    """The paper's D-optimal penalty: per layer |s| / max|s| (floored at eps), -log summed over
    every singular value of the network and averaged; identity-spectrum layers have none."""
    torch.manual_seed(13)
    a = STTPLinear(12, 10, rank=3, init="random", dtype=DT)
    b = SVDPLinear(10, 6, rank=2, init="random", dtype=DT)
    c = STTPLinear(6, 4, rank=2, spectrum="lipschitz", init="random", dtype=DT)
    e = STTPLinear(4, 4, rank=2, spectrum="identity", dtype=DT)
    model = nn.Sequential(a, nn.ReLU(), b, c, e)
    svs = [a.chart.singular_values(a.theta), b.s, c.chart.singular_values(c.theta)]
    ref_terms = []
    for v in svs:  # dense float64 reference of the formula
        w = v.detach().abs()
        ref_terms += [-math.log(max(float(x) / float(w.max()), 1e-7)) for x in w]
    val = spectral_penalty(model)
    assert val.item() == pytest.approx(sum(ref_terms) / len(ref_terms), rel=1e-12)
    assert spectral_penalty(model, reduction="sum").item() == pytest.approx(sum(ref_terms))
    raw = sum(-torch.log(v.abs()).sum() for v in svs)
    torch.testing.assert_close(spectral_penalty(model, normalize=False, reduction="sum"), raw)
    val.backward()
    assert a.theta.grad is not None and b.s.grad is not None and c.theta.grad is not None
    assert e.theta.grad is None
    torch.testing.assert_close(a.spectral_penalty(), d_optimal_penalty(a.singular_values()))
    # a vanishing singular value is floored at eps, not -inf
    with torch.no_grad():
        b.s[1] = 0.0
    assert torch.isfinite(spectral_penalty(b)) and spectral_penalty(b).item() == pytest.approx(
        -math.log(1e-7) / 2)
    # manifold mode: the singular values of W
    a.to_manifold()
    sv = torch.linalg.svdvals(a.weight)[:3]
    torch.testing.assert_close(a.singular_values(), sv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(spectral_penalty(a, normalize=False, reduction="sum"),
                               -torch.log(sv).sum())
    assert spectral_penalty(nn.Linear(3, 3)).item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        spectral_penalty(model, reduction="max")


# ---------------------------------------------------------------------------------------
# model utilities
# ---------------------------------------------------------------------------------------

def _small_model():
    torch.manual_seed(14)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, dtype=DT), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 6, dtype=DT), nn.ReLU(), nn.Linear(6, 8, dtype=DT),
        nn.Linear(8, 2, dtype=DT))


def test_replace_layers_and_compression():
    model = _small_model()
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    names = replace_layers(model, 3)  # Linear(8, 2): rank clamped to 2, not skipped
    assert names == ["0", "3", "5", "6"]
    assert isinstance(model[0], STTPConv2d) and isinstance(model[3], STTPLinear)
    assert isinstance(model[5], STTPLinear) and isinstance(model[6], STTPLinear)
    assert model[6].ranks[model[6].center] == 2
    assert model(x).shape == (2, 2)
    rep = compression_ratio(model)
    assert set(rep["layers"]) == {"0", "3", "5", "6"}
    dense = 8 * 27 + 8 + 128 * 6 + 6 + 6 * 8 + 8 + 8 * 2 + 2
    actual = sum(p.numel() for n in ("0", "3", "5", "6")
                 for p in model.get_submodule(n).parameters())
    assert rep["replaced"] == pytest.approx(dense / actual)
    total = sum(p.numel() for p in model.parameters())
    assert rep["params"] == total
    assert rep["model"] == pytest.approx((total - actual + dense) / total)
    assert rep["layers"]["0"] == pytest.approx((8 * 27 + 8) / (model[0].theta.numel() + 8))


def test_replace_layers_exact_and_options():
    model = _small_model()
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    ref = model(x)
    # Linear(6, 8) at rank 6: R_k = min(6, R_k^max) = R^max, so TT-SVD is exact
    names = replace_layers(model, 6, kinds=("linear",), names=["5"])
    assert names == ["5"]
    torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)
    names = replace_layers(model, 2, names=["6"], method="svdp")
    torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)  # 8 -> 2 is rank 2
    assert isinstance(model[6], SVDPLinear)
    names = replace_layers(model, 2, kinds=("conv2d",), init="orthogonal", spectrum="lipschitz",
                           param="manifold")
    assert names == ["0"] and model[0].param == "manifold" and model[0].spectrum == "lipschitz"
    assert torch.linalg.matrix_norm(model[0].weight.reshape(8, -1), ord=2).item() == \
        pytest.approx(1.0)
    with pytest.raises(ValueError, match="no submodule"):
        replace_layers(_small_model(), 2, names=["nope"])
    with pytest.raises(ValueError, match="not one of the kinds"):
        replace_layers(_small_model(), 2, names=["1"])
    with pytest.raises(ValueError, match="method"):
        replace_layers(_small_model(), 2, method="cp")
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.warns(UserWarning, match="groups"):
        assert replace_layers(grouped, 2) == []


# ---------------------------------------------------------------------------------------
# devices and bad input
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,args,xshape", [
    (STTPLinear, (24, 18), (5, 24)), (SVDPLinear, (24, 18), (5, 24)),
    (STTPConv2d, (12, 8, 3), (2, 12, 7, 7)), (SVDPConv2d, (12, 8, 3), (2, 12, 7, 7))])
def test_meta_device(cls, args, xshape):
    layer = cls(*args, rank=4, device="meta")
    x = torch.empty(*xshape, device="meta")
    for path in ("dense", "tt"):
        layer.contraction = path
        y = layer(x)
        assert y.device.type == "meta" and y.shape[:2] == (xshape[0], args[1])
    if cls in (STTPLinear, STTPConv2d):
        layer.to_manifold()
        assert layer(x).device.type == "meta"
    # materialize and initialize
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    xr = torch.randn(*xshape)
    ref = layer.decompress()(xr)
    torch.testing.assert_close(layer(xr), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make,x", [
    (lambda dev: STTPLinear(24, 18, rank=4, device=dev), lambda dev: torch.ones(5, 24, device=dev)),
    (lambda dev: SVDPConv2d(12, 8, 3, rank=4, device=dev),
     lambda dev: torch.ones(2, 12, 7, 7, device=dev)),
    (lambda dev: STTPConvTranspose2d(12, 8, 3, rank=4, device=dev),
     lambda dev: torch.ones(2, 12, 7, 7, device=dev)),
    (lambda dev: STTPEmbedding(20, 8, rank=2, device=dev),
     lambda dev: torch.zeros(3, dtype=torch.long, device=dev))])
def test_input_on_another_device(make, x):
    """An input on another device than the layer's is named; it failed inside torch, or
    (a cpu layer, a meta input) silently gave a cpu output."""
    for layer_dev, x_dev in (("cpu", "meta"), ("meta", "cpu")):
        with pytest.raises(ValueError, match=f"input: on device {x_dev}, the layer's "
                                             f"parameters on {layer_dev}"):
            make(layer_dev)(x(x_dev))


def test_bad_input():
    with pytest.raises(ValueError, match="rank"):
        STTPLinear(8, 6, rank=0)
    with pytest.raises(TypeError, match="rank"):
        STTPLinear(8, 6, rank=2.5)
    with pytest.raises(ValueError, match="out_modes"):
        STTPLinear(8, 6, rank=2, out_modes=(2, 2))
    with pytest.raises(ValueError, match="in_modes"):
        STTPLinear(8, 6, rank=2, in_modes=(2, 3))
    with pytest.raises(ValueError, match="in_modes"):
        STTPConv2d(4, 4, 3, rank=2, in_modes=(2, 2))
    with pytest.raises(ValueError, match="groups"):
        STTPConv2d(4, 4, 3, groups=2, rank=2)
    with pytest.raises(ValueError, match="groups"):
        SVDPConv2d(4, 4, 3, groups=4, rank=2)
    with pytest.raises(ValueError, match="spectrum"):
        STTPLinear(8, 6, rank=2, spectrum="free")
    with pytest.raises(ValueError, match="param"):
        STTPLinear(8, 6, rank=2, param="euclid")
    with pytest.raises(ValueError, match="contraction"):
        STTPLinear(8, 6, rank=2, contraction="fast")
    with pytest.raises(ValueError, match="identity"):
        STTPLinear(8, 6, rank=2, spectrum="identity", param="manifold")
    with pytest.raises(ValueError, match="padding_mode"):
        STTPConv2d(4, 4, 3, rank=2, padding_mode="mirror")
    lin = STTPLinear(8, 6, rank=2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        lin(torch.randn(3, 7))
    with pytest.raises(ValueError, match="in_features"):
        lin(torch.tensor(1.0))
    with pytest.raises(TypeError, match="dtype"):
        lin(torch.randn(3, 8, dtype=DT))
    conv = STTPConv2d(4, 6, 3, rank=2)
    with pytest.raises(ValueError, match="in_channels"):
        conv(torch.randn(2, 5, 6, 6))
    with pytest.raises(ValueError, match="in_channels"):
        conv(torch.randn(6, 6))
    with pytest.raises(ValueError, match="smaller than"):
        conv(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="weight"):
        STTPLinear.from_dense(torch.randn(2, 3, 4), 2)
    with pytest.raises(TypeError, match="layer_or_weight"):
        STTPLinear.from_dense([[1.0]], 1)
    with pytest.raises(NotImplementedError):
        SVDPLinear(8, 6, rank=2).to_manifold()
    with pytest.raises(TypeError, match="dtype"):  # was torch's RuntimeError for the bias
        STTPConv2d(4, 4, 3, rank=2, dtype=torch.int64)


def test_non_finite_dense_weight_is_named():
    # a NaN weight failed inside torch's SVD (SVDP) or was reported as the TT "x" (STTP)
    W = torch.randn(6, 8, dtype=DT)
    W[1, 2] = float("nan")
    for cls in (STTPLinear, SVDPLinear):
        with pytest.raises(ValueError, match="weight: contains NaN"):
            cls.from_dense(W, rank=2)
        with pytest.raises(ValueError, match="weight: contains NaN"):
            cls(8, 6, rank=2, dtype=DT).load_weight(W * float("inf"))


def test_dense_weight_of_a_non_real_dtype_is_named():
    # a complex weight was cast to the layer's dtype, its imaginary part dropped with no
    # more than torch's warning; a bool one loaded as 0/1
    for cls in (STTPLinear, SVDPLinear):
        for W in (torch.randn(6, 8, dtype=torch.complex128), torch.ones(6, 8, dtype=torch.bool),
                  torch.ones(6, 8, dtype=torch.long)):
            with pytest.raises(TypeError, match=f"weight: expected a real floating tensor, "
                                                f"got dtype {W.dtype}"):
                cls(8, 6, rank=2, dtype=DT).load_weight(W)


def test_conv_size_arguments_checked_at_construction():
    # "same" for a transposed convolution failed with int("s"); negative or too large
    # (output_)padding failed only in torch's forward
    with pytest.raises(TypeError, match="padding: expected an int or a tuple"):
        STTPConvTranspose2d(4, 4, 3, rank=2, padding="same")
    with pytest.raises(TypeError, match="kernel_size"):
        STTPConv2d(4, 4, "3", rank=2)
    with pytest.raises(ValueError, match="padding"):
        STTPConvTranspose2d(4, 4, 3, rank=2, padding=-1)
    with pytest.raises(ValueError, match="output_padding"):
        STTPConvTranspose2d(4, 4, 3, rank=2, stride=2, output_padding=2)
    layer = STTPConvTranspose2d(4, 4, 3, rank=2, stride=(2, 1), output_padding=(1, 0))
    assert layer(torch.randn(1, 4, 3, 3)).shape == (1, 4, 8, 5)


def test_assign_load_keeps_the_manifold_parameter():
    # load_state_dict(assign=True) (e.g. after building on meta) stored a plain Parameter
    # as ``point``: Riemannian optimizers then stepped it as a Euclidean tensor
    import geoopt

    src = STTPLinear(12, 10, rank=3, init="random", param="manifold", dtype=DT)
    with torch.device("meta"):
        dst = STTPLinear(12, 10, rank=3, param="manifold", dtype=DT)
    dst.load_state_dict(src.state_dict(), assign=True)
    assert isinstance(dst.point, geoopt.ManifoldParameter)
    assert dst.point.manifold is dst.manifold and dst.point.device.type == "cpu"
    x = torch.randn(2, 12, dtype=DT)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
