"""The layer zoo: STTP and SVDP versions of Conv1d, Conv3d, ConvTranspose1d/2d/3d and
Embedding, each equal to its torch counterpart carrying the same dense weight (float64),
on every forward path; conversions both ways; meta device; bad input."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from ttmanifold.nn import (
    STTPConv1d, STTPConv3d, STTPConvTranspose1d, STTPConvTranspose2d, STTPConvTranspose3d,
    STTPEmbedding, SVDPConv1d, SVDPConv3d, SVDPConvTranspose1d, SVDPConvTranspose2d,
    SVDPConvTranspose3d, SVDPEmbedding,
)

DT = torch.float64
TOL = dict(rtol=1e-11, atol=1e-11)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


CONV1D = [dict(kernel_size=3), dict(kernel_size=4, stride=2, padding=2),
          dict(kernel_size=3, padding="same", padding_mode="reflect", dilation=2),
          dict(kernel_size=2, padding=1, padding_mode="circular", bias=False)]


@pytest.mark.parametrize("cls,kw0", [(STTPConv1d, dict(tensorization="reference")),
                                     (STTPConv1d, dict(tensorization="section8")),
                                     (SVDPConv1d, {})])
@pytest.mark.parametrize("case", range(len(CONV1D)))
def test_conv1d_matches_torch(cls, kw0, case):
    torch.manual_seed(case)
    kw = dict(CONV1D[case], **kw0)
    layer = cls(12, 10, rank=4, init="random", dtype=DT, **kw)
    ref = layer.decompress()
    assert type(ref) is nn.Conv1d and layer.weight.shape == (10, 12) + layer.kernel_size
    x = torch.randn(3, 12, 11, dtype=DT)
    for path in ("dense", "tt", "auto"):
        layer.contraction = path
        torch.testing.assert_close(layer(x), ref(x), **TOL)
        torch.testing.assert_close(layer(x[0]), ref(x[0]), **TOL)


@pytest.mark.parametrize("cls", [STTPConv3d, SVDPConv3d])
def test_conv3d_matches_torch(cls):
    torch.manual_seed(1)
    layer = cls(6, 8, (3, 2, 2), rank=3, stride=(1, 2, 1), padding=(1, 0, 1), init="random",
                dtype=DT)
    ref = layer.decompress()
    assert type(ref) is nn.Conv3d
    x = torch.randn(2, 6, 5, 6, 4, dtype=DT)
    for path in ("dense", "tt"):
        layer.contraction = path
        torch.testing.assert_close(layer(x), ref(x), **TOL)
    w = layer.weight
    torch.testing.assert_close(layer(x), F.conv3d(x, w, layer.bias, (1, 2, 1), (1, 0, 1)), **TOL)


@given(cin=st.integers(1, 8), cout=st.integers(1, 8), k=st.integers(1, 3),
       rank=st.integers(1, 9), seed=st.integers(0, 99))
def test_conv1d_property(cin, cout, k, rank, seed):
    torch.manual_seed(seed)
    layer = STTPConv1d(cin, cout, k, padding=1, rank=rank, init="random", dtype=DT)
    x = torch.randn(2, cin, 6, dtype=DT)
    ref = F.conv1d(x, layer.weight, layer.bias, padding=1)
    for path in ("dense", "tt"):
        layer.contraction = path
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("nd,cls", [(1, STTPConvTranspose1d), (2, STTPConvTranspose2d),
                                    (3, STTPConvTranspose3d), (1, SVDPConvTranspose1d),
                                    (2, SVDPConvTranspose2d), (3, SVDPConvTranspose3d)])
def test_conv_transpose_matches_torch(nd, cls):
    torch.manual_seed(nd)
    layer = cls(6, 4, 3, stride=2, padding=1, output_padding=1, rank=3, init="random",
                dtype=DT)
    ref = layer.decompress()
    assert type(ref) is {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d,
                         3: nn.ConvTranspose3d}[nd]
    assert layer.weight.shape == (6, 4) + (3,) * nd  # torch's (in, out, *k) layout
    x = torch.randn((2, 6) + (4,) * nd, dtype=DT)
    torch.testing.assert_close(layer(x), ref(x), **TOL)
    # the factorized matrix is that of the (out, in, *k) layout: rank 3 of 4 x 6*3^nd
    Wm = layer.weight.transpose(0, 1).reshape(4, -1)
    assert torch.linalg.matrix_rank(Wm).item() == 3
    # from_dense is exact for a weight of that rank
    back = cls.from_dense(ref, 3)
    torch.testing.assert_close(back.weight, layer.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [STTPEmbedding, SVDPEmbedding])
def test_embedding_matches_torch(cls):
    torch.manual_seed(3)
    layer = cls(30, 12, rank=4, init="random", dtype=DT)
    ref = layer.decompress()
    assert type(ref) is nn.Embedding and layer.weight.shape == (30, 12)
    idx = torch.randint(0, 30, (5, 7))
    for path in ("dense", "tt", "auto"):
        layer.contraction = path
        torch.testing.assert_close(layer(idx), ref(idx), **TOL)
    # gradients equal those of F.embedding on the generated table
    layer.contraction = "tt"
    p = next(layer.parameters())
    g1 = torch.autograd.grad(layer(idx).square().sum(), p)[0]
    g2 = torch.autograd.grad(F.embedding(idx, layer.weight).square().sum(), p)[0]
    torch.testing.assert_close(g1, g2, **TOL)
    # padding_idx: torch's semantics (no gradient to that row) through the dense path
    pad = cls(30, 12, rank=4, padding_idx=2, init="random", dtype=DT)
    torch.testing.assert_close(pad(idx), pad.decompress()(idx), **TOL)
    assert pad.decompress().padding_idx == 2
    emb = nn.Embedding(30, 12, dtype=DT)
    assert cls.from_dense(emb, 12).weight.shape == (30, 12)
    torch.testing.assert_close(cls.from_dense(emb, 12).weight, emb.weight, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", [STTPEmbedding, SVDPEmbedding])
def test_embedding_padding_row_is_a_fixed_pad(cls):
    """As torch: the pad row is zeros for a new table, the dense row for from_dense, and
    stays fixed in training (it was generated by the shared cores: nonzero, and it drifted
    with every step). Checkpoints without the buffer load with the zero pad."""
    torch.manual_seed(0)
    e = cls(30, 12, rank=4, padding_idx=2, init="random", dtype=DT)
    idx = torch.tensor([[0, 2, 5], [2, 2, 29]])
    zero = torch.zeros(12, dtype=DT)
    assert torch.equal(e(idx)[0, 1], zero) and torch.equal(e.weight[2], zero)
    opt = torch.optim.SGD(e.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        e(torch.arange(30)).square().sum().backward()
        opt.step()
    assert torch.equal(e(idx)[1, 0], zero)
    emb = nn.Embedding(30, 12, padding_idx=2, dtype=DT)
    with torch.no_grad():
        emb.weight[2] = 7.0
    f = cls.from_dense(emb, 12)
    torch.testing.assert_close(f(idx), emb(idx))
    torch.testing.assert_close(f.decompress()(idx), emb(idx))
    sd = f.state_dict()
    sd.pop("padding_row")
    g = cls(30, 12, rank=12, padding_idx=2, dtype=DT)
    g.load_state_dict(sd)
    assert torch.equal(g(idx)[1, 0], zero)


def test_zoo_meta_and_bad_input():
    for layer, x in ((STTPConv1d(4, 6, 3, rank=2, device="meta"), torch.empty(2, 4, 9, device="meta")),
                     (SVDPConv3d(4, 6, 2, rank=2, device="meta"),
                      torch.empty(1, 4, 3, 3, 3, device="meta")),
                     (STTPConvTranspose2d(4, 6, 2, rank=2, device="meta"),
                      torch.empty(1, 4, 3, 3, device="meta"))):
        assert layer(x).device.type == "meta"
    emb = STTPEmbedding(10, 4, rank=2, device="meta")
    assert emb(torch.zeros(3, dtype=torch.long, device="meta")).shape == (3, 4)
    with pytest.raises(ValueError, match="max_norm"):
        STTPEmbedding(10, 4, rank=2, max_norm=1.0)
    with pytest.raises(TypeError, match="input"):
        STTPEmbedding(10, 4, rank=2)(torch.zeros(3))
    with pytest.raises(TypeError, match="padding_idx"):  # was kept, failing in the forward
        STTPEmbedding(10, 4, rank=2, padding_idx=1.5)
    with pytest.raises(ValueError, match="padding_mode"):
        STTPConvTranspose1d(4, 4, 3, rank=2, padding_mode="reflect")
    with pytest.raises(ValueError, match="in_channels"):
        STTPConv1d(4, 6, 3, rank=2)(torch.randn(2, 5, 9))
    with pytest.raises(ValueError, match="kernel_size"):
        STTPConv3d(4, 6, (3, 3), rank=2)
    with pytest.raises(ValueError, match="groups"):
        SVDPConv1d(4, 4, 3, groups=2, rank=2)
