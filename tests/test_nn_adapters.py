"""Adapters W = W0 + dW: exactly the base layer at the start, trainable through the chart
and on the manifold, merge() equal to the adapted layer, every layer family."""
import geoopt
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ttmanifold.nn import SpectralAdapter, add_adapters, merge_adapters

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _copy(m):
    import copy
    return copy.deepcopy(m)


BASES = [
    (lambda: nn.Linear(12, 8, dtype=DT), lambda: torch.randn(5, 12, dtype=DT)),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, dtype=DT), lambda: torch.randn(2, 4, 5, 5, dtype=DT)),
    (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, dtype=DT), lambda: torch.randn(2, 4, 5, dtype=DT)),
    (lambda: nn.Embedding(20, 6, dtype=DT), lambda: torch.randint(0, 20, (3, 4))),
]


@pytest.mark.parametrize("case", range(len(BASES)))
@pytest.mark.parametrize("method,param", [("sttp", "chart"), ("svdp", "chart"),
                                          ("sttp", "manifold")])
def test_adapter_starts_at_base_and_merges(case, method, param):
    torch.manual_seed(case)
    make, inp = BASES[case]
    base = make()
    ref_layer = _copy(base)
    x = inp()
    ad = SpectralAdapter(base, 2, method=method, param=param)
    assert torch.equal(ad.delta_weight(), torch.zeros_like(base.weight))
    torch.testing.assert_close(ad(x), ref_layer(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in ad.base.parameters())
    trainable = [p for p in ad.parameters() if p.requires_grad]
    opt = (geoopt.optim.RiemannianAdam(trainable, lr=0.05) if param == "manifold"
           else torch.optim.Adam(trainable, lr=0.05))
    target = ref_layer(x).detach() + 1.0
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = (ad(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    dW = ad.delta_weight().detach()
    assert dW.abs().max() > 0
    if method == "svdp":
        assert torch.linalg.matrix_rank(ad.delta.weight_matrix().detach()).item() <= 2
    y = ad(x).detach()
    merged = ad.merge()
    assert merged is base
    torch.testing.assert_close(merged.weight, ref_layer.weight + dW, rtol=0, atol=1e-12)
    torch.testing.assert_close(merged(x), y, rtol=1e-10, atol=1e-10)


def test_first_gradient_reaches_the_spectrum_only():
    torch.manual_seed(5)
    ad = SpectralAdapter(nn.Linear(12, 8, dtype=DT), 3)
    x = torch.randn(4, 12, dtype=DT)
    ad(x).square().sum().backward()
    b = next(blk for blk in ad.delta.chart.layout if blk.kind == "spectrum")
    g = ad.delta.theta.grad
    assert g[b.start:b.start + b.size].abs().max() > 0
    g = torch.cat([g[:b.start], g[b.start + b.size:]])
    assert g.abs().max() == 0


def test_add_and_merge_adapters_on_a_model():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(10, 16, dtype=DT), nn.ReLU(), nn.Linear(16, 3, dtype=DT))
    x = torch.randn(7, 10, dtype=DT)
    ref = model(x)
    names = add_adapters(model, 4, method="sttp")
    assert names == ["0", "2"] and isinstance(model[2], SpectralAdapter)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert add_adapters(model, 4) == []  # already wrapped: nothing new
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(model(x), torch.zeros(7, 3, dtype=DT)).backward()
        opt.step()
    y = model(x).detach()
    merged = merge_adapters(model)
    assert set(merged) == {"0", "2"} and type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-10)


def test_adapter_bad_input():
    with pytest.raises(TypeError, match="base"):
        SpectralAdapter(nn.ReLU(), 2)
    with pytest.raises(ValueError, match="param"):
        SpectralAdapter(nn.Linear(4, 4), 2, method="svdp", param="manifold")
    with pytest.raises(ValueError, match="spectrum"):
        SpectralAdapter(nn.Linear(4, 4), 2, spectrum="lipschitz")
    with pytest.raises(ValueError, match="method"):
        SpectralAdapter(nn.Linear(4, 4), 2, method="lora")


def test_shared_layer_gets_one_adapter_and_merges_once():
    # a layer shared under two names: the second name kept the bare layer (no dW there),
    # and after merging it kept the adapter, adding dW a second time to the merged weight
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 6, dtype=DT), nn.Tanh())
    model.add_module("again", model[0])
    x = torch.randn(3, 6, dtype=DT)
    assert add_adapters(model, 2) == ["0"]
    assert isinstance(model.again, SpectralAdapter) and model.again is model[0]
    with torch.no_grad():
        model[0].delta.theta.normal_()
    y = model(x)
    merged = merge_adapters(model)
    assert list(merged) == ["0"] and type(model.again) is nn.Linear
    assert model.again is model[0]
    torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-10)
