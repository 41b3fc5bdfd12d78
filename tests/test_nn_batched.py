"""Batched evaluation of equal-shaped Householder frames across a model: the same cores,
outputs and gradients as per-layer evaluation."""
import pytest
import torch
from torch import nn

from ttmanifold.nn import (
    STTPConv2d, STTPLinear, SVDPConv2d, SVDPLinear, batched_cores, batched_frames,
)

DT = torch.float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        STTPConv2d(4, 8, 3, padding=1, rank=4, init="random", dtype=DT),
        STTPConv2d(8, 8, 3, padding=1, rank=4, init="random", dtype=DT, spectrum="lipschitz"),
        STTPConv2d(8, 8, 3, padding=1, rank=4, init="random", dtype=DT, spectrum="identity"),
        SVDPConv2d(8, 8, 3, padding=1, rank=3, init="random", dtype=DT),
        SVDPConv2d(8, 8, 3, padding=1, rank=3, init="random", dtype=DT, spectrum="identity"),
        nn.Flatten(),
        STTPLinear(8 * 16, 6, rank=3, init="random", dtype=DT),
        SVDPLinear(6, 6, rank=2, init="random", dtype=DT),
    )


def test_batched_cores_equal_per_layer():
    model = _model()
    layers = [m for m in model if hasattr(m, "weight_param")]
    for got, layer in zip(batched_cores(layers), layers):
        want = layer.weight_param.cores()
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_batched_forward_and_gradients():
    model = _model()
    x = torch.randn(2, 4, 4, 4, dtype=DT)
    ref = model(x)
    ref.square().sum().backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with batched_frames(model) as layers:
        assert len(layers) == 7 and "_pinned_cores" in model[0].__dict__
        y = model(x)
    assert "_pinned_cores" not in model[0].__dict__
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    for a, b in zip([p.grad for p in model.parameters()], g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_manifold_layers_untouched_and_errors():
    model = _model()
    model[0].to_manifold()
    with batched_frames(model) as layers:
        assert model[0] not in layers and len(layers) == 6
    with pytest.raises(ValueError, match="chart-mode"):
        batched_cores([model[0]])
    with pytest.raises(TypeError, match="layers"):
        batched_cores([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="cores"):
        model[1].pin_cores(model[6].weight_param.cores())


def test_mixed_dtypes_keep_their_own():
    # equal-shaped frames of a float32 and a float64 layer were stacked together: torch
    # promoted the float32 layer's cores to float64, and its forward then refused float32
    torch.manual_seed(1)
    a = SVDPLinear(12, 12, rank=3, init="random", dtype=torch.float32)
    b = SVDPLinear(12, 12, rank=3, init="random", dtype=DT)
    for got, layer in zip(batched_cores([a, b]), (a, b)):
        for g, w in zip(got, layer.weight_param.cores()):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w)
    x = torch.randn(2, 12)
    with batched_frames(nn.ModuleList([a, b])):
        torch.testing.assert_close(a(x), a.decompress()(x))
