"""STTP initializations start on the fixed-rank manifold: ``init="orthogonal"`` (and
``"near_identity"`` around it) gives a TT of exactly the declared ranks in every layer,
mode, layout and center; ``init="identity"`` keeps the paper-literal, rank-deficient
frames (chart mode only). References: dense float64 SVDs of the full weight tensor."""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from ttmanifold import TT, FixedTTRank, feasible_ranks
from ttmanifold.nn import (
    STTPChart, STTPConv1d, STTPConv2d, STTPConvTranspose2d, STTPEmbedding, STTPLinear,
    STTPParametrization, SVDPLinear, SpectralAdapter, batched_cores, convert_model,
)

DT = torch.float64
#: the smallest singular value of every unfolding, relative to its largest, must be at
#: least this (the old identity frames gave exactly 0; the new frames give >= ~0.18)
MIN_REL_SV = 0.05

# (constructor, positional args, keyword args): layouts whose identity frames are
# rank-deficient, incl. ranks capped by the modes (72 x 4: ranks fall left of the center)
LAYERS = [
    (STTPLinear, (24, 18), dict(rank=4)),
    (STTPLinear, (16, 48), dict(rank=6, tensorization="section8")),
    (STTPLinear, (4, 72), dict(rank=16)),
    (STTPLinear, (72, 4), dict(rank=16)),
    (STTPLinear, (36, 16), dict(rank=6, out_modes=(4, 4), in_modes=(3, 4, 3),
                                order="natural")),
    (STTPConv2d, (6, 8, 3), dict(rank=4)),
    (STTPConv1d, (12, 8, 3), dict(rank=5, tensorization="section8")),
    (STTPConvTranspose2d, (4, 8, 3), dict(rank=4)),
    (STTPEmbedding, (30, 12), dict(rank=4)),
]
IDS = [f"{c.__name__}{a}{sorted(k.items())}" for c, a, k in LAYERS]


def unfolding_svs(T):
    """Singular values of every unfolding ``T^{<k>}``, k = 1..d-1 (dense, float64)."""
    return [torch.linalg.svdvals(T.reshape(math.prod(T.shape[:k]), -1))
            for k in range(1, T.dim())]


def assert_declared_ranks(tt, ranks):
    T = tt.full().detach().to(DT)
    for k, sv in enumerate(unfolding_svs(T), start=1):
        r = ranks[k]
        assert sv.shape[0] >= r
        assert sv[r - 1] >= MIN_REL_SV * sv[0], (k, r, sv)
        assert (sv[r:] <= 1e-12 * sv[0]).all()


def assert_partial_isometry(layer):
    """The old tests' property: the spectral unfolding (the weight matrix) has ``R_c``
    equal singular values, 1 for the fixed/normalized spectra, ``||W||_F^2 = d_out / 3``
    for the learned one, and nothing else."""
    W = layer.weight.detach().to(DT)
    W = W.transpose(0, 1) if isinstance(layer, STTPConvTranspose2d) else W
    W = W.reshape(layer.d_out, -1)
    rc = layer.ranks[layer.center]
    sv = torch.linalg.svdvals(W)
    want = 1.0 if layer.spectrum != "learned" else math.sqrt(layer.d_out / 3.0 / rc)
    torch.testing.assert_close(sv[:rc], torch.full((rc,), want, dtype=DT), rtol=1e-12,
                               atol=1e-12)
    assert (sv[rc:] <= 1e-12).all()


@pytest.mark.parametrize("cls,args,kw", LAYERS, ids=IDS)
def test_orthogonal_init_has_the_declared_ranks(cls, args, kw):
    for spectrum in ("learned", "lipschitz", "identity"):
        layer = cls(*args, **kw, spectrum=spectrum, dtype=DT)  # default init
        assert layer.init == "orthogonal"
        assert_declared_ranks(layer.tt(), layer.ranks)
        assert_partial_isometry(layer)
        if spectrum == "identity":
            continue
        # the manifold mode starts at the same W (packed with the rank check)
        mf = cls(*args, **kw, spectrum=spectrum, dtype=DT, param="manifold")
        torch.testing.assert_close(mf.weight, layer.weight, rtol=0, atol=1e-13)
        ok, why = mf.manifold._check_point_on_manifold(mf.point.detach())
        assert ok, why
        if spectrum == "learned":
            mf.reset_parameters()  # the manifold-mode re-initialization: the same point
            torch.testing.assert_close(mf.weight, layer.weight, rtol=0, atol=1e-13)


@pytest.mark.parametrize("cls,args,kw", LAYERS[::2], ids=IDS[::2])
def test_near_identity_is_near_the_full_rank_init(cls, args, kw):
    torch.manual_seed(3)
    layer = cls(*args, **kw, spectrum="lipschitz", init="near_identity", dtype=DT)
    torch.manual_seed(3)
    mf = cls(*args, **kw, spectrum="lipschitz", init="near_identity", dtype=DT,
             param="manifold")
    ortho = cls(*args, **kw, spectrum="lipschitz", dtype=DT)
    assert_declared_ranks(layer.tt(), layer.ranks)
    assert_partial_isometry(layer)
    W, W0 = layer.weight.detach(), ortho.weight.detach()
    # per-frame QR signs flip whole bond indices; every entry is one path: compare |W|
    assert 0 < (W.abs() - W0.abs()).abs().max().item() < 1e-2
    torch.testing.assert_close(mf.weight, layer.weight, rtol=0, atol=1e-12)


def test_batched_cores_and_parametrization_start_full_rank():
    layers = [STTPConv2d(8, 8, 3, rank=4, dtype=DT),
              STTPConv2d(8, 8, 3, rank=4, dtype=DT, spectrum="identity"),
              STTPLinear(72, 4, rank=16, dtype=DT)]
    for layer, cores in zip(layers, batched_cores(layers)):
        for a, b in zip(cores, layer.weight_param.cores()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
        assert_declared_ranks(TT(cores), layer.ranks)
    for tshape, rank, kw in [((8, 6, 3), 3, dict(shape=(2, 2, 2, 2, 3, 3))),
                             ((16, 9), 5, dict(shape=(2, 2, 2, 2, 3, 3), center=2)),
                             ((6, 8, 3), 4, dict(tensorization="reference")),
                             ((4, 2, 3, 3), 4, dict(center=2))]:
        P = STTPParametrization(tshape, rank, **kw)
        ch = P.chart
        th = ch.orthogonal_init(dtype=DT)
        assert_declared_ranks(ch(th), ch.ranks)
        ch.point(th)  # the rank check passes
        sv = torch.linalg.svdvals(P(th).reshape(math.prod(ch.shape[:ch.center]), -1))
        torch.testing.assert_close(sv[:ch.ranks[ch.center]],
                                   torch.ones(ch.ranks[ch.center], dtype=DT))


@pytest.mark.parametrize("spectrum", ["learned", "lipschitz", "identity"])
def test_chart_inits_every_center(spectrum):
    """``STTPChart.orthogonal_init`` has the chart's ranks for every center (its frames,
    including the q < p cores right of the peak), is exactly the chart's own inverse of
    its value and equals the frames of ``orthogonal_frames`` up to rotation and signs;
    ``identity_init`` keeps the zero parameters (deficient for center 1)."""
    M = FixedTTRank((2, 3, 4, 2, 3), (1, 2, 6, 6, 3, 1))
    for c in range(1, M.d):
        ch = STTPChart(M, center=c, spectrum=spectrum)
        th = ch.orthogonal_init(dtype=DT)
        X = ch(th)
        assert_declared_ranks(X, M.ranks)
        sv = torch.linalg.svdvals(X.full().reshape(math.prod(M.shape[:c]), -1))[:M.ranks[c]]
        torch.testing.assert_close(sv, torch.ones_like(sv), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(ch(ch.inverse(X)).full(), X.full(), rtol=0, atol=1e-13)
        U, _, V = ch.forward_cores(th)
        got = [u.reshape(-1, u.shape[-1]) for u in U] + \
            [v.reshape(v.shape[0], -1).T for v in V]
        frames = ch.orthogonal_frames(dtype=DT)
        for F, b in zip(got, [b for b in ch.layout if b.kind != "spectrum"]):
            # same span: the projector onto the columns
            torch.testing.assert_close(F @ F.T, frames[b.name] @ frames[b.name].T,
                                       rtol=0, atol=1e-13)
        z = ch.identity_init(dtype=DT)
        assert torch.equal(z[z != 1], torch.zeros_like(z[z != 1]))
        if c == 1:  # the identity frames of U_0, V_1 meet in rank 1 < 2 at bond 1
            with pytest.raises(ValueError, match="not a point"):
                ch.point(z)
    f32 = STTPChart(M, spectrum=spectrum).orthogonal_init(dtype=torch.float32)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), STTPChart(M, spectrum=spectrum).orthogonal_init(
        dtype=DT), rtol=0, atol=1e-6)


def test_covering_frame():
    from ttmanifold.nn.chart import covering_frame

    for p in range(1, 6):
        for n in range(1, 4):
            for r in range(1, 8):
                if r > p * n or p > n * r:
                    with pytest.raises(ValueError, match="r:"):
                        covering_frame(p, n, r, outer_slow=True)
                    continue
                for slow in (True, False):
                    Q = covering_frame(p, n, r, outer_slow=slow, dtype=DT)
                    torch.testing.assert_close(Q.T @ Q, torch.eye(r, dtype=DT), rtol=0,
                                               atol=1e-15)
                    B = Q[:r, :r]  # positive diagonal: inside the reduced chart
                    assert torch.equal(B, torch.diag(B.diagonal()))
                    assert bool((B.diagonal() > 0).all())
                    G = Q.reshape(p, n * r) if slow else \
                        Q.reshape(n, p, r).transpose(0, 1).reshape(p, n * r)
                    assert torch.linalg.svdvals(G)[-1] > 0.3
                    if r >= p * n or (slow and p == 1):
                        assert torch.equal(Q, torch.eye(p * n, r, dtype=DT))
    with pytest.raises(ValueError, match="p:"):
        covering_frame(0, 2, 1, outer_slow=True)
    assert covering_frame(3, 2, 4, outer_slow=True, device="meta").device.type == "meta"


def test_identity_init_chart_only_and_documented_deficient():
    layer = STTPLinear(24, 18, rank=4, init="identity", dtype=DT)
    T = layer.tt().full()
    # the paper-literal frames: true ranks 1 and 2 where 2 and 4 are declared
    ranks = [torch.linalg.matrix_rank(T.reshape(math.prod(T.shape[:k]), -1)).item()
             for k in (1, 2)]
    assert ranks == [1, 2] and layer.ranks[1:3] == (2, 4)
    assert_partial_isometry(layer)  # still a partial isometry
    with pytest.raises(ValueError, match="init: 'identity'"):
        STTPLinear(24, 18, rank=4, init="identity", param="manifold", dtype=DT)
    with pytest.raises(ValueError, match="to_manifold: .*TT-ranks below"):
        layer.to_manifold()
    assert layer.param == "chart" and layer.theta is not None
    # where the identity frames have the full ranks, the manifold mode accepts them
    ok = STTPLinear(6, 4, rank=2, out_modes=(4,), in_modes=(6,), init="identity",
                    param="manifold", dtype=DT)
    torch.testing.assert_close(ok.weight, STTPLinear(6, 4, rank=2, out_modes=(4,),
                                                     in_modes=(6,), dtype=DT).weight)
    # SVDP has no inner bond: "identity" is its (full-rank) orthogonal init
    torch.testing.assert_close(SVDPLinear(12, 8, rank=3, init="identity", dtype=DT).weight,
                               SVDPLinear(12, 8, rank=3, dtype=DT).weight, rtol=0, atol=0)
    model = nn.Sequential(nn.Linear(24, 18))
    convert_model(model, 4, init="identity")
    assert model[0].init == "identity"
    with pytest.raises(ValueError, match="init:"):
        convert_model(nn.Sequential(nn.Linear(4, 4)), 2, init="zeros")
    ad = SpectralAdapter(nn.Linear(24, 18, dtype=DT), 4, param="manifold", init="orthogonal")
    assert_declared_ranks(ad.delta.tt(), ad.delta.ranks)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=5), data=st.data())
def test_chart_orthogonal_init_property(shape, data):
    """Any attainable ranks (not only capped ones) and center: the declared ranks, an
    isometric spectrum, and the rank check of ``point`` passes."""
    rmax = feasible_ranks(tuple(shape))
    ranks = tuple(data.draw(st.integers(1, min(m, 9))) for m in rmax)
    assume(all(ranks[k + 1] <= ranks[k] * n and ranks[k] <= n * ranks[k + 1]
               for k, n in enumerate(shape)))
    M = FixedTTRank(tuple(shape), ranks)
    c = data.draw(st.integers(1, M.d - 1))
    spectrum = data.draw(st.sampled_from(["learned", "lipschitz", "identity"]))
    ch = STTPChart(M, center=c, spectrum=spectrum)
    th = ch.orthogonal_init(dtype=DT)
    X = ch(th)
    assert_declared_ranks(X, ranks)
    sv = torch.linalg.svdvals(X.full().reshape(math.prod(shape[:c]), -1))[:ranks[c]]
    torch.testing.assert_close(sv, torch.ones_like(sv), rtol=1e-13, atol=1e-13)
    ch.point(th)
