"""Whole-model tools: convert_model (ignore list, report), export_model (back to torch
layers), compression_z (eq. 11, with and without buffers)."""
import copy

import pytest
import torch
from torch import nn

from ttmanifold.nn import (
    FactorizedLayer, STTPConv2d, STTPEmbedding, STTPLinear, SVDPLinear, compression_z,
    convert_model, export_model, sttp_dof, svdp_dof,
)

DT = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6, dtype=DT)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, dtype=DT)
        self.bn = nn.BatchNorm2d(8, dtype=DT)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2, dtype=DT)
        self.body = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, dtype=DT), nn.ReLU(),
                                  nn.ConvTranspose2d(12, 4, 2, stride=2, dtype=DT))
        self.head = nn.Linear(4 * 8 * 8 + 6, 5, dtype=DT)

    def forward(self, x, i):
        h = self.body(self.grouped(torch.relu(self.bn(self.stem(x)))))
        return self.head(torch.cat([h.flatten(1), self.emb(i)], 1))


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 4, 4, generator=g, dtype=DT), torch.tensor([1, 7])


def test_convert_report_and_ignore():
    torch.manual_seed(0)
    net = Net().eval()
    rep = convert_model(net, 64, ignore=["stem"])  # rank 64 >= every R_max: exact
    assert rep.converted == ["emb", "body.0", "body.2", "head"]
    assert rep.skipped == {"stem": "in the ignore list",
                           "grouped": "grouped convolution (groups=2) is not factorized as one "
                                      "matrix"}
    assert "kept dense 'grouped'" in str(rep)
    assert type(net.stem) is nn.Conv2d and isinstance(net.body[0], STTPConv2d)
    assert isinstance(net.emb, STTPEmbedding) and isinstance(net.head, STTPLinear)
    # prefixes and kinds
    net2 = Net()
    rep2 = convert_model(net2, 2, ignore=["body."], kinds=("conv2d", "linear"), method="svdp")
    assert rep2.converted == ["stem", "head"] and "body.0" in rep2.skipped
    assert isinstance(net2.head, SVDPLinear) and type(net2.emb) is nn.Embedding
    # subclasses of the converted types are reported, not silently kept
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    rep3 = convert_model(mha, 2)
    assert rep3.converted == [] and "subclass of Linear" in rep3.skipped["0.out_proj"]
    with pytest.raises(ValueError, match="ignore"):
        convert_model(Net(), 2, ignore=["nope"])
    with pytest.raises(ValueError, match="kinds"):
        convert_model(Net(), 2, kinds=("lstm",))
    with pytest.raises(ValueError, match="grouped"):
        convert_model(Net(), 2, names=["grouped"])


def test_export_round_trip():
    torch.manual_seed(1)
    net = Net().eval()
    x, i = _inputs()
    ref = net(x, i)
    convert_model(net, 64)
    torch.testing.assert_close(net(x, i), ref, rtol=1e-9, atol=1e-9)  # exact ranks
    out = export_model(net)
    assert not any(isinstance(m, FactorizedLayer) for m in out.modules())
    assert any(isinstance(m, FactorizedLayer) for m in net.modules())  # a copy by default
    assert type(out.body[2]) is nn.ConvTranspose2d and type(out.emb) is nn.Embedding
    torch.testing.assert_close(out(x, i), net(x, i), rtol=1e-12, atol=1e-12)
    convert_model(net, 2)  # lossy now
    out = export_model(net, inplace=True)
    assert out is net and not any(isinstance(m, FactorizedLayer) for m in net.modules())
    single = export_model(STTPLinear(8, 4, rank=2))
    assert type(single) is nn.Linear


def test_compression_z_against_counts():
    torch.manual_seed(2)
    net = Net()
    dense_params = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() for b in net.buffers() if b.is_floating_point())  # BN mean/var
    assert buffers == 16
    assert compression_z(net) == pytest.approx(100.0)
    convert_model(net, 3, ignore=["emb"], kinds=("conv2d", "linear"))
    b0, head = net.body[0], net.head
    saved = (8 * 12 * 9 - sttp_dof(b0.out_modes, b0.in_modes, 3, order="natural")
             + 5 * 262 - sttp_dof(head.out_modes, head.in_modes, 3, order="natural")
             + 8 * 27 - sttp_dof(net.stem.out_modes, net.stem.in_modes, 3, order="natural"))
    assert compression_z(net) == pytest.approx(100.0 * (dense_params - saved) / dense_params)
    assert compression_z(net, count_buffers=True) == pytest.approx(
        100.0 * (dense_params - saved + buffers) / (dense_params + buffers))
    # manifold mode stores the packed cores but Z counts degrees of freedom
    z = compression_z(net)
    net.head.to_manifold()
    assert compression_z(net) == pytest.approx(z)
    s = nn.Sequential(SVDPLinear(20, 10, rank=3, bias=False))
    assert compression_z(s) == pytest.approx(100.0 * svdp_dof(10, 20, 3) / 200)


def test_convert_fresh_init_keeps_bias_and_mode():
    net = Net()
    head_bias = net.head.bias.detach().clone()
    net.train(False)
    convert_model(net, 2, init="near_identity", spectrum="lipschitz", kinds=("linear",))
    assert net.head.init == "near_identity" and not net.head.training
    torch.testing.assert_close(net.head.bias, head_bias)
    with pytest.raises(ValueError, match="init"):
        convert_model(copy.deepcopy(net), 2, init="zeros")


def test_save_load_and_state_dict_names():
    """Parameter names are the layer's own (theta / point / u_params, s, v_params), so
    state dicts of earlier versions load; layers pickle with torch.save."""
    import io

    torch.manual_seed(3)
    layer = STTPConv2d(6, 8, 3, rank=3, init="random", dtype=DT)
    assert list(layer.state_dict()) == ["bias", "theta"]
    assert list(SVDPLinear(6, 4, rank=2).state_dict()) == ["bias", "u_params", "s", "v_params"]
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    x = torch.randn(2, 6, 5, 5, dtype=DT)
    torch.testing.assert_close(back(x), layer(x), rtol=0, atol=0)
    assert back.weight_param.owner is back
    fresh = STTPConv2d(6, 8, 3, rank=3, dtype=DT)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_shared_modules_stay_shared():
    # a module reachable under two names (weight tying by module) was converted or exported
    # under its first name only: the second name kept the old layer, silently untied
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 6, dtype=DT), nn.Tanh())
    net.add_module("again", net[0])
    x = torch.randn(4, 6, dtype=DT)
    report = convert_model(net, 2)
    assert report.converted == ["0"] and net.again is net[0]
    assert isinstance(net[0], STTPLinear)
    assert convert_model(net, 2).converted == []  # nothing left to convert
    with pytest.raises(ValueError, match="no submodule"):
        convert_model(net, 2, names=["missing"])
    out = export_model(net)
    assert type(out[0]) is nn.Linear and out.again is out[0]
    torch.testing.assert_close(out(x), net(x), rtol=1e-12, atol=1e-12)
    net2 = nn.Sequential(nn.Linear(6, 6, dtype=DT))
    net2.add_module("again", net2[0])
    assert convert_model(net2, 2, ignore=["again"]).converted == []
    assert convert_model(net2, 2, names=["again"]).converted == ["again"]
    assert isinstance(net2[0], STTPLinear) and net2.again is net2[0]


def test_tied_weights_are_not_untied():
    # an output layer tied to the embedding (head.weight = emb.weight) was converted into a
    # factorized copy of its own: the two weights then trained apart
    net = nn.Module()
    net.emb, net.head = nn.Embedding(8, 6, dtype=DT), nn.Linear(6, 8, bias=False, dtype=DT)
    net.head.weight = net.emb.weight
    net.other = nn.Linear(6, 4, dtype=DT)
    report = convert_model(net, 2)
    assert report.converted == ["other"]
    assert set(report.skipped) == {"emb", "head"} and "tied" in report.skipped["head"]
    assert net.head.weight is net.emb.weight
    with pytest.raises(ValueError, match="head: .*tied to 'emb'"):
        convert_model(net, 2, names=["head"])
